import { EventEmitter } from 'eventemitter3';
import { describeError, ErrorCodes, isEmbotError } from '../core/errors.ts';
import type { EmbotEvent } from '../core/events.ts';
import type { Store } from '../core/store/store.ts';
import type { Manifest } from '../core/plugins/manifest.ts';
import type { PolicyEvent } from './policy-api.ts';
import { EmbotStore, type DeadLetter, type EmbotRow, type EmbotStatus, type ParkedEvent } from './embot-store.ts';
import { EmitBudget } from './emit-budget.ts';
import { ModuleHost } from './module-host.ts';
import type { PolicyChart } from './policy-chart.ts';
import type { BatchItem, EffectRequest, EmbotSpawn, EmitRequest, Outcome, PolicyState } from './worker/worker-protocol.ts';

/** The slice of the sensor service the runtime uses. */
export interface RuntimeSensors {
  subscribe(elementId: string, subscriber: { deliver(event: EmbotEvent, seq: number): void; readonly durable?: boolean }): () => void;
  complete(seqs: Iterable<number>): void;
  post(input: { elementId: string; type: string; payload?: unknown; source?: string }): EmbotEvent;
  mute(elementId: string, sensorName: string): () => void;
}

/** The slice of the effector registry the runtime uses. */
export interface RuntimeEffectors {
  invoke(name: string, op: string, args: Readonly<Record<string, unknown>>, hooks?: { mute?(elementId: string, sensorNames: readonly string[]): () => void }): Promise<unknown>;
}

/** An element the runtime can attach embots to. */
export interface AttachableElement {
  readonly id: string;
  readonly kind: string;
  /** The element and its dependents (recursively): the embot receives events for all of them. */
  readonly scope: readonly string[];
}

export interface RuntimeModule {
  readonly name: string;
  readonly version: string;
  readonly hash: string;
  /** The module folder (plugins folder or plugin cache); shipped to peers from here. */
  readonly dir?: string;
  readonly entryPath: string;
  readonly manifest: Manifest;
}

/** An embot with its committed policy states, as a migration ships it. */
export interface ExportedEmbot {
  readonly id: string;
  readonly module: string;
  readonly type: string;
  readonly elementIds: readonly string[];
  readonly status: EmbotStatus;
  readonly error?: string;
  readonly policies: Readonly<Record<string, PolicyState>>;
}

export interface PolicyView {
  readonly name: string;
  readonly state: unknown;
  /** The machine's context (extended state), as persisted. */
  readonly context?: unknown;
  readonly updatedAt: number;
}

export interface EmbotInfo {
  readonly id: string;
  readonly module: string;
  readonly type: string;
  readonly elementIds: readonly string[];
  readonly status: EmbotStatus;
  readonly error?: string;
  readonly policies: readonly PolicyView[];
}

export interface RuntimeEvents {
  'embot-created': (e: EmbotInfo) => void;
  'embot-quarantined': (e: { readonly embotId: string; readonly code: string; readonly reason: string }) => void;
  'module-status': (e: { readonly module: string; readonly status: 'loaded' | 'error' | 'disabled' | 'unloaded'; readonly error?: string; readonly restarts: number }) => void;
  /** After a batch is committed: the events its policies processed. */
  processed: (events: readonly EmbotEvent[]) => void;
  log: (e: { readonly embotId: string; readonly level: string; readonly message: string; readonly data?: unknown }) => void;
}

export interface EmbotRuntimeOptions {
  readonly store: Store;
  readonly sensors: RuntimeSensors;
  readonly effectors: RuntimeEffectors;
  /** Per-module config overrides, merged over the manifest's defaults. */
  readonly moduleConfig?: (module: string) => Readonly<Record<string, unknown>> | undefined;
  readonly now?: () => number;
  readonly restartWindowMs?: number;
  readonly maxRestarts?: number;
  /** Events that may wait for one embot's module to load; default {@link MAX_PARKED_PER_EMBOT}. */
  readonly maxParkedPerEmbot?: number;
}

/** Events that wait for one embot's module, beyond which newer ones become dead letters: a module that never comes back must not fill the disk. */
export const MAX_PARKED_PER_EMBOT = 100_000;
/** Parked events handed to a module per batch once it loads. */
const PARKED_BATCH = 1000;

interface LiveEmbot {
  readonly id: string;
  readonly module: string;
  readonly type: string;
  readonly elementIds: readonly string[];
  readonly policies: readonly string[];
  status: EmbotStatus;
  error: string | undefined;
  readonly views: Map<string, PolicyView>;
  /** Events parked for it and not yet delivered (stored or about to be): while any, newer ones queue behind them. */
  parked: number;
}

interface LoadedModule {
  readonly record: RuntimeModule;
  readonly host: ModuleHost;
}

interface OpenBatch {
  readonly seqs: number[];
  readonly events: EmbotEvent[];
  readonly items: Map<string, BatchItem[]>;
  readonly dead: { embotId: string; event: EmbotEvent; reason: string }[];
  readonly parked: { embotId: string; event: EmbotEvent }[];
}

/**
 * Runs embots: one worker per module hosts their policy actors. Events reach it from the sensor
 * service as a durable subscriber; each tick's events go out as one batch per module, and when
 * every module has answered, the new policy snapshots and the completion of those events are
 * committed in ONE transaction — so after a crash an event is either reflected in the snapshots
 * or still in the journal, never both. The policies' outbox (effects, raised events) runs after
 * that commit.
 *
 * @example
 * ```ts
 * const runtime = new EmbotRuntime({ store, sensors, effectors });
 * await runtime.loadModule(catalogue.get('vm-watchdog')!);
 * runtime.attach({ id: 'vm:web-1', kind: 'vm', scope: ['vm:web-1'] });
 * ```
 */
export class EmbotRuntime extends EventEmitter<RuntimeEvents> {
  private readonly db: EmbotStore;
  private readonly modules = new Map<string, LoadedModule>();
  private readonly embots = new Map<string, LiveEmbot>();
  private readonly byElement = new Map<string, Set<string>>();
  private readonly unsubscribe = new Map<string, () => void>();
  private readonly elements = new Map<string, AttachableElement>();
  private readonly budget: EmitBudget;
  private readonly now: () => number;
  private open: OpenBatch | undefined;
  private commitChain: Promise<void> = Promise.resolve();
  private inFlight = 0;
  private closed = false;
  private readonly idleWaiters: (() => void)[] = [];
  /** Embots whose parked events are being delivered (one drain at a time each). */
  private readonly draining = new Set<string>();
  readonly counters = { batches: 0, processed: 0, deadLettered: 0, parked: 0, unparked: 0, effects: 0, effectFailures: 0, emits: 0, emitRejected: 0 };

  constructor(private readonly opts: EmbotRuntimeOptions) {
    super();
    this.db = new EmbotStore(opts.store);
    this.now = opts.now ?? Date.now;
    this.budget = new EmitBudget((id) => this.modules.get(this.embots.get(id)?.module ?? '')?.record.manifest.limits.maxEmitsPerSecond ?? 1000, this.now);
    // Embots known from a previous run show up (as 'unloaded') until their module loads.
    for (const row of this.db.listEmbots()) this.track(row, []);
  }

  /** Starts a module's worker and attaches its embot types to every known matching element. */
  async loadModule(record: RuntimeModule): Promise<void> {
    if (this.modules.has(record.name)) await this.unloadModule(record.name);
    const config = { ...record.manifest.config, ...(this.opts.moduleConfig?.(record.name) ?? {}) };
    const host = new ModuleHost({
      module: record.name,
      entryPath: record.entryPath,
      config,
      batchTimeoutMs: record.manifest.limits.batchTimeoutMs,
      ...(this.opts.maxRestarts === undefined ? {} : { maxRestarts: this.opts.maxRestarts }),
      ...(this.opts.restartWindowMs === undefined ? {} : { restartWindowMs: this.opts.restartWindowMs }),
      onTimer: (o) => this.commitOutcome(o),
      onHang: (embotId, message) => this.quarantine(embotId, ErrorCodes.PLUGIN_TIMEOUT, message),
      onRestart: (restarts, reason) => this.emit('module-status', { module: record.name, status: 'loaded', error: `restarted: ${reason}`, restarts }),
      onDisabled: (reason) => this.onModuleDisabled(record.name, reason),
      onLog: (m) => this.emit('log', { embotId: m.embotId, level: m.level, message: m.message, data: m.data }),
    });
    let policies: readonly string[];
    try {
      policies = await host.start();
    } catch (e) {
      await host.close();
      this.emit('module-status', { module: record.name, status: 'error', error: describeError(e), restarts: 0 });
      throw e;
    }
    const missing = record.manifest.embots.flatMap((t) => t.policies.filter((p) => !policies.includes(p)));
    if (missing.length) {
      await host.close();
      const err = new Error(`manifest names policies the entry does not define: ${missing.join(', ')}`);
      this.emit('module-status', { module: record.name, status: 'error', error: err.message, restarts: 0 });
      throw err;
    }
    this.modules.set(record.name, { record, host });
    this.emit('module-status', { module: record.name, status: 'loaded', restarts: 0 });
    const spawns: EmbotSpawn[] = [];
    for (const el of this.elements.values()) spawns.push(...this.embotsFor(record, el));
    await this.spawn(record.name, spawns);
  }

  /** Stops a module's worker; its embots stay in the store (as 'unloaded') with their last state. */
  async unloadModule(name: string): Promise<void> {
    const m = this.modules.get(name);
    if (!m) return;
    this.modules.delete(name);
    await this.idle();
    await m.host.close();
    for (const e of this.embots.values()) if (e.module === name && e.status === 'running') e.status = 'unloaded';
    this.emit('module-status', { module: name, status: 'unloaded', restarts: m.host.restarts });
  }

  /** An element appeared (VM created, host registered, element migrated in): give it its embots. */
  async attach(el: AttachableElement): Promise<void> {
    this.elements.set(el.id, el);
    // Track every new embot before the first await, so events already on their way find them.
    // One transaction for the embots' rows and snapshot reads: an element may carry a thousand.
    const spawns = this.opts.store.transaction(() => [...this.modules.values()].map((m) => [m.record.name, this.embotsFor(m.record, el)] as const));
    await Promise.all(spawns.map(([module, s]) => this.spawn(module, s)));
  }

  /**
   * An element is gone: its embots stop. Their rows and snapshots are deleted, or with
   * `keepState` kept (a migration freezes them here while their state travels; `attach` resumes
   * them from it, and `forget` deletes them once the target owns them).
   */
  async detach(elementIds: string | readonly string[], options: { readonly keepState?: boolean } = {}): Promise<void> {
    const ids = new Set(typeof elementIds === 'string' ? [elementIds] : elementIds);
    for (const id of ids) this.elements.delete(id);
    await this.idle();
    const gone = [...this.embots.values()].filter((e) => ids.has(e.elementIds[0] ?? ''));
    // One stop request per module, not one per embot.
    const byModule = new Map<string, string[]>();
    for (const e of gone) if (e.status === 'running') byModule.set(e.module, [...(byModule.get(e.module) ?? []), e.id]);
    await Promise.all([...byModule].map(([m, list]) => this.modules.get(m)?.host.stopEmbots(list).catch(() => {})));
    for (const e of gone) {
      this.untrack(e);
      if (!options.keepState) this.db.deleteEmbot(e.id, this.now());
    }
  }

  /** Deletes the stored embots of elements (after a migration handed them to another agent). */
  forget(elementIds: readonly string[]): void {
    for (const row of this.storedOf(elementIds)) this.db.deleteEmbot(row.id, this.now(), 'its element moved to another agent before the module loaded');
  }

  /** Modules of the embots of these elements (those `exportEmbots` would ship), without reading their states. */
  modulesOf(elementIds: readonly string[]): string[] {
    return [...new Set(this.storedOf(elementIds).map((row) => row.module))];
  }

  /** The stored embots attached to these elements, with their committed policy states: what a migration ships. */
  exportEmbots(elementIds: readonly string[]): ExportedEmbot[] {
    return this.storedOf(elementIds).map((row) => ({ id: row.id, module: row.module, type: row.type, elementIds: row.elementIds, status: row.status, ...(row.error ? { error: row.error } : {}), policies: this.db.loadSnapshots(row.id) }));
  }

  /** The stored embots attached (by their first element) to these elements. */
  private storedOf(elementIds: readonly string[]): EmbotRow[] {
    const ids = new Set(elementIds);
    return this.db.listEmbots().filter((row) => ids.has(row.elementIds[0] ?? ''));
  }

  /** Stores embots shipped from another agent; `attach` of their element then starts them from these states. */
  adoptEmbots(embots: readonly ExportedEmbot[]): void {
    const now = this.now();
    for (const e of embots) {
      const status: EmbotStatus = e.status === 'quarantined' || e.status === 'disabled' ? e.status : 'running';
      this.db.saveEmbot({ id: e.id, module: e.module, type: e.type, elementIds: e.elementIds, status, error: e.error, createdAt: now });
      for (const [policy, state] of Object.entries(e.policies)) this.db.saveSnapshot(e.id, policy, state, now);
    }
  }

  /** The loaded module record by name (for announcing `name@version#hash`). */
  module(name: string): RuntimeModule | undefined {
    return this.modules.get(name)?.record;
  }

  list(): EmbotInfo[] {
    return [...this.embots.values()].sort((a, b) => a.id.localeCompare(b.id)).map(toInfo);
  }

  get(id: string): EmbotInfo | undefined {
    const e = this.embots.get(id);
    return e && toInfo(e);
  }

  /** Statecharts of the loaded modules' policies, by module then policy (read from their machine definitions). */
  policyCharts(): Readonly<Record<string, Readonly<Record<string, PolicyChart>>>> {
    return Object.fromEntries([...this.modules.values()].map((m) => [m.record.name, m.host.charts]));
  }

  loadedModules(): readonly { readonly name: string; readonly restarts: number; readonly disabled?: string }[] {
    return [...this.modules.values()].map((m) => ({ name: m.record.name, restarts: m.host.restarts, ...(m.host.disabled ? { disabled: m.host.disabled } : {}) }));
  }

  deadLetterCount(): number {
    return this.db.deadLetterCount();
  }

  /** The newest `limit` dead letters (events an embot could not take, with why), newest last. */
  deadLetters(limit: number): DeadLetter[] {
    return this.db.deadLetters(limit);
  }

  /** Events stored for embots whose module is not loaded, waiting for it. */
  parkedCount(): number {
    return this.db.parkedCount();
  }

  /** Resolves when every delivered event is processed and committed. */
  idle(): Promise<void> {
    if (this.inFlight === 0 && !this.open) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.idle().catch(() => {});
    for (const u of this.unsubscribe.values()) u();
    this.unsubscribe.clear();
    await Promise.all([...this.modules.values()].map((m) => m.host.close()));
    this.modules.clear();
  }

  // ---- embots ----

  private embotsFor(record: RuntimeModule, el: AttachableElement): EmbotSpawn[] {
    const out: EmbotSpawn[] = [];
    for (const t of record.manifest.embots) {
      if (t.attachTo.kind !== el.kind) continue;
      const id = `${record.name}/${t.type}/${el.id}`;
      // Known from this run, or only from the store (a previous run, or adopted from a migration).
      const stored = this.embots.has(id) ? undefined : this.db.getEmbot(id);
      const known = this.embots.get(id) ?? (stored && { ...stored, views: new Map<string, PolicyView>() });
      if (known?.status === 'quarantined' || known?.status === 'disabled') {
        this.track({ ...rowOf(known as LiveEmbot), elementIds: el.scope }, t.policies);
        continue;
      }
      const row: EmbotRow = { id, module: record.name, type: t.type, elementIds: el.scope, status: 'running', error: undefined, createdAt: this.now() };
      const restore = known ? this.db.loadSnapshots(id) : {};
      this.db.saveEmbot(known ? { ...row, createdAt: (stored ?? this.db.getEmbot(id))?.createdAt ?? row.createdAt } : row);
      this.track(row, t.policies);
      out.push({ embotId: id, elementId: el.id, policies: t.policies, ...(Object.keys(restore).length ? { restore } : {}) });
    }
    return out;
  }

  private async spawn(module: string, spawns: readonly EmbotSpawn[]): Promise<void> {
    if (!spawns.length) return;
    const host = this.modules.get(module)?.host;
    if (!host) return;
    // Restored embots report no new state: show the one they were restored with.
    const now = this.now();
    for (const sp of spawns) {
      const e = this.embots.get(sp.embotId);
      if (!e || !sp.restore) continue;
      for (const [policy, st] of Object.entries(sp.restore)) {
        const snap = st.snapshot as { value?: unknown; context?: unknown } | null;
        e.views.set(policy, { name: policy, state: snap?.value ?? null, context: snap?.context, updatedAt: now });
      }
    }
    this.inFlight++;
    try {
      const outcome = await host.spawn(spawns);
      this.commitOutcome(outcome);
      for (const s of spawns) {
        const e = this.embots.get(s.embotId);
        if (e) this.emit('embot-created', toInfo(e));
        if (e !== undefined && e.parked > 0) this.drainParked(e.id);
      }
    } catch (e) {
      if (!isEmbotError(e, ErrorCodes.PLUGIN_DISABLED) && !isEmbotError(e, ErrorCodes.AGENT_STOPPED)) throw e;
    } finally {
      this.settle();
    }
  }

  private track(row: EmbotRow, policies: readonly string[]): void {
    const existing = this.embots.get(row.id);
    if (existing) this.untrack(existing);
    const live: LiveEmbot = {
      id: row.id,
      module: row.module,
      type: row.type,
      elementIds: row.elementIds,
      policies: policies.length ? policies : existing?.policies ?? [],
      status: policies.length ? row.status : row.status === 'running' ? 'unloaded' : row.status,
      error: row.error,
      views: existing?.views ?? new Map(),
      parked: existing?.parked ?? this.db.parkedCount(row.id),
    };
    this.embots.set(row.id, live);
    for (const el of live.elementIds) {
      let set = this.byElement.get(el);
      if (!set) {
        set = new Set();
        this.byElement.set(el, set);
        this.unsubscribe.set(el, this.opts.sensors.subscribe(el, { durable: true, deliver: (ev, seq) => this.deliver(ev, seq) }));
      }
      set.add(row.id);
    }
  }

  private untrack(e: LiveEmbot): void {
    this.embots.delete(e.id);
    this.budget.forget(e.id);
    for (const el of e.elementIds) {
      const set = this.byElement.get(el);
      if (!set) continue;
      set.delete(e.id);
      if (set.size === 0) {
        this.byElement.delete(el);
        this.unsubscribe.get(el)?.();
        this.unsubscribe.delete(el);
      }
    }
  }

  private quarantine(embotId: string, code: string, reason: string): void {
    const e = this.embots.get(embotId);
    if (!e || e.status === 'quarantined') return;
    e.status = 'quarantined';
    e.error = `${code}: ${reason}`;
    this.db.setStatus(embotId, 'quarantined', e.error);
    this.modules.get(e.module)?.host.forget([embotId]);
    this.emit('embot-quarantined', { embotId, code, reason });
    if (e.parked > 0) this.drainParked(embotId);
  }

  private onModuleDisabled(module: string, reason: string): void {
    for (const e of this.embots.values()) {
      if (e.module !== module || e.status !== 'running') continue;
      e.status = 'disabled';
      e.error = `${ErrorCodes.PLUGIN_DISABLED}: ${reason}`;
      this.db.setStatus(e.id, 'disabled', e.error);
      if (e.parked > 0) this.drainParked(e.id);
    }
    this.emit('module-status', { module, status: 'disabled', error: reason, restarts: this.modules.get(module)?.host.restarts ?? 0 });
  }

  // ---- dispatch ----

  private deliver(event: EmbotEvent, seq: number): void {
    const ids = this.byElement.get(event.elementId);
    let batch = this.open;
    if (!batch) {
      batch = { seqs: [], events: [], items: new Map(), dead: [], parked: [] };
      this.open = batch;
      setImmediate(() => this.flush());
    }
    batch.seqs.push(seq);
    batch.events.push(event);
    if (!ids) return;
    const pe = toPolicyEvent(event);
    for (const id of ids) {
      const e = this.embots.get(id)!;
      if (e.status === 'quarantined' || e.status === 'disabled') {
        batch.dead.push({ embotId: id, event, reason: e.error ?? `embot is ${e.status}` });
        continue;
      }
      if (e.status === 'unloaded' || e.parked > 0) {
        // Its module is not loaded, or events wait for it from when it was not: this one waits
        // behind them, so the embot still sees every event, in order.
        const max = this.opts.maxParkedPerEmbot ?? MAX_PARKED_PER_EMBOT;
        if (e.parked >= max) {
          batch.dead.push({ embotId: id, event, reason: `${max} events already wait for module ${e.module} to load` });
        } else {
          e.parked++;
          batch.parked.push({ embotId: id, event });
        }
        continue;
      }
      let items = batch.items.get(e.module);
      if (!items) batch.items.set(e.module, (items = []));
      items.push({ embotId: id, event: pe });
    }
  }

  private flush(): void {
    const batch = this.open;
    if (!batch) return;
    this.open = undefined;
    this.inFlight++;
    const work = Promise.all(
      [...batch.items].map(async ([module, items]): Promise<Outcome | undefined> => {
        const host = this.modules.get(module)?.host;
        try {
          if (!host) throw new Error(`module ${module} is not loaded`);
          return await host.batch(items);
        } catch (err) {
          for (const it of items) batch.dead.push({ embotId: it.embotId, event: batch.events.find((ev) => ev.id === it.event.id)!, reason: describeError(err) });
          return undefined;
        }
      }),
    );
    this.commitChain = this.commitChain
      .then(() => work)
      .then((outcomes) => this.commitBatch(batch, outcomes.filter((o): o is Outcome => o !== undefined)))
      .catch((err: unknown) => {
        this.emit('log', { embotId: '-', level: 'error', message: `batch commit failed: ${describeError(err)}` });
      })
      .finally(() => this.settle());
  }

  private settle(): void {
    this.inFlight--;
    if (this.inFlight === 0 && !this.open) for (const w of this.idleWaiters.splice(0)) w();
  }

  private commitBatch(batch: OpenBatch, outcomes: readonly Outcome[]): void {
    const now = this.now();
    // Events of an embot that failed in this batch are dead-lettered (a superset of the ones it
    // did not get to): kept with the reason, never silently dropped.
    for (const o of outcomes) {
      for (const f of o.failures) {
        for (const ev of batch.events) if (this.embots.get(f.embotId)?.elementIds.includes(ev.elementId)) batch.dead.push({ embotId: f.embotId, event: ev, reason: `${f.error.code}: ${f.error.message}` });
      }
    }
    this.opts.store.transaction(() => {
      for (const o of outcomes) this.applyOutcome(o, now);
      for (const d of batch.dead) this.db.deadLetter(d.embotId, d.event, d.reason, now);
      for (const p of batch.parked) this.db.park(p.embotId, p.event, now);
      this.opts.sensors.complete(batch.seqs);
    });
    this.counters.batches++;
    this.counters.processed += batch.events.length;
    this.counters.deadLettered += batch.dead.length;
    this.counters.parked += batch.parked.length;
    this.emit('processed', batch.events);
    for (const o of outcomes) this.runOutbox(o);
    // Parked while its module loaded (or while older events waited): deliver them now.
    for (const id of new Set(batch.parked.map((p) => p.embotId))) if (this.embots.get(id)?.status !== 'unloaded') this.drainParked(id);
  }

  // ---- parked events ----

  /**
   * Delivers an embot's parked events to its module, oldest first, in the commit chain: a batch
   * committed before this step parked its events already, and one flushed after it parks behind
   * them until they are all delivered (see deliver), so the embot sees every event in order.
   */
  private drainParked(embotId: string): void {
    if (this.draining.has(embotId) || this.closed) return;
    this.draining.add(embotId);
    this.inFlight++;
    this.commitChain = this.commitChain
      .then(() => this.drainSteps(embotId))
      .catch((err: unknown) => {
        this.emit('log', { embotId, level: 'error', message: `delivering parked events failed: ${describeError(err)}` });
      })
      .finally(() => {
        this.draining.delete(embotId);
        this.settle();
      });
  }

  private async drainSteps(embotId: string): Promise<void> {
    for (;;) {
      const e = this.embots.get(embotId);
      if (e === undefined || this.closed || e.status === 'unloaded') return;
      const rows = this.db.parked(embotId, PARKED_BATCH);
      // Parked events not stored yet belong to a batch still to commit, which drains again.
      if (rows.length === 0) return;
      const host = e.status === 'running' ? this.modules.get(e.module)?.host : undefined;
      let outcome: Outcome | undefined;
      let failed: string | undefined;
      if (host === undefined) {
        failed = e.error ?? `embot is ${e.status}`;
      } else {
        try {
          outcome = await host.batch(rows.map((r) => ({ embotId, event: toPolicyEvent(r.event) })));
          const f = outcome.failures.find((x) => x.embotId === embotId);
          if (f !== undefined) failed = `${f.error.code}: ${f.error.message}`;
        } catch (err) {
          failed = describeError(err);
        }
      }
      this.commitParked(embotId, rows, outcome, failed);
      if (outcome !== undefined) this.runOutbox(outcome);
    }
  }

  /** One transaction: the policies' new states, the delivered events unparked (or dead-lettered with why). */
  private commitParked(embotId: string, rows: readonly ParkedEvent[], outcome: Outcome | undefined, failed: string | undefined): void {
    const now = this.now();
    this.opts.store.transaction(() => {
      if (outcome !== undefined) this.applyOutcome(outcome, now);
      if (failed !== undefined) for (const r of rows) this.db.deadLetter(embotId, r.event, failed, now);
      this.db.unpark(rows);
    });
    const live = this.embots.get(embotId);
    if (live !== undefined) live.parked = Math.max(0, live.parked - rows.length);
    if (failed !== undefined) this.counters.deadLettered += rows.length;
    else this.counters.unparked += rows.length;
  }

  /** Outcome of a delayed transition or a spawn: commit, then run the outbox. */
  private commitOutcome(o: Outcome): void {
    if (this.closed) return;
    const now = this.now();
    this.opts.store.transaction(() => this.applyOutcome(o, now));
    this.runOutbox(o);
  }

  private applyOutcome(o: Outcome, now: number): void {
    for (const u of o.updates) {
      const e = this.embots.get(u.embotId);
      if (!e || e.status !== 'running') continue;
      this.db.saveSnapshot(u.embotId, u.policy, u.state, now);
      e.views.set(u.policy, { name: u.policy, state: u.value, context: (u.state.snapshot as { context?: unknown } | null)?.context, updatedAt: now });
    }
    for (const f of o.failures) this.quarantine(f.embotId, f.error.code, f.error.message);
  }

  // ---- outbox ----

  private runOutbox(o: Outcome): void {
    for (const em of o.emits) this.raise(em);
    for (const ef of o.effects) void this.act(ef);
  }

  private raise(em: EmitRequest): void {
    if (this.embots.get(em.embotId)?.status !== 'running') return;
    if (!this.budget.take(em.embotId)) {
      this.counters.emitRejected++;
      this.quarantine(em.embotId, ErrorCodes.EMBOT_FLOOD, 'raised events faster than its module allows (limits.maxEmitsPerSecond)');
      return;
    }
    try {
      this.opts.sensors.post({ elementId: em.elementId, type: em.type, payload: em.payload, source: `embot:${em.embotId}` });
      this.counters.emits++;
    } catch (err) {
      this.counters.emitRejected++;
      this.emit('log', { embotId: em.embotId, level: 'warn', message: `raised an invalid event: ${describeError(err)}` });
    }
  }

  private async act(ef: EffectRequest): Promise<void> {
    if (this.embots.get(ef.embotId)?.status !== 'running') return;
    this.counters.effects++;
    const base = { effector: ef.effector, op: ef.op, ...(ef.tag === undefined ? {} : { tag: ef.tag }) };
    let type: 'EFFECT_DONE' | 'EFFECT_FAILED';
    let payload: Record<string, unknown>;
    try {
      const result = await this.opts.effectors.invoke(ef.effector, ef.op, ef.args, {
        mute: (elementId, sensorNames) => {
          const unmutes = sensorNames.map((s) => this.opts.sensors.mute(elementId, s));
          return () => unmutes.forEach((u) => u());
        },
      });
      type = 'EFFECT_DONE';
      payload = { ...base, result: result ?? null };
    } catch (err) {
      this.counters.effectFailures++;
      type = 'EFFECT_FAILED';
      payload = { ...base, error: { code: isEmbotError(err) ? err.code : ErrorCodes.EFFECTOR_FAILED, message: describeError(err) } };
    }
    if (this.closed) return;
    try {
      this.opts.sensors.post({ elementId: ef.elementId, type, payload, source: `effector:${ef.effector}` });
    } catch (err) {
      this.emit('log', { embotId: ef.embotId, level: 'error', message: `could not report effect outcome: ${describeError(err)}` });
    }
  }
}

function toPolicyEvent(event: EmbotEvent): PolicyEvent {
  return { type: event.type, id: event.id, ts: event.ts, elementId: event.elementId, payload: event.payload };
}

function rowOf(e: LiveEmbot): EmbotRow {
  return { id: e.id, module: e.module, type: e.type, elementIds: e.elementIds, status: e.status, error: e.error, createdAt: 0 };
}

function toInfo(e: LiveEmbot): EmbotInfo {
  return {
    id: e.id,
    module: e.module,
    type: e.type,
    elementIds: e.elementIds,
    status: e.status,
    ...(e.error ? { error: e.error } : {}),
    policies: e.policies.map((p) => e.views.get(p) ?? { name: p, state: null, updatedAt: 0 }),
  };
}
