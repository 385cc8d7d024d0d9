import type Database from 'better-sqlite3';
import { Packr } from 'msgpackr';
import { ErrorCodes, EventError, StoreError, describeError } from '../core/errors.ts';
import type { EmbotEvent } from '../core/events.ts';
import { isValidElementId, isValidEventType } from '../core/events.ts';
import type { Store } from '../core/store/store.ts';
import type { QueuedEvent } from './event-queue.ts';

/**
 * Plain msgpack maps (no record extension): the bytes are readable by any peer and re-encoding a
 * decoded value gives the same bytes, which the hold-queue round trip relies on.
 */
export const eventPackr = new Packr({ useRecords: false });

const MAX_DEPTH = 64;
const INT64_MIN = -(2n ** 63n);
const UINT64_MAX = 2n ** 64n - 1n;

/**
 * Why `value` would not survive msgpack unchanged, or `undefined` when it would. msgpackr silently
 * turns functions into nil and class instances into bare maps, so this check runs before it.
 */
export function whyNotEncodable(value: unknown, depth = 0): string | undefined {
  switch (typeof value) {
    case 'string':
    case 'number':
    case 'boolean':
    case 'undefined':
      return undefined;
    case 'bigint':
      return value < INT64_MIN || value > UINT64_MAX ? 'a bigint outside the 64-bit range' : undefined;
    case 'object': {
      if (value === null) return undefined;
      if (depth >= MAX_DEPTH) return `nesting deeper than ${MAX_DEPTH} (cyclic?)`;
      if (Array.isArray(value)) {
        for (let i = 0; i < value.length; i++) {
          const why = whyNotEncodable(value[i], depth + 1);
          if (why !== undefined) return why;
        }
        return undefined;
      }
      if (value instanceof Uint8Array) return undefined;
      if (value instanceof Date) return Number.isFinite(value.getTime()) ? undefined : 'an invalid Date';
      const proto: unknown = Object.getPrototypeOf(value);
      if (proto !== Object.prototype && proto !== null) {
        const name = (value as { constructor?: { name?: unknown } }).constructor?.name;
        return `an instance of ${typeof name === 'string' ? name : 'a class'} (only plain objects, arrays, Uint8Array and Date)`;
      }
      for (const key in value) {
        const why = whyNotEncodable((value as Record<string, unknown>)[key], depth + 1);
        if (why !== undefined) return why;
      }
      return undefined;
    }
    default:
      return `a ${typeof value}`;
  }
}

/** The one shape every event object has, so encodings are canonical (`source` only when present). */
export function makeEvent(id: string, ts: number, elementId: string, type: string, payload: unknown, source: string | undefined): EmbotEvent {
  return source === undefined ? { id, ts, elementId, type, payload } : { id, ts, elementId, type, payload, source };
}

export function encodePayload(payload: unknown): Buffer | null {
  return payload === null ? null : eventPackr.pack(payload);
}

function decodePayload(bytes: Buffer | null): unknown {
  return bytes === null ? null : eventPackr.unpack(bytes);
}

export const MAX_ID_LENGTH = 256;
export const MAX_SOURCE_LENGTH = 128;

export function isValidEventId(id: unknown): id is string {
  return typeof id === 'string' && id.length > 0 && id.length <= MAX_ID_LENGTH;
}

export function isValidSource(source: unknown): source is string | undefined {
  return source === undefined || (typeof source === 'string' && source.length > 0 && source.length <= MAX_SOURCE_LENGTH);
}

export function isValidTs(ts: unknown): ts is number {
  return typeof ts === 'number' && Number.isFinite(ts) && ts >= 0;
}

function badWire(where: string, why: string): never {
  throw new EventError(ErrorCodes.HOLD_DECODE, `hold queue data: ${where}: ${why}`, { details: { where } });
}

/** The event in decoded, untrusted data, or what is wrong with it. No closures or strings built on success: it runs once per event of a hold queue. */
function wireEvent(raw: unknown, elementId: string): EmbotEvent | string {
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) return 'not an event map';
  const e = raw as Record<string, unknown>;
  if (!isValidEventId(e.id)) return 'bad id';
  if (!isValidTs(e.ts)) return 'bad ts';
  if (e.elementId !== elementId) return `elementId ${String(e.elementId)} does not match its queue ${elementId}`;
  if (!isValidEventType(e.type)) return 'bad type';
  if (!isValidSource(e.source)) return 'bad source';
  const why = whyNotEncodable(e.payload);
  if (why !== undefined) return `payload holds ${why}`;
  // The decoded map is kept when it already is what makeEvent would build: one object less per event to collect.
  if (hasEventShape(e)) return e as unknown as EmbotEvent;
  return makeEvent(e.id, e.ts, elementId, e.type, e.payload ?? null, e.source);
}

const EVENT_KEYS: readonly string[] = ['id', 'ts', 'elementId', 'type', 'payload', 'source'];

/** Whether a decoded map has exactly the keys of {@link makeEvent}'s events, in its order (so it encodes the same). */
function hasEventShape(e: Record<string, unknown>): boolean {
  let n = 0;
  for (const key in e) {
    if (n === EVENT_KEYS.length || key !== EVENT_KEYS[n]) return false;
    n++;
  }
  return e.payload !== undefined && (n === 5 || (n === 6 && e.source !== undefined));
}

/**
 * Rebuilds an event from decoded, untrusted data (a peer's hold queues), or throws
 * `EMBOT_ERR_HOLD_DECODE` saying what is wrong.
 */
export function eventFromWire(raw: unknown, elementId: string, where: string): EmbotEvent {
  const event = wireEvent(raw, elementId);
  return typeof event === 'string' ? badWire(where, event) : event;
}

export interface DecodedQueue {
  readonly elementId: string;
  readonly events: readonly EmbotEvent[];
}

/** Reads the bytes of {@link encodeHeld} (a peer's hold queues: untrusted), or throws `EMBOT_ERR_HOLD_DECODE` saying what is wrong. */
export function decodeHeld(bytes: Uint8Array): DecodedQueue[] {
  const bad = (why: string, cause?: unknown): never => {
    throw new EventError(ErrorCodes.HOLD_DECODE, `hold queue data: ${why}`, cause === undefined ? undefined : { cause });
  };
  if (!(bytes instanceof Uint8Array)) return bad('expected bytes');
  let raw: unknown;
  try {
    raw = eventPackr.unpack(bytes);
  } catch (cause) {
    return bad(`not msgpack (${describeError(cause)})`, cause);
  }
  if (raw === null || typeof raw !== 'object' || (raw as { v?: unknown }).v !== 1) return bad('not a version 1 hold-queue map');
  const queues = (raw as { queues?: unknown }).queues;
  if (!Array.isArray(queues)) return bad('queues is not a list');
  const out: DecodedQueue[] = [];
  const seen = new Set<string>();
  queues.forEach((q: unknown, qi) => {
    if (q === null || typeof q !== 'object') return bad(`queue ${qi} is not a map`);
    const { elementId, events } = q as { elementId?: unknown; events?: unknown };
    if (!isValidElementId(elementId)) return bad(`queue ${qi}: invalid elementId`);
    if (seen.has(elementId)) return bad(`queue ${qi}: element ${elementId} appears twice`);
    seen.add(elementId);
    if (!Array.isArray(events)) return bad(`queue ${qi}: events is not a list`);
    const list = new Array<EmbotEvent>(events.length);
    for (let i = 0; i < events.length; i++) {
      const event = wireEvent(events[i], elementId);
      if (typeof event === 'string') return badWire(`queue ${elementId} event ${i}`, event);
      list[i] = event;
    }
    out.push({ elementId, events: list });
  });
  return out;
}

/**
 * The hold-queue byte form (`SensorService.serializeHeld`, `insertHeld`): msgpack `{ v: 1, queues: [{ elementId, events }] }`,
 * each element once, its events in arrival order.
 */
export function encodeHeld(queues: readonly DecodedQueue[]): Uint8Array {
  return eventPackr.pack({ v: 1, queues });
}

/**
 * Events of any elements in the hold-queue byte form, grouped by element in order of first appearance, each
 * element's events in the given order: how a source packs forwarded events for the new owner's `insertHeld`.
 *
 * @example
 * ```ts
 * sensors.redirect(['vm:web'], (events) => peer.request({ type: 'ForwardedEvents', migrationId, events: encodeEvents(events) }).then(() => {}));
 * ```
 */
export function encodeEvents(events: readonly EmbotEvent[]): Uint8Array {
  const byElement = new Map<string, EmbotEvent[]>();
  for (const e of events) {
    const list = byElement.get(e.elementId);
    if (list === undefined) byElement.set(e.elementId, [e]);
    else list.push(e);
  }
  return encodeHeld([...byElement].map(([elementId, list]) => ({ elementId, events: list })));
}

/**
 * A stretch of a spilled hold queue, as stored: the events' msgpack bytes back to back (`count` of them), or the
 * journal rows of spill entries that only name their event.
 */
export type SpilledRun = { readonly bytes: Buffer; readonly count: number } | { readonly rows: readonly JournalRow[] };

/** A hold queue to encode: its spilled part, then the events in memory. */
export interface HeldPart {
  readonly elementId: string;
  readonly spilled: readonly SpilledRun[];
  readonly events: readonly EmbotEvent[];
}

/** Events in a {@link SpilledRun}. */
export function runLength(run: SpilledRun): number {
  return 'rows' in run ? run.rows.length : run.count;
}

/** A growing output buffer for {@link encodeHeldParts}. */
class ByteWriter {
  buf: Buffer;
  pos = 0;

  constructor(size: number) {
    this.buf = Buffer.allocUnsafe(Math.max(1024, size));
  }

  room(n: number): void {
    if (this.pos + n <= this.buf.length) return;
    const next = Buffer.allocUnsafe(Math.max(this.buf.length * 2, this.pos + n));
    this.buf.copy(next, 0, 0, this.pos);
    this.buf = next;
  }

  bytes(b: Uint8Array): void {
    this.room(b.length);
    this.buf.set(b, this.pos);
    this.pos += b.length;
  }

  /** msgpackr's array header for `n` items. */
  arrayHeader(n: number): void {
    this.room(5);
    const buf = this.buf;
    if (n < 0x10) {
      buf[this.pos++] = 0x90 | n;
    } else if (n < 0x10000) {
      buf[this.pos++] = 0xdc;
      buf.writeUInt16BE(n, this.pos);
      this.pos += 2;
    } else {
      buf[this.pos++] = 0xdd;
      buf.writeUInt32BE(n, this.pos);
      this.pos += 4;
    }
  }

  /** Writes `s` as msgpackr would when it is all ASCII; returns false (having written part of it) when it is not. */
  ascii(s: string): boolean {
    const n = s.length;
    this.room(n + 5);
    const buf = this.buf;
    let p = this.pos;
    if (n < 0x20) {
      buf[p++] = 0xa0 | n;
    } else if (n < 0x100) {
      buf[p++] = 0xd9;
      buf[p++] = n;
    } else if (n < 0x10000) {
      buf[p++] = 0xda;
      buf[p++] = n >> 8;
      buf[p++] = n & 0xff;
    } else {
      buf[p++] = 0xdb;
      buf.writeUInt32BE(n, p);
      p += 4;
    }
    for (let i = 0; i < n; i++) {
      const c = s.charCodeAt(i);
      if (c >= 0x80) return false;
      buf[p++] = c;
    }
    this.pos = p;
    return true;
  }

  /** A number as msgpackr writes it with `useRecords: false` and no float32: the smallest int, else float64. */
  number(v: number): void {
    this.room(9);
    const buf = this.buf;
    if (v >>> 0 === v) {
      if (v < 0x80) {
        buf[this.pos++] = v;
      } else if (v < 0x100) {
        buf[this.pos++] = 0xcc;
        buf[this.pos++] = v;
      } else if (v < 0x10000) {
        buf[this.pos++] = 0xcd;
        buf.writeUInt16BE(v, this.pos);
        this.pos += 2;
      } else {
        buf[this.pos++] = 0xce;
        buf.writeUInt32BE(v, this.pos);
        this.pos += 4;
      }
    } else if (v >> 0 === v) {
      if (v >= -0x20) {
        buf[this.pos++] = 0x100 + v;
      } else if (v >= -0x80) {
        buf[this.pos++] = 0xd0;
        buf[this.pos++] = v + 0x100;
      } else if (v >= -0x8000) {
        buf[this.pos++] = 0xd1;
        buf.writeInt16BE(v, this.pos);
        this.pos += 2;
      } else {
        buf[this.pos++] = 0xd2;
        buf.writeInt32BE(v, this.pos);
        this.pos += 4;
      }
    } else {
      buf[this.pos++] = 0xcb;
      buf.writeDoubleBE(v, this.pos);
      this.pos += 8;
    }
  }

  /** The bytes written; copied to their size when the buffer is much larger (it travels in a frame). */
  result(): Buffer {
    const out = this.buf.subarray(0, this.pos);
    return this.pos * 4 < this.buf.length * 3 ? Buffer.from(out) : out;
  }
}

/** msgpackr writes every plain object with a map16 header (it fills in the count afterwards). */
const MAP_HEAD = (n: number): Buffer => Buffer.from([0xde, n >> 8, n & 0xff]);
/** Own copies: a pack result is a view into msgpackr's shared buffer. */
const packed = (value: unknown): Buffer => Buffer.from(eventPackr.pack(value));
const KEY_ID = packed('id');
const KEY_TS = packed('ts');
const KEY_ELEMENT_ID = packed('elementId');
const KEY_TYPE = packed('type');
const KEY_PAYLOAD = packed('payload');
const KEY_SOURCE = packed('source');
const KEY_EVENTS = packed('events');
const EVENT_HEAD = MAP_HEAD(5);
const EVENT_HEAD_WITH_SOURCE = MAP_HEAD(6);
const QUEUE_HEAD = MAP_HEAD(2);
const NIL = Buffer.from([0xc0]);
/** `{ v: 1, queues: ` of the hold-queue map, up to the queues' array header. */
const HELD_HEAD = Buffer.concat([MAP_HEAD(2), packed('v'), packed(1), packed('queues')]);

/** Writes a journal row as msgpackr would write its event, splicing the stored payload bytes; false when a string is not ASCII. */
function writeRow(w: ByteWriter, r: JournalRow): boolean {
  const source = r[6];
  w.bytes(source === null ? EVENT_HEAD : EVENT_HEAD_WITH_SOURCE);
  w.bytes(KEY_ID);
  if (!w.ascii(r[1])) return false;
  w.bytes(KEY_TS);
  w.number(r[2]);
  w.bytes(KEY_ELEMENT_ID);
  if (!w.ascii(r[3])) return false;
  w.bytes(KEY_TYPE);
  if (!w.ascii(r[4])) return false;
  w.bytes(KEY_PAYLOAD);
  w.bytes(r[5] ?? NIL);
  if (source === null) return true;
  w.bytes(KEY_SOURCE);
  return w.ascii(source);
}

function writeParts(w: ByteWriter, parts: readonly HeldPart[]): void {
  w.bytes(HELD_HEAD);
  w.arrayHeader(parts.length);
  for (const part of parts) {
    w.bytes(QUEUE_HEAD);
    w.bytes(KEY_ELEMENT_ID);
    const at = w.pos;
    if (!w.ascii(part.elementId)) {
      w.pos = at;
      w.bytes(eventPackr.pack(part.elementId));
    }
    w.bytes(KEY_EVENTS);
    let count = part.events.length;
    for (const run of part.spilled) count += runLength(run);
    w.arrayHeader(count);
    for (const run of part.spilled) {
      if (!('rows' in run)) {
        w.bytes(run.bytes);
        continue;
      }
      for (const r of run.rows) {
        const start = w.pos;
        if (!writeRow(w, r)) {
          w.pos = start;
          w.bytes(eventPackr.pack(rowToEntry(r).event));
        }
      }
    }
    const n = part.events.length;
    if (n > 0) {
      // One pack call for the events in memory; their array header is already written.
      const packed = eventPackr.pack(part.events);
      w.bytes(packed.subarray(n < 0x10 ? 1 : n < 0x10000 ? 3 : 5));
    }
  }
}

/** Whether {@link writeParts} gives exactly {@link encodeHeld}'s bytes with this msgpackr: checked once, else the slow path is used. */
const SPLICE_OK = ((): boolean => {
  try {
    const events: EmbotEvent[] = [
      makeEvent('h.1', 1_700_000_000_123, 'vm:a', 'VM_LOAD', { load: 0.5, name: 'web', seq: 1, list: [1, -2, 300, 70_000, 'x'.repeat(40)] }, undefined),
      makeEvent('h.2'.repeat(20), 0, 'vm:a', 'T', null, 'vm'),
      makeEvent('h.3', 127, 'vm:a', 'T', 'x'.repeat(300), 's'.repeat(40)),
      makeEvent('h.4', 128.5, 'vm:a', 'T', { nested: { deep: true } }, undefined),
      makeEvent('h.5', 65_536, 'vm:a', 'T', new Uint8Array([1, 2, 3]), undefined),
      makeEvent('h.6', 2 ** 40 + 0.25, 'vm:a', 'T', 'é', undefined),
      makeEvent('h.é', 3, 'vm:a', 'T', 1, 'ü'),
    ];
    const rows: JournalRow[] = events.map((e, i) => [i + 1, e.id, e.ts, e.elementId, e.type, encodePayload(e.payload), e.source ?? null]);
    const stored = events.slice(0, 3);
    const memory = Array.from({ length: 20 }, (_, i) => makeEvent(`m.${i}`, 1000 + i, 'vm:a', 'T', { i }, undefined));
    const w = new ByteWriter(0);
    const spilled: SpilledRun[] = [{ bytes: Buffer.concat(stored.map((e) => eventPackr.pack(e))), count: stored.length }, { rows }];
    writeParts(w, [{ elementId: 'vm:a', spilled, events: memory }, { elementId: 'vm:b', spilled: [], events: [] }]);
    const expected = encodeHeld([{ elementId: 'vm:a', events: stored.concat(events, memory) }, { elementId: 'vm:b', events: [] }]);
    return Buffer.from(expected).equals(w.result());
  } catch {
    return false;
  }
})();

/** The events of a spilled run, decoded. */
function runEvents(run: SpilledRun): EmbotEvent[] {
  if ('rows' in run) return run.rows.map((r) => rowToEntry(r).event);
  const events: EmbotEvent[] = [];
  eventPackr.unpackMultiple(run.bytes, (e: unknown) => {
    events.push(e as EmbotEvent);
  });
  return events;
}

/**
 * The bytes of {@link encodeHeld} for these queues, built without decoding the spilled part: stored event bytes are
 * copied as they are and journal rows are written around their stored payload bytes (msgpack of a value nested in a
 * map is the msgpack of the value alone). Checked against {@link encodeHeld} once at load; if this msgpackr encodes
 * differently, it decodes and uses {@link encodeHeld} instead.
 *
 * @example
 * ```ts
 * const bytes = encodeHeldParts([{ elementId: 'vm:a', spilled: [journal.spilledBytes('vm:a', 0, 5_000)], events: inMemory }]);
 * ```
 */
export function encodeHeldParts(parts: readonly HeldPart[]): Uint8Array {
  if (!SPLICE_OK) return encodeHeld(parts.map((p) => ({ elementId: p.elementId, events: p.spilled.flatMap(runEvents).concat(p.events) })));
  let size = 64;
  for (const p of parts) {
    size += 32 + p.elementId.length;
    for (const run of p.spilled) {
      if (!('rows' in run)) size += run.bytes.length;
      else for (const r of run.rows) size += 64 + r[1].length + r[3].length + r[4].length + (r[5]?.length ?? 1) + (r[6]?.length ?? 0);
    }
    size += p.events.length * 128;
  }
  const w = new ByteWriter(size);
  writeParts(w, parts);
  return w.result();
}

interface EventRow {
  seq: number;
  id: string;
  ts: number;
  element_id: string;
  type: string;
  payload: Buffer | null;
  source: string | null;
}

/**
 * A journal row as `[seq, id, ts, elementId, type, payload bytes, source]`: what a spilled hold-queue entry is read
 * back as, so {@link HeldWriter} can splice the stored payload bytes instead of decoding and re-encoding them.
 */
export type JournalRow = readonly [seq: number, id: string, ts: number, elementId: string, type: string, payload: Buffer | null, source: string | null];

/** The event a journal row holds (its payload decoded). */
export function rowToEntry(r: JournalRow): QueuedEvent {
  return { seq: r[0], event: makeEvent(r[1], r[2], r[3], r[4], decodePayload(r[5]), r[6] ?? undefined) };
}

/**
 * Rows per multi-row INSERT. Binding is per value either way; what a bigger statement saves is the per-statement
 * step/reset work, which stops paying off past a few dozen rows.
 */
const ROWS_PER_INSERT = 50;
const INSERT_COLUMNS = 7;
/** Seqs per `DELETE ... WHERE seq IN (...)`. */
const SEQS_PER_DELETE = 64;
/** A run of consecutive seqs at least this long is deleted with one range statement instead of through the IN lists. */
const MIN_RANGE_RUN = 8;

const SPILLED_ROW_SQL =
  'SELECT e.seq, e.id, e.ts, e.element_id, e.type, e.payload, e.source FROM held_spill h JOIN events e ON e.seq = h.seq WHERE h.element_id = ? AND h.pos >= ? AND h.pos < ? ORDER BY h.pos';

/**
 * The sensor service's durable part: table `events` (one row per journaled event, `seq` = arrival
 * sequence) and table `held_spill` (the overflow of hold queues). Every method is synchronous so
 * callers can group it in their own transaction.
 *
 * A spilled hold-queue entry is always an event journaled in `events` (a hold queue only exists with a journal, and
 * only journaled events are routed), so a `held_spill` row keeps its position and `seq` only (`event` is empty) and
 * the event is read back from `events`: spilling writes each event once, not twice.
 *
 * @example
 * ```ts
 * const journal = new Journal(Store.open({ file: ':memory:' }));
 * journal.insert({ event, seq: journal.maxSeq() + 1 }, encodePayload(event.payload));
 * ```
 */
export class Journal {
  readonly store: Store;
  /** Rows currently in table `events`. */
  rows: number;
  private readonly db: Database.Database;
  private readonly insertStmt: Database.Statement;
  private readonly insertManyStmt: Database.Statement;
  private readonly seqExistsStmt: Database.Statement<[number]>;
  private readonly deleteStmt: Database.Statement<[number]>;
  private readonly deleteRangeStmt: Database.Statement<[number, number]>;
  private readonly deleteListStmt: Database.Statement;
  private readonly deleteElementStmt: Database.Statement<[string]>;
  private readonly deleteSpilledEventsStmt: Database.Statement<[string]>;
  private readonly spillInsertStmt: Database.Statement<[string, number, string]>;
  private readonly spillInsertEventsStmt: Database.Statement;
  private readonly spillInsertOneStmt: Database.Statement<[string, number, number, Buffer]>;
  private readonly spillBytesStmt: Database.Statement<[string, number, number], { n: number; bytes: Buffer | null }>;
  private readonly spillSelectStmt: Database.Statement<[string, number, number]>;
  private readonly spillForeignIdsStmt: Database.Statement<[string, number, string]>;
  private readonly countForStmt: Database.Statement<[string], { n: number }>;
  private readonly spillDeleteStmt: Database.Statement<[string]>;
  private readonly takenInsertManyStmt: Database.Statement;
  private readonly takenInsertOneStmt: Database.Statement<[string, number, number]>;
  private readonly takenRecentStmt: Database.Statement<[number], [string, number]>;
  private readonly tsOfStmt: Database.Statement<[string], number>;
  private readonly takenPruneStmt: Database.Statement<[number]>;

  constructor(store: Store) {
    this.store = store;
    this.db = store.db;
    const columns = 'INSERT OR IGNORE INTO events(seq, id, ts, element_id, type, payload, source) VALUES ';
    this.insertStmt = this.db.prepare(`${columns}(?, ?, ?, ?, ?, ?, ?)`);
    this.insertManyStmt = this.db.prepare(columns + new Array<string>(ROWS_PER_INSERT).fill('(?, ?, ?, ?, ?, ?, ?)').join(', '));
    this.seqExistsStmt = this.db.prepare('SELECT 1 FROM events WHERE seq = ?').pluck();
    this.deleteStmt = this.db.prepare('DELETE FROM events WHERE seq = ?');
    this.deleteRangeStmt = this.db.prepare('DELETE FROM events WHERE seq BETWEEN ? AND ?');
    this.deleteListStmt = this.db.prepare(`DELETE FROM events WHERE seq IN (${new Array<string>(SEQS_PER_DELETE).fill('?').join(', ')})`);
    this.deleteElementStmt = this.db.prepare('DELETE FROM events WHERE element_id = ?');
    this.deleteSpilledEventsStmt = this.db.prepare('DELETE FROM events WHERE seq IN (SELECT seq FROM held_spill WHERE element_id = ?)');
    // One statement per spill: SQLite walks the JSON list of seqs itself.
    this.spillInsertStmt = this.db.prepare("INSERT INTO held_spill(element_id, pos, seq, event) SELECT ?, ? + key, value, x'' FROM json_each(?)");
    this.spillInsertEventsStmt = this.db.prepare(`INSERT INTO held_spill(element_id, pos, seq, event) VALUES ${new Array<string>(ROWS_PER_INSERT).fill('(?, ?, ?, ?)').join(', ')}`);
    this.spillInsertOneStmt = this.db.prepare('INSERT INTO held_spill(element_id, pos, seq, event) VALUES (?, ?, ?, ?)');
    // One blob for a stretch of stored events: no row objects, the bytes go to the wire as they are.
    // The rows come from a co-routine that reads the primary key in pos order, and the aggregate takes them as they
    // come: `group_concat(... ORDER BY pos)` sorted them again in a temporary b-tree, twice the time for 70k rows.
    this.spillBytesStmt = this.db.prepare(
      "SELECT count(*) AS n, CAST(group_concat(event, '') AS BLOB) AS bytes FROM (SELECT event FROM held_spill WHERE element_id = ? AND pos >= ? AND pos < ? ORDER BY pos)",
    );
    this.spillSelectStmt = this.db.prepare(SPILLED_ROW_SQL).raw();
    this.spillForeignIdsStmt = this.db
      .prepare('SELECT e.id FROM held_spill h JOIN events e ON e.seq = h.seq WHERE h.element_id = ? AND substr(e.id, 1, ?) <> ? ORDER BY h.pos')
      .pluck();
    this.countForStmt = this.db.prepare('SELECT count(*) AS n FROM events WHERE element_id = ?');
    this.spillDeleteStmt = this.db.prepare('DELETE FROM held_spill WHERE element_id = ?');
    // One statement per group commit: SQLite walks the JSON list of ids itself.
    // Multi-row statements like the events' own: cheaper than one JSON argument walked by json_each once each id has
    // its ts (an object built per commit, or pairs read with `value ->> 0`, cost more in JS or in SQLite).
    this.takenInsertManyStmt = this.db.prepare(`INSERT OR IGNORE INTO taken_ids(id, at, ts) VALUES ${new Array<string>(ROWS_PER_INSERT).fill('(?, ?, ?)').join(', ')}`);
    this.takenInsertOneStmt = this.db.prepare('INSERT OR IGNORE INTO taken_ids(id, at, ts) VALUES (?, ?, ?)');
    this.takenRecentStmt = this.db
      .prepare<[number], [string, number]>('SELECT id, ts FROM (SELECT rowid AS r, id, coalesce(ts, at) AS ts FROM taken_ids ORDER BY rowid DESC LIMIT ?) ORDER BY r')
      .raw();
    this.tsOfStmt = this.db.prepare<[string], number>('SELECT ts FROM events WHERE id = ?').pluck();
    this.takenPruneStmt = this.db.prepare('DELETE FROM taken_ids WHERE rowid <= (SELECT max(rowid) FROM taken_ids) - ?');
    this.rows = (this.db.prepare('SELECT count(*) AS n FROM events').get() as { n: number }).n;
  }

  /** Highest seq in use, so a restarted service continues after it. */
  maxSeq(): number {
    const row = this.db
      .prepare('SELECT max(m) AS m FROM (SELECT max(seq) AS m FROM events UNION ALL SELECT max(seq) FROM held_spill UNION ALL SELECT max(seq0 + count - 1) FROM held_blobs)')
      .get() as { m: number | null };
    return row.m ?? 0;
  }

  /**
   * Stores one shipment of hold-queue bytes as they came (`insertHeld` with `deferJournal`): its accepted events are
   * numbered `seq0`, `seq0 + 1`, ... in byte order, skipping the indices in `skip` (duplicates). One row instead of one per event.
   */
  insertBlob(seq0: number, count: number, elementIds: readonly string[], skip: readonly number[], bytes: Uint8Array): void {
    this.db.prepare('INSERT INTO held_blobs(seq0, count, element_ids, skip, bytes) VALUES (?, ?, ?, ?, ?)').run(seq0, count, JSON.stringify(elementIds), JSON.stringify(skip), bytes);
  }

  /** The elements of a blob whose events are still only there; none deletes the row. */
  setBlobElements(seq0: number, elementIds: readonly string[]): void {
    if (elementIds.length === 0) this.db.prepare('DELETE FROM held_blobs WHERE seq0 = ?').run(seq0);
    else this.db.prepare('UPDATE held_blobs SET element_ids = ? WHERE seq0 = ?').run(JSON.stringify(elementIds), seq0);
  }

  /**
   * After a restart: the events of every blob's remaining elements become journal rows with their seqs (so recovery
   * re-queues them like any journaled event: a crash before the migration committed leaves them unrouted, and they
   * go), and the blobs go. Returns how many rows were written. A blob that no longer decodes is reported to `onBad`
   * and deleted: its source still had the events until the commit.
   */
  convertBlobs(onBad: (error: unknown, seq0: number) => void): number {
    const rows = this.db.prepare('SELECT seq0, count, element_ids, skip, bytes FROM held_blobs ORDER BY seq0').all() as { seq0: number; count: number; element_ids: string; skip: string; bytes: Buffer }[];
    if (rows.length === 0) return 0;
    let written = 0;
    this.transaction(() => {
      for (const row of rows) {
        let entries: QueuedEvent[];
        try {
          entries = blobEntries(row.seq0, row.count, JSON.parse(row.element_ids) as string[], JSON.parse(row.skip) as number[], row.bytes);
        } catch (e) {
          onBad(e, row.seq0);
          entries = [];
        }
        written += this.insertMany(entries, undefined, new Uint8Array(entries.length));
      }
      this.db.prepare('DELETE FROM held_blobs').run();
    });
    return written;
  }

  /**
   * A start time for event ids never used by an earlier run on this store, so a restart within the
   * same millisecond cannot mint ids that collide with journaled ones (they would be taken as duplicates).
   */
  claimIdEpoch(now: number): number {
    const last = Number(this.store.getMeta('sensors.id_epoch') ?? '0');
    const epoch = Math.max(Math.floor(now), Number.isFinite(last) ? last + 1 : 0);
    this.store.setMeta('sensors.id_epoch', String(epoch));
    return epoch;
  }

  transaction<T>(fn: () => T): T {
    return this.store.transaction(fn);
  }

  /** Inserts one row; false when an event with this id is already journaled. */
  insert(entry: QueuedEvent, payload: Buffer | null): boolean {
    const e = entry.event;
    const changed = this.insertStmt.run(entry.seq, e.id, e.ts, e.elementId, e.type, payload, e.source ?? null).changes > 0;
    if (changed) this.rows++;
    return changed;
  }

  /**
   * Inserts `entries` in multi-row statements with their encoded payloads: `payloads[i]`, or, without `payloads`,
   * encoded here chunk by chunk (the bytes then die young instead of outliving a large batch). `ok[i]` becomes 1 for a
   * row inserted and 0 for one skipped because its id is already journaled. Returns how many were inserted. Each
   * entry's seq must be new to the journal (the service's counter): that is how a chunk with a skipped row finds out
   * which one it was.
   */
  insertMany(entries: readonly QueuedEvent[], payloads: readonly (Buffer | null)[] | undefined, ok: Uint8Array): number {
    const n = entries.length;
    let inserted = 0;
    let i = 0;
    if (n >= ROWS_PER_INSERT) {
      const args = new Array<unknown>(ROWS_PER_INSERT * INSERT_COLUMNS);
      for (; i + ROWS_PER_INSERT <= n; i += ROWS_PER_INSERT) {
        for (let j = 0, o = 0; j < ROWS_PER_INSERT; j++, o += INSERT_COLUMNS) {
          const entry = entries[i + j]!;
          const e = entry.event;
          args[o] = entry.seq;
          args[o + 1] = e.id;
          args[o + 2] = e.ts;
          args[o + 3] = e.elementId;
          args[o + 4] = e.type;
          args[o + 5] = payloads === undefined ? encodePayload(e.payload) : payloads[i + j]!;
          args[o + 6] = e.source ?? null;
        }
        const changes = this.insertManyStmt.run(args).changes;
        inserted += changes;
        if (changes === ROWS_PER_INSERT) {
          ok.fill(1, i, i + ROWS_PER_INSERT);
        } else {
          // Rare (an id journaled already): a seq is new, so its row is there exactly when it was inserted.
          for (let j = i; j < i + ROWS_PER_INSERT; j++) ok[j] = this.seqExistsStmt.get(entries[j]!.seq) === undefined ? 0 : 1;
        }
      }
    }
    for (; i < n; i++) {
      const entry = entries[i]!;
      const e = entry.event;
      const payload = payloads === undefined ? encodePayload(e.payload) : payloads[i]!;
      const changed = this.insertStmt.run(entry.seq, e.id, e.ts, e.elementId, e.type, payload, e.source ?? null).changes > 0;
      ok[i] = changed ? 1 : 0;
      if (changed) inserted++;
    }
    this.rows += inserted;
    return inserted;
  }

  delete(seq: number): void {
    if (this.deleteStmt.run(seq).changes > 0) this.rows--;
  }

  /** Records ids producers gave to events journaled now, `ts[i]` the ts of `ids[i]`'s event; call it in the transaction that journals them. */
  rememberTaken(ids: readonly string[], ts: readonly number[], at: number): void {
    const n = ids.length;
    let i = 0;
    if (n >= ROWS_PER_INSERT) {
      const args = new Array<unknown>(ROWS_PER_INSERT * 3);
      for (; i + ROWS_PER_INSERT <= n; i += ROWS_PER_INSERT) {
        for (let j = 0, o = 0; j < ROWS_PER_INSERT; j++, o += 3) {
          args[o] = ids[i + j];
          args[o + 1] = at;
          args[o + 2] = ts[i + j];
        }
        this.takenInsertManyStmt.run(args);
      }
    }
    for (; i < n; i++) this.takenInsertOneStmt.run(ids[i]!, at, ts[i]!);
  }

  /** The newest `limit` `[id, ts]` recorded by {@link rememberTaken}, oldest first (ts: the commit time on rows from before schema step 11). */
  recentTaken(limit: number): [id: string, ts: number][] {
    return this.takenRecentStmt.all(limit);
  }

  /** The ts of the journaled event with this id, if there is one. */
  tsOf(id: string): number | undefined {
    return this.tsOfStmt.get(id);
  }

  /** Keeps the newest `keep` taken ids. */
  pruneTaken(keep: number): void {
    this.takenPruneStmt.run(keep);
  }

  /**
   * Deletes the rows of these seqs (unknown ones are ignored): runs of consecutive seqs by range, the rest through
   * `IN` lists, a few statements instead of one per row. Group it in a transaction for one commit.
   */
  deleteMany(seqs: ArrayLike<number>): void {
    const n = seqs.length;
    if (n === 0) return;
    if (n === 1) return this.delete(seqs[0]!);
    const sorted = Float64Array.from(seqs).sort();
    let removed = 0;
    const list = new Array<number>(SEQS_PER_DELETE);
    let listed = 0;
    for (let i = 0; i < n; ) {
      let j = i;
      while (j + 1 < n && sorted[j + 1]! - sorted[j]! <= 1) j++;
      if (sorted[j]! - sorted[i]! + 1 >= MIN_RANGE_RUN) {
        removed += this.deleteRangeStmt.run(sorted[i]!, sorted[j]!).changes;
      } else {
        for (let k = i; k <= j; k++) {
          list[listed++] = sorted[k]!;
          if (listed === SEQS_PER_DELETE) {
            removed += this.deleteListStmt.run(list).changes;
            listed = 0;
          }
        }
      }
      i = j + 1;
    }
    if (listed > 0) {
      // Pad with a seq already listed: the same set, one prepared statement.
      list.fill(list[0]!, listed);
      removed += this.deleteListStmt.run(list).changes;
    }
    this.rows -= removed;
  }

  /** Deletes the rows of one element with seq at most `bound` (rows journaled later are kept); returns how many. */
  deleteElementUpTo(elementId: string, bound: number): number {
    const removed = this.db.prepare('DELETE FROM events WHERE element_id = ? AND seq <= ?').run(elementId, bound).changes;
    this.rows -= removed;
    return removed;
  }

  /** Deletes every row of one element; returns how many. */
  deleteElement(elementId: string): number {
    const removed = this.deleteElementStmt.run(elementId).changes;
    this.rows -= removed;
    return removed;
  }

  /** Deletes the `events` rows of one element's spilled hold-queue entries (its `held_spill` rows stay: {@link deleteSpill}). */
  deleteSpilledEvents(elementId: string): number {
    const removed = this.deleteSpilledEventsStmt.run(elementId).changes;
    this.rows -= removed;
    return removed;
  }

  /** Every journaled event in dispatch order. */
  *all(): Generator<QueuedEvent> {
    const stmt = this.db.prepare('SELECT seq, id, ts, element_id, type, payload, source FROM events ORDER BY ts, seq');
    // Rows are read into memory first: a live iterator would block writes on this connection.
    const rows = stmt.all() as EventRow[];
    for (const r of rows) {
      yield { seq: r.seq, event: makeEvent(r.id, r.ts, r.element_id, r.type, decodePayload(r.payload), r.source ?? undefined) };
    }
  }

  /**
   * Spills entries of a hold queue from position `firstPos` on, a `held_spill` row per entry. With `withEvents` the row
   * holds the event's bytes, which {@link spilledBytes} hands out as they are (cheap to ship, costs an encode now);
   * without, it only names the journal row by seq (cheap to write: the journal has the event).
   */
  writeSpill(elementId: string, firstPos: number, entries: readonly QueuedEvent[], withEvents = false): void {
    const n = entries.length;
    if (n === 0) return;
    if (!withEvents) {
      let seqs = '[';
      for (let i = 0; i < n; i++) seqs += i === 0 ? String(entries[i]!.seq) : `,${entries[i]!.seq}`;
      this.spillInsertStmt.run(elementId, firstPos, `${seqs}]`);
      return;
    }
    // All rows or none: a failed spill leaves the entries in memory.
    this.transaction(() => {
      const args = new Array<unknown>(ROWS_PER_INSERT * 4);
      let i = 0;
      for (; i + ROWS_PER_INSERT <= n; i += ROWS_PER_INSERT) {
        for (let j = 0, o = 0; j < ROWS_PER_INSERT; j++, o += 4) {
          const entry = entries[i + j]!;
          args[o] = elementId;
          args[o + 1] = firstPos + i + j;
          args[o + 2] = entry.seq;
          args[o + 3] = eventPackr.pack(entry.event);
        }
        this.spillInsertEventsStmt.run(args);
      }
      for (; i < n; i++) this.spillInsertOneStmt.run(elementId, firstPos + i, entries[i]!.seq, eventPackr.pack(entries[i]!.event));
    });
  }

  /** Spilled entries of one hold queue at positions `fromPos` to `toPos` (exclusive), in order, read from the journal. */
  readSpill(elementId: string, fromPos = 0, toPos = Number.MAX_SAFE_INTEGER): QueuedEvent[] {
    return this.readSpillRows(elementId, fromPos, toPos).map(rowToEntry);
  }

  /** {@link readSpill} as journal rows, payloads still encoded. */
  readSpillRows(elementId: string, fromPos = 0, toPos = Number.MAX_SAFE_INTEGER): JournalRow[] {
    return this.spillSelectStmt.all(elementId, fromPos, toPos) as JournalRow[];
  }

  /** The stored bytes of spilled entries at positions `fromPos` to `toPos` (exclusive), back to back, and how many rows gave them. */
  spilledBytes(elementId: string, fromPos: number, toPos: number): { readonly count: number; readonly bytes: Buffer } {
    const row = this.spillBytesStmt.get(elementId, fromPos, toPos)!;
    return { count: row.n, bytes: row.bytes ?? Buffer.alloc(0) };
  }

  /** Ids of the spilled entries of one hold queue that do not start with `prefix`, in order. */
  spilledIdsOutside(elementId: string, prefix: string): string[] {
    return this.spillForeignIdsStmt.all(elementId, prefix.length, prefix) as string[];
  }

  /** Rows in table `events` for these elements (each id counted once). */
  countFor(elementIds: Iterable<string>): number {
    let n = 0;
    for (const id of new Set(elementIds)) n += this.countForStmt.get(id)!.n;
    return n;
  }

  deleteSpill(elementId: string): void {
    this.spillDeleteStmt.run(elementId);
  }

  /** Spill rows of an earlier run are stale: their events are still in `events` and come back through recovery. */
  clearAllSpill(): void {
    this.db.prepare('DELETE FROM held_spill').run();
  }
}

/** The entries of a stored blob (see {@link Journal.insertBlob}) that belong to `elementIds`, with their seqs. */
function blobEntries(seq0: number, count: number, elementIds: readonly string[], skip: readonly number[], bytes: Uint8Array): QueuedEvent[] {
  const wanted = new Set(elementIds);
  const skipped = new Set(skip);
  const out: QueuedEvent[] = [];
  let index = 0;
  let seq = seq0;
  for (const q of decodeHeld(bytes)) {
    for (const event of q.events) {
      if (skipped.has(index++)) continue;
      if (wanted.has(q.elementId)) out.push({ event, seq });
      seq++;
    }
  }
  if (seq - seq0 !== count) throw new StoreError(ErrorCodes.STORE_CORRUPT, `held blob ${seq0}: ${count} events expected, it holds ${seq - seq0}`);
  return out;
}

/** Element ids a caller hands in (hold, release, drop, subscribe) are checked like event element ids. */
export function assertElementIds(ids: readonly string[], what: string): void {
  if (!Array.isArray(ids)) throw new EventError(ErrorCodes.EVENT_INVALID, `${what}: expected an array of element ids`);
  for (const id of ids) {
    if (!isValidElementId(id)) throw new EventError(ErrorCodes.EVENT_INVALID, `${what}: invalid element id ${JSON.stringify(id)}`, { details: { elementId: String(id) } });
  }
}
