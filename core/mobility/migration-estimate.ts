/**
 * Migration-time estimate for pre-copy live migration: a round-by-round simulation of the same
 * algorithm the pre-copy sender (`effectors/hypervisor/sim/dataplane/precopy-sender.ts`) runs, so the planner
 * (seed 000) compares the threshold with what will really happen rather than with `size / bandwidth`.
 *
 * The algorithm modelled, as the sender runs it:
 * - round 0 sends every page; each later pre-copy round sends the pages dirtied during the
 *   previous one;
 * - after each pre-copy round, stop-and-copy (VM paused, remainder + CPU state sent) when
 *   `remaining / rate ≤ downtimeLimitMs`; otherwise stop-and-copy anyway once one more round
 *   would reach `maxRounds` (rounds counted in all, the final one included; `converges` is then
 *   false and the downtime exceeds the limit); `maxRounds` 1 is a plain stop-and-copy;
 * - with auto-converge, after a round that did not meet the limit, throttle one more step (20 %
 *   of the original dirty rate, at most 99 % in all) when the VM dirties at least as fast as we
 *   send, or when the remainder has not shrunk below 90 % of the previous one two rounds running.
 *
 * Dirtying model: the sim VM writes uniformly random pages at `dirtyRate` bytes/s, so after `k`
 * page writes into `N` pages the expected number of distinct dirty pages is `N·(1 − (1 − 1/N)^k)`.
 * Repeated writes to a page cost nothing extra, which is why a fast-dirtying VM still has a
 * bounded remainder (at most all of memory).
 */
import { ConfigError, ErrorCodes } from '../errors.ts';
import { MAX_ZERO_PAGE_COST, type DriverEstimateHints } from '../../effectors/index.ts';

// What a driver reports for the estimate is part of the hypervisor contract; re-exported for the planner's callers.
export { MAX_ZERO_PAGE_COST, type DriverEstimateHints };

/** The sender's defaults (QEMU's default downtime limit is 300 ms); `maxRounds` counts the final round. */
export const PRECOPY_DEFAULTS = { downtimeLimitMs: 300, maxRounds: 30 } as const;

/**
 * The sender's auto-converge rule: `step` of the original dirty rate removed per step, `max` in
 * all; a round is flat when its remainder is above `shrinkFactor` × the previous one, and
 * `flatRounds` flat rounds in a row trigger a step even when the dirty rate is below the send rate.
 */
export const AUTO_CONVERGE = { step: 0.2, max: 0.99, shrinkFactor: 0.9, flatRounds: 2 } as const;

/**
 * Correction for a busy VM: its writes come in bursts, and the short late rounds are the ones a
 * burst fills, so the estimate plans on `dirtyRate · (1 + VM_BURST_FACTOR · vmCpuLoad)` instead of
 * the mean. At load 0 (or unknown) the configured rate is used as is.
 */
export const VM_BURST_FACTOR = 0.25;


export interface EstimateInput {
  readonly memoryBytes: number;
  readonly pageSize: number;
  readonly dirtyRateBytesPerSec: number;
  /** Aggregate send rate of all paths, before the CPU correction. */
  readonly bandwidthBytesPerSec: number;
  readonly downtimeLimitMs: number;
  readonly maxRounds: number;
  readonly autoConverge: boolean;
  /** 0..1 CPU load of the VM; raises the planned dirty rate by {@link VM_BURST_FACTOR}. Default 0. */
  readonly vmCpuLoad?: number;
  /** 0 < f ≤ 1: share of the link rate the source/target CPUs can feed (copy, checksum, reassembly); 1 = no CPU limit. */
  readonly copyCpuFactor?: number;
  /** Fixed cost of each round and of stop-and-copy (bitmap sync, round trip); the VM keeps dirtying during it. Default 0. */
  readonly perRoundOverheadMs?: number;
  /**
   * 0 ≤ z ≤ 1: share of memory in zero pages when the migration starts. A hypervisor that skips
   * them (QEMU sends a zero page as a header) sends only the rest in full in round 0; pages
   * dirtied later are taken as non-zero. Default 0: every page is sent (the sim).
   */
  readonly zeroPageShare?: number;
  /**
   * 0 ≤ c ≤ 10: time to skip one zero page, relative to a full page's time at the rate (reading
   * it to find it zero, its header, the target's side). It can exceed 1: a never-touched page is
   * faulted in on both sides (measured ~2.5 under TCG on loopback). Default 0.
   */
  readonly zeroPageCost?: number;
  /** One-time cost of a migration besides its rounds (stream setup, switchover hand-shake, target resume), ms; not downtime. Default 0. */
  readonly fixedMs?: number;
}

export interface Estimate {
  /** Whole migration, from round 0 to the end of stop-and-copy. */
  readonly totalMs: number;
  /** Rounds in all, round 0 and the final stop-and-copy included (as the sender counts them). */
  readonly rounds: number;
  /** Stop-and-copy time: remainder / rate + per-round overhead. */
  readonly downtimeMs: number;
  /** Bytes sent over all rounds and stop-and-copy. */
  readonly bytes: number;
  /** True when stop-and-copy started because the remainder fit the downtime limit (not because of `maxRounds`). */
  readonly converges: boolean;
  /** Auto-converge steps applied (0 without auto-converge); at most 5 (20 % each, capped at 99 %). */
  readonly throttleSteps: number;
}

/**
 * Estimates a pre-copy migration by simulating it round by round. Deterministic.
 *
 * @throws ConfigError `EMBOT_ERR_PLAN_INPUT_INVALID` for a non-positive size, page size, bandwidth
 *   or downtime limit, a negative dirty rate, NaN/Infinity anywhere, or factors out of range.
 * @example
 * ```ts
 * const e = estimateMigration({ memoryBytes: 1 << 30, pageSize: 4096, dirtyRateBytesPerSec: 20e6,
 *   bandwidthBytesPerSec: 100e6, downtimeLimitMs: 300, maxRounds: 30, autoConverge: true });
 * console.log(`${Math.round(e.totalMs)} ms in ${e.rounds} rounds, downtime ${Math.round(e.downtimeMs)} ms`);
 * ```
 */
export function estimateMigration(i: EstimateInput): Estimate {
  checkEstimateInput(i);
  const memory = i.memoryBytes;
  const pages = Math.ceil(memory / i.pageSize);
  const rate = i.bandwidthBytesPerSec * (i.copyCpuFactor ?? 1); // bytes/s
  const overheadMs = i.perRoundOverheadMs ?? 0;
  const baseDirty = i.dirtyRateBytesPerSec * (1 + VM_BURST_FACTOR * (i.vmCpuLoad ?? 0));
  const logKeep = Math.log1p(-1 / pages); // ln(1 − 1/N), -Infinity for a one-page VM

  const dirtiedDuring = (ms: number, dirtyRate: number): number => {
    const writes = (dirtyRate * ms) / 1000 / i.pageSize;
    if (writes <= 0) return 0;
    const distinct = pages * (1 - Math.exp(writes * logKeep));
    return Math.min(memory, distinct * i.pageSize);
  };

  let steps = 0;
  let throttle = 0; // fraction of the original dirty rate removed, accumulated as the sender does
  let pending = memory * (1 - (i.zeroPageShare ?? 0));
  // Skipping the zero pages is paid in round 0's time, not in bytes.
  let totalMs = (i.fixedMs ?? 0) + ((memory * (i.zeroPageShare ?? 0) * (i.zeroPageCost ?? 0)) / rate) * 1000;
  let bytes = 0;
  let preRounds = 0;
  let converges = false;
  let prevRemaining = memory;
  let flat = 0;
  if (i.maxRounds > 1) {
    for (;;) {
      const dirtyRate = baseDirty * (1 - throttle);
      const roundMs = (pending / rate) * 1000 + overheadMs;
      totalMs += roundMs;
      bytes += pending;
      preRounds++;
      pending = dirtiedDuring(roundMs, dirtyRate);
      if ((pending / rate) * 1000 <= i.downtimeLimitMs) {
        converges = true;
        break;
      }
      if (preRounds + 1 >= i.maxRounds) break;
      flat = pending > prevRemaining * AUTO_CONVERGE.shrinkFactor ? flat + 1 : 0;
      prevRemaining = pending;
      if (i.autoConverge && throttle < AUTO_CONVERGE.max && (dirtyRate >= rate || flat >= AUTO_CONVERGE.flatRounds)) {
        throttle = Math.min(AUTO_CONVERGE.max, throttle + AUTO_CONVERGE.step);
        steps++;
        flat = 0;
      }
    }
  }
  const downtimeMs = (pending / rate) * 1000 + overheadMs;
  return { totalMs: totalMs + downtimeMs, rounds: preRounds + 1, downtimeMs, bytes: bytes + pending, converges, throttleSteps: steps };
}

/**
 * Validates an {@link EstimateInput} without estimating; the planner calls it before it sets up
 * any path so bad input costs nothing.
 *
 * @example
 * ```ts
 * checkEstimateInput({ ...input, bandwidthBytesPerSec: 1 }); // throws ConfigError on bad sizes
 * ```
 */
export function checkEstimateInput(i: EstimateInput): void {
  positive('memoryBytes', i.memoryBytes);
  positive('pageSize', i.pageSize);
  if (!Number.isInteger(i.pageSize)) bad('pageSize', i.pageSize, 'a whole number of bytes');
  nonNegative('dirtyRateBytesPerSec', i.dirtyRateBytesPerSec);
  positive('bandwidthBytesPerSec', i.bandwidthBytesPerSec);
  positive('downtimeLimitMs', i.downtimeLimitMs);
  if (!Number.isInteger(i.maxRounds) || i.maxRounds < 1 || i.maxRounds > 10_000) bad('maxRounds', i.maxRounds, 'an integer in 1..10000');
  if (typeof i.autoConverge !== 'boolean') bad('autoConverge', i.autoConverge, 'a boolean');
  if (i.vmCpuLoad !== undefined && !(isFiniteNumber(i.vmCpuLoad) && i.vmCpuLoad >= 0 && i.vmCpuLoad <= 1)) bad('vmCpuLoad', i.vmCpuLoad, 'a number in 0..1');
  if (i.copyCpuFactor !== undefined && !(isFiniteNumber(i.copyCpuFactor) && i.copyCpuFactor > 0 && i.copyCpuFactor <= 1)) {
    bad('copyCpuFactor', i.copyCpuFactor, 'a number in (0, 1]');
  }
  if (i.perRoundOverheadMs !== undefined) nonNegative('perRoundOverheadMs', i.perRoundOverheadMs);
  if (i.zeroPageShare !== undefined && !(isFiniteNumber(i.zeroPageShare) && i.zeroPageShare >= 0 && i.zeroPageShare <= 1)) {
    bad('zeroPageShare', i.zeroPageShare, 'a number in [0, 1]');
  }
  if (i.fixedMs !== undefined) nonNegative('fixedMs', i.fixedMs);
  if (i.zeroPageCost !== undefined && !(isFiniteNumber(i.zeroPageCost) && i.zeroPageCost >= 0 && i.zeroPageCost <= MAX_ZERO_PAGE_COST)) {
    bad('zeroPageCost', i.zeroPageCost, `a number in [0, ${MAX_ZERO_PAGE_COST}]`);
  }
}

export interface AccuracySample {
  readonly estimateMs: number;
  readonly actualMs: number;
  /** What was migrated, e.g. `64 MiB @ 4 MB/s`, so the bench can name the worst case. */
  readonly label?: string;
}

export interface AccuracySummary {
  readonly count: number;
  /** Mean of |estimate − actual| / actual. */
  readonly meanError: number;
  readonly maxError: number;
  readonly worst: AccuracySample | undefined;
}

/**
 * Relative error of an estimate: |estimate − actual| / actual.
 *
 * @example
 * ```ts
 * estimateError(1150, 1000); // 0.15
 * ```
 */
export function estimateError(estimateMs: number, actualMs: number): number {
  nonNegative('estimateMs', estimateMs);
  positive('actualMs', actualMs);
  return Math.abs(estimateMs - actualMs) / actualMs;
}

/**
 * Mean and worst relative error over a grid of migrations, for the estimate-accuracy benchmark.
 *
 * @example
 * ```ts
 * const s = summarizeAccuracy([{ estimateMs: 900, actualMs: 1000 }, { estimateMs: 2100, actualMs: 2000 }]);
 * // s.meanError 0.075, s.maxError 0.1
 * ```
 */
export function summarizeAccuracy(samples: readonly AccuracySample[]): AccuracySummary {
  let sum = 0;
  let maxError = 0;
  let worst: AccuracySample | undefined;
  for (const s of samples) {
    const e = estimateError(s.estimateMs, s.actualMs);
    sum += e;
    if (worst === undefined || e > maxError) {
      maxError = e;
      worst = s;
    }
  }
  return { count: samples.length, meanError: samples.length ? sum / samples.length : 0, maxError, worst };
}

function isFiniteNumber(v: unknown): v is number {
  return typeof v === 'number' && Number.isFinite(v);
}

function positive(field: string, v: unknown): void {
  if (!isFiniteNumber(v) || v <= 0) bad(field, v, 'a finite number > 0');
}

function nonNegative(field: string, v: unknown): void {
  if (!isFiniteNumber(v) || v < 0) bad(field, v, 'a finite number ≥ 0');
}

function bad(field: string, v: unknown, expected: string): never {
  throw new ConfigError(ErrorCodes.PLAN_INPUT_INVALID, `invalid migration estimate input: ${field} is ${String(v)}, expected ${expected}`, {
    details: { field, value: String(v) },
  });
}

/**
 * What a driver with a memory stream of its own (qemu) knows of it before a move, for the
 * estimate: the planner's model is the sim's pre-copy over the agent's data paths, and a probe of
 * those paths says little about a stream that skips zero pages and is CPU-bound.
 */

/**
 * The estimate input with a driver's hints applied: its copy rate replaces the probed bandwidth
 * (the stream does not use the probed path) and the CPU factor (the rate was measured with the
 * CPUs in it), its non-zero share becomes {@link EstimateInput.zeroPageShare}, its fixed cost
 * {@link EstimateInput.fixedMs}. Hints left out leave the input as it was.
 *
 * @throws ConfigError `EMBOT_ERR_PLAN_INPUT_INVALID` for a hint out of range (negative, NaN, more non-zero bytes than memory).
 * @example
 * ```ts
 * const e = estimateMigration(withDriverHints(input, await driver.capabilities.migrationModel!.estimateHints('web-1', { channels: 2 })));
 * ```
 */
export function withDriverHints(i: EstimateInput, h: DriverEstimateHints): EstimateInput {
  if (h.nonZeroBytes !== undefined) nonNegative('nonZeroBytes', h.nonZeroBytes);
  if (h.nonZeroBytes !== undefined && h.nonZeroBytes > i.memoryBytes) bad('nonZeroBytes', h.nonZeroBytes, `at most memoryBytes (${i.memoryBytes})`);
  if (h.copyRateBytesPerSec !== undefined) positive('copyRateBytesPerSec', h.copyRateBytesPerSec);
  if (h.fixedMs !== undefined) nonNegative('fixedMs', h.fixedMs);
  if (h.zeroPageCost !== undefined && !(isFiniteNumber(h.zeroPageCost) && h.zeroPageCost >= 0 && h.zeroPageCost <= MAX_ZERO_PAGE_COST)) bad('zeroPageCost', h.zeroPageCost, `a number in [0, ${MAX_ZERO_PAGE_COST}]`);
  const { copyCpuFactor: _cpu, ...rest } = i;
  return {
    ...(h.copyRateBytesPerSec === undefined ? i : { ...rest, bandwidthBytesPerSec: h.copyRateBytesPerSec }),
    ...(h.nonZeroBytes === undefined ? {} : { zeroPageShare: 1 - h.nonZeroBytes / i.memoryBytes }),
    ...(h.fixedMs === undefined ? {} : { fixedMs: h.fixedMs }),
    ...(h.zeroPageCost === undefined ? {} : { zeroPageCost: h.zeroPageCost }),
  };
}
