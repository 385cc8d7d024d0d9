/**
 * The planner's estimate of a QEMU migration, replayed on real figures: test/fixtures/
 * qemu-estimate-runs.json is a `--record` of the estimate benchmark (bench/qemu.bench.ts (e), the
 * fill-then-halt guest, multifd 1/2/4, 5 runs each) taken on this 2-core TCG host. Each run keeps
 * the calibration samples its source driver had when it estimated, the host load factor then, the
 * guest's measured non-zero bytes and dirty rate, and the time the move really took. The test
 * rebuilds the source driver's model from those samples (its model file, as after a restart),
 * estimates through the same path the bench and the planner use (estimateHints → withDriverHints →
 * estimateMigration), with the model of now (a fixed cost per move plus a per-byte cost, fitted
 * when the samples span sizes: stream-fit.ts) and with the rate-only model of before, which the
 * bench records beside it (its A/B). The accuracy itself is judged by the benchmark
 * (BENCHMARKS.md): on this shared host one move's time still varies 2x under load, so no per-run
 * bound holds here.
 * A deliberate change of the model re-records the fixture (`npx tsx bench/qemu.bench.ts
 * --estimate-only --record test/fixtures/qemu-estimate-runs.json`). No QEMU runs: the VM is only
 * created, which starts nothing.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { PRECOPY_DEFAULTS, estimateMigration, withDriverHints } from '../../core/mobility/migration-estimate.ts';
import { LOAD_BAND, QemuDriver, type StreamCalibration } from '../../effectors/hypervisor/qemu/qemu-driver.ts';
import { spansSizes } from '../../effectors/hypervisor/qemu/stream-fit.ts';
import type { EstimateRecord } from '../../bench/qemu.bench.ts';
import { REPO } from '../harness/agent-process.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';

const cleanups = cleanupsAfterEach();

/** The recorded fields the replay reads (the bench writes more). */
type RecordedRun = Pick<EstimateRecord, 'guest' | 'channels' | 'memoryBytes' | 'nonZeroBytes' | 'dirtyRateBytesPerSec' | 'loadFactor' | 'estimateMs' | 'actualMs' | 'samplesBefore'> & {
  readonly rateOnlyEstimateMs: number;
};

const fixture = JSON.parse(readFileSync(join(REPO, 'test/fixtures/qemu-estimate-runs.json'), 'utf8')) as { readonly at: string; readonly loadavg: readonly number[]; readonly runs: readonly RecordedRun[] };

/** The estimate the source driver of `run` makes, rebuilt from the samples it had; `fixedCost: false` is the rate-only model, as the bench's A/B scales it. */
async function replay(run: RecordedRun, fixedCost = true): Promise<{ readonly ms: number; readonly zeroPageCost: number; readonly kind: string | undefined }> {
  const root = mkdtempSync(join(tmpdir(), 'embot-qreplay-'));
  cleanups.push(() => rmSync(root, { recursive: true, force: true }));
  writeFileSync(join(root, 'migration-model.json'), JSON.stringify({ version: 1, byChannels: run.samplesBefore }));
  const d = new QemuDriver({ root, accel: 'tcg', loadFactor: () => run.loadFactor });
  cleanups.push(() => d.close());
  await d.create({ name: 'est', memory: run.memoryBytes, vcpus: 1 });
  const fitted = await d.capabilities.migrationModel!.estimateHints('est', { channels: run.channels });
  const rateOnly = d.calibration(run.channels, { fixedCost: false });
  const hints =
    fixedCost || rateOnly === undefined
      ? fitted
      : { ...fitted, copyRateBytesPerSec: rateOnly.copyRateBytesPerSec / run.loadFactor, fixedMs: rateOnly.fixedMs * run.loadFactor, zeroPageCost: rateOnly.zeroPageCost };
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
  return { ms, zeroPageCost: hints.zeroPageCost ?? 0, kind: d.calibration(run.channels, { fixedCost })?.kind };
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

  it('replayed with the rate-only model, the same samples give the A/B column the benchmark printed', async () => {
    for (const r of runs) expect((await replay(r, false)).ms).toBeCloseTo(r.rateOnlyEstimateMs, 6);
  });

  it('each channel count\'s first run already has two dense sizes ≥ 1.5× apart and a sparse guest, so fixed cost, per-byte cost and zero-page cost can all be fitted', async () => {
    for (const c of [1, 2, 4]) {
      const first = runs.find((r) => r.channels === c)!;
      const mine = first.samplesBefore[String(c)] ?? [];
      const dense = mine.filter((x) => x.zeroBytes < 16 * 2 ** 20);
      expect(spansSizes(dense)).toBe(true);
      expect(mine.some((x) => x.zeroBytes > 100 * 2 ** 20)).toBe(true);
    }
    // And the fit took on the first 1-channel run (the run the rate-only model missed most, quiet).
    expect((await replay(runs.find((r) => r.channels === 1)!)).kind).toBe('fixed+per-byte');
  });

  it('every run estimates from samples that differ in zero share (the sparse guest before the first run), so the zero-page cost is fitted', () => {
    for (const r of runs) {
      const all = Object.values(r.samplesBefore).flat();
      expect(all.some((x) => x.zeroBytes > 100 * 2 ** 20)).toBe(true);
      expect(all.some((x) => x.zeroBytes < 16 * 2 ** 20)).toBe(true);
    }
  });
});

describe('qemu calibration and the host load factor (LOAD_BAND)', () => {
  const MiB = 1024 * 1024;
  // Three samples of 100 MiB/s taken at load factor 5 (a busy minute on the 2-core host).
  const at5 = (vm: string): StreamCalibration => ({ copyRateBytesPerSec: 100 * MiB, fixedMs: 10, sentBytes: 64 * MiB, zeroBytes: 0, sendMs: 640, vm, at: 1, loadFactor: 5 });

  async function hintsAt(load: number): Promise<{ readonly copyRateBytesPerSec?: number; readonly fixedMs?: number }> {
    const root = mkdtempSync(join(tmpdir(), 'embot-qband-'));
    cleanups.push(() => rmSync(root, { recursive: true, force: true }));
    writeFileSync(join(root, 'migration-model.json'), JSON.stringify({ version: 1, byChannels: { '1': [at5('a'), at5('b'), at5('c')] } }));
    const d = new QemuDriver({ root, accel: 'tcg', loadFactor: () => load });
    cleanups.push(() => d.close());
    await d.create({ name: 'v', memory: 64 * MiB, vcpus: 1 });
    return d.capabilities.migrationModel!.estimateHints('v', { channels: 1 });
  }

  it(`a factor now less than ${LOAD_BAND}× from the samples' takes them as measured (the minute's average does not follow one move)`, async () => {
    for (const load of [2.6, 5, 7, 9.9]) expect(await hintsAt(load)).toMatchObject({ copyRateBytesPerSec: expect.closeTo(100 * MiB, 3), fixedMs: expect.closeTo(10, 9) });
  });

  it(`a factor ${LOAD_BAND}× or more apart (a quiet hour against a busy one) scales them`, async () => {
    expect(await hintsAt(10)).toMatchObject({ copyRateBytesPerSec: expect.closeTo(50 * MiB, 3), fixedMs: expect.closeTo(20, 9) });
    expect(await hintsAt(1)).toMatchObject({ copyRateBytesPerSec: expect.closeTo(500 * MiB, 3), fixedMs: expect.closeTo(2, 9) });
  });
});
