/**
 * Who is on the other end of a loopback TCP connection (Linux): the owner uid of the connecting
 * socket, read from /proc/net/tcp. The stream relay takes QEMU's migration stream on a loopback
 * port (stream-relay.ts) and must know the writer is this agent's own user, as the 0700 dir of
 * its unix socket guaranteed before: any local user can connect to a loopback port.
 */
import { accessSync, constants, readFileSync } from 'node:fs';

const PROC_NET_TCP = '/proc/net/tcp';

/**
 * The uid owning the established socket whose local port is `peerPort` and whose remote port is
 * `ourPort` (the connecting side of a connection accepted on `ourPort`), from the text of /proc/net/tcp;
 * undefined when no well-formed line matches. Malformed lines are skipped, never guessed at.
 */
export function loopbackPeerUid(table: string, peerPort: number, ourPort: number): number | undefined {
  for (const line of table.split('\n').slice(1)) {
    // "  3: 0100007F:A1B2 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 4711 …"
    const f = line.trim().split(/\s+/);
    if (f.length < 8) continue;
    const local = /^[0-9A-Fa-f]{8}:([0-9A-Fa-f]{4})$/.exec(f[1]!);
    const remote = /^[0-9A-Fa-f]{8}:([0-9A-Fa-f]{4})$/.exec(f[2]!);
    // Established only: a closed connection's TIME_WAIT line on the same ports carries no owner (uid 0).
    if (!local || !remote || f[3] !== '01' || !/^\d+$/.test(f[7]!)) continue;
    if (parseInt(local[1]!, 16) === peerPort && parseInt(remote[1]!, 16) === ourPort) return Number(f[7]);
  }
  return undefined;
}

/** /proc/net/tcp's text, or undefined where it cannot be read (the relay then takes no connection: no owner, no stream). */
export function readLoopbackTable(): string | undefined {
  try {
    return readFileSync(PROC_NET_TCP, 'utf8');
  } catch {
    return undefined;
  }
}

/** Whether /proc/net/tcp can be read here (without reading it: it can be MiBs on a busy host). */
export function loopbackTableReadable(): boolean {
  try {
    accessSync(PROC_NET_TCP, constants.R_OK);
    return true;
  } catch {
    return false;
  }
}
