import { describe, expect, it } from 'vitest';
import { ErrorCodes, isEmbotError } from '../../core/errors.ts';
import { PrewarmGate, exitConditionMet, shareMet, type DriverMigrationProgress, type MigrateOutOptions } from '../../effectors/index.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { pageDestination, runningSimVm } from '../harness/sim-page-rig.ts';

/**
 * Pre-warm in the sim's fan-out (issue 13 point 3), over real loopback data paths: while the gate
 * is held the copies go on past a complete copy (re-sending dirtied pages) and the VM is never
 * stopped; lifted, each switches with only the last dirtied pages left to send; cancelled while
 * held, the VM runs on untouched.
 */

const SECRET = Buffer.from('prewarm-test-secret-0123456789abc');
const MiB = 1024 * 1024;
const cleanups = cleanupsAfterEach();
const destination = (name: string, memory: number) => pageDestination(cleanups, SECRET, name, memory);

const DIRTY_RATE = 256 * 1024;

async function rig(memory = 4 * MiB, dirtyRate = DIRTY_RATE) {
  const { driver, stops } = await runningSimVm(cleanups, memory, dirtyRate);
  const dests = { b: await destination('b', memory), c: await destination('c', memory) };
  const progress: Record<string, DriverMigrationProgress[]> = { b: [], c: [] };
  const opts = (dest: 'b' | 'c', extra: Partial<MigrateOutOptions> = {}): MigrateOutOptions => ({
    endpoint: { uri: 'sim:data-paths' },
    downtimeLimitMs: 100,
    onProgress: (p) => progress[dest]!.push(p),
    // A round limit the pre-warm would pass many times over: held rounds do not count.
    dataPaths: { migrationId: `m~${dest}`, paths: [{ name: 'direct', conn: dests[dest].conn }], maxRounds: 4 },
    ...extra,
  });
  return { driver, dests, stops, progress, opts, memory };
}

const same = (a: Uint8Array, b: Uint8Array): boolean => Buffer.compare(a, b) === 0;

async function until(check: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 2000 && !check(); i++) await new Promise((r) => setTimeout(r, 10));
  if (!check()) throw new Error(`never: ${what}`);
}

describe('sim pre-warm', () => {
  it('keeps copying past the full copy without stopping the VM, then switches with little left to send', async () => {
    const r = await rig();
    const gate = new PrewarmGate();
    const session = r.driver.capabilities.fanOut!.begin('vm1', ['b', 'c']);
    expect(r.driver.capabilities.fanOut!.prewarm).toBe(true);
    const b = session.migrateOut('b', r.opts('b', { prewarm: gate }));
    const c = session.migrateOut('c', r.opts('c', { prewarm: gate }));
    // More rounds than maxRounds allows, and every destination warm by the exit condition.
    await until(() => (r.progress['b']!.at(-1)?.rounds ?? 0) > 6 && (r.progress['c']!.at(-1)?.rounds ?? 0) > 6, 'six held rounds each');
    await until(() => ['b', 'c'].every((d) => exitConditionMet(r.progress[d]!.at(-1)!, 100)), 'the exit condition at both');
    expect(r.stops).toEqual([]);
    expect(r.driver.get('vm1')?.state).toBe('running');
    // The held readings, once the dirty-rate window has filled: what the exit condition judges.
    // They once read dirty rate 0 (measured per held round, shorter than the VM's write ticks) and
    // remaining 0 (read right after each round's send, before anything was dirtied again).
    await new Promise((res) => setTimeout(res, 1200));
    const from = { b: r.progress['b']!.length, c: r.progress['c']!.length };
    await new Promise((res) => setTimeout(res, 600));
    for (const d of ['b', 'c'] as const) {
      const held = r.progress[d]!.slice(from[d]);
      expect(held.length).toBeGreaterThan(0);
      for (const p of held) {
        expect(p.dirtyRateBytesPerSec).toBeGreaterThan(DIRTY_RATE / 2);
        expect(p.dirtyRateBytesPerSec).toBeLessThan(DIRTY_RATE * 2);
      }
      // The pages dirtied since they were last sent: most readings see some (an idle look may see none).
      expect(held.filter((p) => p.remainingBytes > 0).length * 2).toBeGreaterThanOrEqual(held.length);
      expect(Math.max(...held.map((p) => p.remainingBytes))).toBeLessThan(r.memory / 4);
    }
    const sentAtCommand = Math.max(...r.progress['b']!.map((p) => p.transferredBytes));
    // Dirtied pages were re-sent after the complete copy.
    expect(sentAtCommand).toBeGreaterThan(r.memory);
    gate.lift();
    const [rb, rc] = await Promise.all([b, c]);
    session.close();
    expect(r.stops).toEqual(['migrate']);
    // The structure, not a time: after the command only what was dirtied since had to go.
    expect(rb.bytes - sentAtCommand).toBeLessThan(r.memory / 4);
    const memory = r.driver.pages('vm1').memory;
    expect(same(r.dests.b.receiver.memory, memory) && same(r.dests.c.receiver.memory, memory)).toBe(true);
    expect(rc.rounds).toBeGreaterThan(4);
  });

  it('cancelled while held: the copies end MIGRATION_ABORTED, the VM never stopped', async () => {
    const r = await rig();
    const gate = new PrewarmGate();
    const abort = new AbortController();
    const session = r.driver.capabilities.fanOut!.begin('vm1', ['b']);
    const b = session.migrateOut('b', r.opts('b', { prewarm: gate, signal: abort.signal }));
    await until(() => (r.progress['b']!.at(-1)?.rounds ?? 0) > 3, 'three held rounds');
    abort.abort(new Error('pre-warm cancelled'));
    await expect(b).rejects.toSatisfy((e: unknown) => isEmbotError(e, ErrorCodes.MIGRATION_ABORTED));
    session.close();
    expect(r.stops).toEqual([]);
    expect(r.driver.get('vm1')?.state).toBe('running');
  });

  it('judges the exit condition: whole copy first, then remaining / (rate − dirty rate) < limit; the share of destinations', () => {
    const p = { rounds: 3, remainingBytes: MiB, rateBytesPerSec: 100 * MiB, dirtyRateBytesPerSec: 10 * MiB };
    expect(exitConditionMet(p, 300)).toBe(true);
    expect(exitConditionMet({ ...p, rounds: 1 }, 300)).toBe(false);
    expect(exitConditionMet({ ...p, dirtyRateBytesPerSec: 100 * MiB }, 300)).toBe(false);
    expect(exitConditionMet({ ...p, remainingBytes: 50 * MiB }, 300)).toBe(false);
    expect(exitConditionMet({ ...p, remainingBytes: 0, dirtyRateBytesPerSec: 200 * MiB }, 300)).toBe(true);
    expect(shareMet([true, false], 0.5)).toBe(true);
    expect(shareMet([true, false], 1)).toBe(false);
    expect(shareMet([true, true, false], 0.67)).toBe(false);
    expect(shareMet([], 0.5)).toBe(false);
  });
});
