/**
 * Pre-warm with the qemu driver (issue 13 point 4, README "Several destinations", *Pre-warm with
 * qemu: how it holds*). QEMU 7.2 has no "copy but do not switch" mode, so the hold is made of its
 * own parameters, applied live with `migrate-set-parameters` while the one stream runs.
 *
 * QEMU switches when what is pending fits `downtime-limit` at its measured rate, and it re-reads
 * the guest's dirty log only when it has (nearly) caught up; a re-read that finds (almost) nothing
 * dirtied completes the migration whatever the limit. So two holds, chosen by the guest's dirty
 * rate measured at the start ({@link holdMode}):
 *
 * - `limit` (a guest that writes hard, ≥ {@link HEAVY_DIRTY_RATE}): `downtime-limit` 1 ms. QEMU
 *   keeps re-sending what the guest dirties, and 1 ms of its rate is less than such a guest dirties
 *   between two re-reads. Auto-converge (a capability, fixed for the whole migration) keeps its
 *   setting but is capped at 1 % (`cpu-throttle-initial` = `max-cpu-throttle` = 1) until the
 *   command. Once QEMU measures the guest below half that rate (starved, or quieter), it crawls
 *   with what is left of the round as its reserve;
 * - `reserve` (any other guest): the copy runs until only a reserve of the VM is left unsent, then
 *   crawls (`max-bandwidth` {@link CRAWL_BANDWIDTH}: one page per 100 ms window), so QEMU never
 *   catches up, never re-reads the dirty log and never switches. Pages the guest dirties meanwhile
 *   go after the command, with the reserve; for a guest that writes little that is little.
 *   `max-bandwidth` counts bytes, and QEMU sends a zero page as 9 bytes: a guest whose RAM ends in
 *   zero pages (one that has used little of it) got through that tail between two polls, past its
 *   reserve, re-read its dirty log and, writing slowly (or starved of CPU on a loaded host),
 *   switched (issue 13: `holdLost`). So the approach is paced by what the rest of the pass costs
 *   to send, from a map of the guest's zero pages taken at the start ({@link PageCosts}): the cap
 *   never lets the pass end within {@link HOLD_SAFE_MS}, however late the next poll.
 *
 * At the command the throttle comes back; at the lift the real `downtime-limit` and `max-bandwidth`
 * do, and QEMU switches as soon as it fits (pause-before-switchover still gives the management
 * hand-over its paused moment). If QEMU reaches `pre-switchover` while held anyway (a `limit` guest
 * that stopped writing within one round, a poll later than {@link HOLD_SAFE_MS}, a crawl that sent
 * its whole reserve while the guest wrote nothing), the driver cancels (the VM runs on) with
 * MIGRATION_FAILED `holdLost` rather than keep the VM paused until the command.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import type { MigrationProgress } from '../hypervisor-contract.ts';
import type { PrewarmHold } from '../prewarm-gate.ts';

const MiB = 1024 * 1024;
const PAGE = 4096;

/** Bytes QEMU 7.2 puts on the stream for a zero page in a pass: the 8-byte page header and one byte. */
export const ZERO_PAGE_COST = 9;
/** …and for any other page: the header and the page. */
export const DATA_PAGE_COST = PAGE + 8;

/** How late a poll may come while a `reserve` copy approaches its reserve without the pass ending, ms: the cap is at most what is left of the pass per this time. */
export const HOLD_SAFE_MS = 1000;

/** Guest RAM mapped for its zero pages only up to this size: below it QEMU's main RAM block is the guest-physical range from 0 (a larger pc/q35 guest has a hole below 4 GiB). */
export const PAGE_MAP_MAX_BYTES = 2048 * MiB;

/** The downtime limit that holds a pre-warm's copy, ms. */
export const HOLD_DOWNTIME_LIMIT_MS = 1;

/** Dirty rate (bytes/s) from which the `limit` hold is used: on TCG here a guest at 111 MiB/s (QEMU's figure) stayed held, the same guest 2.5× slower did not. */
export const HEAVY_DIRTY_RATE = 128 * MiB;

/** `max-bandwidth` of a crawling copy: QEMU's window budget is a tenth of it, 1 byte, so one page goes per 100 ms window (0 would mean no limit). */
export const CRAWL_BANDWIDTH = 10;

/** QEMU's `max-bandwidth` has no "unlimited"; the driver's stand-in for it. */
const UNLIMITED_BANDWIDTH = 1024 ** 4;

/** QEMU's throttle defaults (cpu-throttle-initial, max-cpu-throttle), restored at the command. */
const QEMU_THROTTLE_INITIAL = 20;
const QEMU_MAX_CPU_THROTTLE = 99;

export type HoldMode = 'limit' | 'reserve';

/** The hold for a guest dirtying `dirtyRate` bytes/s (undefined: not measured → `reserve`, the one that cannot be lost). */
export function holdMode(dirtyRate: number | undefined): HoldMode {
  return dirtyRate !== undefined && dirtyRate >= HEAVY_DIRTY_RATE ? 'limit' : 'reserve';
}

/** What a `reserve` hold leaves unsent: an eighth of the VM, 4..256 MiB (sent after the command at the stream's rate). */
export function reserveBytes(memory: number): number {
  return Math.min(256 * MiB, Math.max(4 * MiB, Math.round(memory / 8)));
}

/**
 * What each page of the guest's RAM costs to send in a pre-copy pass, as suffix sums in QEMU's
 * order (its main RAM block first, which is the guest-physical range from 0), so the cost of the
 * rest of a pass is known from QEMU's `ram.remaining` alone. A snapshot: a zero page the guest
 * writes afterwards costs more (the pace is then slower than needed), a page it clears less (the
 * margin of {@link HOLD_SAFE_MS} covers that).
 */
export class PageCosts {
  private readonly suffix: Float64Array;

  /** `zero[i]` is 1 when the guest's page i was all zeros. */
  constructor(zero: Uint8Array) {
    this.suffix = new Float64Array(zero.length + 1);
    for (let i = zero.length - 1; i >= 0; i--) this.suffix[i] = this.suffix[i + 1]! + (zero[i] ? ZERO_PAGE_COST : DATA_PAGE_COST);
  }

  /** Pages mapped. */
  get pages(): number {
    return this.suffix.length - 1;
  }

  /**
   * What the last `unsentPages` of a pass over `totalPages` cost. Pages past the map (QEMU's smaller
   * RAM blocks, which come after the main one) are taken as zero pages: the cheap guess, so a cap
   * derived from it is never too high.
   */
  costOfLast(unsentPages: number, totalPages: number): number {
    const beyond = Math.max(0, totalPages - this.pages);
    const tail = Math.min(unsentPages, beyond);
    const mapped = Math.min(this.pages, unsentPages - tail);
    return tail * ZERO_PAGE_COST + this.suffix[this.pages - mapped]!;
  }
}

/** Saves `size` bytes of guest-physical memory from `address` to `file` (QMP `pmemsave`). */
export type PhysicalMemorySave = (address: number, size: number, file: string) => Promise<unknown>;

/**
 * Maps the guest's zero pages (`pmemsave` in 64 MiB pieces, each read and deleted): a write and a
 * read of the RAM on that disk, about 0.1 s for 64 MiB here. The pieces are the guest's memory in
 * clear, so they go into a fresh 0700 folder under `dir` (mkdtemp), which no other local user can
 * read whatever the state dir's mode, and which is removed after. Undefined for a guest larger
 * than {@link PAGE_MAP_MAX_BYTES} (its hold paces by pages, as before the map).
 */
export async function mapZeroPages(save: PhysicalMemorySave, memoryBytes: number, dir: string): Promise<PageCosts | undefined> {
  if (memoryBytes > PAGE_MAP_MAX_BYTES) return undefined;
  const piece = 64 * MiB;
  const zero = new Uint8Array(Math.ceil(memoryBytes / PAGE));
  const empty = Buffer.alloc(PAGE);
  const own = mkdtempSync(join(dir, 'zero-map-'));
  try {
    for (let address = 0; address < memoryBytes; address += piece) {
      const length = Math.min(piece, memoryBytes - address);
      const file = join(own, `${address}.bin`);
      try {
        await save(address, length, file);
        const buf = readFileSync(file);
        for (let off = 0; off < buf.length; off += PAGE) {
          const end = Math.min(off + PAGE, buf.length);
          zero[(address + off) / PAGE] = buf.compare(empty, 0, end - off, off, end) === 0 ? 1 : 0;
        }
      } finally {
        rmSync(file, { force: true });
      }
    }
  } finally {
    rmSync(own, { recursive: true, force: true });
  }
  return new PageCosts(zero);
}

/** What the hold needs of the source QEMU's monitor: `migrate-set-parameters` with these. */
export type SetParameters = (params: Readonly<Record<string, number>>) => Promise<unknown>;

export interface QemuCopyHoldOptions {
  readonly mode: HoldMode;
  /** The VM's RAM, bytes (the reserve's size). */
  readonly memoryBytes: number;
  /** The driver's query-migrate period, ms: the bulk copy of a `reserve` hold is capped per period ({@link bulkCap}). */
  readonly pollMs: number;
  /** The guest's zero pages at the start ({@link mapZeroPages}): a `reserve` copy is paced by what the rest of its pass costs. Without it, by pages. */
  readonly pageCosts?: PageCosts;
  /** The migration's own downtime limit, applied at the lift. */
  readonly downtimeLimitMs: number;
  /** The migration's own bandwidth cap, bytes/s (none: unlimited), applied at the lift. */
  readonly maxBandwidth?: number;
  /** The configured first throttle step, percent (QEMU's default 20), applied at the command. */
  readonly cpuThrottleInitial?: number;
  /** Called after each parameter change (the driver's poll wakes at once). */
  readonly onChange?: () => void;
  /** A parameter change failed (the monitor went away): the driver's loop reports it. */
  readonly onError?: (e: unknown) => void;
}

/** The parameters a held copy starts with (they override the migration's own). */
export function heldParameters(o: Pick<QemuCopyHoldOptions, 'mode' | 'memoryBytes' | 'pollMs' | 'maxBandwidth' | 'pageCosts'>): Readonly<Record<string, number>> {
  const held = { 'downtime-limit': HOLD_DOWNTIME_LIMIT_MS, 'cpu-throttle-initial': 1, 'max-cpu-throttle': 1 };
  if (o.mode === 'limit') return held;
  // The whole pass ahead (the main block; QEMU's smaller blocks after it add to it): even a first poll that comes late finds it unfinished.
  const pass = o.pageCosts?.costOfLast(o.pageCosts.pages, o.pageCosts.pages);
  return { ...held, 'max-bandwidth': pass === undefined ? bulkCap(o, 2) : pacedCap(o, pass) };
}

/** The cap that leaves `passCost` (what the rest of the pass costs) unsent for {@link HOLD_SAFE_MS}, within the bulk cap. */
function pacedCap(o: Pick<QemuCopyHoldOptions, 'memoryBytes' | 'pollMs' | 'maxBandwidth'>, passCost: number): number {
  return Math.max(CRAWL_BANDWIDTH, Math.min(bulkCap(o, 2), Math.floor((passCost * 1000) / HOLD_SAFE_MS)));
}

/**
 * The bulk copy's cap of a `reserve` hold: the reserve / `perPoll` per poll period. Half the reserve
 * per poll until three reserves are left: the exit condition judges what is left against the
 * highest rate the copy had, this one, and reserve / rate is then two poll periods (200 ms), within
 * the default 300 ms downtime limit. Then an eighth per poll: the last two reserves take 16 polls,
 * so a poll up to 7 periods late still finds the reserve unsent (later, a guest that wrote nothing
 * meanwhile lets QEMU catch up and complete: holdLost).
 */
function bulkCap(o: Pick<QemuCopyHoldOptions, 'memoryBytes' | 'pollMs' | 'maxBandwidth'>, perPoll: number): number {
  return Math.min(Math.round(reserveBytes(o.memoryBytes) / perPoll / (Math.max(10, o.pollMs) / 1000)), o.maxBandwidth ?? UNLIMITED_BANDWIDTH);
}

/**
 * One held copy of one QEMU migration.
 *
 * @example
 * ```ts
 * const o = { mode: holdMode(rate), memoryBytes, pollMs: 100, downtimeLimitMs: 300 };
 * await qmp.execute('migrate-set-parameters', { ...own, ...(prewarm.held() ? heldParameters(o) : {}) });
 * await qmp.execute('migrate', { uri });
 * const hold = new QemuCopyHold((p) => qmp.execute('migrate-set-parameters', p), prewarm, o);
 * onProgress(hold.progress(p)); // each poll: the reserve's crawl starts here
 * if (info.status === 'pre-switchover' && hold.holding()) { … the hold was lost … }
 * hold.close();
 * ```
 */
export class QemuCopyHold {
  private peakRate = 0;
  private closed = false;
  private crawling = false;
  private slowed = false;
  /** The `max-bandwidth` last set while the approach is paced by {@link PageCosts}. */
  private pacedCap: number;
  /** Epoch ms of the lift once its parameters are applied; undefined while held. */
  liftedAt: number | undefined;
  /** Epoch ms the gate was seen lifted ({@link budgetStart}). */
  private releasedAt: number | undefined;
  /** A parameter change QEMU refused (or the monitor went away): the driver ends the migration with it. */
  failure: unknown;

  constructor(
    private readonly setParameters: SetParameters,
    private readonly hold: PrewarmHold,
    private readonly o: QemuCopyHoldOptions,
  ) {
    this.pacedCap = heldParameters(o)['max-bandwidth'] ?? UNLIMITED_BANDWIDTH;
    const throttleBack = { 'cpu-throttle-initial': o.cpuThrottleInitial ?? QEMU_THROTTLE_INITIAL, 'max-cpu-throttle': QEMU_MAX_CPU_THROTTLE };
    // The lift settles `commanded` too (just before): then the lift's own change carries the throttle.
    void hold.commanded?.then(() => (hold.held() ? this.apply(throttleBack) : undefined));
    void hold.lifted.then(async () => {
      this.releasedAt ??= Date.now();
      const own = { 'downtime-limit': Math.max(1, Math.round(o.downtimeLimitMs)), 'max-bandwidth': Math.round(o.maxBandwidth ?? UNLIMITED_BANDWIDTH) };
      if (await this.apply({ ...throttleBack, ...own })) this.liftedAt ??= Date.now();
      o.onChange?.();
    });
  }

  /** True while the gate holds (QEMU must not reach its switchover). */
  holding(): boolean {
    return this.hold.held();
  }

  /**
   * Where the copy's time budget starts: the gate's lift (undefined while it holds: warming may last
   * as long as the command takes). Not {@link liftedAt}, which comes a monitor round trip later:
   * between the two the driver took the pre-warm's start for the budget's and cancelled a copy
   * warm for longer than the budget the moment it was lifted (issue 13, a hand run held 2m48s).
   */
  budgetStart(): number | undefined {
    if (this.hold.held()) return undefined;
    return (this.releasedAt ??= Date.now());
  }

  /** The copy crawls from here: one page per QEMU window, so it never catches up while held. */
  private crawl(): void {
    this.crawling = true;
    void this.apply({ 'max-bandwidth': CRAWL_BANDWIDTH });
  }

  /**
   * A progress report as the pre-warm judges it; a `reserve` hold starts its crawl here once only
   * the reserve is left. While held the rate reported is the highest of this migration (the full
   * copy's): QEMU's own rate then is what it still sends, not what the stream can carry. A crawling
   * copy has sent all but the reserve and re-reads nothing: it counts as past its first round.
   * `ramTotalBytes` (QEMU's `ram.total`, every RAM block) places `remainingBytes` in the pass for
   * the page map; without it the copy is paced by pages.
   */
  progress(p: MigrationProgress, ramTotalBytes?: number): MigrationProgress {
    this.peakRate = Math.max(this.peakRate, p.rateBytesPerSec);
    const reserve = reserveBytes(this.o.memoryBytes);
    const costs = this.o.pageCosts;
    const totalPages = ramTotalBytes === undefined ? undefined : Math.ceil(ramTotalBytes / PAGE);
    const unsentPages = Math.ceil(p.remainingBytes / PAGE);
    if (this.hold.held() && !this.crawling && p.phase === 'precopy' && p.remainingBytes > 0) {
      if (this.o.mode === 'limit') {
        // The guest no longer writes hard (starved of CPU on a loaded host, or quieter): QEMU would soon catch up and
        // switch under the 1 ms limit. What is left of this round becomes the reserve, and the crawl re-reads the dirty
        // log only once it is sent (then whatever the guest dirtied meanwhile is the next).
        if (p.rounds >= 2 && p.dirtyRateBytesPerSec > 0 && p.dirtyRateBytesPerSec < HEAVY_DIRTY_RATE / 2) this.crawl();
      } else if (p.remainingBytes <= reserve) {
        this.crawl();
      } else if (costs !== undefined && totalPages !== undefined && p.rounds <= 1) {
        // Still in the first pass: what is unsent is the end of it, whose cost the map knows.
        const left = costs.costOfLast(unsentPages, totalPages);
        const cap = pacedCap(this.o, left);
        if (left <= reserve / 2) {
          // The rest is cheap (zero pages): a reserve of many pages that costs half the reserve's bytes, with no slow approach
          // to it. Not less: after the lift QEMU judges its first re-read by the rate of its first 100 ms window, and with
          // only zero pages to send then it found the rate low, re-sent the guest's working set once more and switched
          // 0.1–0.5 s later (bench, 2026-12-06).
          this.crawl();
        } else if (cap < this.pacedCap * 0.8) {
          // Lowered only (the pass's rest only shrinks), and not for every small step: one change per fifth.
          this.pacedCap = cap;
          void this.apply({ 'max-bandwidth': cap });
        }
      } else if (p.remainingBytes <= 3 * reserve && !this.slowed) {
        this.slowed = true;
        void this.apply({ 'max-bandwidth': bulkCap(this.o, 8) });
      }
    }
    const held = this.crawling && this.hold.held();
    // A crawling reserve is judged by what it costs to send: zero pages are a header each. Only while it is the end of
    // the first pass (QEMU's count still 1): a later reserve is a dirty set, which the map does not place.
    const reserveCost =
      held && costs !== undefined && totalPages !== undefined && p.rounds <= 1 ? Math.min(p.remainingBytes, costs.costOfLast(unsentPages, totalPages)) : undefined;
    return {
      ...p,
      // Paced by the map, the copy ran at what the pacing allowed, not at what the stream can carry: judged at the bulk
      // cap it would have had (the rate it reached before the pacing), as QEMU after the lift, unlimited, has.
      rateBytesPerSec: costs !== undefined && this.hold.held() ? Math.max(this.peakRate, bulkCap(this.o, 2)) : this.peakRate,
      ...(held ? { rounds: Math.max(2, p.rounds) } : {}),
      ...(reserveCost === undefined ? {} : { remainingBytes: reserveCost }),
    };
  }

  /** The migration ended: later gate changes touch nothing. */
  close(): void {
    this.closed = true;
  }

  private async apply(params: Readonly<Record<string, number>>): Promise<boolean> {
    if (this.closed) return false;
    try {
      await this.setParameters(params);
      this.o.onChange?.();
      return true;
    } catch (e) {
      if (this.closed) return false;
      this.failure ??= e;
      this.o.onError?.(e);
      return false;
    }
  }
}
