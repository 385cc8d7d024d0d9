import { Packr } from 'msgpackr';
import { describe, expect, it } from 'vitest';
import type { EmbotEvent } from '../../core/events.ts';
import { SensorService, decodeHeld, encodeHeld } from '../../sensors/index.ts';
import { scanHeld } from '../../sensors/held-scan.ts';
import { LazyShipment } from '../../sensors/lazy-shipment.ts';
import { ErrorCodes, EventError } from '../../core/errors.ts';
import { expectThrownCode } from '../harness/expect-code.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { prng } from '../harness/prng.ts';
import { tempStores } from '../harness/temp-store.ts';

const cleanups = cleanupsAfterEach();
const { openStore } = tempStores(cleanups, 'embot-held-scan-');
const plain = new Packr({ useRecords: false });

function event(id: string, elementId: string, extra: Partial<EmbotEvent> & Record<string, unknown> = {}): EmbotEvent {
  return { id, ts: 1_700_000_000_000, elementId, type: 'TICK', payload: { n: 1 }, ...extra } as EmbotEvent;
}

/** What decodeHeld makes of the bytes, in the scan's terms. */
function decodedShape(bytes: Uint8Array): { queues: { elementId: string; first: number; count: number }[]; total: number; ids: string[] } {
  let first = 0;
  const queues = decodeHeld(bytes).map((q) => {
    const out = { elementId: q.elementId, first, count: q.events.length };
    first += q.events.length;
    return out;
  });
  return { queues, total: first, ids: decodeHeld(bytes).flatMap((q) => q.events.map((e) => e.id)) };
}

describe('scanHeld', () => {
  it('vouches for what a source ships (spilled runs spliced in), with the ids, queues and counts decodeHeld finds', async () => {
    const scope = ['vm:a', 'disk:a', 'nic:a'];
    const src = new SensorService({ host: 'src', store: openStore(), holdMemoryLimit: 8, onError: () => {} });
    cleanups.push(() => src.close());
    src.hold(scope);
    for (let i = 0; i < 40; i++) {
      for (const elementId of scope) src.post({ elementId, type: 'VM_LOAD', source: 'vm-sensor', payload: { i, load: i / 40, name: 'a', tags: ['x', 'ü'], raw: new Uint8Array([i & 0xff]), nested: { deep: [null, true, -i, 2 ** 40] } } });
    }
    await src.idle();
    expect(src.stats().spilled).toBeGreaterThan(0);
    const bytes = src.serializeHeld(scope);
    const scan = scanHeld(bytes);
    expect(scan).toEqual(decodedShape(bytes));
    expect(scan!.total).toBe(120);
  });

  it('vouches for encodeHeld output of every payload shape the decoder accepts without classes', () => {
    const payloads: unknown[] = [null, 0, -1, -200, 70_000, -70_000, 2 ** 31, 2 ** 52, 1.5, -0.25, Number.NaN, '', 'ascii', 'é€😀', true, false, [], {}, [1, [2, [3, { a: [4] }]]], { a: { b: { c: 'd' } } }, new Uint8Array(300), 'x'.repeat(70_000)];
    const events = payloads.map((payload, i) => event(`peer.${i}`, 'vm:a', { payload, ...(i % 2 ? { source: 'sensor-1' } : {}) }));
    const bytes = encodeHeld([{ elementId: 'vm:a', events }, { elementId: 'nic:a', events: [event('peer.x', 'nic:a', { payload: null })] }]);
    expect(scanHeld(bytes)).toEqual(decodedShape(bytes));
  });

  it('is inconclusive (not wrong) on valid bytes it cannot vouch for without the decoder', () => {
    const valid: [string, Uint8Array][] = [
      ['a Date in a payload (ext type)', encodeHeld([{ elementId: 'vm:a', events: [event('p.1', 'vm:a', { payload: { at: new Date(0) } })] }])],
      ['a non-ASCII id', encodeHeld([{ elementId: 'vm:a', events: [event('p.é', 'vm:a')] }])],
      ['an undefined payload (msgpackr writes an ext)', encodeHeld([{ elementId: 'vm:a', events: [event('p.1', 'vm:a', { payload: undefined })] }])],
      ['events before elementId', plain.pack({ v: 1, queues: [{ events: [event('p.1', 'vm:a')], elementId: 'vm:a' }] })],
      ['a very deep payload', encodeHeld([{ elementId: 'vm:a', events: [event('p.1', 'vm:a', { payload: JSON.parse('['.repeat(40) + ']'.repeat(40)) as unknown })] }])],
    ];
    for (const [why, bytes] of valid) {
      expect(() => decodeHeld(bytes), why).not.toThrow();
      expect(scanHeld(bytes), why).toBeUndefined();
    }
    // A 64-bit integer may decode as a bigint, which is no timestamp: the decoder says which.
    expect(scanHeld(plain.pack({ v: 1, queues: [{ elementId: 'vm:a', events: [{ id: 'p.1', ts: 2n ** 60n, elementId: 'vm:a', type: 'TICK', payload: null }] }] }))).toBeUndefined();
  });

  it('is inconclusive on ids of the agent\'s own namespace, which need the decoder\'s minted check', () => {
    const bytes = encodeHeld([{ elementId: 'vm:a', events: [event('peer.1', 'vm:a'), event('b.k1.2', 'vm:a')] }]);
    expect(scanHeld(bytes, { rejectIdPrefix: 'b.' })).toBeUndefined();
    expect(scanHeld(bytes, { rejectIdPrefix: 'c.' })?.total).toBe(2);
  });

  it('never vouches for bytes decodeHeld refuses', () => {
    const ok = event('p.1', 'vm:a');
    const queue = (events: unknown[], elementId = 'vm:a'): Uint8Array => plain.pack({ v: 1, queues: [{ elementId, events }] });
    const bad: [string, Uint8Array][] = [
      ['not msgpack', new Uint8Array([0xc1])],
      ['empty', new Uint8Array(0)],
      ['version 2', plain.pack({ v: 2, queues: [] })],
      ['no queues', plain.pack({ v: 1 })],
      ['queues not a list', plain.pack({ v: 1, queues: {} })],
      ['invalid element id', queue([], 'no spaces allowed')],
      ['an event of another element', queue([{ ...ok, elementId: 'vm:b' }])],
      ['a lower-case type', queue([{ ...ok, type: 'tick' }])],
      ['a negative ts', queue([{ ...ok, ts: -1 }])],
      ['a NaN ts', queue([{ ...ok, ts: Number.NaN }])],
      ['a string ts', queue([{ ...ok, ts: '1' }])],
      ['an empty id', queue([{ ...ok, id: '' }])],
      ['an id too long', queue([{ ...ok, id: 'x'.repeat(257) }])],
      ['a numeric id', queue([{ ...ok, id: 7 }])],
      ['no type', queue([{ id: 'p.1', ts: 1, elementId: 'vm:a', payload: null }])],
      ['an empty source', queue([{ ...ok, source: '' }])],
      ['a nil source', queue([{ ...ok, source: null }])],
      ['an event that is a list', queue([['p.1', 1]])],
      ['an element twice', plain.pack({ v: 1, queues: [{ elementId: 'vm:a', events: [] }, { elementId: 'vm:a', events: [] }] })],
      ['trailing bytes', Buffer.concat([encodeHeld([{ elementId: 'vm:a', events: [ok] }]), Buffer.from([0xc0])])],
      ['truncated', encodeHeld([{ elementId: 'vm:a', events: [ok] }]).subarray(0, 30)],
    ];
    for (const [why, bytes] of bad) {
      expect(() => decodeHeld(bytes), why).toThrow();
      expect(scanHeld(bytes), why).toBeUndefined();
    }
  });

  it('under random corruption, whatever it vouches for decodes to the same queues, counts and ids', () => {
    const events = Array.from({ length: 30 }, (_, i) => event(`peer.${i}`, i % 2 ? 'vm:a' : 'disk:a', { payload: { i, s: 'abc', l: [i, -i, 0.5] }, ...(i % 3 ? { source: 's' } : {}) }));
    const base = encodeHeld([
      { elementId: 'disk:a', events: events.filter((e) => e.elementId === 'disk:a') },
      { elementId: 'vm:a', events: events.filter((e) => e.elementId === 'vm:a') },
    ]);
    const rand = prng(20261123);
    let vouched = 0;
    for (let round = 0; round < 3000; round++) {
      let bytes: Uint8Array = Uint8Array.from(base);
      const edits = 1 + Math.floor(rand() * 3);
      for (let e = 0; e < edits; e++) {
        const at = Math.floor(rand() * bytes.length);
        const kind = rand();
        if (kind < 0.6) bytes[at] = Math.floor(rand() * 256);
        else if (kind < 0.8) bytes = bytes.subarray(0, at);
        else bytes = Buffer.concat([bytes.subarray(0, at), Buffer.from([Math.floor(rand() * 256)]), bytes.subarray(at)]);
      }
      const scan = scanHeld(bytes);
      if (scan === undefined) continue;
      vouched++;
      expect(scan, `round ${round}`).toEqual(decodedShape(bytes));
    }
    // Most single-byte changes land in ids, strings and numbers the scan still vouches for: the property was exercised.
    expect(vouched).toBeGreaterThan(300);
  });
});

describe('LazyShipment', () => {
  it('numbers events like the blob row (duplicates skipped) and hands each element its own once', () => {
    const bytes = encodeHeld([
      { elementId: 'vm:a', events: [event('p.0', 'vm:a'), event('p.1', 'vm:a'), event('p.2', 'vm:a')] },
      { elementId: 'disk:a', events: [event('p.3', 'disk:a'), event('p.4', 'disk:a')] },
    ]);
    const shipment = new LazyShipment(100, bytes, scanHeld(bytes)!, new Set([1]));
    expect([...shipment.elements]).toEqual(['vm:a', 'disk:a']);
    expect(shipment.countOf('vm:a')).toBe(2);
    expect(shipment.take('disk:a').map((e) => [e.event.id, e.seq])).toEqual([['p.3', 102], ['p.4', 103]]);
    expect(shipment.take('vm:a').map((e) => [e.event.id, e.seq])).toEqual([['p.0', 100], ['p.2', 101]]);
    expect(shipment.take('vm:a')).toEqual([]);
    expect(shipment.countOf('vm:a')).toBe(0);
  });

  it('keeps an element\'s events when its bytes do not decode, and says so with EMBOT_ERR_HOLD_DECODE', () => {
    const bytes = encodeHeld([{ elementId: 'vm:a', events: [event('p.0', 'vm:a')] }]);
    const scan = scanHeld(bytes)!;
    // A fault that cannot happen to bytes the scan read: they changed under the shipment.
    const changed = Uint8Array.from(bytes);
    changed[0] = 0xc1;
    const shipment = new LazyShipment(1, changed, scan, new Set());
    expectThrownCode(() => shipment.take('vm:a'), ErrorCodes.HOLD_DECODE, EventError);
    expect(shipment.countOf('vm:a')).toBe(1);
  });
});
