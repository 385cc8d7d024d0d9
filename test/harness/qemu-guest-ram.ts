import { readFileSync } from 'node:fs';
import { qemuRamBytes } from '../../effectors/hypervisor/qemu/ram-size.ts';

/**
 * How much of a QEMU's guest RAM is resident, in bytes: for an incoming QEMU, how far the
 * migration stream has filled its memory. A state of the destination itself, where a migration
 * record's progress is the source's view, sampled and pushed late (a test that waited for the
 * record to pass a mark SIGSTOPped a destination that had already taken the whole stream).
 *
 * The guest RAM is the one mapping of exactly the size QEMU was given: the spec's `memoryBytes`
 * plus the driver's pad under TCG, which every test runs (ram-size.ts; QEMU aligns it; glibc's 64 MiB malloc arenas are that less
 * their header, so they never match). Undefined when the
 * process is gone or no such mapping exists (yet).
 */
export function guestRamResidentBytes(pid: number, memoryBytes: number): number | undefined {
  let smaps: string;
  try {
    smaps = readFileSync(`/proc/${pid}/smaps`, 'utf8');
  } catch {
    return undefined;
  }
  const sizeKiB = qemuRamBytes(memoryBytes, 'tcg') / 1024;
  let found: number | undefined;
  // One entry per mapping: a header line "start-end perms …" and its "Key: value kB" fields.
  for (const entry of smaps.split(/\n(?=[0-9a-f]+-[0-9a-f]+ )/)) {
    if (Number(/\nSize:\s+(\d+) kB/.exec(entry)?.[1]) !== sizeKiB) continue;
    const rss = Number(/\nRss:\s+(\d+) kB/.exec(entry)?.[1]) * 1024;
    if (Number.isFinite(rss)) found = Math.max(found ?? 0, rss);
  }
  return found;
}
