/**
 * The planner's estimate of a QEMU migration, replayed on real figures: test/fixtures/
 * qemu-estimate-runs.json is a `--record` of the estimate benchmark (bench/qemu.bench.ts (e), the
 * fill-then-halt guest, multifd 1/2/4, 5 runs each) taken on this 2-core TCG host. Each run keeps
 * the calibration samples its source driver had when it estimated, the host load factor then, the
 * guest's measured non-zero bytes and dirty rate, and the time the move really took. The test
 * rebuilds the source driver's model from those samples (its model file, as after a restart),
 * estimates through the same path the bench and the planner use (estimateHints → withDriverHints →
 * estimateMigration). The accuracy itself is judged by the benchmark (BENCHMARKS.md): these runs
 * were taken at load 13-19, where one move's time varies 2-4x, so no per-run bound holds here.
 * A deliberate change of the model re-records the fixture (`npx tsx bench/qemu.bench.ts
 * --estimate-only --record test/fixtures/qemu-estimate-runs.json`). No QEMU runs: the VM is only
 * created, which starts nothing.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { PRECOPY_DEFAULTS, estimateMigration, withDriverHints } from '../../core/mobility/migration-estimate.ts';
import { QemuDriver, type StreamCalibration } from '../../effectors/hypervisor/qemu/qemu-driver.ts';
import { REPO } from '../harness/agent-process.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';

const cleanups = cleanupsAfterEach();

interface RecordedRun {
  readonly guest: 'halted' | 'spinning';
  readonly channels: number;
  readonly memoryBytes: number;
  readonly nonZeroBytes: number;
  readonly dirtyRateBytesPerSec: number;
  readonly loadFactor: number;
  readonly estimateMs: number;
  readonly actualMs: number;
  readonly samplesBefore: Readonly<Record<string, readonly StreamCalibration[]>>;
}

const fixture = JSON.parse(readFileSync(join(REPO, 'test/fixtures/qemu-estimate-runs.json'), 'utf8')) as { readonly at: string; readonly loadavg: readonly number[]; readonly runs: readonly RecordedRun[] };

/** The estimate the source driver of `run` makes, rebuilt from the samples it had. */
async function replay(run: RecordedRun): Promise<{ readonly ms: number; readonly zeroPageCost: number }> {
  const root = mkdtempSync(join(tmpdir(), 'embot-qreplay-'));
  cleanups.push(() => rmSync(root, { recursive: true, force: true }));
  writeFileSync(join(root, 'migration-model.json'), JSON.stringify({ version: 1, byChannels: run.samplesBefore }));
  const d = new QemuDriver({ root, accel: 'tcg', loadFactor: () => run.loadFactor });
  cleanups.push(() => d.close());
  await d.create({ name: 'est', memory: run.memoryBytes, vcpus: 1 });
  const hints = await d.capabilities.migrationModel!.estimateHints('est', { channels: run.channels });
  const input = {
    memoryBytes: run.memoryBytes,
    pageSize: 4096,
    dirtyRateBytesPerSec: run.dirtyRateBytesPerSec,
    bandwidthBytesPerSec: 125e6,
    downtimeLimitMs: PRECOPY_DEFAULTS.downtimeLimitMs,
    maxRounds: PRECOPY_DEFAULTS.maxRounds,
    autoConverge: false,
  };
  // The non-zero count is a pmemsave scan of the running guest (QEMU needed): taken from the record.
  const ms = estimateMigration(withDriverHints(input, { ...hints, nonZeroBytes: run.nonZeroBytes })).totalMs;
  return { ms, zeroPageCost: hints.zeroPageCost ?? 0 };
}

describe(`qemu migration estimate replayed on a recorded benchmark (${fixture.at}, load ${fixture.loadavg.map((x) => x.toFixed(1)).join(' ')})`, () => {
  const runs = fixture.runs.filter((r) => r.guest === 'halted');

  it('the fixture holds 5 runs per channel count of the halted guest, each with samples to estimate from', () => {
    for (const c of [1, 2, 4]) expect(runs.filter((r) => r.channels === c)).toHaveLength(5);
    for (const r of runs) expect(Object.keys(r.samplesBefore).length).toBeGreaterThan(0);
  });

  it('replayed, the model gives the estimate the benchmark printed (the replay is the bench\'s path)', async () => {
    for (const r of runs) expect((await replay(r)).ms).toBeCloseTo(r.estimateMs, 6);
  });

  it('the first run already knows what a zero page costs (the sparse guest migrated before it), and so does every later one', async () => {
    for (const r of runs) expect((await replay(r)).zeroPageCost).toBeGreaterThan(0);
  });
});
