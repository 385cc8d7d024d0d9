/**
 * Runs inside a worker thread: hosts every policy actor of one module. Plugin code runs only
 * here, so a throw marks one embot failed, and a hang or a crash is the host's to see and handle.
 */
import { parentPort } from 'node:worker_threads';
import * as xstate from 'xstate';
import { createActor, type AnyActorRef } from 'xstate';
import { describeError, ErrorCodes } from '../../core/errors.ts';
import { definePolicy, EMBOT_API_VERSION, type ModuleDefinition, type PolicyApi, type PolicyDefinition } from '../policy-api.ts';
import { pendingTimers, rearmTimers } from '../policy-timers.ts';
import { describeMachine, type PolicyChart } from '../policy-chart.ts';
import type { EffectRequest, EmbotFailure, EmbotSpawn, EmitRequest, HostToWorker, PolicyUpdate, WorkerToHost } from './worker-protocol.ts';
import { PROGRESS_ITEM, PROGRESS_REQ } from './worker-protocol.ts';

interface LiveEmbot {
  readonly elementId: string;
  readonly actors: Map<string, AnyActorRef>;
  failed: boolean;
}

const port = parentPort;
if (!port) throw new Error('module-worker must run in a worker thread');

let policies: Readonly<Record<string, PolicyDefinition>> = {};
let moduleConfig: Readonly<Record<string, unknown>> = {};
let progress: Int32Array<ArrayBufferLike> = new Int32Array(2);
const embots = new Map<string, LiveEmbot>();

// Outbox of the current request (or of spontaneous timer transitions between requests).
let touched = new Set<string>();
let effects: EffectRequest[] = [];
let emits: EmitRequest[] = [];
let failures: EmbotFailure[] = [];
let inRequest = false;
let timerFlushScheduled = false;

function post(msg: WorkerToHost): void {
  port!.postMessage(msg);
}

function fail(embotId: string, code: string, e: unknown): void {
  const live = embots.get(embotId);
  if (live && !live.failed) {
    live.failed = true;
    for (const a of live.actors.values()) a.stop();
  }
  failures.push({ embotId, error: { code, message: describeError(e) } });
}

function takeOutcome() {
  const updates: PolicyUpdate[] = [];
  for (const embotId of touched) {
    const live = embots.get(embotId);
    if (!live || live.failed) continue;
    for (const [policy, actor] of live.actors) {
      const snap = actor.getSnapshot();
      updates.push({ embotId, policy, value: snap.value, state: { snapshot: actor.getPersistedSnapshot(), timers: pendingTimers(actor) } });
    }
  }
  const out = { updates, effects, emits, failures };
  touched = new Set();
  effects = [];
  emits = [];
  failures = [];
  return out;
}

/** While an actor is started from a snapshot, its start is no change worth reporting. */
let restoring = false;

function onActorChange(embotId: string): void {
  if (restoring) return;
  touched.add(embotId);
  if (inRequest || timerFlushScheduled) return;
  // A delayed transition fired between requests: report it on its own.
  timerFlushScheduled = true;
  setImmediate(() => {
    timerFlushScheduled = false;
    if (touched.size || effects.length || emits.length || failures.length) post({ t: 'timer', ...takeOutcome() });
  });
}

function makeApi(embotId: string, elementId: string): PolicyApi {
  return {
    embotId,
    elementId,
    config: moduleConfig,
    effect(effector, op, args, options) {
      effects.push({ embotId, elementId, effector, op, args, ...(options?.tag === undefined ? {} : { tag: options.tag }) });
    },
    emit(type, payload, target) {
      emits.push({ embotId, elementId: target ?? elementId, type, payload: payload ?? null });
    },
    log(level, message, data) {
      post({ t: 'log', embotId, level, message, ...(data ? { data } : {}) });
    },
  };
}

function spawn(spec: EmbotSpawn): void {
  const existing = embots.get(spec.embotId);
  if (existing) for (const a of existing.actors.values()) a.stop();
  const live: LiveEmbot = { elementId: spec.elementId, actors: new Map(), failed: false };
  embots.set(spec.embotId, live);
  // A restored embot's state is already stored; only a fresh one (or a new policy) has one to persist.
  const fresh = !spec.restore || spec.policies.some((p) => !spec.restore![p]);
  if (fresh) touched.add(spec.embotId);
  const api = makeApi(spec.embotId, spec.elementId);
  for (const name of spec.policies) {
    const def = policies[name];
    if (!def) return fail(spec.embotId, ErrorCodes.POLICY_UNKNOWN, `module has no policy '${name}'`);
    const restore = spec.restore?.[name];
    try {
      const machine = def.create(api);
      const actor = createActor(machine, {
        input: { embotId: spec.embotId, elementId: spec.elementId, config: moduleConfig },
        ...(restore ? { snapshot: restore.snapshot as never } : {}),
      });
      actor.subscribe({
        next: () => onActorChange(spec.embotId),
        error: (err) => fail(spec.embotId, ErrorCodes.PLUGIN_CRASHED, err),
      });
      live.actors.set(name, actor);
      restoring = restore !== undefined;
      try {
        actor.start();
        if (restore) rearmTimers(actor, restore.timers);
      } finally {
        restoring = false;
      }
      if (actor.getSnapshot().status === 'error') return fail(spec.embotId, ErrorCodes.PLUGIN_CRASHED, actor.getSnapshot().error);
    } catch (e) {
      return fail(spec.embotId, ErrorCodes.PLUGIN_CRASHED, e);
    }
  }
}

function runBatch(reqId: number, items: Extract<HostToWorker, { t: 'batch' }>['items']): void {
  Atomics.store(progress, PROGRESS_REQ, reqId);
  for (let i = 0; i < items.length; i++) {
    Atomics.store(progress, PROGRESS_ITEM, i);
    const item = items[i]!;
    const live = embots.get(item.embotId);
    if (!live || live.failed) continue;
    touched.add(item.embotId);
    for (const actor of live.actors.values()) {
      try {
        actor.send(item.event);
      } catch (e) {
        fail(item.embotId, ErrorCodes.PLUGIN_CRASHED, e);
        break;
      }
      if (live.failed) break;
    }
  }
  Atomics.store(progress, PROGRESS_ITEM, -1);
}

async function init(msg: Extract<HostToWorker, { t: 'init' }>): Promise<void> {
  progress = new Int32Array(msg.progress);
  moduleConfig = msg.config;
  try {
    const mod = (await import(`data:text/javascript;base64,${Buffer.from(msg.code).toString('base64')}`)) as { default?: unknown };
    if (typeof mod.default !== 'function') throw new Error('the entry must `export default (kit) => ({ policies: {...} })`');
    const def = (mod.default as (kit: unknown) => ModuleDefinition)({ xstate, definePolicy, apiVersion: EMBOT_API_VERSION });
    if (!def || typeof def !== 'object' || typeof def.policies !== 'object' || def.policies === null) throw new Error('the entry returned no `policies` object');
    for (const [name, p] of Object.entries(def.policies)) {
      if (!p || typeof (p as PolicyDefinition).create !== 'function') throw new Error(`policy '${name}' is not a definePolicy(...) value`);
    }
    policies = def.policies;
    post({ t: 'ready', policies: Object.keys(policies), charts: chartsOf(policies) });
  } catch (e) {
    post({ t: 'init-failed', error: { code: ErrorCodes.PLUGIN_LOAD_FAILED, message: describeError(e) } });
  }
}

/**
 * Reads each policy's machine definition with an API that does nothing: building a machine runs
 * no actions, and a policy whose `create` throws just has no chart (it fails at spawn as before).
 */
function chartsOf(defs: Readonly<Record<string, PolicyDefinition>>): Record<string, PolicyChart> {
  const quiet: PolicyApi = { embotId: '', elementId: '', config: moduleConfig, effect() {}, emit() {}, log() {} };
  const charts: Record<string, PolicyChart> = {};
  for (const [name, def] of Object.entries(defs)) {
    try {
      const chart = describeMachine(def.create(quiet));
      if (chart) charts[name] = chart;
    } catch {
      /* no chart for this policy */
    }
  }
  return charts;
}

port.on('message', (msg: HostToWorker) => {
  switch (msg.t) {
    case 'init':
      void init(msg);
      return;
    case 'spawn':
      inRequest = true;
      for (const s of msg.embots) spawn(s);
      inRequest = false;
      post({ t: 'done', reqId: msg.reqId, ...takeOutcome() });
      return;
    case 'batch':
      inRequest = true;
      runBatch(msg.reqId, msg.items);
      inRequest = false;
      post({ t: 'done', reqId: msg.reqId, ...takeOutcome() });
      return;
    case 'stop':
      for (const id of msg.embotIds) {
        const live = embots.get(id);
        if (live) for (const a of live.actors.values()) a.stop();
        embots.delete(id);
        touched.delete(id);
      }
      post({ t: 'done', reqId: msg.reqId, updates: [], effects: [], emits: [], failures: [] });
      return;
  }
});
