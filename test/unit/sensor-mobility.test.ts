import { describe, expect, it } from 'vitest';
import { ErrorCodes, EventError } from '../../core/errors.ts';
import type { EmbotEvent } from '../../core/events.ts';
import { Store } from '../../core/store/store.ts';
import { SensorService, decodeHeld, encodeEvents } from '../../sensors/index.ts';
import type { ForwardSink, HoldCursor, SensorContext, Subscriber } from '../../sensors/index.ts';
import { eventPackr } from '../../sensors/journal.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { expectThrownCode } from '../harness/expect-code.ts';
import { prng } from '../harness/prng.ts';
import { rowCount, tempStores } from '../harness/temp-store.ts';

const cleanups = cleanupsAfterEach();
const { tmpStoreFile, openStore } = tempStores(cleanups, 'embot-sensor-mobility-');

function service(opts: Partial<ConstructorParameters<typeof SensorService>[0]> = {}): SensorService {
  const s = new SensorService({ host: 'a', onError: () => {}, forwardRetryMs: 2, forwardRetryMaxMs: 8, ...opts });
  cleanups.push(() => s.close());
  return s;
}

function recorder(s: SensorService, elementId: string, durable = false): { got: EmbotEvent[]; off: () => void } {
  const got: EmbotEvent[] = [];
  const sub: Subscriber = {
    durable,
    deliver(event, seq) {
      got.push(event);
      if (durable) s.complete([seq]);
    },
  };
  return { got, off: s.subscribe(elementId, sub) };
}

const expectCode = (fn: () => unknown, code: string): void => expectThrownCode(fn, code, EventError);

/** Waits (macrotask by macrotask, bounded) until `cond` holds; a condition never met fails the test with `what`. */
async function until(cond: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 2000 && !cond(); i++) await new Promise((r) => setTimeout(r, 1));
  if (!cond()) throw new Error(`timed out waiting for ${what}`);
}

/** Ids per element of hold-queue bytes, in order. */
function idsIn(bytes: Uint8Array): Record<string, string[]> {
  return Object.fromEntries(decodeHeld(bytes).map((q) => [q.elementId, q.events.map((e) => e.id)]));
}

/**
 * A sink whose calls are recorded and answered by a plan: 'ok' resolves, 'fail' rejects, 'throw' throws, 'wait'
 * keeps the promise open until `open()` is called. Calls past the plan resolve.
 */
function plannedSink(plan: ('ok' | 'fail' | 'throw' | 'wait')[] = []) {
  const calls: EmbotEvent[][] = [];
  const taken: EmbotEvent[] = [];
  let opened: (() => void) | undefined;
  let inFlight = 0;
  let maxInFlight = 0;
  const sink: ForwardSink = (events) => {
    calls.push([...events]);
    const step = plan.shift() ?? 'ok';
    if (step === 'throw') throw new Error('link down (sync)');
    inFlight++;
    maxInFlight = Math.max(maxInFlight, inFlight);
    const done = (): void => {
      inFlight--;
    };
    if (step === 'fail') {
      done();
      return Promise.reject(new Error('link down'));
    }
    if (step === 'wait') {
      return new Promise<void>((resolve) => {
        opened = () => {
          done();
          taken.push(...events);
          resolve();
        };
      });
    }
    done();
    taken.push(...events);
    return Promise.resolve();
  };
  return {
    sink,
    calls,
    taken,
    open: () => opened?.(),
    get maxInFlight() {
      return maxInFlight;
    },
  };
}

describe('SensorService: incremental hold shipment', () => {
  it('ships each held event exactly once across rounds with interleaved posts and spills, and the target ends with the source queue', async () => {
    const src = service({ host: 'src', store: openStore(), holdMemoryLimit: 4 });
    const dst = service({ host: 'dst', store: openStore(), holdMemoryLimit: 3 });
    const scope = ['vm:m', 'disk:m'];
    const other = recorder(src, 'vm:other');
    src.hold(scope);
    const posted: Record<string, string[]> = { 'vm:m': [], 'disk:m': [] };
    const rand = prng(7);
    let ts = 1000;
    const post = (n: number): void => {
      for (let i = 0; i < n; i++) {
        const r = rand();
        const elementId = r < 0.45 ? 'vm:m' : r < 0.8 ? 'disk:m' : 'vm:other';
        const e = src.post({ elementId, type: 'T', ts: ts++, payload: { i } });
        if (elementId !== 'vm:other') posted[elementId]!.push(e.id);
      }
    };
    const shippedIds: Record<string, string[]> = { 'vm:m': [], 'disk:m': [] };
    let cursor: HoldCursor | undefined;
    let total = 0;
    // Round sizes chosen so later rounds start inside the spilled part and inside memory.
    for (const n of [2, 25, 0, 1, 40, 3]) {
      post(n);
      await src.idle();
      const shipment = src.serializeHeldSince(scope, cursor);
      const got = idsIn(shipment.bytes);
      expect(Object.keys(got)).toEqual(scope);
      expect(shipment.count).toBe(got['vm:m']!.length + got['disk:m']!.length);
      for (const id of scope) shippedIds[id]!.push(...got[id]!);
      total += shipment.count;
      const result = dst.insertHeld(shipment.bytes);
      expect(result).toEqual({ accepted: shipment.count, duplicates: 0 });
      cursor = shipment.cursor;
      expect(src.heldCount(scope)).toBe(total);
    }
    expect(src.stats().spilled).toBeGreaterThan(0);
    expect(dst.stats().spilled).toBeGreaterThan(0);
    expect(shippedIds).toEqual(posted);
    // Nothing new: an empty increment the target still accepts.
    const empty = src.serializeHeldSince(scope, cursor);
    expect(empty.count).toBe(0);
    expect(dst.insertHeld(empty.bytes)).toEqual({ accepted: 0, duplicates: 0 });
    // The target holds exactly the source's queues, byte for byte.
    expect(Buffer.from(dst.serializeHeld(scope)).equals(Buffer.from(src.serializeHeld(scope)))).toBe(true);
    expect(dst.heldCount(scope)).toBe(total);
    expect(dst.journaledFor(scope)).toBe(total);
    // Released at the target: every event once, in order.
    const vm = recorder(dst, 'vm:m', true);
    const disk = recorder(dst, 'disk:m', true);
    dst.release(scope);
    await dst.idle();
    expect(vm.got.map((e) => e.id)).toEqual(posted['vm:m']);
    expect(disk.got.map((e) => e.id)).toEqual(posted['disk:m']);
    expect(dst.journaledFor(scope)).toBe(0);
    expect(other.got.length).toBeGreaterThan(0);
  });

  it('works without a store, and a cursor survives a msgpack or JSON round trip and keeps elements not asked for', async () => {
    const src = service({ host: 'src' });
    src.hold(['vm:a', 'vm:b']);
    const a1 = src.post({ elementId: 'vm:a', type: 'T' });
    const b1 = src.post({ elementId: 'vm:b', type: 'T' });
    const first = src.serializeHeldSince(['vm:a', 'vm:b']);
    expect(idsIn(first.bytes)).toEqual({ 'vm:a': [a1.id], 'vm:b': [b1.id] });
    const a2 = src.post({ elementId: 'vm:a', type: 'T' });
    const b2 = src.post({ elementId: 'vm:b', type: 'T' });
    // Only vm:a this time: vm:b's mark is carried unchanged.
    const onlyA = src.serializeHeldSince(['vm:a'], eventPackr.unpack(eventPackr.pack(first.cursor)) as HoldCursor);
    expect(idsIn(onlyA.bytes)).toEqual({ 'vm:a': [a2.id] });
    expect(onlyA.cursor['vm:b']).toEqual(first.cursor['vm:b']);
    const both = src.serializeHeldSince(['vm:b', 'vm:a', 'vm:b'], JSON.parse(JSON.stringify(onlyA.cursor)) as HoldCursor);
    expect(idsIn(both.bytes)).toEqual({ 'vm:b': [b2.id], 'vm:a': [] });
    expect(both.count).toBe(1);
  });

  it('refuses an element that is not held, a cursor of an earlier hold and malformed cursors, and changes nothing', async () => {
    const src = service({ host: 'src', store: openStore(), holdMemoryLimit: 2 });
    src.hold(['vm:a']);
    for (let i = 0; i < 5; i++) src.post({ elementId: 'vm:a', type: 'T', ts: i });
    await src.idle();
    const { cursor } = src.serializeHeldSince(['vm:a']);
    expectCode(() => src.serializeHeldSince(['vm:a', 'vm:none'], cursor), ErrorCodes.ELEMENT_NOT_HELD);
    expectCode(() => src.serializeHeldSince(['bad id!']), ErrorCodes.EVENT_INVALID);
    expectCode(() => src.serializeHeldSince('vm:a' as unknown as string[]), ErrorCodes.EVENT_INVALID);
    const bad: unknown[] = [
      null,
      [],
      'cursor',
      { 'vm:a': 3 },
      { 'vm:a': { hold: 'x', shipped: 1 } },
      { 'vm:a': { hold: cursor['vm:a']!.hold, shipped: -1 } },
      { 'vm:a': { hold: cursor['vm:a']!.hold, shipped: 1.5 } },
      { 'vm:a': { hold: cursor['vm:a']!.hold, shipped: 6 } }, // more than the queue has
      JSON.parse('{"__proto__": {"hold": 1, "shipped": 0}}'),
    ];
    for (const c of bad) expectCode(() => src.serializeHeldSince(['vm:a'], c as HoldCursor), ErrorCodes.EVENT_INVALID);
    expect(src.heldCount(['vm:a'])).toBe(5);
    expect(src.serializeHeldSince(['vm:a'], cursor).count).toBe(0);
    // Released and held again: the old cursor would skip the new queue's first events.
    src.release(['vm:a']);
    await src.idle();
    src.hold(['vm:a']);
    src.post({ elementId: 'vm:a', type: 'T', ts: 9 });
    await src.idle();
    expectCode(() => src.serializeHeldSince(['vm:a'], cursor), ErrorCodes.ELEMENT_NOT_HELD);
    expect(src.serializeHeldSince(['vm:a']).count).toBe(1);
    expect(src.heldCount(['vm:a', 'vm:none'])).toBe(1);
    expectCode(() => src.heldCount(['bad id!']), ErrorCodes.EVENT_INVALID);
  });
});

describe('SensorService: redirect after the switch', () => {
  it('hands events posted, emitted and sensed after redirect to the sink, not to subscribers, and keeps their rows until it resolves', async () => {
    const store = openStore();
    const src = service({ host: 'src', store });
    const sub = recorder(src, 'vm:r', true);
    const other = recorder(src, 'vm:o', true);
    let ctx: SensorContext | undefined;
    src.addSensor({ name: 'probe', start: (c) => (ctx = c), stop: () => {} });
    src.startSensors();
    const before = src.post({ elementId: 'vm:r', type: 'BEFORE' });
    await src.idle();
    const planned = plannedSink(['wait']);
    const end = src.redirect(['vm:r'], planned.sink);
    const posted = src.post({ elementId: 'vm:r', type: 'POSTED', ts: 5 });
    const emitted = src.emit({ elementId: 'vm:r', type: 'EMITTED', ts: 1 });
    ctx!.emit({ elementId: 'vm:r', type: 'SENSED', ts: 3 });
    src.post({ elementId: 'vm:o', type: 'LOCAL' });
    await emitted; // acknowledged = journaled, though not dispatched here
    await src.idle();
    expect(sub.got.map((e) => e.id)).toEqual([before.id]);
    expect(other.got.map((e) => e.type)).toEqual(['LOCAL']);
    // One batch, in arrival order (not ts order: the new owner orders by ts itself).
    expect(planned.calls.map((c) => c.map((e) => e.type))).toEqual([['POSTED', 'EMITTED', 'SENSED']]);
    expect(planned.calls[0]![0]!.id).toBe(posted.id);
    expect(planned.calls[0]![2]!.source).toBe('probe');
    expect(src.journaledFor(['vm:r'])).toBe(3);
    expect(src.stats()).toMatchObject({ forwarded: 0, forwardQueued: 3, dispatched: 2 });
    planned.open();
    await until(() => src.stats().forwarded === 3, 'the sink to resolve');
    expect(src.journaledFor(['vm:r'])).toBe(0);
    expect(rowCount(store)).toBe(0);
    expect(src.stats()).toMatchObject({ forwarded: 3, forwardFailures: 0, forwardQueued: 0, unrouted: 0 });
    end();
  });

  it('keeps the rows when the sink rejects or throws, retries the same batch first with back-off, and loses or repeats nothing', async () => {
    const store = openStore();
    const src = service({ host: 'src', store });
    const planned = plannedSink(['fail', 'throw', 'fail']);
    src.redirect(['vm:r'], planned.sink);
    const ids: string[] = [];
    for (let i = 0; i < 3; i++) ids.push(src.post({ elementId: 'vm:r', type: 'T', ts: i }).id);
    await src.idle();
    await until(() => planned.calls.length >= 1, 'the first attempt');
    expect(src.journaledFor(['vm:r'])).toBe(3);
    // Posted while the first batch is failing: goes after it.
    for (let i = 3; i < 5; i++) ids.push(src.post({ elementId: 'vm:r', type: 'T', ts: i }).id);
    await until(() => src.stats().forwarded === 5, 'the retries to succeed');
    expect(src.stats().forwardFailures).toBe(3);
    expect(planned.calls[0]!.map((e) => e.id)).toEqual(ids.slice(0, 3));
    // Every retry starts with the failed batch.
    for (const call of planned.calls.slice(1)) expect(call.slice(0, 3).map((e) => e.id)).toEqual(ids.slice(0, 3));
    expect(planned.taken.map((e) => e.id)).toEqual(ids);
    expect(src.journaledFor(['vm:r'])).toBe(0);
    expect(planned.maxInFlight).toBe(1);
  });

  it('hands over at most forwardBatchMax events per call and one call at a time', async () => {
    const src = service({ host: 'src', forwardBatchMax: 10 });
    const planned = plannedSink(['wait']);
    src.redirect(['vm:r'], planned.sink);
    const ids: string[] = [];
    for (let i = 0; i < 25; i++) ids.push(src.post({ elementId: 'vm:r', type: 'T' }).id);
    await src.idle();
    // More events (and ticks) while the first call is out: they wait behind it.
    ids.push(src.post({ elementId: 'vm:r', type: 'T' }).id);
    await src.idle();
    await new Promise((r) => setTimeout(r, 5));
    expect(planned.calls.map((c) => c.length)).toEqual([10]);
    planned.open();
    await until(() => src.stats().forwarded === 26, 'the rest of the batches');
    expect(planned.calls.map((c) => c.length)).toEqual([10, 10, 6]);
    expect(planned.taken.map((e) => e.id)).toEqual(ids);
  });

  it('survives drop, takes events already queued, and after the returned function local dispatch resumes (unrouted)', async () => {
    const store = openStore();
    const src = service({ host: 'src', store });
    const sub = recorder(src, 'vm:r');
    src.hold(['vm:r']);
    const queued = src.post({ elementId: 'vm:r', type: 'QUEUED' });
    await src.idle();
    src.release(['vm:r']); // in the time-ordered queue now, not dispatched yet: redirect takes it
    const planned = plannedSink();
    const end = src.redirect(['vm:r'], planned.sink);
    src.drop(['vm:r']);
    const during = src.post({ elementId: 'vm:r', type: 'DURING' });
    await src.idle();
    await until(() => src.stats().forwarded === 2, 'forwarding');
    expect(planned.taken.map((e) => e.id)).toEqual([queued.id, during.id]);
    expect(sub.got).toEqual([]);
    end();
    end(); // idempotent
    const unrouted = src.stats().unrouted;
    src.post({ elementId: 'vm:r', type: 'AFTER' });
    await src.idle();
    expect(planned.calls.length).toBe(1);
    expect(src.stats().unrouted).toBe(unrouted + 1);
    expect(src.journaledFor(['vm:r'])).toBe(0);
    // The element can be redirected again once the first redirection ended.
    const again = plannedSink();
    src.redirect(['vm:r'], again.sink);
    src.post({ elementId: 'vm:r', type: 'AGAIN' });
    await src.idle();
    await until(() => again.taken.length === 1, 'the second redirection');
  });

  it('keeps forwarding what it already took after the redirection ends, and leaves unforwarded rows to recover() after a restart', async () => {
    const file = tmpStoreFile();
    const store = Store.open({ file });
    const src = new SensorService({ host: 'src', store, onError: () => {}, forwardRetryMs: 1000, forwardRetryMaxMs: 1000 });
    const planned = plannedSink(['fail']);
    const end = src.redirect(['vm:r'], planned.sink);
    const ids = [src.post({ elementId: 'vm:r', type: 'T', ts: 1 }).id, src.post({ elementId: 'vm:r', type: 'T', ts: 2 }).id];
    await src.idle();
    await until(() => src.stats().forwardFailures === 1, 'the failure');
    // Ticks during the back-off do not retry early.
    ids.push(src.post({ elementId: 'vm:r', type: 'T', ts: 3 }).id);
    await src.idle();
    await new Promise((r) => setTimeout(r, 20));
    expect(planned.calls.length).toBe(1);
    end(); // grace period over while the batch waits for its retry
    expect(src.stats().forwardQueued).toBe(3);
    await src.close(); // the retry never comes: rows stay
    store.close();
    const store2 = openStore(file);
    expect(rowCount(store2)).toBe(3);
    const restarted = service({ host: 'src', store: store2 });
    const resumed = plannedSink();
    restarted.redirect(['vm:r'], resumed.sink); // the agent resumes its grace period before recovery
    expect(restarted.recover()).toBe(3);
    await restarted.idle();
    await until(() => resumed.taken.length === 3, 'recovered events to be forwarded');
    expect(resumed.taken.map((e) => e.id)).toEqual(ids);
    expect(rowCount(store2)).toBe(0);
  });

  it('sends released hold queues of a redirected element to the sink, and an element held after redirect stays frozen', async () => {
    const src = service({ host: 'src', store: openStore(), holdMemoryLimit: 2 });
    const sub = recorder(src, 'vm:r');
    src.hold(['vm:r']);
    const held = [0, 1, 2].map((ts) => src.post({ elementId: 'vm:r', type: 'T', ts }).id);
    await src.idle();
    const planned = plannedSink();
    src.redirect(['vm:r'], planned.sink);
    src.post({ elementId: 'vm:r', type: 'T', ts: 3 });
    await src.idle();
    expect(src.heldCount(['vm:r'])).toBe(3);
    src.release(['vm:r']); // e.g. the tail could not be shipped: the new owner still gets these
    await src.idle();
    await until(() => src.stats().forwarded === 4, 'released events to reach the sink');
    expect(planned.taken.map((e) => e.id).slice(1)).toEqual(held);
    expect(sub.got).toEqual([]);
    expect(src.journaledFor(['vm:r'])).toBe(0);
  });

  it('after an ended redirection with events in flight, delivers them to the sink and then forgets the redirection', async () => {
    const src = service({ host: 'src' });
    const planned = plannedSink(['wait']);
    const end = src.redirect(['vm:r'], planned.sink);
    src.post({ elementId: 'vm:r', type: 'T' });
    await src.idle();
    end();
    expect(src.stats().forwardQueued).toBe(1);
    planned.open();
    await until(() => src.stats().forwarded === 1, 'the in-flight batch');
    expect(src.stats().forwardQueued).toBe(0);
  });

  it('rejects bad input with EMBOT_ERR_EVENT_INVALID and changes nothing', async () => {
    const src = service({ host: 'src' });
    const sub = recorder(src, 'vm:r');
    const { sink } = plannedSink();
    expectCode(() => src.redirect(['vm:r'], 'sink' as unknown as ForwardSink), ErrorCodes.EVENT_INVALID);
    expectCode(() => src.redirect(['vm:r', 'no such id!'], sink), ErrorCodes.EVENT_INVALID);
    expectCode(() => src.redirect('vm:r' as unknown as string[], sink), ErrorCodes.EVENT_INVALID);
    src.redirect(['vm:x'], sink);
    expectCode(() => src.redirect(['vm:r', 'vm:x'], sink), ErrorCodes.EVENT_INVALID);
    expectCode(() => src.journaledFor([42 as unknown as string]), ErrorCodes.EVENT_INVALID);
    src.post({ elementId: 'vm:r', type: 'T' });
    await src.idle();
    expect(sub.got.length).toBe(1);
    expect(() => new SensorService({ host: 'z', forwardRetryMs: 0 })).toThrow(EventError);
    expect(() => new SensorService({ host: 'z', forwardRetryMs: 10, forwardRetryMaxMs: 5 })).toThrow(EventError);
    expect(() => new SensorService({ host: 'z', forwardBatchMax: 0 })).toThrow(EventError);
  });
});

describe('SensorService: insertHeld de-duplication', () => {
  it('takes an event arriving in the event state, a dirty round and a forwarded batch once, wherever it is at the target', async () => {
    const store = openStore();
    const dst = service({ host: 'dst', store, holdMemoryLimit: 2 });
    const src = service({ host: 'src' });
    src.hold(['vm:m']);
    const evs: EmbotEvent[] = [];
    for (let i = 0; i < 6; i++) evs.push(src.post({ elementId: 'vm:m', type: 'T', ts: i }));
    const state = src.serializeHeldSince(['vm:m']);
    expect(dst.insertHeld(state.bytes)).toEqual({ accepted: 6, duplicates: 0 });
    expect(dst.stats().spilled).toBeGreaterThan(0); // the first ids are only in the journal now
    // ManagementEventState again (a retried request), and the whole queue in a dirty round.
    expect(dst.insertHeld(state.bytes)).toEqual({ accepted: 0, duplicates: 6 });
    expect(dst.insertHeld(src.serializeHeld(['vm:m']))).toEqual({ accepted: 0, duplicates: 6 });
    // Duplicates inside one batch count too.
    const fresh = src.post({ elementId: 'vm:m', type: 'T', ts: 6 });
    evs.push(fresh);
    expect(dst.insertHeld(encodeEvents([fresh, fresh, evs[0]!]))).toEqual({ accepted: 1, duplicates: 2 });
    expect(dst.stats().duplicates).toBe(14);
    expect(dst.heldCount(['vm:m'])).toBe(7);
    // After the commit: released, some processed (durable, one left in flight), then forwarded copies arrive.
    const got: EmbotEvent[] = [];
    const seqs: number[] = [];
    dst.subscribe('vm:m', { durable: true, deliver: (e, seq) => (got.push(e), seqs.push(seq)) });
    dst.release(['vm:m']);
    await dst.idle();
    dst.complete(seqs.slice(0, -1));
    expect(dst.journaledFor(['vm:m'])).toBe(1);
    const queuedHere = dst.post({ elementId: 'vm:m', type: 'LOCAL', id: 'sensor-x.1' }); // posted at the target, not yet dispatched
    const forwarded = encodeEvents([...evs, queuedHere]);
    expect(dst.insertHeld(forwarded, { hold: false })).toEqual({ accepted: 0, duplicates: 8 });
    expect(dst.isHeld('vm:m')).toBe(false);
    await dst.idle();
    expect(got.map((e) => e.id)).toEqual([...evs.map((e) => e.id), queuedHere.id]);
  });

  it('with { hold: false } dispatches forwarded events of elements that are not held, and holds those that are', async () => {
    const dst = service({ host: 'dst', store: openStore() });
    const live = recorder(dst, 'vm:live');
    dst.hold(['vm:held']);
    const fwd: EmbotEvent[] = [
      { id: 'src.x.1', ts: 2, elementId: 'vm:live', type: 'T', payload: { n: 1 } },
      { id: 'src.x.2', ts: 1, elementId: 'vm:held', type: 'T', payload: null },
      { id: 'src.x.3', ts: 3, elementId: 'vm:live', type: 'T', payload: null, source: 'vm' },
    ];
    expect(dst.insertHeld(encodeEvents(fwd), { hold: false })).toEqual({ accepted: 3, duplicates: 0 });
    await dst.idle();
    expect(live.got.map((e) => e.id)).toEqual(['src.x.1', 'src.x.3']);
    expect(live.got[1]).toEqual(fwd[2]);
    expect(dst.isHeld('vm:live')).toBe(false);
    expect(dst.heldCount(['vm:held'])).toBe(1);
    expect(dst.insertHeld(encodeEvents(fwd), { hold: false })).toEqual({ accepted: 0, duplicates: 3 });
    expectCode(() => dst.insertHeld(encodeEvents(fwd), null as unknown as { hold: boolean }), ErrorCodes.EVENT_INVALID);
    expectCode(() => dst.insertHeld(new Uint8Array([0xc1])), ErrorCodes.HOLD_DECODE);
    expect(dst.stats().duplicates).toBe(3);
  });

  it('moves a VM end to end: rounds, redirect, the tail after the last round, drop, forwarded copies; every event once, in order', async () => {
    const srcStore = openStore();
    const dstStore = openStore();
    const src = service({ host: 'src', store: srcStore, holdMemoryLimit: 4 });
    const dst = service({ host: 'dst', store: dstStore, holdMemoryLimit: 3 });
    const scope = ['vm:m'];
    const atSrc = recorder(src, 'vm:m', true);
    const ids: string[] = [];
    let ts = 0;
    const produce = (n: number): void => {
      for (let i = 0; i < n; i++) ids.push(src.post({ elementId: 'vm:m', type: 'SEQ', ts: ts++, payload: { n: ts } }).id);
    };
    produce(5);
    await src.idle();
    src.hold(scope);
    produce(3);
    let shipment = src.serializeHeldSince(scope);
    dst.insertHeld(shipment.bytes);
    for (const n of [9, 4, 1]) {
      produce(n);
      await src.idle();
      shipment = src.serializeHeldSince(scope, shipment.cursor);
      dst.insertHeld(shipment.bytes);
    }
    produce(2); // held after the last round
    await src.idle();
    // Switch: forward to the new owner, which takes them in with { hold: false } (the same event may come twice).
    const forward: ForwardSink = async (events) => {
      dst.insertHeld(encodeEvents(events), { hold: false });
      dst.insertHeld(encodeEvents(events), { hold: false });
    };
    const end = src.redirect(scope, forward);
    produce(2); // after redirect, before the tail is sent: to the sink, not into the hold
    await src.idle();
    const tail = src.serializeHeldSince(scope, shipment.cursor);
    expect(tail.count).toBe(2);
    dst.insertHeld(tail.bytes);
    src.drop(scope);
    const atDst = recorder(dst, 'vm:m', true);
    dst.release(scope);
    produce(3);
    dst.insertHeld(tail.bytes, { hold: false }); // a retried tail
    await src.idle();
    await dst.idle();
    await until(() => src.stats().forwardQueued === 0 && atSrc.got.length + atDst.got.length === ids.length, 'all events');
    await dst.idle();
    end();
    expect([...atSrc.got, ...atDst.got].map((e) => e.id)).toEqual(ids);
    expect(atDst.got.map((e) => e.ts)).toEqual([...atDst.got.map((e) => e.ts)].sort((a, b) => a - b));
    expect(rowCount(srcStore)).toBe(0);
    expect(rowCount(srcStore, 'held_spill')).toBe(0);
    expect(rowCount(dstStore)).toBe(0);
    expect(dst.stats().duplicates).toBeGreaterThanOrEqual(7);
  });
});
