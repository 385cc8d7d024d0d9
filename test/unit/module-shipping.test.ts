import { Packr, Unpackr } from 'msgpackr';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { ErrorCodes, isEmbotError, type ErrorCode } from '../../core/errors.ts';
import { acceptModuleBundle, MODULE_BUNDLE_LIMITS, packModule, unpackModule, type ReceivedBundle } from '../../core/mobility/module-shipping.ts';
import { PluginCache } from '../../core/mobility/plugin-cache.ts';
import { createTrustPolicy, encodeSignatureFile, generateSigningKeys, parsePrivateKey, signModule } from '../../core/mobility/trust-policy.ts';
import { checkModuleDir } from '../../core/plugins/catalogue.ts';
import { hashModuleDir, hashModuleFiles, moduleFiles } from '../../core/plugins/content-hash.ts';

const API = 1;
const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const c of cleanups.splice(0).reverse()) c();
});

function tmp(prefix = 'embot-ship-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function manifest(extra: Record<string, unknown> = {}): string {
  return JSON.stringify({ name: 'demo-mod', version: '1.0.0', embotApi: API, entry: 'src/index.mjs', embots: [{ type: 'demo', attachTo: { kind: 'vm' }, policies: ['p'] }], ...extra });
}

function writeModule(root: string, files: Record<string, string> = {}): string {
  const dir = join(root, 'demo-mod');
  const all: Record<string, string> = { 'manifest.json': manifest(), 'src/index.mjs': 'export default { policies: {} };\n', 'README.md': '# demo\n', ...files };
  for (const [rel, content] of Object.entries(all)) {
    mkdirSync(join(dir, rel, '..'), { recursive: true });
    writeFileSync(join(dir, rel), content);
  }
  return dir;
}

const packr = new Packr({ useRecords: false });
const enc = (s: string): Uint8Array => new Uint8Array(Buffer.from(s));

/** A bundle whose code is `map`, announced with the hash of `map` unless told otherwise. */
function bundleOf(map: Map<unknown, unknown>, hash?: string): ReceivedBundle {
  const files = new Map([...map].filter(([k, v]) => typeof k === 'string' && v instanceof Uint8Array) as [string, Uint8Array][]);
  return { name: 'demo-mod', version: '1.0.0', hash: hash ?? hashModuleFiles(files), code: packr.pack(map) };
}

function validFiles(): Map<string, Uint8Array> {
  return new Map([
    ['manifest.json', enc(manifest())],
    ['src/index.mjs', enc('export default {};\n')],
  ]);
}

function codeOf(f: () => unknown): ErrorCode {
  try {
    f();
  } catch (e) {
    if (!isEmbotError(e)) throw e;
    return e.code;
  }
  throw new Error('expected an EmbotError');
}

function cacheEntries(cache: PluginCache): string[] {
  return existsSync(cache.dir) ? readdirSync(cache.dir) : [];
}

describe('hashModuleFiles', () => {
  it('equals hashModuleDir for the same content, whatever the map order, and skips module.sig in folders', () => {
    const dir = writeModule(tmp());
    const forward = new Map(moduleFiles(dir).map((rel) => [rel, new Uint8Array(readFileSync(join(dir, rel)))]));
    const backward = new Map([...forward].reverse());
    expect(hashModuleFiles(forward)).toBe(hashModuleDir(dir));
    expect(hashModuleFiles(backward)).toBe(hashModuleDir(dir));
    const before = hashModuleDir(dir);
    writeFileSync(join(dir, 'module.sig'), 'whatever');
    writeFileSync(join(dir, 'src', 'module.sig'), 'nested: real content');
    expect(moduleFiles(dir)).toEqual(['README.md', 'manifest.json', 'src/index.mjs', 'src/module.sig']);
    expect(hashModuleDir(dir)).not.toBe(before);
    rmSync(join(dir, 'src', 'module.sig'));
    expect(hashModuleDir(dir)).toBe(before);
  });
});

describe('packModule', () => {
  it('packs the moduleFiles selection as a msgpack map, with its hash and the signature from module.sig', () => {
    const dir = writeModule(tmp());
    const unsigned = packModule(dir);
    expect(unsigned).toMatchObject({ name: 'demo-mod', version: '1.0.0', hash: hashModuleDir(dir) });
    expect(unsigned.signature).toBeUndefined();
    const decoded = new Unpackr({ mapsAsObjects: false }).unpack(unsigned.code) as Map<string, Uint8Array>;
    expect([...decoded.keys()].sort()).toEqual(moduleFiles(dir));
    expect(Buffer.from(decoded.get('src/index.mjs')!).toString()).toBe('export default { policies: {} };\n');

    const sig = new Uint8Array(64).fill(7);
    writeFileSync(join(dir, 'module.sig'), encodeSignatureFile(sig));
    const signed = packModule(dir);
    expect(signed.signature).toEqual(sig);
    expect(signed.hash).toBe(unsigned.hash);
    expect(Buffer.from(signed.code).equals(Buffer.from(unsigned.code))).toBe(true);
  });

  it('refuses a broken module.sig, a missing manifest and too many files', () => {
    const root = tmp();
    const dir = writeModule(root);
    writeFileSync(join(dir, 'module.sig'), 'not a signature');
    expect(codeOf(() => packModule(dir))).toBe(ErrorCodes.MODULE_BUNDLE_INVALID);
    rmSync(join(dir, 'module.sig'));
    rmSync(join(dir, 'manifest.json'));
    expect(codeOf(() => packModule(dir))).toBe(ErrorCodes.PLUGIN_MANIFEST_INVALID);

    const many = writeModule(join(root, 'many'));
    mkdirSync(join(many, 'gen'));
    for (let i = 0; i < MODULE_BUNDLE_LIMITS.maxFiles; i++) writeFileSync(join(many, 'gen', `f${i}.txt`), '');
    expect(codeOf(() => packModule(many))).toBe(ErrorCodes.MODULE_BUNDLE_INVALID);
  });
});

describe('pack → unpack → install round trip', () => {
  it('yields a loadable module with the same hash and keeps the signature', () => {
    const root = tmp();
    const dir = writeModule(root, { 'src/lib/util.mjs': 'export const one = 1;\n' });
    const sig = new Uint8Array(64).fill(9);
    writeFileSync(join(dir, 'module.sig'), encodeSignatureFile(sig));
    const packed = packModule(dir);

    const files = unpackModule(packed, { name: 'demo-mod', hash: packed.hash, version: '1.0.0' });
    expect([...files.keys()].sort()).toEqual(moduleFiles(dir));
    const cache = new PluginCache(join(root, 'cache'), { apiVersion: API });
    const installed = cache.install(files, packed);

    expect(installed.dir).toBe(join(cache.dir, `demo-mod@1.0.0-${packed.hash.slice(0, 12)}`));
    expect(installed.entryPath).toBe(join(installed.dir, 'src', 'index.mjs'));
    const check = checkModuleDir(installed.dir, API);
    expect(check.ok && check.record.hash).toBe(packed.hash);
    expect(hashModuleDir(installed.dir)).toBe(hashModuleDir(dir));
    expect(readFileSync(join(installed.dir, 'module.sig'), 'utf8')).toBe(encodeSignatureFile(sig));
    // Shipping it on from the cache sends the same bundle.
    const reshipped = packModule(installed.dir);
    expect({ ...reshipped, code: Buffer.from(reshipped.code).toString('hex') }).toEqual({ ...packed, code: Buffer.from(packed.code).toString('hex') });

    expect(cache.has(packed.hash)).toBe(true);
    expect(cache.get('demo-mod', packed.hash)).toEqual(installed);
    expect(cache.get('other', packed.hash)).toBeUndefined();
    expect(cache.has('0'.repeat(64))).toBe(false);
    expect(cache.list()).toEqual([installed]);

    // Idempotent: same folder, nothing else created.
    expect(cache.install(files, packed)).toEqual(installed);
    expect(cacheEntries(cache)).toEqual([`demo-mod@1.0.0-${packed.hash.slice(0, 12)}`]);

    expect(cache.remove('demo-mod', packed.hash)).toBe(true);
    expect(cache.has(packed.hash)).toBe(false);
    expect(cache.remove('demo-mod', packed.hash)).toBe(false);
    expect(cacheEntries(cache)).toEqual([]);
  });

  it('acceptModuleBundle installs a module signed with a trusted key', () => {
    const root = tmp();
    const dir = writeModule(root);
    const keys = generateSigningKeys();
    const id = packModule(dir);
    writeFileSync(join(dir, 'module.sig'), encodeSignatureFile(signModule(id, parsePrivateKey(keys.privatePem))));
    const bundle = packModule(dir);
    const cache = new PluginCache(join(root, 'cache'), { apiVersion: API });
    const trust = createTrustPolicy({ publicKeys: [keys.publicPem] });
    const installed = acceptModuleBundle(bundle, { name: 'demo-mod', version: '1.0.0', hash: id.hash }, { trust, cache });
    expect(installed.hash).toBe(id.hash);
    expect(cache.get('demo-mod', id.hash)).toEqual(installed);
  });

  it('replaces a cached copy that was altered on disk, and ignores it until then', () => {
    const root = tmp();
    const packed = packModule(writeModule(root));
    const cache = new PluginCache(join(root, 'cache'), { apiVersion: API });
    const files = unpackModule(packed, packed);
    const installed = cache.install(files, packed);
    writeFileSync(join(installed.dir, 'src', 'index.mjs'), 'export default { evil: true };\n');
    expect(cache.has(packed.hash)).toBe(false);
    expect(cache.get('demo-mod', packed.hash)).toBeUndefined();
    const again = cache.install(files, packed);
    expect(again.dir).toBe(installed.dir);
    expect(hashModuleDir(again.dir)).toBe(packed.hash);
    expect(cacheEntries(cache)).toEqual([`demo-mod@1.0.0-${packed.hash.slice(0, 12)}`]);
  });

  it('sweeps work folders a crashed install left behind', () => {
    const root = tmp();
    mkdirSync(join(root, 'cache', '.tmp-abc', 'src'), { recursive: true });
    mkdirSync(join(root, 'cache', '.trash-def'), { recursive: true });
    const cache = new PluginCache(join(root, 'cache'));
    expect(cacheEntries(cache)).toEqual([]);
  });
});

describe('bad bundles', () => {
  const traversal: [string, string][] = [
    ['parent segment', '../evil.mjs'],
    ['nested parent segment', 'src/../../evil.mjs'],
    ['absolute', '/etc/evil'],
    ['drive letter', 'C:/evil'],
    ['backslash', 'src\\..\\evil'],
    ['empty segment', 'src//x.mjs'],
    ['dot segment', './x.mjs'],
    ['dot-file', 'src/.hidden'],
    ['node_modules', 'node_modules/x/index.js'],
    ['root module.sig', 'module.sig'],
    ['control character', 'src/a\nb.mjs'],
    ['empty path', ''],
    ['very long path', `${'a/'.repeat(600)}x`],
  ];

  it.each(traversal)('refuses a path with %s as MODULE_BUNDLE_INVALID and writes nothing', (_label, path) => {
    const root = tmp();
    const cache = new PluginCache(join(root, 'cache'), { apiVersion: API });
    const map = validFiles();
    map.set(path, enc('x'));
    const bundle = bundleOf(map);
    expect(codeOf(() => unpackModule(bundle, bundle))).toBe(ErrorCodes.MODULE_BUNDLE_INVALID);
    expect(codeOf(() => cache.install(map, bundle))).toBe(ErrorCodes.MODULE_BUNDLE_INVALID);
    expect(existsSync(join(root, 'evil.mjs'))).toBe(false);
    expect(cacheEntries(cache)).toEqual([]);
  });

  it('refuses a path that is both a file and a folder', () => {
    const map = validFiles();
    map.set('src', enc('file'));
    const bundle = bundleOf(map);
    expect(codeOf(() => unpackModule(bundle, bundle))).toBe(ErrorCodes.MODULE_BUNDLE_INVALID);
  });

  it.each([
    ['garbage bytes', new Uint8Array([0xc1, 0xff, 0x00, 0x13])],
    ['truncated msgpack', packr.pack(validFiles()).subarray(0, 20)],
    ['trailing bytes', Buffer.concat([packr.pack(validFiles()), Buffer.from([0x01])])],
    ['an array', packr.pack([['manifest.json', enc('{}')]])],
    ['a string', packr.pack('hello')],
    ['empty code', new Uint8Array(0)],
    ['an empty map', packr.pack(new Map())],
    ['a number key', packr.pack(new Map<unknown, unknown>([[1, enc('x')]]))],
    ['a string value', packr.pack(new Map([['manifest.json', '{}']]))],
  ])('refuses code that is %s as MODULE_BUNDLE_INVALID', (_label, code) => {
    const bundle: ReceivedBundle = { name: 'demo-mod', version: '1.0.0', hash: hashModuleFiles(validFiles()), code };
    expect(codeOf(() => unpackModule(bundle, bundle))).toBe(ErrorCodes.MODULE_BUNDLE_INVALID);
  });

  it('does not let a __proto__ file name reach an object', () => {
    const map = validFiles();
    map.set('__proto__', enc('x'));
    const bundle = bundleOf(map);
    const files = unpackModule(bundle, bundle);
    expect(Buffer.from(files.get('__proto__')!).toString()).toBe('x');
    expect(Object.getPrototypeOf({})).toBe(Object.prototype);
  });

  it('refuses too many files and oversize content', () => {
    const many = validFiles();
    for (let i = 0; i < MODULE_BUNDLE_LIMITS.maxFiles; i++) many.set(`gen/f${i}`, new Uint8Array(0));
    const manyBundle = bundleOf(many);
    expect(codeOf(() => unpackModule(manyBundle, manyBundle))).toBe(ErrorCodes.MODULE_BUNDLE_INVALID);

    const big = validFiles();
    big.set('blob/a.bin', new Uint8Array(MODULE_BUNDLE_LIMITS.maxTotalBytes / 2));
    big.set('blob/b.bin', new Uint8Array(MODULE_BUNDLE_LIMITS.maxTotalBytes / 2));
    const bigBundle = bundleOf(big);
    expect(codeOf(() => unpackModule(bigBundle, bigBundle))).toBe(ErrorCodes.MODULE_BUNDLE_INVALID);

    const huge: ReceivedBundle = { ...bigBundle, code: new Uint8Array(MODULE_BUNDLE_LIMITS.maxTotalBytes * 2) };
    expect(codeOf(() => unpackModule(huge, huge))).toBe(ErrorCodes.MODULE_BUNDLE_INVALID);
  });

  it('refuses a bundle for another module or version than was asked for', () => {
    const bundle = bundleOf(validFiles());
    expect(codeOf(() => unpackModule(bundle, { name: 'other-mod', hash: bundle.hash }))).toBe(ErrorCodes.MODULE_BUNDLE_INVALID);
    expect(codeOf(() => unpackModule(bundle, { name: 'demo-mod', hash: bundle.hash, version: '2.0.0' }))).toBe(ErrorCodes.MODULE_BUNDLE_INVALID);
  });

  it('a tampered file or a different announced hash is MODULE_HASH_MISMATCH', () => {
    const root = tmp();
    const packed = packModule(writeModule(root));
    const files = new Unpackr({ mapsAsObjects: false }).unpack(packed.code) as Map<string, Uint8Array>;
    files.set('src/index.mjs', enc('export default { evil: true };\n'));
    const tampered: ReceivedBundle = { ...packed, code: packr.pack(files) };
    expect(codeOf(() => unpackModule(tampered, packed))).toBe(ErrorCodes.MODULE_HASH_MISMATCH);
    // The bundle itself claims another hash than StartMigration announced.
    expect(codeOf(() => unpackModule(packed, { name: 'demo-mod', hash: 'c'.repeat(64) }))).toBe(ErrorCodes.MODULE_HASH_MISMATCH);
    // install re-checks the hash of what it is given.
    const cache = new PluginCache(join(root, 'cache'), { apiVersion: API });
    expect(codeOf(() => cache.install(files, packed))).toBe(ErrorCodes.MODULE_HASH_MISMATCH);
    expect(cacheEntries(cache)).toEqual([]);
  });
});

describe('acceptModuleBundle refusals leave nothing in the cache', () => {
  const keys = generateSigningKeys();
  const otherKeys = generateSigningKeys();

  function setup(sign?: 'good' | 'wrong-key' | 'garbage'): { bundle: ReceivedBundle; hash: string; cache: PluginCache } {
    const root = tmp();
    const dir = writeModule(root);
    const id = packModule(dir);
    if (sign === 'good') writeFileSync(join(dir, 'module.sig'), encodeSignatureFile(signModule(id, parsePrivateKey(keys.privatePem))));
    if (sign === 'wrong-key') writeFileSync(join(dir, 'module.sig'), encodeSignatureFile(signModule(id, parsePrivateKey(otherKeys.privatePem))));
    if (sign === 'garbage') writeFileSync(join(dir, 'module.sig'), encodeSignatureFile(new Uint8Array(64).fill(1)));
    return { bundle: packModule(dir), hash: id.hash, cache: new PluginCache(join(root, 'cache'), { apiVersion: API }) };
  }

  it.each([
    ['unsigned module in signed mode', undefined, { publicKeys: [keys.publicPem] }],
    ['signature by another key', 'wrong-key' as const, { publicKeys: [keys.publicPem] }],
    ['bad signature', 'garbage' as const, { publicKeys: [keys.publicPem] }],
    ['signed mode without keys', 'good' as const, {}],
    ['allowlist miss', 'good' as const, { mode: 'allowlist' as const, allowHashes: ['d'.repeat(64)] }],
  ])('%s → MODULE_UNTRUSTED', (_label, sign, config) => {
    const { bundle, hash, cache } = setup(sign);
    const trust = createTrustPolicy(config);
    expect(codeOf(() => acceptModuleBundle(bundle, { name: 'demo-mod', hash }, { trust, cache }))).toBe(ErrorCodes.MODULE_UNTRUSTED);
    expect(cacheEntries(cache)).toEqual([]);
    expect(cache.has(hash)).toBe(false);
  });

  it('allowlist hit installs', () => {
    const { bundle, hash, cache } = setup();
    const trust = createTrustPolicy({ mode: 'allowlist', allowHashes: [hash] });
    expect(acceptModuleBundle(bundle, { name: 'demo-mod', hash }, { trust, cache }).hash).toBe(hash);
    expect(cache.has(hash)).toBe(true);
  });

  it('a validly signed but tampered bundle → MODULE_HASH_MISMATCH', () => {
    const { bundle, hash, cache } = setup('good');
    const files = new Unpackr({ mapsAsObjects: false }).unpack(bundle.code) as Map<string, Uint8Array>;
    files.set('README.md', enc('changed'));
    const trust = createTrustPolicy({ publicKeys: [keys.publicPem] });
    expect(codeOf(() => acceptModuleBundle({ ...bundle, code: packr.pack(files) }, { name: 'demo-mod', hash }, { trust, cache }))).toBe(ErrorCodes.MODULE_HASH_MISMATCH);
    expect(cacheEntries(cache)).toEqual([]);
  });

  it.each([
    ['a manifest for another API version', { 'manifest.json': manifest({ embotApi: 99 }) }, ErrorCodes.PLUGIN_API_MISMATCH],
    ['an invalid manifest', { 'manifest.json': '{"name": 1}' }, ErrorCodes.PLUGIN_MANIFEST_INVALID],
    ['a missing entry file', { 'manifest.json': manifest({ entry: 'src/missing.mjs' }) }, ErrorCodes.PLUGIN_LOAD_FAILED],
    ['a manifest naming another module', { 'manifest.json': manifest({ name: 'other-mod' }) }, ErrorCodes.MODULE_BUNDLE_INVALID],
    ['no manifest', { 'manifest.json': undefined }, ErrorCodes.PLUGIN_MANIFEST_INVALID],
  ])('a bundle with %s is refused by the cache and leaves nothing', (_label, overrides, code) => {
    const root = tmp();
    const files = validFiles();
    for (const [rel, content] of Object.entries(overrides)) {
      if (content === undefined) files.delete(rel);
      else files.set(rel, enc(content));
    }
    const bundle = bundleOf(files);
    const cache = new PluginCache(join(root, 'cache'), { apiVersion: API });
    const trust = createTrustPolicy({ mode: 'any-authenticated-peer' });
    expect(codeOf(() => acceptModuleBundle(bundle, { name: 'demo-mod', hash: bundle.hash }, { trust, cache }))).toBe(code);
    expect(cacheEntries(cache)).toEqual([]);
  });

  it('refuses install metadata that could escape the cache folder', () => {
    const root = tmp();
    const cache = new PluginCache(join(root, 'cache'), { apiVersion: API });
    const files = validFiles();
    const hash = hashModuleFiles(files);
    expect(codeOf(() => cache.install(files, { name: 'demo-mod', version: '../../x', hash }))).toBe(ErrorCodes.MODULE_BUNDLE_INVALID);
    expect(codeOf(() => cache.install(files, { name: '../demo', version: '1.0.0', hash }))).toBe(ErrorCodes.MODULE_BUNDLE_INVALID);
    expect(codeOf(() => cache.install(files, { name: 'demo-mod', version: '1.0.0', hash: 'x' }))).toBe(ErrorCodes.MODULE_BUNDLE_INVALID);
    expect(readdirSync(root)).toEqual([]);
  });
});
