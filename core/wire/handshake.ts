/**
 * Both sides of the authentication handshake (protocol in auth.ts), driven by socket callbacks
 * rather than awaits: the last handshake frame and the first protocol frame can arrive in the
 * same TCP chunk, and ws emits them synchronously one after the other, so the hand-over to
 * PeerConnection must happen inside the handler of the last handshake frame.
 */
import type { X509Certificate } from 'node:crypto';
import type WebSocket from 'ws';
import { ErrorCodes, ProtocolError, isEmbotError, describeError, type EmbotError } from '../errors.ts';
import { computeProof, createNonce, proofKey, verifyProof, type ProofInput } from './auth.ts';
import { CloseCodes, closeCodeFor, closeReason } from './close-codes.ts';
import { decodeFrame, encodeFrame } from './frame-codec.ts';
import { MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, type Frame, type HandshakeFrame } from './frames.ts';
import { errorFromClose, protocolErrorFromWs } from './peer-connection.ts';
import { describeNames, isIssuedTo } from './peer-tls.ts';

export const DEFAULT_HANDSHAKE_TIMEOUT_MS = 5_000;
/** Handshake frames are ~150 bytes; anything big before authentication is abuse. */
export const HANDSHAKE_MAX_FRAME_BYTES = 4 * 1024;
/**
 * Raw bytes an unauthenticated socket may send in all. ws buffers a whole message before we see
 * it, up to `maxPayload` (64 MiB); counting on the TCP socket stops a stranger long before that.
 */
export const HANDSHAKE_MAX_WIRE_BYTES = 16 * 1024;
/** A refused peer gets this long to answer our close frame before the socket is destroyed. */
const REFUSE_GRACE_MS = 1_000;

/** `protocol`: the link's wire protocol version (the client's, which the server speaks too). */
export type HandshakeResult = { readonly ok: true; readonly remoteAgent: string; readonly protocol: number } | { readonly ok: false; readonly error: EmbotError };

/** What the TLS layer under the WebSocket established (TLS links only). */
export interface TlsPeerInfo {
  /** The peer's certificate, already verified against the cluster CA by OpenSSL. */
  readonly certificate: X509Certificate;
  /** Keying material of this TLS session (peer-tls.ts channelBinding). */
  readonly binding: Uint8Array;
}

export interface ServerHandshakeOptions {
  readonly agent: string;
  /** Cluster secret; may be absent on a TLS link (the certificates authenticate then). */
  readonly secret: Uint8Array | undefined;
  /** On a TLS link: the client must claim a name its certificate carries. */
  readonly tls?: TlsPeerInfo;
  readonly timeoutMs: number;
  /** When set, only these agent names may connect. */
  readonly allowedPeers?: ReadonlySet<string>;
  /** The newest protocol version accepted (default PROTOCOL_VERSION; `peer.protocol` pins an older one). */
  readonly protocol?: number;
  /** The TCP socket under `ws` (the `req.socket` of ws's connection event), for the pre-auth byte budget. */
  readonly socket?: { on(e: 'data', fn: (chunk: Buffer) => void): unknown; off(e: 'data', fn: (chunk: Buffer) => void): unknown; pause(): unknown };
}

export interface ClientHandshakeOptions {
  readonly agent: string;
  /** Cluster secret; may be absent on a TLS link (the certificates authenticate then). */
  readonly secret: Uint8Array | undefined;
  /** On a TLS link: the server's certificate and session, known once the socket is open; the server must claim a name its certificate carries. */
  readonly tls?: () => TlsPeerInfo | undefined;
  readonly timeoutMs: number;
  /** Name the server must announce (the name the peer is known by in `--peers`). */
  readonly expectedPeer?: string;
  /** The protocol version offered in Hello (default PROTOCOL_VERSION). */
  readonly protocol?: number;
  /** For messages: where we are connecting to. */
  readonly url: string;
}

const noop = (): void => {};

/**
 * Tells the peer why (an Error frame, unless `tell` is false because the peer is the one who
 * refused), closes with a code, and destroys the socket if it lingers.
 */
export function refuse(ws: WebSocket, err: EmbotError, closeCode: number = closeCodeFor(err.code), tell = true): void {
  ws.on('error', noop);
  if (ws.readyState === ws.OPEN) {
    if (tell) {
      try {
        ws.send(encodeFrame({ type: 'Error', code: err.code, message: err.message.slice(0, 1024) }), { binary: true });
      } catch {
        // The close reason carries the code too.
      }
    }
    ws.close(closeCode, closeReason(err.code, err.message));
    setTimeout(() => ws.terminate(), REFUSE_GRACE_MS).unref();
  } else if (ws.readyState === ws.CONNECTING) {
    ws.terminate();
  }
}

function send(ws: WebSocket, frame: HandshakeFrame): void {
  ws.send(encodeFrame(frame, HANDSHAKE_MAX_FRAME_BYTES), { binary: true });
}

/** What a server says to a Hello of a version it does not speak; {@link speaksUpTo} reads it back (agents of protocol 1 said it too, coded PEER_UNAUTHENTICATED). */
function protocolUnsupported(offered: number, newest: number): ProtocolError {
  const speaks = newest === MIN_PROTOCOL_VERSION ? `${newest}` : `${MIN_PROTOCOL_VERSION} to ${newest}`;
  return new ProtocolError(ErrorCodes.PROTOCOL_UNSUPPORTED, `protocol version ${offered} is not supported (this agent speaks ${speaks})`, {
    details: { offered, min: MIN_PROTOCOL_VERSION, max: newest },
  });
}

/** The newest version a server that turned our Hello away speaks, from its refusal; undefined when the refusal is not about the version. */
export function speaksUpTo(error: EmbotError): number | undefined {
  const m = /protocol version \d+ is not supported \(this agent speaks (?:\d+ to )?(\d+)\)/.exec(error.message);
  return m ? Number(m[1]) : undefined;
}

function unauthenticated(message: string): ProtocolError {
  return new ProtocolError(ErrorCodes.PEER_UNAUTHENTICATED, message);
}

function nameMismatch(who: string, claimed: string, certificate: X509Certificate): ProtocolError {
  return new ProtocolError(ErrorCodes.PEER_CERT_NAME_MISMATCH, `${who} claims to be agent ${claimed} but its certificate is issued to ${describeNames(certificate)}`, {
    details: { claimed },
  });
}

function noKey(): ProtocolError {
  return new ProtocolError(ErrorCodes.PEER_UNAUTHENTICATED, 'no cluster secret and no TLS session to authenticate the peer link with');
}

/** Decodes one handshake-phase message or explains why it is refused (with its close code). */
function readHandshakeFrame(data: WebSocket.RawData, isBinary: boolean): { frame: Frame } | { error: EmbotError; closeCode?: number } {
  if (!isBinary) return { error: new ProtocolError(ErrorCodes.FRAME_MALFORMED, 'text frames are not accepted on the peer link'), closeCode: CloseCodes.UNSUPPORTED_DATA };
  const bytes = Array.isArray(data) ? Buffer.concat(data) : data instanceof ArrayBuffer ? new Uint8Array(data) : data;
  try {
    return { frame: decodeFrame(bytes, HANDSHAKE_MAX_FRAME_BYTES) };
  } catch (e) {
    return { error: isEmbotError(e) ? e : new ProtocolError(ErrorCodes.FRAME_MALFORMED, describeError(e)) };
  }
}

/**
 * Runs the server side on a freshly accepted socket and calls `done` exactly once. On success
 * AuthOk has been sent and the socket carries no handshake listeners; `done` must attach the
 * PeerConnection synchronously. On failure the socket has been refused and closed.
 */
export function serverHandshake(ws: WebSocket, options: ServerHandshakeOptions, done: (result: HandshakeResult) => void): void {
  let state: 'hello' | 'auth' | 'done' = 'hello';
  let protocol = PROTOCOL_VERSION;
  let input: ProofInput | undefined;
  let key: Uint8Array | undefined;
  let wireBytes = 0;

  const finish = (result: HandshakeResult, closeCode?: number, tell = true): void => {
    if (state === 'done') return;
    state = 'done';
    clearTimeout(timer);
    ws.off('message', onMessage);
    ws.off('close', onClose);
    ws.off('error', onError);
    options.socket?.off('data', onData);
    if (!result.ok) refuse(ws, result.error, closeCode, tell);
    done(result);
  };

  const onData = (chunk: Buffer): void => {
    wireBytes += chunk.byteLength;
    if (wireBytes <= HANDSHAKE_MAX_WIRE_BYTES) return;
    // Stop reading: the close frame still goes out, the flood waits in TCP until we terminate.
    options.socket?.pause();
    finish({ ok: false, error: new ProtocolError(ErrorCodes.FRAME_TOO_LARGE, `more than ${HANDSHAKE_MAX_WIRE_BYTES} bytes before authentication`) });
  };

  const onMessage = (data: WebSocket.RawData, isBinary: boolean): void => {
    const read = readHandshakeFrame(data, isBinary);
    if ('error' in read) return finish({ ok: false, error: read.error }, read.closeCode);
    const frame = read.frame;
    if (frame.type === 'Error' && state === 'auth') {
      // The client refused our Challenge (our proof did not match its secret): record its reason.
      const error = new ProtocolError(frame.code, `the client refused the handshake: ${frame.message}`, { details: { remote: true } });
      return finish({ ok: false, error }, CloseCodes.NORMAL, false);
    }
    if (state === 'hello') {
      if (frame.type !== 'Hello') return finish({ ok: false, error: unauthenticated(`${frame.type} before authentication; expected Hello`) });
      const newest = options.protocol ?? PROTOCOL_VERSION;
      if (frame.protocol < MIN_PROTOCOL_VERSION || frame.protocol > newest) return finish({ ok: false, error: protocolUnsupported(frame.protocol, newest) });
      protocol = frame.protocol;
      if (options.tls && !isIssuedTo(options.tls.certificate, frame.agent)) return finish({ ok: false, error: nameMismatch('the client', frame.agent, options.tls.certificate) });
      if (options.allowedPeers && !options.allowedPeers.has(frame.agent)) {
        return finish({ ok: false, error: new ProtocolError(ErrorCodes.PEER_UNKNOWN, `agent ${frame.agent} is not an allowed peer of ${options.agent}`) });
      }
      input = {
        clientNonce: frame.nonce,
        serverNonce: createNonce(),
        clientAgent: frame.agent,
        serverAgent: options.agent,
        ...(options.tls ? { channelBinding: options.tls.binding } : {}),
      };
      key = proofKey(options.secret, input);
      if (key === undefined) return finish({ ok: false, error: noKey() });
      state = 'auth';
      send(ws, { type: 'Challenge', agent: options.agent, nonce: input.serverNonce, proof: computeProof(key, 'server', input) });
      return;
    }
    if (state === 'auth' && input !== undefined && key !== undefined) {
      if (frame.type !== 'Auth') return finish({ ok: false, error: unauthenticated(`${frame.type} before authentication; expected Auth`) });
      if (!verifyProof(key, 'client', input, frame.proof)) {
        return finish({ ok: false, error: unauthenticated(`authentication of ${input.clientAgent} failed: its proof does not match the cluster secret`) });
      }
      send(ws, { type: 'AuthOk' });
      finish({ ok: true, remoteAgent: input.clientAgent, protocol });
    }
  };
  const onClose = (code: number, reason: Buffer): void => {
    finish({ ok: false, error: errorFromClose(code, reason.toString()) ?? unauthenticated('the peer closed the connection during the handshake') });
  };
  const onError = (err: Error & { code?: string }): void => {
    finish({ ok: false, error: protocolErrorFromWs(err) });
  };
  const timer = setTimeout(() => finish({ ok: false, error: unauthenticated(`handshake not completed within ${options.timeoutMs} ms`) }), options.timeoutMs);

  ws.on('message', onMessage);
  ws.on('close', onClose);
  ws.on('error', onError);
  options.socket?.on('data', onData);
}

/**
 * Runs the client side on a socket that is connecting or open, and calls `done` exactly once.
 * The client verifies the server's proof before it sends its own.
 */
export function clientHandshake(ws: WebSocket, options: ClientHandshakeOptions, done: (result: HandshakeResult) => void): void {
  let state: 'open' | 'challenge' | 'authok' | 'done' = 'open';
  const offered = options.protocol ?? PROTOCOL_VERSION;
  const clientNonce = createNonce();
  let serverAgent = '';
  let tls: TlsPeerInfo | undefined;

  const finish = (result: HandshakeResult, closeCode?: number, tell = true): void => {
    if (state === 'done') return;
    state = 'done';
    clearTimeout(timer);
    ws.off('open', onOpen);
    ws.off('message', onMessage);
    ws.off('close', onClose);
    ws.off('error', onError);
    if (!result.ok) refuse(ws, result.error, closeCode, tell);
    done(result);
  };

  const onOpen = (): void => {
    if (options.tls) {
      tls = options.tls();
      if (tls === undefined) return finish({ ok: false, error: new ProtocolError(ErrorCodes.PEER_TLS_FAILED, `${options.url}: the link is not TLS; a wss:// URL is required`) });
    }
    state = 'challenge';
    send(ws, { type: 'Hello', protocol: offered, agent: options.agent, nonce: clientNonce });
  };
  const onMessage = (data: WebSocket.RawData, isBinary: boolean): void => {
    const read = readHandshakeFrame(data, isBinary);
    if ('error' in read) return finish({ ok: false, error: read.error }, read.closeCode);
    const frame = read.frame;
    if (frame.type === 'Error') {
      const error = new ProtocolError(frame.code, `${options.url} refused the connection: ${frame.message}`, { details: { remote: true } });
      return finish({ ok: false, error }, CloseCodes.NORMAL, false);
    }
    if (state === 'challenge') {
      if (frame.type !== 'Challenge') return finish({ ok: false, error: unauthenticated(`${options.url} sent ${frame.type}; expected Challenge`) });
      if (tls && !isIssuedTo(tls.certificate, frame.agent)) return finish({ ok: false, error: nameMismatch(options.url, frame.agent, tls.certificate) });
      if (options.expectedPeer !== undefined && frame.agent !== options.expectedPeer) {
        return finish({ ok: false, error: new ProtocolError(ErrorCodes.PEER_UNKNOWN, `${options.url} is agent ${frame.agent}, expected ${options.expectedPeer}`) });
      }
      const input: ProofInput = { clientNonce, serverNonce: frame.nonce, clientAgent: options.agent, serverAgent: frame.agent, ...(tls ? { channelBinding: tls.binding } : {}) };
      const key = proofKey(options.secret, input);
      if (key === undefined) return finish({ ok: false, error: noKey() });
      if (!verifyProof(key, 'server', input, frame.proof)) {
        return finish({ ok: false, error: unauthenticated(`authentication of ${frame.agent} at ${options.url} failed: its proof does not match the cluster secret`) });
      }
      serverAgent = frame.agent;
      state = 'authok';
      send(ws, { type: 'Auth', proof: computeProof(key, 'client', input) });
      return;
    }
    if (state === 'authok') {
      if (frame.type !== 'AuthOk') return finish({ ok: false, error: unauthenticated(`${options.url} sent ${frame.type}; expected AuthOk`) });
      finish({ ok: true, remoteAgent: serverAgent, protocol: offered });
    }
  };
  const onClose = (code: number, reason: Buffer): void => {
    finish({ ok: false, error: errorFromClose(code, reason.toString()) ?? unauthenticated(`${options.url} closed the connection during the handshake`) });
  };
  const onError = (err: Error & { code?: string }): void => {
    const pe = protocolErrorFromWs(err);
    const error =
      pe.code === ErrorCodes.CONNECTION_CLOSED ? new ProtocolError(ErrorCodes.CONNECTION_CLOSED, `cannot connect to ${options.url}: ${err.message}`, { cause: err }) : pe;
    finish({ ok: false, error });
  };
  const timer = setTimeout(
    () => finish({ ok: false, error: new ProtocolError(ErrorCodes.REQUEST_TIMEOUT, `handshake with ${options.url} not completed within ${options.timeoutMs} ms`) }),
    options.timeoutMs,
  );

  if (ws.readyState === ws.OPEN) onOpen();
  else ws.on('open', onOpen);
  ws.on('message', onMessage);
  ws.on('close', onClose);
  ws.on('error', onError);
}
