/**
 * msgpackr encoding of frames. One Packr without records: frames are small maps whose shape the
 * validator checks anyway, and records would make the stream stateful across frames (a lost or
 * rejected frame would poison the structures of the next).
 *
 * `bin` fields decode as views of the received buffer (msgpackr's default, `copyBuffers: false`),
 * so a ManagementState payload is copied once by msgpackr on send and never on receive.
 */
import { Packr } from 'msgpackr';
import { ErrorCodes, ProtocolError, describeError } from '../errors.ts';
import type { Frame, PageBatch } from './frames.ts';
import { validateFrame } from './frame-validate.ts';

/** Default bound on one encoded frame: 64 MiB. */
export const DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024;

const packr = new Packr({ useRecords: false, mapsAsObjects: true, moreTypes: false, copyBuffers: false, int64AsType: 'number' });

function tooLarge(size: number, maxBytes: number, direction: 'incoming' | 'outgoing'): ProtocolError {
  return new ProtocolError(ErrorCodes.FRAME_TOO_LARGE, `${direction} frame of ${size} bytes exceeds the limit of ${maxBytes} bytes`, {
    details: { size, maxBytes },
  });
}

/** Returns a buffer of at least `bytes` bytes for an encoding to be written into. */
export type EncodeAllocator = (bytes: number) => Uint8Array;

const allocateUnpooled: EncodeAllocator = (bytes) => Buffer.allocUnsafe(bytes);

/**
 * Validates and encodes a frame. Validating outgoing frames too means a shape bug surfaces
 * here, at its cause, instead of as a closed connection at the peer.
 *
 * A PageBatch (the bulk of the live-migration data plane) is written by a dedicated encoder
 * into one buffer of its exact size, taken from `allocate` when given (a sender can reuse its
 * buffers), so its pages are copied once; the bytes are plain msgpack that {@link decodeFrame}
 * reads like any other frame. Other frames ignore `allocate`.
 *
 * @throws ProtocolError `EMBOT_ERR_FRAME_MALFORMED` / `EMBOT_ERR_FRAME_UNKNOWN_TYPE` for a bad
 *   frame, `EMBOT_ERR_FRAME_TOO_LARGE` when the encoding exceeds `maxBytes`.
 *
 * @example
 * ```ts
 * ws.send(encodeFrame({ type: 'Ping', reqId: 1, ts: Date.now() }));
 * ```
 */
export function encodeFrame(frame: Frame, maxBytes: number = DEFAULT_MAX_FRAME_BYTES, allocate?: EncodeAllocator): Uint8Array {
  validateFrame(frame);
  if (frame.type === 'PageBatch') return encodePageBatch(frame, maxBytes, allocate ?? allocateUnpooled);
  const bytes: Uint8Array = packr.pack(frame);
  if (bytes.byteLength > maxBytes) throw tooLarge(bytes.byteLength, maxBytes, 'outgoing');
  return bytes;
}

// --- PageBatch ---------------------------------------------------------------------------------
// msgpackr would copy the pages into its shared encode buffer and start a new buffer whenever one
// fills, which for 256 KiB+ frames is a fresh allocation every few frames (page faults, then GC).
// The frame's shape is fixed and already validated, so it is written here field by field.

const utf8 = new TextEncoder();
const keyBytes = (k: string): Uint8Array => Uint8Array.from([0xa0 | k.length, ...Buffer.from(k, 'latin1')]);
const K = {
  type: keyBytes('type'),
  typeValue: keyBytes('PageBatch'),
  reqId: keyBytes('reqId'),
  migrationId: keyBytes('migrationId'),
  path: keyBytes('path'),
  round: keyBytes('round'),
  final: keyBytes('final'),
  pageSize: keyBytes('pageSize'),
  checksum: keyBytes('checksum'),
  indexes: keyBytes('indexes'),
  cpu: keyBytes('cpu'),
  zeros: keyBytes('zeros'),
  pages: keyBytes('pages'),
};
const FIXED_KEYS_BYTES = K.type.length + K.typeValue.length + K.reqId.length + K.migrationId.length + K.path.length + K.round.length + K.final.length + K.pageSize.length + K.checksum.length + K.indexes.length + K.pages.length;

function uintBytes(n: number): number {
  return n < 0x80 ? 1 : n <= 0xff ? 2 : n <= 0xffff ? 3 : n <= 0xffffffff ? 5 : 9;
}
function strBytes(byteLength: number): number {
  return byteLength + (byteLength < 32 ? 1 : byteLength <= 0xff ? 2 : byteLength <= 0xffff ? 3 : 5);
}
function binBytes(byteLength: number): number {
  return byteLength + (byteLength <= 0xff ? 2 : byteLength <= 0xffff ? 3 : 5);
}

/** A cursor over the output; every write is bounded by the size computed up front. */
class Out {
  pos = 0;
  private readonly view: DataView;
  constructor(readonly buf: Uint8Array) {
    this.view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  }
  raw(bytes: Uint8Array): void {
    this.buf.set(bytes, this.pos);
    this.pos += bytes.byteLength;
  }
  uint(n: number): void {
    const { buf, view } = this;
    if (n < 0x80) buf[this.pos++] = n;
    else if (n <= 0xff) {
      buf[this.pos++] = 0xcc;
      buf[this.pos++] = n;
    } else if (n <= 0xffff) {
      buf[this.pos++] = 0xcd;
      view.setUint16(this.pos, n);
      this.pos += 2;
    } else if (n <= 0xffffffff) {
      buf[this.pos++] = 0xce;
      view.setUint32(this.pos, n);
      this.pos += 4;
    } else {
      buf[this.pos++] = 0xcf;
      view.setUint32(this.pos, Math.floor(n / 0x100000000));
      view.setUint32(this.pos + 4, n >>> 0);
      this.pos += 8;
    }
  }
  /** `byteLength` is the UTF-8 length of `s`, measured by the caller for the size. */
  str(s: string, byteLength: number): void {
    const { buf, view } = this;
    if (byteLength < 32) buf[this.pos++] = 0xa0 | byteLength;
    else if (byteLength <= 0xff) {
      buf[this.pos++] = 0xd9;
      buf[this.pos++] = byteLength;
    } else if (byteLength <= 0xffff) {
      buf[this.pos++] = 0xda;
      view.setUint16(this.pos, byteLength);
      this.pos += 2;
    } else {
      buf[this.pos++] = 0xdb;
      view.setUint32(this.pos, byteLength);
      this.pos += 4;
    }
    this.pos += utf8.encodeInto(s, this.buf.subarray(this.pos, this.pos + byteLength)).written;
  }
  bin(bytes: Uint8Array): void {
    const { buf, view } = this;
    const n = bytes.byteLength;
    if (n <= 0xff) {
      buf[this.pos++] = 0xc4;
      buf[this.pos++] = n;
    } else if (n <= 0xffff) {
      buf[this.pos++] = 0xc5;
      view.setUint16(this.pos, n);
      this.pos += 2;
    } else {
      buf[this.pos++] = 0xc6;
      view.setUint32(this.pos, n);
      this.pos += 4;
    }
    this.raw(bytes);
  }
}

/** `frame` is validated; the map holds exactly its defined fields, pages last. */
function encodePageBatch(frame: PageBatch, maxBytes: number, allocate: EncodeAllocator): Uint8Array {
  const midBytes = Buffer.byteLength(frame.migrationId, 'utf8');
  const pathBytes = Buffer.byteLength(frame.path, 'utf8');
  const cpu = frame.cpu;
  const zeros = frame.zeros;
  const size =
    1 +
    FIXED_KEYS_BYTES +
    uintBytes(frame.reqId) +
    strBytes(midBytes) +
    strBytes(pathBytes) +
    uintBytes(frame.round) +
    1 +
    uintBytes(frame.pageSize) +
    uintBytes(frame.checksum) +
    binBytes(frame.indexes.byteLength) +
    (cpu === undefined ? 0 : K.cpu.length + binBytes(cpu.byteLength)) +
    (zeros === undefined ? 0 : K.zeros.length + binBytes(zeros.byteLength)) +
    binBytes(frame.pages.byteLength);
  if (size > maxBytes) throw tooLarge(size, maxBytes, 'outgoing');
  const target = allocate(size);
  if (target.byteLength < size) throw new ProtocolError(ErrorCodes.FRAME_TOO_LARGE, `encode buffer of ${target.byteLength} bytes for a frame of ${size} bytes`);
  const out = new Out(target);
  out.buf[out.pos++] = 0x80 | (10 + (cpu === undefined ? 0 : 1) + (zeros === undefined ? 0 : 1));
  out.raw(K.type);
  out.raw(K.typeValue);
  out.raw(K.reqId);
  out.uint(frame.reqId);
  out.raw(K.migrationId);
  out.str(frame.migrationId, midBytes);
  out.raw(K.path);
  out.str(frame.path, pathBytes);
  out.raw(K.round);
  out.uint(frame.round);
  out.raw(K.final);
  out.buf[out.pos++] = frame.final ? 0xc3 : 0xc2;
  out.raw(K.pageSize);
  out.uint(frame.pageSize);
  out.raw(K.checksum);
  out.uint(frame.checksum);
  out.raw(K.indexes);
  out.bin(frame.indexes);
  if (cpu !== undefined) {
    out.raw(K.cpu);
    out.bin(cpu);
  }
  if (zeros !== undefined) {
    out.raw(K.zeros);
    out.bin(zeros);
  }
  out.raw(K.pages);
  out.bin(frame.pages);
  if (out.pos !== size) throw new ProtocolError(ErrorCodes.FRAME_MALFORMED, `PageBatch encoding wrote ${out.pos} bytes, expected ${size}`);
  return target.byteLength === size ? target : target.subarray(0, size);
}

/**
 * Decodes and validates one frame. The size is checked before any byte is decoded.
 *
 * @throws ProtocolError `EMBOT_ERR_FRAME_TOO_LARGE`, `EMBOT_ERR_FRAME_MALFORMED` (not msgpack,
 *   trailing bytes, wrong field types, unknown fields) or `EMBOT_ERR_FRAME_UNKNOWN_TYPE`.
 *
 * @example
 * ```ts
 * const frame = decodeFrame(data, 1024 * 1024);
 * if (frame.type === 'Ping') reply({ type: 'Pong', replyTo: frame.reqId, ts: frame.ts });
 * ```
 */
export function decodeFrame(bytes: Uint8Array, maxBytes: number = DEFAULT_MAX_FRAME_BYTES): Frame {
  if (bytes.byteLength > maxBytes) throw tooLarge(bytes.byteLength, maxBytes, 'incoming');
  if (bytes.byteLength === 0) throw new ProtocolError(ErrorCodes.FRAME_MALFORMED, 'empty frame');
  let value: unknown;
  let end = 0;
  try {
    // unpackMultiple stops after the first value: plain unpack() reports trailing bytes with a
    // JSON dump of the decoded value, which for a 64 MiB bin field is an expensive way to fail.
    packr.unpackMultiple(bytes, (v: unknown, _start?: number, stop?: number) => {
      value = v;
      end = stop ?? 0;
      return false;
    });
  } catch (e) {
    throw new ProtocolError(ErrorCodes.FRAME_MALFORMED, `frame is not valid msgpack: ${describeError(e).slice(0, 200)}`);
  }
  if (end !== bytes.byteLength) {
    throw new ProtocolError(ErrorCodes.FRAME_MALFORMED, `frame has ${bytes.byteLength - end} trailing bytes after its msgpack value`);
  }
  return validateFrame(value);
}
