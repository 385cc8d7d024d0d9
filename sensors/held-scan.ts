/**
 * A check of hold-queue bytes (`{ v: 1, queues: [{ elementId, events }] }`, see `encodeHeld`) that reads them in place,
 * without building the events: a target stages a migration's events this way on the critical path and decodes them
 * after the switch. Each event it accepts is one {@link decodeHeld} accepts too; anything it is not sure of (ext
 * types, non-ASCII names, odd key orders, 64-bit timestamps...) makes it answer `undefined`, and the caller decodes
 * the bytes the ordinary way, which then accepts them or says exactly what is wrong.
 */
import { isValidElementId, isValidEventType } from '../core/events.ts';
import { MAX_ID_LENGTH, MAX_SOURCE_LENGTH } from './journal.ts';

export interface ScannedQueue {
  readonly elementId: string;
  /** Index of its first event among all events of the bytes, in byte order. */
  readonly first: number;
  readonly count: number;
}

export interface HeldScan {
  /** In byte order. */
  readonly queues: readonly ScannedQueue[];
  /** Events in all queues. */
  readonly total: number;
  /** Every event's id, in byte order (the decoder would give the same strings). */
  readonly ids: readonly string[];
}

export interface ScanOptions {
  /** Event ids starting with this (the agent's own id namespace) make the scan inconclusive: they need the decoder's check. */
  readonly rejectIdPrefix?: string;
}

/** Payload nesting the scan follows; deeper payloads go to the decoder (whose own limit is higher). */
const MAX_PAYLOAD_DEPTH = 32;

/** Thrown inside the scan when it cannot vouch for the bytes; never escapes {@link scanHeld}. */
class Inconclusive {}
const INCONCLUSIVE = new Inconclusive();
function unsure(): never {
  throw INCONCLUSIVE;
}

const KEY = {
  v: bytesOf('v'),
  queues: bytesOf('queues'),
  elementId: bytesOf('elementId'),
  events: bytesOf('events'),
  id: bytesOf('id'),
  ts: bytesOf('ts'),
  type: bytesOf('type'),
  payload: bytesOf('payload'),
  source: bytesOf('source'),
  proto: bytesOf('__proto__'),
};

function bytesOf(s: string): Uint8Array {
  return Buffer.from(s, 'utf8');
}

class Reader {
  pos = 0;
  private readonly view: DataView;
  /** Start and length of the last string read by {@link str}. */
  strStart = 0;
  strLength = 0;

  /** The same bytes as a Buffer, for its native one-byte string decoding (flat strings, no per-call view). */
  private readonly latin1: Buffer;

  constructor(readonly buf: Uint8Array) {
    this.view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    this.latin1 = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
  }

  private need(n: number): void {
    if (this.pos + n > this.buf.length) unsure();
  }

  private byte(): number {
    this.need(1);
    return this.buf[this.pos++]!;
  }

  private u16(): number {
    this.need(2);
    const v = this.view.getUint16(this.pos);
    this.pos += 2;
    return v;
  }

  private u32(): number {
    this.need(4);
    const v = this.view.getUint32(this.pos);
    this.pos += 4;
    return v;
  }

  /** Entries of the map that starts here. */
  map(): number {
    const b = this.byte();
    if (b >= 0x80 && b <= 0x8f) return b & 0x0f;
    if (b === 0xde) return this.u16();
    if (b === 0xdf) return this.u32();
    return unsure();
  }

  /** Items of the array that starts here. */
  array(): number {
    const b = this.byte();
    if (b >= 0x90 && b <= 0x9f) return b & 0x0f;
    if (b === 0xdc) return this.u16();
    if (b === 0xdd) return this.u32();
    return unsure();
  }

  /** Reads a string header and skips its bytes; where they are is in strStart / strLength. */
  str(): void {
    const b = this.byte();
    let n: number;
    if (b >= 0xa0 && b <= 0xbf) n = b & 0x1f;
    else if (b === 0xd9) n = this.byte();
    else if (b === 0xda) n = this.u16();
    else if (b === 0xdb) n = this.u32();
    else return unsure();
    this.need(n);
    this.strStart = this.pos;
    this.strLength = n;
    this.pos += n;
  }

  /** Whether the last string read has exactly these bytes. */
  strIs(bytes: Uint8Array): boolean {
    if (this.strLength !== bytes.length) return false;
    const { buf, strStart } = this;
    for (let i = 0; i < bytes.length; i++) if (buf[strStart + i] !== bytes[i]) return false;
    return true;
  }

  strStartsWith(bytes: Uint8Array): boolean {
    if (this.strLength < bytes.length) return false;
    const { buf, strStart } = this;
    for (let i = 0; i < bytes.length; i++) if (buf[strStart + i] !== bytes[i]) return false;
    return true;
  }

  /** The last string read, when it is plain ASCII (any decoder gives the same string for those bytes). */
  asciiStr(): string {
    const { buf, strStart, strLength } = this;
    const end = strStart + strLength;
    for (let i = strStart; i < end; i++) if (buf[i]! >= 0x80) unsure();
    return this.latin1.toString('latin1', strStart, end);
  }

  /** A number the decoder returns as a JS number (not a bigint). */
  number(): number {
    const b = this.byte();
    if (b <= 0x7f) return b;
    if (b >= 0xe0) return b - 0x100;
    let v: number;
    switch (b) {
      case 0xcc:
        return this.byte();
      case 0xcd:
        return this.u16();
      case 0xce:
        return this.u32();
      case 0xd0:
        this.need(1);
        v = this.view.getInt8(this.pos);
        this.pos += 1;
        return v;
      case 0xd1:
        this.need(2);
        v = this.view.getInt16(this.pos);
        this.pos += 2;
        return v;
      case 0xd2:
        this.need(4);
        v = this.view.getInt32(this.pos);
        this.pos += 4;
        return v;
      case 0xca:
        this.need(4);
        v = this.view.getFloat32(this.pos);
        this.pos += 4;
        return v;
      case 0xcb:
        this.need(8);
        v = this.view.getFloat64(this.pos);
        this.pos += 8;
        return v;
      default:
        // 64-bit integers may decode as bigints; ext types (timestamps) as Dates.
        return unsure();
    }
  }

  /**
   * Skips one payload value: nil, booleans, numbers, strings, bin, arrays and maps with string keys. Anything else
   * (ext types, which decode to Dates and other classes) is left to the decoder.
   */
  skipPayload(depth: number): void {
    if (depth > MAX_PAYLOAD_DEPTH) unsure();
    const b = this.byte();
    if (b <= 0x7f || b >= 0xe0 || b === 0xc0 || b === 0xc2 || b === 0xc3) return;
    if (b >= 0xa0 && b <= 0xbf) return this.skip(b & 0x1f);
    if (b >= 0x90 && b <= 0x9f) return this.skipItems(b & 0x0f, depth);
    if (b >= 0x80 && b <= 0x8f) return this.skipEntries(b & 0x0f, depth);
    switch (b) {
      case 0xcc:
      case 0xd0:
        return this.skip(1);
      case 0xcd:
      case 0xd1:
        return this.skip(2);
      case 0xce:
      case 0xd2:
      case 0xca:
        return this.skip(4);
      case 0xcf:
      case 0xd3:
      case 0xcb:
        return this.skip(8);
      case 0xc4:
      case 0xd9:
        return this.skip(this.byte());
      case 0xc5:
      case 0xda:
        return this.skip(this.u16());
      case 0xc6:
      case 0xdb:
        return this.skip(this.u32());
      case 0xdc:
        return this.skipItems(this.u16(), depth);
      case 0xdd:
        return this.skipItems(this.u32(), depth);
      case 0xde:
        return this.skipEntries(this.u16(), depth);
      case 0xdf:
        return this.skipEntries(this.u32(), depth);
      default:
        return unsure();
    }
  }

  private skip(n: number): void {
    this.need(n);
    this.pos += n;
  }

  private skipItems(n: number, depth: number): void {
    for (let i = 0; i < n; i++) this.skipPayload(depth + 1);
  }

  private skipEntries(n: number, depth: number): void {
    for (let i = 0; i < n; i++) {
      this.str();
      // The decoder would set the object's prototype through this key; what it does then is its business.
      if (this.strIs(KEY.proto)) unsure();
      this.skipPayload(depth + 1);
    }
  }
}

const ID = 1;
const TS = 2;
const ELEMENT_ID = 4;
const TYPE = 8;
const PAYLOAD = 16;
const SOURCE = 32;

/** The event field the last string read names (one bit each), 0 for any other key. */
function eventKey(r: Reader): number {
  const first = r.buf[r.strStart];
  switch (r.strLength) {
    case 2:
      return first === 0x69 && r.strIs(KEY.id) ? ID : first === 0x74 && r.strIs(KEY.ts) ? TS : 0;
    case 4:
      return r.strIs(KEY.type) ? TYPE : 0;
    case 6:
      return r.strIs(KEY.source) ? SOURCE : 0;
    case 7:
      return r.strIs(KEY.payload) ? PAYLOAD : 0;
    case 9:
      return r.strIs(KEY.elementId) ? ELEMENT_ID : 0;
    default:
      return 0;
  }
}

/** One event map: its fields as `wireEvent` wants them, `elementId` the exact bytes of its queue's. */
function scanEvent(r: Reader, elementId: Uint8Array, prefix: Uint8Array | undefined, types: TypeCache, ids: string[]): void {
  const n = r.map();
  let seen = 0;
  let id = '';
  for (let i = 0; i < n; i++) {
    r.str();
    const bit = eventKey(r);
    if (bit === ID) {
      r.str();
      // Byte length bounds the UTF-16 length from above, so a short one is surely within the limit.
      if (r.strLength === 0 || r.strLength > MAX_ID_LENGTH) unsure();
      if (prefix !== undefined && r.strStartsWith(prefix)) unsure();
      id = r.asciiStr();
    } else if (bit === TS) {
      const ts = r.number();
      if (!(Number.isFinite(ts) && ts >= 0)) unsure();
    } else if (bit === ELEMENT_ID) {
      r.str();
      if (!r.strIs(elementId)) unsure();
    } else if (bit === TYPE) {
      r.str();
      types.check(r);
    } else if (bit === SOURCE) {
      r.str();
      if (r.strLength === 0 || r.strLength > MAX_SOURCE_LENGTH) unsure();
    } else {
      // The payload, or another key the decoder drops (unless it is odd enough to need its judgement).
      if (bit === 0 && r.strIs(KEY.proto)) unsure();
      r.skipPayload(0);
    }
    if (bit !== 0 && (seen & bit) !== 0) unsure(); // a repeated key: the decoder keeps the last one
    seen |= bit;
  }
  if ((seen & (ID | TS | ELEMENT_ID | TYPE)) !== (ID | TS | ELEMENT_ID | TYPE)) unsure(); // required fields
  ids.push(id);
}

/** Event types repeat: the last valid one is remembered by its bytes. */
class TypeCache {
  private last: Uint8Array | undefined;

  check(r: Reader): void {
    if (this.last !== undefined && r.strIs(this.last)) return;
    if (!isValidEventType(r.asciiStr())) unsure();
    this.last = r.buf.slice(r.strStart, r.strStart + r.strLength);
  }
}

/**
 * Checks hold-queue bytes without decoding their events: the queues with their event counts when every event is
 * surely valid, `undefined` when the bytes need the decoder (`decodeHeld`) to judge them.
 *
 * @example
 * ```ts
 * const scan = scanHeld(bytes, { rejectIdPrefix: 'b.' });
 * if (scan === undefined) decodeHeld(bytes); // throws EMBOT_ERR_HOLD_DECODE when they are bad
 * ```
 */
export function scanHeld(bytes: Uint8Array, options: ScanOptions = {}): HeldScan | undefined {
  if (!(bytes instanceof Uint8Array)) return undefined;
  const r = new Reader(bytes);
  const prefix = options.rejectIdPrefix === undefined ? undefined : bytesOf(options.rejectIdPrefix);
  const types = new TypeCache();
  const queues: ScannedQueue[] = [];
  const ids: string[] = [];
  try {
    const n = r.map();
    let version = false;
    let listed = false;
    for (let i = 0; i < n; i++) {
      r.str();
      if (r.strIs(KEY.v)) {
        if (version || r.number() !== 1) unsure();
        version = true;
      } else if (r.strIs(KEY.queues)) {
        if (listed) unsure();
        listed = true;
        scanQueues(r, queues, prefix, types, ids);
      } else {
        if (r.strIs(KEY.proto)) unsure();
        r.skipPayload(0);
      }
    }
    if (!version || !listed || r.pos !== bytes.length) unsure();
  } catch (e) {
    if (e === INCONCLUSIVE) return undefined;
    throw e;
  }
  let total = 0;
  for (const q of queues) total += q.count;
  return { queues, total, ids };
}

function scanQueues(r: Reader, out: ScannedQueue[], prefix: Uint8Array | undefined, types: TypeCache, ids: string[]): void {
  const n = r.array();
  const seen = new Set<string>();
  let first = 0;
  for (let qi = 0; qi < n; qi++) {
    const keys = r.map();
    // encodeHeld writes elementId, then events: the events are checked against the id read before them.
    if (keys !== 2) unsure();
    r.str();
    if (!r.strIs(KEY.elementId)) unsure();
    r.str();
    const elementId = r.asciiStr();
    if (!isValidElementId(elementId) || seen.has(elementId)) unsure();
    seen.add(elementId);
    const idBytes = r.buf.slice(r.strStart, r.strStart + r.strLength);
    r.str();
    if (!r.strIs(KEY.events)) unsure();
    const count = r.array();
    for (let i = 0; i < count; i++) scanEvent(r, idBytes, prefix, types, ids);
    out.push({ elementId, first, count });
    first += count;
  }
}
