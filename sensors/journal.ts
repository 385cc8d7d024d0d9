import type Database from 'better-sqlite3';
import { Packr } from 'msgpackr';
import { ErrorCodes, EventError, describeError } from '../core/errors.ts';
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

const MAX_ID_LENGTH = 256;
const MAX_SOURCE_LENGTH = 128;

export function isValidEventId(id: unknown): id is string {
  return typeof id === 'string' && id.length > 0 && id.length <= MAX_ID_LENGTH;
}

export function isValidSource(source: unknown): source is string | undefined {
  return source === undefined || (typeof source === 'string' && source.length > 0 && source.length <= MAX_SOURCE_LENGTH);
}

export function isValidTs(ts: unknown): ts is number {
  return typeof ts === 'number' && Number.isFinite(ts) && ts >= 0;
}

/**
 * Rebuilds an event from decoded, untrusted data (a peer's hold queues), or throws
 * `EMBOT_ERR_HOLD_DECODE` saying what is wrong.
 */
export function eventFromWire(raw: unknown, elementId: string, where: string): EmbotEvent {
  const bad = (why: string): never => {
    throw new EventError(ErrorCodes.HOLD_DECODE, `hold queue data: ${where}: ${why}`, { details: { where } });
  };
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) return bad('not an event map');
  const e = raw as Record<string, unknown>;
  if (!isValidEventId(e.id)) return bad('bad id');
  if (!isValidTs(e.ts)) return bad('bad ts');
  if (e.elementId !== elementId) return bad(`elementId ${String(e.elementId)} does not match its queue ${elementId}`);
  if (!isValidEventType(e.type)) return bad('bad type');
  if (!isValidSource(e.source)) return bad('bad source');
  const why = whyNotEncodable(e.payload);
  if (why !== undefined) return bad(`payload holds ${why}`);
  return makeEvent(e.id, e.ts, elementId, e.type, e.payload ?? null, e.source);
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
    out.push({ elementId, events: events.map((e: unknown, i) => eventFromWire(e, elementId, `queue ${elementId} event ${i}`)) });
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
 * The sensor service's durable part: table `events` (one row per journaled event, `seq` = arrival
 * sequence) and table `held_spill` (the overflow of hold queues). Every method is synchronous so
 * callers can group it in their own transaction.
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
  private readonly deleteStmt: Database.Statement<[number]>;
  private readonly spillInsertStmt: Database.Statement;
  private readonly spillSelectStmt: Database.Statement<[string, number], { seq: number; event: Buffer }>;
  private readonly countForStmt: Database.Statement<[string], { n: number }>;
  private readonly spillDeleteStmt: Database.Statement<[string]>;

  constructor(store: Store) {
    this.store = store;
    this.db = store.db;
    this.insertStmt = this.db.prepare('INSERT OR IGNORE INTO events(seq, id, ts, element_id, type, payload, source) VALUES (?, ?, ?, ?, ?, ?, ?)');
    this.deleteStmt = this.db.prepare('DELETE FROM events WHERE seq = ?');
    this.spillInsertStmt = this.db.prepare('INSERT INTO held_spill(element_id, pos, seq, event) VALUES (?, ?, ?, ?)');
    this.spillSelectStmt = this.db.prepare('SELECT seq, event FROM held_spill WHERE element_id = ? AND pos >= ? ORDER BY pos');
    this.countForStmt = this.db.prepare('SELECT count(*) AS n FROM events WHERE element_id = ?');
    this.spillDeleteStmt = this.db.prepare('DELETE FROM held_spill WHERE element_id = ?');
    this.rows = (this.db.prepare('SELECT count(*) AS n FROM events').get() as { n: number }).n;
  }

  /** Highest seq in use, so a restarted service continues after it. */
  maxSeq(): number {
    const row = this.db.prepare('SELECT max(m) AS m FROM (SELECT max(seq) AS m FROM events UNION ALL SELECT max(seq) FROM held_spill)').get() as { m: number | null };
    return row.m ?? 0;
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

  delete(seq: number): void {
    if (this.deleteStmt.run(seq).changes > 0) this.rows--;
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

  writeSpill(elementId: string, firstPos: number, entries: readonly QueuedEvent[]): void {
    this.transaction(() => {
      for (let i = 0; i < entries.length; i++) {
        const entry = entries[i]!;
        this.spillInsertStmt.run(elementId, firstPos + i, entry.seq, eventPackr.pack(entry.event));
      }
    });
  }

  /** Spilled entries of one hold queue from position `fromPos` on, in order. */
  readSpill(elementId: string, fromPos = 0): QueuedEvent[] {
    return this.spillSelectStmt.all(elementId, fromPos).map((r) => ({ seq: r.seq, event: eventPackr.unpack(r.event) as EmbotEvent }));
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

/** Element ids a caller hands in (hold, release, drop, subscribe) are checked like event element ids. */
export function assertElementIds(ids: readonly string[], what: string): void {
  if (!Array.isArray(ids)) throw new EventError(ErrorCodes.EVENT_INVALID, `${what}: expected an array of element ids`);
  for (const id of ids) {
    if (!isValidElementId(id)) throw new EventError(ErrorCodes.EVENT_INVALID, `${what}: invalid element id ${JSON.stringify(id)}`, { details: { elementId: String(id) } });
  }
}
