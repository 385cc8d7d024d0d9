/**
 * The RAM size QEMU is started with for a VM: under TCG its spec's memory plus {@link RAM_PAD_BYTES},
 * under KVM the spec's memory.
 *
 * Why the pad (README "Several destinations / pre-warm with qemu", the lost-pages bug): QEMU 7.2's
 * `cpu_physical_memory_sync_dirty_bitmap` (include/exec/ram_addr.h) has a fast path for a RAM block
 * whose length is a whole number of bitmap words (64 pages, 256 KiB): it takes the migration dirty
 * bits with an atomic exchange and, unlike its per-page path, does not reset TCG's TLB write
 * entries of the pages it cleaned. A page written since the last sync keeps a TLB entry without
 * TLB_NOTDIRTY, so its next writes through that entry are never logged and never re-sent: the
 * target commits a stale page. Upstream fixed it in QEMU 9.0 ("physmem: Fix migration dirty bitmap
 * coherency with TCG memory access", which calls `cpu_physical_memory_dirty_bits_cleared`); the
 * 7.2 stable releases (Debian bookworm's 7.2.22 included) do not carry it. Seen: a copy after a
 * cancelled one out of the same QEMU lost pages in every run, a first copy never. Our reading of why
 * (not measured inside QEMU): the bug bites only while TCG's TLB keeps the entries between two
 * syncs; a TLB flush may double the TLB (cputlb.c resizing), every dirty-log start and stop flushes
 * it, so after a cancel the TLB holds the test guest's whole working set, while before it the
 * guest's sweep evicts each entry (refilled with TLB_NOTDIRTY) before its page is written again. A
 * guest whose own TLB flushes grow it (a Linux guest) could then lose pages on a first copy too.
 *
 * A block length that is not a whole number of words sends every sync down the per-page path
 * (`cpu_physical_memory_test_and_clear_dirty`, which calls `tlb_reset_dirty_range_all` for each
 * page it cleans): correct tracking, whatever the TLB holds. QEMU rounds `-m` up to 8 KiB, so 8 KiB
 * is the smallest pad that stays off the fast path. The guest sees 8 KiB more RAM; source and
 * target both start from the same spec and accelerator, so their block lengths still match (a TCG
 * QEMU and a KVM one no longer can). Not under KVM: its dirty log does not go through TCG's TLB, and
 * the per-page path would cost a KVM_CLEAR_DIRTY_LOG per dirty page on every sync.
 */

/** Added to every VM's RAM: not a multiple of 256 KiB, and QEMU keeps sizes in 8 KiB steps. */
export const RAM_PAD_BYTES = 8 * 1024;

/** QEMU's sync takes its fast path for a block of a whole number of 64-page bitmap words. */
export const DIRTY_SYNC_WORD_BYTES = 64 * 4096;

/** The bytes of guest RAM QEMU gets for a VM of `memory` bytes (whole MiB, vm-spec.ts). */
export function qemuRamBytes(memory: number, accel: 'kvm' | 'tcg'): number {
  return accel === 'tcg' ? memory + RAM_PAD_BYTES : memory;
}

/** The `-m` argument for a VM of `memory` bytes. */
export function qemuRamArg(memory: number, accel: 'kvm' | 'tcg'): string {
  return `${qemuRamBytes(memory, accel) / 1024}k`;
}
