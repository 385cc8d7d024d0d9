import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../core/errors.ts';
import { CALIBRATION_SAMPLES, QemuDriver } from '../../effectors/hypervisor/qemu/qemu-driver.ts';
import type { QemuVmSpec } from '../../effectors/hypervisor/qemu/vm-spec.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { heartbeat, qemuTestFile } from '../harness/qemu-processes.ts';

const MiB = 1024 * 1024;
const { run, qemus } = qemuTestFile();
const cleanups = cleanupsAfterEach();

function tempRoot(): string {
  const dir = mkdtempSync(join(tmpdir(), 'embot-qmodel-'));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A driver on `root`; the host's load factor is `load` (default 1: the figures as calibrated). */
function driver(root: string, load = 1): QemuDriver {
  const d = new QemuDriver({ root, accel: 'tcg', loadFactor: () => load });
  cleanups.push(() => d.close());
  return d;
}

const sample = (vm: string, rate: number, fixedMs: number): Record<string, unknown> => ({ copyRateBytesPerSec: rate, fixedMs, sentBytes: 64 * MiB, sendMs: 100, vm, at: 1 });

// The model file is read back after a restart: outside input. These need no QEMU (no VM starts).
describe('qemu migration model file (bad input)', () => {
  it('an unreadable model file leaves the driver uncalibrated, nothing thrown', async () => {
    const root = tempRoot();
    writeFileSync(join(root, 'migration-model.json'), '{ not json');
    const d = driver(root);
    expect(d.calibration(1)).toBeUndefined();
    await d.create({ name: 'v', memory: 64 * MiB, vcpus: 1 });
    const hints = await d.capabilities.migrationModel!.estimateHints('v', { channels: 1 });
    expect(hints.copyRateBytesPerSec).toBeUndefined();
    expect(hints.nonZeroBytes).toBeUndefined();
    expect(hints.source).toContain('copy rate unknown');
  });

  it('bad samples and channel counts are dropped, good ones kept; the hints are their medians', async () => {
    const root = tempRoot();
    const file = {
      version: 1,
      byChannels: {
        '2': [sample('a', 100e6, 10), { ...sample('b', -5, 10) }, { ...sample('c', 300e6, 30) }, { vm: 'd' }, 'nonsense', sample('e', 200e6, 20)],
        '0': [sample('z', 1e9, 1)],
        x: [sample('z', 1e9, 1)],
        '4': 'not a list',
      },
    };
    writeFileSync(join(root, 'migration-model.json'), JSON.stringify(file));
    const d = driver(root);
    const c = d.calibration(2);
    expect(c?.samples.map((s) => s.vm)).toEqual(['a', 'c', 'e']);
    expect(c?.copyRateBytesPerSec).toBe(200e6);
    // One size: no fixed cost of the stream; QEMU's setup (median 20 ms for 64 MiB of RAM) per byte of RAM.
    expect(c?.fixedMs).toBe(0);
    expect(c!.setupMsPerRamByte * 64 * MiB).toBeCloseTo(20, 9);
    expect(d.calibration(4)).toBeUndefined();
    expect(d.calibration(0)).toBeUndefined();
    await d.create({ name: 'v', memory: 64 * MiB, vcpus: 1 });
    const hints = await d.capabilities.migrationModel!.estimateHints('v', { channels: 2 });
    expect(hints).toMatchObject({ copyRateBytesPerSec: 200e6, fixedMs: expect.closeTo(20, 9) });
    // No samples for 1 channel: nothing borrowed from another channel count.
    expect((await d.capabilities.migrationModel!.estimateHints('v')).copyRateBytesPerSec).toBeUndefined();
  });

  it('samples with different zero shares give the copy rate and the zero-page cost apart (least squares)', async () => {
    const root = tempRoot();
    // 1 ms per non-zero MiB, 0.5 ms per skipped zero MiB.
    const s = (vm: string, sent: number, zero: number): Record<string, unknown> => ({ ...sample(vm, 1, 5), sentBytes: sent * MiB, zeroBytes: zero * MiB, sendMs: sent + 0.5 * zero });
    writeFileSync(join(root, 'migration-model.json'), JSON.stringify({ version: 1, byChannels: { '1': [s('dense', 100, 0), s('sparse', 100, 200), s('mid', 300, 100)] } }));
    const d = driver(root);
    const c = d.calibration(1)!;
    expect(c.copyRateBytesPerSec).toBeCloseTo(MiB * 1000, 3);
    expect(c.zeroPageCost).toBeCloseTo(0.5, 9);
    await d.create({ name: 'v', memory: 64 * MiB, vcpus: 1 });
    // The streams have no fixed part; QEMU's setup (5 ms each) scales with RAM: 5 ms per 300 MiB (the median sample), 64 MiB here.
    expect(await d.capabilities.migrationModel!.estimateHints('v')).toMatchObject({ zeroPageCost: expect.closeTo(0.5, 9), fixedMs: expect.closeTo((64 * 5) / 300, 6) });
  });

  it('the zero-page cost is fitted over every channel count: the first samples of a count (dense guests only) already have it', async () => {
    const root = tempRoot();
    // 1 ms per non-zero MiB and 0.5 ms per zero MiB with 1 channel; 2 ms per non-zero MiB with 2, one dense sample.
    const s = (vm: string, sent: number, zero: number, perMiB = 1): Record<string, unknown> => ({ ...sample(vm, 1, 5), sentBytes: sent * MiB, zeroBytes: zero * MiB, sendMs: perMiB * sent + 0.5 * zero });
    writeFileSync(join(root, 'migration-model.json'), JSON.stringify({ version: 1, byChannels: { '1': [s('dense', 100, 0), s('sparse', 100, 200)], '2': [s('calib', 100, 0, 2)] } }));
    const c = driver(root).calibration(2)!;
    expect(c.copyRateBytesPerSec).toBeCloseTo((MiB * 1000) / 2, 3);
    expect(c.zeroPageCost).toBeCloseTo(0.25, 9);
  });

  it('each sample is taken at its load factor and the hints are scaled to the factor now; a bad factor in the file reads as 1', async () => {
    const root = tempRoot();
    const at = (vm: string, loadFactor: unknown): Record<string, unknown> => ({ ...sample(vm, 100e6, 10), loadFactor });
    writeFileSync(join(root, 'migration-model.json'), JSON.stringify({ version: 1, byChannels: { '1': [at('a', 2), at('b', 2), at('c', 2)], '2': [at('x', -3), at('y', 'high'), at('z', 0.5)] } }));
    // Calibrated at factor 2: twice as fast on an idle host; at factor 4 now: half the calibrated rate.
    const d = driver(root, 4);
    expect(d.calibration(1)).toMatchObject({ copyRateBytesPerSec: 200e6, fixedMs: 0 });
    // QEMU's setup does not depend on the channels: every count's samples give it, each at its factor
    // (1 channel: 10 ms at 2 → 5; 2 channels: 10 ms at 1), the median 7.5 ms per 64 MiB, 30 ms at factor 4 now.
    expect(d.calibration(1)!.setupMsPerRamByte * 64 * MiB).toBeCloseTo(7.5, 9);
    await d.create({ name: 'v', memory: 64 * MiB, vcpus: 1 });
    expect(await d.capabilities.migrationModel!.estimateHints('v')).toMatchObject({ copyRateBytesPerSec: 50e6, fixedMs: expect.closeTo(30, 9) });
    expect(d.calibration(2)?.samples.map((x) => x.loadFactor)).toEqual([undefined, undefined, undefined]);
    expect(d.calibration(2)).toMatchObject({ copyRateBytesPerSec: 100e6, fixedMs: 0 });
    expect(d.calibration(2)!.setupMsPerRamByte * 64 * MiB).toBeCloseTo(7.5, 9);
  });

  it('recordEndToEnd corrects the newest sample of the VM, whatever its channel count (a VM moved with 1 channel before and with 2 now)', () => {
    const root = tempRoot();
    writeFileSync(join(root, 'migration-model.json'), JSON.stringify({ version: 1, byChannels: { '1': [{ ...sample('v', 1, 10), at: 1 }], '2': [{ ...sample('v', 1, 10), at: 2 }] } }));
    const d = driver(root);
    expect(d.capabilities.migrationModel!.recordEndToEnd('v', 410)).toBe(true);
    expect(d.calibration(2)?.samples[0]?.sendMs).toBe(400);
    expect(d.calibration(1)?.samples[0]?.sendMs).toBe(100);
  });

  it('keeps only the last samples of a long list', () => {
    const root = tempRoot();
    const list = Array.from({ length: CALIBRATION_SAMPLES + 3 }, (_, i) => sample(`v${i}`, (i + 1) * 1e6, i));
    writeFileSync(join(root, 'migration-model.json'), JSON.stringify({ version: 1, byChannels: { '1': list } }));
    expect(driver(root).calibration(1)?.samples.map((s) => s.vm)).toEqual(list.slice(-CALIBRATION_SAMPLES).map((s) => s['vm']));
  });
});

describe.skipIf(!run)('qemu migration model with real QEMU (TCG)', () => {
  it('counts a guest\'s non-zero pages; a migration out calibrates the stream, persisted for the next driver on that root', async () => {
    const root = qemus.root();
    const srcRoot = join(root, 'src');
    mkdirSync(srcRoot, { recursive: true });
    const source = driver(srcRoot);
    const target = driver(join(root, 'dst'));
    // 96 MiB of RAM, the guest writes its first 48 MiB once: about half non-zero.
    const vm: QemuVmSpec = { name: 'half', memory: 96 * MiB, vcpus: 1, testGuest: { passes: 1, delayLoops: 0, limitMiB: 48 } };
    await source.create(vm);
    await source.start('half');
    await heartbeat(source.stateDir('half'), 2);
    const nonZero = await source.measureNonZeroBytes('half');
    expect(nonZero).toBeGreaterThan(40 * MiB);
    expect(nonZero).toBeLessThan(56 * MiB);
    const before = await source.capabilities.migrationModel!.estimateHints('half', { channels: 1 });
    expect(before.nonZeroBytes).toBe(nonZero);
    expect(before.copyRateBytesPerSec).toBeUndefined();

    const { endpoint } = await target.prepareIncoming(vm);
    await source.migrateOut('half', { endpoint, channels: 1 });
    await target.commitIncoming('half');
    const c = source.calibration(1);
    expect(c?.samples).toHaveLength(1);
    expect(c?.samples[0]?.vm).toBe('half');
    // The rate counts non-zero bytes only: the zero half is no part of sentBytes.
    expect(c!.samples[0]!.sentBytes).toBeGreaterThan(40 * MiB);
    expect(c!.samples[0]!.sentBytes).toBeLessThan(60 * MiB);
    expect(c!.copyRateBytesPerSec).toBeGreaterThan(0);
    expect(source.calibration(2)).toBeUndefined();

    // The caller's end-to-end time replaces the source's clock in that sample (and is persisted).
    const model = source.capabilities.migrationModel!;
    const setupMs = c!.samples[0]!.fixedMs;
    expect(model.recordEndToEnd('half', setupMs + 1000)).toBe(true);
    const c2 = source.calibration(1)!;
    expect(c2.samples[0]!.sendMs).toBe(1000);
    expect(c2.copyRateBytesPerSec).toBeCloseTo(c!.samples[0]!.sentBytes, 3);
    expect(model.recordEndToEnd('never-migrated', 500)).toBe(false);
    for (const bad of [0, -1, Number.NaN, Number.POSITIVE_INFINITY]) {
      expect(() => model.recordEndToEnd('half', bad)).toThrow(expect.objectContaining({ code: ErrorCodes.EFFECTOR_ARGS_INVALID }));
    }
    expect(source.calibration(1)).toEqual(c2);

    // Written on the next turn (once for the migration's calibrate + recordEndToEnd, off its path).
    await new Promise((r) => setTimeout(r, 20));
    const saved = JSON.parse(readFileSync(join(srcRoot, 'migration-model.json'), 'utf8')) as { byChannels: Record<string, unknown[]> };
    expect(saved.byChannels['1']).toHaveLength(1);
    expect(driver(srcRoot).calibration(1)).toEqual(c2);
  }, 120_000);
});
