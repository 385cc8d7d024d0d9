import { describe, expect, it } from 'vitest';
import type { EmbotEvent } from '../../core/events.ts';
import { Store } from '../../core/store/store.ts';
import { SensorService } from '../../sensors/index.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { rowCount, tempStores } from '../harness/temp-store.ts';

const cleanups = cleanupsAfterEach();
const { tmpStoreFile } = tempStores(cleanups, 'embot-taken-ids-');

/** One run of an agent's sensor service on `file`: a durable subscriber on vm:x that completes at once unless told not to. */
function run(file: string, opts: { complete?: boolean; dedupWindow?: number; now?: () => number } = {}) {
  const store = Store.open({ file });
  const s = new SensorService({
    host: 'a',
    store,
    onError: () => {},
    ...(opts.dedupWindow === undefined ? {} : { dedupWindow: opts.dedupWindow }),
    ...(opts.now === undefined ? {} : { now: opts.now }),
  });
  const got: EmbotEvent[] = [];
  s.subscribe('vm:x', {
    durable: true,
    deliver(e, seq) {
      got.push(e);
      if (opts.complete !== false) store.transaction(() => s.complete([seq]));
    },
  });
  let closed = false;
  const close = async (): Promise<void> => {
    if (closed) return;
    closed = true;
    await s.close();
    store.close();
  };
  cleanups.push(close);
  return { s, store, got, close };
}

const tick = (id: string, n: number) => ({ elementId: 'vm:x', type: 'TICK', payload: { n }, id });

describe('SensorService: producer-given ids survive a restart (README "Events: idempotent posts")', () => {
  it('an id taken and processed before the restart is answered but not taken again after it', async () => {
    const file = tmpStoreFile();
    const r1 = run(file);
    await r1.s.emit(tick('p-1', 1));
    await r1.s.idle();
    expect(r1.got.map((e) => e.id)).toEqual(['p-1']);
    expect(rowCount(r1.store)).toBe(0); // processed: its journal row is gone
    await r1.close();

    const r2 = run(file);
    expect(r2.s.recover()).toBe(0);
    await expect(r2.s.emit(tick('p-1', 1))).resolves.toMatchObject({ id: 'p-1' });
    await r2.s.emit(tick('p-2', 2));
    await r2.s.idle();
    expect(r2.got.map((e) => e.id)).toEqual(['p-2']);
    expect(r2.s.stats().duplicates).toBe(1);
  });

  it('an id still journaled at the restart is delivered once from the journal; its re-post is refused', async () => {
    const file = tmpStoreFile();
    const r1 = run(file, { complete: false });
    await r1.s.emit(tick('p-1', 1));
    await r1.s.idle();
    await r1.close();

    const r2 = run(file);
    expect(r2.s.recover()).toBe(1);
    await r2.s.emit(tick('p-1', 1));
    await r2.s.idle();
    expect(r2.got.map((e) => e.id)).toEqual(['p-1']);
    expect(r2.s.stats().duplicates).toBe(1);
  });

  it('keeps the newest window of ids: those re-posted are refused, an older one is taken again (the bound)', async () => {
    const file = tmpStoreFile();
    const r1 = run(file, { dedupWindow: 10 });
    for (let i = 0; i < 30; i++) await r1.s.emit(tick(`p-${i}`, i));
    await r1.s.idle();
    expect(rowCount(r1.store, 'taken_ids')).toBeLessThanOrEqual(11);
    await r1.close();

    const r2 = run(file, { dedupWindow: 10 });
    r2.s.recover();
    for (let i = 20; i < 30; i++) await r2.s.emit(tick(`p-${i}`, i));
    await r2.s.emit(tick('p-0', 0));
    await r2.s.idle();
    expect(r2.got.map((e) => e.id)).toEqual(['p-0']);
    expect(r2.s.stats().duplicates).toBe(10);
  });

  it('ids the service makes itself are not recorded, and a journal write that fails records none', async () => {
    const file = tmpStoreFile();
    const r1 = run(file);
    await r1.s.emitMany([{ elementId: 'vm:x', type: 'TICK' }, { elementId: 'vm:x', type: 'TICK' }]);
    expect(rowCount(r1.store, 'taken_ids')).toBe(0);
    await r1.s.emit(tick('p-1', 1));
    expect(rowCount(r1.store, 'taken_ids')).toBe(1);
    // The events table refuses the next row: the transaction rolls back, the id with it.
    r1.store.db.exec("CREATE TRIGGER refuse BEFORE INSERT ON events WHEN NEW.id = 'p-2' BEGIN SELECT RAISE(ABORT, 'test: disk full'); END");
    await expect(r1.s.emit(tick('p-2', 2))).rejects.toMatchObject({ name: 'StoreError' });
    expect(r1.store.db.prepare('SELECT id FROM taken_ids ORDER BY rowid').pluck().all()).toEqual(['p-1']);
    // Not taken, so not refused either: the producer's re-post goes through once the disk is back.
    r1.store.db.exec('DROP TRIGGER refuse');
    await r1.s.emit(tick('p-2', 2));
    await r1.s.idle();
    expect(r1.got.filter((e) => e.id === 'p-2')).toHaveLength(1);
  });

  describe('a repeat is answered with the first copy (id, ts) and duplicate: true', () => {
    /** A clock the test moves: the service stamps events without a ts with it. */
    const clock = (start: number) => {
      let t = start;
      return { now: () => t, set: (v: number) => void (t = v) };
    };
    const plain = (id: string) => ({ elementId: 'vm:x', type: 'TICK', id });

    it('in memory: a re-post later, one with its own ts, and one in the same tick as the first', async () => {
      const c = clock(1_000);
      const r = run(tmpStoreFile(), { now: c.now });
      const first = await r.s.emit(plain('p-1'));
      expect(first).toMatchObject({ id: 'p-1', ts: 1_000 });
      expect(first).not.toHaveProperty('duplicate');
      c.set(5_000);
      await expect(r.s.emit(plain('p-1'))).resolves.toMatchObject({ id: 'p-1', ts: 1_000, duplicate: true });
      await expect(r.s.emit({ ...plain('p-1'), ts: 7_777 })).resolves.toMatchObject({ id: 'p-1', ts: 1_000, duplicate: true });
      // Both copies in one group commit: the second is answered once the first is journaled, with its ts.
      const [a, b] = await Promise.all([r.s.emit({ ...plain('p-2'), ts: 42 }), r.s.emit({ ...plain('p-2'), ts: 43 })]);
      expect(a).toMatchObject({ ts: 42 });
      expect(a).not.toHaveProperty('duplicate');
      expect(b).toMatchObject({ id: 'p-2', ts: 42, duplicate: true });
      await r.s.idle();
      expect(r.got.map((e) => [e.id, e.ts])).toEqual([
        ['p-1', 1_000],
        ['p-2', 42],
      ]);
    });

    it('without a store: the same answer', async () => {
      const s = new SensorService({ host: 'a', onError: () => {}, now: () => 9 });
      cleanups.push(() => s.close());
      await s.emit({ ...plain('p-1'), ts: 3 });
      await expect(s.emit(plain('p-1'))).resolves.toMatchObject({ ts: 3, duplicate: true });
    });

    it('after a restart: the processed id from taken_ids, the still-journaled one from its row', async () => {
      const file = tmpStoreFile();
      const c = clock(1_000);
      const r1 = run(file, { now: c.now, complete: false });
      await r1.s.emit({ ...plain('done'), ts: 111 });
      await r1.s.idle();
      // 'done' is processed (its journal row gone); 'waiting' stays journaled, unprocessed.
      r1.store.db.exec("DELETE FROM events WHERE id = 'done'");
      await r1.s.emit(plain('waiting'));
      await r1.close();

      c.set(9_000);
      const r2 = run(file, { now: c.now });
      expect(r2.s.recover()).toBe(1);
      await expect(r2.s.emit(plain('done'))).resolves.toMatchObject({ id: 'done', ts: 111, duplicate: true });
      await expect(r2.s.emit(plain('waiting'))).resolves.toMatchObject({ id: 'waiting', ts: 1_000, duplicate: true });
      await r2.s.idle();
      expect(r2.got.map((e) => [e.id, e.ts])).toEqual([['waiting', 1_000]]);
      expect(r2.s.stats().duplicates).toBe(2);
    });

    it('an id that came in a migration shipment (undecoded ts while held): after the release, the shipped ts', async () => {
      const src = new SensorService({ host: 'src', onError: () => {} });
      cleanups.push(() => src.close());
      src.hold(['vm:x']);
      await src.emit({ ...plain('m-1'), ts: 77 });
      const r = run(tmpStoreFile(), { now: () => 9_000 });
      expect(r.s.insertHeld(src.serializeHeld(['vm:x']), { deferJournal: true })).toEqual({ accepted: 1, duplicates: 0 });
      // Held and not decoded: still refused, with the re-post's ts as the one at hand.
      await expect(r.s.emit(plain('m-1'))).resolves.toMatchObject({ id: 'm-1', ts: 9_000, duplicate: true });
      r.s.release(['vm:x']);
      await r.s.idle();
      expect(r.got.map((e) => [e.id, e.ts])).toEqual([['m-1', 77]]);
      await expect(r.s.emit(plain('m-1'))).resolves.toMatchObject({ id: 'm-1', ts: 77, duplicate: true });
    });

    it('a commit of many given ids (multi-row inserts and the rest one by one): each recorded with its ts, in order', async () => {
      const file = tmpStoreFile();
      const r1 = run(file);
      await r1.s.emitMany(Array.from({ length: 123 }, (_, i) => ({ ...plain(`m-${i}`), ts: 1_000 + i })));
      await r1.s.idle();
      expect(r1.store.db.prepare('SELECT id, ts FROM taken_ids ORDER BY rowid').raw().all()).toEqual(Array.from({ length: 123 }, (_, i) => [`m-${i}`, 1_000 + i]));
      await r1.close();
      const r2 = run(file, { now: () => 9_000 });
      r2.s.recover();
      for (const i of [0, 49, 50, 99, 100, 122]) await expect(r2.s.emit(plain(`m-${i}`))).resolves.toMatchObject({ ts: 1_000 + i, duplicate: true });
    });

    it('a row from before schema step 11 (no ts) is answered with the time it was taken', async () => {
      const file = tmpStoreFile();
      const c = clock(2_000);
      const r1 = run(file, { now: c.now });
      await r1.s.emit({ ...plain('old'), ts: 5 });
      await r1.s.idle();
      r1.store.db.exec('UPDATE taken_ids SET ts = NULL');
      await r1.close();

      const r2 = run(file, { now: () => 9_000 });
      r2.s.recover();
      await expect(r2.s.emit(plain('old'))).resolves.toMatchObject({ id: 'old', ts: 2_000, duplicate: true });
    });
  });
});
