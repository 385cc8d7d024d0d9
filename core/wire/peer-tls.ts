/**
 * Mutual TLS of the peer link and the data paths: this agent's certificate and key, the cluster
 * CA that must have signed every peer's certificate, and what a certificate says about the name
 * of the agent holding it.
 *
 * Who a peer is comes from two checks together: OpenSSL verifies the chain to the cluster CA (on
 * both sides, `rejectUnauthorized`), and the handshake (handshake.ts) verifies that the name the
 * peer claims is a name its certificate carries. The URL's host is not checked against the
 * certificate: the cluster CA signs agents only, an agent is reached at several addresses (data
 * paths), and the name check already binds the link to the agent the caller meant.
 */
import { X509Certificate, createPrivateKey, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createSecureContext, type ConnectionOptions, type SecureContext, type TLSSocket, type TlsOptions } from 'node:tls';
import { ConfigError, ErrorCodes, ProtocolError, describeError } from '../errors.ts';

/** File paths as configured (`peer.tls`). */
export interface PeerTlsFiles {
  /** The cluster CA certificate (PEM). */
  readonly ca: string;
  /** This agent's certificate (PEM), signed by the cluster CA. */
  readonly cert: string;
  /** This agent's private key (PEM). */
  readonly key: string;
}

/** Loaded and checked TLS material of one agent. */
export interface PeerTls {
  readonly files: PeerTlsFiles;
  readonly ca: Buffer;
  readonly cert: Buffer;
  readonly key: Buffer;
  readonly caCertificate: X509Certificate;
  readonly certificate: X509Certificate;
  /** Client side: parsed once, reused by every connection. */
  readonly clientContext: SecureContext;
}

/**
 * TLS 1.3 only: its handshake is one round trip shorter, and the bulk ciphers are those of TLS 1.2
 * (AES-GCM, ChaCha20-Poly1305), so the data path pays nothing for it (BENCHMARKS.md, TLS section).
 */
export const MIN_TLS_VERSION = 'TLSv1.3' as const;

/** The keying-material exporter label of the handshake's channel binding (RFC 5705 / RFC 8446 §7.5). */
const CHANNEL_BINDING_LABEL = 'EXPORTER-embot-peer-link';
const CHANNEL_BINDING_BYTES = 32;

function readPem(file: string, what: string): Buffer {
  try {
    return readFileSync(file);
  } catch (e) {
    throw new ConfigError(ErrorCodes.CONFIG_NOT_FOUND, `cannot read the ${what} ${file}: ${describeError(e)}`, { cause: e, details: { file } });
  }
}

function invalid(message: string, details: Record<string, unknown>, cause?: unknown): ConfigError {
  return new ConfigError(ErrorCodes.CONFIG_INVALID, message, { details, ...(cause === undefined ? {} : { cause }) });
}

/**
 * Reads `peer.tls` and checks it before the agent listens: the CA is a CA, the certificate is
 * signed by it, current, names `agent`, and belongs to the key. A mistake here would otherwise
 * show up only as peers refusing this agent.
 *
 * @throws ConfigError `EMBOT_ERR_CONFIG_NOT_FOUND` for a file that cannot be read,
 *   `EMBOT_ERR_CONFIG_INVALID` for everything else, with what is wrong and which file.
 *
 * @example
 * ```ts
 * const tls = loadPeerTls({ ca: 'tls/ca.crt', cert: 'tls/a.crt', key: 'tls/a.key' }, 'a');
 * const server = await PeerServer.listen({ agent: 'a', tls, listen: '10.0.0.1:7401' });
 * ```
 */
export function loadPeerTls(files: PeerTlsFiles, agent: string, now: Date = new Date()): PeerTls {
  const ca = readPem(files.ca, 'cluster CA certificate');
  const cert = readPem(files.cert, 'agent certificate');
  const key = readPem(files.key, 'agent key');
  let caCertificate: X509Certificate;
  let certificate: X509Certificate;
  let privateKey: KeyObject;
  try {
    caCertificate = new X509Certificate(ca);
  } catch (e) {
    throw invalid(`${files.ca} is not a PEM certificate: ${describeError(e)}`, { file: files.ca }, e);
  }
  try {
    certificate = new X509Certificate(cert);
  } catch (e) {
    throw invalid(`${files.cert} is not a PEM certificate: ${describeError(e)}`, { file: files.cert }, e);
  }
  try {
    privateKey = createPrivateKey(key);
  } catch (e) {
    throw invalid(`${files.key} is not a PEM private key: ${describeError(e)}`, { file: files.key }, e);
  }
  if (!caCertificate.ca) throw invalid(`${files.ca} is not a CA certificate (create one with \`embot ca init\`)`, { file: files.ca });
  if (!certificate.checkIssued(caCertificate) || !certificate.verify(caCertificate.publicKey)) {
    throw invalid(`${files.cert} is not signed by the cluster CA ${files.ca}`, { file: files.cert, ca: files.ca });
  }
  if (!certificate.checkPrivateKey(privateKey)) throw invalid(`${files.key} is not the key of ${files.cert}`, { file: files.key, cert: files.cert });
  for (const [c, file] of [[caCertificate, files.ca], [certificate, files.cert]] as const) {
    if (now < new Date(c.validFrom) || now > new Date(c.validTo)) {
      throw invalid(`${file} is valid from ${c.validFrom} to ${c.validTo}, not now`, { file, validFrom: c.validFrom, validTo: c.validTo });
    }
  }
  if (!isIssuedTo(certificate, agent)) {
    throw invalid(`${files.cert} is issued to ${describeNames(certificate)}, not to this agent ${agent} (issue one with \`embot ca issue ${agent}\`)`, {
      file: files.cert,
      agent,
    });
  }
  let clientContext: SecureContext;
  try {
    clientContext = createSecureContext({ ca, cert, key, minVersion: MIN_TLS_VERSION });
  } catch (e) {
    throw invalid(`cannot use ${files.cert} / ${files.key} for TLS: ${describeError(e)}`, { cert: files.cert, key: files.key }, e);
  }
  return { files, ca, cert, key, caCertificate, certificate, clientContext };
}

/**
 * Whether `cert` is issued to the agent `name`: a DNS subjectAltName equal to it, or (only when the
 * certificate has no DNS names) its common name. No wildcards: a name is one agent.
 */
export function isIssuedTo(cert: X509Certificate, name: string): boolean {
  return cert.checkHost(name, { subject: 'default', wildcards: false, partialWildcards: false, multiLabelWildcards: false, singleLabelSubdomains: false }) !== undefined;
}

/** `CN=a, DNS:a, IP Address:127.0.0.1`, for messages. */
export function describeNames(cert: X509Certificate): string {
  const cn = /(?:^|\n)CN=([^\n]*)/.exec(cert.subject)?.[1];
  const parts = [...(cn === undefined ? [] : [`CN=${cn}`]), ...(cert.subjectAltName ? [cert.subjectAltName] : [])];
  return parts.length > 0 ? parts.join(', ') : '(no name)';
}

/** Options of the https server under a TLS peer listener. */
export function serverTlsOptions(tls: PeerTls, handshakeTimeoutMs: number): TlsOptions {
  return {
    ca: tls.ca,
    cert: tls.cert,
    key: tls.key,
    requestCert: true,
    rejectUnauthorized: true,
    minVersion: MIN_TLS_VERSION,
    handshakeTimeout: handshakeTimeoutMs,
  };
}

/** Options of a TLS client socket (passed through ws to `tls.connect`). */
export function clientTlsOptions(tls: PeerTls): ConnectionOptions {
  return {
    secureContext: tls.clientContext,
    rejectUnauthorized: true,
    minVersion: MIN_TLS_VERSION,
    // The name, not the host, is checked, in the handshake (see the file comment).
    checkServerIdentity: () => undefined,
  };
}

/**
 * Keying material both ends of one TLS session derive and no one else can: mixed into the
 * handshake's proofs, it ties the authentication to this session (a proof cannot be relayed into
 * another one), and keys them when no cluster secret is configured.
 */
export function channelBinding(socket: TLSSocket): Buffer {
  return socket.exportKeyingMaterial(CHANNEL_BINDING_BYTES, CHANNEL_BINDING_LABEL, Buffer.alloc(0));
}

/** Why OpenSSL did not verify the peer's certificate (Node keeps the code as a string, typed as an Error). */
export function authorizationCode(socket: TLSSocket): string | undefined {
  const e: unknown = socket.authorizationError;
  if (typeof e === 'string') return e;
  const code = (e as { code?: unknown } | null | undefined)?.code;
  return typeof code === 'string' ? code : undefined;
}

/** OpenSSL verification results that mean "this certificate is not one the cluster CA vouches for". */
const UNTRUSTED_CERT_CODES: ReadonlySet<string> = new Set([
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'CERT_SIGNATURE_FAILURE',
  'CERT_HAS_EXPIRED',
  'CERT_NOT_YET_VALID',
  'CERT_REVOKED',
  'CERT_UNTRUSTED',
  'CERT_REJECTED',
  'INVALID_CA',
  'INVALID_PURPOSE',
  'ERR_SSL_PEER_DID_NOT_RETURN_A_CERTIFICATE',
  'ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED',
  'ERR_SSL_TLSV1_ALERT_UNKNOWN_CA',
  'ERR_SSL_SSLV3_ALERT_BAD_CERTIFICATE',
  'ERR_SSL_SSLV3_ALERT_CERTIFICATE_EXPIRED',
  'ERR_SSL_SSLV3_ALERT_CERTIFICATE_UNKNOWN',
  'ERR_SSL_TLSV1_ALERT_DECRYPT_ERROR',
]);

/**
 * The coded error for a TLS failure: certificate problems are PEER_CERT_UNTRUSTED, anything else
 * at the TLS layer (plain text on a TLS port, no common protocol version) PEER_TLS_FAILED.
 * `where` says who and where, e.g. `127.0.0.1:7402` or `the peer at wss://…`.
 */
export function tlsError(err: Error & { code?: string }, where: string, verifyCode?: string | null): ProtocolError {
  const code = verifyCode ?? err.code ?? '';
  if (UNTRUSTED_CERT_CODES.has(code)) {
    return new ProtocolError(ErrorCodes.PEER_CERT_UNTRUSTED, `${where}: certificate refused (${code}): no certificate, or one the cluster CA did not sign or that is not valid now`, {
      cause: err,
      details: { tls: code },
    });
  }
  if (code === 'ERR_SSL_HTTP_REQUEST') {
    return new ProtocolError(ErrorCodes.PEER_TLS_FAILED, `${where}: a plain (non-TLS) request reached a TLS peer listener; peers must connect with wss:// and a cluster certificate`, {
      cause: err,
      details: { tls: code },
    });
  }
  return new ProtocolError(ErrorCodes.PEER_TLS_FAILED, `${where}: TLS failed (${code || 'no code'}): ${err.message.split('\n')[0]}`, { cause: err, details: { tls: code } });
}
