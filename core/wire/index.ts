/** The authenticated peer-to-peer wire: frames, codec, handshake, connections, server, client, mutual TLS (cluster-ca.ts, which issues certificates, is loaded by `embot ca` and tests only). */
export * from './frames.ts';
export { DEFAULT_MAX_FRAME_BYTES, decodeFrame, encodeFrame } from './frame-codec.ts';
export { NONCE_BYTES, isKnownFrameType, isValidAgentName, isValidModuleRef, validateFrame } from './frame-validate.ts';
export { MIN_SECRET_BYTES, assertClusterSecret, computeProof, createNonce, loadClusterSecret, verifyProof, type AuthRole, type ProofInput } from './auth.ts';
export { CloseCodes, closeCodeFor, closeReason, parseCloseReason, type CloseCode } from './close-codes.ts';
export { DEFAULT_HANDSHAKE_TIMEOUT_MS, HANDSHAKE_MAX_FRAME_BYTES, HANDSHAKE_MAX_WIRE_BYTES } from './handshake.ts';
export {
  DEFAULT_REQUEST_TIMEOUT_MS,
  PeerConnection,
  errorFromClose,
  protocolErrorFromWs,
  type AnyRequestHandler,
  type CloseInfo,
  type HandlerSource,
  type HandlerTable,
  type PeerConnectionEvents,
  type RequestHandler,
  type RequestOptions,
} from './peer-connection.ts';
export { PeerServer, type PeerServerEvents, type PeerServerOptions, type RefusedInfo } from './peer-server.ts';
export { SERVICE_REQUEST_TYPES, peerEndpoint, type PeerEndpoint, type PeerFrameService, type ServiceRequestType } from './peer-services.ts';
export { connectNamedPeer, connectPeer, type ConnectPeerOptions } from './peer-client.ts';
export { DEFAULT_PEER_LISTEN, parsePeerListen, parsePeers, peerUrl, type PeerListenAddress, type PeerMap } from './peers.ts';
export {
  MIN_TLS_VERSION,
  clientTlsOptions,
  describeNames,
  isIssuedTo,
  loadPeerTls,
  serverTlsOptions,
  tlsError,
  type PeerTls,
  type PeerTlsFiles,
} from './peer-tls.ts';
export type { TlsPeerInfo } from './handshake.ts';
