import { describe, expect, it } from 'vitest';
import { ErrorCodes, EventError } from '../../core/errors.ts';
import type { EmbotEvent } from '../../core/events.ts';
import type { Store } from '../../core/store/store.ts';
import { SensorService, decodeHeld, encodeHeld } from '../../sensors/index.ts';
import type { Subscriber } from '../../sensors/index.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { expectThrownCode } from '../harness/expect-code.ts';
import { rowCount, tempStores } from '../harness/temp-store.ts';

const cleanups = cleanupsAfterEach();
const { tmpStoreFile, openStore } = tempStores(cleanups, 'embot-sensor-deferred-');

function service(host: string, store: Store, holdMemoryLimit = 10_000): SensorService {
  const s = new SensorService({ host, store, holdMemoryLimit, onError: () => {} });
  cleanups.push(() => s.close());
  return s;
}

function recorder(s: SensorService, elementId: string): EmbotEvent[] {
  const got: EmbotEvent[] = [];
  const sub: Subscriber = {
    durable: true,
    deliver(event, seq) {
      got.push(event);
      s.complete([seq]);
    },
  };
  s.subscribe(elementId, sub);
  return got;
}

/** A source holding `n` events per element, round robin, and its shipment of them. */
async function shipment(scope: readonly string[], n: number): Promise<{ bytes: Uint8Array; ids: string[] }> {
  const src = service('src', openStore(), 4);
  src.hold(scope);
  for (let i = 0; i < n; i++) for (const elementId of scope) src.post({ elementId, type: 'TICK', payload: { i, elementId } });
  await src.idle();
  const bytes = src.serializeHeld(scope);
  return { bytes, ids: decodeHeld(bytes).flatMap((q) => q.events.map((e) => e.id)) };
}

const idsOf = (events: readonly EmbotEvent[]): string[] => events.map((e) => e.id);

describe('insertHeld with deferJournal', () => {
  it('stores one blob row, holds the events in order, and journals them at release', async () => {
    const scope = ['vm:a', 'disk:a'];
    const { bytes, ids } = await shipment(scope, 30);
    const store = openStore();
    const dst = service('dst', store, 8);
    expect(dst.insertHeld(bytes, { deferJournal: true })).toEqual({ accepted: 60, duplicates: 0 });
    expect(rowCount(store, 'held_blobs')).toBe(1);
    expect(rowCount(store)).toBe(0);
    expect(rowCount(store, 'held_spill')).toBe(0);
    expect(dst.heldCount(scope)).toBe(60);
    // Staged as bytes: decoded only when the queues are needed.
    expect(dst.stats()).toMatchObject({ held: 60, undecoded: 60 });
    // Shipped on from here, before release: the same events in the same order.
    expect(decodeHeld(dst.serializeHeld(scope)).flatMap((q) => idsOf(q.events))).toEqual(ids);
    expect(dst.stats()).toMatchObject({ held: 60, undecoded: 0 });
    const vm = recorder(dst, 'vm:a');
    const disk = recorder(dst, 'disk:a');
    dst.release(scope);
    expect(rowCount(store, 'held_blobs')).toBe(0);
    expect(rowCount(store)).toBe(60);
    await dst.idle();
    expect(idsOf(vm).concat(idsOf(disk))).toEqual(ids);
    expect(rowCount(store)).toBe(0);
  });

  it('counts an id already held, in the same or a later shipment, as a duplicate', async () => {
    const scope = ['vm:a'];
    const { bytes } = await shipment(scope, 20);
    const store = openStore();
    const dst = service('dst', store);
    dst.insertHeld(bytes, { deferJournal: true });
    expect(dst.insertHeld(bytes, { deferJournal: true })).toEqual({ accepted: 0, duplicates: 20 });
    expect(dst.insertHeld(bytes, { hold: false })).toEqual({ accepted: 0, duplicates: 20 });
    expect(rowCount(store, 'held_blobs')).toBe(1);
    expect(dst.heldCount(scope)).toBe(20);
    const got = recorder(dst, 'vm:a');
    dst.release(scope);
    await dst.idle();
    expect(got).toHaveLength(20);
    expect(dst.insertHeld(bytes, { hold: false })).toEqual({ accepted: 0, duplicates: 20 });
  });

  it('keeps events held before and after a shipment in arrival order, and spills nothing while pinned', async () => {
    const scope = ['vm:a'];
    const { bytes, ids } = await shipment(scope, 10);
    const store = openStore();
    const dst = service('dst', store, 4);
    dst.hold(scope);
    const first = dst.post({ elementId: 'vm:a', type: 'LOCAL', ts: 0, id: 'local-1' });
    await dst.idle();
    dst.insertHeld(bytes, { deferJournal: true });
    expect(dst.stats().undecoded).toBe(10);
    const last = dst.post({ elementId: 'vm:a', type: 'LOCAL', id: 'local-2' });
    await dst.idle();
    expect(dst.stats().undecoded).toBe(0); // the new event's arrival put the shipment's events in first
    expect(decodeHeld(dst.serializeHeld(scope))[0]!.events.map((e) => e.id)).toEqual([first.id, ...ids, last.id]);
  });

  it('drop forgets the blob and the events; a copy coming back is a duplicate', async () => {
    const scope = ['vm:a', 'nic:a'];
    const { bytes } = await shipment(scope, 10);
    const store = openStore();
    const dst = service('dst', store);
    dst.insertHeld(bytes, { deferJournal: true });
    dst.drop(scope);
    expect(rowCount(store, 'held_blobs')).toBe(0);
    expect(rowCount(store)).toBe(0);
    expect(dst.heldCount(scope)).toBe(0);
    expect(dst.insertHeld(bytes, { hold: false }).duplicates).toBe(20);
  });

  it('release of part of a shipment keeps the blob for the rest, which a restart recovers', async () => {
    const scope = ['vm:a', 'disk:a'];
    const { bytes } = await shipment(scope, 5);
    const file = tmpStoreFile();
    const store = openStore(file);
    const dst = service('dst', store);
    dst.insertHeld(bytes, { deferJournal: true });
    dst.release(['vm:a']);
    await dst.idle(); // vm:a's events reach nobody here and go
    expect(rowCount(store, 'held_blobs')).toBe(1);
    expect(rowCount(store)).toBe(0);
    await dst.close();
    store.close();

    const again = openStore(file);
    const back = service('dst', again);
    const got = recorder(back, 'disk:a');
    expect(rowCount(again, 'held_blobs')).toBe(0);
    expect(back.recover()).toBe(5);
    await back.idle();
    expect(got.map((e) => e.elementId)).toEqual(new Array(5).fill('disk:a'));
    expect(rowCount(again)).toBe(0);
  });

  it('after a crash before release, recovery delivers the events to the elements that now exist, in order', async () => {
    const scope = ['vm:a'];
    const { bytes, ids } = await shipment(scope, 25);
    const file = tmpStoreFile();
    const store = openStore(file);
    const dst = service('dst', store);
    dst.insertHeld(bytes, { deferJournal: true });
    store.close(); // killed: no release, no close

    const again = openStore(file);
    const back = service('dst', again);
    const got = recorder(back, 'vm:a'); // committed: the element is registered here
    expect(back.recover()).toBe(25);
    await back.idle();
    expect(idsOf(got)).toEqual(ids);
    expect(rowCount(again)).toBe(0);
    // New events get seqs after the recovered ones, and the recovered ids stay known.
    expect(back.insertHeld(bytes, { hold: false }).duplicates).toBe(25);
  });

  it('after a crash before the commit, recovery delivers nothing and deletes the events', async () => {
    const { bytes } = await shipment(['vm:a'], 25);
    const file = tmpStoreFile();
    const store = openStore(file);
    service('dst', store).insertHeld(bytes, { deferJournal: true });
    store.close();

    const again = openStore(file);
    const back = service('dst', again);
    expect(back.recover()).toBe(25);
    await back.idle();
    expect(back.stats().unrouted).toBe(25);
    expect(rowCount(again)).toBe(0);
    expect(rowCount(again, 'held_blobs')).toBe(0);
  });

  it('decodes at once a shipment the scan cannot vouch for, with the same outcome', async () => {
    const scope = ['vm:a'];
    const events = Array.from({ length: 5 }, (_, i) => ({ id: `peer.${i}`, ts: 1 + i, elementId: 'vm:a', type: 'TICK', payload: { at: new Date(1000 + i) } }));
    const bytes = encodeHeld([{ elementId: 'vm:a', events }]);
    const store = openStore();
    const dst = service('dst', store);
    expect(dst.insertHeld(bytes, { deferJournal: true })).toEqual({ accepted: 5, duplicates: 0 });
    expect(dst.stats()).toMatchObject({ held: 5, undecoded: 0 });
    expect(rowCount(store, 'held_blobs')).toBe(1);
    const got = recorder(dst, 'vm:a');
    dst.release(scope);
    await dst.idle();
    expect(got.map((e) => (e.payload as { at: Date }).at.getTime())).toEqual([1000, 1001, 1002, 1003, 1004]);
  });

  it('numbers a staged shipment like its blob row, so a restart after a partial release recovers the rest with the same seqs', async () => {
    const scope = ['vm:a', 'disk:a'];
    const { bytes } = await shipment(scope, 6);
    const file = tmpStoreFile();
    const store = openStore(file);
    const dst = service('dst', store);
    // One id of the shipment is known here already: the blob skips it, and so does the staged numbering.
    const dup = decodeHeld(bytes)[1]!.events[2]!;
    dst.post({ ...dup, payload: dup.payload ?? null });
    await dst.idle();
    expect(dst.insertHeld(bytes, { deferJournal: true })).toEqual({ accepted: 11, duplicates: 1 });
    expect(dst.stats().undecoded).toBe(11);
    const seqs: number[] = [];
    dst.subscribe('vm:a', { deliver: (_e, seq) => void seqs.push(seq) });
    dst.release(['vm:a']);
    await dst.idle();
    await dst.close();
    store.close();

    const again = openStore(file);
    const back = service('dst', again);
    const diskSeqs: number[] = [];
    back.subscribe('disk:a', { deliver: (e, seq) => void diskSeqs.push(seq) });
    expect(back.recover()).toBe(5);
    await back.idle();
    // vm:a's events are first in the bytes, then disk:a's with the duplicate skipped: one run of seqs, no gap, no overlap.
    expect([...seqs, ...diskSeqs]).toEqual(Array.from({ length: 11 }, (_, i) => seqs[0]! + i));
  });

  it('refuses garbage with EMBOT_ERR_HOLD_DECODE and stores nothing', () => {
    const store = openStore();
    const dst = service('dst', store);
    expectThrownCode(() => dst.insertHeld(new Uint8Array([1, 2, 3]), { deferJournal: true }), ErrorCodes.HOLD_DECODE, EventError);
    expect(rowCount(store, 'held_blobs')).toBe(0);
    expect(dst.stats().held).toBe(0);
  });
});

describe('drop with deleteLater', () => {
  it('forgets the elements at once and deletes their rows on the next turn, or before they are held again', async () => {
    const scope = ['vm:a'];
    const store = openStore();
    const s = service('src', store, 4);
    s.hold(scope);
    for (let i = 0; i < 20; i++) s.post({ elementId: 'vm:a', type: 'TICK' });
    await s.idle();
    expect(rowCount(store, 'held_spill')).toBeGreaterThan(0);
    s.drop(scope, { deleteLater: true });
    expect(s.heldCount(scope)).toBe(0);
    expect(rowCount(store)).toBe(20);
    await new Promise((r) => setImmediate(r));
    expect(rowCount(store)).toBe(0);
    expect(rowCount(store, 'held_spill')).toBe(0);

    s.hold(scope);
    for (let i = 0; i < 20; i++) s.post({ elementId: 'vm:a', type: 'TICK' });
    await s.idle();
    s.drop(scope, { deleteLater: true });
    s.hold(scope); // spill positions start over: the old rows must be gone first
    expect(rowCount(store)).toBe(0);
    expect(rowCount(store, 'held_spill')).toBe(0);
  });

  it('keeps rows journaled after the drop', async () => {
    const store = openStore();
    const s = service('src', store);
    s.hold(['vm:a']);
    await s.emit({ elementId: 'vm:a', type: 'OLD' });
    s.post({ elementId: 'vm:other', type: 'OTHER' }); // its journal commit is due before the drop's deletes
    s.drop(['vm:a'], { deleteLater: true });
    const stop = s.redirect(['vm:a'], () => new Promise<void>(() => {})); // never taken: its row stays
    const fresh = s.emit({ elementId: 'vm:a', type: 'NEW' });
    await new Promise((r) => setImmediate(r));
    await fresh;
    expect(rowCount(store)).toBe(1);
    expect(s.journaledFor(['vm:a'])).toBe(1);
    stop();
  });

  it('keeps the row of an event admitted before the drop but journaled after it (the source of a move, killed before the new owner took it)', async () => {
    // finishSource's order: an event posted just before the switch is staged (admitted, its journal commit on the
    // next turn); the redirect is installed, the moved elements are dropped with deleteLater. The event's commit runs
    // before the drop's deletes, and its row (seq below the drop's bound) must survive them: it is the one copy
    // until the sink's peer takes it.
    const store = openStore();
    const s = service('src', store);
    s.hold(['vm:a']);
    await s.emit({ elementId: 'vm:a', type: 'OLD' });
    const staged = s.emit({ elementId: 'vm:a', type: 'NEW' });
    const stop = s.redirect(['vm:a'], () => new Promise<void>(() => {})); // never taken (the source is killed): its row stays
    s.drop(['vm:a'], { deleteLater: true });
    await staged;
    await new Promise((r) => setImmediate(r));
    await new Promise((r) => setImmediate(r));
    expect(rowCount(store)).toBe(1);
    expect(s.journaledFor(['vm:a'])).toBe(1);
    stop();
  });
});
