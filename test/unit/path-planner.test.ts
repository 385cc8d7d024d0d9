import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ConfigError, EffectorError, ErrorCodes, isEmbotError } from '../../core/errors.ts';
import { MAX_ZERO_PAGE_COST, estimateMigration, withDriverHints } from '../../core/mobility/migration-estimate.ts';
import { QemuDriver, type StreamCalibration } from '../../effectors/hypervisor/qemu/qemu-driver.ts';
import { fitStream, leastSquares, spansSizes } from '../../effectors/hypervisor/qemu/stream-fit.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import {
  formatPlan,
  planPaths,
  resolveThreshold,
  type PathCandidate,
  type PathProbe,
  type Plan,
  type PlanInput,
  type TargetCpuAnswer,
} from '../../core/mobility/path-planner.ts';

const MB = 1e6;

function path(n: number, extra: Partial<PathCandidate> = {}): PathCandidate {
  return { name: `p${n}`, url: `ws://127.0.0.${n}:7411/data`, localAddress: `127.0.0.${n}`, ...extra };
}

interface Fake {
  readonly input: PlanInput;
  readonly probed: string[];
  readonly released: string[];
  readonly cpuAsked: number[];
}

/**
 * A planner input with a 100 MB VM that dirties nothing, so the estimate is exactly
 * size / aggregate bandwidth: with 25 MB/s paths 4000, 2000, 1333, 1000 ms for 1..4 paths.
 */
function fake(
  opts: {
    probes?: Record<string, PathProbe | Error | unknown>;
    cpu?: (paths: number) => TargetCpuAnswer | Promise<TargetCpuAnswer>;
    releaseFails?: boolean;
    candidates?: readonly PathCandidate[];
    primary?: PathCandidate;
  } & Partial<Omit<PlanInput, 'probe' | 'targetCpu' | 'release' | 'candidates' | 'primary'>> = {},
): Fake {
  const probed: string[] = [];
  const released: string[] = [];
  const cpuAsked: number[] = [];
  const { probes = {}, cpu, releaseFails, candidates, primary, ...rest } = opts;
  const input: PlanInput = {
    vm: { memoryBytes: 100 * MB, pageSize: 4096, dirtyRateBytesPerSec: 0 },
    thresholdMs: 1500,
    addPathThresholdMs: 500,
    maxPaths: 4,
    downtimeLimitMs: 300,
    maxRounds: 30,
    autoConverge: true,
    primary: primary ?? path(1),
    candidates: candidates ?? [path(2), path(3), path(4), path(5)],
    async probe(p) {
      probed.push(p.name);
      const r = probes[p.name] ?? { setupMs: 10, bandwidthBytesPerSec: 25 * MB };
      if (r instanceof Error) throw r;
      return r as PathProbe;
    },
    async targetCpu(n) {
      cpuAsked.push(n);
      return cpu ? cpu(n) : { canReassemble: true, cpuFree: 0.5 };
    },
    async release(p) {
      released.push(p.name);
      if (releaseFails) throw new Error('socket already gone');
    },
    ...rest,
  };
  return { input, probed, released, cpuAsked };
}

/** Every path probed and not in the plan was released; no path in the plan was. */
function expectUnusedReleased(f: Fake, plan: Plan): void {
  const used = new Set(plan.paths.map((p) => p.name));
  const unusedProbed = [...plan.probes.keys()].filter((n) => !used.has(n));
  expect([...f.released].sort()).toEqual(unusedProbed.sort());
}

function actions(plan: Plan): string[] {
  return plan.decisions.map((d) => `${d.action}${d.path ? ` ${d.path}` : ''}`);
}

async function expectRejects(p: Promise<unknown>, code: string, text: string, cls: typeof ConfigError | typeof EffectorError): Promise<void> {
  const e = await p.then(
    () => undefined,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(cls);
  expect(isEmbotError(e) && e.code).toBe(code);
  expect((e as Error).message).toContain(text);
}

describe('planPaths: adding paths (seed 000)', () => {
  it('adds paths until the estimate fits the threshold, then stops probing', async () => {
    const f = fake();
    const plan = await planPaths(f.input);
    expect(plan.paths.map((p) => p.name)).toEqual(['p1', 'p2', 'p3']);
    expect(f.probed).toEqual(['p1', 'p2', 'p3']); // p4 is never set up
    expect(f.cpuAsked).toEqual([2, 3]);
    expect(plan.bandwidthBytesPerSec).toBe(75 * MB);
    expect(plan.estimate.totalMs).toBeCloseTo(1333.33, 1);
    expect(plan.withinThreshold).toBe(true);
    expect(actions(plan)).toEqual(['primary p1', 'add-path p2', 'add-path p3', 'done']);
    const [primary, add2, add3, done] = plan.decisions;
    expect(primary.reason).toBe('primary p1: setup 10 ms, 25 MB/s; estimate 4000 ms');
    expect(add2).toMatchObject({ step: 2, estimateMs: 4000, paths: 1 });
    expect(add2.reason).toBe('estimate 4000 ms > threshold 1500 ms with 1 path: adding p2 (setup 10 ms, 25 MB/s)');
    expect(add3).toMatchObject({ estimateMs: 2000, paths: 2 });
    expect(done.reason).toBe('estimate 1333 ms ≤ threshold 1500 ms with 3 paths');
    expect(plan.decisions.map((d) => d.step)).toEqual([1, 2, 3, 4]);
    expect(f.released).toEqual([]);
  });

  it('the plan estimate is the estimator run on the aggregate bandwidth', async () => {
    const f = fake({ vm: { memoryBytes: 256 * MB, pageSize: 4096, dirtyRateBytesPerSec: 20 * MB, cpuLoad: 0.5 }, thresholdMs: 4000, perRoundOverheadMs: 2 });
    const plan = await planPaths(f.input);
    expect(plan.estimate).toEqual(
      estimateMigration({
        memoryBytes: 256 * MB,
        pageSize: 4096,
        dirtyRateBytesPerSec: 20 * MB,
        vmCpuLoad: 0.5,
        perRoundOverheadMs: 2,
        bandwidthBytesPerSec: plan.bandwidthBytesPerSec,
        downtimeLimitMs: 300,
        maxRounds: 30,
        autoConverge: true,
      }),
    );
    expect(plan.withinThreshold).toBe(plan.estimate.totalMs <= 4000);
  });

  it('uses the primary alone when it already meets the threshold (equal counts as meeting it)', async () => {
    const f = fake({ thresholdMs: 4000 });
    const plan = await planPaths(f.input);
    expect(plan.paths.map((p) => p.name)).toEqual(['p1']);
    expect(f.probed).toEqual(['p1']);
    expect(f.cpuAsked).toEqual([]);
    expect(actions(plan)).toEqual(['primary p1', 'done']);
    expect(plan.decisions[1].reason).toBe('estimate 4000 ms ≤ threshold 4000 ms with 1 path');
    expect(plan.withinThreshold).toBe(true);
  });

  it('stops at maxPaths and says so', async () => {
    const f = fake({ thresholdMs: 500, maxPaths: 2 });
    const plan = await planPaths(f.input);
    expect(plan.paths.map((p) => p.name)).toEqual(['p1', 'p2']);
    expect(f.probed).toEqual(['p1', 'p2']);
    expect(plan.withinThreshold).toBe(false);
    expect(actions(plan)).toEqual(['primary p1', 'add-path p2', 'done']);
    expect(plan.decisions[2].reason).toBe('estimate 2000 ms > threshold 500 ms with 2 paths: stopping at maxPaths 2');
  });

  it('maxPaths 1 never adds a path', async () => {
    const f = fake({ maxPaths: 1 });
    const plan = await planPaths(f.input);
    expect(plan.paths.map((p) => p.name)).toEqual(['p1']);
    expect(f.probed).toEqual(['p1']);
    expect(plan.decisions.at(-1)?.reason).toContain('stopping at maxPaths 1');
  });

  it('stops when the candidates run out', async () => {
    const f = fake({ thresholdMs: 100, candidates: [path(2)] });
    const plan = await planPaths(f.input);
    expect(plan.paths.map((p) => p.name)).toEqual(['p1', 'p2']);
    expect(plan.withinThreshold).toBe(false);
    expect(plan.decisions.at(-1)?.reason).toBe('estimate 2000 ms > threshold 100 ms with 2 paths: no more candidate paths');
  });

  it('skips a path that is slow to set up, releases it and tries the next', async () => {
    const f = fake({ probes: { p2: { setupMs: 900, bandwidthBytesPerSec: 25 * MB } } });
    const plan = await planPaths(f.input);
    expect(plan.paths.map((p) => p.name)).toEqual(['p1', 'p3', 'p4']);
    expect(actions(plan)).toEqual(['primary p1', 'skip-path p2', 'add-path p3', 'add-path p4', 'done']);
    expect(plan.decisions[1].reason).toBe('p2 not added: setup 900 ms > 500 ms');
    expect(f.released).toEqual(['p2']);
    expect(f.cpuAsked).toEqual([2, 3]); // the skipped path never counted against the target
    expect(plan.probes.get('p2')).toEqual({ setupMs: 900, bandwidthBytesPerSec: 25 * MB });
    expectUnusedReleased(f, plan);
  });

  it('a setup time equal to the second threshold is still quick enough', async () => {
    const f = fake({ probes: { p2: { setupMs: 500, bandwidthBytesPerSec: 25 * MB } } });
    const plan = await planPaths(f.input);
    expect(plan.paths.map((p) => p.name)).toContain('p2');
  });

  it('stops adding when the target has no CPU to reassemble one more path', async () => {
    const f = fake({ thresholdMs: 500, cpu: (n) => (n >= 3 ? { canReassemble: false, cpuFree: 0.05, reason: 'cpu 95% busy' } : { canReassemble: true, cpuFree: 0.5 }) });
    const plan = await planPaths(f.input);
    expect(plan.paths.map((p) => p.name)).toEqual(['p1', 'p2']);
    expect(f.probed).toEqual(['p1', 'p2', 'p3']); // p4 is not tried: the target is the limit
    expect(f.released).toEqual(['p3']);
    expect(plan.decisions.at(-1)).toMatchObject({ action: 'done', path: 'p3', paths: 2 });
    expect(plan.decisions.at(-1)?.reason).toBe('estimate 2000 ms > threshold 500 ms with 2 paths: target has no CPU for 3 paths: cpu 95% busy');
    expect(plan.withinThreshold).toBe(false);
    expectUnusedReleased(f, plan);
  });

  it('a target that fails to answer is treated as having no CPU', async () => {
    const f = fake({
      cpu: () => {
        throw new Error('peer timed out');
      },
    });
    const plan = await planPaths(f.input);
    expect(plan.paths.map((p) => p.name)).toEqual(['p1']);
    expect(plan.decisions.at(-1)?.reason).toContain('target has no CPU for 2 paths: target CPU query failed: peer timed out');
    expect(f.released).toEqual(['p2']);
  });

  it('a nonsense target answer is treated as having no CPU', async () => {
    const f = fake({ cpu: () => ({ canReassemble: 'sure' }) as unknown as TargetCpuAnswer });
    const plan = await planPaths(f.input);
    expect(plan.paths).toHaveLength(1);
    expect(plan.decisions.at(-1)?.reason).toContain('target gave no usable answer');
  });

  it('skips a candidate whose setup fails, without releasing what was never set up', async () => {
    const f = fake({ probes: { p2: new Error('ECONNREFUSED 127.0.0.2:7411') } });
    const plan = await planPaths(f.input);
    expect(plan.paths.map((p) => p.name)).toEqual(['p1', 'p3', 'p4']);
    expect(plan.decisions[1]).toMatchObject({ action: 'skip-path', path: 'p2' });
    expect(plan.decisions[1].reason).toBe('p2 not added: setup failed: ECONNREFUSED 127.0.0.2:7411');
    expect(plan.probes.has('p2')).toBe(false);
    expect(f.released).toEqual([]);
  });

  it('skips and releases a candidate whose probe measured nonsense', async () => {
    const f = fake({ probes: { p2: { setupMs: 5, bandwidthBytesPerSec: Number.NaN }, p3: { setupMs: -1, bandwidthBytesPerSec: 25 * MB } } });
    const plan = await planPaths(f.input);
    expect(plan.paths.map((p) => p.name)).toEqual(['p1', 'p4', 'p5']);
    expect(plan.decisions[1].reason).toBe('p2 not added: unusable probe: bandwidth is NaN');
    expect(plan.decisions[2].reason).toBe('p3 not added: unusable probe: setupMs is -1');
    expectUnusedReleased(f, plan);
  });

  it('counts each path at most at its cap', async () => {
    const f = fake({
      primary: path(1, { capBytesPerSec: 25 * MB }),
      candidates: [path(2, { capBytesPerSec: 25 * MB }), path(3)],
      probes: { p1: { setupMs: 1, bandwidthBytesPerSec: 400 * MB }, p2: { setupMs: 1, bandwidthBytesPerSec: 400 * MB } },
    });
    const plan = await planPaths(f.input);
    expect(plan.paths.map((p) => p.name)).toEqual(['p1', 'p2', 'p3']);
    expect(plan.bandwidthBytesPerSec).toBe(75 * MB);
    expect(plan.probes.get('p1')?.bandwidthBytesPerSec).toBe(400 * MB); // the raw probe is kept
    expect(plan.decisions[0].reason).toContain('25 MB/s');
  });

  it('a failing release is reported in the decision, and the plan still stands', async () => {
    const f = fake({ probes: { p2: { setupMs: 900, bandwidthBytesPerSec: 25 * MB } }, releaseFails: true });
    const plan = await planPaths(f.input);
    expect(plan.decisions[1].reason).toBe('p2 not added: setup 900 ms > 500 ms (release failed: socket already gone)');
    expect(plan.paths.map((p) => p.name)).toEqual(['p1', 'p3', 'p4']);
  });
});

describe('planPaths: a driver that streams on its own socket (qemu) gives its calibrated figures', () => {
  const setUpOnly = (f: Fake, setUp: string[]): PlanInput => ({
    ...f.input,
    async setUp(p) {
      setUp.push(p.name);
      return { setupMs: 3 };
    },
  });

  it('a calibrated copy rate replaces the probe: the primary is only set up, the estimate uses the rate and the non-zero share', async () => {
    const f = fake(); // 100 MB; a 25 MB/s probe would say 4 s, over the 1500 ms threshold
    const setUp: string[] = [];
    const asked: number[] = [];
    const hints = { copyRateBytesPerSec: 200 * MB, nonZeroBytes: 50 * MB, fixedMs: 40, source: 'qemu: calibrated' };
    const plan = await planPaths({
      ...setUpOnly(f, setUp),
      async driverHints(n) {
        asked.push(n);
        return hints;
      },
    });
    expect(f.probed).toEqual([]);
    expect(setUp).toEqual(['p1']);
    expect(asked).toEqual([1]);
    expect(plan.paths.map((p) => p.name)).toEqual(['p1']);
    const base = { memoryBytes: 100 * MB, pageSize: 4096, dirtyRateBytesPerSec: 0, downtimeLimitMs: 300, maxRounds: 30, autoConverge: true };
    expect(plan.estimate.totalMs).toBe(estimateMigration(withDriverHints({ ...base, bandwidthBytesPerSec: plan.bandwidthBytesPerSec }, hints)).totalMs);
    expect(plan.estimate.totalMs).toBeLessThan(1500);
    expect(plan.decisions[0]!.reason).toMatch(/not measured \(the driver streams on its own at 200 MB\/s, as calibrated\).*\(qemu: calibrated\)/);
  });

  it('hints without a copy rate (not calibrated yet) leave the probe in charge', async () => {
    const f = fake();
    const setUp: string[] = [];
    const plan = await planPaths({ ...setUpOnly(f, setUp), driverHints: async () => ({ nonZeroBytes: 100 * MB, source: 'qemu: no migration out yet' }) });
    expect(setUp).toEqual([]);
    expect(f.probed[0]).toBe('p1');
    expect(plan.paths.length).toBeGreaterThan(1);
  });

  it('a hint that throws or is out of range is no hint: the plan stands on the probe alone', async () => {
    for (const driverHints of [
      async () => {
        throw new Error('QMP gone');
      },
      async () => ({ copyRateBytesPerSec: -5, source: 'broken' }),
      async () => ({ nonZeroBytes: 1e15, source: 'more than memory' }),
    ]) {
      const f = fake();
      const plain = await planPaths(fake().input);
      const plan = await planPaths({ ...setUpOnly(f, []), driverHints });
      expect(f.probed[0]).toBe('p1');
      expect(plan.estimate.totalMs).toBe(plain.estimate.totalMs);
      expect(plan.paths.map((p) => p.name)).toEqual(plain.paths.map((p) => p.name));
    }
  });
});

describe('planPaths: no bandwidth probe when even the assumed floor fits the threshold', () => {
  /** The fake plus a `setUp` that records what it set up (and may fail). */
  function withSetUp(f: Fake, fails?: Error): { input: PlanInput; setUp: string[] } {
    const setUp: string[] = [];
    return {
      setUp,
      input: {
        ...f.input,
        assumedMinBandwidthBytesPerSec: 1 * MB,
        async setUp(p) {
          setUp.push(p.name);
          if (fails) throw fails;
          return { setupMs: 2 };
        },
      },
    };
  }

  it('only sets the primary up, plans at the floor rate and says it did not measure', async () => {
    // 1 MB at 1 MB/s: ~1000 ms ≤ the 1500 ms threshold.
    const f = fake({ vm: { memoryBytes: 1 * MB, pageSize: 4096, dirtyRateBytesPerSec: 0 } });
    const s = withSetUp(f);
    const plan = await planPaths(s.input);
    expect(s.setUp).toEqual(['p1']);
    expect(f.probed).toEqual([]);
    expect(plan.paths.map((p) => p.name)).toEqual(['p1']);
    expect(plan.bandwidthBytesPerSec).toBe(1 * MB);
    expect(plan.probes.get('p1')).toEqual({ setupMs: 2, bandwidthBytesPerSec: 1 * MB, assumed: true });
    expect(plan.estimate.totalMs).toBe(estimateMigration({ memoryBytes: 1 * MB, pageSize: 4096, dirtyRateBytesPerSec: 0, bandwidthBytesPerSec: 1 * MB, downtimeLimitMs: 300, maxRounds: 30, autoConverge: true }).totalMs);
    expect(plan.withinThreshold).toBe(true);
    expect(plan.decisions[0]!.reason).toMatch(/primary p1: setup 2 ms, not measured \(assumed ≥ 1 MB\/s/);
    expect(plan.decisions.at(-1)!.reason).toMatch(/≤ threshold 1500 ms with 1 path/);
  });

  it('probes as before when the estimate at the floor is over the threshold (paths are still added by the rule)', async () => {
    const f = fake(); // 100 MB: 100 s at 1 MB/s
    const s = withSetUp(f);
    const plan = await planPaths(s.input);
    expect(s.setUp).toEqual([]);
    expect(f.probed).toEqual(['p1', 'p2', 'p3']);
    expect(plan.paths.map((p) => p.name)).toEqual(['p1', 'p2', 'p3']);
    expect(plan.probes.get('p1')?.assumed).toBeUndefined();
  });

  it('a dirty rate the floor cannot keep up with means measuring', async () => {
    const f = fake({ vm: { memoryBytes: 1 * MB, pageSize: 4096, dirtyRateBytesPerSec: 2 * MB } });
    const s = withSetUp(f);
    await planPaths(s.input);
    expect(s.setUp).toEqual([]);
    expect(f.probed[0]).toBe('p1');
  });

  it('a capped primary is probed (planned at its cap) as before', async () => {
    const f = fake({ vm: { memoryBytes: 1 * MB, pageSize: 4096, dirtyRateBytesPerSec: 0 }, primary: path(1, { capBytesPerSec: 50 * MB }) });
    const s = withSetUp(f);
    const plan = await planPaths(s.input);
    expect(s.setUp).toEqual([]);
    expect(f.probed).toEqual(['p1']);
    expect(plan.bandwidthBytesPerSec).toBe(25 * MB);
  });

  it('without setUp, or without a floor, the primary is probed', async () => {
    const f = fake({ vm: { memoryBytes: 1 * MB, pageSize: 4096, dirtyRateBytesPerSec: 0 } });
    const { setUp: _unused, ...noSetUp } = withSetUp(f).input;
    await planPaths(noSetUp);
    await planPaths({ ...withSetUp(f).input, assumedMinBandwidthBytesPerSec: undefined } as PlanInput);
    expect(f.probed).toEqual(['p1', 'p1']);
  });

  it('a primary that cannot be set up is PATH_SETUP_FAILED, nothing probed or released', async () => {
    const f = fake({ vm: { memoryBytes: 1 * MB, pageSize: 4096, dirtyRateBytesPerSec: 0 } });
    const s = withSetUp(f, new Error('auth refused'));
    await expectRejects(planPaths(s.input), ErrorCodes.PATH_SETUP_FAILED, 'primary path p1 cannot be set up: auth refused', EffectorError);
    expect(f.probed).toEqual([]);
    expect(f.released).toEqual([]);
  });

  it('a bad floor or setUp is PLAN_INPUT_INVALID before anything is set up', async () => {
    const f = fake();
    for (const v of [0, -1, Number.NaN, Number.POSITIVE_INFINITY]) {
      await expectRejects(planPaths({ ...withSetUp(f).input, assumedMinBandwidthBytesPerSec: v }), ErrorCodes.PLAN_INPUT_INVALID, 'assumedMinBandwidthBytesPerSec', ConfigError);
    }
    await expectRejects(planPaths({ ...f.input, setUp: 'yes' as unknown as PlanInput['setUp'] }), ErrorCodes.PLAN_INPUT_INVALID, 'setUp must be a function', ConfigError);
    expect(f.probed).toEqual([]);
  });
});

describe('planPaths: primary path failures', () => {
  it('a primary that cannot be set up is PATH_SETUP_FAILED and nothing else is tried', async () => {
    const f = fake({ probes: { p1: new Error('auth refused') } });
    await expectRejects(planPaths(f.input), ErrorCodes.PATH_SETUP_FAILED, 'primary path p1 cannot be set up: auth refused', EffectorError);
    expect(f.probed).toEqual(['p1']);
    expect(f.released).toEqual([]);
  });

  it('a primary measuring zero bandwidth is PATH_SETUP_FAILED and is released', async () => {
    const f = fake({ probes: { p1: { setupMs: 3, bandwidthBytesPerSec: 0 } } });
    await expectRejects(planPaths(f.input), ErrorCodes.PATH_SETUP_FAILED, 'bandwidth is 0', EffectorError);
    expect(f.released).toEqual(['p1']);
  });

  it('a planner failure after setup releases every path it set up', async () => {
    const f = fake();
    const input: PlanInput = {
      ...f.input,
      async probe(p) {
        f.probed.push(p.name);
        // A probe result whose field throws when read: an unexpected failure inside the loop.
        if (p.name === 'p3')
          return Object.defineProperty({ setupMs: 1 }, 'bandwidthBytesPerSec', {
            get() {
              throw new Error('boom');
            },
          }) as PathProbe;
        return { setupMs: 1, bandwidthBytesPerSec: 25 * MB };
      },
    };
    await expect(planPaths(input)).rejects.toThrow('boom');
    expect(f.released.sort()).toEqual(['p1', 'p2', 'p3']); // p3 was set up too
  });
});

describe('planPaths: bad input', () => {
  const bad: readonly [string, (i: PlanInput) => PlanInput, string][] = [
    ['negative memory', (i) => ({ ...i, vm: { ...i.vm, memoryBytes: -1 } }), 'memoryBytes'],
    ['NaN dirty rate', (i) => ({ ...i, vm: { ...i.vm, dirtyRateBytesPerSec: Number.NaN } }), 'dirtyRateBytesPerSec'],
    ['zero page size', (i) => ({ ...i, vm: { ...i.vm, pageSize: 0 } }), 'pageSize'],
    ['cpu load above 1', (i) => ({ ...i, vm: { ...i.vm, cpuLoad: 3 } }), 'vmCpuLoad'],
    ['NaN threshold', (i) => ({ ...i, thresholdMs: Number.NaN }), 'thresholdMs'],
    ['zero threshold', (i) => ({ ...i, thresholdMs: 0 }), 'thresholdMs'],
    ['negative add-path threshold', (i) => ({ ...i, addPathThresholdMs: -1 }), 'addPathThresholdMs'],
    ['zero maxPaths', (i) => ({ ...i, maxPaths: 0 }), 'maxPaths'],
    ['fractional maxPaths', (i) => ({ ...i, maxPaths: 1.5 }), 'maxPaths'],
    ['zero downtime limit', (i) => ({ ...i, downtimeLimitMs: 0 }), 'downtimeLimitMs'],
    ['zero cap', (i) => ({ ...i, candidates: [path(2, { capBytesPerSec: 0 })] }), 'capBytesPerSec'],
    ['duplicate path names', (i) => ({ ...i, candidates: [path(2), path(2)] }), 'appears twice'],
    ['candidate named like the primary', (i) => ({ ...i, candidates: [path(1)] }), 'appears twice'],
    ['path without url', (i) => ({ ...i, candidates: [{ name: 'p2', url: '' }] }), 'needs a url'],
    ['path without name', (i) => ({ ...i, candidates: [{ name: '', url: 'ws://127.0.0.2:1' }] }), 'non-empty name'],
    ['missing probe', (i) => ({ ...i, probe: undefined as unknown as PlanInput['probe'] }), 'probe must be a function'],
  ];
  for (const [what, patch, text] of bad) {
    it(`${what} → PLAN_INPUT_INVALID before any path is set up`, async () => {
      const f = fake();
      await expectRejects(planPaths(patch(f.input)), ErrorCodes.PLAN_INPUT_INVALID, text, ConfigError);
      expect(f.probed).toEqual([]);
    });
  }
});

describe('resolveThreshold', () => {
  it('prefers the migration, then the VM, then the SLA, then the default', () => {
    expect(resolveThreshold({ migration: 1000, vm: 2000, sla: { maxMigrationMs: 3000 }, default: 4000 })).toEqual({ ms: 1000, from: 'migration' });
    expect(resolveThreshold({ vm: 2000, sla: { maxMigrationMs: 3000 }, default: 4000 })).toEqual({ ms: 2000, from: 'vm' });
    expect(resolveThreshold({ sla: { maxMigrationMs: 3000 }, default: 4000 })).toEqual({ ms: 3000, from: 'sla' });
    expect(resolveThreshold({ sla: {}, default: 4000 })).toEqual({ ms: 4000, from: 'default' });
    expect(resolveThreshold({ default: 4000 })).toEqual({ ms: 4000, from: 'default' });
  });

  it('rejects a bad value where it is given instead of silently falling through', () => {
    for (const [sources, text] of [
      [{ migration: -5, vm: 2000, default: 4000 }, 'threshold from migration is -5'],
      [{ vm: Number.NaN, default: 4000 }, 'threshold from vm is NaN'],
      [{ sla: { maxMigrationMs: 0 }, default: 4000 }, 'threshold from sla is 0'],
      [{ default: Number.POSITIVE_INFINITY }, 'threshold from default is Infinity'],
    ] as const) {
      try {
        resolveThreshold(sources);
        throw new Error('expected a rejection');
      } catch (e) {
        expect(isEmbotError(e, ErrorCodes.PLAN_INPUT_INVALID)).toBe(true);
        expect((e as Error).message).toContain(text);
      }
    }
  });
});

describe('formatPlan', () => {
  it('shows the outcome, then every decision with its reason', async () => {
    const f = fake({ probes: { p2: { setupMs: 900, bandwidthBytesPerSec: 25 * MB } } });
    const text = formatPlan(await planPaths(f.input));
    const lines = text.split('\n');
    expect(lines[0]).toBe('paths: p1, p3, p4 (75 MB/s); estimate 1333 ms ≤ threshold 1500 ms; 2 rounds, downtime 0 ms');
    expect(lines.slice(1)).toEqual([
      '  1. primary: primary p1: setup 10 ms, 25 MB/s; estimate 4000 ms',
      '  2. skip-path p2: p2 not added: setup 900 ms > 500 ms',
      '  3. add-path p3: estimate 4000 ms > threshold 1500 ms with 1 path: adding p3 (setup 10 ms, 25 MB/s)',
      '  4. add-path p4: estimate 2000 ms > threshold 1500 ms with 2 paths: adding p4 (setup 10 ms, 25 MB/s)',
      '  5. done: estimate 1333 ms ≤ threshold 1500 ms with 3 paths',
    ]);
  });

  it('says when the plan misses the threshold and the migration will not converge', async () => {
    const f = fake({ vm: { memoryBytes: 100 * MB, pageSize: 4096, dirtyRateBytesPerSec: 200 * MB }, autoConverge: false, maxPaths: 1, maxRounds: 3 });
    const head = formatPlan(await planPaths(f.input)).split('\n')[0];
    expect(head).toMatch(/^paths: p1 \(25 MB\/s\); estimate \d+ ms > threshold 1500 ms; 3 rounds, downtime \d+ ms \(does not converge/);
  });
});

describe('the qemu stream model the planner is given: a fixed cost per move plus a per-byte cost (stream-fit.ts)', () => {
  const MiB = 1024 * 1024;
  const cleanups = cleanupsAfterEach();
  /** One kept migration: `sent` MiB non-zero, `zero` MiB of zero pages, the whole move `ms` (2 ms of it QEMU's setup). */
  const s = (sent: number, ms: number, zero = 0, loadFactor = 1): StreamCalibration => ({
    copyRateBytesPerSec: ((sent * MiB) / (ms - 2)) * 1000,
    fixedMs: 2,
    sentBytes: sent * MiB,
    zeroBytes: zero * MiB,
    sendMs: ms - 2,
    vm: 'calib',
    at: 1,
    loadFactor,
  });

  /** The planner's estimate for a dense VM of `memoryMiB` with the driver's hints from `samples` (a qemu driver on a temp root; no QEMU starts). */
  async function planned(samples: Readonly<Record<string, readonly StreamCalibration[]>>, memoryMiB: number, nonZeroMiB?: number): Promise<Plan> {
    const root = mkdtempSync(join(tmpdir(), 'embot-planfit-'));
    cleanups.push(() => rmSync(root, { recursive: true, force: true }));
    writeFileSync(join(root, 'migration-model.json'), JSON.stringify({ version: 1, byChannels: samples }));
    const d = new QemuDriver({ root, accel: 'tcg', loadFactor: () => 1 });
    cleanups.push(() => d.close());
    await d.create({ name: 'v', memory: memoryMiB * MiB, vcpus: 1 });
    const f = fake({ vm: { memoryBytes: memoryMiB * MiB, pageSize: 4096, dirtyRateBytesPerSec: 0 }, thresholdMs: 10_000 });
    return planPaths({
      ...f.input,
      setUp: async () => ({ setupMs: 1 }),
      driverHints: async (n) => {
        const h = await d.capabilities.migrationModel!.estimateHints('v', { channels: n });
        return nonZeroMiB === undefined ? h : { ...h, nonZeroBytes: nonZeroMiB * MiB };
      },
    });
  }

  it('two sizes (155 MiB in 92 ms, 319 MiB in 140 ms): 320 MiB is planned near 140 ms, where the rate-only model says ~160', async () => {
    const samples = [s(155, 92), s(319, 140)];
    const plan = await planned({ '1': samples }, 320);
    // The line through both streams (setup, 2 ms each, apart): 44.6 ms + 0.293 ms/MiB; QEMU's setup scaled to the VM's RAM.
    const setupPerMiB = (2 / 155 + 2 / 319) / 2;
    expect(plan.estimate.totalMs).toBeCloseTo(90 - (155 * 48) / 164 + (320 * 48) / 164 + 320 * setupPerMiB, 6);
    expect(plan.decisions[0]!.reason).toContain('least-squares fit');
    const fit = fitStream(new Map([[1, samples]]), 1)!;
    expect(fit).toMatchObject({ kind: 'fixed+per-byte', fixedMs: expect.closeTo(90 - (155 * 48) / 164, 6), zeroPageCost: 0 });
    expect(fit.setupMsPerRamByte * MiB).toBeCloseTo(setupPerMiB, 9);
    // The model of before folds the fixed part into the rate: 20 ms more for this VM, and more the larger it is.
    const rateOnly = fitStream(new Map([[1, samples]]), 1, { fixedCost: false })!;
    expect(rateOnly.kind).toBe('per-byte');
    expect(rateOnly.fixedMs + (320 * MiB * 1000) / rateOnly.copyRateBytesPerSec).toBeGreaterThan(155);
  });

  it('one size only: the median rate and QEMU\'s setup per byte of RAM (no fixed cost of the stream can be told from one size)', async () => {
    const samples = [s(155, 92), s(155, 82), s(150, 102)];
    const fit = fitStream(new Map([[1, samples]]), 1)!;
    expect(fit.kind).toBe('per-byte');
    expect(fit.fixedMs).toBe(0);
    expect(fit.setupMsPerRamByte * MiB).toBeCloseTo(2 / 155, 9);
    expect(fit.copyRateBytesPerSec).toBeCloseTo(((155 * MiB) / 90) * 1000, 0);
    expect(spansSizes(samples)).toBe(false);
    expect(spansSizes([s(100, 50), s(149, 60)])).toBe(false);
    expect(spansSizes([s(100, 50), s(150, 60)])).toBe(true);
    const plan = await planned({ '1': samples }, 320);
    expect(plan.estimate.totalMs).toBeCloseTo((320 * 2) / 155 + ((320 * MiB) / fit.copyRateBytesPerSec) * 1000, 6);
    expect(plan.decisions[0]!.reason).toContain('median of the last 3');
    // The rate-only model of before keeps QEMU's setup as one fixed figure, whatever the VM's RAM.
    expect(fitStream(new Map([[1, samples]]), 1, { fixedCost: false })).toMatchObject({ fixedMs: 2, setupMsPerRamByte: 0 });
  });

  it('three shapes (dense small, dense large, sparse): fixed cost, per-byte cost and zero-page cost apart, and the VM with zero pages planned on all three', async () => {
    // 40 ms + 0.3 ms per non-zero MiB + 0.15 ms per zero MiB.
    const t = (sent: number, zero: number): number => 40 + 0.3 * sent + 0.15 * zero;
    const samples = [s(63, t(63, 193), 193), s(379, t(379, 4), 4), s(155, t(155, 5), 5)];
    const fit = fitStream(new Map([[1, samples]]), 1)!;
    // Each sample's 2 ms of setup is apart from its stream: F is 38; the setup, 2 ms per 256 MiB of RAM (the median sample), is the VM's.
    expect(fit).toMatchObject({ kind: 'fixed+per-byte', fixedMs: expect.closeTo(38, 6), copyRateBytesPerSec: expect.closeTo((MiB * 1000) / 0.3, 0), zeroPageCost: expect.closeTo(0.5, 6) });
    const plan = await planned({ '1': samples }, 512, 320);
    expect(plan.estimate.totalMs).toBeCloseTo(t(320, 192) - 2 + (512 * 2) / 256, 3);
  });

  it('the zero-page cost is shared by every channel count; each count has its own fixed and per-byte cost', () => {
    const t1 = (sent: number, zero: number): number => 40 + 0.3 * sent + 0.15 * zero;
    const t2 = (sent: number, zero: number): number => 60 + 0.2 * sent + 0.15 * zero;
    const groups = new Map([
      [1, [s(63, t1(63, 193), 193), s(379, t1(379, 4), 4), s(155, t1(155, 5), 5)]],
      [2, [s(379, t2(379, 4), 4), s(155, t2(155, 5), 5)]],
    ]);
    expect(fitStream(groups, 2)).toMatchObject({ kind: 'fixed+per-byte', fixedMs: expect.closeTo(58, 6), copyRateBytesPerSec: expect.closeTo((MiB * 1000) / 0.2, 0), zeroPageCost: expect.closeTo(0.75, 6) });
  });

  it('a fit whose fixed cost comes out below 0 is noise: that count goes back to the median rate', () => {
    // 155 MiB in 60 ms and 319 MiB in 180 ms: a line through them starts at -53 ms.
    const fit = fitStream(new Map([[1, [s(155, 60), s(319, 180)]]]), 1)!;
    expect(fit.kind).toBe('per-byte');
    expect(fit.fixedMs).toBe(0);
  });

  it('a slow sample that would put all of a move in its fixed cost, or a zero page beyond the contract\'s bound, is not taken as the model (06:37 quiet: the first move, 146 ms for 63 MiB)', () => {
    // The quiet run's first samples: the sparse guest moved first and slow, then the dense and the measured one.
    const groups = new Map([[1, [s(63, 146, 193), s(155, 69, 5), s(319, 148, 193), s(155, 76, 5)]]]);
    const fit = fitStream(groups, 1)!;
    // An exact fit of these says 70 ms fixed, 125 GB/s and a zero page at 10+ full ones: rejected.
    expect(fit.fixedMs).toBeLessThan(60);
    expect(fit.copyRateBytesPerSec).toBeLessThan(10e9);
    expect(fit.zeroPageCost).toBeLessThan(MAX_ZERO_PAGE_COST);
  });

  it('samples at another load factor (2× or more from now) are scaled, the fixed cost with them', async () => {
    // Taken at factor 4, now 1: every time a quarter.
    const samples = [s(155, 4 * 92, 0, 4), s(319, 4 * 140, 0, 4)];
    const fit = fitStream(new Map([[1, samples]]), 1)!;
    // The streams (sendMs) are scaled: (4·92 − 2) / 4 = 91.5 and 139.5 ms.
    expect(fit.fixedMs).toBeCloseTo(91.5 - (155 * 48) / 164, 6);
    const plan = await planned({ '1': samples }, 320);
    expect(plan.estimate.totalMs).toBeCloseTo(140.3, 0);
  });

  it('bad samples (no bytes, no time, NaN: a hand-edited model file) are left out of the fit; with none usable, the plain medians', () => {
    const bad = [{ ...s(155, 92), sentBytes: 0 }, { ...s(319, 140), sendMs: Number.NaN }, { ...s(200, 100), loadFactor: -1 }];
    const good = [s(155, 92), s(319, 140)];
    expect(fitStream(new Map([[1, [...good, ...bad]]]), 1)).toEqual(fitStream(new Map([[1, good]]), 1));
    const none = fitStream(new Map([[1, bad]]), 1)!;
    expect(none.kind).toBe('per-byte');
    expect(Number.isFinite(none.copyRateBytesPerSec)).toBe(true);
    expect(fitStream(new Map([[2, good]]), 1)).toBeUndefined();
  });

  it('leastSquares: exact on a consistent system, undefined when a column cannot be told from the ones before it', () => {
    expect(leastSquares([[1, 1], [1, 2], [1, 3]], [3, 5, 7])!.map((v) => Number(v.toFixed(9)))).toEqual([1, 2]);
    expect(leastSquares([[1, 100], [1, 110]], [1, 2])).toBeUndefined(); // sizes 1.1× apart: F and a collinear
    expect(leastSquares([[1, 2]], [1])).toBeUndefined(); // fewer rows than unknowns
    expect(leastSquares([], [])).toBeUndefined();
    expect(leastSquares([[0, 1], [0, 2]], [1, 2])).toBeUndefined(); // an all-zero column
  });
});
