/**
 * Mutual challenge–response on the cluster secret.
 *
 *   client → server  Hello     {agent: C, nonce: Nc}
 *   server → client  Challenge {agent: S, nonce: Ns, proof: HMAC(secret, "server" | Nc | Ns | C | S)}
 *   client → server  Auth      {proof: HMAC(secret, "client" | Nc | Ns | C | S)}
 *   server → client  AuthOk
 *
 * The server proves first, so a client never produces a proof for a server that does not hold
 * the secret. The role label keeps one side's proof from being replayed as the other's; both
 * fresh nonces keep a recorded handshake from being replayed; both names bind the proof to who
 * talks to whom. Proofs are compared in constant time.
 */
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { ConfigError, ErrorCodes, describeError } from '../errors.ts';
import { NONCE_BYTES } from './frame-validate.ts';

/** Secrets shorter than this are refused: an HMAC key is only as strong as its entropy. */
export const MIN_SECRET_BYTES = 16;

export type AuthRole = 'client' | 'server';

export interface ProofInput {
  readonly clientNonce: Uint8Array;
  readonly serverNonce: Uint8Array;
  readonly clientAgent: string;
  readonly serverAgent: string;
  /**
   * On a TLS link, keying material exported from the TLS session (peer-tls.ts channelBinding): the
   * proofs then hold for this session only, and key the HMAC when no cluster secret is configured.
   */
  readonly channelBinding?: Uint8Array;
}

const LABEL = 'embot-peer-auth-v1';

/** Fresh random nonce for one handshake. */
export function createNonce(): Uint8Array {
  return randomBytes(NONCE_BYTES);
}

function lengthPrefixed(s: string): Buffer {
  const body = Buffer.from(s, 'utf8');
  const len = Buffer.alloc(2);
  len.writeUInt16BE(body.length);
  return Buffer.concat([len, body]);
}

/**
 * HMAC-SHA256 proof of the secret for one role in one handshake. Every variable-length part is
 * length-prefixed so no two different inputs hash the same byte string.
 *
 * @example
 * ```ts
 * const proof = computeProof(secret, 'server', { clientNonce, serverNonce, clientAgent: 'a', serverAgent: 'b' });
 * ```
 */
export function computeProof(secret: Uint8Array, role: AuthRole, input: ProofInput): Uint8Array {
  const h = createHmac('sha256', secret);
  h.update(lengthPrefixed(LABEL));
  h.update(lengthPrefixed(role));
  h.update(input.clientNonce);
  h.update(input.serverNonce);
  h.update(lengthPrefixed(input.clientAgent));
  h.update(lengthPrefixed(input.serverAgent));
  if (input.channelBinding !== undefined) h.update(input.channelBinding);
  return h.digest();
}

/**
 * The HMAC key of one handshake: the cluster secret, or on a TLS link without one the session's
 * channel binding (the certificates then authenticate, and the proofs only tie the names to the session).
 */
export function proofKey(secret: Uint8Array | undefined, input: ProofInput): Uint8Array | undefined {
  return secret ?? input.channelBinding;
}

/** Constant-time check of a proof received from the peer playing `role`. */
export function verifyProof(secret: Uint8Array, role: AuthRole, input: ProofInput, proof: Uint8Array): boolean {
  const expected = computeProof(secret, role, input);
  return proof.byteLength === expected.byteLength && timingSafeEqual(proof, expected);
}

/** Throws ConfigError unless the secret is long enough. */
export function assertClusterSecret(secret: Uint8Array, origin = 'cluster secret'): void {
  if (secret.byteLength < MIN_SECRET_BYTES) {
    throw new ConfigError(ErrorCodes.CONFIG_INVALID, `${origin} is ${secret.byteLength} bytes; at least ${MIN_SECRET_BYTES} are required`, {
      details: { bytes: secret.byteLength, min: MIN_SECRET_BYTES },
    });
  }
}

/**
 * Reads the cluster secret from a file. Trailing whitespace and newlines are dropped, because
 * `echo secret > file` adds one and the same secret must give the same key on every host.
 *
 * @throws ConfigError `EMBOT_ERR_CONFIG_NOT_FOUND` when the file cannot be read,
 *   `EMBOT_ERR_CONFIG_INVALID` when the secret is shorter than 16 bytes.
 *
 * @example
 * ```ts
 * const secret = loadClusterSecret('/etc/embot/cluster.secret');
 * const server = await PeerServer.listen({ agent: 'a', secret });
 * ```
 */
export function loadClusterSecret(file: string): Uint8Array {
  let raw: Buffer;
  try {
    raw = readFileSync(file);
  } catch (e) {
    throw new ConfigError(ErrorCodes.CONFIG_NOT_FOUND, `cannot read secret file ${file}: ${describeError(e)}`, { cause: e, details: { file } });
  }
  let end = raw.length;
  while (end > 0 && (raw[end - 1] === 0x0a || raw[end - 1] === 0x0d || raw[end - 1] === 0x20 || raw[end - 1] === 0x09)) end--;
  const secret = raw.subarray(0, end);
  assertClusterSecret(secret, `secret file ${file}`);
  return secret;
}
