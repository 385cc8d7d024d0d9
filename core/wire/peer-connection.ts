/**
 * One authenticated peer link: requests with ids and per-request timeouts in both directions,
 * handlers for the peer's requests, notifications, and a strict reaction to protocol violations
 * (an `Error` frame, then a close with a code and an `EMBOT_ERR_*` reason).
 *
 * A PeerConnection is made by PeerServer or connectPeer once the handshake succeeded; it is never
 * constructed on an unauthenticated socket.
 */
import { EventEmitter } from 'eventemitter3';
import type WebSocket from 'ws';
import { EmbotError, ErrorCodes, ProtocolError, describeError, isEmbotError, type ErrorCode } from '../errors.ts';
import { CloseCodes, closeCodeFor, closeReason, parseCloseReason } from './close-codes.ts';
import { DEFAULT_MAX_FRAME_BYTES, decodeFrame, encodeFrame } from './frame-codec.ts';
import { fieldNewerThan } from './frame-validate.ts';
import { reuseReceiveBuffer, type ReusedReceiveBuffer } from './receive-buffer.ts';
import { BULK_BUFFER_STEP, bulkBuffers } from './bulk-buffers.ts';
import {
  FRAME_KINDS,
  PROTOCOL_FEATURES,
  PROTOCOL_VERSION,
  REPLY_TYPES,
  type AnyRequestBody,
  type ErrorFrame,
  type Frame,
  type NotificationFrame,
  type ProtocolFeature,
  type ReplyBody,
  type ReplyFrame,
  type ReplyOf,
  type RequestFrame,
  type RequestOf,
  type RequestType,
} from './frames.ts';

export const DEFAULT_REQUEST_TIMEOUT_MS = 10_000;

/**
 * Serves one request type; returns the reply without `replyTo`. Throwing an EmbotError sends its code back.
 *
 * A `PageBatch`'s binary fields (`indexes`, `pages`, `cpu`) may be views of a receive buffer the
 * link reuses for its next socket read or batch: they are valid during the handler's synchronous part only, so
 * a handler copies what it keeps (PageReceiver.apply does, before it returns).
 */
export type RequestHandler<T extends RequestType> = (frame: RequestOf<T>, conn: PeerConnection) => ReplyBody<T> | Promise<ReplyBody<T>>;

/** Handlers by request type, as callers write them. */
export type HandlerTable = { readonly [K in RequestType]?: RequestHandler<K> };

type ReplyBodyAny = ReplyBody<RequestType>;
/** Erased form for handler tables; `handle()` keeps request and reply types tied together. */
export type AnyRequestHandler = (frame: RequestFrame, conn: PeerConnection) => ReplyBodyAny | Promise<ReplyBodyAny>;
type AnyHandler = AnyRequestHandler;

/** Where a connection looks up handlers it has none of its own for (the server's table, shared by all its links). */
export interface HandlerSource {
  get(type: RequestType): AnyHandler | undefined;
}

export interface RequestOptions {
  /** Overrides the connection's default request timeout. */
  readonly timeoutMs?: number;
}

export interface CloseInfo {
  readonly code: number;
  readonly reason: string;
  /** Why the link ended, when it was not a normal close: our finding, the peer's Error frame or its close reason. */
  readonly error: EmbotError | undefined;
}

export interface PeerConnectionEvents {
  close: (info: CloseInfo) => void;
  /** `Abort` from the peer. */
  notification: (frame: NotificationFrame) => void;
  /** `local`: the peer broke the protocol and we are closing; `remote`: the peer says we did. */
  protocolError: (error: EmbotError, origin: 'local' | 'remote') => void;
  /** A request handler threw or returned a wrong reply; an Error frame went back. */
  handlerError: (error: unknown, request: RequestFrame) => void;
}

export interface PeerConnectionOptions {
  readonly localAgent: string;
  readonly remoteAgent: string;
  /** The wire protocol version the handshake settled on (default PROTOCOL_VERSION). */
  readonly protocol?: number;
  readonly maxFrameBytes?: number;
  readonly requestTimeoutMs?: number;
  readonly handlers?: HandlerTable;
  readonly fallbackHandlers?: HandlerSource;
}

interface Pending {
  readonly type: RequestType;
  readonly resolve: (reply: ReplyFrame) => void;
  readonly reject: (e: unknown) => void;
  readonly timer: NodeJS.Timeout;
}

/** ws hands a Buffer with the default binaryType; the other shapes are handled for safety. */
function toBytes(data: WebSocket.RawData): Uint8Array {
  if (Array.isArray(data)) return Buffer.concat(data);
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  return data;
}

function isPromiseLike<T>(v: T | Promise<T>): v is Promise<T> {
  return typeof (v as { then?: unknown } | null)?.then === 'function';
}

/** ws error codes → protocol error codes, for failures ws detects before we see a frame. */
export function protocolErrorFromWs(err: Error & { code?: string }): ProtocolError {
  if (err.code === 'WS_ERR_UNSUPPORTED_MESSAGE_LENGTH') {
    return new ProtocolError(ErrorCodes.FRAME_TOO_LARGE, `frame exceeds the maximum payload: ${err.message}`, { cause: err });
  }
  if (err.code?.startsWith('WS_ERR_')) return new ProtocolError(ErrorCodes.FRAME_MALFORMED, `invalid WebSocket frame: ${err.message}`, { cause: err });
  return new ProtocolError(ErrorCodes.CONNECTION_CLOSED, `socket error: ${err.message}`, { cause: err });
}

/** The error a close frame stands for, when its code or reason says one. */
export function errorFromClose(code: number, reason: string): EmbotError | undefined {
  const parsed = parseCloseReason(reason);
  if (parsed.code !== undefined) return new ProtocolError(parsed.code, parsed.message, { details: { closeCode: code } });
  if (code === CloseCodes.MESSAGE_TOO_BIG) return new ProtocolError(ErrorCodes.FRAME_TOO_LARGE, 'the peer refused a frame as too large', { details: { closeCode: code } });
  if (code === CloseCodes.NORMAL || code === CloseCodes.GOING_AWAY) return undefined;
  return new ProtocolError(ErrorCodes.CONNECTION_CLOSED, `connection closed with code ${code}${reason ? `: ${reason}` : ''}`, { details: { closeCode: code } });
}

const MAX_ERROR_MESSAGE = 1024;
/** Frames smaller than this are encoded into buffers of their own; larger ones into the shared bulk buffers. */
const SEND_BUFFER_STEP = BULK_BUFFER_STEP;
/** How long a peer we are closing on for a violation has to answer our close frame. */
const VIOLATION_GRACE_MS = 1_000;

/**
 * An authenticated link to one peer agent.
 *
 * @example
 * ```ts
 * const conn = await connectPeer({ url: 'ws://127.0.0.1:7402', agent: 'a', expectedPeer: 'b', secret });
 * const reply = await conn.request({ type: 'StartMigration', migrationId, vm: 'vm1', elements, resources, modules });
 * if (reply.type === 'MigrationDenied') console.log('denied:', reply.reason);
 * conn.handle('ModuleRequest', async (req) => ({ type: 'ModuleBundle', ...(await packModule(req.name, req.hash)) }));
 * ```
 */
export class PeerConnection extends EventEmitter<PeerConnectionEvents> {
  readonly localAgent: string;
  readonly remoteAgent: string;
  /** The link's wire protocol version: optional fields newer than it are not sent on it ({@link supports}). */
  readonly protocol: number;
  readonly maxFrameBytes: number;
  readonly requestTimeoutMs: number;
  /** Settles once, when the socket closed; never rejects. */
  readonly closed: Promise<CloseInfo>;

  private readonly ws: WebSocket;
  private readonly handlers = new Map<RequestType, AnyHandler>();
  private readonly fallback: HandlerSource | undefined;
  private readonly pending = new Map<number, Pending>();
  /**
   * Encode buffers of bulk frames (PageBatch), handed back once the socket has written them. A fresh
   * buffer per frame costs page faults on first touch and, in bulk, a mark-compact every few tens
   * of MB of external memory; reused ones stay mapped and warm. Shared by all links (bulk-buffers.ts).
   */
  private readonly sendBuffers = bulkBuffers;
  /** Set once the link carried a PageBatch: from then on its socket reads into one reused buffer and its large messages are assembled in another. */
  private receiveBuffer: ReusedReceiveBuffer | null | undefined;
  private nextReqId = 1;
  /** First error that explains the end of the link: ours (a violation we found) or the peer's Error frame. */
  private endError: EmbotError | undefined;
  private closeInfo: CloseInfo | undefined;
  private resolveClosed!: (info: CloseInfo) => void;

  /** @internal Made by PeerServer / connectPeer after a successful handshake. */
  constructor(ws: WebSocket, options: PeerConnectionOptions) {
    super();
    this.ws = ws;
    this.localAgent = options.localAgent;
    this.remoteAgent = options.remoteAgent;
    this.protocol = options.protocol ?? PROTOCOL_VERSION;
    this.maxFrameBytes = options.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES;
    this.requestTimeoutMs = options.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
    this.fallback = options.fallbackHandlers;
    this.closed = new Promise((resolve) => (this.resolveClosed = resolve));
    for (const [type, handler] of Object.entries(options.handlers ?? {})) {
      if (handler) this.handlers.set(type as RequestType, handler as unknown as AnyHandler);
    }
    ws.on('message', this.onMessage);
    ws.on('error', this.onError);
    ws.on('close', this.onClose);
    // The socket may have died between the handshake's last frame and this constructor.
    if (ws.readyState === ws.CLOSED) this.onClose(CloseCodes.GOING_AWAY, Buffer.from('closed during handshake'));
  }

  get isOpen(): boolean {
    return this.closeInfo === undefined && this.ws.readyState === this.ws.OPEN;
  }

  /** Requests sent and not yet answered. */
  get pendingRequests(): number {
    return this.pending.size;
  }

  /** Bytes queued in the socket and not yet written; callers streaming bulk data can pace on it. */
  get bufferedAmount(): number {
    return this.ws.bufferedAmount;
  }

  /**
   * Sends a request and resolves with the peer's reply (failure replies such as MigrationDenied
   * resolve too: they are protocol branches). Rejects with ProtocolError:
   * `EMBOT_ERR_REQUEST_TIMEOUT` after the timeout, `EMBOT_ERR_CONNECTION_CLOSED` when the link
   * closes first, the peer's code when it answers with an `Error` frame, and the codec's codes
   * when the request itself is malformed or too large (the link stays up in that case).
   * The body is encoded before this returns, so the caller may reuse its buffers right after.
   */
  request<B extends AnyRequestBody>(body: B, options?: RequestOptions): Promise<ReplyOf<B['type']>> {
    const type = body.type as RequestType;
    return new Promise<ReplyOf<B['type']>>((resolve, reject) => {
      if (!this.isOpen) {
        reject(this.closedError(`cannot send ${type}`));
        return;
      }
      const reqId = this.nextReqId++;
      try {
        this.sendFrame({ ...body, reqId } as RequestFrame);
      } catch (e) {
        reject(e);
        return;
      }
      const timeoutMs = options?.timeoutMs ?? this.requestTimeoutMs;
      const timer = setTimeout(() => {
        this.pending.delete(reqId);
        reject(
          new ProtocolError(ErrorCodes.REQUEST_TIMEOUT, `${this.remoteAgent} did not answer ${type} #${reqId} within ${timeoutMs} ms`, {
            details: { peer: this.remoteAgent, type, reqId, timeoutMs },
          }),
        );
      }, timeoutMs);
      this.pending.set(reqId, { type, resolve: resolve as (r: ReplyFrame) => void, reject, timer });
    });
  }

  /** Round trip in ms, measured with a Ping. */
  async ping(options?: RequestOptions): Promise<number> {
    const start = performance.now();
    await this.request({ type: 'Ping', ts: Date.now() }, options);
    return performance.now() - start;
  }

  /** Sends a notification (Abort). Throws ProtocolError when the link is closed or the frame is bad. */
  notify(frame: NotificationFrame): void {
    if (!this.isOpen) throw this.closedError(`cannot send ${frame.type}`);
    this.sendFrame(frame);
  }

  /**
   * Serves the peer's requests of one type on this link, replacing an earlier handler; returns a
   * function that removes it. Without a handler of its own the link uses the server's (if any),
   * then answers `Error EMBOT_ERR_REQUEST_FAILED`. Pings are answered built-in.
   */
  /** Whether the peer at the other end understands `feature` (its version on this link, frames.ts PROTOCOL_FEATURES). */
  supports(feature: ProtocolFeature): boolean {
    return this.protocol >= PROTOCOL_FEATURES[feature];
  }

  handle<T extends RequestType>(type: T, handler: RequestHandler<T>): () => void {
    const h = handler as unknown as AnyHandler;
    this.handlers.set(type, h);
    return () => {
      if (this.handlers.get(type) === h) this.handlers.delete(type);
    };
  }

  /** Closes the link normally; pending requests reject with CONNECTION_CLOSED. */
  close(code: number = CloseCodes.NORMAL, reason = 'closing'): Promise<CloseInfo> {
    if (this.ws.readyState === this.ws.OPEN || this.ws.readyState === this.ws.CONNECTING) this.ws.close(code, reason);
    return this.closed;
  }

  /**
   * Whether this link's socket keeps the process alive (default: it does). An idle pre-dialled link
   * (core/mobility/warm-connections.ts) should not; it holds the process again once taken. ws keeps
   * its socket private, hence the narrow cast.
   */
  holdProcess(hold: boolean): void {
    const socket = (this.ws as unknown as { readonly _socket?: { ref(): unknown; unref(): unknown } | null })._socket;
    if (hold) socket?.ref();
    else socket?.unref();
  }

  /** Drops the socket without a close handshake (tests, crash simulation). */
  terminate(): void {
    this.ws.terminate();
  }

  // -------------------------------------------------------------------------------------------

  private sendFrame(frame: Frame): void {
    if (frame.type !== 'PageBatch') {
      this.ws.send(encodeFrame(frame, this.maxFrameBytes), { binary: true });
      return;
    }
    let held: Buffer | undefined;
    const bytes = encodeFrame(frame, this.maxFrameBytes, (n) => (n < SEND_BUFFER_STEP ? Buffer.allocUnsafe(n) : (held = this.sendBuffers.take(n))));
    // ws calls back once the socket has written the bytes (or failed to): only then is the buffer free.
    this.ws.send(bytes, { binary: true }, () => {
      if (held !== undefined && this.closeInfo === undefined) this.sendBuffers.give(held);
    });
  }

  private closedError(what: string): ProtocolError {
    const info = this.closeInfo;
    return new ProtocolError(
      ErrorCodes.CONNECTION_CLOSED,
      `${what}: the connection to ${this.remoteAgent} is closed${info ? ` (${info.code}${info.reason ? ` ${info.reason}` : ''})` : ''}`,
      { cause: info?.error, details: { peer: this.remoteAgent, ...(info ? { closeCode: info.code, closeReason: info.reason } : {}) } },
    );
  }

  private readonly onMessage = (data: WebSocket.RawData, isBinary: boolean): void => {
    if (this.closeInfo !== undefined || this.ws.readyState !== this.ws.OPEN) return;
    if (!isBinary) {
      this.violation(new ProtocolError(ErrorCodes.FRAME_MALFORMED, 'text frames are not accepted on the peer link'), CloseCodes.UNSUPPORTED_DATA);
      return;
    }
    let frame: Frame;
    try {
      const bytes = toBytes(data);
      frame = decodeFrame(bytes, this.maxFrameBytes);
      if (frame.type === 'PageBatch') {
        this.receiveBuffer ??= reuseReceiveBuffer(this.ws) ?? null;
      } else if (this.receiveBuffer?.holds(bytes) === true) {
        // Other frames may be handled asynchronously: they get bytes of their own, as ws would have given.
        frame = decodeFrame(Buffer.from(bytes), this.maxFrameBytes);
      }
    } catch (e) {
      this.violation(isEmbotError(e) ? e : new ProtocolError(ErrorCodes.FRAME_MALFORMED, describeError(e)));
      return;
    }
    const newer = this.protocol < PROTOCOL_VERSION ? fieldNewerThan(frame, this.protocol) : undefined;
    if (newer !== undefined) {
      // What an agent of this link's version would refuse as an unknown field; this one refuses it the same.
      this.violation(new ProtocolError(ErrorCodes.FRAME_MALFORMED, `${newer.field} is protocol ${newer.since}; this link runs protocol ${this.protocol}`));
      return;
    }
    switch (FRAME_KINDS[frame.type]) {
      case 'request':
        this.serve(frame as RequestFrame);
        return;
      case 'reply':
        this.settle(frame as ReplyFrame);
        return;
      case 'notification':
        this.emit('notification', frame as NotificationFrame);
        return;
      case 'error':
        this.onErrorFrame(frame as ErrorFrame);
        return;
      case 'handshake':
        this.violation(new ProtocolError(ErrorCodes.FRAME_MALFORMED, `unexpected ${frame.type} after authentication`));
        return;
    }
  };

  private serve(req: RequestFrame): void {
    const handler = this.handlers.get(req.type) ?? this.fallback?.get(req.type) ?? (req.type === 'Ping' ? pong : undefined);
    if (handler === undefined) {
      this.sendErrorReply(req.reqId, ErrorCodes.REQUEST_FAILED, `${this.localAgent} has no handler for ${req.type}`);
      return;
    }
    let result: ReplyBodyAny | Promise<ReplyBodyAny>;
    try {
      result = handler(req, this);
    } catch (e) {
      this.handlerFailed(req, e);
      return;
    }
    if (isPromiseLike(result)) {
      result.then(
        (reply) => this.sendReply(req, reply),
        (e: unknown) => this.handlerFailed(req, e),
      );
    } else {
      this.sendReply(req, result);
    }
  }

  private sendReply(req: RequestFrame, reply: ReplyBodyAny): void {
    if (!this.isOpen) return;
    const allowed = REPLY_TYPES[req.type] as readonly string[];
    if (typeof reply !== 'object' || reply === null || !allowed.includes(reply.type)) {
      const got = typeof reply === 'object' && reply !== null ? String(reply.type) : typeof reply;
      this.handlerFailed(req, new ProtocolError(ErrorCodes.REQUEST_FAILED, `handler for ${req.type} returned ${got}, expected one of ${allowed.join(', ')}`));
      return;
    }
    try {
      this.sendFrame({ ...reply, replyTo: req.reqId } as ReplyFrame);
    } catch (e) {
      this.handlerFailed(req, e);
    }
  }

  private handlerFailed(req: RequestFrame, e: unknown): void {
    this.emit('handlerError', e, req);
    const code: ErrorCode = isEmbotError(e) ? e.code : ErrorCodes.REQUEST_FAILED;
    this.sendErrorReply(req.reqId, code, `${req.type} failed at ${this.localAgent}: ${describeError(e)}`);
  }

  private sendErrorReply(replyTo: number, code: ErrorCode, message: string): void {
    if (!this.isOpen) return;
    this.ws.send(encodeFrame({ type: 'Error', replyTo, code, message: message.slice(0, MAX_ERROR_MESSAGE) }, this.maxFrameBytes), { binary: true });
  }

  private settle(reply: ReplyFrame): void {
    const p = this.pending.get(reply.replyTo);
    // A reply to a request that already timed out: the waiter has moved on, so it is dropped.
    if (p === undefined) return;
    this.pending.delete(reply.replyTo);
    clearTimeout(p.timer);
    if (!(REPLY_TYPES[p.type] as readonly string[]).includes(reply.type)) {
      p.reject(
        new ProtocolError(ErrorCodes.FRAME_MALFORMED, `${this.remoteAgent} answered ${p.type} #${reply.replyTo} with ${reply.type}`, {
          details: { peer: this.remoteAgent, request: p.type, reply: reply.type },
        }),
      );
      return;
    }
    p.resolve(reply);
  }

  private onErrorFrame(frame: ErrorFrame): void {
    const err = new ProtocolError(frame.code, `${this.remoteAgent}: ${frame.message}`, { details: { peer: this.remoteAgent, remote: true } });
    if (frame.replyTo === undefined) {
      // The peer is about to close on us; remember why so pending requests and `close` can say it.
      this.endError ??= err;
      this.emit('protocolError', err, 'remote');
      return;
    }
    const p = this.pending.get(frame.replyTo);
    if (p === undefined) return;
    this.pending.delete(frame.replyTo);
    clearTimeout(p.timer);
    p.reject(err);
  }

  /** The peer broke the protocol: tell it why (best effort), close with a code, keep the agent running. */
  private violation(err: EmbotError, closeCode: number = closeCodeFor(err.code)): void {
    this.endError ??= err;
    this.emit('protocolError', err, 'local');
    if (this.ws.readyState !== this.ws.OPEN) return;
    try {
      this.ws.send(encodeFrame({ type: 'Error', code: err.code, message: err.message.slice(0, MAX_ERROR_MESSAGE) }, this.maxFrameBytes), { binary: true });
    } catch {
      // The close reason below carries the code anyway.
    }
    this.ws.close(closeCode, closeReason(err.code, err.message));
    // A peer that broke the protocol may not answer the close either.
    setTimeout(() => this.ws.terminate(), VIOLATION_GRACE_MS).unref();
  }

  private readonly onError = (err: Error & { code?: string }): void => {
    const pe = protocolErrorFromWs(err);
    this.endError ??= pe;
    if (pe.code !== ErrorCodes.CONNECTION_CLOSED) this.emit('protocolError', pe, 'local');
  };

  private readonly onClose = (code: number, reasonBuf: Buffer): void => {
    if (this.closeInfo !== undefined) return;
    const reason = reasonBuf.toString('utf8');
    const info: CloseInfo = { code, reason, error: this.endError ?? errorFromClose(code, reason) };
    this.closeInfo = info;
    this.ws.off('message', this.onMessage);
    // Keep an error listener: ws may still report a socket error after close, and an EventEmitter
    // error without a listener would crash the agent.
    this.ws.off('close', this.onClose);
    for (const [reqId, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(this.closedError(`no reply to ${p.type} #${reqId}`));
    }
    this.pending.clear();
    this.resolveClosed(info);
    this.emit('close', info);
  };
}

const pong: AnyHandler = (req) => ({ type: 'Pong', ts: (req as RequestOf<'Ping'>).ts });
