import { Packr, Unpackr } from 'msgpackr';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describeError, ErrorCodes, PluginError } from '../errors.ts';
import { hashModuleFiles, MODULE_SIGNATURE_FILE, moduleFiles } from '../plugins/content-hash.ts';
import { ManifestSchema } from '../plugins/manifest.ts';
import type { CachedModule, PluginCache } from './plugin-cache.ts';
import { assertValidFileMap, MODULE_BUNDLE_LIMITS } from './module-bundle-rules.ts';
import { decodeSignatureFile, type TrustPolicy } from './trust-policy.ts';

export { assertValidFileMap, bundlePathProblem, MODULE_BUNDLE_LIMITS } from './module-bundle-rules.ts';

/** A module folder ready to go into a `ModuleBundle` frame. */
export interface PackedModule {
  readonly name: string;
  readonly version: string;
  readonly hash: string;
  /** msgpack map: relative `/`-separated path → file bytes. */
  readonly code: Uint8Array;
  /** From the module's `module.sig`, when it has one. */
  readonly signature?: Uint8Array;
}

/** The fields of a received `ModuleBundle` frame that matter here. */
export interface ReceivedBundle {
  readonly name: string;
  readonly version: string;
  readonly hash: string;
  readonly code: Uint8Array;
  readonly signature?: Uint8Array;
}

/** What the target asked for: from the `StartMigration` ref `name@version#hash`. */
export interface ExpectedModule {
  readonly name: string;
  readonly hash: string;
  /** When given, the bundle must carry this version too. */
  readonly version?: string;
}

const packr = new Packr({ useRecords: false, moreTypes: false });
// Maps stay Maps: a file named `__proto__` or `constructor` must not become an object key.
const unpackr = new Unpackr({ useRecords: false, mapsAsObjects: false, moreTypes: false, int64AsType: 'number' });

/** msgpack overhead per file (map entry headers, path bytes) allowed on top of the content limit. */
const PER_FILE_OVERHEAD = MODULE_BUNDLE_LIMITS.maxPathLength * 4 + 16;

function invalid(message: string, details?: Record<string, unknown>): PluginError {
  return new PluginError(ErrorCodes.MODULE_BUNDLE_INVALID, message, details === undefined ? undefined : { details });
}

/**
 * Reads a module folder into a bundle: the files `moduleFiles` selects, packed as one msgpack
 * map, their content hash, and the signature from `module.sig`. The files are read once and
 * hashed from memory, so the hash always describes exactly the bytes shipped.
 *
 * @throws PluginError `EMBOT_ERR_PLUGIN_MANIFEST_INVALID` (no or bad manifest),
 *   `EMBOT_ERR_MODULE_BUNDLE_INVALID` (over the limits, or an unreadable `module.sig`).
 *
 * @example
 * ```ts
 * const m = packModule('plugins/vm-watchdog');
 * reply({ type: 'ModuleBundle', replyTo: req.reqId, ...m });
 * ```
 */
export function packModule(dir: string): PackedModule {
  const rels = moduleFiles(dir);
  if (rels.length > MODULE_BUNDLE_LIMITS.maxFiles) throw invalid(`module ${dir} has ${rels.length} files, more than the ${MODULE_BUNDLE_LIMITS.maxFiles} a bundle may hold`);
  const files = new Map<string, Uint8Array>();
  let total = 0;
  for (const rel of rels) {
    const bytes = readFileSync(join(dir, rel));
    total += bytes.byteLength;
    if (total > MODULE_BUNDLE_LIMITS.maxTotalBytes) throw invalid(`module ${dir} is larger than the ${MODULE_BUNDLE_LIMITS.maxTotalBytes} bytes a bundle may hold`);
    files.set(rel, bytes);
  }
  const { name, version } = manifestIdentity(files, dir);
  const hash = hashModuleFiles(files);
  const signature = readModuleSignature(dir);
  const code = packr.pack(files) as Uint8Array;
  return signature === undefined ? { name, version, hash, code } : { name, version, hash, code, signature };
}

/**
 * The signature in `dir/module.sig`, or undefined when the module is not signed.
 *
 * @throws PluginError `EMBOT_ERR_MODULE_BUNDLE_INVALID` when the file exists but holds no signature.
 */
export function readModuleSignature(dir: string): Uint8Array | undefined {
  const path = join(dir, MODULE_SIGNATURE_FILE);
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw invalid(`cannot read ${path}: ${describeError(e)}`);
  }
  const sig = decodeSignatureFile(text);
  if (sig === undefined) throw invalid(`${path} does not hold a module signature (base64 of 64 bytes); re-sign with \`embot module sign ${dir} --key KEY\``);
  return sig;
}

function manifestIdentity(files: ReadonlyMap<string, Uint8Array>, where: string): { name: string; version: string } {
  const bytes = files.get('manifest.json');
  if (!bytes) throw new PluginError(ErrorCodes.PLUGIN_MANIFEST_INVALID, `module ${where} has no manifest.json`);
  let raw: unknown;
  try {
    raw = JSON.parse(Buffer.from(bytes).toString('utf8'));
  } catch (e) {
    throw new PluginError(ErrorCodes.PLUGIN_MANIFEST_INVALID, `manifest.json of ${where} is not valid JSON: ${describeError(e)}`);
  }
  const parsed = ManifestSchema.safeParse(raw);
  if (!parsed.success) {
    const issues = parsed.error.issues.map((i) => `${i.path.length === 0 ? '(root)' : i.path.map(String).join('.')}: ${i.message}`);
    throw new PluginError(ErrorCodes.PLUGIN_MANIFEST_INVALID, `manifest.json of ${where} is invalid: ${issues.join('; ')}`);
  }
  return { name: parsed.data.name, version: parsed.data.version };
}

/**
 * Decodes a received bundle into its file map, defensively: the bundle must be the module that
 * was asked for, decode to a map of path → bytes within the limits with safe paths, and its
 * content must hash to the announced hash. Writes nothing.
 *
 * @throws PluginError `EMBOT_ERR_MODULE_BUNDLE_INVALID` (wrong module, not a file map, bad path,
 *   over the limits) or `EMBOT_ERR_MODULE_HASH_MISMATCH` (content differs from the announced hash).
 *
 * @example
 * ```ts
 * const files = unpackModule(frame, { name: 'vm-watchdog', hash: announcedHash });
 * ```
 */
export function unpackModule(bundle: ReceivedBundle, expected: ExpectedModule): ReadonlyMap<string, Uint8Array> {
  assertIdentity(bundle, expected);
  const code = bundle.code;
  if (!(code instanceof Uint8Array) || code.byteLength === 0) throw invalid(`module bundle ${bundle.name}: code is empty or not binary`);
  const maxCode = MODULE_BUNDLE_LIMITS.maxTotalBytes + MODULE_BUNDLE_LIMITS.maxFiles * PER_FILE_OVERHEAD;
  if (code.byteLength > maxCode) throw invalid(`module bundle ${bundle.name}: ${code.byteLength} bytes of code, more than ${maxCode}`);

  let value: unknown;
  let end = 0;
  try {
    // unpackMultiple stops after the first value, so trailing bytes are counted, not dumped.
    unpackr.unpackMultiple(code, (v: unknown, _start?: number, stop?: number) => {
      value = v;
      end = stop ?? 0;
      return false;
    });
  } catch (e) {
    throw invalid(`module bundle ${bundle.name}: code is not valid msgpack (${describeError(e).slice(0, 200)})`);
  }
  if (end !== code.byteLength) throw invalid(`module bundle ${bundle.name}: ${code.byteLength - end} trailing bytes after the file map`);
  if (!(value instanceof Map)) throw invalid(`module bundle ${bundle.name}: code must be a map of path → bytes`);
  if (value.size > MODULE_BUNDLE_LIMITS.maxFiles) throw invalid(`module bundle ${bundle.name}: ${value.size} files, more than ${MODULE_BUNDLE_LIMITS.maxFiles}`);

  const files = new Map<string, Uint8Array>();
  for (const [rel, bytes] of value as Map<unknown, unknown>) {
    if (typeof rel !== 'string') throw invalid(`module bundle ${bundle.name}: a file path is not a string`);
    if (!(bytes instanceof Uint8Array)) throw invalid(`module bundle ${bundle.name}: content of ${JSON.stringify(rel.slice(0, 200))} is not binary`);
    files.set(rel, bytes);
  }
  try {
    assertValidFileMap(files);
  } catch (e) {
    if (e instanceof PluginError) throw invalid(`${bundle.name}: ${e.message}`, e.details === undefined ? undefined : { ...e.details });
    throw e;
  }
  const actual = hashModuleFiles(files);
  if (actual !== expected.hash) {
    throw new PluginError(ErrorCodes.MODULE_HASH_MISMATCH, `module ${bundle.name}@${bundle.version}: content hashes to ${actual}, but ${expected.hash} was announced`, {
      details: { name: bundle.name, expected: expected.hash, actual },
    });
  }
  return files;
}

function assertIdentity(bundle: ReceivedBundle, expected: ExpectedModule): void {
  if (bundle.name !== expected.name) throw invalid(`asked for module ${expected.name}, the peer sent ${String(bundle.name).slice(0, 100)}`);
  if (expected.version !== undefined && bundle.version !== expected.version) {
    throw invalid(`asked for module ${expected.name}@${expected.version}, the peer sent version ${String(bundle.version).slice(0, 100)}`);
  }
  if (bundle.hash !== expected.hash) {
    throw new PluginError(ErrorCodes.MODULE_HASH_MISMATCH, `module ${expected.name}: the bundle claims hash ${String(bundle.hash).slice(0, 100)}, but ${expected.hash} was announced`, {
      details: { name: expected.name, expected: expected.hash, actual: String(bundle.hash).slice(0, 100) },
    });
  }
}

/**
 * The target's whole intake of one shipped module: identity, trust (before a byte of it is
 * decoded), content hash, then an atomic install into the plugin cache. Any failure throws and
 * leaves the cache as it was; the mobility service answers it with `ManagedObjectInstantiationError`.
 *
 * @throws PluginError `EMBOT_ERR_MODULE_UNTRUSTED`, `EMBOT_ERR_MODULE_HASH_MISMATCH`,
 *   `EMBOT_ERR_MODULE_BUNDLE_INVALID`, or the catalogue's manifest codes from the cache.
 *
 * @example
 * ```ts
 * const installed = acceptModuleBundle(frame, { name, version, hash }, { trust, cache });
 * await runtime.load(installed.entryPath);
 * ```
 */
export function acceptModuleBundle(bundle: ReceivedBundle, expected: ExpectedModule, deps: { readonly trust: TrustPolicy; readonly cache: PluginCache }): CachedModule {
  assertIdentity(bundle, expected);
  const decision = deps.trust.check(bundle.signature === undefined ? { name: bundle.name, version: bundle.version, hash: bundle.hash } : bundle);
  if (!decision.trusted) throw new PluginError(ErrorCodes.MODULE_UNTRUSTED, decision.reason, { details: { name: bundle.name, version: bundle.version, hash: bundle.hash } });
  const files = unpackModule(bundle, expected);
  const meta = { name: bundle.name, version: bundle.version, hash: bundle.hash };
  return deps.cache.install(files, bundle.signature === undefined ? meta : { ...meta, signature: bundle.signature });
}
