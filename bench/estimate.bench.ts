/**
 * Estimate-accuracy benchmark (issue 4): |estimate − actual| / actual of the pre-copy migration
 * estimate (`estimateMigration`) over a grid of VM sizes × dirty rates, each point a real pre-copy
 * of a running sim VM over one token-bucket-capped path on loopback. The cap makes the bandwidth
 * an input the estimate can know, so the figure is the estimator's model (rounds, dirtying,
 * convergence), not how much CPU the bench happened to get.
 *
 * Two estimates per point: with the configured cap as the bandwidth (what a planner has before
 * anything moved; judged against the target), and, as a diagnostic, with the cap scaled by the
 * rate an idle-VM probe migration reached over a fresh capped path right before the point
 * (`copyCpuFactor`): on a loaded machine the path can fall short of its cap, and a probe is how a
 * planner would learn it in the same run.
 *
 * @example
 * ```sh
 * npx tsx bench/estimate.bench.ts            # markdown table, 4 sizes × 4 dirty rates × 3 runs
 * npx tsx bench/estimate.bench.ts --quick    # 8 and 32 MiB, 1 run
 * npm run bench -- --only estimate
 * ```
 */
import { pathToFileURL } from 'node:url';
import { estimateError, estimateMigration, summarizeAccuracy, type AccuracySample, type Estimate } from '../core/mobility/migration-estimate.ts';
import { PeerServer, connectPeer } from '../core/wire/index.ts';
import { PageReceiver, pageBatchHandler, preCopy, type PreCopyProgress, type PreCopyResult } from '../effectors/hypervisor/sim/dataplane/index.ts';
import { SimDriver } from '../effectors/hypervisor/sim/sim-driver.ts';
import { fmt, renderTable, type BenchRow, type BenchTable } from './table.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
const SECRET = Buffer.from('bench-cluster-secret-0123456789');
const PAGE_SIZE = 4096;
/** The one path's cap: far below what one uncapped path carries here (~170–360 MiB/s), so the cap is the bottleneck. */
const CAP = 64 * MiB;
const DOWNTIME_LIMIT_MS = 300;
const MAX_ROUNDS = 30;
const TARGET_ERROR = 0.15;
/** Dirty rates as shares of the cap. */
const DIRTY_SHARES = [0, 0.1, 0.3, 0.6] as const;
/** Long enough (250 ms at the cap) for the bucket's 100 ms burst not to dominate, short enough to run before every point. */
const PROBE_MEMORY = 16 * MiB;

export interface EstimateBenchOptions {
  readonly quick?: boolean;
}

/** One real migration, with the end of each pre-copy round as the progress events saw it. */
interface Migration {
  readonly result: PreCopyResult;
  /** ms from the start of preCopy to the end of each pre-copy round (the final round excluded). */
  readonly roundEndsMs: readonly number[];
}

/**
 * Migrates a fresh running sim VM of `memory` bytes dirtying `dirtyRate` bytes/s over one path
 * capped at {@link CAP}, to a PageReceiver behind a real PeerServer; setup is not timed.
 */
async function migrateOnce(memory: number, dirtyRate: number, id: string): Promise<Migration> {
  const server = await PeerServer.listen({ agent: 'target', secret: SECRET, listen: '127.0.0.1:0' });
  // Every page written: the model prices the VM's bytes (a fresh VM's zero pages would go as indexes).
  const driver = new SimDriver({ pageSize: PAGE_SIZE, maxMemory: Math.max(memory, 64 * MiB), startMemory: 'random' });
  try {
    await driver.create({ name: 'vm', memory, dirtyRate });
    const receiver = new PageReceiver({ memoryBytes: memory, pageSize: PAGE_SIZE });
    // A target's memory is allocated before a migration: first-touch faults are not the figure.
    receiver.memory.fill(1);
    server.handle('PageBatch', pageBatchHandler(receiver));
    const conn = await connectPeer({ url: server.url, agent: 'source', expectedPeer: 'target', secret: SECRET, localAddress: '127.0.0.2', requestTimeoutMs: 60_000 });
    try {
      await driver.start('vm');
      const roundEndsMs: number[] = [];
      const start = performance.now();
      const result = await preCopy({
        migrationId: id,
        vm: 'vm',
        driver,
        paths: [{ name: 'p0', conn, capBytesPerSec: CAP }],
        downtimeLimitMs: DOWNTIME_LIMIT_MS,
        maxRounds: MAX_ROUNDS,
        autoConverge: true,
        stopVm: () => driver.stop('vm'),
        cpuState: () => new Uint8Array(4 * KiB).fill(3),
        onProgress: (p: PreCopyProgress) => {
          // Periodic progress inside round r also says 'precopy' with round r; the last one of a round is its end.
          if (p.phase !== 'precopy') return;
          roundEndsMs[p.round] = performance.now() - start;
        },
      });
      return { result, roundEndsMs };
    } finally {
      await conn.close();
    }
  } finally {
    await driver.close();
    await server.close();
  }
}

function estimateFor(memory: number, dirtyRate: number, copyCpuFactor = 1): Estimate {
  return estimateMigration({
    memoryBytes: memory,
    pageSize: PAGE_SIZE,
    dirtyRateBytesPerSec: dirtyRate,
    bandwidthBytesPerSec: CAP,
    downtimeLimitMs: DOWNTIME_LIMIT_MS,
    maxRounds: MAX_ROUNDS,
    autoConverge: true,
    ...(copyCpuFactor < 1 ? { copyCpuFactor } : {}),
  });
}

interface Run {
  readonly migration: Migration;
  /** Page bytes/s the probe migration right before reached over its own fresh capped path. */
  readonly probeRate: number;
}

interface Point {
  readonly memory: number;
  readonly share: number;
  readonly runs: Run[];
}

const median = (xs: readonly number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0 ? NaN : s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};
const pct = (x: number): string => `${(x * 100).toFixed(1)}%`;
const labelOf = (p: Point): string => `${p.memory / MiB} MiB @ ${p.share * 100}% of cap`;
/** The run with the median total time (the lower middle for an even count). */
const medianRun = (runs: readonly Run[]): Run => [...runs].sort((a, b) => a.migration.result.totalMs - b.migration.result.totalMs)[Math.floor((runs.length - 1) / 2)]!;

/** Mean and max error rows; `judged` false leaves out target and met (a diagnostic, not the figure). */
function errorRows(what: string, samples: readonly AccuracySample[], judged: boolean): BenchRow[] {
  const s = summarizeAccuracy(samples);
  // Errors are "lower is better", like times: ratio = limit / value, ≥ 1 meets the target.
  const row = (name: string, e: number): BenchRow => ({
    name,
    value: e * 100,
    unit: '%',
    limitName: 'target',
    limit: TARGET_ERROR * 100,
    ratio: e === 0 ? Infinity : TARGET_ERROR / e,
    ...(judged ? { target: '<= 15%', met: e <= TARGET_ERROR } : {}),
  });
  return [row(`mean |estimate − actual| / actual, ${what}, ${s.count} points`, s.meanError), row(`max |estimate − actual| / actual, ${what} (worst: ${s.worst?.label ?? '-'})`, s.maxError)];
}

/**
 * Runs the grid and returns the table.
 *
 * @example
 * ```ts
 * console.log(renderTable(await run({ quick: true })));
 * ```
 */
export async function run(opts: EstimateBenchOptions = {}): Promise<BenchTable> {
  const quick = opts.quick === true;
  const sizes = (quick ? [8, 32] : [8, 32, 64, 128]).map((m) => m * MiB);
  const reps = quick ? 1 : 3;
  const points: Point[] = sizes.flatMap((memory) => DIRTY_SHARES.map((share): Point => ({ memory, share, runs: [] })));

  // Warm-up: JIT and the first allocations of the wire and the data plane are not the figure.
  await migrateOnce(8 * MiB, 0, 'warmup');
  // Repetitions outermost: a spell of load from other processes then hits one run of many points, not every run of one.
  for (let r = 0; r < reps; r++) {
    for (const p of points) {
      const probe = await migrateOnce(PROBE_MEMORY, 0, `probe-${r}`);
      const probeRate = (probe.result.bytes * 1000) / probe.result.totalMs;
      const migration = await migrateOnce(p.memory, p.share * CAP, `estimate-${p.memory}-${p.share}-${r}`);
      p.runs.push({ migration, probeRate });
    }
  }

  const rows: BenchRow[] = [];
  const rawSamples: AccuracySample[] = [];
  const probedSamples: AccuracySample[] = [];
  let roundsMatch = 0;
  let allRunsRawMax = 0;
  let round0Min = Infinity;
  let round0Max = 0;
  let probeMin = Infinity;
  const idleOverheads: number[] = [];
  for (const p of points) {
    const dirtyRate = p.share * CAP;
    const raw = estimateFor(p.memory, dirtyRate);
    const med = medianRun(p.runs);
    const a = med.migration.result;
    const probed = estimateFor(p.memory, dirtyRate, Math.min(1, med.probeRate / CAP));
    const label = labelOf(p);
    rawSamples.push({ estimateMs: raw.totalMs, actualMs: a.totalMs, label });
    probedSamples.push({ estimateMs: probed.totalMs, actualMs: a.totalMs, label });
    if (raw.rounds === a.rounds) roundsMatch++;
    for (const run of p.runs) {
      const m = run.migration;
      allRunsRawMax = Math.max(allRunsRawMax, estimateError(raw.totalMs, m.result.totalMs));
      const round0 = m.roundEndsMs[0];
      if (round0 !== undefined) {
        const share = (p.memory * 1000) / CAP / round0;
        round0Min = Math.min(round0Min, share);
        round0Max = Math.max(round0Max, share);
      }
      probeMin = Math.min(probeMin, run.probeRate / CAP);
      if (p.share === 0) idleOverheads.push(m.result.totalMs - (p.memory * 1000) / CAP);
    }
    const times = p.runs.map((x) => x.migration.result.totalMs);
    const spread = p.runs.length > 1 ? `; runs ${fmt(Math.min(...times))}–${fmt(Math.max(...times))} ms` : '';
    rows.push({
      name:
        `${label}: err ${pct(estimateError(raw.totalMs, a.totalMs))} (probed ${pct(estimateError(probed.totalMs, a.totalMs))}); ` +
        `rounds est ${raw.rounds} / act ${a.rounds}; downtime est ${raw.downtimeMs.toFixed(0)} / act ${a.downtimeMs.toFixed(0)} ms${a.throttled ? `; throttled ×${a.throttleSteps}` : ''}${spread}`,
      value: a.totalMs,
      unit: 'ms',
      limitName: 'estimate (bandwidth = cap)',
      limit: raw.totalMs,
      ratio: raw.totalMs / a.totalMs,
    });
  }
  rows.push(...errorRows('bandwidth = cap', rawSamples, true));
  rows.push(...errorRows('probed bandwidth (diagnostic)', probedSamples, false));

  const notes = [
    `each point: a fresh running sim VM (random uniform page writes at the dirty rate, 50 ms ticks) migrated by preCopy over one real PeerServer/connectPeer path on 127.0.0.1 capped at ${CAP / MiB} MiB/s by its token bucket (starts empty), downtime limit ${DOWNTIME_LIMIT_MS} ms, maxRounds ${MAX_ROUNDS}, auto-converge on; both ends in this process`,
    `value = actual totalMs (median of ${reps} run${reps > 1 ? 's' : ''}, repetitions interleaved across the grid), limit = estimateMigration with bandwidth = cap and no corrections, ratio = estimate / actual (1 is exact); error rows: ratio = target / error (≥ 1 meets)`,
    `"probed": the same estimate with copyCpuFactor = min(1, rate of a ${PROBE_MEMORY / MiB} MiB idle-VM migration over a fresh capped path run right before the point / cap) — a bandwidth measured in the same run, not fitted to the results; probes reached ${pct(probeMin)} of the cap at worst. Not judged against the target: a stall is transient, so a probe that caught one mispredicts the next migration as often as it corrects it (the cap, the planner's configured input, is the estimate that counts)`,
    `round 0 (every page, the bulk of each migration) reached ${pct(round0Min)}–${pct(round0Max)} of the cap across all runs; when it falls short the cause is load, not CPU throughput (an uncapped path carried 170–360 MiB/s here, measured separately, at ~2.5 ms of CPU per MiB): 4 MiB in flight per path (4 batches of 1 MiB) covers a 62 ms ack round trip at 64 MiB/s, and the bucket's 100 ms burst cannot make up a longer stall (descheduling, GC), which weighs most on the short runs; the sender also decides convergence on the lower measured rate, which can add a whole round near the limit`,
    `rounds: estimate = actual at ${roundsMatch} of ${points.length} points; worst single-run error with bandwidth = cap: ${pct(allRunsRawMax)}`,
    `no perRoundOverheadMs: idle-VM runs (0% rows, 2 rounds each) ended a median ${median(idleOverheads).toFixed(1)} ms after memory / cap (max ${Math.max(...idleOverheads).toFixed(1)} ms): the final empty round costs one ack round trip, and between rounds the bucket refills during the gap, which hides the rest`,
    'the estimate runs a few % high on the 8 MiB rows, from a sim artifact, not the model: the sim dirties in 50 ms ticks and the VM stops right after the last pre-copy round, so the writes of the tick in progress (on average half a tick × dirty rate) never happen, and a 125 ms round 0 makes that a large share; at intermediate round ends they only move to the next round. The estimator models a continuous writer, as a real VM is, so it is left uncorrected',
  ];
  if (quick) notes.push('quick mode: 8 and 32 MiB, one run per point: a smoke run, not representative');
  return { title: `migration estimate accuracy (pre-copy over one path capped at ${CAP / MiB} MiB/s, loopback)`, rows, notes };
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  console.log(renderTable(await run({ quick: process.argv.includes('--quick') })));
  // A leaked handle must not keep a standalone run alive.
  process.exit(0);
}
