import { describe, expect, it } from 'vitest';
import { ErrorCodes, isEmbotError } from '../../core/errors.ts';
import type { PeerConnection } from '../../core/wire/index.ts';
import type { MigrateOutOptions } from '../../effectors/index.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { pageDestination, runningSimVm } from '../harness/sim-page-rig.ts';

/**
 * The sim driver's fanOut capability over real loopback data paths: one pre-copy per destination
 * with its own dirty log, the VM stopped once, a slow destination not waited for, every
 * destination's memory byte-exact at the end.
 */

const SECRET = Buffer.from('fan-out-test-secret-0123456789ab');
const MiB = 1024 * 1024;
const cleanups = cleanupsAfterEach();
const destination = (name: string, memory: number) => pageDestination(cleanups, SECRET, name, memory);

async function rig(memory = 2 * MiB, dirtyRate = 2 * MiB) {
  const { driver, stops } = await runningSimVm(cleanups, memory, dirtyRate);
  const fast = await destination('b', memory);
  const slow = await destination('c', memory);
  const switchovers: string[] = [];
  const opts = (dest: string, conn: PeerConnection, extra: Partial<MigrateOutOptions> = {}): MigrateOutOptions => ({
    endpoint: { uri: 'sim:data-paths' },
    downtimeLimitMs: 50,
    beforeSwitchover: async () => void switchovers.push(dest),
    dataPaths: { migrationId: `m~${dest}`, paths: [{ name: 'direct', conn, ...(dest === 'c' ? { capBytesPerSec: MiB } : {}) }], maxRounds: 10 },
    ...extra,
  });
  return { driver, fast, slow, stops, switchovers, opts };
}

const same = (a: Uint8Array, b: Uint8Array): boolean => Buffer.compare(a, b) === 0;

describe('sim fanOut', () => {
  it('copies to two destinations at their own pace, stops the VM once, and both end byte-exact', async () => {
    const r = await rig();
    const session = r.driver.capabilities.fanOut!.begin('vm1', ['b', 'c']);
    const order: string[] = [];
    const b = session.migrateOut('b', r.opts('b', r.fast.conn)).then((x) => (order.push('b'), x));
    const c = session.migrateOut('c', r.opts('c', r.slow.conn)).then((x) => (order.push('c'), x));
    const [rb, rc] = await Promise.all([b, c]);
    session.close();
    // The fast one did not wait for the slow one; the VM stopped once, for the first to fit the limit.
    expect(order).toEqual(['b', 'c']);
    expect(r.stops).toEqual(['migrate']);
    expect(r.switchovers).toEqual(['b', 'c']);
    expect(r.driver.get('vm1')?.state).toBe('stopped');
    // Each destination got every page dirtied while it copied (its own log), so both are exact.
    const memory = r.driver.pages('vm1').memory;
    expect(r.fast.receiver.finalReceived && r.slow.receiver.finalReceived).toBe(true);
    expect(same(r.fast.receiver.memory, memory)).toBe(true);
    expect(same(r.slow.receiver.memory, memory)).toBe(true);
    expect(rb.bytes).toBeGreaterThanOrEqual(2 * MiB);
    expect(rc.bytes).toBeGreaterThanOrEqual(2 * MiB);
  });

  it('an aborted destination leaves the VM to its owner: not restarted, the other still completes', async () => {
    const r = await rig();
    const session = r.driver.capabilities.fanOut!.begin('vm1', ['b', 'c']);
    const abort = new AbortController();
    const c = session.migrateOut('c', r.opts('c', r.slow.conn, { signal: abort.signal }));
    const b = await session.migrateOut('b', r.opts('b', r.fast.conn));
    abort.abort(new Error('terminated: b booted first (migration m)'));
    await expect(c).rejects.toSatisfy((e: unknown) => isEmbotError(e, ErrorCodes.MIGRATION_ABORTED));
    session.close();
    expect(b.rounds).toBeGreaterThanOrEqual(1);
    expect(r.driver.get('vm1')?.state).toBe('stopped');
    expect(same(r.fast.receiver.memory, r.driver.pages('vm1').memory)).toBe(true);
  });

  it('refuses a destination not in the session, one copying already, an empty session, a closed one', async () => {
    const r = await rig();
    expect(() => r.driver.capabilities.fanOut!.begin('vm1', [])).toThrow(expect.objectContaining({ code: ErrorCodes.EFFECTOR_ARGS_INVALID }));
    const session = r.driver.capabilities.fanOut!.begin('vm1', ['b', 'c']);
    await expect(session.migrateOut('zz', r.opts('b', r.fast.conn))).rejects.toMatchObject({ code: ErrorCodes.EFFECTOR_ARGS_INVALID });
    const abort = new AbortController();
    const first = session.migrateOut('c', r.opts('c', r.slow.conn, { signal: abort.signal }));
    await expect(session.migrateOut('c', r.opts('c', r.slow.conn))).rejects.toMatchObject({ code: ErrorCodes.VM_BAD_STATE });
    abort.abort();
    await first.catch(() => undefined);
    session.close();
    await expect(session.migrateOut('b', r.opts('b', r.fast.conn))).rejects.toMatchObject({ code: ErrorCodes.MIGRATION_ABORTED });
    // Nothing of it stopped the VM.
    expect(r.driver.get('vm1')?.state).toBe('running');
  });
});

/**
 * Wraps `conn.request` (the real link's) to record the most PageBatch requests it had in flight
 * while `during()` held.
 */
function inflightProbe(conn: PeerConnection, during: () => boolean): { max: number } {
  const seen = { max: 0 };
  let inflight = 0;
  const request = conn.request.bind(conn);
  (conn as { request: PeerConnection['request'] }).request = ((body, options) => {
    if (body.type !== 'PageBatch') return request(body, options);
    inflight++;
    if (during()) seen.max = Math.max(seen.max, inflight);
    return request(body, options).finally(() => inflight--);
  }) as PeerConnection['request'];
  return seen;
}

describe('sim fanOut: the lead copy and the copies behind it', () => {
  // 8 batches of 1 MiB and no writes: round 0 is the whole copy, so the window shows on it.
  const quietRig = async () => {
    const { driver } = await runningSimVm(cleanups, 8 * MiB, 0);
    const b = await destination('b', 8 * MiB);
    const c = await destination('c', 8 * MiB);
    const opts = (dest: string, conn: PeerConnection, extra: Partial<MigrateOutOptions> = {}): MigrateOutOptions => ({
      endpoint: { uri: 'sim:data-paths' },
      downtimeLimitMs: 50,
      dataPaths: { migrationId: `m~${dest}`, paths: [{ name: 'direct', conn }], maxRounds: 10 },
      ...extra,
    });
    return { driver, b, c, opts };
  };

  it('the copy that started first keeps its full window; one behind it sends a batch at a time until the lead ends', async () => {
    const r = await quietRig();
    let leadRunning = true;
    const lead = inflightProbe(r.b.conn, () => true);
    const follower = inflightProbe(r.c.conn, () => leadRunning);
    const session = r.driver.capabilities.fanOut!.begin('vm1', ['b', 'c']);
    const b = session.migrateOut('b', r.opts('b', r.b.conn)).finally(() => (leadRunning = false));
    const c = session.migrateOut('c', r.opts('c', r.c.conn));
    await Promise.all([b, c]);
    session.close();
    expect(lead.max).toBeGreaterThan(1);
    expect(follower.max).toBe(1);
    const memory = r.driver.pages('vm1').memory;
    expect(same(r.b.receiver.memory, memory) && same(r.c.receiver.memory, memory)).toBe(true);
  });

  it('a slow lead is not waited for: a copy that caught up with it takes the full window and finishes first', async () => {
    const r = await quietRig();
    let leadRunning = true;
    const follower = inflightProbe(r.c.conn, () => leadRunning);
    const order: string[] = [];
    const session = r.driver.capabilities.fanOut!.begin('vm1', ['b', 'c']);
    // b's path is capped at 4 MiB/s: its 8 MiB take ~2 s; c's loopback path is not.
    const slow = r.opts('b', r.b.conn, { dataPaths: { migrationId: 'm~b', paths: [{ name: 'direct', conn: r.b.conn, capBytesPerSec: 4 * MiB }], maxRounds: 10 } });
    const b = session.migrateOut('b', slow).finally(() => (leadRunning = false, order.push('b')));
    const c = session.migrateOut('c', r.opts('c', r.c.conn)).finally(() => order.push('c'));
    await Promise.all([b, c]);
    session.close();
    expect(order).toEqual(['c', 'b']);
    expect(follower.max).toBeGreaterThan(1);
  });

  it('the lead failing mid-copy leaves the copy behind it to complete, byte-exact, with the full window again', async () => {
    const r = await quietRig();
    let leadRunning = true;
    const follower = inflightProbe(r.c.conn, () => leadRunning);
    const later = inflightProbe(r.c.conn, () => !leadRunning);
    const session = r.driver.capabilities.fanOut!.begin('vm1', ['b', 'c']);
    const abort = new AbortController();
    // b is aborted once its first batch is acknowledged, as when its destination fails mid-stream.
    const b = session.migrateOut('b', r.opts('b', r.b.conn, { signal: abort.signal, onProgress: () => abort.abort(new Error('b failed')) }));
    const failed = b.then(
      () => 'completed',
      (e: unknown) => ((leadRunning = false), isEmbotError(e, ErrorCodes.MIGRATION_ABORTED) ? 'aborted' : String(e)),
    );
    const c = session.migrateOut('c', r.opts('c', r.c.conn));
    expect(await failed).toBe('aborted');
    const rc = await c;
    session.close();
    expect(rc.bytes).toBeGreaterThanOrEqual(8 * MiB);
    expect(same(r.c.receiver.memory, r.driver.pages('vm1').memory)).toBe(true);
    expect(r.driver.get('vm1')?.state).toBe('stopped');
    expect(follower.max).toBeLessThanOrEqual(1);
    expect(later.max).toBeGreaterThan(1);
  });
});
