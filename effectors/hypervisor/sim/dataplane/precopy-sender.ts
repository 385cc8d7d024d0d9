/**
 * Pre-copy live migration of a sim VM's memory over data paths: a full first round, rounds of the
 * pages dirtied meanwhile, auto-converge when rounds do not converge, then stop-and-copy of the
 * rest with the CPU state.
 */
import { EffectorError, ErrorCodes } from '../../../../core/errors.ts';
import type { RequestBody } from '../../../../core/wire/index.ts';
import { PageGatherer, allPages, batchChecksum, encodeIndexes, pageLength, pagesBytes, splitIndexes } from './page-batch.ts';
import { Striper, type Batch, type DataPath, type PathReport } from './striper.ts';
import { MAX_ZEROS_PER_BATCH, splitZeroPages } from './zero-pages.ts';
import type { PrewarmHold } from '../../prewarm-gate.ts';

export type { DataPath, PathReport } from './striper.ts';

export const DEFAULT_DOWNTIME_LIMIT_MS = 300;
export const DEFAULT_MAX_ROUNDS = 30;
/**
 * Page bytes per PageBatch. Each batch costs a request, an ack and two socket writes besides its
 * bytes; across two processes 1 MiB batches carried ~1.4x the rate of 256 KiB ones (BENCHMARKS.md).
 */
export const DEFAULT_BATCH_BYTES = 1024 * 1024;
/** Fraction of the original dirty rate removed per auto-converge step (QEMU's cpu-throttle-initial). */
export const THROTTLE_STEP = 0.2;
/** Most of the dirty rate auto-converge removes (QEMU's cpu-throttle-max). */
export const THROTTLE_MAX = 0.99;
/** A round whose remainder is above this share of the previous one did not shrink. */
const SHRINK_FACTOR = 0.9;
/** Batches in flight per path, in units of batchBytes. */
export const WINDOW_BATCHES = 4;
const PROGRESS_EVERY_MS = 200;
/** Room for a PageBatch's fields besides indexes and pages (the CPU state rides on top, on the final batch). */
const FRAME_OVERHEAD_BYTES = 4096;
/** The send rate is measured over the latest rounds that add up to at least this long. */
const RATE_WINDOW_MS = 250;
/**
 * While held, the dirty rate is measured over the latest looks at the dirty log spanning at least
 * this long: a held round or an idle look is shorter than the VM's own write ticks (the sim's
 * 50 ms), so measured alone it reads 0 or a burst.
 */
const DIRTY_WINDOW_MS = 1000;

export type PreCopyPhase = 'precopy' | 'stop-and-copy' | 'done';

export interface PreCopyProgress {
  readonly phase: PreCopyPhase;
  /** Round being sent or just finished (0 = the full copy). */
  readonly round: number;
  /** Dirty bytes still to send. */
  readonly remainingBytes: number;
  /** Page bytes acknowledged so far, re-sends included. */
  readonly sentBytes: number;
  /** Bytes of memory acknowledged as zero pages (sent as indexes only, not in `sentBytes`). */
  readonly zeroBytes: number;
  /** Send rate over all live paths, bytes/s. */
  readonly rateBytesPerSec: number;
  /** Rate at which the VM wrote pages during the last round, bytes/s. */
  readonly dirtyRateBytesPerSec: number;
  /** `remainingBytes / rateBytesPerSec`: the downtime if the VM stopped now. */
  readonly expectedDowntimeMs: number;
  /** 0..1: fraction of the original dirty rate removed by auto-converge. */
  readonly throttle: number;
  readonly paths: readonly PathReport[];
}

/** What pre-copy needs of the VM's hypervisor: the sim driver's page-level view of its memory. */
export interface PreCopyVm {
  pages(vm: string): { readonly pageSize: number; readonly pageCount: number; readonly memory: Uint8Array };
  /** Indexes of the pages dirtied since the last call, ascending; clears the dirty bitmap. */
  takeDirty(vm: string): Uint32Array;
  setDirtyRate(vm: string, rate: number): void;
  /** Current dirty rate setting (bytes/s) and page writes so far, read synchronously between batches. */
  counters(vm: string): { readonly dirtyRate: number; readonly pagesWritten: number };
}

export interface PreCopyOptions {
  readonly migrationId: string;
  readonly vm: string;
  readonly driver: PreCopyVm;
  readonly paths: readonly DataPath[];
  /** Stop-and-copy starts once the expected downtime fits this. Default 300 ms (QEMU's default). */
  readonly downtimeLimitMs?: number;
  /** Rounds in all, the final one included. Default 30. */
  readonly maxRounds?: number;
  /** Throttle the VM's dirty rate when rounds do not converge. Default true. */
  readonly autoConverge?: boolean;
  /** Page bytes per PageBatch. Default 1 MiB. */
  readonly batchBytes?: number;
  /** Called once, right before the final (stop-and-copy) round. */
  readonly stopVm: () => unknown;
  /** Called once after stopVm; sent with the final batch. */
  readonly cpuState?: () => Uint8Array;
  readonly onProgress?: (p: PreCopyProgress) => void;
  readonly signal?: AbortSignal;
  /** Timeout of one batch's acknowledgement; a path that times out counts as failed. */
  readonly requestTimeoutMs?: number;
  /**
   * A pre-warm: while held, rounds of dirtied pages keep going after the full copy (a pause
   * between empty ones) and the VM is not stopped; rounds made while held do not count against
   * `maxRounds`, and auto-converge waits for the lift (throttling a guest for minutes is no warm-up).
   */
  readonly hold?: PrewarmHold;
}

/** Pause between two held rounds that found nothing dirtied. */
export const PREWARM_IDLE_MS = 20;

export interface PreCopyResult {
  /** Rounds in all, the final one included. */
  readonly rounds: number;
  /** Page bytes of the final round, sent with the VM stopped. */
  readonly stopBytes: number;
  /** Page bytes acknowledged, re-sends included. */
  readonly bytes: number;
  /** Bytes of memory acknowledged as zero pages (indexes only, not in `bytes`). */
  readonly zeroBytes: number;
  /** Pages acknowledged, re-sends included. */
  readonly pagesSent: number;
  readonly totalMs: number;
  /** From stopVm() to the acknowledgement of the final batch. */
  readonly downtimeMs: number;
  /** The expected downtime fitted the limit (false: stopped because of maxRounds). */
  readonly converged: boolean;
  readonly throttled: boolean;
  readonly throttleSteps: number;
  /** The VM's dirty rate setting before the migration (restored at the end), bytes/s. */
  readonly initialDirtyRate: number;
  /** The dirty rate setting when the VM stopped (lower than the initial one when throttled), bytes/s. */
  readonly finalDirtyRate: number;
  /** Batches sent again, after a refusal by the target or the failure of their path. */
  readonly resent: number;
  readonly perPath: readonly { readonly name: string; readonly bytes: number; readonly batches: number; readonly failed: boolean }[];
  /** Expected downtime when the stop was decided. */
  readonly expectedDowntimeMs: number;
  /** Send rate over the live paths at the end, bytes/s. */
  readonly rateBytesPerSec: number;
}

interface Settings {
  readonly downtimeLimitMs: number;
  readonly maxRounds: number;
  readonly autoConverge: boolean;
  readonly pagesPerBatch: number;
}

function invalid(message: string): EffectorError {
  return new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, message);
}

function settings(o: PreCopyOptions, pageSize: number): Settings {
  const downtimeLimitMs = o.downtimeLimitMs ?? DEFAULT_DOWNTIME_LIMIT_MS;
  if (typeof downtimeLimitMs !== 'number' || !Number.isFinite(downtimeLimitMs) || downtimeLimitMs <= 0) throw invalid(`downtimeLimitMs must be a number > 0, got ${String(downtimeLimitMs)}`);
  const maxRounds = o.maxRounds ?? DEFAULT_MAX_ROUNDS;
  if (!Number.isInteger(maxRounds) || maxRounds < 1) throw invalid(`maxRounds must be an integer ≥ 1, got ${String(maxRounds)}`);
  const batchBytes = o.batchBytes ?? DEFAULT_BATCH_BYTES;
  if (!Number.isInteger(batchBytes) || batchBytes <= 0) throw invalid(`batchBytes must be a positive integer, got ${String(batchBytes)}`);
  if (typeof o.stopVm !== 'function') throw invalid('stopVm must be a function');
  const pagesPerBatch = Math.max(1, Math.floor(batchBytes / pageSize));
  // A batch too large for a link would be refused by its encoder on every try; say so up front.
  // The full round's batches also name up to MAX_ZEROS_PER_BATCH zero pages (4 bytes each).
  const frameBytes = pagesPerBatch * (pageSize + 4) + MAX_ZEROS_PER_BATCH * 4 + FRAME_OVERHEAD_BYTES;
  for (const p of o.paths ?? []) {
    if (frameBytes > p.conn.maxFrameBytes) throw invalid(`batchBytes ${batchBytes} makes frames of ~${frameBytes} bytes, over path ${p.name}'s frame limit of ${p.conn.maxFrameBytes}`);
  }
  return { downtimeLimitMs, maxRounds, autoConverge: o.autoConverge ?? true, pagesPerBatch };
}

function aborted(signal: AbortSignal, migrationId: string): EffectorError {
  const why = signal.reason instanceof Error ? signal.reason.message : signal.reason === undefined ? 'aborted' : String(signal.reason);
  return new EffectorError(ErrorCodes.MIGRATION_ABORTED, `migration ${migrationId} aborted: ${why}`, { cause: signal.reason, details: { migrationId } });
}

/**
 * Send rate as rounds achieved it, wall clock from the first batch out to the last ack, so
 * round trips and scheduling gaps count: this is what the stop-and-copy round will see.
 */
class RoundRates {
  private readonly rounds: { readonly bytes: number; readonly ms: number }[] = [];

  add(bytes: number, ms: number): void {
    if (bytes > 0) this.rounds.push({ bytes, ms: Math.max(ms, 0.001) });
  }

  /** bytes/s over the latest rounds spanning RATE_WINDOW_MS, or `fallback` before the first round. */
  rate(fallback: number): number {
    let bytes = 0;
    let ms = 0;
    for (let i = this.rounds.length - 1; i >= 0 && ms < RATE_WINDOW_MS; i--) {
      bytes += this.rounds[i]!.bytes;
      ms += this.rounds[i]!.ms;
    }
    return ms === 0 ? fallback : (bytes * 1000) / ms;
  }
}

/** Page writes at each look at the dirty log, kept for DIRTY_WINDOW_MS. */
class WriteWindow {
  private readonly looks: { readonly at: number; readonly written: number }[] = [];

  add(at: number, written: number): void {
    this.looks.push({ at, written });
    // Keep one look at or before the window's start, so the window spans it whole.
    while (this.looks.length > 2 && this.looks[1]!.at <= at - DIRTY_WINDOW_MS) this.looks.shift();
  }

  /** Pages written per second between the oldest look kept and the latest. */
  rate(pageSize: number): number {
    const first = this.looks[0];
    const last = this.looks.at(-1);
    if (!first || !last || last.at <= first.at) return 0;
    return ((last.written - first.written) * pageSize * 1000) / (last.at - first.at);
  }
}

/** Merges two ascending index lists, dropping duplicates. */
function mergeIndexes(a: Uint32Array, b: Uint32Array): Uint32Array {
  const out = new Uint32Array(a.length + b.length);
  let i = 0;
  let j = 0;
  let n = 0;
  while (i < a.length || j < b.length) {
    const next = j >= b.length || (i < a.length && a[i]! <= b[j]!) ? a[i++]! : b[j++]!;
    if (n === 0 || out[n - 1] !== next) out[n++] = next;
  }
  return out.subarray(0, n);
}

/**
 * Migrates the memory of sim VM `vm` over `paths` while it runs, and stops it for the last round.
 * Resolves when the target acknowledged the final batch; the VM is then stopped at the source
 * and its dirty rate setting is back to what it was. Rejects (the VM keeps running unless the
 * final round had begun) with EffectorError `EMBOT_ERR_DATAPLANE_NO_PATH` when every path
 * failed, `EMBOT_ERR_PAGE_BATCH_REJECTED` when the target refused a batch four times,
 * `EMBOT_ERR_MIGRATION_ABORTED` on `signal`, `EMBOT_ERR_EFFECTOR_ARGS_INVALID` for bad options.
 *
 * @example
 * ```ts
 * const result = await preCopy({
 *   migrationId, vm: 'web-1', driver, paths: [{ name: 'p0', conn }],
 *   stopVm: () => driver.stop('web-1'),
 *   onProgress: (p) => console.log(p.round, p.remainingBytes, p.expectedDowntimeMs),
 * });
 * console.log(result.rounds, result.downtimeMs, result.converged);
 * ```
 */
export async function preCopy(o: PreCopyOptions): Promise<PreCopyResult> {
  const driver = o.driver;
  const pages = driver.pages(o.vm);
  const cfg = settings(o, pages.pageSize);
  if (o.signal?.aborted) throw aborted(o.signal, o.migrationId);
  const { pageSize, memory } = pages;
  const memoryBytes = memory.byteLength;
  const initialDirtyRate = driver.counters(o.vm).dirtyRate;
  const start = performance.now();

  let cpu: Uint8Array | undefined;
  let sentBytes = 0;
  let zeroBytes = 0;
  let pagesSent = 0;
  let roundLeft = 0;
  let lastProgress = 0;
  let throttle = 0;
  let throttleSteps = 0;
  let dirtyRate = initialDirtyRate;
  let round = 0;
  let phase: PreCopyPhase = 'precopy';
  let roundStart = start;
  let roundBytes = 0;
  const rates = new RoundRates();
  /** Measured rate; inside the first round, what that round achieved so far. */
  const sendRate = (): number => {
    const elapsed = performance.now() - roundStart;
    const soFar = roundBytes - roundLeft;
    return rates.rate(elapsed > 50 && soFar > 0 ? (soFar * 1000) / elapsed : striper.rateBytesPerSec);
  };

  const gatherer = new PageGatherer();
  const build = (batch: Batch, path: string): RequestBody<'PageBatch'> => {
    // Read now, in the same synchronous step as the send (which encodes, i.e. copies, the pages):
    // the VM cannot write in between, and the gather buffer is free again for the next batch.
    const indexes = encodeIndexes(batch.indexes);
    const data = gatherer.pages(memory, pageSize, batch.indexes);
    const zeros = batch.zeros !== undefined && batch.zeros.length > 0 ? encodeIndexes(batch.zeros) : undefined;
    const frame: RequestBody<'PageBatch'> = { type: 'PageBatch', migrationId: o.migrationId, path, round: batch.round, final: batch.final, pageSize, indexes, pages: data, checksum: batchChecksum(indexes, data, zeros) };
    const withZeros = zeros === undefined ? frame : { ...frame, zeros };
    return batch.final && cpu !== undefined ? { ...withZeros, cpu } : withZeros;
  };
  const striper = new Striper(o.paths, {
    migrationId: o.migrationId,
    build,
    windowBytes: WINDOW_BATCHES * cfg.pagesPerBatch * pageSize,
    ...(o.requestTimeoutMs !== undefined ? { requestTimeoutMs: o.requestTimeoutMs } : {}),
    onAck: (batch) => {
      sentBytes += batch.bytes;
      // Ascending indexes: only the last can be the VM's short last page.
      if (batch.zeros !== undefined && batch.zeros.length > 0) zeroBytes += (batch.zeros.length - 1) * pageSize + pageLength(memoryBytes, pageSize, batch.zeros[batch.zeros.length - 1]!);
      pagesSent += batch.indexes.length;
      roundLeft -= batch.bytes;
      const now = performance.now();
      if (o.onProgress && now - lastProgress >= PROGRESS_EVERY_MS) {
        lastProgress = now;
        const rate = sendRate();
        progress(phase, round, Math.max(0, roundLeft), rate, dirtyRate, (Math.max(0, roundLeft) * 1000) / rate);
      }
    },
  });
  const progress = (ph: PreCopyPhase, r: number, remainingBytes: number, rate: number, dirty: number, expectedDowntimeMs: number): void => {
    lastProgress = performance.now();
    o.onProgress?.({
      phase: ph,
      round: r,
      remainingBytes,
      sentBytes,
      zeroBytes,
      rateBytesPerSec: rate,
      dirtyRateBytesPerSec: dirty,
      expectedDowntimeMs,
      throttle,
      paths: striper.report(),
    });
  };
  const onAbort = (): void => striper.abort(aborted(o.signal!, o.migrationId));
  o.signal?.addEventListener('abort', onAbort, { once: true });

  const toBatch = (r: number, final: boolean, ix: Uint32Array, zeros?: Uint32Array): Batch => ({
    round: r,
    indexes: ix,
    ...(zeros !== undefined && zeros.length > 0 ? { zeros } : {}),
    bytes: pagesBytes(ix, memoryBytes, pageSize),
    final,
    rejections: 0,
    sends: 0,
    current: undefined,
  });
  /** One round: timed from before its batches are built to the last ack, as the send rate it measures. */
  const sendBatches = async (build: () => Batch[] | Promise<Batch[]>): Promise<void> => {
    roundStart = performance.now();
    const built = build();
    // Only the full round's split is asynchronous (a large VM's memory is looked at in slices); the
    // others, the stop-and-copy's among them, go out in the same turn.
    // An abort meanwhile has failed the striper: its send rejects with the abort's error.
    const batches = Array.isArray(built) ? built : await built;
    roundLeft = batches.reduce((sum, b) => sum + b.bytes, 0);
    roundBytes = roundLeft;
    await striper.send(batches);
    rates.add(roundBytes, performance.now() - roundStart);
  };
  // A path to an agent of protocol 1 knows no zero-page indexes: its full round sends every page's bytes.
  const zeroIndexes = (o.paths ?? []).every((p) => p.conn.supports('zeroPages'));
  /** The full round: every page, the all-zero ones as indexes only (where every path has them). */
  const sendFullRound = (): Promise<void> =>
    sendBatches(() =>
      zeroIndexes
        ? splitZeroPages(memory, pageSize, pages.pageCount, cfg.pagesPerBatch).then((split) => split.map((b) => toBatch(0, false, b.indexes, b.zeros)))
        : splitIndexes(allPages(pages.pageCount), cfg.pagesPerBatch).map((ix) => toBatch(0, false, ix)),
    );
  const sendRound = (indexes: Uint32Array, r: number, final: boolean): Promise<void> =>
    sendBatches(() => {
      const batches = splitIndexes(indexes, cfg.pagesPerBatch).map((ix) => toBatch(r, final, ix));
      // The final batch must exist even when nothing is left to copy: it carries the CPU state.
      if (final && batches.length === 0) batches.push(toBatch(r, final, new Uint32Array(0)));
      return batches;
    });

  try {
    // Round 0 sends every page, so what was dirtied before it is moot.
    driver.takeDirty(o.vm);
    let lastTake = performance.now();
    let lastWritten = driver.counters(o.vm).pagesWritten;
    const writes = new WriteWindow();
    writes.add(lastTake, lastWritten);
    /** After each take: the dirty rate over the last round, or while held over the window. */
    const measureDirty = (): void => {
      const now = performance.now();
      const written = driver.counters(o.vm).pagesWritten;
      writes.add(now, written);
      dirtyRate = o.hold?.held() ? writes.rate(pageSize) : ((written - lastWritten) * pageSize * 1000) / Math.max(1, now - lastTake);
      lastTake = now;
      lastWritten = written;
    };
    // With rounds, the full one is split by sendFullRound (zero pages as indexes); without, it is the final round.
    let pending = cfg.maxRounds > 1 || o.hold ? new Uint32Array(0) : allPages(pages.pageCount);
    let converged = false;
    let expectedDowntimeMs = (memoryBytes * 1000) / striper.rateBytesPerSec;
    let prevRemaining = memoryBytes;
    let flatRounds = 0;
    let heldRounds = 0;

    if (cfg.maxRounds > 1 || o.hold) {
      for (;;) {
        if (round === 0) await sendFullRound();
        else await sendRound(pending, round, false);
        pending = driver.takeDirty(o.vm);
        measureDirty();
        const remaining = pagesBytes(pending, memoryBytes, pageSize);
        const rate = sendRate();
        expectedDowntimeMs = (remaining * 1000) / rate;
        if (o.hold?.held()) {
          heldRounds++;
          round++;
          // Nothing dirtied: wait a little and look again, still reporting (the warmth shows while idle).
          while (pending.length === 0 && o.hold.held()) {
            if (o.signal?.aborted) throw aborted(o.signal, o.migrationId);
            if (performance.now() - lastProgress >= PROGRESS_EVERY_MS) progress('precopy', round, 0, sendRate(), dirtyRate, 0);
            await Promise.race([new Promise((r) => setTimeout(r, PREWARM_IDLE_MS)), o.hold.lifted]);
            pending = driver.takeDirty(o.vm);
            measureDirty();
          }
          if (o.signal?.aborted) throw aborted(o.signal, o.migrationId);
          // Reported now, not right after the round's send (which sees almost nothing dirtied yet):
          // the pages dirtied since they were last sent, the ones the next round sends.
          if (pending.length > 0) {
            const left = pagesBytes(pending, memoryBytes, pageSize);
            const r = sendRate();
            progress('precopy', round, left, r, dirtyRate, (left * 1000) / r);
          }
          continue;
        }
        progress('precopy', round, remaining, rate, dirtyRate, expectedDowntimeMs);
        if (expectedDowntimeMs <= cfg.downtimeLimitMs) {
          converged = true;
          break;
        }
        // This round plus the final one would reach the limit.
        if (round - heldRounds + 2 >= cfg.maxRounds) break;
        flatRounds = remaining > prevRemaining * SHRINK_FACTOR ? flatRounds + 1 : 0;
        prevRemaining = remaining;
        if (cfg.autoConverge && throttle < THROTTLE_MAX && (dirtyRate >= rate || flatRounds >= 2)) {
          throttle = Math.min(THROTTLE_MAX, throttle + THROTTLE_STEP);
          throttleSteps++;
          flatRounds = 0;
          driver.setDirtyRate(o.vm, initialDirtyRate * (1 - throttle));
        }
        round++;
      }
      round++;
    }

    if (o.signal?.aborted) throw aborted(o.signal, o.migrationId);
    phase = 'stop-and-copy';
    const finalDirtyRate = driver.counters(o.vm).dirtyRate;
    await o.stopVm();
    const stoppedAt = performance.now();
    cpu = o.cpuState?.();
    pending = mergeIndexes(pending, driver.takeDirty(o.vm));
    const remaining = pagesBytes(pending, memoryBytes, pageSize);
    const stopRate = sendRate();
    progress('stop-and-copy', round, remaining, stopRate, 0, (remaining * 1000) / stopRate);
    // Everything but the last batch first: the batch marked final must land after all the others.
    const lastCut = Math.max(0, pending.length - cfg.pagesPerBatch);
    // A warm switch's stop round usually fits the final batch alone: no empty round (and no await) before it.
    if (lastCut > 0) await sendRound(pending.subarray(0, lastCut), round, false);
    await sendRound(pending.subarray(lastCut), round, true);
    const downtimeMs = performance.now() - stoppedAt;
    const rate = sendRate();
    progress('done', round, 0, rate, 0, 0);
    const perPath = striper.report().map(({ name, bytes, batches, failed }) => ({ name, bytes, batches, failed }));
    return {
      rounds: round + 1,
      bytes: sentBytes,
      zeroBytes,
      pagesSent,
      totalMs: performance.now() - start,
      downtimeMs,
      stopBytes: remaining,
      converged,
      throttled: throttleSteps > 0,
      throttleSteps,
      initialDirtyRate,
      finalDirtyRate,
      resent: striper.resent,
      perPath,
      expectedDowntimeMs,
      rateBytesPerSec: rate,
    };
  } finally {
    o.signal?.removeEventListener('abort', onAbort);
    striper.dispose();
    // The VM moves with its own spec: throttling was a means of this migration only.
    if (throttleSteps > 0) {
      try {
        driver.setDirtyRate(o.vm, initialDirtyRate);
      } catch {
        // The VM is gone (removed by its owner meanwhile): nothing to restore.
      }
    }
  }
}
