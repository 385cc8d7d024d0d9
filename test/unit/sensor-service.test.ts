import { describe, expect, it } from 'vitest';
import { ErrorCodes, EventError } from '../../core/errors.ts';
import type { EmbotEvent, EmbotEventInput } from '../../core/events.ts';
import { Store } from '../../core/store/store.ts';
import { SensorService } from '../../sensors/index.ts';
import type { SensorContext, SensorLogic, Subscriber } from '../../sensors/index.ts';
import { eventPackr } from '../../sensors/journal.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { expectThrownCode } from '../harness/expect-code.ts';
import { prng } from '../harness/prng.ts';
import { rowCount, tempStores } from '../harness/temp-store.ts';

const cleanups = cleanupsAfterEach();
const { tmpStoreFile, openStore } = tempStores(cleanups, 'embot-sensors-');

function service(opts: Partial<ConstructorParameters<typeof SensorService>[0]> = {}): SensorService {
  const s = new SensorService({ host: 'a', onError: () => {}, ...opts });
  cleanups.push(() => s.close());
  return s;
}

/** Records every delivery; durable recorders complete right away unless told otherwise. */
function recorder(s: SensorService, elementId: string, opts: { durable?: boolean; autoComplete?: boolean } = {}) {
  const got: { event: EmbotEvent; seq: number }[] = [];
  const sub: Subscriber = {
    durable: opts.durable ?? false,
    deliver(event, seq) {
      got.push({ event, seq });
      if (opts.durable && opts.autoComplete !== false) s.complete([seq]);
    },
  };
  const off = s.subscribe(elementId, sub);
  return { got, off };
}

const expectCode = (fn: () => unknown, code: string): void => expectThrownCode(fn, code, EventError);

describe('SensorService: posting and dispatch', () => {
  it('fills id and ts, and delivers the events of one tick in (ts, arrival) order', async () => {
    const s = service({ now: () => 1000 });
    const r = recorder(s, 'vm:x');
    const a = s.post({ elementId: 'vm:x', type: 'A', ts: 30 });
    const b = s.post({ elementId: 'vm:x', type: 'B', ts: 10 });
    const c = s.post({ elementId: 'vm:x', type: 'C' });
    const d = s.post({ elementId: 'vm:x', type: 'D', ts: 10 });
    expect(c.ts).toBe(1000);
    expect(a.id).toMatch(/^a\.[0-9a-z]+\.0$/);
    expect(new Set([a.id, b.id, c.id, d.id]).size).toBe(4);
    expect(r.got).toHaveLength(0); // dispatch is asynchronous
    await s.idle();
    expect(r.got.map((g) => g.event.type)).toEqual(['B', 'D', 'A', 'C']);
    expect(s.stats()).toMatchObject({ dispatched: 4, delivered: 4, unrouted: 0, queued: 0 });
  });

  it('counts events nobody subscribes to as unrouted, and delivers to every subscriber of an element', async () => {
    const s = service();
    const r1 = recorder(s, 'vm:x');
    const r2 = recorder(s, 'vm:x');
    s.post({ elementId: 'vm:x', type: 'A' });
    s.post({ elementId: 'vm:nobody', type: 'A' });
    await s.idle();
    expect(r1.got).toHaveLength(1);
    expect(r2.got).toHaveLength(1);
    r2.off();
    s.post({ elementId: 'vm:x', type: 'B' });
    await s.idle();
    expect(r1.got).toHaveLength(2);
    expect(r2.got).toHaveLength(1);
    expect(s.stats()).toMatchObject({ unrouted: 1, delivered: 3 });
  });

  it('a subscriber that throws is counted and does not stop dispatch to others', async () => {
    const errors: string[] = [];
    const s = service({ onError: (_e, where) => errors.push(where) });
    s.subscribe('vm:x', { deliver: () => { throw new Error('boom'); } });
    const r = recorder(s, 'vm:x');
    s.post({ elementId: 'vm:x', type: 'A' });
    s.post({ elementId: 'vm:x', type: 'B' });
    await s.idle();
    expect(r.got).toHaveLength(2);
    expect(s.stats().deliveryErrors).toBe(2);
    expect(errors).toHaveLength(2);
  });
});

describe('SensorService: hold, release, serialize, insert', () => {
  it('hold takes already-queued events out of dispatch; release delivers them by ts', async () => {
    const s = service();
    const r = recorder(s, 'vm:x');
    s.post({ elementId: 'vm:x', type: 'A', ts: 5 });
    s.post({ elementId: 'vm:x', type: 'B', ts: 1 });
    s.hold(['vm:x']);
    expect(s.isHeld('vm:x')).toBe(true);
    s.post({ elementId: 'vm:x', type: 'C', ts: 3 });
    await s.idle();
    expect(r.got).toHaveLength(0);
    expect(s.stats().held).toBe(3);
    s.release(['vm:x']);
    expect(s.isHeld('vm:x')).toBe(false);
    await s.idle();
    expect(r.got.map((g) => g.event.type)).toEqual(['B', 'C', 'A']);
    expect(s.stats().held).toBe(0);
  });

  for (const mode of ['memory', 'durable'] as const) {
    it(`random post/hold/release sequences never lose or duplicate an event and keep per-element ts order (${mode})`, async () => {
      const store = mode === 'durable' ? openStore(tmpStoreFile()) : undefined;
      const s = service({ store, holdMemoryLimit: 8 });
      const elements = ['vm:e0', 'vm:e1', 'vm:e2', 'vm:e3', 'vm:e4'];
      const got = new Map<string, { ts: number; seq: number; id: string }[]>();
      for (const el of elements) {
        got.set(el, []);
        s.subscribe(el, { durable: true, deliver: (e, seq) => { got.get(el)!.push({ ts: e.ts, seq, id: e.id }); s.complete([seq]); } });
      }
      const rnd = prng(mode === 'memory' ? 42 : 43);
      const posted = new Set<string>();
      for (let round = 0; round < 60; round++) {
        for (let op = 0; op < 25; op++) {
          const r = rnd();
          const el = elements[Math.floor(rnd() * elements.length)]!;
          // Later rounds never carry older timestamps than earlier ones; within a round, any order.
          if (r < 0.8) posted.add(s.post({ elementId: el, type: 'T', ts: round * 1000 + Math.floor(rnd() * 50) }).id);
          else if (r < 0.9) s.hold([el]);
          else s.release([el]);
        }
        if (rnd() < 0.5) await s.idle();
        else await new Promise((res) => setImmediate(res));
      }
      s.release(elements);
      await s.idle();
      const delivered = [...got.values()].flat();
      expect(delivered).toHaveLength(posted.size);
      expect(new Set(delivered.map((d) => d.id))).toEqual(posted);
      for (const list of got.values()) {
        for (let i = 1; i < list.length; i++) {
          const a = list[i - 1]!;
          const b = list[i]!;
          expect(a.ts < b.ts || (a.ts === b.ts && a.seq < b.seq)).toBe(true);
        }
      }
      if (store) expect(rowCount(store)).toBe(0);
      expect(s.stats()).toMatchObject({ held: 0, spilled: 0, journaled: 0, inFlight: 0 });
    });
  }

  it('a migration (hold, serialize, insert at the target, drop at the source, release at the target) delivers every event exactly once', async () => {
    const storeA = openStore(tmpStoreFile());
    const storeB = openStore(tmpStoreFile());
    const src = service({ host: 'src', store: storeA, holdMemoryLimit: 4 });
    const dst = service({ host: 'dst', store: storeB, holdMemoryLimit: 4 });
    const atSrc = recorder(src, 'vm:m', { durable: true });
    const atDst = recorder(dst, 'vm:m', { durable: true });
    const ids: string[] = [];
    for (let i = 0; i < 10; i++) ids.push(src.post({ elementId: 'vm:m', type: 'T', ts: i }).id);
    await src.idle();
    src.hold(['vm:m']);
    for (let i = 10; i < 30; i++) ids.push(src.post({ elementId: 'vm:m', type: 'T', ts: i }).id);
    await src.idle();
    expect(src.stats().spilled).toBeGreaterThan(0);
    dst.insertHeld(src.serializeHeld(['vm:m']));
    // a late event reaches the source and is forwarded after the switch, twice
    const late = src.post({ elementId: 'vm:m', type: 'T', ts: 30 });
    ids.push(late.id);
    src.drop(['vm:m']);
    dst.release(['vm:m']);
    dst.post(late);
    dst.post(late);
    await src.idle();
    await dst.idle();
    expect(atSrc.got.map((g) => g.event.ts)).toEqual([...Array(10).keys()]);
    expect(atDst.got.map((g) => g.event.ts)).toEqual([...Array(21).keys()].map((i) => i + 10));
    expect([...atSrc.got, ...atDst.got].map((g) => g.event.id)).toEqual(ids);
    expect(dst.stats().duplicates).toBe(1);
    expect(rowCount(storeA)).toBe(0);
    expect(rowCount(storeB)).toBe(0);
  });

  it('serialize / insert round-trips byte-exact, with every payload shape and the spilled part', async () => {
    const store = openStore(tmpStoreFile());
    const src = service({ host: 'src', store, holdMemoryLimit: 3 });
    src.hold(['vm:a', 'vm:b']);
    const payloads: unknown[] = [
      null,
      { nested: { list: [1, -2.5, 'x', true, null], text: 'ünïcødé ✓' } },
      new Uint8Array([0, 1, 254, 255]),
      new Date(1_700_000_000_123),
      2n ** 40n,
      [[], {}, ''],
      Number.MAX_SAFE_INTEGER,
      { a: undefined },
    ];
    payloads.forEach((payload, i) => src.post({ elementId: i % 2 ? 'vm:a' : 'vm:b', type: 'SHAPE', ts: 100 - i, payload }));
    src.post({ elementId: 'vm:a', type: 'WITH_SOURCE', payload: 1, source: 'vm' });
    await src.idle();
    expect(src.stats().spilled).toBeGreaterThan(0);
    const bytes = src.serializeHeld(['vm:a', 'vm:b']);
    const mid = service({ host: 'mid' });
    mid.insertHeld(bytes);
    const again = mid.serializeHeld(['vm:a', 'vm:b']);
    expect(Buffer.from(again).equals(Buffer.from(bytes))).toBe(true);
    const durableTarget = service({ host: 'dst', store: openStore(tmpStoreFile()), holdMemoryLimit: 2 });
    durableTarget.insertHeld(again);
    expect(durableTarget.stats().spilled).toBeGreaterThan(0);
    expect(Buffer.from(durableTarget.serializeHeld(['vm:a', 'vm:b'])).equals(Buffer.from(bytes))).toBe(true);
    const decoded = eventPackr.unpack(bytes) as { v: number; queues: { elementId: string; events: EmbotEvent[] }[] };
    expect(decoded.v).toBe(1);
    expect(decoded.queues.map((q) => [q.elementId, q.events.length])).toEqual([['vm:a', 5], ['vm:b', 4]]);
    expect(decoded.queues[0]!.events.at(-1)).toMatchObject({ type: 'WITH_SOURCE', source: 'vm' });
  });

  it('a hold queue past its memory limit spills to SQLite and release delivers everything in order', async () => {
    const store = openStore(tmpStoreFile());
    const s = service({ store, holdMemoryLimit: 10 });
    const r = recorder(s, 'vm:big', { durable: true });
    s.hold(['vm:big']);
    for (let i = 0; i < 500; i++) s.post({ elementId: 'vm:big', type: 'T', ts: 1000 - (i % 7), payload: { i } });
    await s.idle();
    const st = s.stats();
    expect(st.held).toBe(500);
    expect(st.spilled).toBeGreaterThanOrEqual(490);
    expect(rowCount(store, 'held_spill')).toBe(st.spilled);
    expect(rowCount(store)).toBe(500); // held events stay journaled
    s.release(['vm:big']);
    await s.idle();
    expect(r.got).toHaveLength(500);
    const order = r.got.map((g) => [g.event.ts, g.seq] as const);
    expect(order).toEqual([...order].sort((a, b) => a[0] - b[0] || a[1] - b[1]));
    expect(new Set(r.got.map((g) => (g.event.payload as { i: number }).i)).size).toBe(500);
    expect(rowCount(store, 'held_spill')).toBe(0);
    expect(rowCount(store)).toBe(0);
  });

  it('without a store a hold queue past its limit stays in memory and loses nothing', async () => {
    const s = service({ holdMemoryLimit: 5 });
    const r = recorder(s, 'vm:x');
    s.hold(['vm:x']);
    for (let i = 0; i < 50; i++) s.post({ elementId: 'vm:x', type: 'T', ts: i });
    await s.idle();
    expect(s.stats()).toMatchObject({ held: 50, spilled: 0 });
    s.release(['vm:x']);
    await s.idle();
    expect(r.got.map((g) => g.event.ts)).toEqual([...Array(50).keys()]);
  });

  it('drop discards the hold queue, its journal rows and the subscriptions', async () => {
    const store = openStore(tmpStoreFile());
    const s = service({ store, holdMemoryLimit: 4 });
    const r = recorder(s, 'vm:gone', { durable: true });
    const keep = recorder(s, 'vm:stay', { durable: true, autoComplete: false });
    s.hold(['vm:gone']);
    for (let i = 0; i < 20; i++) s.post({ elementId: 'vm:gone', type: 'T' });
    s.post({ elementId: 'vm:stay', type: 'T' });
    await s.idle();
    expect(rowCount(store)).toBe(21);
    s.drop(['vm:gone']);
    expect(s.isHeld('vm:gone')).toBe(false);
    expect(rowCount(store)).toBe(1);
    expect(rowCount(store, 'held_spill')).toBe(0);
    s.post({ elementId: 'vm:gone', type: 'AFTER' });
    await s.idle();
    expect(r.got).toHaveLength(0);
    expect(keep.got).toHaveLength(1);
    expect(s.stats().held).toBe(0);
  });
});

describe('SensorService: journal and recovery', () => {
  it('journals before acknowledging, dispatches only journaled events, deletes once the durable subscriber completes', async () => {
    const store = openStore(tmpStoreFile());
    const s = service({ store });
    const seenInJournal: boolean[] = [];
    const pendingSeqs: number[] = [];
    s.subscribe('vm:x', {
      durable: true,
      deliver(e, seq) {
        seenInJournal.push(store.db.prepare('SELECT 1 FROM events WHERE id = ? AND seq = ?').get(e.id, seq) !== undefined);
        pendingSeqs.push(seq);
      },
    });
    const promise = s.emit({ elementId: 'vm:x', type: 'A', payload: { n: 1 } });
    expect(rowCount(store)).toBe(0); // group commit happens on the next tick
    const event = await promise;
    const row = store.db.prepare('SELECT * FROM events WHERE id = ?').get(event.id) as { element_id: string; type: string; payload: Buffer };
    expect(row).toMatchObject({ element_id: 'vm:x', type: 'A' });
    expect(eventPackr.unpack(row.payload)).toEqual({ n: 1 });
    await s.idle();
    expect(seenInJournal).toEqual([true]);
    expect(s.stats()).toMatchObject({ journaled: 1, inFlight: 1 });
    store.transaction(() => s.complete(pendingSeqs));
    expect(rowCount(store)).toBe(0);
    expect(s.stats()).toMatchObject({ journaled: 0, inFlight: 0 });
    s.complete(pendingSeqs); // completing twice is harmless
  });

  it('needs every durable subscriber to complete; non-durable and unrouted rows go right away', async () => {
    const store = openStore(tmpStoreFile());
    const s = service({ store });
    const d1 = recorder(s, 'vm:x', { durable: true, autoComplete: false });
    recorder(s, 'vm:x', { durable: true, autoComplete: false });
    recorder(s, 'vm:y');
    const events = await s.emitMany([
      { elementId: 'vm:x', type: 'A' },
      { elementId: 'vm:y', type: 'B' },
      { elementId: 'vm:z', type: 'C' },
    ]);
    expect(events).toHaveLength(3);
    await s.idle();
    expect(rowCount(store)).toBe(1);
    s.complete([d1.got[0]!.seq]);
    expect(rowCount(store)).toBe(1);
    s.complete([d1.got[0]!.seq]);
    expect(rowCount(store)).toBe(0);
  });

  it('recover() after closing and reopening the store re-delivers the unprocessed events exactly once, in order', async () => {
    const file = tmpStoreFile();
    const store1 = Store.open({ file });
    const s1 = new SensorService({ host: 'a', store: store1 });
    const first = recorder(s1, 'vm:x', { durable: true, autoComplete: false });
    const acked: EmbotEvent[] = [];
    for (let i = 0; i < 40; i++) acked.push(await s1.emit({ elementId: 'vm:x', type: 'T', ts: 1000 + i, payload: { i } }));
    await s1.idle();
    expect(first.got).toHaveLength(40);
    store1.transaction(() => s1.complete(first.got.slice(0, 15).map((g) => g.seq)));
    s1.hold(['vm:x']);
    s1.post({ elementId: 'vm:x', type: 'HELD_AT_CRASH', ts: 2000 });
    await s1.idle();
    await s1.close();
    store1.close();

    const store2 = openStore(file);
    const s2 = service({ store: store2 });
    const second = recorder(s2, 'vm:x', { durable: true });
    const fresh = s2.post({ elementId: 'vm:x', type: 'NEW', ts: 5000 });
    expect(s2.recover()).toBe(26);
    expect(s2.recover()).toBe(0);
    await s2.idle();
    expect(second.got.map((g) => g.event.id)).toEqual([...acked.slice(15).map((e) => e.id), second.got[25]!.event.id, fresh.id]);
    expect(second.got[25]!.event.type).toBe('HELD_AT_CRASH');
    expect(second.got[0]!.event.payload).toEqual({ i: 15 });
    expect(new Set(second.got.map((g) => g.seq)).size).toBe(27);
    expect(fresh.id).not.toBe(acked[0]!.id.replace(/\d+$/, '0'));
    expect(rowCount(store2)).toBe(0);
    await s2.close();

    const s3 = service({ store: store2 });
    expect(s3.recover()).toBe(0);
  });

  it('close() journals what was posted, so acknowledgements hold even when nothing was dispatched', async () => {
    const file = tmpStoreFile();
    const store = openStore(file);
    const s = new SensorService({ host: 'a', store });
    const p = s.emit({ elementId: 'vm:x', type: 'A' });
    await s.close();
    await expect(p).resolves.toMatchObject({ type: 'A' });
    expect(rowCount(store)).toBe(1);
    expectCode(() => s.post({ elementId: 'vm:x', type: 'B' }), ErrorCodes.AGENT_STOPPED);
    const s2 = service({ store });
    const r = recorder(s2, 'vm:x');
    expect(s2.recover()).toBe(1);
    await s2.idle();
    expect(r.got.map((g) => g.event.type)).toEqual(['A']);
  });
});

describe('SensorService: journal failures', () => {
  it('a failed group commit rejects the acknowledgement with a StoreError and dispatches nothing unacknowledged', async () => {
    const file = tmpStoreFile();
    const store = Store.open({ file });
    const errors: string[] = [];
    const s = service({ store, onError: (_e, where) => errors.push(where) });
    const r = recorder(s, 'vm:x');
    await s.emit({ elementId: 'vm:x', type: 'BEFORE' });
    await s.idle();
    store.close(); // the disk is gone
    const p = s.emit({ elementId: 'vm:x', type: 'LOST' });
    s.post({ elementId: 'vm:x', type: 'ALSO_UNACKED' });
    await expect(p).rejects.toMatchObject({ name: 'StoreError' });
    await s.idle();
    expect(r.got.map((g) => g.event.type)).toEqual(['BEFORE']);
    expect(s.stats().rejected).toBe(2);
    s.post({ elementId: 'vm:x', type: 'NOT_ACKED' });
    await s.idle();
    expect(errors).toContain('journal');
  });
});

describe('SensorService: duplicates and mutes', () => {
  it('ignores an event whose id is queued, held, journaled or processed recently', async () => {
    const store = openStore(tmpStoreFile());
    const s = service({ store, holdMemoryLimit: 2 });
    const r = recorder(s, 'vm:x');
    const e = s.post({ elementId: 'vm:x', type: 'A', id: 'peer.1.1' });
    s.post({ ...e }); // queued
    await s.idle();
    s.post({ ...e }); // processed recently
    const own = s.post({ elementId: 'vm:x', type: 'B' });
    await s.idle();
    s.post(own); // minted here: always a duplicate
    s.hold(['vm:h']);
    const held = [1, 2, 3, 4, 5].map((i) => s.post({ elementId: 'vm:h', type: 'H', id: `peer.2.${i}` }));
    await s.idle();
    expect(s.stats().spilled).toBeGreaterThan(0);
    s.post(held[0]!); // spilled: caught by the journal
    s.post(held[4]!); // in memory
    await s.idle();
    expect(r.got.map((g) => g.event.type)).toEqual(['A', 'B']);
    expect(s.stats().duplicates).toBe(5);
    expect(s.stats().held).toBe(5);
  });

  it('forgets processed ids beyond the de-duplication window (memory stays bounded)', async () => {
    const s = service({ dedupWindow: 3 });
    const r = recorder(s, 'vm:x');
    for (let i = 0; i < 5; i++) s.post({ elementId: 'vm:x', type: 'A', id: `p.${i}` });
    await s.idle();
    s.post({ elementId: 'vm:x', type: 'A', id: 'p.4' });
    s.post({ elementId: 'vm:x', type: 'A', id: 'p.0' });
    await s.idle();
    expect(r.got.map((g) => g.event.id)).toEqual(['p.0', 'p.1', 'p.2', 'p.3', 'p.4', 'p.0']);
  });

  it('mute suppresses only that sensor for that element, nests, and unmutes', async () => {
    const s = service();
    const rx = recorder(s, 'vm:x');
    const ry = recorder(s, 'vm:y');
    const unmute1 = s.mute('vm:x', 'vm');
    const unmute2 = s.mute('vm:x', 'vm');
    s.post({ elementId: 'vm:x', type: 'VM_STOPPED', source: 'vm' });
    s.post({ elementId: 'vm:x', type: 'HOST', source: 'host' });
    s.post({ elementId: 'vm:x', type: 'PLAIN' });
    s.post({ elementId: 'vm:y', type: 'VM_STOPPED', source: 'vm' });
    unmute1();
    unmute1(); // idempotent: the second mute still holds
    s.post({ elementId: 'vm:x', type: 'STILL_MUTED', source: 'vm' });
    unmute2();
    s.post({ elementId: 'vm:x', type: 'VM_STARTED', source: 'vm' });
    await s.idle();
    expect(rx.got.map((g) => g.event.type)).toEqual(['HOST', 'PLAIN', 'VM_STARTED']);
    expect(ry.got.map((g) => g.event.type)).toEqual(['VM_STOPPED']);
    expect(s.stats().muted).toBe(2);
  });
});

describe('SensorService: bad input', () => {
  it('refuses bad events with EMBOT_ERR_EVENT_INVALID and keeps working', async () => {
    const store = openStore(tmpStoreFile());
    const s = service({ store });
    const r = recorder(s, 'vm:x', { durable: true });
    class Thing { x = 1; }
    const cyclic: Record<string, unknown> = {};
    cyclic.self = cyclic;
    const bad: unknown[] = [
      { elementId: 'vm:x', type: 'lowercase' },
      { elementId: 'vm:x' },
      { type: 'A' },
      { elementId: '', type: 'A' },
      { elementId: 'has space', type: 'A' },
      { elementId: 'vm:x', type: 'A', payload: () => 1 },
      { elementId: 'vm:x', type: 'A', payload: { nested: [{ f() {} }] } },
      { elementId: 'vm:x', type: 'A', payload: new Thing() },
      { elementId: 'vm:x', type: 'A', payload: new Map() },
      { elementId: 'vm:x', type: 'A', payload: Symbol('s') },
      { elementId: 'vm:x', type: 'A', payload: 2n ** 80n },
      { elementId: 'vm:x', type: 'A', payload: cyclic },
      { elementId: 'vm:x', type: 'A', ts: Number.NaN },
      { elementId: 'vm:x', type: 'A', ts: -1 },
      { elementId: 'vm:x', type: 'A', ts: '5' },
      { elementId: 'vm:x', type: 'A', id: '' },
      { elementId: 'vm:x', type: 'A', id: 42 },
      { elementId: 'vm:x', type: 'A', source: 7 },
      { elementId: 'vm:x', type: 'A', id: 'a.zzzzzz.0' }, // fine: another epoch (foreign)
      null,
      'VM_CRASHED',
    ];
    let accepted = 0;
    for (const input of bad) {
      try {
        s.post(input as EmbotEventInput);
        accepted++;
      } catch (e) {
        expect(e).toBeInstanceOf(EventError);
        expect((e as EventError).code).toBe(ErrorCodes.EVENT_INVALID);
      }
    }
    expect(accepted).toBe(1);
    await expect(s.emit({ elementId: 'vm:x', type: 'A', payload: () => 1 })).rejects.toMatchObject({ code: ErrorCodes.EVENT_INVALID });
    await expect(s.emitMany([{ elementId: 'vm:x', type: 'OK' }, { elementId: 'vm:x', type: 'bad' }])).rejects.toMatchObject({ code: ErrorCodes.EVENT_INVALID });
    await s.idle();
    expect(r.got.map((g) => g.event.id)).toEqual(['a.zzzzzz.0']); // emitMany posted none
    const ok = await s.emit({ elementId: 'vm:x', type: 'STILL_WORKS', payload: { fine: true } });
    await s.idle();
    expect(r.got.at(-1)!.event.id).toBe(ok.id);
    expect(rowCount(store)).toBe(0);
  });

  it('refuses an id in its own namespace that it did not mint (it would collide with a future event)', () => {
    const s = service();
    const e = s.post({ elementId: 'vm:x', type: 'A' });
    const forged = e.id.replace(/\.0$/, '.zz');
    expectCode(() => s.post({ elementId: 'vm:x', type: 'A', id: forged }), ErrorCodes.EVENT_INVALID);
  });

  it('refuses garbage hold-queue bytes with EMBOT_ERR_HOLD_DECODE, changes nothing, keeps working', async () => {
    const store = openStore(tmpStoreFile());
    const s = service({ store });
    const goodEvent = { id: 'p.1', ts: 1, elementId: 'vm:x', type: 'A', payload: null };
    const garbage: unknown[] = [
      new Uint8Array([0xc1, 0xff, 0x00]),
      new Uint8Array(0),
      Uint8Array.from({ length: 64 }, (_, i) => (i * 37) & 255),
      eventPackr.pack({ v: 2, queues: [] }),
      eventPackr.pack({ v: 1, queues: 'nope' }),
      eventPackr.pack({ v: 1, queues: [{ elementId: 'bad id', events: [] }] }),
      eventPackr.pack({ v: 1, queues: [{ elementId: 'vm:x', events: [goodEvent, { ...goodEvent, id: 'p.2', elementId: 'vm:other' }] }] }),
      eventPackr.pack({ v: 1, queues: [{ elementId: 'vm:x', events: [{ ...goodEvent, type: 'lower' }] }] }),
      eventPackr.pack({ v: 1, queues: [{ elementId: 'vm:x', events: [{ ...goodEvent, ts: 'x' }] }] }),
      eventPackr.pack({ v: 1, queues: [{ elementId: 'vm:x', events: [goodEvent] }, { elementId: 'vm:x', events: [] }] }),
      'not bytes',
    ];
    for (const g of garbage) expectCode(() => s.insertHeld(g as Uint8Array), ErrorCodes.HOLD_DECODE);
    expect(s.isHeld('vm:x')).toBe(false);
    expect(rowCount(store)).toBe(0);
    expect(s.stats().held).toBe(0);
    s.insertHeld(eventPackr.pack({ v: 1, queues: [{ elementId: 'vm:x', events: [goodEvent] }] }));
    expect(s.stats().held).toBe(1);
    expect(rowCount(store)).toBe(1);
  });

  it('rejects bad element ids for hold/release/drop/subscribe and serializeHeld of an element that is not held', () => {
    const s = service();
    expectCode(() => s.hold(['ok', 'not ok']), ErrorCodes.EVENT_INVALID);
    expect(s.isHeld('ok')).toBe(false);
    expectCode(() => s.release([''] as string[]), ErrorCodes.EVENT_INVALID);
    expectCode(() => s.drop('vm:x' as unknown as string[]), ErrorCodes.EVENT_INVALID);
    expectCode(() => s.subscribe('vm:x', {} as Subscriber), ErrorCodes.EVENT_INVALID);
    expectCode(() => s.serializeHeld(['vm:x']), ErrorCodes.ELEMENT_NOT_HELD);
    expect(() => new SensorService({ host: 'bad host' })).toThrow(EventError);
  });
});

describe('SensorService: sensors', () => {
  class Counter implements SensorLogic {
    readonly name: string;
    count = 0;
    started = 0;
    stopped = 0;
    ctx: SensorContext | undefined;
    constructor(name = 'counter') {
      this.name = name;
    }
    start(ctx: SensorContext): void {
      this.started++;
      this.ctx = ctx;
    }
    stop(): void {
      this.stopped++;
    }
    tick(): void {
      this.count++;
      this.ctx!.emit({ elementId: 'host:a', type: 'COUNT', payload: this.count });
    }
    getPersistedState(): unknown {
      return { count: this.count };
    }
    restoreState(state: unknown): void {
      this.count = (state as { count: number }).count;
    }
  }

  it('starts, stops, tags events with the sensor name, persists state on stop and restores it on add', async () => {
    const store = openStore(tmpStoreFile());
    const s = service({ store });
    const r = recorder(s, 'host:a');
    const c = new Counter();
    s.addSensor(c);
    expectCode(() => s.addSensor(new Counter()), ErrorCodes.SENSOR_EXISTS);
    expectCode(() => s.addSensor({ name: 'x' } as SensorLogic), ErrorCodes.SENSOR_INVALID);
    s.startSensors();
    c.tick();
    c.tick();
    await s.idle();
    expect(r.got.map((g) => [g.event.source, g.event.payload])).toEqual([['counter', 1], ['counter', 2]]);
    s.stopSensors();
    expect(c.stopped).toBe(1);
    const late = new Counter('late');
    s.addSensor(late);
    expect(late.started).toBe(0); // sensors are stopped
    const s2 = service({ store });
    const c2 = new Counter();
    s2.addSensor(c2);
    expect(c2.count).toBe(2);
  });

  it('a sensor emitting a bad event or throwing on start is reported, not thrown into its timer', async () => {
    const errors: string[] = [];
    const s = service({ onError: (_e, where) => errors.push(where) });
    const c = new Counter();
    s.addSensor(c);
    s.addSensor({ name: 'broken', start() { throw new Error('nope'); }, stop() {} });
    s.startSensors();
    expect(() => c.ctx!.emit({ elementId: 'bad id', type: 'X' })).not.toThrow();
    expect(s.stats().rejected).toBe(1);
    expect(errors).toEqual(['sensor broken start', 'sensor counter emit']);
    c.tick();
    await s.idle();
    expect(s.stats().dispatched).toBe(1);
  });
});
