import { describe, expect, it } from 'vitest';
import { EffectorError, ErrorCodes } from '../../core/errors.ts';
import { TokenBucket } from '../../effectors/hypervisor/sim/dataplane/index.ts';

/** A clock that only moves when the bucket sleeps, so pacing is checked exactly and instantly. */
function fakeClock(): { now: () => number; sleep: (ms: number) => Promise<void>; sleeps: number[]; advance: (ms: number) => void; t: () => number } {
  let t = 0;
  const sleeps: number[] = [];
  return {
    now: () => t,
    sleep: (ms) => {
      sleeps.push(ms);
      t += ms;
      return Promise.resolve();
    },
    sleeps,
    advance: (ms) => {
      t += ms;
    },
    t: () => t,
  };
}

describe('TokenBucket', () => {
  it('lets a burst through without waiting, then waits off the debt at the rate', async () => {
    const clock = fakeClock();
    const bucket = new TokenBucket(1000, 500, clock);
    await bucket.take(300);
    await bucket.take(200);
    expect(clock.sleeps).toEqual([]);
    await bucket.take(250);
    expect(clock.sleeps).toEqual([250]);
  });

  it('holds the long-run rate for takes larger than the burst', async () => {
    const clock = fakeClock();
    const bucket = new TokenBucket(1_000_000, 10_000, clock);
    for (let i = 0; i < 100; i++) await bucket.take(100_000);
    // 10 MB at 1 MB/s, minus the initial burst.
    expect(clock.t()).toBeCloseTo(((10_000_000 - 10_000) / 1_000_000) * 1000, 6);
  });

  it('refills while idle, but never beyond the burst', async () => {
    const clock = fakeClock();
    const bucket = new TokenBucket(1000, 100, clock);
    await bucket.take(100);
    clock.advance(10_000);
    await bucket.take(100);
    expect(clock.sleeps).toEqual([]);
    await bucket.take(100);
    expect(clock.sleeps).toEqual([100]);
  });

  it('serves concurrent callers in call order, each waiting for its own share', async () => {
    const clock = fakeClock();
    const waits: number[] = [];
    const bucket = new TokenBucket(1000, 1, { now: clock.now, sleep: (ms) => (waits.push(ms), Promise.resolve()) });
    await Promise.all([bucket.take(101), bucket.take(100), bucket.take(100)]);
    expect(waits).toEqual([100, 200, 300]);
  });

  it('defaults the burst to 50 ms of the rate', () => {
    expect(new TokenBucket(2000).burstBytes).toBe(100);
  });

  it('really paces with the default clock', async () => {
    const bucket = new TokenBucket(1_000_000, 1000);
    const start = performance.now();
    await bucket.take(1000);
    await bucket.take(20_000);
    // A wait happened (20 ms owed); no upper bound: speed is not what this test is about.
    expect(performance.now() - start).toBeGreaterThanOrEqual(15);
  });

  it.each([0, -1, Number.NaN, Number.POSITIVE_INFINITY, '10' as unknown as number])('refuses a rate of %s', (rate) => {
    expect(() => new TokenBucket(rate)).toThrow(EffectorError);
    try {
      new TokenBucket(rate);
    } catch (e) {
      expect((e as EffectorError).code).toBe(ErrorCodes.EFFECTOR_ARGS_INVALID);
    }
  });

  it.each([0, -5, Number.NaN])('refuses a burst of %s', (burst) => {
    expect(() => new TokenBucket(1000, burst)).toThrow(expect.objectContaining({ code: ErrorCodes.EFFECTOR_ARGS_INVALID }));
  });

  it.each([-1, Number.NaN, Number.POSITIVE_INFINITY])('rejects take(%s) and keeps its tokens', async (bytes) => {
    const clock = fakeClock();
    const bucket = new TokenBucket(1000, 100, clock);
    await expect(bucket.take(bytes)).rejects.toMatchObject({ code: ErrorCodes.EFFECTOR_ARGS_INVALID });
    await bucket.take(100);
    expect(clock.sleeps).toEqual([]);
  });
});

describe('TokenBucket initialBytes', () => {
  it('paces from the first byte when it starts empty', async () => {
    const clock = fakeClock();
    const bucket = new TokenBucket(1000, 500, { ...clock, initialBytes: 0 });
    await bucket.take(100);
    expect(clock.sleeps).toEqual([100]);
  });

  it.each([-1, Number.NaN])('refuses initialBytes %s', (initialBytes) => {
    expect(() => new TokenBucket(1000, 500, { initialBytes })).toThrow(expect.objectContaining({ code: ErrorCodes.EFFECTOR_ARGS_INVALID }));
  });
});
