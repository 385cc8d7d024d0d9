/**
 * Free loopback ports for agents that listen later: the demo and the test clusters write every
 * agent's peer URL into the others' configs before any of them starts, and a restarted agent
 * takes its port again.
 */
import { createSocket } from 'node:dgram';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:net';

const LOOPBACK = '127.0.0.1';
/** Lowest port picked: clear of the registered ports most services use. */
const BOTTOM = 20000;

/** Whether `port` on loopback can be bound now, for TCP and for UDP (a VM's UDP service uses one too). */
function canListen(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createServer();
    s.once('error', () => resolve(false));
    s.listen(port, LOOPBACK, () => {
      s.close(() => {
        const u = createSocket('udp4');
        u.once('error', () => {
          u.close();
          resolve(false);
        });
        u.bind(port, LOOPBACK, () => u.close(() => resolve(true)));
      });
    });
  });
}

/** The start of the kernel's ephemeral range: ports it hands out as the local end of outgoing connections. */
function ephemeralStart(): number {
  try {
    return Number(readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]) || 32768;
  } catch {
    return 32768;
  }
}

/** A port the kernel picks from its ephemeral range, bound and released. */
function kernelPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, LOOPBACK, () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

const handedOut = new Set<number>();

/**
 * A free port on 127.0.0.1, picked below the ephemeral range. A port from `listen(0)` comes from
 * that range, and until the agent binds it any outgoing loopback connection on the machine can
 * take it as its local port (seen as EADDRINUSE when tests run alongside). Never the same port
 * twice in one process; `listen(0)` is the fallback where there is no room below the range.
 *
 * @example
 * ```ts
 * const port = await freeLoopbackPort();
 * spawn('embot', ['agent', '--peer-listen', `127.0.0.1:${port}`, ...]);
 * ```
 */
export async function freeLoopbackPort(options: { readonly random?: () => number } = {}): Promise<number> {
  const random = options.random ?? Math.random;
  const top = Math.min(ephemeralStart(), 32768);
  for (let attempt = 0; attempt < 500 && top - BOTTOM > 1000; attempt++) {
    const port = BOTTOM + Math.floor(random() * (top - BOTTOM));
    if (handedOut.has(port)) continue;
    handedOut.add(port);
    if (await canListen(port)) return port;
  }
  return kernelPort();
}
