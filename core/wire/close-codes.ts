/**
 * WebSocket close codes and reasons of the peer link. The reason always starts with the
 * `EMBOT_ERR_*` code, so the side that is closed on learns why even when the `Error` frame sent
 * before the close could not be delivered.
 */
import { ErrorCodes, type ErrorCode } from '../errors.ts';

/** RFC 6455 codes used on the peer link. */
export const CloseCodes = {
  NORMAL: 1000,
  GOING_AWAY: 1001,
  /** Text frames and frame types this build does not know. */
  UNSUPPORTED_DATA: 1003,
  /** Bytes that are not a well-formed frame. */
  INVALID_PAYLOAD: 1007,
  /** Authentication refused (secret or certificate), handshake timeout, a frame before authentication. */
  POLICY_VIOLATION: 1008,
  MESSAGE_TOO_BIG: 1009,
  INTERNAL_ERROR: 1011,
  /** Too many unauthenticated sockets at once. */
  TRY_AGAIN_LATER: 1013,
} as const;

export type CloseCode = (typeof CloseCodes)[keyof typeof CloseCodes];

/** The close code that goes with an error code. */
export function closeCodeFor(code: ErrorCode): CloseCode {
  switch (code) {
    case ErrorCodes.FRAME_MALFORMED:
      return CloseCodes.INVALID_PAYLOAD;
    case ErrorCodes.FRAME_UNKNOWN_TYPE:
      return CloseCodes.UNSUPPORTED_DATA;
    case ErrorCodes.FRAME_TOO_LARGE:
      return CloseCodes.MESSAGE_TOO_BIG;
    case ErrorCodes.PEER_UNAUTHENTICATED:
    case ErrorCodes.PEER_UNKNOWN:
    case ErrorCodes.PROTOCOL_UNSUPPORTED:
    case ErrorCodes.PEER_CERT_UNTRUSTED:
    case ErrorCodes.PEER_CERT_NAME_MISMATCH:
    case ErrorCodes.PEER_TLS_FAILED:
      return CloseCodes.POLICY_VIOLATION;
    default:
      return CloseCodes.INTERNAL_ERROR;
  }
}

/** RFC 6455 limits a close reason to 123 bytes of UTF-8. */
const MAX_REASON_BYTES = 123;

/** `CODE: message`, cut to fit a close frame. */
export function closeReason(code: ErrorCode, message: string): string {
  let reason = `${code}: ${message}`;
  if (Buffer.byteLength(reason) <= MAX_REASON_BYTES) return reason;
  reason = reason.slice(0, MAX_REASON_BYTES - 3);
  while (Buffer.byteLength(reason) > MAX_REASON_BYTES - 3) reason = reason.slice(0, -1);
  return `${reason}...`;
}

const KNOWN: ReadonlySet<string> = new Set(Object.values(ErrorCodes));

/** The error code at the start of a close reason written by `closeReason`, if any. */
export function parseCloseReason(reason: string): { readonly code: ErrorCode | undefined; readonly message: string } {
  const m = /^(EMBOT_ERR_[A-Z_]+): ?(.*)$/s.exec(reason);
  if (m && KNOWN.has(m[1]!)) return { code: m[1] as ErrorCode, message: m[2]! };
  return { code: undefined, message: reason };
}
