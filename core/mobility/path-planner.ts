/**
 * Threshold time and paths (seed 000, US 9,336,042): estimate the migration time; while it is over
 * the threshold, add another data path — provided setting it up took no longer than a second
 * threshold and the target has CPU to reassemble pages striped over one more path — and
 * re-estimate. Measurements come in through injected functions (probe, targetCpu, release), so
 * the logic is pure and the data plane decides what a path physically is.
 */
import { ConfigError, EffectorError, ErrorCodes, describeError } from '../errors.ts';
import { checkEstimateInput, estimateMigration, withDriverHints, type DriverEstimateHints, type Estimate, type EstimateInput } from './migration-estimate.ts';

export interface PathCandidate {
  readonly name: string;
  /** Where the data channel connects, e.g. `ws://127.0.0.2:7411/data`. */
  readonly url: string;
  /** Local address to bind, so each path leaves through its own interface (127.0.0.x on one machine). */
  readonly localAddress?: string;
  /** Token-bucket cap standing in for a NIC of that speed; the planner never counts more than this. */
  readonly capBytesPerSec?: number;
}

export interface PathProbe {
  /** Time it took to set the path up (connect + auth + probe). */
  readonly setupMs: number;
  readonly bandwidthBytesPerSec: number;
  /** True when the path was only set up and `bandwidthBytesPerSec` is the assumed floor, not a measurement. */
  readonly assumed?: boolean;
}

/**
 * A rate any data path is assumed to reach (1 MB/s, under a tenth of a 100 Mbit/s NIC). When the
 * estimate fits the threshold even at this rate, measuring the primary cannot change the plan (a
 * faster path only lowers the estimate, and no path is added below the threshold), so it is only
 * set up: an 8 MiB probe would cost more than moving a small VM.
 */
export const ASSUMED_MIN_BANDWIDTH_BYTES_PER_SEC = 1_000_000;

export interface TargetCpuAnswer {
  readonly canReassemble: boolean;
  /** 0..1 share of the target's CPU free for the migration. */
  readonly cpuFree: number;
  readonly reason?: string;
}

export interface PlanInput {
  readonly vm: { readonly memoryBytes: number; readonly pageSize: number; readonly dirtyRateBytesPerSec: number; readonly cpuLoad?: number };
  readonly thresholdMs: number;
  /** Second threshold: a path whose setup took longer is not added. */
  readonly addPathThresholdMs: number;
  /** Most paths used, primary included. */
  readonly maxPaths: number;
  readonly downtimeLimitMs: number;
  readonly maxRounds: number;
  readonly autoConverge: boolean;
  /** Passed to the estimator: see {@link EstimateInput.copyCpuFactor}. Default 1. */
  readonly copyCpuFactor?: number;
  /** Passed to the estimator: see {@link EstimateInput.perRoundOverheadMs}. Default 0. */
  readonly perRoundOverheadMs?: number;
  readonly primary: PathCandidate;
  /** Tried in order. */
  readonly candidates: readonly PathCandidate[];
  /** Sets the path up (connect + auth + short bandwidth probe); rejects if it cannot. */
  probe(path: PathCandidate): Promise<PathProbe>;
  /**
   * A rate every path reaches at least (see {@link ASSUMED_MIN_BANDWIDTH_BYTES_PER_SEC}). With
   * `setUp`, when the primary has no cap and the estimate at this rate fits the threshold, the
   * primary is set up with `setUp` instead of probed, and planned at this rate.
   */
  readonly assumedMinBandwidthBytesPerSec?: number;
  /** Sets a path up without measuring it (connect + auth); rejects if it cannot. */
  setUp?(path: PathCandidate): Promise<{ readonly setupMs: number }>;
  /**
   * What the hypervisor driver knows of its own memory stream with `channels` paths (qemu: a
   * calibrated copy rate, the non-zero share, its fixed cost). A driver that streams on its own
   * socket is not measured by a path probe, so a calibrated copy rate replaces the probed bandwidth
   * in the estimate, and the primary is then only set up. Undefined, or a hint that fails: the
   * estimate stands on the probe alone.
   */
  driverHints?(channels: number): Promise<DriverEstimateHints | undefined>;
  /** Asks the target whether it can reassemble pages striped over `paths` paths. */
  targetCpu(paths: number): Promise<TargetCpuAnswer>;
  /** Tears down a probed path that is not used. */
  release(path: PathCandidate): Promise<void>;
}

export type PlanAction = 'primary' | 'add-path' | 'skip-path' | 'done';

/** One step of the planner. `estimateMs` and `paths` are the state the decision was taken on. */
export interface PlanDecision {
  readonly step: number;
  readonly estimateMs: number;
  readonly paths: number;
  readonly action: PlanAction;
  readonly path?: string;
  readonly reason: string;
}

export interface Plan {
  /** Paths to migrate over, primary first; all of them are set up and owned by the caller now. */
  readonly paths: readonly PathCandidate[];
  /** Probe of every path that was set up, used or not, by path name. */
  readonly probes: ReadonlyMap<string, PathProbe>;
  /** Aggregate rate of `paths`, each capped by its `capBytesPerSec`. */
  readonly bandwidthBytesPerSec: number;
  readonly estimate: Estimate;
  readonly thresholdMs: number;
  readonly decisions: readonly PlanDecision[];
  readonly withinThreshold: boolean;
}

/**
 * Chooses the paths of a migration (seed 000). Probes the primary (only sets it up when even the
 * assumed floor rate fits the threshold: measuring could not change the plan), estimates, and adds candidates
 * in order while the estimate is over the threshold. A candidate whose probe rejects or returns
 * nonsense, or whose setup took longer than `addPathThresholdMs`, is skipped (and released) and
 * the next one is tried; a target without CPU for one more path stops the adding. Paths probed but
 * not used are released before this returns; if the planner itself fails, every path it set up is
 * released before the error propagates.
 *
 * @throws ConfigError `EMBOT_ERR_PLAN_INPUT_INVALID` for bad sizes, thresholds, caps or duplicate
 *   path names (nothing is probed then); EffectorError `EMBOT_ERR_PATH_SETUP_FAILED` when the
 *   primary path cannot be set up or its probe is unusable.
 * @example
 * ```ts
 * const plan = await planPaths({
 *   vm: { memoryBytes: 1 << 30, pageSize: 4096, dirtyRateBytesPerSec: 20e6 },
 *   thresholdMs: 5000, addPathThresholdMs: 500, maxPaths: 4,
 *   downtimeLimitMs: 300, maxRounds: 30, autoConverge: true,
 *   primary: { name: 'p1', url: 'ws://127.0.0.1:7411/data' },
 *   candidates: [{ name: 'p2', url: 'ws://127.0.0.2:7411/data', localAddress: '127.0.0.2' }],
 *   probe: (p) => channels.open(p), targetCpu: (n) => peer.askCpu(n), release: (p) => channels.close(p.name),
 * });
 * console.log(formatPlan(plan));
 * ```
 */
export async function planPaths(i: PlanInput): Promise<Plan> {
  checkPlanInput(i);
  const base: Omit<EstimateInput, 'bandwidthBytesPerSec'> = {
    memoryBytes: i.vm.memoryBytes,
    pageSize: i.vm.pageSize,
    dirtyRateBytesPerSec: i.vm.dirtyRateBytesPerSec,
    downtimeLimitMs: i.downtimeLimitMs,
    maxRounds: i.maxRounds,
    autoConverge: i.autoConverge,
    ...(i.vm.cpuLoad === undefined ? {} : { vmCpuLoad: i.vm.cpuLoad }),
    ...(i.copyCpuFactor === undefined ? {} : { copyCpuFactor: i.copyCpuFactor }),
    ...(i.perRoundOverheadMs === undefined ? {} : { perRoundOverheadMs: i.perRoundOverheadMs }),
  };

  // The driver's own figures for `channels` paths, when it has them; a failing or bad hint is no hint.
  const hintsFor = async (channels: number): Promise<DriverEstimateHints | undefined> => {
    try {
      const h = await i.driverHints?.(channels);
      if (h !== undefined) withDriverHints({ ...base, bandwidthBytesPerSec: 1 }, h);
      return h;
    } catch {
      return undefined;
    }
  };
  const estimateWith = (bandwidthBytesPerSec: number, h: DriverEstimateHints | undefined): Estimate =>
    estimateMigration(h === undefined ? { ...base, bandwidthBytesPerSec } : withDriverHints({ ...base, bandwidthBytesPerSec }, h));
  let hints = await hintsFor(1);
  const streamKnown = hints?.copyRateBytesPerSec !== undefined && i.setUp !== undefined;

  // Measuring only matters when a path might be added: not if even the assumed floor fits the threshold,
  // nor when the driver's calibrated stream rate replaces the probe's figure anyway.
  // A capped primary is planned at its cap as before (its probe measures nothing that costs).
  const floor = i.setUp && i.assumedMinBandwidthBytesPerSec !== undefined && i.primary.capBytesPerSec === undefined ? i.assumedMinBandwidthBytesPerSec : undefined;
  const setUpOnly = streamKnown || (floor !== undefined && estimateMigration({ ...base, bandwidthBytesPerSec: floor }).totalMs <= i.thresholdMs);
  const assumedRate = floor ?? i.primary.capBytesPerSec ?? i.assumedMinBandwidthBytesPerSec ?? 1;
  let primaryProbe: PathProbe;
  try {
    primaryProbe = setUpOnly ? { setupMs: (await i.setUp!(i.primary)).setupMs, bandwidthBytesPerSec: assumedRate, assumed: true } : await i.probe(i.primary);
  } catch (e) {
    throw new EffectorError(ErrorCodes.PATH_SETUP_FAILED, `primary path ${i.primary.name} cannot be set up: ${describeError(e)}`, {
      cause: e,
      details: { path: i.primary.name },
    });
  }
  const primaryProblem = probeProblem(primaryProbe);
  if (primaryProblem !== undefined) {
    await releaseQuietly(i, i.primary);
    throw new EffectorError(ErrorCodes.PATH_SETUP_FAILED, `primary path ${i.primary.name} probe is unusable: ${primaryProblem}`, {
      details: { path: i.primary.name },
    });
  }

  const paths: PathCandidate[] = [i.primary];
  const probes = new Map<string, PathProbe>([[i.primary.name, primaryProbe]]);
  const decisions: PlanDecision[] = [];
  let bandwidth = pathRate(i.primary, primaryProbe);
  let estimate = estimateWith(bandwidth, hints);
  const decide = (action: PlanAction, reason: string, path?: string): void => {
    decisions.push({ step: decisions.length + 1, estimateMs: estimate.totalMs, paths: paths.length, action, reason, ...(path === undefined ? {} : { path }) });
  };
  const measured = !primaryProbe.assumed
    ? rateText(bandwidth)
    : streamKnown
      ? `not measured (the driver streams on its own at ${rateText(hints!.copyRateBytesPerSec!)}, as calibrated)`
      : `not measured (assumed ≥ ${rateText(bandwidth)}, and even at that rate the estimate fits)`;
  const hinted = hints === undefined ? '' : ` (${hints.source})`;
  decide('primary', `primary ${i.primary.name}: setup ${ms(primaryProbe.setupMs)}, ${measured}; estimate ${ms(estimate.totalMs)}${hinted}`, i.primary.name);

  // Paths set up and not yet released, so a failure of the planner itself leaks none of them.
  const held = new Set<PathCandidate>([i.primary]);
  const drop = async (p: PathCandidate): Promise<string> => {
    held.delete(p);
    return releaseQuietly(i, p);
  };
  try {
    let next = 0;
    while (estimate.totalMs > i.thresholdMs) {
      const over = `estimate ${ms(estimate.totalMs)} > threshold ${ms(i.thresholdMs)} with ${pathsText(paths.length)}`;
      if (paths.length >= i.maxPaths) {
        decide('done', `${over}: stopping at maxPaths ${i.maxPaths}`);
        break;
      }
      const candidate = i.candidates[next++];
      if (candidate === undefined) {
        decide('done', `${over}: no more candidate paths`);
        break;
      }
      let probe: PathProbe;
      try {
        probe = await i.probe(candidate);
      } catch (e) {
        decide('skip-path', `${candidate.name} not added: setup failed: ${describeError(e)}`, candidate.name);
        continue;
      }
      held.add(candidate);
      probes.set(candidate.name, probe);
      const problem = probeProblem(probe);
      if (problem !== undefined) {
        decide('skip-path', `${candidate.name} not added: unusable probe: ${problem}${await drop(candidate)}`, candidate.name);
        continue;
      }
      if (probe.setupMs > i.addPathThresholdMs) {
        decide('skip-path', `${candidate.name} not added: setup ${ms(probe.setupMs)} > ${ms(i.addPathThresholdMs)}${await drop(candidate)}`, candidate.name);
        continue;
      }
      const cpu = await askTarget(i, paths.length + 1);
      if (!cpu.canReassemble) {
        const why = cpu.reason ? `: ${cpu.reason}` : '';
        decide('done', `${over}: target has no CPU for ${pathsText(paths.length + 1)}${why}${await drop(candidate)}`, candidate.name);
        break;
      }
      const rate = pathRate(candidate, probe);
      decide('add-path', `${over}: adding ${candidate.name} (setup ${ms(probe.setupMs)}, ${rateText(rate)})`, candidate.name);
      paths.push(candidate);
      bandwidth += rate;
      hints = await hintsFor(paths.length);
      estimate = estimateWith(bandwidth, hints);
    }
    if (estimate.totalMs <= i.thresholdMs) {
      decide('done', `estimate ${ms(estimate.totalMs)} ≤ threshold ${ms(i.thresholdMs)} with ${pathsText(paths.length)}`);
    }
  } catch (e) {
    // The caller gets no plan, so nothing it could tear down: release everything set up here.
    for (const p of [...held]) await drop(p);
    throw e;
  }
  return { paths, probes, bandwidthBytesPerSec: bandwidth, estimate, thresholdMs: i.thresholdMs, decisions, withinThreshold: estimate.totalMs <= i.thresholdMs };
}

export type ThresholdSource = 'migration' | 'vm' | 'sla' | 'default';

/**
 * The threshold time of a migration: the migration's own value wins over the VM's, the VM's over
 * the SLA's `maxMigrationMs`, and that over the default.
 *
 * @throws ConfigError `EMBOT_ERR_PLAN_INPUT_INVALID` when a given value (or the default) is not a finite number > 0.
 * @example
 * ```ts
 * resolveThreshold({ vm: 8000, sla: { maxMigrationMs: 10_000 }, default: 30_000 }); // { ms: 8000, from: 'vm' }
 * ```
 */
export function resolveThreshold(sources: {
  readonly migration?: number;
  readonly vm?: number;
  readonly sla?: { readonly maxMigrationMs?: number };
  readonly default: number;
}): { ms: number; from: ThresholdSource } {
  const ordered: readonly [ThresholdSource, number | undefined][] = [
    ['migration', sources.migration],
    ['vm', sources.vm],
    ['sla', sources.sla?.maxMigrationMs],
    ['default', sources.default],
  ];
  for (const [from, v] of ordered) {
    if (v === undefined) continue;
    if (!isPositive(v)) invalid(`threshold from ${from} is ${String(v)}, expected a finite number of ms > 0`);
    return { ms: v, from };
  }
  return invalid('threshold default is missing');
}

/**
 * Human-readable plan for the CLI summary: the outcome line, then one line per decision.
 *
 * @example
 * ```ts
 * console.log(formatPlan(await planPaths(input)));
 * // paths: p1, p2 (100 MB/s); estimate 1900 ms ≤ threshold 2000 ms; 3 rounds, downtime 120 ms
 * //   1. primary p1: setup 3 ms, 50 MB/s; estimate 4200 ms
 * //   ...
 * ```
 */
export function formatPlan(plan: Plan): string {
  const e = plan.estimate;
  const cmp = plan.withinThreshold ? '≤' : '>';
  const conv = e.converges ? '' : ' (does not converge: stop-and-copy forced by the round limit)';
  const throttle = e.throttleSteps > 0 ? `, auto-converge ${e.throttleSteps} step${e.throttleSteps === 1 ? '' : 's'}` : '';
  const head =
    `paths: ${plan.paths.map((p) => p.name).join(', ')} (${rateText(plan.bandwidthBytesPerSec)}); ` +
    `estimate ${ms(e.totalMs)} ${cmp} threshold ${ms(plan.thresholdMs)}; ${e.rounds} round${e.rounds === 1 ? '' : 's'}, downtime ${ms(e.downtimeMs)}${throttle}${conv}`;
  return [head, ...plan.decisions.map((d) => `  ${d.step}. ${d.action}${d.path && d.action !== 'primary' ? ` ${d.path}` : ''}: ${d.reason}`)].join('\n');
}

function checkPlanInput(i: PlanInput): void {
  if (typeof i !== 'object' || i === null || typeof i.vm !== 'object' || i.vm === null) invalid('plan input and its vm must be objects');
  checkEstimateInput({
    memoryBytes: i.vm.memoryBytes,
    pageSize: i.vm.pageSize,
    dirtyRateBytesPerSec: i.vm.dirtyRateBytesPerSec,
    bandwidthBytesPerSec: 1, // measured later; checked here only so bad VM input fails before any path is set up
    downtimeLimitMs: i.downtimeLimitMs,
    maxRounds: i.maxRounds,
    autoConverge: i.autoConverge,
    ...(i.vm.cpuLoad === undefined ? {} : { vmCpuLoad: i.vm.cpuLoad }),
    ...(i.copyCpuFactor === undefined ? {} : { copyCpuFactor: i.copyCpuFactor }),
    ...(i.perRoundOverheadMs === undefined ? {} : { perRoundOverheadMs: i.perRoundOverheadMs }),
  });
  if (!isPositive(i.thresholdMs)) invalid(`thresholdMs is ${String(i.thresholdMs)}, expected a finite number > 0`);
  if (!(isFiniteNumber(i.addPathThresholdMs) && i.addPathThresholdMs >= 0)) invalid(`addPathThresholdMs is ${String(i.addPathThresholdMs)}, expected a finite number ≥ 0`);
  if (!Number.isInteger(i.maxPaths) || i.maxPaths < 1) invalid(`maxPaths is ${String(i.maxPaths)}, expected an integer ≥ 1`);
  for (const f of ['probe', 'targetCpu', 'release'] as const) {
    if (typeof i[f] !== 'function') invalid(`${f} must be a function`);
  }
  if (i.setUp !== undefined && typeof i.setUp !== 'function') invalid('setUp must be a function');
  if (i.assumedMinBandwidthBytesPerSec !== undefined && !isPositive(i.assumedMinBandwidthBytesPerSec)) {
    invalid(`assumedMinBandwidthBytesPerSec is ${String(i.assumedMinBandwidthBytesPerSec)}, expected a finite number > 0`);
  }
  if (!Array.isArray(i.candidates)) invalid('candidates must be an array');
  const seen = new Set<string>();
  for (const p of [i.primary, ...i.candidates]) {
    if (typeof p !== 'object' || p === null || typeof p.name !== 'string' || p.name === '') invalid('every path needs a non-empty name');
    if (typeof p.url !== 'string' || p.url === '') invalid(`path ${p.name} needs a url`);
    if (p.capBytesPerSec !== undefined && !isPositive(p.capBytesPerSec)) invalid(`path ${p.name} capBytesPerSec is ${String(p.capBytesPerSec)}, expected a finite number > 0`);
    if (seen.has(p.name)) invalid(`path name ${p.name} appears twice`);
    seen.add(p.name);
  }
}

/** Why a probe's measurements cannot be planned with, or undefined when they can. */
function probeProblem(p: unknown): string | undefined {
  if (typeof p !== 'object' || p === null) return 'no measurements';
  const { setupMs, bandwidthBytesPerSec } = p as Record<string, unknown>;
  if (!(isFiniteNumber(setupMs) && setupMs >= 0)) return `setupMs is ${String(setupMs)}`;
  if (!isPositive(bandwidthBytesPerSec)) return `bandwidth is ${String(bandwidthBytesPerSec)}`;
  return undefined;
}

async function askTarget(i: PlanInput, paths: number): Promise<TargetCpuAnswer> {
  try {
    const a = await i.targetCpu(paths);
    if (typeof a !== 'object' || a === null || typeof a.canReassemble !== 'boolean') return { canReassemble: false, cpuFree: 0, reason: 'target gave no usable answer' };
    return a;
  } catch (e) {
    // A target that cannot answer cannot be counted on to reassemble (the patent's condition).
    return { canReassemble: false, cpuFree: 0, reason: `target CPU query failed: ${describeError(e)}` };
  }
}

/** Releases a path; a failure is reported in the decision text rather than thrown, since the plan itself is still good. */
async function releaseQuietly(i: PlanInput, p: PathCandidate): Promise<string> {
  try {
    await i.release(p);
    return '';
  } catch (e) {
    return ` (release failed: ${describeError(e)})`;
  }
}

function pathRate(p: PathCandidate, probe: PathProbe): number {
  return Math.min(probe.bandwidthBytesPerSec, p.capBytesPerSec ?? Number.POSITIVE_INFINITY);
}

function isFiniteNumber(v: unknown): v is number {
  return typeof v === 'number' && Number.isFinite(v);
}

function isPositive(v: unknown): v is number {
  return isFiniteNumber(v) && v > 0;
}

function invalid(message: string): never {
  throw new ConfigError(ErrorCodes.PLAN_INPUT_INVALID, `invalid path plan input: ${message}`);
}

function ms(v: number): string {
  return `${Math.round(v)} ms`;
}

function pathsText(n: number): string {
  return `${n} path${n === 1 ? '' : 's'}`;
}

/** Decimal units, as link speeds are quoted. */
function rateText(bytesPerSec: number): string {
  const units: readonly [number, string][] = [
    [1e9, 'GB/s'],
    [1e6, 'MB/s'],
    [1e3, 'kB/s'],
  ];
  for (const [scale, unit] of units) if (bytesPerSec >= scale) return `${Number((bytesPerSec / scale).toFixed(1))} ${unit}`;
  return `${Math.round(bytesPerSec)} B/s`;
}
