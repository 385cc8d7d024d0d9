import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { EMBOT_API_VERSION } from '../../embots/index.ts';
import { describeError, ErrorCodes, PluginError } from '../errors.ts';
import { checkModuleDir } from '../plugins/catalogue.ts';
import { hashModuleFiles, MODULE_SIGNATURE_FILE } from '../plugins/content-hash.ts';
import { assertValidFileMap } from './module-bundle-rules.ts';
import { encodeSignatureFile } from './trust-policy.ts';

/** A module installed in the cache, validated like a plugins-folder module. */
export interface CachedModule {
  readonly name: string;
  readonly version: string;
  readonly hash: string;
  /** Absolute path of the module's folder in the cache. */
  readonly dir: string;
  /** Absolute path of its entry file. */
  readonly entryPath: string;
}

export interface InstallMeta {
  readonly name: string;
  readonly version: string;
  readonly hash: string;
  /** Kept as `module.sig` so the module can be shipped on, still signed. */
  readonly signature?: Uint8Array;
}

export interface PluginCacheOptions {
  /** Plugin API version of this agent (default EMBOT_API_VERSION); a module written for another is refused. */
  readonly apiVersion?: number;
}

const NAME = /^[a-z][a-z0-9-]{0,63}$/;
const VERSION = /^\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.-]+)?$/;
const HASH = /^[0-9a-f]{64}$/;
/** Work folders start with a dot so nothing that scans the cache for modules ever sees them. */
const TEMP_PREFIX = '.tmp-';
const TRASH_PREFIX = '.trash-';

/**
 * Modules received from peers, one folder each, `<dir>/<name>@<version>-<hash12>/`. A module is
 * written to a temporary folder, validated there (manifest rules of the catalogue, plugin API,
 * entry file, content hash re-read from disk) and only then renamed into place, so a reader
 * never sees half a module and a failed install leaves nothing behind. Lookups re-hash the
 * folder, so a module altered in the cache is not used.
 *
 * @example
 * ```ts
 * const cache = new PluginCache('./data/plugin-cache');
 * const m = cache.get('vm-watchdog', hash) ?? cache.install(files, { name: 'vm-watchdog', version: '1.0.0', hash });
 * ```
 */
export class PluginCache {
  /** Absolute path of the cache folder. */
  readonly dir: string;
  private readonly apiVersion: number;

  constructor(dir: string, opts: PluginCacheOptions = {}) {
    this.dir = resolve(dir);
    this.apiVersion = opts.apiVersion ?? EMBOT_API_VERSION;
    this.sweep();
  }

  /**
   * Installs a module from its file map; a module already cached intact is returned as is.
   *
   * @throws PluginError `EMBOT_ERR_MODULE_BUNDLE_INVALID` (bad name/version/hash, bad paths,
   *   over the limits, manifest naming another module), `EMBOT_ERR_MODULE_HASH_MISMATCH`, the
   *   catalogue's codes (`EMBOT_ERR_PLUGIN_MANIFEST_INVALID`, `EMBOT_ERR_PLUGIN_API_MISMATCH`,
   *   `EMBOT_ERR_PLUGIN_LOAD_FAILED`), or `EMBOT_ERR_PLUGIN_LOAD_FAILED` when the disk fails.
   */
  install(files: ReadonlyMap<string, Uint8Array>, meta: InstallMeta): CachedModule {
    assertMeta(meta);
    assertValidFileMap(files);
    const inMemory = hashModuleFiles(files);
    if (inMemory !== meta.hash) {
      throw new PluginError(ErrorCodes.MODULE_HASH_MISMATCH, `module ${meta.name}@${meta.version}: content hashes to ${inMemory}, not ${meta.hash}`);
    }
    const existing = this.get(meta.name, meta.hash);
    if (existing) return existing;

    const finalDir = join(this.dir, folderName(meta));
    let temp: string | undefined;
    try {
      mkdirSync(this.dir, { recursive: true });
      temp = mkdtempSync(join(this.dir, TEMP_PREFIX));
      for (const [rel, bytes] of files) {
        const path = join(temp, ...rel.split('/'));
        mkdirSync(dirname(path), { recursive: true });
        writeFileSync(path, bytes, { flag: 'wx', mode: 0o644 });
      }
      if (meta.signature !== undefined) writeFileSync(join(temp, MODULE_SIGNATURE_FILE), encodeSignatureFile(meta.signature), { flag: 'wx', mode: 0o644 });
      const entryRel = this.validate(temp, meta);
      this.moveIntoPlace(temp, finalDir);
      temp = undefined;
      return Object.freeze({ name: meta.name, version: meta.version, hash: meta.hash, dir: finalDir, entryPath: resolve(finalDir, entryRel) });
    } catch (e) {
      if (e instanceof PluginError) throw e;
      throw new PluginError(ErrorCodes.PLUGIN_LOAD_FAILED, `cannot install module ${meta.name}@${meta.version} into ${this.dir}: ${describeError(e)}`, { cause: e });
    } finally {
      if (temp !== undefined) rmSync(temp, { recursive: true, force: true });
    }
  }

  /** Whether an intact module with this content hash is cached. */
  has(hash: string): boolean {
    if (!HASH.test(hash)) return false;
    return this.folders().some((f) => f.endsWith(`-${hash.slice(0, 12)}`) && this.intact(join(this.dir, f), undefined, hash) !== undefined);
  }

  /** The cached module `name` with this content hash, if present and intact. */
  get(name: string, hash: string): CachedModule | undefined {
    if (!NAME.test(name) || !HASH.test(hash)) return undefined;
    for (const f of this.folders()) {
      if (!f.startsWith(`${name}@`) || !f.endsWith(`-${hash.slice(0, 12)}`)) continue;
      const m = this.intact(join(this.dir, f), name, hash);
      if (m) return m;
    }
    return undefined;
  }

  /** Every intact cached module, by folder name. */
  list(): readonly CachedModule[] {
    const out: CachedModule[] = [];
    for (const f of this.folders()) {
      const m = this.intact(join(this.dir, f), undefined, undefined);
      if (m) out.push(m);
    }
    return out;
  }

  /** Deletes every cached folder of `name` with this hash (intact or not); true when one was there. */
  remove(name: string, hash: string): boolean {
    if (!NAME.test(name) || !HASH.test(hash)) return false;
    let removed = false;
    for (const f of this.folders()) {
      if (!f.startsWith(`${name}@`) || !f.endsWith(`-${hash.slice(0, 12)}`)) continue;
      rmSync(join(this.dir, f), { recursive: true, force: true });
      removed = true;
    }
    return removed;
  }

  /** Removes work folders a crashed install left behind. */
  sweep(): void {
    let names: string[];
    try {
      names = readdirSync(this.dir);
    } catch {
      return;
    }
    for (const n of names) if (n.startsWith(TEMP_PREFIX) || n.startsWith(TRASH_PREFIX)) rmSync(join(this.dir, n), { recursive: true, force: true });
  }

  /** Returns the entry path relative to the folder, or throws why the folder is not this module. */
  private validate(dir: string, meta: InstallMeta): string {
    const c = checkModuleDir(dir, this.apiVersion);
    if (!c.ok) {
      // The message names the temporary folder, which is gone by the time anyone reads it.
      const message = c.problem.error.message.split(dir).join(`${meta.name}@${meta.version}`);
      throw new PluginError(c.problem.error.code, `shipped module ${message}`);
    }
    const r = c.record;
    if (r.name !== meta.name || r.version !== meta.version) {
      throw new PluginError(ErrorCodes.MODULE_BUNDLE_INVALID, `module announced as ${meta.name}@${meta.version} has a manifest for ${r.name}@${r.version}`);
    }
    if (r.hash !== meta.hash) {
      throw new PluginError(ErrorCodes.MODULE_HASH_MISMATCH, `module ${meta.name}@${meta.version} hashes to ${r.hash} on disk, not ${meta.hash}`);
    }
    return r.manifest.entry;
  }

  private moveIntoPlace(temp: string, finalDir: string): void {
    try {
      renameSync(temp, finalDir);
      return;
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code !== 'ENOTEMPTY' && code !== 'EEXIST') throw e;
    }
    // A folder of that name is there but was not intact (get() passed it over): swap it out.
    const trash = join(this.dir, `${TRASH_PREFIX}${randomBytes(6).toString('hex')}`);
    renameSync(finalDir, trash);
    renameSync(temp, finalDir);
    rmSync(trash, { recursive: true, force: true });
  }

  private folders(): string[] {
    try {
      return readdirSync(this.dir, { withFileTypes: true })
        .filter((e) => e.isDirectory() && !e.name.startsWith('.'))
        .map((e) => e.name)
        .sort();
    } catch {
      return [];
    }
  }

  private intact(dir: string, name: string | undefined, hash: string | undefined): CachedModule | undefined {
    const c = checkModuleDir(dir, this.apiVersion);
    if (!c.ok) return undefined;
    const r = c.record;
    if ((name !== undefined && r.name !== name) || (hash !== undefined && r.hash !== hash)) return undefined;
    if (!dir.endsWith(`${folderName(r)}`)) return undefined;
    return Object.freeze({ name: r.name, version: r.version, hash: r.hash, dir: r.dir, entryPath: r.entryPath });
  }
}

function folderName(m: { readonly name: string; readonly version: string; readonly hash: string }): string {
  return `${m.name}@${m.version}-${m.hash.slice(0, 12)}`;
}

function assertMeta(meta: InstallMeta): void {
  if (typeof meta.name !== 'string' || !NAME.test(meta.name)) throw new PluginError(ErrorCodes.MODULE_BUNDLE_INVALID, `module name ${JSON.stringify(String(meta.name).slice(0, 100))} is not valid`);
  if (typeof meta.version !== 'string' || !VERSION.test(meta.version)) {
    throw new PluginError(ErrorCodes.MODULE_BUNDLE_INVALID, `module ${meta.name}: version ${JSON.stringify(String(meta.version).slice(0, 100))} is not semver`);
  }
  if (typeof meta.hash !== 'string' || !HASH.test(meta.hash)) {
    throw new PluginError(ErrorCodes.MODULE_BUNDLE_INVALID, `module ${meta.name}: hash ${JSON.stringify(String(meta.hash).slice(0, 100))} is not a sha256 hex digest`);
  }
}
