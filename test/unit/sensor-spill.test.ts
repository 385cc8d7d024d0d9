import { describe, expect, it } from 'vitest';
import { ErrorCodes, StoreError } from '../../core/errors.ts';
import type { EmbotError } from '../../core/errors.ts';
import type { EmbotEvent, EmbotEventInput } from '../../core/events.ts';
import type { Store } from '../../core/store/store.ts';
import { SensorService, decodeHeld, encodeEvents, encodeHeld } from '../../sensors/index.ts';
import { Journal, encodeHeldParts } from '../../sensors/journal.ts';
import type { ForwardSink, HoldCursor } from '../../sensors/index.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { expectThrownCode } from '../harness/expect-code.ts';
import { prng } from '../harness/prng.ts';
import { rowCount, tempStores } from '../harness/temp-store.ts';

const cleanups = cleanupsAfterEach();
const { openStore } = tempStores(cleanups, 'embot-sensor-spill-');

function service(opts: Partial<ConstructorParameters<typeof SensorService>[0]> = {}): SensorService {
  const s = new SensorService({ host: 'a', onError: () => {}, ...opts });
  cleanups.push(() => s.close());
  return s;
}

/** Waits (macrotask by macrotask, bounded) until `cond` holds; a condition never met fails the test with `what`. */
async function until(cond: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 2000 && !cond(); i++) await new Promise((r) => setTimeout(r, 1));
  if (!cond()) throw new Error(`timed out waiting for ${what}`);
}

/** Spill rows of one element by how they are stored: with the event's bytes, or naming the journal row by seq only. */
function spillKinds(store: Store, elementId: string): { withBytes: number; seqOnly: number } {
  const row = store.db
    .prepare('SELECT sum(length(event) > 0) AS withBytes, sum(length(event) = 0) AS seqOnly FROM held_spill WHERE element_id = ?')
    .get(elementId) as { withBytes: number | null; seqOnly: number | null };
  return { withBytes: row.withBytes ?? 0, seqOnly: row.seqOnly ?? 0 };
}

/** The kinds of one element's spill rows in position order, one letter per run: `B` event bytes, `S` seq-only. */
function spillRuns(store: Store, elementId: string): string {
  const kinds = store.db.prepare('SELECT length(event) > 0 FROM held_spill WHERE element_id = ? ORDER BY pos').pluck().all(elementId) as number[];
  return kinds.map((k) => (k === 1 ? 'B' : 'S')).join('').replace(/(.)\1+/g, '$1');
}

/** Ids of the rows left in table `events` for one element, in seq order. */
function journaledIds(store: Store, elementId: string): string[] {
  return store.db.prepare('SELECT id FROM events WHERE element_id = ? ORDER BY seq').pluck().all(elementId) as string[];
}

/**
 * FAKE of a real disk fault: the `events` row that a seq-only spill row names disappears behind the service's back
 * (a torn page, a restored backup, someone editing the file). Returns the seq it removed.
 */
function fakeDiskFaultLosingJournalRowOfSeqOnlySpill(store: Store, elementId: string): number {
  const seq = store.db.prepare('SELECT seq FROM held_spill WHERE element_id = ? AND length(event) = 0 ORDER BY pos LIMIT 1 OFFSET 1').pluck().get(elementId) as number | undefined;
  if (seq === undefined) throw new Error(`test setup: ${elementId} has no seq-only spill row to damage`);
  expect(store.db.prepare('DELETE FROM events WHERE seq = ?').run(seq).changes).toBe(1);
  return seq;
}

const same = (a: Uint8Array, b: Uint8Array): boolean => Buffer.from(a).equals(Buffer.from(b));

/** Event inputs whose encodings take every branch of the splice: null, nested, binary, non-ASCII, floats, sources. */
function eventInput(rand: () => number, elementId: string, n: number, ts: number): EmbotEventInput {
  const shape = Math.floor(rand() * 6);
  const base = { elementId, type: 'SPILL_T', ts };
  switch (shape) {
    case 0:
      return { ...base, payload: null };
    case 1:
      return { ...base, ts: ts + 0.25, payload: { n, load: rand(), name: 'web', list: [1, -2, 300, 70_000, -40_000, 'x'.repeat(40)] } };
    case 2:
      return { ...base, payload: `é${n}`, source: 'vm' };
    case 3:
      return { ...base, payload: new Uint8Array([n & 0xff, 1, 2, 3]), source: 'ü-sensor' };
    case 4:
      return { ...base, ts: 2 ** 40 + n, payload: { nested: { deep: [true, false, null] }, big: 2 ** 33 } };
    default:
      return { ...base, payload: 'y'.repeat(300) };
  }
}

describe('SensorService: spilled hold queues of both kinds (event bytes and seq-only)', () => {
  it('serializeHeld and serializeHeldSince from every position give the bytes of an in-memory service that got the same events, and insertHeld round-trips them byte-exact', async () => {
    const scope = ['vm:m', 'disk:m'];
    const mixStore = openStore();
    // Held as they arrive here (spill rows with bytes) and taken in from the peer (seq-only spill rows), interleaved.
    const mix = service({ host: 'mix', store: mixStore, holdMemoryLimit: 4 });
    const peer = service({ host: 'peer' });
    const reference = service({ host: 'ref' }); // in memory: nothing spills, nothing is spliced
    mix.hold(scope);
    peer.hold(scope);
    reference.hold(scope);
    const expected: Record<string, EmbotEvent[]> = { 'vm:m': [], 'disk:m': [] };
    const rand = prng(11);
    let ts = 1_700_000_000_000;
    let n = 0;
    let peerCursor: HoldCursor | undefined;
    let mixCursor: HoldCursor | undefined;
    let refCursor: HoldCursor | undefined;
    const plan: readonly ['arrive' | 'insert', number][] = [
      ['arrive', 14],
      ['insert', 9],
      ['arrive', 3],
      ['insert', 2],
      ['arrive', 11],
      ['insert', 12],
      ['arrive', 1],
      ['insert', 5],
      ['arrive', 6],
    ];
    for (const [kind, count] of plan) {
      const batch: EmbotEvent[] = [];
      for (let i = 0; i < count; i++) {
        const elementId = scope[Math.floor(rand() * scope.length)]!;
        const input = eventInput(rand, elementId, n++, ts++);
        if (kind === 'arrive') {
          batch.push(mix.post(input));
          mix.post({ elementId: 'vm:noise', type: 'NOISE', ts }); // not held: must not disturb the positions
        } else {
          // Some peer events carry a producer's non-ASCII id: the seq-only splice must fall back to encoding those.
          batch.push(peer.post(n % 3 === 0 ? { ...input, id: `périph.${n}` } : input));
        }
      }
      if (kind === 'arrive') {
        await mix.idle(); // the group commit routes them into the hold queues
        expect(reference.insertHeld(encodeEvents(batch))).toEqual({ accepted: count, duplicates: 0 });
      } else {
        const shipment = peer.serializeHeldSince(scope, peerCursor);
        peerCursor = shipment.cursor;
        expect(mix.insertHeld(shipment.bytes)).toEqual({ accepted: count, duplicates: 0 });
        expect(reference.insertHeld(shipment.bytes)).toEqual({ accepted: count, duplicates: 0 });
      }
      for (const e of batch) expected[e.elementId]!.push(e);
      // One dirty round per step, starting wherever the last one stopped (inside a bytes run, a seq-only run or memory).
      const fromMix = mix.serializeHeldSince(scope, mixCursor);
      const fromRef = reference.serializeHeldSince(scope, refCursor);
      mixCursor = fromMix.cursor;
      refCursor = fromRef.cursor;
      expect(fromMix.count).toBe(count);
      expect(same(fromMix.bytes, fromRef.bytes)).toBe(true);
    }
    for (const id of scope) {
      const kinds = spillKinds(mixStore, id);
      expect(kinds.withBytes, `${id} spill rows with bytes`).toBeGreaterThan(0);
      expect(kinds.seqOnly, `${id} seq-only spill rows`).toBeGreaterThan(0);
      // Runs of both kinds follow each other both ways, so a shipment starts in and crosses either kind.
      expect(spillRuns(mixStore, id), `${id} spill runs`).toMatch(/^BSB/);
      expect(mix.heldCount([id])).toBeGreaterThan(kinds.withBytes + kinds.seqOnly); // a part is still in memory
    }
    expect(reference.stats().spilled).toBe(0);

    const whole = mix.serializeHeld(scope);
    expect(same(whole, reference.serializeHeld(scope))).toBe(true);
    // The format is canonical: the same bytes encodeHeld gives for the events in arrival order.
    expect(same(whole, encodeHeld(scope.map((elementId) => ({ elementId, events: expected[elementId]! }))))).toBe(true);
    const decoded = decodeHeld(whole);
    expect(decoded.map((q) => q.elementId)).toEqual(scope);
    for (const q of decoded) {
      expect(q.events.map((e) => e.id)).toEqual(expected[q.elementId]!.map((e) => e.id));
      q.events.forEach((e, i) => {
        const want = expected[q.elementId]![i]!;
        expect({ ...e, payload: undefined }).toEqual({ ...want, payload: undefined });
        expect(same(encodeEvents([e]), encodeEvents([want]))).toBe(true);
      });
    }

    // From every position of each queue, including the first and last of each spill run and of memory.
    for (const id of scope) {
      const size = mix.heldCount([id]);
      expect(size).toBe(expected[id]!.length);
      for (let shipped = 0; shipped <= size; shipped++) {
        const a = mix.serializeHeldSince([id], { [id]: { hold: mixCursor![id]!.hold, shipped } });
        const b = reference.serializeHeldSince([id], { [id]: { hold: refCursor![id]!.hold, shipped } });
        expect(a.count).toBe(size - shipped);
        expect(same(a.bytes, b.bytes), `${id} from position ${shipped}`).toBe(true);
        expect(same(a.bytes, encodeHeld([{ elementId: id, events: expected[id]!.slice(shipped) }]))).toBe(true);
      }
    }

    // A third service takes it in (all its spill rows are seq-only) and gives back the same bytes.
    const thirdStore = openStore();
    const third = service({ host: 'third', store: thirdStore, holdMemoryLimit: 3 });
    expect(third.insertHeld(whole)).toEqual({ accepted: n, duplicates: 0 });
    expect(spillKinds(thirdStore, 'vm:m').seqOnly).toBeGreaterThan(0);
    expect(same(third.serializeHeld(scope), whole)).toBe(true);
    expect(same(third.serializeHeldSince(scope).bytes, whole)).toBe(true);
    expect(third.journaledFor(scope)).toBe(n);

    // Released, every event is delivered once and its journal and spill rows go.
    const got: string[] = [];
    for (const id of scope) mix.subscribe(id, { deliver: (e) => void got.push(e.id) });
    mix.release(scope);
    await mix.idle();
    expect([...got].sort()).toEqual(scope.flatMap((id) => expected[id]!.map((e) => e.id)).sort());
    expect(mix.journaledFor(scope)).toBe(0);
    expect(rowCount(mixStore, 'held_spill')).toBe(0);
  });
});

/** Holds `elementId` on `s` and fills its queue with both kinds of spill rows: held as posted, then taken in from a peer. */
async function heldWithBothSpills(s: SensorService, store: Store, elementId: string, peerHost: string): Promise<string[]> {
  s.hold([elementId]);
  const ids: string[] = [];
  for (let i = 0; i < 6; i++) ids.push(s.post({ elementId, type: 'ARRIVED', ts: 100 + i, payload: { i } }).id);
  await s.idle();
  const peer = service({ host: peerHost });
  peer.hold([elementId]);
  for (let i = 0; i < 7; i++) ids.push(peer.post({ elementId, type: 'INSERTED', ts: 200 + i, payload: { i } }).id);
  expect(s.insertHeld(peer.serializeHeld([elementId])).accepted).toBe(7);
  const kinds = spillKinds(store, elementId);
  expect(kinds.withBytes).toBeGreaterThan(0);
  expect(kinds.seqOnly).toBeGreaterThan(0);
  return ids;
}

describe('SensorService: drop keeps the journal rows that must stay', () => {
  it('hands out spilled bytes in position order whatever order the rows were written in', () => {
    const journal = new Journal(openStore());
    const entry = (pos: number) => ({ seq: 1000 + pos, event: { id: `p.${pos}`, ts: pos, elementId: 'vm:a', type: 'T', payload: { pos } } as EmbotEvent });
    const range = (from: number, to: number) => Array.from({ length: to - from }, (_, i) => entry(from + i));
    // Later positions first, and another element's rows in between.
    journal.writeSpill('vm:a', 20, range(20, 30), true);
    journal.writeSpill('vm:b', 0, range(0, 5).map((e) => ({ ...e, seq: e.seq + 100, event: { ...e.event, elementId: 'vm:b' } })), true);
    journal.writeSpill('vm:a', 0, range(0, 20), true);
    const run = journal.spilledBytes('vm:a', 5, 25);
    expect(run.count).toBe(20);
    const bytes = encodeHeldParts([{ elementId: 'vm:a', spilled: [run], events: [] }]);
    expect(decodeHeld(bytes)[0]!.events.map((e) => e.ts)).toEqual(Array.from({ length: 20 }, (_, i) => 5 + i));
  });

  it('keeps rows of events a durable subscriber has not completed (of the dropped element and of others), until complete', async () => {
    const store = openStore();
    const s = service({ host: 'src', store, holdMemoryLimit: 4 });
    const inFlight: { id: string; seq: number }[] = [];
    const others: number[] = [];
    s.subscribe('vm:d', { durable: true, deliver: (e, seq) => void inFlight.push({ id: e.id, seq }) });
    s.subscribe('vm:o', { durable: true, deliver: (_e, seq) => void others.push(seq) });
    const inFlightQ: { id: string; seq: number }[] = [];
    s.subscribe('vm:q', { durable: true, deliver: (e, seq) => void inFlightQ.push({ id: e.id, seq }) });
    for (let i = 0; i < 3; i++) s.post({ elementId: 'vm:d', type: 'BUSY', ts: i });
    for (let i = 0; i < 2; i++) s.post({ elementId: 'vm:o', type: 'BUSY', ts: i });
    s.post({ elementId: 'vm:q', type: 'BUSY', ts: 0 });
    await s.idle();
    expect(inFlight.length).toBe(3);
    expect(inFlightQ.length).toBe(1);
    expect(s.stats().inFlight).toBe(6);
    const held = await heldWithBothSpills(s, store, 'vm:d', 'peer-d');
    // Queued, not dispatched yet (released, no tick since): discarded by drop too, beside vm:q's event in flight.
    s.hold(['vm:q']);
    const queued = [s.post({ elementId: 'vm:q', type: 'QUEUED', ts: 1 }), s.post({ elementId: 'vm:q', type: 'QUEUED', ts: 2 })];
    await s.idle();
    s.release(['vm:q']);
    expect(s.journaledFor(['vm:d'])).toBe(3 + held.length);
    expect(s.journaledFor(['vm:q'])).toBe(1 + queued.length);

    s.drop(['vm:d', 'vm:q']);
    expect(journaledIds(store, 'vm:d')).toEqual(inFlight.map((e) => e.id));
    expect(journaledIds(store, 'vm:q')).toEqual(inFlightQ.map((e) => e.id));
    expect(s.journaledFor(['vm:o'])).toBe(2);
    expect(rowCount(store, 'held_spill')).toBe(0);
    expect(rowCount(store)).toBe(6);
    await s.idle();
    // Nothing held or queued was delivered after the drop.
    expect(inFlight.length).toBe(3);
    expect(inFlightQ.length).toBe(1);

    s.complete(inFlight.slice(0, 2).map((e) => e.seq));
    expect(journaledIds(store, 'vm:d')).toEqual([inFlight[2]!.id]);
    s.complete([inFlight[2]!.seq, inFlightQ[0]!.seq, ...others]);
    expect(s.journaledFor(['vm:d', 'vm:q', 'vm:o'])).toBe(0);
    expect(rowCount(store)).toBe(0);
  });

  it('deletes every row of a dropped element when they are exactly the discarded ones, and no other element\'s', async () => {
    const store = openStore();
    const s = service({ host: 'src', store, holdMemoryLimit: 4 });
    await heldWithBothSpills(s, store, 'vm:all', 'peer-all');
    const keep = await heldWithBothSpills(s, store, 'vm:keep', 'peer-keep');
    s.hold(['vm:queued']);
    for (let i = 0; i < 3; i++) s.post({ elementId: 'vm:queued', type: 'QUEUED', ts: i });
    await s.idle();
    s.release(['vm:queued']); // in the time-ordered queue, not dispatched yet
    s.drop(['vm:all', 'vm:queued']);
    expect(s.journaledFor(['vm:all', 'vm:queued'])).toBe(0);
    expect(spillKinds(store, 'vm:all')).toEqual({ withBytes: 0, seqOnly: 0 });
    expect(journaledIds(store, 'vm:keep')).toEqual(keep);
    expect(decodeHeld(s.serializeHeld(['vm:keep']))[0]!.events.map((e) => e.id)).toEqual(keep);
    expect(rowCount(store)).toBe(keep.length);
  });

  it('keeps rows of a redirected element\'s events still waiting for their sink (sent or buffered) until the sink resolves', async () => {
    const store = openStore();
    const s = service({ host: 'src', store, holdMemoryLimit: 4, forwardBatchMax: 2 });
    const held = await heldWithBothSpills(s, store, 'vm:r', 'peer-r');
    let open: (() => void) | undefined;
    const calls: EmbotEvent[][] = [];
    const sink: ForwardSink = (events) => {
      calls.push([...events]);
      if (calls.length > 1) return Promise.resolve();
      return new Promise<void>((resolve) => (open = resolve));
    };
    const end = s.redirect(['vm:r'], sink);
    const forwarded = [0, 1, 2].map((i) => s.post({ elementId: 'vm:r', type: 'AFTER_SWITCH', ts: 300 + i }).id);
    await s.idle();
    await until(() => calls.length === 1, 'the first sink call');
    expect(calls[0]!.map((e) => e.id)).toEqual(forwarded.slice(0, 2)); // one batch out, one event buffered
    expect(s.journaledFor(['vm:r'])).toBe(held.length + forwarded.length);

    s.drop(['vm:r']);
    expect(journaledIds(store, 'vm:r')).toEqual(forwarded);
    expect(rowCount(store, 'held_spill')).toBe(0);
    expect(s.isHeld('vm:r')).toBe(false);

    open!();
    await until(() => s.stats().forwarded === forwarded.length, 'the sink to take the rest');
    expect(calls.flat().map((e) => e.id)).toEqual(forwarded);
    expect(s.journaledFor(['vm:r'])).toBe(0);
    expect(rowCount(store)).toBe(0);
    end();
  });
});

describe('SensorService: a seq-only spilled event whose journal row is gone', () => {
  it('serializeHeld, serializeHeldSince and release throw StoreError EMBOT_ERR_STORE_CORRUPT; other elements keep working', async () => {
    const store = openStore();
    const s = service({ host: 'src', store, holdMemoryLimit: 4 });
    const ok = await heldWithBothSpills(s, store, 'vm:ok', 'peer-ok');
    await heldWithBothSpills(s, store, 'vm:bad', 'peer-bad');
    const okBytes = s.serializeHeld(['vm:ok']);
    const lost = fakeDiskFaultLosingJournalRowOfSeqOnlySpill(store, 'vm:bad');
    expect(lost).toBeGreaterThan(0);

    const expectCorrupt = (fn: () => unknown): void => {
      expectThrownCode(fn, ErrorCodes.STORE_CORRUPT, StoreError);
      try {
        fn();
      } catch (e) {
        expect((e as EmbotError).details).toMatchObject({ elementId: 'vm:bad' });
      }
    };
    expectCorrupt(() => s.serializeHeld(['vm:bad']));
    expectCorrupt(() => s.serializeHeld(['vm:ok', 'vm:bad']));
    expectCorrupt(() => s.serializeHeldSince(['vm:bad']));
    expectCorrupt(() => s.release(['vm:bad']));
    expect(s.isHeld('vm:bad')).toBe(true); // nothing half-released

    // The other element, new events and new holds are untouched.
    expect(same(s.serializeHeld(['vm:ok']), okBytes)).toBe(true);
    const got: string[] = [];
    s.subscribe('vm:ok', { deliver: (e) => void got.push(e.id) });
    const live: string[] = [];
    s.subscribe('vm:live', { deliver: (e) => void live.push(e.id) });
    const fresh = s.post({ elementId: 'vm:live', type: 'LIVE' });
    s.release(['vm:ok']);
    await s.idle();
    expect(got).toEqual(ok);
    expect(live).toEqual([fresh.id]);
    expect(s.journaledFor(['vm:ok', 'vm:live'])).toBe(0);
    const again = service({ host: 'peer-again' });
    again.hold(['vm:new']);
    for (let i = 0; i < 9; i++) again.post({ elementId: 'vm:new', type: 'T', ts: i });
    const newBytes = again.serializeHeld(['vm:new']);
    expect(s.insertHeld(newBytes).accepted).toBe(9);
    expect(same(s.serializeHeld(['vm:new']), newBytes)).toBe(true);

    // The damaged queue can still be dropped: its remaining rows go, the lost one stays lost.
    s.drop(['vm:bad']);
    expect(s.journaledFor(['vm:bad'])).toBe(0);
    expect(s.isHeld('vm:bad')).toBe(false);
    expect(spillKinds(store, 'vm:bad')).toEqual({ withBytes: 0, seqOnly: 0 });
  });
});
