/**
 * The qemu driver's model of its own migration stream, fitted to the migrations it made: a move of
 * a VM with N non-zero bytes and Z zero-page bytes over c channels takes
 *
 *   T = s·R + F_c + a_c·N + b·Z   (ms, on an idle host)
 *
 * s·R is QEMU's setup, proportional to the guest's RAM R (its dirty log started and synced over
 * every page: under TCG the RAM pad of ram-size.ts sends each sync down QEMU's per-page path, ~0.33
 * ms per MiB of RAM here, 163 ms for a 512 MiB guest whatever it holds; quiet run of 2026-12-06
 * 08:21, BENCHMARKS "planner's estimate"). F_c is the fixed cost of the stream (channel setup, the
 * switch, the target's commit), a_c the time per non-zero byte, b the time per skipped zero-page
 * byte. A rate-only model folds F into a_c, so a
 * calibration guest smaller than the VM moved gives too slow a rate (quiet: 155 MiB in 92 ms and
 * 319 MiB in 123–154 ms are ~40 ms + ~3 GB/s, not 1.7 GB/s; BENCHMARKS "planner's estimate").
 */
import { MAX_ZERO_PAGE_COST } from '../hypervisor-contract.ts';

/** What one kept migration says (the driver's `StreamCalibration`, the fields the fit reads). */
export interface StreamSample {
  /** sentBytes / sendMs, bytes/s, as measured (the plain median of these is the last resort). */
  readonly copyRateBytesPerSec: number;
  /** Non-zero page bytes sent. */
  readonly sentBytes: number;
  /** Zero-page bytes skipped. */
  readonly zeroBytes: number;
  /** Time from QEMU's end of setup to the target running the VM, ms. */
  readonly sendMs: number;
  /** QEMU's setup time, ms (fixedMs + sendMs is the whole move). */
  readonly fixedMs: number;
  /** Host load factor when it was taken (times are divided by it); absent: 1. */
  readonly loadFactor?: number;
}

export interface StreamFit {
  readonly copyRateBytesPerSec: number;
  /** A zero page's time as a share of a full page's, 0..MAX_ZERO_PAGE_COST. */
  readonly zeroPageCost: number;
  /** The stream's fixed cost F_c (the fitted model), or QEMU's median setup time (the rate-only model). */
  readonly fixedMs: number;
  /** QEMU's setup per byte of guest RAM, ms (0 in the rate-only model, whose fixedMs is the setup). */
  readonly setupMsPerRamByte: number;
  /**
   * `fixed+per-byte`: F_c and a_c fitted by least squares (the count's samples span sizes);
   * `per-byte`: the median time per non-zero byte and no F_c (one size, or a fit that came out with
   * F < 0, F as long as the shortest stream, or a ≤ 0).
   */
  readonly kind: 'fixed+per-byte' | 'per-byte';
}

/** Samples of a count whose non-zero sizes differ at least this much let its fixed cost be fitted. */
export const SIZE_SPAN = 1.5;

/**
 * A column whose part not explained by the columns before it is less than this share of its own
 * size (squared) cannot be told from them: a size ratio of ~1.2 for F against a_c, and a zero share
 * that barely varies for b (as the driver's zero-page fit had it).
 */
const COLLINEAR = 0.01;

/**
 * The stream model for `channels`, from the samples of every channel count (`groups`): a_c and F_c
 * per count, and one b for all (QEMU 7.2 finds zero pages in its migration thread, before multifd,
 * so a count whose samples are all dense guests still gets b). Least squares over every sample;
 * what the samples cannot tell apart (collinear columns) or what comes out outside sense (F < 0,
 * a ≤ 0, b < 0) is left out of the fit, in this order of preference: F and b; F alone; b alone (a
 * count of one size); neither. A fixed cost as long as the shortest move, or a zero page beyond
 * MAX_ZERO_PAGE_COST full ones, is taken as noise too. With `fixedCost: false` F is never fitted
 * (the rate-only model of before, kept for the benchmark's A/B). Undefined when `channels` has no
 * samples.
 */
export function fitStream(given: ReadonlyMap<number, readonly StreamSample[]>, channels: number, options: { readonly fixedCost?: boolean } = {}): StreamFit | undefined {
  const raw = given.get(channels) ?? [];
  if (raw.length === 0) return undefined;
  // A sample with no bytes or no time (a hand-edited model file) says nothing a fit could use.
  const groups = new Map([...given].map(([c, xs]) => [c, xs.filter(isUsable)] as const).filter(([, xs]) => xs.length > 0));
  const mine = groups.get(channels) ?? [];
  if (mine.length === 0) return { copyRateBytesPerSec: medianOf(raw.map((x) => x.copyRateBytesPerSec * (x.loadFactor ?? 1))), zeroPageCost: 0, fixedMs: setupMs(raw), setupMsPerRamByte: 0, kind: 'per-byte' };
  // The rate-only model of before: QEMU's median setup as the fixed cost, whatever the guest's size.
  const rateOnly = options.fixedCost === false;
  // Setup does not depend on the channels (QEMU's migration thread, before multifd): every count's samples tell it.
  const setup = rateOnly ? 0 : setupPerRamByte([...groups.values()].flat());
  const noF = rateOnly ? setupMs(mine) : 0;
  const counts = [...groups.keys()].sort((x, y) => x - y);
  const spanning = options.fixedCost === false ? [] : counts.filter((c) => spansSizes(groups.get(c)!));

  const variants: readonly { readonly f: readonly number[]; readonly withB: boolean }[] = [
    { f: spanning, withB: true },
    { f: spanning, withB: false },
    { f: [], withB: true },
  ];
  for (const v of variants) {
    if (v.f.length === 0 && !v.withB) continue;
    let withF = new Set(v.f);
    for (;;) {
      const sol = solveModel(groups, counts, withF, v.withB);
      if (sol === undefined || (v.withB && sol.b < 0)) break;
      // A zero page costing more than the contract's bound against a count's byte time is noise
      // (a slow sample taken for zero pages' cost, the rate then near infinite): not this variant.
      if (v.withB && [...withF].some((c) => sol.b > MAX_ZERO_PAGE_COST * sol.a.get(c)!)) break;
      // A fixed cost below 0, or as long as a whole stream of the count, or no time per byte, is
      // noise, not a stream: that count goes per-byte.
      const bad = [...withF].filter((c) => sol.f.get(c)! < 0 || sol.f.get(c)! >= shortestStream(groups.get(c)!) || !(sol.a.get(c)! > 0));
      if (bad.length > 0) {
        withF = new Set([...withF].filter((c) => !bad.includes(c)));
        if (withF.size === 0) break; // no fixed cost left to fit: the next variant
        continue;
      }
      // Without b, other counts' fixed costs say nothing of this one's: b alone (the next variant) does.
      if (!v.withB && !withF.has(channels)) break;
      const b = v.withB ? sol.b : 0;
      if (withF.has(channels)) {
        const a = sol.a.get(channels)!;
        return { copyRateBytesPerSec: 1000 / a, zeroPageCost: Math.min(MAX_ZERO_PAGE_COST, b / a), fixedMs: sol.f.get(channels)!, setupMsPerRamByte: setup, kind: 'fixed+per-byte' };
      }
      const perByte = medianOf(mine.map((x) => (sendMs(x) - b * x.zeroBytes) / x.sentBytes));
      // A count whose copy is much faster than the zero pages' cost (multifd copying dense pages in
      // parallel) keeps the most the contract allows: dropping the zero pages' cost would be worse.
      if (perByte > 0) return { copyRateBytesPerSec: 1000 / perByte, zeroPageCost: Math.min(MAX_ZERO_PAGE_COST, b / perByte), fixedMs: noF, setupMsPerRamByte: setup, kind: 'per-byte' };
      break;
    }
  }
  return { copyRateBytesPerSec: medianOf(mine.map((x) => x.copyRateBytesPerSec * (x.loadFactor ?? 1))), zeroPageCost: 0, fixedMs: noF, setupMsPerRamByte: setup, kind: 'per-byte' };
}

/** True when two of the samples' non-zero sizes differ by {@link SIZE_SPAN}× or more. */
export function spansSizes(samples: readonly StreamSample[]): boolean {
  const sizes = samples.map((x) => x.sentBytes).filter((n) => n > 0);
  return sizes.length >= 2 && Math.max(...sizes) >= SIZE_SPAN * Math.min(...sizes);
}

interface Solution {
  readonly a: ReadonlyMap<number, number>;
  readonly f: ReadonlyMap<number, number>;
  readonly b: number;
}

/**
 * Least squares of the stream's model (QEMU's setup apart: it is s·R) with F for the counts in
 * `withF` and b when `withB`. Undefined when a column is collinear with those before it.
 */
function solveModel(groups: ReadonlyMap<number, readonly StreamSample[]>, counts: readonly number[], withF: ReadonlySet<number>, withB: boolean): Solution | undefined {
  const cols: { readonly kind: 'a' | 'f' | 'b'; readonly count: number }[] = [];
  for (const c of counts) {
    cols.push({ kind: 'a', count: c });
    if (withF.has(c)) cols.push({ kind: 'f', count: c });
  }
  if (withB) cols.push({ kind: 'b', count: 0 });
  const rows: number[][] = [];
  const ys: number[] = [];
  for (const c of counts) {
    for (const x of groups.get(c)!) {
      const l = x.loadFactor ?? 1;
      rows.push(cols.map((col) => (col.kind === 'b' ? x.zeroBytes : col.count !== c ? 0 : col.kind === 'a' ? x.sentBytes : 1)));
      ys.push(x.sendMs / l);
    }
  }
  const beta = leastSquares(rows, ys);
  if (beta === undefined) return undefined;
  const a = new Map<number, number>();
  const f = new Map<number, number>();
  let b = 0;
  cols.forEach((col, k) => {
    if (col.kind === 'a') a.set(col.count, beta[k]!);
    else if (col.kind === 'f') f.set(col.count, beta[k]!);
    else b = beta[k]!;
  });
  return { a, f, b };
}

/**
 * β minimising |Xβ − y|², by the normal equations on unit-scaled columns (bytes and 1 differ by
 * 10⁸), Cholesky in column order. Undefined when some column's part not explained by the ones
 * before it is under {@link COLLINEAR} of it (the fit could not tell them apart).
 */
export function leastSquares(x: readonly (readonly number[])[], y: readonly number[]): number[] | undefined {
  const n = x[0]?.length ?? 0;
  if (n === 0 || x.length < n) return undefined;
  const scale = Array.from({ length: n }, (_, j) => Math.sqrt(x.reduce((s, r) => s + r[j]! * r[j]!, 0)));
  if (scale.some((s) => !(s > 0) || !Number.isFinite(s))) return undefined;
  // Gram matrix of the scaled columns (1 on the diagonal) and Xᵀy.
  const g = Array.from({ length: n }, (_, i) => Array.from({ length: n }, (_, j) => x.reduce((s, r) => s + r[i]! * r[j]!, 0) / (scale[i]! * scale[j]!)));
  const rhs = Array.from({ length: n }, (_, i) => x.reduce((s, r, k) => s + r[i]! * y[k]!, 0) / scale[i]!);
  // Cholesky g = L·Lᵀ: L[j][j]² is the share of column j left once the columns before it are projected out.
  const l = Array.from({ length: n }, () => new Array<number>(n).fill(0));
  for (let j = 0; j < n; j++) {
    let d = g[j]![j]!;
    for (let k = 0; k < j; k++) d -= l[j]![k]! ** 2;
    if (!(d >= COLLINEAR)) return undefined;
    l[j]![j] = Math.sqrt(d);
    for (let i = j + 1; i < n; i++) {
      let s = g[i]![j]!;
      for (let k = 0; k < j; k++) s -= l[i]![k]! * l[j]![k]!;
      l[i]![j] = s / l[j]![j]!;
    }
  }
  const z = new Array<number>(n).fill(0);
  for (let i = 0; i < n; i++) {
    let s = rhs[i]!;
    for (let k = 0; k < i; k++) s -= l[i]![k]! * z[k]!;
    z[i] = s / l[i]![i]!;
  }
  const beta = new Array<number>(n).fill(0);
  for (let i = n - 1; i >= 0; i--) {
    let s = z[i]!;
    for (let k = i + 1; k < n; k++) s -= l[k]![i]! * beta[k]!;
    beta[i] = s / l[i]![i]!;
  }
  return beta.map((v, j) => v / scale[j]!);
}

function isUsable(x: StreamSample): boolean {
  const ok = (v: number): boolean => Number.isFinite(v) && v >= 0;
  return ok(x.sentBytes) && x.sentBytes > 0 && ok(x.sendMs) && x.sendMs > 0 && ok(x.zeroBytes) && ok(x.fixedMs) && Number.isFinite(x.loadFactor ?? 1) && (x.loadFactor ?? 1) > 0;
}

/** The shortest stream (setup left out) of the samples, ms on an idle host. */
function shortestStream(xs: readonly StreamSample[]): number {
  return Math.min(...xs.map((x) => x.sendMs / (x.loadFactor ?? 1)));
}

/** QEMU's setup per byte of the guest's RAM (its non-zero and zero pages), median over the samples, ms on an idle host. */
function setupPerRamByte(xs: readonly StreamSample[]): number {
  return medianOf(xs.map((x) => x.fixedMs / (x.loadFactor ?? 1) / (x.sentBytes + x.zeroBytes)));
}

function sendMs(x: StreamSample): number {
  return x.sendMs / (x.loadFactor ?? 1);
}

function setupMs(xs: readonly StreamSample[]): number {
  return medianOf(xs.map((x) => x.fixedMs / (x.loadFactor ?? 1)));
}

function medianOf(xs: readonly number[]): number {
  const s = [...xs].sort((p, q) => p - q);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
}
