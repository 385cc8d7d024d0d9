/**
 * Reused receive buffers for the large messages of a data path: one buffer the socket reads
 * into, and one the large messages are assembled in.
 *
 * Left to itself, Node reads a socket 64 KiB at a time into a fresh ArrayBuffer per read, and ws
 * assembles a message that spans reads into a fresh Buffer of its size: for the data plane that
 * is 16 reads, 16 allocations and a new 1 MiB ArrayBuffer per page batch, which V8 counts as
 * external memory and answers with a scavenge every few tens of MB. Measured across two
 * processes, reading into one 1 MiB buffer instead cut the receiver's CPU per MiB by about a
 * third for raw ws (one read per MiB instead of 16); assembling into one reused buffer took
 * another ~10 % (BENCHMARKS.md).
 *
 * Neither has an API: the socket is switched to Node's user-buffer reads (the `onread` option of
 * `net.Socket` and `tls.connect`, which an accepted socket cannot be given), and ws's receiver gets its own
 * `consume` (which does the assembly). Both are installed only after checking that Node's socket
 * and ws's receiver have the shape this was written against (Node 20, ws 8); where they do not,
 * that part is not installed and the link works as before: the gain is lost, never the data. A
 * test pins the shape against the Node and ws versions in use.
 *
 * On a TLS data path both still apply: Node's TLS socket reads decrypted bytes into a user
 * buffer the same way, one TLS record (at most 16 KiB) per read, so the gain there is the
 * allocation per read and the assembly, not the number of reads (BENCHMARKS.md, TLS section).
 *
 * What ws keeps between reads must not stay in the read buffer, which the next read overwrites:
 * after every read the bytes of an unfinished message move to the assembly buffer (for a large
 * message, where it will be assembled anyway) or to a copy, and the pieces ws keeps across
 * frames (a mask, the fragments of a fragmented message, a control frame's payload that a pong
 * may echo from the socket's queue) are copies from the start.
 */
import type { Socket } from 'node:net';
import { userBufferReadsOf, type UserBufferReads } from './user-buffer-reads.ts';
import type WebSocket from 'ws';
import { bulkBuffers } from './bulk-buffers.ts';

/** Messages at least this large are assembled into the reused buffer; smaller ones are left to ws. */
export const REUSED_MIN_BYTES = 64 * 1024;
/** Larger messages are left to ws, so that one odd frame does not pin its size for the link's life. */
export const REUSED_MAX_BYTES = 16 * 1024 * 1024;
/**
 * Bytes one socket read may return. On loopback a busy sender keeps megabytes queued, so reads
 * come back full: one read and one trip through JS per MiB instead of 16.
 */
export const READ_BUFFER_BYTES = 1024 * 1024;

/** ws's receiver states (lib/receiver.js) this relies on. */
const GET_MASK = 3;
const GET_DATA = 4;

/** Whether ws is reading `n` payload bytes that are a whole, large data message: those are assembled in the reused buffer. */
function isLargeMessage(r: WsReceiverInternals, n: number): boolean {
  return r._state === GET_DATA && r._fin && r._opcode <= 0x07 && n >= REUSED_MIN_BYTES && n <= REUSED_MAX_BYTES;
}

/** The part of ws's Receiver (lib/receiver.js) this relies on. */
interface WsReceiverInternals {
  _buffers: Buffer[];
  _bufferedBytes: number;
  _fin: boolean;
  _opcode: number;
  _state: number;
  _payloadLength: number;
  _allowSynchronousEvents: boolean;
  _binaryType: string;
  readonly writableLength: number;
  consume(n: number): Buffer;
  write(chunk: Buffer): boolean;
}

function receiverOf(ws: WebSocket): WsReceiverInternals | undefined {
  const r = (ws as unknown as { _receiver?: Partial<WsReceiverInternals> })._receiver;
  if (r === undefined || r === null) return undefined;
  const fits =
    Array.isArray(r._buffers) &&
    typeof r._bufferedBytes === 'number' &&
    typeof r._fin === 'boolean' &&
    typeof r._opcode === 'number' &&
    typeof r._state === 'number' &&
    typeof r._payloadLength === 'number' &&
    // Deferred 'message' events would let the next message overwrite this one before it is read.
    r._allowSynchronousEvents === true &&
    r._binaryType === 'nodebuffer' &&
    typeof r.consume === 'function' &&
    typeof r.write === 'function' &&
    !Object.hasOwn(r, 'consume');
  return fits ? (r as WsReceiverInternals) : undefined;
}

/** ws's socket, when it has Node's user-buffer read hooks and ws's own 'data' listener only. */
function userBufferSocketOf(ws: WebSocket): UserBufferReads | undefined {
  const socket = (ws as unknown as { _socket?: Socket })._socket;
  if (socket === undefined || socket === null || typeof socket !== 'object') return undefined;
  // A TLS socket qualifies too: its TLSWrap is a stream like TCP's and hands over decrypted bytes,
  // at most one TLS record (16 KiB) per read.
  return userBufferReadsOf(socket, 1);
}

/** What a connection learns once the reused buffers are in place. */
export interface ReusedReceiveBuffer {
  /**
   * Whether `bytes` lies in a reused buffer: it is then valid only until the link reads or
   * assembles its next message, i.e. during the synchronous handling of this one.
   */
  holds(bytes: Uint8Array): boolean;
  /** Whether the socket reads into a reused buffer too (false: only the assembly is reused). */
  readonly readsIntoReusedBuffer: boolean;
}

/**
 * Makes `ws` read its socket into one buffer it keeps and assemble its large, unfragmented
 * messages into another, instead of fresh ones per read and per message. Only for a link whose
 * consumer reads each message synchronously, before returning from the `message` event (a page
 * batch is checked and copied into VM memory there); anything kept longer must be copied, which
 * {@link ReusedReceiveBuffer.holds} tells.
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
  let assembly: Buffer = Buffer.alloc(0);
  let read: Buffer | undefined;

  const inRead = (b: Uint8Array): boolean => read !== undefined && b.buffer === read.buffer;
  /** Whether `b` is the start of the assembly buffer: bytes of the pending message already in place. */
  const isAssembled = (b: Uint8Array): boolean => b.buffer === assembly.buffer && b.byteOffset === assembly.byteOffset && assembly.byteLength > 0;
  const ensureAssembly = (n: number, keep: number): void => {
    if (assembly.byteLength >= n) return;
    // From the process's bulk buffers (the smaller one is dropped, not given back: ws may still hold a view of it).
    const bigger = bulkBuffers.take(n);
    if (keep > 0) bigger.set(assembly.subarray(0, keep));
    assembly = bigger;
  };

  receiver.consume = function consume(this: WsReceiverInternals, n: number): Buffer {
    const buffers = this._buffers;
    if (buffers.length === 0 || n === 0) return wsConsume.call(this, n);
    const payload = this._state === GET_DATA;
    // Kept by ws past this call (a mask until the payload arrives, fragments until the last one, a
    // control payload that a pong may echo from the socket's queue): never in the read buffer.
    if (this._state === GET_MASK || (payload && (!this._fin || this._opcode > 0x07))) {
      const bytes = wsConsume.call(this, n);
      return inRead(bytes) ? Buffer.from(bytes) : bytes;
    }
    if (!isLargeMessage(this, n)) return wsConsume.call(this, n);
    const first = buffers[0]!;
    // Within one read it is a view already, read synchronously by the consumer.
    if (!isAssembled(first) && n <= first.length) return wsConsume.call(this, n);
    this._bufferedBytes -= n;
    let at = 0;
    if (isAssembled(first)) {
      at = Math.min(first.length, n);
      if (at === first.length) buffers.shift();
      else buffers[0] = first.subarray(at);
    } else {
      ensureAssembly(n, 0);
    }
    const dst = assembly.subarray(0, n);
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

  /** After a read: what ws keeps of it moves out of the read buffer, which the next read overwrites. */
  const keepPending = (): void => {
    const buffers = receiver._buffers;
    if (buffers.length === 0) return;
    const n = receiver._payloadLength;
    if (isLargeMessage(receiver, n)) {
      // All of it is payload of this message (ws waits for the whole of it): gather it where the
      // message will be assembled, so each byte is copied once.
      let at = 0;
      let from = 0;
      if (isAssembled(buffers[0]!)) {
        at = buffers[0]!.length;
        from = 1;
      }
      ensureAssembly(n, at);
      for (let i = from; i < buffers.length; i++) {
        assembly.set(buffers[i]!, at);
        at += buffers[i]!.length;
      }
      buffers.length = 0;
      buffers.push(assembly.subarray(0, at));
      return;
    }
    for (let i = 0; i < buffers.length; i++) if (inRead(buffers[i]!)) buffers[i] = Buffer.from(buffers[i]!);
  };

  const sock = userBufferSocketOf(ws);
  if (sock !== undefined) {
    const { socket } = sock;
    read = bulkBuffers.take(READ_BUFFER_BYTES);
    const own = read;
    const wsListener = socket.listeners('data')[0] as (chunk: Buffer) => void;
    socket[sock.kBufferCb] = (nread: number): boolean => {
      // ws stops listening once its receiver failed or the close handshake began, and resumes the
      // socket so that it reads on to the end: the bytes are dropped, as no listener takes them.
      if (socket.listenerCount('data', wsListener) === 0) return true;
      const view = own.subarray(0, nread);
      // A receiver still busy with an earlier chunk (never, with synchronous events) would keep this one.
      const ok = receiver.write(receiver.writableLength === 0 ? view : Buffer.from(view));
      keepPending();
      // false: Node stops reading until ws's 'drain' resumes the socket, as ws's own 'data' listener does.
      return ok;
    };
    socket[sock.kBuffer] = own;
    socket._handle.useUserBuffer(own);
  }

  // Once ws has closed, its socket reads no more and its receiver has let go of every message: the
  // next link takes these buffers (a migration's links are fresh: warm-connections.ts).
  // (A bare receiver, as in the unit tests, has no events: its buffers are simply dropped.)
  if (typeof ws.once === 'function') ws.once('close', () => {
    if (read !== undefined) bulkBuffers.give(read);
    if (assembly.byteLength > 0) bulkBuffers.give(assembly);
    read = undefined;
    assembly = Buffer.alloc(0);
  });

  return {
    holds: (bytes) => (assembly.byteLength > 0 && bytes.buffer === assembly.buffer) || inRead(bytes),
    readsIntoReusedBuffer: read !== undefined,
  };
}
