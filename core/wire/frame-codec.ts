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
import type { Frame } from './frames.ts';
import { validateFrame } from './frame-validate.ts';

/** Default bound on one encoded frame: 64 MiB. */
export const DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024;

const packr = new Packr({ useRecords: false, mapsAsObjects: true, moreTypes: false, copyBuffers: false, int64AsType: 'number' });

function tooLarge(size: number, maxBytes: number, direction: 'incoming' | 'outgoing'): ProtocolError {
  return new ProtocolError(ErrorCodes.FRAME_TOO_LARGE, `${direction} frame of ${size} bytes exceeds the limit of ${maxBytes} bytes`, {
    details: { size, maxBytes },
  });
}

/**
 * Validates and encodes a frame. Validating outgoing frames too means a shape bug surfaces
 * here, at its cause, instead of as a closed connection at the peer.
 *
 * @throws ProtocolError `EMBOT_ERR_FRAME_MALFORMED` / `EMBOT_ERR_FRAME_UNKNOWN_TYPE` for a bad
 *   frame, `EMBOT_ERR_FRAME_TOO_LARGE` when the encoding exceeds `maxBytes`.
 *
 * @example
 * ```ts
 * ws.send(encodeFrame({ type: 'Ping', reqId: 1, ts: Date.now() }));
 * ```
 */
export function encodeFrame(frame: Frame, maxBytes: number = DEFAULT_MAX_FRAME_BYTES): Uint8Array {
  validateFrame(frame);
  const bytes: Uint8Array = packr.pack(frame);
  if (bytes.byteLength > maxBytes) throw tooLarge(bytes.byteLength, maxBytes, 'outgoing');
  return bytes;
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
