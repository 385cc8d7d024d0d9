import { describe, expect, it } from 'vitest';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { tempStores } from '../harness/temp-store.ts';
import { SensorService } from '../../sensors/index.ts';
import { MigrationJournal } from '../../core/mobility/migration-journal.ts';
import { HandOverWaits } from '../../core/mobility/forwarding-hand-over.ts';
import { silentLogger } from '../../core/logger.ts';
import { sleep, waitFor } from '../harness/agent-process.ts';
import type { Store } from '../../core/store/store.ts';
import type { EmbotEvent } from '../../core/events.ts';

/**
 * The new owner's wait for the source's hand-over, with real parts: a SQLite store file, the
 * sensor service and the migration journal, as the agent builds them; the source is played by
 * calling what its ForwardedEvents frames do here (the sensor service takes the events, then
 * `handedOver`).
 */
const cleanups = cleanupsAfterEach();
const { tmpStoreFile, openStore } = tempStores(cleanups, 'embot-hand-over-');

const SCOPE = ['vm:x', 'disk:x.0'];
/** A TICK for vm:x whose ts orders it (the source's events are older than the ones posted here after the commit). */
const tick = (seq: number, id = `t-${seq}`) => ({ id, ts: 1000 + seq, elementId: 'vm:x', type: 'TICK', payload: { seq } });

/** The target's parts on `store`: a committed migration m-1 of VM x from a, its elements held since staging. */
function targetOn(store: Store, opts: { waitMs?: number; leaving?: boolean } = {}) {
  const sensors = new SensorService({ host: 'b', store, onError: () => {} });
  cleanups.push(() => sensors.close());
  const journal = new MigrationJournal(store);
  const waits = new HandOverWaits({ host: { sensors, journal, logger: silentLogger }, waitMs: opts.waitMs ?? 60_000, leaving: () => opts.leaving === true });
  cleanups.push(() => waits.close());
  const seen: number[] = [];
  sensors.subscribe('vm:x', { deliver: (e: EmbotEvent) => void seen.push((e.payload as { seq: number }).seq) });
  return { sensors, journal, waits, seen };
}

/** What the target's commit does: journals the migration and its pending hand-over in one transaction, then waits. */
function commit(t: ReturnType<typeof targetOn>, store: Store, ready: Promise<unknown> = Promise.resolve()): void {
  t.sensors.hold(SCOPE);
  store.transaction(() => {
    t.journal.begin('m-1', 'target', 'x', 'a', 'committed', { scope: SCOPE });
    t.waits.journalPending('m-1');
  });
  t.waits.begin('m-1', 'x', SCOPE, ready);
}

describe('HandOverWaits', () => {
  it('events posted at the new owner after the commit wait for the source\'s hand-over, then all go in ts order', async () => {
    const store = openStore();
    const t = targetOn(store);
    const ends: { handedOver: boolean; heldMs: number }[] = [];
    t.waits.observe((e) => ends.push(e));
    t.sensors.recover();
    t.waits.afterEventsRecovered();
    commit(t, store);
    // A producer that turned to the new owner: later ts than what the source still holds.
    await t.sensors.emit(tick(5));
    await t.sensors.emit(tick(6));
    await t.sensors.idle();
    await sleep(20);
    expect(t.seen).toEqual([]);
    expect(t.waits.isWaiting('m-1')).toBe(true);
    expect(t.journal.pendingHandOvers().map((r) => r.id)).toEqual(['m-1']);

    // The source's hand-over: its held events journaled here (as Forwarding.receive does), then the flag.
    await t.sensors.emitMany([tick(3), tick(4)]);
    t.waits.handedOver('m-1');
    await waitFor(() => t.seen.length === 4, 5000, 'the released events');
    expect(t.seen).toEqual([3, 4, 5, 6]);
    expect(t.waits.isWaiting('m-1')).toBe(false);
    expect(ends).toHaveLength(1);
    expect(ends[0]).toMatchObject({ handedOver: true });
    // Held from the embots running (at once here) to the hand-over: at least the 20 ms slept above.
    expect(ends[0]!.heldMs).toBeGreaterThanOrEqual(15);
    expect(t.journal.get('m-1', 'target')?.notes.handOver).toBe('done');
    expect(t.journal.pendingHandOvers()).toEqual([]);
    // From now on events flow at once.
    await t.sensors.emit(tick(7));
    await waitFor(() => t.seen.length === 5, 5000, 'a later event');
    expect(t.seen).toEqual([3, 4, 5, 6, 7]);
  });

  it('a target restarted before the hand-over holds its journaled and new events again until it comes', async () => {
    const file = tmpStoreFile();
    let store = openStore(file);
    let t = targetOn(store);
    t.sensors.recover();
    t.waits.afterEventsRecovered();
    commit(t, store);
    await t.sensors.emit(tick(7));
    await t.sensors.emit(tick(8));
    await t.sensors.idle();
    expect(t.seen).toEqual([]);
    // The crash: nothing released, the journal keeps the events and the pending hand-over.
    await t.sensors.close();
    t.waits.close();
    store.close();

    store = openStore(file);
    t = targetOn(store);
    expect(t.waits.restore()).toBe(1);
    expect(t.sensors.recover()).toBe(2);
    t.waits.afterEventsRecovered();
    await t.sensors.emit(tick(9));
    await t.sensors.idle();
    await sleep(20);
    expect(t.seen).toEqual([]);
    await t.sensors.emitMany([tick(5), tick(6)]);
    t.waits.handedOver('m-1');
    await waitFor(() => t.seen.length === 5, 5000, 'the released events');
    expect(t.seen).toEqual([5, 6, 7, 8, 9]);
    expect(t.journal.pendingHandOvers()).toEqual([]);
  });

  it('a source that never hands over delays the events by waitMs, it does not keep them', async () => {
    const store = openStore();
    const t = targetOn(store, { waitMs: 100 });
    t.sensors.recover();
    t.waits.afterEventsRecovered();
    commit(t, store);
    await t.sensors.emit(tick(1));
    await t.sensors.idle();
    expect(t.seen).toEqual([]);
    await waitFor(() => t.seen.length === 1, 5000, 'the event after the wait');
    expect(t.journal.get('m-1', 'target')?.notes.handOver).toBe('done');
    // A hand-over that comes later is taken like any forwarded event.
    t.waits.handedOver('m-1');
    await t.sensors.emit(tick(2));
    await waitFor(() => t.seen.length === 2, 5000, 'a later event');
    expect(t.seen).toEqual([1, 2]);
  });

  it('releases nothing while the embots are not running, and nothing when they could not start', async () => {
    const store = openStore();
    const t = targetOn(store);
    t.sensors.recover();
    t.waits.afterEventsRecovered();
    let fail!: (e: Error) => void;
    commit(t, store, new Promise((_, reject) => (fail = reject)));
    await t.sensors.emit(tick(1));
    t.waits.handedOver('m-1');
    await t.sensors.idle();
    await sleep(20);
    expect(t.seen).toEqual([]);
    fail(new Error('attach failed'));
    await sleep(20);
    // Held, so the next start gives them to the embots; the journal still says the hand-over is pending.
    expect(t.seen).toEqual([]);
    expect(t.sensors.isHeld('vm:x')).toBe(true);
    expect(t.waits.isWaiting('m-1')).toBe(false);
  });

  it('leaves the hold to a migration of the VM away from here that began meanwhile', async () => {
    const store = openStore();
    const t = targetOn(store, { leaving: true });
    t.sensors.recover();
    t.waits.afterEventsRecovered();
    commit(t, store);
    await t.sensors.emit(tick(1));
    t.waits.handedOver('m-1');
    await t.sensors.idle();
    await sleep(20);
    expect(t.seen).toEqual([]);
    expect(t.sensors.isHeld('vm:x')).toBe(true);
    expect(t.waits.isWaiting('m-1')).toBe(false);
  });
});
