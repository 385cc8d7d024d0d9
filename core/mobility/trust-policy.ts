import { createPrivateKey, createPublicKey, generateKeyPairSync, sign, verify, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { ConfigError, ErrorCodes, describeError } from '../errors.ts';
import { moduleRef } from '../plugins/manifest.ts';

/**
 * Which shipped modules an agent loads:
 * - `signed` (default): the module's ed25519 signature verifies against one of the cluster's keys;
 * - `allowlist`: its content hash (or exact `name@version#hash`) is listed;
 * - `any-authenticated-peer`: whatever an authenticated peer sends (the hash is still checked).
 */
export type TrustMode = 'signed' | 'allowlist' | 'any-authenticated-peer';

export const TRUST_MODES: readonly TrustMode[] = ['signed', 'allowlist', 'any-authenticated-peer'];

export interface TrustConfig {
  /** Default `signed`. */
  readonly mode?: TrustMode;
  /** ed25519 public keys: PEM (SPKI), base64 of the raw 32-byte key or of its DER SPKI, or a path to a file holding one. */
  readonly publicKeys?: readonly string[];
  /** Content hashes (64 hex) or exact module refs `name@version#hash`. */
  readonly allowHashes?: readonly string[];
}

export interface TrustOptions {
  /** Folder relative key file paths are resolved against (the config file's folder); default the working directory. */
  readonly baseDir?: string;
}

/** What a module is announced as. */
export interface ModuleIdentity {
  readonly name: string;
  readonly version: string;
  readonly hash: string;
}

/** A module as the trust policy sees it: its identity and, when signed, its detached signature. */
export interface TrustSubject extends ModuleIdentity {
  readonly signature?: Uint8Array;
}

export type TrustDecision = { readonly trusted: true } | { readonly trusted: false; readonly reason: string };

export interface TrustPolicy {
  readonly mode: TrustMode;
  /** Decides on identity and signature alone; the caller checks that the content hashes to `hash`. */
  check(subject: TrustSubject): TrustDecision;
}

const HEX_HASH = /^[0-9a-f]{64}$/;
const REF = /^([a-z][a-z0-9-]{0,63})@([0-9A-Za-z.+-]{1,64})#([0-9a-f]{64})$/;
const BASE64 = /^[A-Za-z0-9+/]+={0,2}$/;
const SIGNATURE_BYTES = 64;
const RAW_KEY_BYTES = 32;
/** DER SPKI header of an ed25519 public key; the raw key follows it. */
const ED25519_SPKI_PREFIX = Buffer.from('302a300506032b6570032100', 'hex');

const HOW_TO_SIGN =
  'create a cluster key with `embot module keygen --out DIR`, sign each module with `embot module sign MODULE_DIR --key DIR/cluster-signing.key`, ' +
  'and list DIR/cluster-signing.pub under trust.publicKeys on every agent';
const HOW_TO_ALLOW = 'print a module\'s hash with `embot module hash MODULE_DIR` and add it to trust.allowHashes';

/**
 * The bytes a module signature covers: `embot-module:v1:<name>@<version>#<hash>`. The hash
 * covers every file, so signing the ref signs the content; the prefix keeps a module signature
 * from being valid for anything else signed with the same key.
 *
 * @example
 * ```ts
 * moduleSigningPayload({ name: 'vm-watchdog', version: '1.0.0', hash }).toString(); // 'embot-module:v1:vm-watchdog@1.0.0#…'
 * ```
 */
export function moduleSigningPayload(m: ModuleIdentity): Buffer {
  return Buffer.from(`embot-module:v1:${moduleRef(m)}`, 'utf8');
}

/**
 * Signs a module identity with an ed25519 private key (64-byte detached signature).
 *
 * @example
 * ```ts
 * const sig = signModule({ name, version, hash }, parsePrivateKey(readFileSync('cluster-signing.key', 'utf8')));
 * ```
 */
export function signModule(m: ModuleIdentity, privateKey: KeyObject): Uint8Array {
  return new Uint8Array(sign(null, moduleSigningPayload(m), privateKey));
}

/**
 * Whether `signature` is a valid signature of the module by any of `keys`. Never throws: a
 * signature of the wrong length or a key of the wrong type is simply not valid.
 *
 * @example
 * ```ts
 * if (!verifyModuleSignature(bundle, bundle.signature, keys)) refuse();
 * ```
 */
export function verifyModuleSignature(m: ModuleIdentity, signature: Uint8Array, keys: readonly KeyObject[]): boolean {
  if (signature.byteLength !== SIGNATURE_BYTES) return false;
  const payload = moduleSigningPayload(m);
  return keys.some((key) => {
    try {
      return verify(null, payload, key, signature);
    } catch {
      return false;
    }
  });
}

/** A fresh cluster signing key pair: PKCS8 PEM private key, SPKI PEM public key, and the raw public key in base64. */
export interface SigningKeys {
  readonly privatePem: string;
  readonly publicPem: string;
  readonly publicRawBase64: string;
}

/**
 * Generates an ed25519 key pair for signing modules.
 *
 * @example
 * ```ts
 * const { privatePem, publicPem } = generateSigningKeys();
 * ```
 */
export function generateSigningKeys(): SigningKeys {
  const { privateKey, publicKey } = generateKeyPairSync('ed25519');
  const spki = publicKey.export({ type: 'spki', format: 'der' });
  return {
    privatePem: privateKey.export({ type: 'pkcs8', format: 'pem' }).toString(),
    publicPem: publicKey.export({ type: 'spki', format: 'pem' }).toString(),
    publicRawBase64: spki.subarray(ED25519_SPKI_PREFIX.length).toString('base64'),
  };
}

/**
 * Reads an ed25519 public key from PEM, from base64 (raw 32-byte key or DER SPKI), or from a
 * file holding either. `where` names the setting in error messages.
 *
 * @throws ConfigError `EMBOT_ERR_CONFIG_INVALID` when it is none of these, or not ed25519.
 *
 * @example
 * ```ts
 * const key = parsePublicKey('/etc/embot/cluster-signing.pub');
 * ```
 */
export function parsePublicKey(spec: string, opts: TrustOptions & { readonly where?: string } = {}): KeyObject {
  const where = opts.where ?? 'public key';
  const inline = publicKeyFromText(spec, where);
  if (inline) return inline;
  const path = resolve(opts.baseDir ?? process.cwd(), spec);
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new ConfigError(ErrorCodes.CONFIG_INVALID, `${where}: not a PEM or base64 ed25519 public key, and not a readable key file (${path}: ${describeError(e)})`);
  }
  const fromFile = publicKeyFromText(text, `${where} (${path})`);
  if (!fromFile) throw new ConfigError(ErrorCodes.CONFIG_INVALID, `${where}: ${path} does not hold a PEM or base64 ed25519 public key`);
  return fromFile;
}

function publicKeyFromText(raw: string, where: string): KeyObject | undefined {
  const text = raw.trim();
  let key: KeyObject;
  if (text.startsWith('-----BEGIN')) {
    try {
      key = createPublicKey({ key: text, format: 'pem' });
    } catch (e) {
      throw new ConfigError(ErrorCodes.CONFIG_INVALID, `${where}: unreadable PEM key: ${describeError(e)}`);
    }
  } else if (BASE64.test(text)) {
    const bytes = Buffer.from(text, 'base64');
    const der =
      bytes.length === RAW_KEY_BYTES
        ? Buffer.concat([ED25519_SPKI_PREFIX, bytes])
        : bytes.length === ED25519_SPKI_PREFIX.length + RAW_KEY_BYTES && bytes.subarray(0, ED25519_SPKI_PREFIX.length).equals(ED25519_SPKI_PREFIX)
          ? bytes
          : undefined;
    if (!der) return undefined;
    key = createPublicKey({ key: der, format: 'der', type: 'spki' });
  } else {
    return undefined;
  }
  if (key.asymmetricKeyType !== 'ed25519') {
    throw new ConfigError(ErrorCodes.CONFIG_INVALID, `${where}: is a ${key.asymmetricKeyType ?? 'unknown'} key, module signatures use ed25519`);
  }
  // A private PEM yields its public half; keep only that.
  return key.type === 'public' ? key : createPublicKey(key);
}

/**
 * Reads an ed25519 private key from PEM (PKCS8, as `embot module keygen` writes it).
 *
 * @throws ConfigError `EMBOT_ERR_CONFIG_INVALID` when it is not a PEM private key or not ed25519.
 *
 * @example
 * ```ts
 * const key = parsePrivateKey(readFileSync('cluster-signing.key', 'utf8'));
 * ```
 */
export function parsePrivateKey(pem: string, where = 'private key'): KeyObject {
  let key: KeyObject;
  try {
    key = createPrivateKey({ key: pem, format: 'pem' });
  } catch (e) {
    throw new ConfigError(ErrorCodes.CONFIG_INVALID, `${where}: not a PEM private key (${describeError(e)})`);
  }
  if (key.asymmetricKeyType !== 'ed25519') {
    throw new ConfigError(ErrorCodes.CONFIG_INVALID, `${where}: is a ${key.asymmetricKeyType ?? 'unknown'} key, module signatures use ed25519`);
  }
  return key;
}

/**
 * Builds the trust policy of an agent from its configuration. Keys and allowlist entries are
 * parsed here, once, so a configuration mistake fails the agent's start instead of a migration.
 * With no key (signed) or no entry (allowlist) every module is refused, and the reason says how
 * to configure trust.
 *
 * @throws ConfigError `EMBOT_ERR_CONFIG_INVALID` for an unknown mode, an unreadable key or a malformed allowlist entry.
 *
 * @example
 * ```ts
 * const trust = createTrustPolicy({ mode: 'signed', publicKeys: ['/etc/embot/cluster-signing.pub'] });
 * const d = trust.check({ name, version, hash, signature });
 * if (!d.trusted) throw new PluginError(ErrorCodes.MODULE_UNTRUSTED, d.reason);
 * ```
 */
export function createTrustPolicy(config: TrustConfig = {}, opts: TrustOptions = {}): TrustPolicy {
  const mode = config.mode ?? 'signed';
  if (!TRUST_MODES.includes(mode)) {
    throw new ConfigError(ErrorCodes.CONFIG_INVALID, `trust.mode: ${JSON.stringify(mode)} is not one of ${TRUST_MODES.join(', ')}`);
  }
  const keys = (config.publicKeys ?? []).map((spec, i) => parsePublicKey(spec, { ...opts, where: `trust.publicKeys[${i}]` }));
  const allowed = parseAllowlist(config.allowHashes ?? []);

  const check = (s: TrustSubject): TrustDecision => {
    const ref = `${s.name}@${s.version}#${s.hash}`;
    switch (mode) {
      case 'any-authenticated-peer':
        return { trusted: true };
      case 'allowlist':
        if (allowed.hashes.size === 0 && allowed.refs.size === 0) return refuse(`module ${ref} refused: trust mode is 'allowlist' but trust.allowHashes is empty; ${HOW_TO_ALLOW}`);
        if (allowed.hashes.has(s.hash) || allowed.refs.has(ref)) return { trusted: true };
        return refuse(`module ${ref} refused: its hash is not in trust.allowHashes; ${HOW_TO_ALLOW}`);
      case 'signed':
        if (keys.length === 0) return refuse(`module ${ref} refused: trust mode is 'signed' but no public key is configured (trust.publicKeys); ${HOW_TO_SIGN}`);
        if (s.signature === undefined) return refuse(`module ${ref} refused: it is not signed (no module.sig); ${HOW_TO_SIGN}`);
        if (!verifyModuleSignature(s, s.signature, keys)) {
          return refuse(`module ${ref} refused: its signature does not verify against any of the ${keys.length} configured public key(s) (wrong key, or the module was changed after signing)`);
        }
        return { trusted: true };
    }
  };
  return Object.freeze({ mode, check });
}

function refuse(reason: string): TrustDecision {
  return { trusted: false, reason };
}

function parseAllowlist(entries: readonly string[]): { readonly hashes: ReadonlySet<string>; readonly refs: ReadonlySet<string> } {
  const hashes = new Set<string>();
  const refs = new Set<string>();
  entries.forEach((raw, i) => {
    const entry = typeof raw === 'string' ? raw.trim() : '';
    const lower = entry.toLowerCase();
    if (HEX_HASH.test(lower)) hashes.add(lower);
    else if (REF.test(entry)) refs.add(entry);
    else {
      throw new ConfigError(
        ErrorCodes.CONFIG_INVALID,
        `trust.allowHashes[${i}]: ${JSON.stringify(String(raw).slice(0, 100))} is neither a module hash (64 hex characters) nor a module ref name@version#hash`,
      );
    }
  });
  return { hashes, refs };
}

/** `module.sig` holds the signature in base64 on one line, so it survives copy-paste and diffs. */
export function encodeSignatureFile(signature: Uint8Array): string {
  return `${Buffer.from(signature).toString('base64')}\n`;
}

/** The signature in a `module.sig`, or undefined when the text is not a base64 64-byte signature. */
export function decodeSignatureFile(text: string): Uint8Array | undefined {
  const t = text.trim();
  if (!BASE64.test(t)) return undefined;
  const bytes = Buffer.from(t, 'base64');
  return bytes.length === SIGNATURE_BYTES ? new Uint8Array(bytes) : undefined;
}
