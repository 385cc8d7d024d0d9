/**
 * The established TCP connections a process holds to a loopback port (Linux): its socket inodes
 * from /proc/<pid>/fd matched against /proc/net/tcp. For tests that check links an agent keeps
 * open (warm peer links) without any help from the agent itself.
 */
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';

export function establishedTo(pid: number, remotePort: number): number {
  const inodes = new Set<string>();
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`));
      if (m) inodes.add(m[1]!);
    } catch {
      // closed between the listing and the read
    }
  }
  let n = 0;
  for (const line of readFileSync('/proc/net/tcp', 'utf8').split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f.length < 10 || f[3] !== '01') continue;
    const remote = /:([0-9A-Fa-f]{4})$/.exec(f[2]!);
    if (remote && parseInt(remote[1]!, 16) === remotePort && inodes.has(f[9]!)) n++;
  }
  return n;
}
