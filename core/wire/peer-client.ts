/**
 * Outgoing peer links: connect to a peer's endpoint, authenticate, hand back a PeerConnection.
 * No reconnection: a migration that loses its link aborts, and the next one connects afresh.
 */
import { isIP } from 'node:net';
import { connect as tlsConnect, type ConnectionOptions, type TLSSocket } from 'node:tls';
import WebSocket from 'ws';
import { ConfigError, ErrorCodes, ProtocolError, isEmbotError } from '../errors.ts';
import { assertClusterSecret } from './auth.ts';
import { DEFAULT_MAX_FRAME_BYTES } from './frame-codec.ts';
import { isValidAgentName } from './frame-validate.ts';
import { DEFAULT_HANDSHAKE_TIMEOUT_MS, clientHandshake, speaksUpTo, type TlsPeerInfo } from './handshake.ts';
import { MIN_PROTOCOL_VERSION, PROTOCOL_VERSION } from './frames.ts';
import { channelBinding, clientTlsOptions, tlsError, type PeerTls } from './peer-tls.ts';
import { PeerConnection, type HandlerTable } from './peer-connection.ts';
import { peerUrl, type PeerMap } from './peers.ts';

export interface ConnectPeerOptions {
  /** `ws://host:port/`, or `wss://host:port/` with `tls`. */
  readonly url: string;
  /** This agent's name. */
  readonly agent: string;
  /** Cluster secret; optional with `tls`, where it is a second factor. */
  readonly secret?: Uint8Array | undefined;
  /** Mutual TLS (peer-tls.ts loadPeerTls): required for a `wss://` URL. */
  readonly tls?: PeerTls | undefined;
  /** The name the server must announce; a different agent at that URL is refused (PEER_UNKNOWN). */
  readonly expectedPeer?: string;
  /** Largest frame accepted or sent; also the ws `maxPayload`. Default 64 MiB. */
  readonly maxFrameBytes?: number;
  /** Connect + handshake must finish within this. Default 5 s. */
  readonly handshakeTimeoutMs?: number;
  /** Default timeout of requests on the connection. */
  readonly requestTimeoutMs?: number;
  /**
   * Handlers for the peer's requests (e.g. ModuleRequest at the migration source). Given here
   * rather than with `handle()` afterwards, they are in place for a request the peer sends
   * right after AuthOk.
   */
  readonly handlers?: HandlerTable;
  /**
   * Client frame masking. `zero` (default) sends masked frames with an all-zero key, which ws
   * then skips applying: masking exists to protect HTTP intermediaries from script-controlled
   * bytes sent by browsers (RFC 6455 §10.3), the peer link has no browser at either end, and
   * ws's JavaScript masking (no native bufferutil installed) caps loopback throughput at ~1/6.
   * `random` follows the RFC's unpredictable key, for links that cross HTTP proxies.
   */
  readonly masking?: 'zero' | 'random';
  /**
   * Local address the socket leaves from (e.g. `127.0.0.2`), so several data paths between two
   * agents use distinct address pairs, as separate NICs would.
   */
  readonly localAddress?: string;
  /** The wire protocol version offered (default PROTOCOL_VERSION; config `peer.protocol`). A server that speaks only older ones is dialled again at its newest. */
  readonly protocol?: number;
}

/** ws skips applying a mask whose four bytes are zero. */
function zeroMask(mask: Buffer): void {
  mask.fill(0);
}

/**
 * Connects to a peer and authenticates.
 *
 * @throws ProtocolError `EMBOT_ERR_PEER_UNAUTHENTICATED` (wrong secret on either side),
 *   `EMBOT_ERR_PEER_UNKNOWN` (another agent at that URL, or we are not allowed there),
 *   `EMBOT_ERR_CONNECTION_CLOSED` (cannot connect), `EMBOT_ERR_REQUEST_TIMEOUT` (handshake too slow),
 *   `EMBOT_ERR_PROTOCOL_UNSUPPORTED` (no wire protocol version in common);
 *   ConfigError for a bad agent name or a short secret.
 *
 * @example
 * ```ts
 * const conn = await connectPeer({ url: 'ws://127.0.0.1:7402/', agent: 'a', expectedPeer: 'b', secret });
 * console.log('rtt', await conn.ping(), 'ms');
 * ```
 */
export async function connectPeer(options: ConnectPeerOptions): Promise<PeerConnection> {
  try {
    return await dialPeer(options);
  } catch (e) {
    // An agent of an older protocol turned our Hello away, saying which it speaks: dial again at
    // its newest, when this agent still speaks that one (a rolling upgrade, in either order).
    const offered = options.protocol ?? PROTOCOL_VERSION;
    const theirs = isEmbotError(e) ? speaksUpTo(e) : undefined;
    if (theirs === undefined || theirs >= offered || theirs < MIN_PROTOCOL_VERSION) throw e;
    return dialPeer({ ...options, protocol: theirs });
  }
}

function dialPeer(options: ConnectPeerOptions): Promise<PeerConnection> {
  if (!isValidAgentName(options.agent)) {
    return Promise.reject(new ConfigError(ErrorCodes.CONFIG_INVALID, `agent name ${JSON.stringify(options.agent)} is invalid`));
  }
  try {
    if (options.secret !== undefined || options.tls === undefined) assertClusterSecret(options.secret ?? new Uint8Array());
    assertScheme(options.url, options.tls !== undefined);
  } catch (e) {
    return Promise.reject(e);
  }
  const maxFrameBytes = options.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES;
  const timeoutMs = options.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS;
  return new Promise<PeerConnection>((resolve, reject) => {
    let ws: WebSocket;
    const tls = options.tls ? new TlsDial(options.tls, options.url) : undefined;
    try {
      ws = new WebSocket(options.url, {
        maxPayload: maxFrameBytes,
        perMessageDeflate: false,
        handshakeTimeout: timeoutMs,
        ...(options.masking === 'random' ? {} : { generateMask: zeroMask }),
        ...(options.localAddress !== undefined ? { localAddress: options.localAddress } : {}),
        // ws hands its request options to createConnection, as it would to tls.connect.
        ...(tls ? { createConnection: tls.connect as unknown as WebSocket.ClientOptions['createConnection'] } : {}),
      });
    } catch (e) {
      reject(new ConfigError(ErrorCodes.CONFIG_INVALID, `invalid peer URL ${options.url}`, { cause: e }));
      return;
    }
    if (tls) ws.once('upgrade', () => (tls.upgraded = true));
    clientHandshake(
      ws,
      {
        agent: options.agent,
        secret: options.secret,
        timeoutMs,
        url: options.url,
        ...(options.expectedPeer !== undefined ? { expectedPeer: options.expectedPeer } : {}),
        ...(options.protocol !== undefined ? { protocol: options.protocol } : {}),
        ...(tls ? { tls: () => tls.peer() } : {}),
      },
      (result) => {
        if (!result.ok) {
          reject(tls?.explain(result.error) ?? result.error);
          return;
        }
        resolve(
          new PeerConnection(ws, {
            localAgent: options.agent,
            remoteAgent: result.remoteAgent,
            protocol: result.protocol,
            maxFrameBytes,
            ...(options.requestTimeoutMs !== undefined ? { requestTimeoutMs: options.requestTimeoutMs } : {}),
            ...(options.handlers ? { handlers: options.handlers } : {}),
          }),
        );
      },
    );
  });
}

/** A wss:// URL needs our certificate, and a ws:// URL must not be used when we have one: the config forbids both mixes. */
function assertScheme(url: string, tls: boolean): void {
  const secure = url.startsWith('wss:');
  if (secure && !tls) throw new ConfigError(ErrorCodes.CONFIG_INVALID, `${url} is a TLS peer; this agent has no certificate (peer.tls, --tls-ca/--tls-cert/--tls-key)`);
  if (!secure && tls) throw new ConfigError(ErrorCodes.CONFIG_INVALID, `${url} is not wss://; with peer.tls every peer link is TLS`);
}

/** Socket errors that mean the peer was not reached, before any TLS byte. */
const NOT_REACHED: ReadonlySet<string> = new Set(['ECONNREFUSED', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'EADDRNOTAVAIL', 'ENOTFOUND', 'EAI_AGAIN']);

/**
 * The TLS socket of one outgoing link, made for ws (its `createConnection`), so that the server's
 * certificate and the session's channel binding are at hand for the handshake, and a failure is
 * told with a code.
 */
class TlsDial {
  private socket: TLSSocket | undefined;
  private secured = false;
  /** Set once the server answered the WebSocket upgrade: past that, a close is not a certificate refusal. */
  upgraded = false;
  private failure: (Error & { code?: string }) | undefined;

  constructor(private readonly tls: PeerTls, private readonly url: string) {}

  readonly connect = (options: ConnectionOptions & { host?: string; servername?: string }): TLSSocket => {
    const socket = tlsConnect({
      ...options,
      ...clientTlsOptions(this.tls),
      path: undefined,
      // As ws does: SNI carries host names only.
      servername: options.servername ?? (options.host !== undefined && isIP(options.host) === 0 ? options.host : ''),
    } as ConnectionOptions);
    socket.once('secureConnect', () => (this.secured = true));
    socket.once('error', (e: Error & { code?: string }) => (this.failure ??= e));
    this.socket = socket;
    return socket;
  };

  /** The server's certificate and the channel binding, once the TLS session is up. */
  peer(): TlsPeerInfo | undefined {
    const socket = this.socket;
    if (socket === undefined || !this.secured || !socket.authorized) return undefined;
    const certificate = socket.getPeerX509Certificate();
    return certificate === undefined ? undefined : { certificate, binding: channelBinding(socket) };
  }

  /** A coded TLS error for a connection that failed below the WebSocket. */
  explain(error: unknown): unknown {
    if (isEmbotError(error) && error.code !== ErrorCodes.CONNECTION_CLOSED) return error;
    const failure = this.failure;
    // Nothing answered at all: not a TLS matter, the connect error says it.
    if (failure !== undefined && NOT_REACHED.has(failure.code ?? '')) return error;
    // The TLS handshake itself failed: OpenSSL's code says why (certificate, or no TLS at the other end).
    if (failure !== undefined && !this.secured) return tlsError(failure, `the peer at ${this.url}`);
    if (this.secured && !this.upgraded) {
      // A TLS 1.3 server verifies the client's certificate after the client's side of the handshake
      // is done, and Node drops a client it does not accept without an alert: the first sign is
      // the connection closing before the WebSocket upgrade is answered.
      return new ProtocolError(
        ErrorCodes.PEER_CERT_UNTRUSTED,
        `the peer at ${this.url} closed the TLS connection before answering the WebSocket upgrade, as it does with a client certificate it does not accept (another cluster CA, expired)`,
        { cause: error },
      );
    }
    return error;
  }
}

/**
 * Connects to a peer by its configured name; the server must announce that same name.
 *
 * @throws ConfigError `EMBOT_ERR_PEER_UNKNOWN` when the name is not in `peers`; otherwise as connectPeer.
 *
 * @example
 * ```ts
 * const conn = await connectNamedPeer(parsePeers('b=ws://127.0.0.1:7402'), 'b', { agent: 'a', secret });
 * ```
 */
export function connectNamedPeer(peers: PeerMap, name: string, options: Omit<ConnectPeerOptions, 'url' | 'expectedPeer'>): Promise<PeerConnection> {
  let url: string;
  try {
    url = peerUrl(peers, name);
  } catch (e) {
    return Promise.reject(e);
  }
  return connectPeer({ ...options, url, expectedPeer: name });
}
