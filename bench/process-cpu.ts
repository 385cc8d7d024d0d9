import { readdirSync, readFileSync } from 'node:fs';

/**
 * CPU time of process `pid` so far, every thread (main, libuv pool, V8's GC and compiler), in ms:
 * the sum of `/proc/<pid>/task/<tid>/schedstat`'s time on CPU (ns). `/proc/<pid>/stat` counts in
 * 10 ms ticks, too coarse for a 50 ms migration. 0 where /proc has no schedstat (not Linux).
 */
export function cpuMs(pid: number): number {
  let ns = 0;
  try {
    for (const tid of readdirSync(`/proc/${pid}/task`)) {
      try {
        ns += Number(readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'utf8').split(' ')[0]);
      } catch {
        // The thread ended between the listing and the read: its time is lost to this sample only.
      }
    }
  } catch {
    return 0;
  }
  return ns / 1e6;
}
