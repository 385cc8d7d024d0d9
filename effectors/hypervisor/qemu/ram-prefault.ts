/**
 * Faults an incoming QEMU's guest RAM in before its copy starts, for a pre-warm's target (the
 * switch waits for a command, so nobody waits for this now).
 *
 * Why: QEMU touches each 2 MiB of a target's guest RAM first when the stream writes there, and the
 * kernel zero-fills a transparent huge page at that touch. On a host whose own memory is backed
 * lazily (a VM, like this project's machines) that costs ~6-10 ms per 2 MiB, and when first touches
 * fall in the stop-and-copy the downtime went from ~15 ms to 60-120 ms: perf showed the target's
 * main thread in `do_huge_pmd_anonymous_page` → `clear_page` for ~90% of the stop (BENCHMARKS.md,
 * "Pre-warmed switch with qemu: the first touch at the target").
 *
 * How: QEMU's memory backend preallocates itself when its `prealloc` is set after it was created
 * (backends/hostmem.c), through the guest RAM's real mapping (THP, NUMA policy): `-mem-prealloc` for
 * a QEMU that already runs (a spare adopted, or one started without it). The monitor is busy while it
 * runs (~150 ms per 64 MiB on TCG here).
 */
import type { QmpClient } from './qmp-client.ts';

/** The memory backend `-m` creates for `-machine pc` (its default RAM id), as QOM names it. */
export const GUEST_RAM_OBJECT = '/objects/pc.ram';

/** Faults the guest RAM of the QEMU behind `qmp` in. */
export async function faultGuestRamIn(qmp: QmpClient, timeoutMs: number): Promise<void> {
  await qmp.execute('qom-set', { path: GUEST_RAM_OBJECT, property: 'prealloc', value: true }, { timeoutMs });
}
