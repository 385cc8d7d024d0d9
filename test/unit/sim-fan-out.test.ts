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
