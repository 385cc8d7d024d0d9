/**
 * Outgoing peer links: connect to a peer's endpoint, authenticate, hand back a PeerConnection.
 * No reconnection: a migration that loses its link aborts, and the next one connects afresh.
 */
import WebSocket from 'ws';
import { ConfigError, ErrorCodes } from '../errors.ts';
import { assertClusterSecret } from './auth.ts';
import { DEFAULT_MAX_FRAME_BYTES } from './frame-codec.ts';
import { isValidAgentName } from './frame-validate.ts';
import { DEFAULT_HANDSHAKE_TIMEOUT_MS, clientHandshake } from './handshake.ts';
import { PeerConnection, type HandlerTable } from './peer-connection.ts';
import { peerUrl, type PeerMap } from './peers.ts';

export interface ConnectPeerOptions {
  /** `ws://host:port/`. */
  readonly url: string;
  /** This agent's name. */
  readonly agent: string;
  readonly secret: Uint8Array;
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
 *   `EMBOT_ERR_CONNECTION_CLOSED` (cannot connect), `EMBOT_ERR_REQUEST_TIMEOUT` (handshake too slow);
 *   ConfigError for a bad agent name or a short secret.
 *
 * @example
 * ```ts
 * const conn = await connectPeer({ url: 'ws://127.0.0.1:7402/', agent: 'a', expectedPeer: 'b', secret });
 * console.log('rtt', await conn.ping(), 'ms');
 * ```
 */
export function connectPeer(options: ConnectPeerOptions): Promise<PeerConnection> {
  if (!isValidAgentName(options.agent)) {
    return Promise.reject(new ConfigError(ErrorCodes.CONFIG_INVALID, `agent name ${JSON.stringify(options.agent)} is invalid`));
  }
  try {
    assertClusterSecret(options.secret);
  } catch (e) {
    return Promise.reject(e);
  }
  const maxFrameBytes = options.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES;
  const timeoutMs = options.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS;
  return new Promise<PeerConnection>((resolve, reject) => {
    let ws: WebSocket;
    try {
      ws = new WebSocket(options.url, {
        maxPayload: maxFrameBytes,
        perMessageDeflate: false,
        handshakeTimeout: timeoutMs,
        ...(options.masking === 'random' ? {} : { generateMask: zeroMask }),
        ...(options.localAddress !== undefined ? { localAddress: options.localAddress } : {}),
      });
    } catch (e) {
      reject(new ConfigError(ErrorCodes.CONFIG_INVALID, `invalid peer URL ${options.url}`, { cause: e }));
      return;
    }
    clientHandshake(
      ws,
      {
        agent: options.agent,
        secret: options.secret,
        timeoutMs,
        url: options.url,
        ...(options.expectedPeer !== undefined ? { expectedPeer: options.expectedPeer } : {}),
      },
      (result) => {
        if (!result.ok) {
          reject(result.error);
          return;
        }
        resolve(
          new PeerConnection(ws, {
            localAgent: options.agent,
            remoteAgent: result.remoteAgent,
            maxFrameBytes,
            ...(options.requestTimeoutMs !== undefined ? { requestTimeoutMs: options.requestTimeoutMs } : {}),
            ...(options.handlers ? { handlers: options.handlers } : {}),
          }),
        );
      },
    );
  });
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
