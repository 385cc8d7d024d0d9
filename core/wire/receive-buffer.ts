/**
 * One reused receive buffer for the large messages of a data path.
 *
 * ws assembles a message that spans several socket reads into a fresh Buffer of its size: for
 * the data plane that is a new 1 MiB ArrayBuffer per page batch, which V8 counts as external
 * memory and answers with a scavenge every few tens of MB. Measured across two processes (A/B
 * runs of a 512 MiB pre-copy), assembling into one reused buffer instead took ~10 % less CPU on
 * the receiving event loop and moved ~5 % more pages per second; the rest of the churn is the
 * socket's own 64 KiB read buffers, which Node allocates per read.
 *
 * ws has no API for this, so the receiver's `consume` (which does the assembly) is replaced on
 * one connection's receiver, after checking that the receiver has the shape this was written
 * against (ws 8). Where it does not, nothing is installed and ws works as before: the gain is
 * lost, never the data. A test pins the shape against the ws version in the lock.
 */
import type WebSocket from 'ws';

/** Messages at least this large are assembled into the reused buffer; smaller ones are left to ws. */
export const REUSED_MIN_BYTES = 64 * 1024;
/** Larger messages are left to ws, so that one odd frame does not pin its size for the link's life. */
export const REUSED_MAX_BYTES = 16 * 1024 * 1024;

/** The part of ws's Receiver (lib/receiver.js) this relies on. */
interface WsReceiverInternals {
  _buffers: Buffer[];
  _bufferedBytes: number;
  _fin: boolean;
  _allowSynchronousEvents: boolean;
  _binaryType: string;
  consume(n: number): Buffer;
}

function receiverOf(ws: WebSocket): WsReceiverInternals | undefined {
  const r = (ws as unknown as { _receiver?: Partial<WsReceiverInternals> })._receiver;
  if (r === undefined || r === null) return undefined;
  const fits =
    Array.isArray(r._buffers) &&
    typeof r._bufferedBytes === 'number' &&
    typeof r._fin === 'boolean' &&
    // Deferred 'message' events would let the next message overwrite this one before it is read.
    r._allowSynchronousEvents === true &&
    r._binaryType === 'nodebuffer' &&
    typeof r.consume === 'function' &&
    !Object.hasOwn(r, 'consume');
  return fits ? (r as WsReceiverInternals) : undefined;
}

/** What a connection learns once the reused buffer is in place. */
export interface ReusedReceiveBuffer {
  /**
   * Whether `bytes` lies in the reused buffer: it is then valid only until the next message of
   * the link is assembled, i.e. during the synchronous handling of this one.
   */
  holds(bytes: Uint8Array): boolean;
}

/**
 * Makes `ws` assemble its large, unfragmented messages into one buffer it keeps, instead of a
 * fresh one per message. Only for a link whose consumer reads each message synchronously, before
 * returning from the `message` event (a page batch is checked and copied into VM memory there);
 * anything kept longer must be copied, which {@link ReusedReceiveBuffer.holds} tells.
 *
 * @returns undefined when ws's receiver is not the shape this expects (nothing is changed).
 *
 * @example
 * ```ts
 * const reuse = reuseReceiveBuffer(ws);
 * ws.on('message', (data: Buffer) => {
 *   check(data); // synchronous: the view is valid here
 *   const kept = reuse?.holds(data) ? Buffer.from(data) : data; // what outlives this call is a copy
 *   setImmediate(() => later(kept));
 * });
 * ```
 */
export function reuseReceiveBuffer(ws: WebSocket): ReusedReceiveBuffer | undefined {
  const receiver = receiverOf(ws);
  if (receiver === undefined) return undefined;
  const wsConsume = receiver.consume;
  let buffer = Buffer.alloc(0);
  receiver.consume = function consume(this: WsReceiverInternals, n: number): Buffer {
    const buffers = this._buffers;
    // A message within one socket read is a view already; a fragment of an unfinished message is
    // kept by ws until the last one arrives, so it must not live in a buffer that is reused.
    if (n < REUSED_MIN_BYTES || n > REUSED_MAX_BYTES || !this._fin || buffers.length === 0 || n <= buffers[0]!.length) {
      return wsConsume.call(this, n);
    }
    this._bufferedBytes -= n;
    if (buffer.byteLength < n) buffer = Buffer.allocUnsafeSlow(n);
    const dst = buffer.subarray(0, n);
    let at = 0;
    while (at < n) {
      const chunk = buffers[0]!;
      const take = Math.min(chunk.length, n - at);
      dst.set(take === chunk.length ? chunk : chunk.subarray(0, take), at);
      if (take === chunk.length) buffers.shift();
      else buffers[0] = chunk.subarray(take);
      at += take;
    }
    return dst;
  };
  return { holds: (bytes) => bytes.buffer === buffer.buffer && buffer.byteLength > 0 };
}
