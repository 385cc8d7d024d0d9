import { watch, type FSWatcher } from 'chokidar';
import { EventEmitter } from 'eventemitter3';
import { mkdirSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { join, relative, resolve, sep } from 'node:path';
import { describeError, ErrorCodes, type ErrorCode } from '../errors.ts';
import { hashModuleDir } from './content-hash.ts';
import { ManifestSchema, type Manifest } from './manifest.ts';
import { isValidRange, satisfies } from './version-range.ts';

/** One validated module folder. Nothing of the module has been imported yet. */
export interface ModuleRecord {
  readonly name: string;
  readonly version: string;
  /** SHA-256 hex of the folder content, see `hashModuleDir`. */
  readonly hash: string;
  /** Absolute path of the module folder. */
  readonly dir: string;
  /** Absolute path of the entry file. */
  readonly entryPath: string;
  readonly manifest: Manifest;
}

/** A folder that is not a usable module, and why. `name` is set when the manifest declared one. */
export type ModuleProblem = {
  readonly dir: string;
  readonly name?: string;
  readonly error: { readonly code: ErrorCode; readonly message: string };
};

export interface ScanResult {
  /** Valid modules, every module after the modules it depends on. */
  readonly modules: readonly ModuleRecord[];
  /** Invalid folders, sorted by folder. */
  readonly problems: readonly ModuleProblem[];
}

export interface CatalogueEvents {
  'module-added': (m: ModuleRecord) => void;
  /** The content hash changed (or the module moved to another folder). */
  'module-changed': (m: ModuleRecord, previous: ModuleRecord) => void;
  /** Deleted, or no longer valid (a 'module-invalid' for the same folder follows). */
  'module-removed': (m: ModuleRecord) => void;
  /** Reported once per distinct problem; a folder that stays broken is not reported again. */
  'module-invalid': (p: ModuleProblem) => void;
  /** The watcher failed or a re-scan threw; watching goes on. */
  'watch-error': (e: Error) => void;
}

export interface CatalogueOptions {
  /** The plugins folder; each subfolder is one module (names starting with `.` or `_` are skipped). */
  readonly dir: string;
  /** The plugin API version this agent provides; a manifest's `embotApi` must equal it. */
  readonly apiVersion: number;
  /** Watch the folder after `start()` (default true). */
  readonly watch?: boolean;
  /** Quiet time after the last file event before re-scanning (default 200 ms). */
  readonly debounceMs?: number;
  /** Longest a stream of file events can postpone a re-scan (default max(2000, 10 × debounceMs)). */
  readonly maxWaitMs?: number;
}

const MANIFEST_FILE = 'manifest.json';

/**
 * The management modules of a plugins folder, validated before any of their code is imported:
 * manifest schema, plugin API version, entry file, dependencies (present, version in range, no
 * cycles), content hash. A broken folder is reported and never stops the others. With
 * `watch`, folders dropped in, edited or removed while the agent runs are picked up: file
 * events are debounced, the folder is re-scanned and the differences are emitted.
 *
 * @example
 * ```ts
 * const catalogue = new ModuleCatalogue({ dir: './plugins', apiVersion: EMBOT_API_VERSION });
 * catalogue.on('module-added', (m) => runtime.load(m));
 * catalogue.on('module-changed', (m) => runtime.reload(m));
 * catalogue.on('module-removed', (m) => runtime.unload(m.name));
 * catalogue.on('module-invalid', (p) => log.warn(p.error.message));
 * catalogue.start();
 * await catalogue.ready();
 * // …
 * await catalogue.close();
 * ```
 */
export class ModuleCatalogue extends EventEmitter<CatalogueEvents> {
  /** Absolute path of the plugins folder. */
  readonly dir: string;
  private readonly apiVersion: number;
  private readonly watchEnabled: boolean;
  private readonly debounceMs: number;
  private readonly maxWaitMs: number;
  private modules: readonly ModuleRecord[] = [];
  private byName = new Map<string, ModuleRecord>();
  private currentProblems: readonly ModuleProblem[] = [];
  private watcher: FSWatcher | undefined;
  private timer: NodeJS.Timeout | undefined;
  private firstPendingAt = 0;
  private started = false;
  private closed = false;
  private readyPromise: Promise<void> = Promise.resolve();
  private resolveReady: (() => void) | undefined;

  constructor(opts: CatalogueOptions) {
    super();
    this.dir = resolve(opts.dir);
    this.apiVersion = opts.apiVersion;
    this.watchEnabled = opts.watch ?? true;
    this.debounceMs = opts.debounceMs ?? 200;
    this.maxWaitMs = opts.maxWaitMs ?? Math.max(2000, this.debounceMs * 10);
  }

  /**
   * Scans the folder once and makes the result current (`get`, `list`, `problems`), without
   * emitting events. When two folders declare the same name, the folder that already holds
   * it keeps it; otherwise the first folder in name order wins. While watching, prefer the
   * events: a change picked up by calling `scan()` yourself is not emitted afterwards.
   */
  scan(): ScanResult {
    const owners = new Map([...this.byName].map(([name, m]) => [name, m.dir]));
    const result = scanModules(this.dir, this.apiVersion, owners);
    this.modules = result.modules;
    this.byName = new Map(result.modules.map((m) => [m.name, m]));
    this.currentProblems = result.problems;
    return result;
  }

  /**
   * Scans, emits 'module-invalid' and 'module-added' (dependency order) for what it found, then
   * watches. When watching, a missing plugins folder is created (chokidar cannot watch a folder
   * that does not exist yet). Calling it again does nothing.
   */
  start(): void {
    if (this.started || this.closed) return;
    this.started = true;
    if (this.watchEnabled) {
      try {
        mkdirSync(this.dir, { recursive: true });
      } catch {
        // The scan reports the unusable folder.
      }
    }
    const result = this.scan();
    for (const p of result.problems) this.emit('module-invalid', p);
    for (const m of result.modules) this.emit('module-added', m);
    if (this.watchEnabled) this.startWatching();
  }

  /** Resolves once the watcher has finished its initial crawl (at once when not watching), so no later change is missed. */
  ready(): Promise<void> {
    return this.readyPromise;
  }

  get(name: string): ModuleRecord | undefined {
    return this.byName.get(name);
  }

  /** Valid modules in dependency order. */
  list(): readonly ModuleRecord[] {
    return this.modules;
  }

  problems(): readonly ModuleProblem[] {
    return this.currentProblems;
  }

  /** Stops watching; no event is emitted afterwards. */
  async close(): Promise<void> {
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    const watcher = this.watcher;
    this.watcher = undefined;
    await watcher?.close();
    this.resolveReady?.();
  }

  private startWatching(): void {
    const watcher = watch(this.dir, {
      ignoreInitial: true,
      // No depth limit: every file of a module counts toward its hash.
      ignored: (path: string) => this.isIgnored(path),
    });
    this.watcher = watcher;
    watcher.on('all', () => this.schedule());
    watcher.on('error', (e: unknown) => {
      if (!this.closed) this.emit('watch-error', e instanceof Error ? e : new Error(describeError(e)));
    });
    this.readyPromise = new Promise<void>((resolveReady) => {
      watcher.once('ready', () => {
        // Anything that changed between the first scan and the end of the watcher's crawl
        // produced no event; one re-scan closes that gap.
        this.rescan();
        resolveReady();
      });
      this.resolveReady = resolveReady;
    });
  }

  private isIgnored(path: string): boolean {
    const rel = relative(this.dir, path);
    if (rel === '' || rel.startsWith('..')) return false;
    const parts = rel.split(sep);
    if (parts[0]!.startsWith('_')) return true;
    return parts.some((p) => p.startsWith('.') || p === 'node_modules');
  }

  private schedule(): void {
    if (this.closed) return;
    const now = Date.now();
    if (this.timer) clearTimeout(this.timer);
    else this.firstPendingAt = now;
    const wait = Math.max(0, Math.min(this.debounceMs, this.firstPendingAt + this.maxWaitMs - now));
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.rescan();
    }, wait);
  }

  /** Re-scans and emits the differences: removals (dependents first), new problems, then changes and additions in dependency order. */
  private rescan(): void {
    if (this.closed) return;
    try {
      const before = this.byName;
      const beforeOrder = this.modules;
      const problemsBefore = new Set(this.currentProblems.map(problemKey));
      const result = this.scan();
      for (const m of [...beforeOrder].reverse()) if (!this.byName.has(m.name)) this.emit('module-removed', m);
      for (const p of result.problems) if (!problemsBefore.has(problemKey(p))) this.emit('module-invalid', p);
      for (const m of result.modules) {
        const prev = before.get(m.name);
        if (!prev) this.emit('module-added', m);
        else if (prev.hash !== m.hash || prev.dir !== m.dir) this.emit('module-changed', m, prev);
      }
    } catch (e) {
      this.emit('watch-error', e instanceof Error ? e : new Error(describeError(e)));
    }
  }
}

function problemKey(p: ModuleProblem): string {
  return `${p.dir}\0${p.error.code}\0${p.error.message}`;
}

function problem(dir: string, name: string | undefined, code: ErrorCode, message: string): ModuleProblem {
  return name === undefined ? { dir, error: { code, message } } : { dir, name, error: { code, message } };
}

/** Outcome of checking one module folder. */
export type ModuleCheck = { readonly ok: true; readonly record: ModuleRecord } | { readonly ok: false; readonly problem: ModuleProblem };

/**
 * Validates one module folder without importing anything from it.
 *
 * @example
 * ```ts
 * const c = checkModuleDir('/srv/plugins/vm-watchdog', EMBOT_API_VERSION);
 * if (!c.ok) console.error(c.problem.error.message);
 * ```
 */
export function checkModuleDir(dir: string, apiVersion: number): ModuleCheck {
  const fail = (code: ErrorCode, message: string, name?: string): ModuleCheck => ({ ok: false, problem: problem(dir, name, code, message) });
  const manifestPath = join(dir, MANIFEST_FILE);
  let text: string;
  try {
    text = readFileSync(manifestPath, 'utf8');
  } catch (e) {
    const missing = (e as NodeJS.ErrnoException).code === 'ENOENT';
    return fail(ErrorCodes.PLUGIN_MANIFEST_INVALID, missing ? `module folder ${dir} has no ${MANIFEST_FILE}` : `cannot read ${manifestPath}: ${describeError(e)}`);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    return fail(ErrorCodes.PLUGIN_MANIFEST_INVALID, `${manifestPath} is not valid JSON: ${describeError(e)}`);
  }
  const rawName = typeof raw === 'object' && raw !== null && typeof (raw as { name?: unknown }).name === 'string' ? (raw as { name: string }).name : undefined;
  const parsed = ManifestSchema.safeParse(raw);
  if (!parsed.success) {
    const issues = parsed.error.issues.map((i) => `${i.path.length === 0 ? '(root)' : i.path.map(String).join('.')}: ${i.message}`);
    return fail(ErrorCodes.PLUGIN_MANIFEST_INVALID, `${manifestPath} is invalid: ${issues.join('; ')}`, rawName);
  }
  const manifest = parsed.data;
  const name = manifest.name;
  const badRanges = Object.entries(manifest.dependencies).filter(([, range]) => !isValidRange(range));
  if (badRanges.length > 0) {
    const list = badRanges.map(([dep, range]) => `dependencies.${dep}: unsupported version range ${JSON.stringify(range)}`).join('; ');
    return fail(ErrorCodes.PLUGIN_MANIFEST_INVALID, `${manifestPath} is invalid: ${list} (use 1.2.3, ^1.2.3, ~1.2.3, >=1.2.3 or *)`, name);
  }
  if (manifest.embotApi !== apiVersion) {
    return fail(ErrorCodes.PLUGIN_API_MISMATCH, `module ${name} was written for embot plugin API ${manifest.embotApi}, this agent provides API ${apiVersion}`, name);
  }
  const entryPath = resolve(dir, manifest.entry);
  if (!statSync(entryPath, { throwIfNoEntry: false })?.isFile()) {
    return fail(ErrorCodes.PLUGIN_LOAD_FAILED, `entry file ${manifest.entry} of module ${name} does not exist in ${dir}`, name);
  }
  let hash: string;
  try {
    hash = hashModuleDir(dir);
  } catch (e) {
    // Typically the folder changed while it was read; the watcher will re-scan it.
    return fail(ErrorCodes.PLUGIN_LOAD_FAILED, `cannot read module ${name} in ${dir}: ${describeError(e)}`, name);
  }
  return { ok: true, record: Object.freeze({ name, version: manifest.version, hash, dir, entryPath, manifest }) };
}

/** Subfolders of the plugins folder that may hold modules, sorted. */
function moduleDirs(root: string): { readonly dirs: readonly string[]; readonly problem?: ModuleProblem } {
  let entries;
  try {
    entries = readdirSync(root, { withFileTypes: true });
  } catch (e) {
    const missing = (e as NodeJS.ErrnoException).code === 'ENOENT';
    return { dirs: [], problem: problem(root, undefined, ErrorCodes.PLUGIN_LOAD_FAILED, missing ? `plugins folder ${root} does not exist` : `cannot read plugins folder ${root}: ${describeError(e)}`) };
  }
  const dirs = entries
    .filter((e) => !e.name.startsWith('.') && !e.name.startsWith('_'))
    .filter((e) => e.isDirectory() || (e.isSymbolicLink() && statSync(join(root, e.name), { throwIfNoEntry: false })?.isDirectory() === true))
    .map((e) => e.name)
    .sort()
    .map((n) => join(root, n));
  return { dirs };
}

/**
 * Scans a plugins folder: validates every module folder, resolves names, dependencies and their
 * order. `owners` (module name → folder) decides which folder keeps a name two folders declare.
 *
 * @example
 * ```ts
 * const { modules, problems } = scanModules('./plugins', EMBOT_API_VERSION);
 * ```
 */
export function scanModules(root: string, apiVersion: number, owners: ReadonlyMap<string, string> = new Map()): ScanResult {
  const absRoot = resolve(root);
  const problems: ModuleProblem[] = [];
  const listing = moduleDirs(absRoot);
  if (listing.problem) problems.push(listing.problem);

  const candidates = new Map<string, ModuleRecord[]>();
  /** Names whose folder is invalid, so dependents can say why their dependency is unusable. */
  const invalid = new Map<string, ModuleProblem>();
  for (const dir of listing.dirs) {
    const c = checkModuleDir(dir, apiVersion);
    if (!c.ok) {
      problems.push(c.problem);
      if (c.problem.name !== undefined && !invalid.has(c.problem.name)) invalid.set(c.problem.name, c.problem);
      continue;
    }
    const list = candidates.get(c.record.name) ?? [];
    list.push(c.record);
    candidates.set(c.record.name, list);
  }

  const valid = new Map<string, ModuleRecord>();
  for (const [name, list] of candidates) {
    const owner = list.find((m) => m.dir === owners.get(name)) ?? list[0]!;
    valid.set(name, owner);
    for (const other of list) {
      if (other === owner) continue;
      problems.push(problem(other.dir, name, ErrorCodes.PLUGIN_MANIFEST_INVALID, `module name ${name} in ${other.dir} is already declared by ${owner.dir}`));
    }
  }
  // A usable folder of the same name makes an invalid one irrelevant to dependents.
  for (const name of valid.keys()) invalid.delete(name);

  resolveDependencies(valid, invalid, problems, absRoot);
  const modules = dependencyOrder(valid, problems);
  problems.sort((a, b) => (a.dir < b.dir ? -1 : a.dir > b.dir ? 1 : 0));
  return { modules, problems };
}

/** Drops, until nothing changes, every module whose dependency is missing, invalid or of a version out of range. */
function resolveDependencies(valid: Map<string, ModuleRecord>, invalid: Map<string, ModuleProblem>, problems: ModuleProblem[], root: string): void {
  for (let changed = true; changed; ) {
    changed = false;
    for (const name of [...valid.keys()].sort()) {
      const m = valid.get(name)!;
      const why = unmetDependency(m, valid, invalid, root);
      if (why === undefined) continue;
      const p = problem(m.dir, name, ErrorCodes.PLUGIN_DEPENDENCY_MISSING, why);
      problems.push(p);
      invalid.set(name, p);
      valid.delete(name);
      changed = true;
    }
  }
}

function unmetDependency(m: ModuleRecord, valid: ReadonlyMap<string, ModuleRecord>, invalid: ReadonlyMap<string, ModuleProblem>, root: string): string | undefined {
  for (const [dep, range] of Object.entries(m.manifest.dependencies).sort(([a], [b]) => (a < b ? -1 : 1))) {
    const found = valid.get(dep);
    if (found) {
      if (!satisfies(found.version, range)) return `module ${m.name} needs ${dep} ${range} but ${dep} is ${found.version}`;
      continue;
    }
    const bad = invalid.get(dep);
    if (bad) return `module ${m.name} depends on ${dep}, which is invalid (${bad.error.code})`;
    return `module ${m.name} depends on ${dep} ${range}, which is not in ${root}`;
  }
  return undefined;
}

/** Kahn's order (ties by name); whatever is left sits on or behind a cycle and becomes a problem. */
function dependencyOrder(valid: ReadonlyMap<string, ModuleRecord>, problems: ModuleProblem[]): ModuleRecord[] {
  const deps = (name: string): string[] => Object.keys(valid.get(name)!.manifest.dependencies).sort();
  const pending = new Map([...valid.keys()].map((n) => [n, new Set(deps(n))]));
  const order: ModuleRecord[] = [];
  for (;;) {
    const ready = [...pending].filter(([, d]) => d.size === 0).map(([n]) => n).sort();
    if (ready.length === 0) break;
    for (const n of ready) {
      pending.delete(n);
      order.push(valid.get(n)!);
      for (const d of pending.values()) d.delete(n);
    }
  }
  for (const name of [...pending.keys()].sort()) {
    const cycle = cycleThrough(name, (n) => deps(n).filter((d) => pending.has(d)));
    const m = valid.get(name)!;
    const why = cycle
      ? `dependency cycle: ${cycle.join(' -> ')}`
      : `module ${name} depends on ${deps(name).filter((d) => pending.has(d)).join(', ')}, which is in a dependency cycle`;
    problems.push(problem(m.dir, name, ErrorCodes.PLUGIN_DEPENDENCY_MISSING, why));
  }
  return order;
}

/** Shortest path `start -> … -> start` along `next`, or undefined when `start` is not on a cycle. */
function cycleThrough(start: string, next: (n: string) => string[]): string[] | undefined {
  const parent = new Map<string, string>();
  const queue = [start];
  while (queue.length > 0) {
    const n = queue.shift()!;
    for (const d of next(n)) {
      if (d === start) {
        const path = [start];
        for (let at = n; at !== start; at = parent.get(at)!) path.splice(1, 0, at);
        return [...path, start];
      }
      if (!parent.has(d)) {
        parent.set(d, n);
        queue.push(d);
      }
    }
  }
  return undefined;
}
