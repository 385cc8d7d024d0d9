/**
 * The agent's peer endpoint: a ws WebSocketServer that authenticates every socket before any
 * other frame, then hands it over as a PeerConnection. A peer that misbehaves is refused or
 * closed on its own; the server keeps accepting others.
 */
import { EventEmitter } from 'eventemitter3';
import { createServer as createHttpsServer, type Server as HttpsServer } from 'node:https';
import type { AddressInfo, Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import { WebSocketServer, type WebSocket } from 'ws';
import { ConfigError, ErrorCodes, ProtocolError, describeError, type EmbotError } from '../errors.ts';
import { assertClusterSecret } from './auth.ts';
import { CloseCodes } from './close-codes.ts';
import { DEFAULT_MAX_FRAME_BYTES } from './frame-codec.ts';
import { isValidAgentName } from './frame-validate.ts';
import type { RequestType } from './frames.ts';
import { DEFAULT_HANDSHAKE_TIMEOUT_MS, refuse, serverHandshake, type TlsPeerInfo } from './handshake.ts';
import { PeerConnection, type AnyRequestHandler, type HandlerTable, type RequestHandler } from './peer-connection.ts';
import { DEFAULT_PEER_LISTEN, parsePeerListen, type PeerListenAddress } from './peers.ts';
import { authorizationCode, channelBinding, serverTlsOptions, tlsError, type PeerTls } from './peer-tls.ts';

const DEFAULT_MAX_PENDING_HANDSHAKES = 64;
/**
 * Open links one authenticated peer may hold at once. A migration uses a control link, a data path
 * per path (maxPaths), a forwarding link and a status query; this leaves room for several at once.
 */
export const DEFAULT_MAX_CONNECTIONS_PER_PEER = 32;

export interface PeerServerOptions {
  /** This agent's name, announced in the handshake. */
  readonly agent: string;
  /** Cluster secret (see loadClusterSecret); at least 16 bytes. Optional with `tls`, where it is a second factor. */
  readonly secret?: Uint8Array | undefined;
  /**
   * Mutual TLS (peer-tls.ts loadPeerTls): the listener is `wss://` and accepts only clients whose
   * certificate the cluster CA signed and names the agent they claim to be.
   */
  readonly tls?: PeerTls | undefined;
  /** `HOST:PORT` or an address; default 127.0.0.1:7401. Port 0 picks a free port. */
  readonly listen?: string | PeerListenAddress;
  /** Largest frame accepted or sent; also the ws `maxPayload`. Default 64 MiB. */
  readonly maxFrameBytes?: number;
  /** An unauthenticated socket is closed after this long. Default 5 s. */
  readonly handshakeTimeoutMs?: number;
  /** Default timeout of requests sent on accepted connections. */
  readonly requestTimeoutMs?: number;
  /** When set, only these agent names may connect. */
  readonly allowedPeers?: readonly string[];
  /** The newest wire protocol version accepted (default PROTOCOL_VERSION; config `peer.protocol`). */
  readonly protocol?: number;
  /** Sockets allowed in the handshake at once; more are closed with 1013 (try again later). Default 64. */
  readonly maxPendingHandshakes?: number;
  /** Handlers for requests arriving on any accepted connection. */
  readonly handlers?: HandlerTable;
  /** Open authenticated links one peer (by agent name) may hold; more are closed with 1013 and `EMBOT_ERR_PEER_LIMIT`. Default 32. */
  readonly maxConnectionsPerPeer?: number;
}

export interface RefusedInfo {
  readonly remoteAddress: string | undefined;
}

export interface PeerServerEvents {
  /** An authenticated peer. Attach per-connection handlers synchronously in the listener. */
  connection: (conn: PeerConnection) => void;
  /** A socket that failed the handshake (wrong secret, garbage, timeout...) was closed. */
  refused: (error: EmbotError, info: RefusedInfo) => void;
  /** An authenticated peer broke the protocol and its connection was closed. */
  protocolError: (error: EmbotError, conn: PeerConnection) => void;
}

type AnyHandler = AnyRequestHandler;

/**
 * Listens for peers.
 *
 * @example
 * ```ts
 * const server = await PeerServer.listen({ agent: 'b', secret, listen: '127.0.0.1:7402' });
 * server.handle('StartMigration', (req) => ({ type: 'MigrationPermitted', migrationId: req.migrationId }));
 * server.on('refused', (err, { remoteAddress }) => log.warn('peer refused', { code: err.code, remoteAddress }));
 * ```
 */
export class PeerServer extends EventEmitter<PeerServerEvents> {
  readonly agent: string;
  readonly address: PeerListenAddress;
  readonly maxFrameBytes: number;

  private readonly wss: WebSocketServer;
  /** The https server under `wss` (TLS listeners only; ws does not close a server it was given). */
  private readonly https: HttpsServer | undefined;
  /** TCP sockets of a TLS listener whose TLS handshake is not done, by remote address:port. */
  private readonly tlsHandshaking = new Map<string, Socket>();
  private readonly options: PeerServerOptions;
  private readonly handlers = new Map<RequestType, AnyHandler>();
  private readonly live = new Set<PeerConnection>();
  private readonly handshaking = new Set<WebSocket>();
  private closing: Promise<void> | undefined;

  private constructor(wss: WebSocketServer, https: HttpsServer | undefined, address: PeerListenAddress, options: PeerServerOptions) {
    super();
    this.wss = wss;
    this.https = https;
    this.address = address;
    this.options = options;
    this.agent = options.agent;
    this.maxFrameBytes = options.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES;
    for (const [type, handler] of Object.entries(options.handlers ?? {})) {
      if (handler) this.handlers.set(type as RequestType, handler as unknown as AnyHandler);
    }
    wss.on('connection', (ws, req) => this.accept(ws, req.socket));
    // A failing server socket after listen (rare) must not crash the agent through an unhandled 'error'.
    wss.on('error', () => {});
    if (https) this.watchTlsHandshakes(https, options.maxPendingHandshakes ?? DEFAULT_MAX_PENDING_HANDSHAKES);
  }

  /**
   * Starts listening.
   *
   * @throws ConfigError `EMBOT_ERR_CONFIG_INVALID` for a bad agent name, a short secret, a bad
   *   listen address or an address that cannot be bound (in use, not local).
   */
  static async listen(options: PeerServerOptions): Promise<PeerServer> {
    if (!isValidAgentName(options.agent)) throw new ConfigError(ErrorCodes.CONFIG_INVALID, `agent name ${JSON.stringify(options.agent)} is invalid`);
    if (options.secret !== undefined || options.tls === undefined) assertClusterSecret(options.secret ?? new Uint8Array());
    const where = typeof options.listen === 'object' ? options.listen : parsePeerListen(options.listen ?? DEFAULT_PEER_LISTEN);
    const maxPayload = options.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES;
    const handshakeTimeoutMs = options.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS;
    const https = options.tls ? createHttpsServer(serverTlsOptions(options.tls, handshakeTimeoutMs)) : undefined;
    if (https) {
      // Only WebSocket upgrades are served; a TLS client that then idles or sends a plain request is cut off.
      https.headersTimeout = handshakeTimeoutMs;
      https.requestTimeout = handshakeTimeoutMs;
      https.on('request', (_req, res) => res.writeHead(426, { 'content-type': 'text/plain', connection: 'close' }).end('embot peer link: WebSocket upgrade required\n'));
    }
    const wss = await new Promise<WebSocketServer>((resolve, reject) => {
      const server = https
        ? new WebSocketServer({ server: https, maxPayload, perMessageDeflate: false, clientTracking: true })
        : new WebSocketServer({ host: where.host, port: where.port, maxPayload, perMessageDeflate: false, clientTracking: true });
      const emitter = https ?? server;
      const onError = (e: Error): void => {
        server.close();
        https?.close();
        reject(new ConfigError(ErrorCodes.CONFIG_INVALID, `cannot listen for peers on ${where.host}:${where.port}: ${describeError(e)}`, { cause: e }));
      };
      emitter.once('error', onError);
      emitter.once('listening', () => {
        emitter.off('error', onError);
        resolve(server);
      });
      https?.listen(where.port, where.host);
    });
    const addr = (https ? https.address() : wss.address()) as AddressInfo;
    return new PeerServer(wss, https, { host: where.host, port: addr.port }, options);
  }

  /** `ws://host:port/` (`wss://` with TLS) of this endpoint, for `--peers` of other agents. */
  get url(): string {
    const host = this.address.host.includes(':') ? `[${this.address.host}]` : this.address.host;
    return `${this.https ? 'wss' : 'ws'}://${host}:${this.address.port}/`;
  }

  /** Authenticated connections that are open. */
  get connections(): readonly PeerConnection[] {
    return [...this.live];
  }

  /** The most recent open connection from the named agent. */
  connectionFrom(agent: string): PeerConnection | undefined {
    let found: PeerConnection | undefined;
    for (const c of this.live) if (c.remoteAgent === agent && c.isOpen) found = c;
    return found;
  }

  /** Serves a request type on every accepted connection (current and future) that has no handler of its own. */
  handle<T extends RequestType>(type: T, handler: RequestHandler<T>): () => void {
    const h = handler as unknown as AnyHandler;
    this.handlers.set(type, h);
    return () => {
      if (this.handlers.get(type) === h) this.handlers.delete(type);
    };
  }

  /** Closes every connection (1001 going away) and stops listening. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      const conns = [...this.live];
      for (const c of conns) void c.close(CloseCodes.GOING_AWAY, 'agent shutting down');
      // Sockets still in the handshake have nothing to finish: drop them outright.
      for (const ws of this.handshaking) ws.terminate();
      await Promise.race([Promise.all(conns.map((c) => c.closed)), new Promise((r) => setTimeout(r, 2_000).unref())]);
      for (const ws of this.wss.clients) ws.terminate();
      await new Promise<void>((resolve) => this.wss.close(() => resolve()));
      if (this.https) {
        const closed = new Promise<void>((resolve) => this.https!.close(() => resolve()));
        // Sockets still in the TLS handshake or before their upgrade request hold the server open.
        for (const raw of this.tlsHandshaking.values()) raw.destroy();
        this.https.closeAllConnections();
        await closed;
      }
    })();
    return this.closing;
  }

  /**
   * Reports TLS handshakes that fail, and bounds the sockets still in one, as `maxPendingHandshakes`
   * bounds those in the peer handshake: each costs a TLS session until its handshake timeout.
   * Sockets are keyed by remote address and port, which the TCP socket and the TLS socket over it share.
   */
  private watchTlsHandshakes(https: HttpsServer, limit: number): void {
    const pending = this.tlsHandshaking;
    /** Sockets dropped here for the bound whose TLS error (a hang-up with no address) is still to come: already reported. */
    let droppedUnreported = 0;
    https.on('connection', (raw: Socket) => {
      const key = `${raw.remoteAddress}:${raw.remotePort}`;
      if (this.closing || pending.size >= limit) {
        const remoteAddress = raw.remoteAddress;
        droppedUnreported++;
        raw.destroy();
        const why = this.closing ? 'the agent is shutting down' : `too many peers in the TLS handshake (${pending.size}); try again later`;
        this.emit('refused', new ProtocolError(ErrorCodes.PEER_UNAUTHENTICATED, why), { remoteAddress });
        return;
      }
      pending.set(key, raw);
      raw.once('close', () => {
        if (pending.get(key) === raw) pending.delete(key);
      });
    });
    https.on('secureConnection', (socket: TLSSocket) => pending.delete(`${socket.remoteAddress}:${socket.remotePort}`));
    https.on('tlsClientError', (err: Error & { code?: string }, socket: TLSSocket) => {
      const verify = authorizationCode(socket);
      if (socket.remoteAddress === undefined && verify === undefined && droppedUnreported > 0) {
        droppedUnreported--;
        return;
      }
      // A client the CA did not vouch for is dropped by OpenSSL/Node before any HTTP byte is read; its
      // verification result stays on the socket and says why.
      this.emit('refused', tlsError(err, `TLS client ${socket.remoteAddress ?? '?'}:${socket.remotePort ?? '?'}`, verify), {
        remoteAddress: socket.remoteAddress,
      });
    });
  }

  private accept(ws: WebSocket, socket: Socket): void {
    const remoteAddress = socket.remoteAddress;
    if (this.closing) {
      ws.close(CloseCodes.GOING_AWAY, 'agent shutting down');
      return;
    }
    if (this.handshaking.size >= (this.options.maxPendingHandshakes ?? DEFAULT_MAX_PENDING_HANDSHAKES)) {
      const err = new ProtocolError(ErrorCodes.PEER_UNAUTHENTICATED, `too many peers in the handshake (${this.handshaking.size}); try again later`);
      refuse(ws, err, CloseCodes.TRY_AGAIN_LATER);
      this.emit('refused', err, { remoteAddress });
      return;
    }
    const allowed = this.options.allowedPeers ? new Set(this.options.allowedPeers) : undefined;
    this.handshaking.add(ws);
    let tls: TlsPeerInfo | undefined;
    if (this.https) {
      // Reaching here means OpenSSL verified the chain (rejectUnauthorized); the name is checked on Hello.
      const tlsSocket = socket as TLSSocket;
      const certificate = tlsSocket.getPeerX509Certificate();
      if (certificate === undefined || !tlsSocket.authorized) {
        const err = tlsError(new Error('no verified client certificate'), `TLS client ${remoteAddress ?? '?'}`, authorizationCode(tlsSocket) ?? 'ERR_SSL_PEER_DID_NOT_RETURN_A_CERTIFICATE');
        this.handshaking.delete(ws);
        refuse(ws, err);
        this.emit('refused', err, { remoteAddress });
        return;
      }
      tls = { certificate, binding: channelBinding(tlsSocket) };
    }
    serverHandshake(
      ws,
      {
        agent: this.agent,
        secret: this.options.secret,
        timeoutMs: this.options.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS,
        socket,
        ...(tls ? { tls } : {}),
        ...(allowed ? { allowedPeers: allowed } : {}),
        ...(this.options.protocol !== undefined ? { protocol: this.options.protocol } : {}),
      },
      (result) => {
        this.handshaking.delete(ws);
        if (!result.ok) {
          this.emit('refused', result.error, { remoteAddress });
          return;
        }
        const perPeer = this.options.maxConnectionsPerPeer ?? DEFAULT_MAX_CONNECTIONS_PER_PEER;
        let held = 0;
        for (const c of this.live) if (c.remoteAgent === result.remoteAgent) held++;
        if (held >= perPeer) {
          // Authenticated, but each link costs buffers and handlers: one peer cannot take them all.
          const err = new ProtocolError(ErrorCodes.PEER_LIMIT, `${result.remoteAgent} already holds ${held} links to ${this.agent} (limit ${perPeer}); try again later`);
          refuse(ws, err, CloseCodes.TRY_AGAIN_LATER);
          this.emit('refused', err, { remoteAddress });
          return;
        }
        const conn = new PeerConnection(ws, {
          localAgent: this.agent,
          remoteAgent: result.remoteAgent,
          protocol: result.protocol,
          maxFrameBytes: this.maxFrameBytes,
          ...(this.options.requestTimeoutMs !== undefined ? { requestTimeoutMs: this.options.requestTimeoutMs } : {}),
          fallbackHandlers: this.handlers,
        });
        this.live.add(conn);
        conn.on('protocolError', (err, origin) => {
          if (origin === 'local') this.emit('protocolError', err, conn);
        });
        conn.once('close', () => this.live.delete(conn));
        this.emit('connection', conn);
      },
    );
  }
}
