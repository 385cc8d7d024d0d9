import type { Socket } from 'node:net';

/**
 * Node's user-buffer read hooks on a net.Socket (lib/net.js, lib/internal/stream_base_commons.js,
 * Node 20): a socket that has them reads into a buffer its owner supplies, one read per callback,
 * instead of a fresh 64 KiB buffer per read. Node only offers them through `onread` at construction,
 * which an accepted socket (or ws's) cannot be given, so they are reached by symbol here.
 */
export interface UserBufferReads {
  readonly kBuffer: symbol;
  readonly kBufferCb: symbol;
  readonly kBufferGen: symbol;
  readonly socket: Socket & Record<symbol, unknown> & { _handle: { useUserBuffer(buf: Uint8Array): void; reading?: boolean } };
}

/**
 * The hooks of `socket` when it has the shape this was written against and is not in user-buffer
 * mode yet, with exactly `dataListeners` 'data' listeners (user-buffer reads emit no 'data') and
 * nothing waiting in its stream buffer (it would be delivered after bytes read later); else
 * undefined, and the caller reads as before: the gain is lost, never the data.
 */
export function userBufferReadsOf(socket: Socket, dataListeners: number): UserBufferReads | undefined {
  const s = socket as Socket & Record<symbol, unknown> & { _handle?: { useUserBuffer?: unknown } | null };
  const symbols = Object.getOwnPropertySymbols(s);
  const find = (name: string): symbol | undefined => symbols.find((x) => x.description === name);
  const kBuffer = find('kBuffer');
  const kBufferCb = find('kBufferCb');
  const kBufferGen = find('kBufferGen');
  const fits =
    kBuffer !== undefined &&
    kBufferCb !== undefined &&
    kBufferGen !== undefined &&
    s[kBuffer] === null &&
    s[kBufferCb] === null &&
    s[kBufferGen] === null &&
    typeof s._handle?.useUserBuffer === 'function' &&
    !s.destroyed &&
    s.listenerCount('data') === dataListeners &&
    s.readableLength === 0;
  return fits ? ({ kBuffer, kBufferCb, kBufferGen, socket: s } as UserBufferReads) : undefined;
}
