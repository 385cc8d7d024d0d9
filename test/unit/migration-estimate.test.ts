import { describe, expect, it } from 'vitest';
import { ConfigError, ErrorCodes, isEmbotError } from '../../core/errors.ts';
import {
  AUTO_CONVERGE,
  PRECOPY_DEFAULTS,
  VM_BURST_FACTOR,
  estimateError,
  estimateMigration,
  summarizeAccuracy,
  withDriverHints,
  type EstimateInput,
} from '../../core/mobility/migration-estimate.ts';

const MiB = 1024 * 1024;

const base: EstimateInput = {
  memoryBytes: 64 * MiB,
  pageSize: 4096,
  dirtyRateBytesPerSec: 4e6,
  bandwidthBytesPerSec: 100e6,
  downtimeLimitMs: PRECOPY_DEFAULTS.downtimeLimitMs,
  maxRounds: PRECOPY_DEFAULTS.maxRounds,
  autoConverge: false,
};

function expectInvalid(f: () => unknown, field: string): void {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(ConfigError);
    expect(isEmbotError(e, ErrorCodes.PLAN_INPUT_INVALID)).toBe(true);
    expect((e as Error).message).toContain(field);
    return;
  }
  throw new Error(`expected ${field} to be rejected`);
}

describe('estimateMigration: limiting cases', () => {
  it('a VM that dirties nothing takes one round and an empty stop-and-copy (two rounds in all)', () => {
    const e = estimateMigration({ ...base, memoryBytes: 100e6, dirtyRateBytesPerSec: 0 });
    expect(e).toEqual({ totalMs: 1000, rounds: 2, downtimeMs: 0, bytes: 100e6, converges: true, throttleSteps: 0 });
  });

  it('matches a hand-computed small case round by round', () => {
    // 1000 pages of 4096 B sent at 1000 pages/s; the VM writes 100 random pages/s.
    const pages = 1000;
    const page = 4096;
    const distinct = (writes: number): number => pages * (1 - (1 - 1 / pages) ** writes); // expected distinct pages
    const i: EstimateInput = {
      memoryBytes: pages * page,
      pageSize: page,
      dirtyRateBytesPerSec: 100 * page,
      bandwidthBytesPerSec: 1000 * page,
      downtimeLimitMs: 50,
      maxRounds: 30,
      autoConverge: false,
    };
    // round 0: 1000 ms, 100 writes → ≈95.2 dirty pages → 95.2 ms > 50 ms: another round.
    const r1 = distinct(100);
    expect(r1).toBeCloseTo(95.208, 3);
    // round 1: 95.2 ms, 9.52 writes → ≈9.480 pages → 9.48 ms ≤ 50 ms: stop-and-copy (round 2).
    const r2 = distinct(r1 / 10);
    expect(r2).toBeCloseTo(9.4803, 3);
    const e = estimateMigration(i);
    expect(e.rounds).toBe(3);
    expect(e.converges).toBe(true);
    expect(e.throttleSteps).toBe(0);
    expect(e.downtimeMs).toBeCloseTo(r2, 9); // one page per ms
    expect(e.totalMs).toBeCloseTo(1000 + r1 + r2, 9);
    expect(e.bytes).toBeCloseTo((pages + r1 + r2) * page, 3);
  });

  it('a VM dirtying faster than the link, without auto-converge, runs out of rounds and does not converge', () => {
    const e = estimateMigration({ ...base, dirtyRateBytesPerSec: 2 * base.bandwidthBytesPerSec });
    expect(e.rounds).toBe(base.maxRounds);
    expect(e.converges).toBe(false);
    expect(e.throttleSteps).toBe(0);
    expect(e.downtimeMs).toBeGreaterThan(base.downtimeLimitMs);
    // Repeated writes to a page cost nothing: no round sends more than all of memory.
    expect(e.bytes).toBeLessThanOrEqual(base.memoryBytes * (base.maxRounds + 1));
  });

  it('with auto-converge the same VM converges, throttled one step per round that dirties faster than it sends', () => {
    const e = estimateMigration({ ...base, dirtyRateBytesPerSec: 2 * base.bandwidthBytesPerSec, autoConverge: true });
    expect(e.converges).toBe(true);
    expect(e.downtimeMs).toBeLessThanOrEqual(base.downtimeLimitMs);
    expect(e.rounds).toBeLessThan(base.maxRounds);
    // 2.0 → 1.6 → 1.2 → 0.8 × bandwidth: three steps bring the dirty rate under the send rate.
    expect(e.throttleSteps).toBe(3);
  });

  it('auto-converge changes nothing for a VM that converges on its own', () => {
    expect(estimateMigration({ ...base, autoConverge: true })).toEqual(estimateMigration(base));
  });

  it('maxRounds 2 forces stop-and-copy right after the full round', () => {
    const e = estimateMigration({ ...base, dirtyRateBytesPerSec: 80e6, maxRounds: 2 });
    expect(e.rounds).toBe(2);
    expect(e.converges).toBe(false);
    expect(e.downtimeMs).toBeGreaterThan(base.downtimeLimitMs);
  });

  it('maxRounds 1 is a plain stop-and-copy of all memory', () => {
    const e = estimateMigration({ ...base, memoryBytes: 100e6, dirtyRateBytesPerSec: 80e6, maxRounds: 1 });
    expect(e).toEqual({ totalMs: 1000, rounds: 1, downtimeMs: 1000, bytes: 100e6, converges: false, throttleSteps: 0 });
  });

  it('a one-page VM is fully dirty after any write', () => {
    const e = estimateMigration({ ...base, memoryBytes: 4096, dirtyRateBytesPerSec: 1e6, downtimeLimitMs: 0.001, maxRounds: 3 });
    expect(e.rounds).toBe(3);
    expect(e.bytes).toBe(3 * 4096);
  });

  it('is deterministic', () => {
    const i = { ...base, dirtyRateBytesPerSec: 150e6, autoConverge: true, vmCpuLoad: 0.7, copyCpuFactor: 0.8, perRoundOverheadMs: 3 };
    expect(estimateMigration(i)).toEqual(estimateMigration(i));
  });
});

describe('estimateMigration: monotonicity', () => {
  const sizes = [1, 16, 64, 256].map((m) => m * MiB);
  const dirty = [0, 1e6, 10e6, 50e6, 90e6, 100e6, 150e6, 400e6];
  const bandwidths = [10e6, 50e6, 100e6, 400e6];

  it('more memory never takes less time', () => {
    for (const d of dirty) {
      const t = sizes.map((m) => estimateMigration({ ...base, memoryBytes: m, dirtyRateBytesPerSec: d }).totalMs);
      for (let k = 1; k < t.length; k++) expect(t[k]).toBeGreaterThanOrEqual(t[k - 1]);
    }
  });

  it('a higher dirty rate never takes less time (without auto-converge)', () => {
    for (const m of sizes) {
      const t = dirty.map((d) => estimateMigration({ ...base, memoryBytes: m, dirtyRateBytesPerSec: d }).totalMs);
      for (let k = 1; k < t.length; k++) expect(t[k]).toBeGreaterThanOrEqual(t[k - 1]);
    }
  });

  it('more bandwidth never takes more time, with or without auto-converge', () => {
    for (const autoConverge of [false, true]) {
      for (const d of dirty) {
        const t = bandwidths.map((b) => estimateMigration({ ...base, dirtyRateBytesPerSec: d, bandwidthBytesPerSec: b, autoConverge }).totalMs);
        for (let k = 1; k < t.length; k++) expect(t[k]).toBeLessThanOrEqual(t[k - 1]);
      }
    }
  });
});

describe('estimateMigration: CPU and overhead corrections', () => {
  it('copyCpuFactor scales the usable bandwidth', () => {
    const i = { ...base, dirtyRateBytesPerSec: 20e6 };
    expect(estimateMigration({ ...i, copyCpuFactor: 0.5 })).toEqual(estimateMigration({ ...i, bandwidthBytesPerSec: 50e6 }));
    expect(estimateMigration({ ...i, copyCpuFactor: 1 })).toEqual(estimateMigration(i));
  });

  it('a busy VM is planned with a burst-corrected dirty rate', () => {
    const i = { ...base, dirtyRateBytesPerSec: 20e6 };
    expect(estimateMigration({ ...i, vmCpuLoad: 1 })).toEqual(estimateMigration({ ...i, dirtyRateBytesPerSec: 20e6 * (1 + VM_BURST_FACTOR) }));
    expect(estimateMigration({ ...i, vmCpuLoad: 0 })).toEqual(estimateMigration(i));
    expect(estimateMigration({ ...i, vmCpuLoad: 0.8 }).totalMs).toBeGreaterThan(estimateMigration(i).totalMs);
  });

  it('per-round overhead is paid by every round and by the downtime', () => {
    const e = estimateMigration({ ...base, memoryBytes: 100e6, dirtyRateBytesPerSec: 0, perRoundOverheadMs: 7 });
    expect(e.rounds).toBe(2);
    expect(e.downtimeMs).toBe(7);
    expect(e.totalMs).toBe(1000 + 7 + 7);
  });
});

describe('auto-converge rule (as the sender runs it)', () => {
  it('throttles at most five steps, to 99 %: a VM dirtying 1000× the link never converges', () => {
    const e = estimateMigration({ ...base, dirtyRateBytesPerSec: 1000 * base.bandwidthBytesPerSec, autoConverge: true });
    expect(e.throttleSteps).toBe(5);
    expect(e.rounds).toBe(base.maxRounds);
    expect(e.converges).toBe(false);
  });

  it('throttles a VM dirtying below the send rate whose remainder stops shrinking', () => {
    // 95 % of the link: every round shrinks the remainder, but by less than 10 % once it is small.
    const i = { ...base, memoryBytes: 1024 * MiB, dirtyRateBytesPerSec: 95e6 };
    const free = estimateMigration(i);
    const throttled = estimateMigration({ ...i, autoConverge: true });
    expect(free.throttleSteps).toBe(0);
    expect(throttled.throttleSteps).toBe(1);
    expect(throttled.converges).toBe(true);
    expect(throttled.rounds).toBeLessThan(free.rounds);
    expect(throttled.totalMs).toBeLessThan(free.totalMs);
  });

  it('uses the same constants as the pre-copy sender', async () => {
    const sender = await import('../../effectors/hypervisor/sim/dataplane/precopy-sender.ts');
    expect(AUTO_CONVERGE.step).toBe(sender.THROTTLE_STEP);
    expect(AUTO_CONVERGE.max).toBe(sender.THROTTLE_MAX);
    expect(PRECOPY_DEFAULTS.downtimeLimitMs).toBe(sender.DEFAULT_DOWNTIME_LIMIT_MS);
    expect(PRECOPY_DEFAULTS.maxRounds).toBe(sender.DEFAULT_MAX_ROUNDS);
  });
});

describe('estimateMigration: bad input', () => {
  const cases: readonly [string, Partial<Record<keyof EstimateInput, unknown>>][] = [
    ['memoryBytes', { memoryBytes: -1 }],
    ['memoryBytes', { memoryBytes: 0 }],
    ['memoryBytes', { memoryBytes: Number.NaN }],
    ['pageSize', { pageSize: 0 }],
    ['pageSize', { pageSize: 4096.5 }],
    ['dirtyRateBytesPerSec', { dirtyRateBytesPerSec: -5 }],
    ['dirtyRateBytesPerSec', { dirtyRateBytesPerSec: Number.POSITIVE_INFINITY }],
    ['bandwidthBytesPerSec', { bandwidthBytesPerSec: 0 }],
    ['bandwidthBytesPerSec', { bandwidthBytesPerSec: Number.NaN }],
    ['downtimeLimitMs', { downtimeLimitMs: 0 }],
    ['maxRounds', { maxRounds: 0 }],
    ['maxRounds', { maxRounds: 2.5 }],
    ['autoConverge', { autoConverge: 'yes' }],
    ['vmCpuLoad', { vmCpuLoad: 1.5 }],
    ['copyCpuFactor', { copyCpuFactor: 0 }],
    ['copyCpuFactor', { copyCpuFactor: 2 }],
    ['perRoundOverheadMs', { perRoundOverheadMs: -1 }],
    ['zeroPageShare', { zeroPageShare: -0.1 }],
    ['zeroPageShare', { zeroPageShare: 1.5 }],
    ['zeroPageShare', { zeroPageShare: Number.NaN }],
    ['fixedMs', { fixedMs: -1 }],
    ['fixedMs', { fixedMs: Number.POSITIVE_INFINITY }],
    ['zeroPageCost', { zeroPageCost: -0.5 }],
    ['zeroPageCost', { zeroPageCost: 10.5 }],
  ];
  for (const [field, patch] of cases) {
    it(`rejects ${field} = ${String(Object.values(patch)[0])} with PLAN_INPUT_INVALID`, () => {
      expectInvalid(() => estimateMigration({ ...base, ...patch } as EstimateInput), field);
    });
  }
});

describe('estimate accuracy helpers', () => {
  it('measures the relative error against the actual time', () => {
    expect(estimateError(1150, 1000)).toBeCloseTo(0.15, 12);
    expect(estimateError(850, 1000)).toBeCloseTo(0.15, 12);
    expect(estimateError(1000, 1000)).toBe(0);
  });

  it('summarises a grid with its mean, worst error and worst sample', () => {
    const worst = { estimateMs: 2600, actualMs: 2000, label: '256 MiB @ 40 MB/s' };
    const s = summarizeAccuracy([{ estimateMs: 900, actualMs: 1000 }, worst, { estimateMs: 1000, actualMs: 1000 }]);
    expect(s.count).toBe(3);
    expect(s.maxError).toBeCloseTo(0.3, 12);
    expect(s.meanError).toBeCloseTo((0.1 + 0.3 + 0) / 3, 12);
    expect(s.worst).toBe(worst);
    expect(summarizeAccuracy([])).toEqual({ count: 0, meanError: 0, maxError: 0, worst: undefined });
  });

  it('rejects an actual time of zero or a NaN estimate', () => {
    expectInvalid(() => estimateError(100, 0), 'actualMs');
    expectInvalid(() => estimateError(Number.NaN, 100), 'estimateMs');
    expectInvalid(() => summarizeAccuracy([{ estimateMs: 1, actualMs: -3 }]), 'actualMs');
  });
});

describe('estimateMigration: a stream that skips zero pages (qemu)', () => {
  it('round 0 sends only the non-zero share; the bytes say so', () => {
    const e = estimateMigration({ ...base, memoryBytes: 100e6, dirtyRateBytesPerSec: 0, zeroPageShare: 0.75 });
    expect(e).toEqual({ totalMs: 250, rounds: 2, downtimeMs: 0, bytes: 25e6, converges: true, throttleSteps: 0 });
  });

  it('an all-zero VM costs only its fixed cost', () => {
    const e = estimateMigration({ ...base, dirtyRateBytesPerSec: 0, zeroPageShare: 1, fixedMs: 40 });
    expect(e.totalMs).toBe(40);
    expect(e.bytes).toBe(0);
  });

  it('pages dirtied during round 0 are sent in full even when memory was mostly zero', () => {
    const sparse = estimateMigration({ ...base, memoryBytes: 64 * MiB, dirtyRateBytesPerSec: 20e6, zeroPageShare: 0.5 });
    const dense = estimateMigration({ ...base, memoryBytes: 64 * MiB, dirtyRateBytesPerSec: 20e6 });
    expect(sparse.totalMs).toBeLessThan(dense.totalMs);
    expect(sparse.bytes).toBeGreaterThan(32 * MiB); // round 0's half plus what was dirtied meanwhile
  });

  it('zeroPageCost charges skipped zero pages a share of a full page\'s time, in round 0 only and in no bytes', () => {
    const e = estimateMigration({ ...base, memoryBytes: 100e6, dirtyRateBytesPerSec: 0, zeroPageShare: 0.5, zeroPageCost: 0.2 });
    expect(e.totalMs).toBeCloseTo(500 + 100, 9); // 50 MB sent at 100 MB/s, 50 MB skipped at a fifth of that time
    expect(e.bytes).toBe(50e6);
    expect(e.downtimeMs).toBe(0);
  });

  it('fixedMs adds to the total once and is no downtime', () => {
    const without = estimateMigration(base);
    const withFixed = estimateMigration({ ...base, fixedMs: 120 });
    expect(withFixed.totalMs).toBeCloseTo(without.totalMs + 120, 9);
    expect(withFixed.downtimeMs).toBe(without.downtimeMs);
    expect(withFixed.rounds).toBe(without.rounds);
  });

  it('zeroPageShare 0 and fixedMs 0 change nothing (the sim estimates as before)', () => {
    expect(estimateMigration({ ...base, zeroPageShare: 0, fixedMs: 0 })).toEqual(estimateMigration(base));
  });
});

describe('withDriverHints', () => {
  const input: EstimateInput = { ...base, memoryBytes: 400 * MiB, copyCpuFactor: 0.5, bandwidthBytesPerSec: 1e9 };

  it("the driver's copy rate replaces the probed bandwidth and the CPU factor; non-zero bytes become the zero share", () => {
    const i = withDriverHints(input, { nonZeroBytes: 100 * MiB, copyRateBytesPerSec: 200e6, fixedMs: 50, source: 'test' });
    expect(i.bandwidthBytesPerSec).toBe(200e6);
    expect(i.copyCpuFactor).toBeUndefined();
    expect(i.zeroPageShare).toBe(0.75);
    expect(i.fixedMs).toBe(50);
    expect(estimateMigration({ ...i, dirtyRateBytesPerSec: 0 }).totalMs).toBeCloseTo(50 + ((100 * MiB) / 200e6) * 1000, 9);
  });

  it('hints left out leave the input as it was', () => {
    expect(withDriverHints(input, { source: 'nothing known' })).toEqual(input);
    expect(withDriverHints(input, { nonZeroBytes: 400 * MiB, source: 'dump' })).toEqual({ ...input, zeroPageShare: 0 });
  });

  const badHints: readonly [string, Record<string, number>][] = [
    ['nonZeroBytes', { nonZeroBytes: -1 }],
    ['nonZeroBytes', { nonZeroBytes: 401 * MiB }],
    ['nonZeroBytes', { nonZeroBytes: Number.NaN }],
    ['copyRateBytesPerSec', { copyRateBytesPerSec: 0 }],
    ['copyRateBytesPerSec', { copyRateBytesPerSec: Number.POSITIVE_INFINITY }],
    ['fixedMs', { fixedMs: -3 }],
    ['zeroPageCost', { zeroPageCost: 11 }],
  ];
  for (const [field, patch] of badHints) {
    it(`rejects ${field} = ${String(Object.values(patch)[0])} with PLAN_INPUT_INVALID`, () => {
      expectInvalid(() => withDriverHints(input, { ...patch, source: 'bad' }), field);
    });
  }
});
