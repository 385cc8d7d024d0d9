import { describe, expect, it } from 'vitest';
import type { EmbotEvent } from '../../core/events.ts';
import { Store } from '../../core/store/store.ts';
import { SensorService } from '../../sensors/index.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { rowCount, tempStores } from '../harness/temp-store.ts';

const cleanups = cleanupsAfterEach();
const { tmpStoreFile } = tempStores(cleanups, 'embot-taken-ids-');

/** One run of an agent's sensor service on `file`: a durable subscriber on vm:x that completes at once unless told not to. */
function run(file: string, opts: { complete?: boolean; dedupWindow?: number } = {}) {
  const store = Store.open({ file });
  const s = new SensorService({ host: 'a', store, onError: () => {}, ...(opts.dedupWindow === undefined ? {} : { dedupWindow: opts.dedupWindow }) });
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
});
