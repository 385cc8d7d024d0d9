import { cpSync, mkdirSync, mkdtempSync, renameSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { ErrorCodes, isEmbotError } from '../../core/errors.ts';
import {
  hashModuleDir,
  isValidRange,
  ModuleCatalogue,
  PluginStatusStore,
  satisfies,
  type ModuleProblem,
  type ModuleRecord,
} from '../../core/plugins/index.ts';
import { Store } from '../../core/store/store.ts';

const API = 1;
const cleanups: (() => unknown)[] = [];

afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

function tmp(prefix = 'embot-plugins-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function manifest(name: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    name,
    version: '1.0.0',
    embotApi: API,
    entry: 'index.mjs',
    embots: [{ type: `${name}-bot`, attachTo: { kind: 'vm' }, policies: ['main'] }],
    ...extra,
  };
}

/** Writes a module folder `root/folder` with a manifest and its entry file. */
function writeModule(root: string, folder: string, m: Record<string, unknown> | string, files: Record<string, string> = { 'index.mjs': 'export default {}\n' }): string {
  const dir = join(root, folder);
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'manifest.json'), typeof m === 'string' ? m : JSON.stringify(m, null, 2));
  for (const [rel, content] of Object.entries(files)) {
    mkdirSync(join(dir, rel, '..'), { recursive: true });
    writeFileSync(join(dir, rel), content);
  }
  return dir;
}

function problemFor(problems: readonly ModuleProblem[], folder: string): ModuleProblem {
  const p = problems.find((x) => x.dir.endsWith(`/${folder}`));
  if (!p) throw new Error(`no problem for ${folder}: ${JSON.stringify(problems)}`);
  return p;
}

describe('hashModuleDir', () => {
  it('is deterministic, changes with content and paths, not with mtime, and skips node_modules and dot-files', () => {
    const root = tmp();
    const dir = writeModule(root, 'a', manifest('a'), { 'index.mjs': 'export default 1\n', 'lib/util.mjs': 'x' });
    const h1 = hashModuleDir(dir);
    expect(h1).toMatch(/^[0-9a-f]{64}$/);
    expect(hashModuleDir(dir)).toBe(h1);

    // A copy elsewhere hashes the same: the hash is about content, not location.
    const copy = join(root, 'copy');
    cpSync(dir, copy, { recursive: true });
    expect(hashModuleDir(copy)).toBe(h1);

    utimesSync(join(dir, 'index.mjs'), new Date(2001, 1, 1), new Date(2001, 1, 1));
    expect(hashModuleDir(dir)).toBe(h1);

    mkdirSync(join(dir, 'node_modules', 'dep'), { recursive: true });
    writeFileSync(join(dir, 'node_modules', 'dep', 'index.js'), 'ignored');
    writeFileSync(join(dir, '.index.mjs.swp'), 'editor noise');
    expect(hashModuleDir(dir)).toBe(h1);

    writeFileSync(join(dir, 'index.mjs'), 'export default 2\n');
    const h2 = hashModuleDir(dir);
    expect(h2).not.toBe(h1);

    // Same bytes under another name is different content.
    renameSync(join(dir, 'lib', 'util.mjs'), join(dir, 'lib', 'other.mjs'));
    expect(hashModuleDir(dir)).not.toBe(h2);
  });

  it('does not confuse a file boundary with file content', () => {
    const root = tmp();
    const a = writeModule(root, 'a', '{}', { f: 'ab', g: 'c' });
    const b = writeModule(root, 'b', '{}', { f: 'a', g: 'bc' });
    expect(hashModuleDir(a)).not.toBe(hashModuleDir(b));
  });
});

describe('satisfies', () => {
  it.each([
    ['1.2.3', '1.2.3', true],
    ['1.2.4', '1.2.3', false],
    ['1.2.3', '=1.2.3', true],
    ['1.2.3', '*', true],
    ['0.0.1', '*', true],
    ['1.2.3', '^1.2.3', true],
    ['1.9.0', '^1.2.3', true],
    ['1.2.2', '^1.2.3', false],
    ['2.0.0', '^1.2.3', false],
    ['0.2.9', '^0.2.3', true],
    ['0.3.0', '^0.2.3', false],
    ['0.0.3', '^0.0.3', true],
    ['0.0.4', '^0.0.3', false],
    ['1.2.9', '~1.2.3', true],
    ['1.3.0', '~1.2.3', false],
    ['1.2.2', '~1.2.3', false],
    ['1.2.3', '>=1.2.3', true],
    ['9.0.0', '>=1.2.3', true],
    ['1.2.2', '>=1.2.3', false],
    ['1.10.0', '>=1.9.0', true],
    // pre-releases: only when the range names a pre-release of the same version
    ['2.0.0-beta.1', '^1.2.3', false],
    ['1.3.0-rc.1', '^1.2.3', false],
    ['1.3.0-rc.2', '^1.3.0-rc.1', true],
    ['1.3.0-rc.1', '^1.3.0-rc.2', false],
    ['1.3.0', '^1.3.0-rc.1', true],
    ['1.0.0-alpha', '1.0.0-alpha', true],
    ['1.0.0-alpha.10', '>=1.0.0-alpha.9', true],
    ['1.0.0+build.5', '1.0.0', true],
    // garbage never satisfies
    ['1.2', '^1.2.0', false],
    ['v1.2.3', '1.2.3', false],
    ['1.2.3', '1.x', false],
    ['1.2.3', '<2.0.0', false],
    ['1.2.3', '^', false],
  ])('satisfies(%s, %s) = %s', (version, range, expected) => {
    expect(satisfies(version, range)).toBe(expected);
  });

  it('tells supported ranges from others', () => {
    for (const r of ['*', '1.2.3', '=1.2.3', '^1.2.3', '~0.1.0', '>=2.0.0-rc.1']) expect(isValidRange(r), r).toBe(true);
    for (const r of ['1.x', '>1.0.0', '<=1.0.0', '1.0.0 - 2.0.0', '^1.2', 'latest']) expect(isValidRange(r), r).toBe(false);
  });
});

describe('ModuleCatalogue.scan', () => {
  it('records a valid module with its absolute paths, parsed manifest and content hash', () => {
    const root = tmp();
    const dir = writeModule(root, 'vm-watchdog', manifest('vm-watchdog', { version: '1.4.0', entry: 'src/index.mjs' }), { 'src/index.mjs': 'export default {}\n' });
    const cat = new ModuleCatalogue({ dir: root, apiVersion: API, watch: false });
    const { modules, problems } = cat.scan();
    expect(problems).toEqual([]);
    expect(modules).toHaveLength(1);
    const m = modules[0]!;
    expect(m).toMatchObject({ name: 'vm-watchdog', version: '1.4.0', dir, entryPath: join(dir, 'src', 'index.mjs'), hash: hashModuleDir(dir) });
    // schema defaults are applied
    expect(m.manifest.limits.maxEmitsPerSecond).toBe(1000);
    expect(m.manifest.dependencies).toEqual({});
    expect(cat.get('vm-watchdog')).toBe(m);
    expect(cat.list()).toEqual([m]);
  });

  it('reports every manifest problem with its code while the good modules still load', () => {
    const root = tmp();
    writeModule(root, 'good', manifest('good'));
    mkdirSync(join(root, 'no-manifest'));
    writeModule(root, 'bad-json', '{ "name": "bad-json", ');
    writeModule(root, 'bad-schema', { ...manifest('bad-schema'), version: 'one', embots: [{ type: 'x', attachTo: {}, policies: [] }] });
    writeModule(root, 'not-object', '[1, 2]');
    writeModule(root, 'old-api', manifest('old-api', { embotApi: 7 }));
    writeModule(root, 'no-entry', manifest('no-entry', { entry: 'missing.mjs' }));
    writeModule(root, 'bad-range', manifest('bad-range', { dependencies: { good: '1.x' } }));
    writeModule(root, 'escape', manifest('escape', { entry: '../good/index.mjs' }));
    writeModule(root, 'zz-dup', manifest('good'));
    // ignored folders and plain files
    writeModule(root, '.hidden', '{ broken');
    writeModule(root, '_disabled', '{ broken');
    writeFileSync(join(root, 'README.md'), 'not a module');

    const cat = new ModuleCatalogue({ dir: root, apiVersion: API, watch: false });
    const { modules, problems } = cat.scan();
    expect(modules.map((m) => m.name)).toEqual(['good']);
    expect(modules[0]!.dir).toBe(join(root, 'good'));

    const code = (folder: string) => problemFor(problems, folder).error.code;
    expect(code('no-manifest')).toBe(ErrorCodes.PLUGIN_MANIFEST_INVALID);
    expect(problemFor(problems, 'no-manifest').error.message).toContain('has no manifest.json');
    expect(code('bad-json')).toBe(ErrorCodes.PLUGIN_MANIFEST_INVALID);
    expect(problemFor(problems, 'bad-json').error.message).toContain('not valid JSON');
    expect(code('bad-schema')).toBe(ErrorCodes.PLUGIN_MANIFEST_INVALID);
    const schemaMsg = problemFor(problems, 'bad-schema').error.message;
    // zod's issue paths are in the message
    expect(schemaMsg).toContain('version:');
    expect(schemaMsg).toContain('embots.0.attachTo.kind');
    expect(schemaMsg).toContain('embots.0.policies');
    expect(problemFor(problems, 'bad-schema').name).toBe('bad-schema');
    expect(code('not-object')).toBe(ErrorCodes.PLUGIN_MANIFEST_INVALID);
    expect(code('old-api')).toBe(ErrorCodes.PLUGIN_API_MISMATCH);
    expect(problemFor(problems, 'old-api').error.message).toMatch(/API 7.*API 1/);
    expect(code('no-entry')).toBe(ErrorCodes.PLUGIN_LOAD_FAILED);
    expect(problemFor(problems, 'no-entry').error.message).toContain('missing.mjs');
    expect(code('bad-range')).toBe(ErrorCodes.PLUGIN_MANIFEST_INVALID);
    expect(problemFor(problems, 'bad-range').error.message).toContain('dependencies.good');
    expect(code('escape')).toBe(ErrorCodes.PLUGIN_MANIFEST_INVALID);
    expect(problemFor(problems, 'escape').error.message).toContain('entry');
    // the second folder in name order declaring a name is the problem
    expect(code('zz-dup')).toBe(ErrorCodes.PLUGIN_MANIFEST_INVALID);
    expect(problemFor(problems, 'zz-dup').error.message).toContain(`already declared by ${join(root, 'good')}`);
    expect(problemFor(problems, 'zz-dup').name).toBe('good');
    expect(problems.some((p) => p.dir.includes('.hidden') || p.dir.includes('_disabled') || p.dir.endsWith('README.md'))).toBe(false);
    expect(problems).toHaveLength(9);
    expect(cat.problems()).toEqual(problems);
  });

  it('reports a missing plugins folder without throwing', () => {
    const root = tmp();
    const { modules, problems } = new ModuleCatalogue({ dir: join(root, 'nope'), apiVersion: API, watch: false }).scan();
    expect(modules).toEqual([]);
    expect(problems).toHaveLength(1);
    expect(problems[0]!.error.code).toBe(ErrorCodes.PLUGIN_LOAD_FAILED);
    expect(problems[0]!.error.message).toContain('does not exist');
  });

  it('orders modules after their dependencies, whatever the folder order', () => {
    const root = tmp();
    writeModule(root, '1-app', manifest('app', { dependencies: { net: '^1.0.0', base: '*' } }));
    writeModule(root, '2-net', manifest('net', { version: '1.3.0', dependencies: { base: '~2.1.0' } }));
    writeModule(root, '3-base', manifest('base', { version: '2.1.7' }));
    writeModule(root, '4-alone', manifest('alone'));
    const { modules, problems } = new ModuleCatalogue({ dir: root, apiVersion: API, watch: false }).scan();
    expect(problems).toEqual([]);
    expect(modules.map((m) => m.name)).toEqual(['alone', 'base', 'net', 'app']);
  });

  it('reports missing dependencies, versions out of range and cycles, and whatever depends on them', () => {
    const root = tmp();
    writeModule(root, 'base', manifest('base', { version: '1.0.0' }));
    writeModule(root, 'needs-missing', manifest('needs-missing', { dependencies: { ghost: '^1.0.0' } }));
    writeModule(root, 'needs-newer', manifest('needs-newer', { dependencies: { base: '^2.0.0' } }));
    writeModule(root, 'on-top', manifest('on-top', { dependencies: { 'needs-newer': '1.0.0' } }));
    writeModule(root, 'cyc-a', manifest('cyc-a', { dependencies: { 'cyc-b': '*' } }));
    writeModule(root, 'cyc-b', manifest('cyc-b', { dependencies: { 'cyc-c': '*' } }));
    writeModule(root, 'cyc-c', manifest('cyc-c', { dependencies: { 'cyc-a': '*' } }));
    writeModule(root, 'self', manifest('self', { dependencies: { self: '*' } }));
    writeModule(root, 'behind-cycle', manifest('behind-cycle', { dependencies: { 'cyc-a': '*' } }));
    writeModule(root, 'on-broken', manifest('on-broken', { dependencies: { broken: '*' } }));
    writeModule(root, 'broken', manifest('broken', { embotApi: 99 }));
    writeModule(root, 'fine', manifest('fine', { dependencies: { base: '^1.0.0' } }));

    const { modules, problems } = new ModuleCatalogue({ dir: root, apiVersion: API, watch: false }).scan();
    expect(modules.map((m) => m.name)).toEqual(['base', 'fine']);
    for (const folder of ['needs-missing', 'needs-newer', 'on-top', 'cyc-a', 'cyc-b', 'cyc-c', 'self', 'behind-cycle', 'on-broken']) {
      expect(problemFor(problems, folder).error.code, folder).toBe(ErrorCodes.PLUGIN_DEPENDENCY_MISSING);
      expect(problemFor(problems, folder).name, folder).toBe(folder);
    }
    expect(problemFor(problems, 'needs-missing').error.message).toContain('ghost');
    expect(problemFor(problems, 'needs-newer').error.message).toBe('module needs-newer needs base ^2.0.0 but base is 1.0.0');
    expect(problemFor(problems, 'on-top').error.message).toContain('needs-newer, which is invalid');
    expect(problemFor(problems, 'cyc-a').error.message).toBe('dependency cycle: cyc-a -> cyc-b -> cyc-c -> cyc-a');
    expect(problemFor(problems, 'cyc-c').error.message).toBe('dependency cycle: cyc-c -> cyc-a -> cyc-b -> cyc-c');
    expect(problemFor(problems, 'self').error.message).toBe('dependency cycle: self -> self');
    expect(problemFor(problems, 'behind-cycle').error.message).toContain('dependency cycle');
    expect(problemFor(problems, 'on-broken').error.message).toContain(`broken, which is invalid (${ErrorCodes.PLUGIN_API_MISMATCH})`);
    expect(problemFor(problems, 'broken').error.code).toBe(ErrorCodes.PLUGIN_API_MISMATCH);
  });

  it('start() without watching emits invalid and added (in dependency order) once', async () => {
    const root = tmp();
    writeModule(root, 'a', manifest('a', { dependencies: { b: '*' } }));
    writeModule(root, 'b', manifest('b'));
    writeModule(root, 'c', '{');
    const cat = new ModuleCatalogue({ dir: root, apiVersion: API, watch: false });
    const seen: string[] = [];
    cat.on('module-added', (m) => seen.push(`added ${m.name}`));
    cat.on('module-invalid', (p) => seen.push(`invalid ${p.error.code}`));
    cat.start();
    cat.start();
    await cat.ready();
    expect(seen).toEqual([`invalid ${ErrorCodes.PLUGIN_MANIFEST_INVALID}`, 'added b', 'added a']);
    await cat.close();
  });
});

type Seen =
  | { readonly kind: 'added'; readonly m: ModuleRecord }
  | { readonly kind: 'removed'; readonly m: ModuleRecord }
  | { readonly kind: 'changed'; readonly m: ModuleRecord; readonly previous: ModuleRecord }
  | { readonly kind: 'invalid'; readonly p: ModuleProblem };

async function watching(root: string, debounceMs = 60): Promise<{ cat: ModuleCatalogue; seen: Seen[] }> {
  const cat = new ModuleCatalogue({ dir: root, apiVersion: API, debounceMs });
  const seen: Seen[] = [];
  cat.on('module-added', (m) => seen.push({ kind: 'added', m }));
  cat.on('module-changed', (m, previous) => seen.push({ kind: 'changed', m, previous }));
  cat.on('module-removed', (m) => seen.push({ kind: 'removed', m }));
  cat.on('module-invalid', (p) => seen.push({ kind: 'invalid', p }));
  cleanups.push(() => cat.close());
  cat.start();
  await cat.ready();
  return { cat, seen };
}

async function until(what: string, cond: () => boolean, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const settle = (ms = 400) => new Promise((r) => setTimeout(r, ms));
const count = (seen: readonly Seen[], kind: Seen['kind']) => seen.filter((s) => s.kind === kind).length;

describe('ModuleCatalogue watching', () => {
  it('picks up a copied-in folder once, then edits, then removal', async () => {
    const root = tmp();
    const staging = tmp('embot-staging-');
    const src = writeModule(staging, 'host-load', manifest('host-load'), { 'index.mjs': 'export default 1\n', 'lib/a.mjs': 'a', 'lib/b.mjs': 'b' });
    const { cat, seen } = await watching(root);
    expect(seen).toEqual([]);

    cpSync(src, join(root, 'host-load'), { recursive: true });
    await until('module-added', () => count(seen, 'added') > 0);
    await settle();
    expect(seen.map((s) => s.kind)).toEqual(['added']);
    const added = seen[0] as Extract<Seen, { kind: 'added' }>;
    expect(added.m.name).toBe('host-load');
    expect(added.m.hash).toBe(hashModuleDir(src));
    expect(cat.get('host-load')?.hash).toBe(added.m.hash);

    writeFileSync(join(root, 'host-load', 'lib', 'a.mjs'), 'a2');
    await until('module-changed', () => count(seen, 'changed') > 0);
    const changed = seen.find((s) => s.kind === 'changed') as Extract<Seen, { kind: 'changed' }>;
    expect(changed.previous.hash).toBe(added.m.hash);
    expect(changed.m.hash).not.toBe(added.m.hash);
    expect(changed.m.hash).toBe(hashModuleDir(join(root, 'host-load')));

    // Touching a file is not a change of content.
    utimesSync(join(root, 'host-load', 'lib', 'b.mjs'), new Date(), new Date(2030, 0, 1));
    await settle();
    expect(count(seen, 'changed')).toBe(1);

    rmSync(join(root, 'host-load'), { recursive: true });
    await until('module-removed', () => count(seen, 'removed') > 0);
    expect((seen.at(-1) as Extract<Seen, { kind: 'removed' }>).m.name).toBe('host-load');
    expect(cat.list()).toEqual([]);
    expect(count(seen, 'added')).toBe(1);
  });

  it('waits for a folder written file by file and reports it once when complete', async () => {
    const root = tmp();
    const { seen } = await watching(root, 300);
    const dir = join(root, 'slow');
    mkdirSync(dir);
    writeFileSync(join(dir, 'manifest.json'), JSON.stringify(manifest('slow', { entry: 'lib/index.mjs' })));
    await settle(30);
    mkdirSync(join(dir, 'lib'));
    await settle(30);
    writeFileSync(join(dir, 'lib', 'index.mjs'), 'export default {}\n');
    await settle(30);
    writeFileSync(join(dir, 'lib', 'more.mjs'), 'x');
    await until('module-added', () => count(seen, 'added') > 0);
    await settle(500);
    expect(seen.map((s) => s.kind)).toEqual(['added']);
    expect((seen[0] as Extract<Seen, { kind: 'added' }>).m.hash).toBe(hashModuleDir(dir));
  });

  it('reports an invalid folder dropped in, and adds it once it is fixed', async () => {
    const root = tmp();
    writeModule(root, 'ok', manifest('ok'));
    const { cat, seen } = await watching(root);
    expect(seen.map((s) => s.kind)).toEqual(['added']);

    const dir = writeModule(root, 'half', '{ "name": "half", "vers');
    await until('module-invalid', () => count(seen, 'invalid') > 0);
    const invalid = seen.find((s) => s.kind === 'invalid') as Extract<Seen, { kind: 'invalid' }>;
    expect(invalid.p.dir).toBe(dir);
    expect(invalid.p.error.code).toBe(ErrorCodes.PLUGIN_MANIFEST_INVALID);
    expect(cat.problems()).toHaveLength(1);

    // An unrelated change does not report the same problem again.
    writeFileSync(join(root, 'ok', 'extra.txt'), 'x');
    await until('module-changed', () => count(seen, 'changed') > 0);
    expect(count(seen, 'invalid')).toBe(1);

    writeFileSync(join(dir, 'manifest.json'), JSON.stringify(manifest('half')));
    await until('half added', () => seen.some((s) => s.kind === 'added' && s.m.name === 'half'));
    expect(cat.problems()).toEqual([]);
    expect(cat.list().map((m) => m.name).sort()).toEqual(['half', 'ok']);
    expect(count(seen, 'invalid')).toBe(1);
  });

  it('removes a module whose manifest breaks, and a dependent with it', async () => {
    const root = tmp();
    writeModule(root, 'base', manifest('base'));
    writeModule(root, 'top', manifest('top', { dependencies: { base: '^1.0.0' } }));
    const { cat, seen } = await watching(root);
    expect(seen.map((s) => (s.kind === 'added' ? s.m.name : s.kind))).toEqual(['base', 'top']);

    writeFileSync(join(root, 'base', 'manifest.json'), JSON.stringify(manifest('base', { embotApi: 2 })));
    await until('removals', () => count(seen, 'removed') === 2);
    await settle(150);
    const after = seen.slice(2);
    // dependents go first, then the problems are reported
    expect(after.map((s) => (s.kind === 'removed' ? `removed ${s.m.name}` : s.kind === 'invalid' ? `invalid ${s.p.name}` : s.kind))).toEqual([
      'removed top',
      'removed base',
      'invalid base',
      'invalid top',
    ]);
    expect(cat.list()).toEqual([]);
  });

  it('reports a renamed folder as a change of the same module', async () => {
    const root = tmp();
    writeModule(root, 'old-place', manifest('mover'));
    const { cat, seen } = await watching(root, 150);
    renameSync(join(root, 'old-place'), join(root, 'new-place'));
    await until('module-changed', () => count(seen, 'changed') > 0);
    await settle(200);
    expect(seen.map((s) => s.kind)).toEqual(['added', 'changed']);
    const changed = seen[1] as Extract<Seen, { kind: 'changed' }>;
    expect(changed.m.hash).toBe(changed.previous.hash);
    expect(changed.m.entryPath).toBe(join(root, 'new-place', 'index.mjs'));
    expect(cat.get('mover')?.dir).toBe(join(root, 'new-place'));
  });

  it('creates a missing plugins folder so later drop-ins are seen', async () => {
    const root = join(tmp(), 'plugins');
    const { seen } = await watching(root);
    expect(seen).toEqual([]);
    writeModule(root, 'late', manifest('late'));
    await until('module-added', () => count(seen, 'added') > 0);
    expect(count(seen, 'invalid')).toBe(0);
  });
});

describe('PluginStatusStore', () => {
  it('records statuses and keeps a module disabled across a reopen of the store file', () => {
    const file = join(tmp(), 'agent.sqlite');
    let store = Store.open({ file });
    let statuses = new PluginStatusStore(store);
    statuses.record({ name: 'vm-watchdog', version: '1.0.0', hash: 'h1', status: 'loaded' });
    statuses.record({ name: 'host-load', version: '2.0.0', hash: 'h2', status: 'error', error: 'boom', restarts: 3 });
    statuses.disable('host-load', 'keeps crashing');
    statuses.disable('never-seen', 'not wanted here');
    store.close();

    store = Store.open({ file });
    cleanups.push(() => store.close());
    statuses = new PluginStatusStore(store);
    expect(statuses.isDisabled('host-load')).toBe(true);
    expect(statuses.isDisabled('never-seen')).toBe(true);
    expect(statuses.isDisabled('vm-watchdog')).toBe(false);
    expect(statuses.isDisabled('unknown')).toBe(false);
    expect(statuses.get('unknown')).toBeUndefined();
    expect(statuses.get('host-load')).toMatchObject({ name: 'host-load', version: '2.0.0', hash: 'h2', status: 'error', error: 'boom', restarts: 3, disabled: true, disabledReason: 'keeps crashing' });
    expect(statuses.get('never-seen')).toMatchObject({ version: '', hash: '', status: 'disabled', disabled: true, disabledReason: 'not wanted here' });

    // A new status neither clears the flag nor, without `restarts`, the restart count.
    statuses.record({ name: 'host-load', version: '2.0.1', hash: 'h3', status: 'disabled' });
    const s = statuses.get('host-load')!;
    expect(s).toMatchObject({ version: '2.0.1', hash: 'h3', status: 'disabled', restarts: 3, disabled: true });
    expect(s.error).toBeUndefined();

    statuses.enable('host-load');
    expect(statuses.isDisabled('host-load')).toBe(false);
    expect(statuses.get('host-load')!.disabledReason).toBeUndefined();
    expect(statuses.list().map((x) => x.name)).toEqual(['host-load', 'never-seen', 'vm-watchdog']);
    expect(statuses.get('vm-watchdog')).toMatchObject({ status: 'loaded', restarts: 0, disabled: false });
  });

  it('refuses an unknown status or a bad restart count and keeps the stored row', () => {
    const store = Store.open({ file: join(tmp(), 'agent.sqlite') });
    cleanups.push(() => store.close());
    const statuses = new PluginStatusStore(store);
    statuses.record({ name: 'm', version: '1.0.0', hash: 'h', status: 'loaded' });
    const bad = { name: 'm', version: '9.9.9', hash: 'x', status: 'running' } as unknown as Parameters<PluginStatusStore['record']>[0];
    let caught: unknown;
    try {
      statuses.record(bad);
    } catch (e) {
      caught = e;
    }
    expect(isEmbotError(caught)).toBe(true);
    expect(() => statuses.record({ name: 'm', version: '1.0.0', hash: 'h', status: 'loaded', restarts: -1 })).toThrow(/non-negative/);
    expect(statuses.get('m')).toMatchObject({ version: '1.0.0', status: 'loaded' });
  });
});
