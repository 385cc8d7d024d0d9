import { readFileSync } from 'node:fs';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import * as xstate from 'xstate';
import { createActor, type AnyStateMachine, type Snapshot } from 'xstate';
import { getAdjacencyMap, adjacencyMapToArray, getShortestPaths, getStateNodes } from '@xstate/graph';
import { ManifestSchema } from '../../core/plugins/manifest.ts';
import { definePolicy, EMBOT_API_VERSION, type ModuleKit, type PolicyApi } from '../../embots/policy-api.ts';
import entry, {
  HOST_LOAD_DEFAULTS,
  busiestVm,
  createHostLoadMachine,
  parseReading,
  readHostLoadConfig,
  type HostLoadConfig,
} from '../../plugins/host-load/index.ts';

const PLUGIN_DIR = new URL('../../plugins/host-load/', import.meta.url);

/** Test double of the runtime's PolicyApi: records what the policy asks for. */
class RecordingPolicyApi implements PolicyApi {
  readonly embotId = 'embot-host';
  readonly effects: { effector: string; op: string }[] = [];
  readonly emits: { type: string; payload: unknown }[] = [];
  readonly logs: { level: string; message: string }[] = [];
  constructor(
    readonly config: Readonly<Record<string, unknown>> = {},
    readonly elementId = 'host:h1',
  ) {}
  effect(effector: string, op: string): void {
    this.effects.push({ effector, op });
  }
  emit(type: string, payload?: unknown): void {
    this.emits.push({ type, payload });
  }
  log(level: 'debug' | 'info' | 'warn' | 'error', message: string): void {
    this.logs.push({ level, message });
  }
}

type Ev = { type: string; id: string; ts: number; elementId: string; payload: unknown };
let seq = 0;
const ev = (type: string, payload: unknown): Ev => ({ type, id: `e${seq++}`, ts: Date.now(), elementId: 'host:h1', payload });
const VMS = [
  { name: 'db-1', load: 0.4 },
  { name: 'web-1', load: 0.9 },
  { name: 'web-2', load: 0.9 },
];
const high = (load = 0.95, topVms: unknown = VMS) => ev('HOST_LOAD', { load, topVms });
const low = (load = 0.3) => ev('HOST_LOAD', { load, topVms: VMS });

function start(config: Partial<HostLoadConfig> = {}) {
  const api = new RecordingPolicyApi(config);
  const actor = createActor(createHostLoadMachine(xstate, api)).start();
  return { api, send: (e: Ev) => actor.send(e as never), state: () => actor.getSnapshot().value, actor };
}

describe('host-load manifest and module', () => {
  it('has a manifest that ManifestSchema accepts, with the config defaults the policy uses', () => {
    const manifest = ManifestSchema.parse(JSON.parse(readFileSync(new URL('manifest.json', PLUGIN_DIR), 'utf8')));
    expect(manifest).toMatchObject({ name: 'host-load', embotApi: EMBOT_API_VERSION, entry: 'index.ts' });
    expect(manifest.embots).toEqual([{ type: 'load-monitor', attachTo: { kind: 'host' }, policies: ['host-load'] }]);
    expect(manifest.config).toEqual({ ...HOST_LOAD_DEFAULTS });
  });

  it('exports, through the kit, every policy its manifest names', () => {
    const kit: ModuleKit = { xstate, definePolicy, apiVersion: EMBOT_API_VERSION };
    const manifest = ManifestSchema.parse(JSON.parse(readFileSync(new URL('manifest.json', PLUGIN_DIR), 'utf8')));
    const mod = entry(kit);
    for (const name of manifest.embots.flatMap((e) => e.policies)) {
      expect(mod.policies[name]?.name).toBe(name);
      expect(createActor(mod.policies[name].create(new RecordingPolicyApi(manifest.config))).start().getSnapshot().value).toBe('normal');
    }
  });

  it('imports nothing at run time (only `import type`)', () => {
    const src = readFileSync(new URL('index.ts', PLUGIN_DIR), 'utf8');
    const imports = src.split('\n').filter((l) => /^\s*import\s/.test(l));
    expect(imports.length).toBeGreaterThan(0);
    for (const line of imports) expect(line).toMatch(/^import type /);
    expect(src).not.toMatch(/\bimport\s*\(/);
  });

  it.each([
    ['threshold', 0],
    ['threshold', 1.5],
    ['threshold', '0.8'],
    ['durationMs', 0],
    ['durationMs', 2.5],
    ['cooldownMs', null],
  ])('refuses config %s = %j with a readable error naming the key', (key, value) => {
    expect(() => readHostLoadConfig({ [key]: value })).toThrow(new RegExp(`host-load: config\\.${key} must be`));
    expect(() => createHostLoadMachine(xstate, new RecordingPolicyApi({ [key]: value }))).toThrow(/host-load/);
  });

  it('parses readings, dropping malformed VM entries, and picks the busiest VM (first of equals)', () => {
    expect(parseReading({ load: 0.5 })).toEqual({ load: 0.5, topVms: [] });
    expect(parseReading({ load: 0.5, topVms: [{ name: 'a', load: 0.1 }, { name: '', load: 1 }, { name: 'b' }, 'x', null] })).toEqual({
      load: 0.5,
      topVms: [{ name: 'a', load: 0.1 }],
    });
    for (const bad of [null, 'x', 7, {}, { load: '0.9' }, { load: NaN }, { load: -1 }, { load: Infinity }, { load: 0.9, topVms: 'web-1' }]) {
      expect(parseReading(bad)).toBeUndefined();
    }
    expect(busiestVm(parseReading({ load: 1, topVms: VMS }) ?? null)).toEqual({ name: 'web-1', load: 0.9 });
    expect(busiestVm(null)).toBeUndefined();
  });
});

describe('host-load policy behaviour', () => {
  beforeEach(() => {
    vi.useFakeTimers();
    vi.setSystemTime(2_000_000);
  });
  afterEach(() => vi.useRealTimers());

  it('recommends migrating the busiest VM once load stays above the threshold for durationMs, then cools down', () => {
    const { api, send, state } = start();
    send(high(0.85));
    expect(state()).toBe('elevated');
    vi.advanceTimersByTime(5_000);
    send(high(0.92)); // still above: the timer keeps running, the latest reading is kept
    vi.advanceTimersByTime(4_999);
    expect(api.emits).toEqual([]);
    vi.advanceTimersByTime(1);
    expect(state()).toBe('coolingDown');
    expect(api.emits).toEqual([
      {
        type: 'MIGRATION_RECOMMENDED',
        payload: { vm: 'web-1', vmLoad: 0.9, load: 0.92, reason: expect.stringContaining('stayed above 0.8 for 10000 ms') },
      },
    ]);
    expect(api.effects).toEqual([]); // a recommendation, not an action

    // No new recommendation while cooling down, however high the load.
    send(high(0.99));
    vi.advanceTimersByTime(29_999);
    expect(api.emits).toHaveLength(1);
    vi.advanceTimersByTime(1);
    expect(state()).toBe('elevated'); // the last reading was still above
    vi.advanceTimersByTime(10_000);
    expect(api.emits).toHaveLength(2);
    expect(api.emits[1]).toMatchObject({ type: 'MIGRATION_RECOMMENDED', payload: { vm: 'web-1', load: 0.99 } });
  });

  it('returns to normal when a reading at or below the threshold arrives before durationMs', () => {
    const { api, send, state } = start();
    send(high());
    vi.advanceTimersByTime(9_999);
    send(ev('HOST_LOAD', { load: 0.8, topVms: VMS })); // equal is not above
    expect(state()).toBe('normal');
    vi.advanceTimersByTime(60_000);
    expect(api.emits).toEqual([]);
  });

  it('stays normal on readings at or below the threshold', () => {
    const { send, state } = start();
    send(low());
    send(ev('HOST_LOAD', { load: 0.8 }));
    expect(state()).toBe('normal');
  });

  it('raises an ALERT instead when no VM is reported to move', () => {
    const { api, send, state } = start();
    send(high(0.9, []));
    vi.advanceTimersByTime(10_000);
    expect(state()).toBe('coolingDown');
    expect(api.emits).toEqual([{ type: 'ALERT', payload: { severity: 'warning', load: 0.9, reason: expect.stringContaining('no VM') } }]);
  });

  it('goes back to normal after the cooldown if the last reading was low', () => {
    const { send, state } = start({ cooldownMs: 1_000 });
    send(high());
    vi.advanceTimersByTime(10_000);
    send(low());
    expect(state()).toBe('coolingDown');
    vi.advanceTimersByTime(1_000);
    expect(state()).toBe('normal');
  });

  it.each([
    ['a payload without load', { topVms: VMS }],
    ['a string load', { load: 'high' }],
    ['no payload', null],
    ['topVms not an array', { load: 0.99, topVms: 'web-1' }],
  ])('ignores %s with a warning in every state, losing no state', (_what, payload) => {
    const { api, send, state, actor } = start();
    send(ev('HOST_LOAD', payload));
    expect(state()).toBe('normal');
    send(high());
    const context = actor.getSnapshot().context;
    send(ev('HOST_LOAD', payload));
    expect(state()).toBe('elevated');
    expect(actor.getSnapshot().context).toEqual(context);
    vi.advanceTimersByTime(10_000);
    send(ev('HOST_LOAD', payload));
    expect(state()).toBe('coolingDown');
    expect(api.logs.filter((l) => l.level === 'warn')).toHaveLength(3);
  });

  it('swaps actions and delays through provide()', () => {
    const recommended: unknown[] = [];
    const machine = createHostLoadMachine(xstate, new RecordingPolicyApi()).provide({
      actions: { recommendMigration: ({ context }) => void recommended.push(context.reading?.load) },
      delays: { sustained: 5 },
    });
    const actor = createActor(machine).start();
    actor.send(high(0.97) as never);
    vi.advanceTimersByTime(5);
    expect(recommended).toEqual([0.97]);
  });

  it('has a persisted snapshot that survives JSON', () => {
    const { send, actor } = start();
    send(high(0.93));
    const saved = JSON.parse(JSON.stringify(actor.getPersistedSnapshot()));
    const restored = createActor(createHostLoadMachine(xstate, new RecordingPolicyApi()), { snapshot: saved }).start();
    expect(restored.getSnapshot().value).toBe('elevated');
    expect(restored.getSnapshot().context.reading?.load).toBe(0.93);
  });
});

// ---- coverage of every state and every transition, paths generated with @xstate/graph ----

type AnySnap = Snapshot<unknown> & { value: unknown; context: unknown; matches(v: unknown): boolean };
type Transition = { source: AnyStateMachine['root']; eventType: string };

/** `<state id>|<event>|<candidate index>` for every transition candidate the machine defines. */
function allTransitions(machine: AnyStateMachine): Set<string> {
  const keys = new Set<string>();
  for (const node of [machine.root, ...getStateNodes(machine.root)]) {
    for (const [event, defs] of node.transitions) defs.forEach((_d: unknown, i: number) => keys.add(`${node.id}|${event}|${i}`));
    node.always?.forEach((_d: unknown, i: number) => keys.add(`${node.id}|always|${i}`));
  }
  return keys;
}

function transitionKey(t: Transition): string {
  const always = t.source.always?.indexOf(t as never) ?? -1;
  if (always >= 0) return `${t.source.id}|always|${always}`;
  return `${t.source.id}|${t.eventType}|${t.source.transitions.get(t.eventType)?.indexOf(t as never)}`;
}

const abstract = (s: AnySnap): string => JSON.stringify([s.value, s.context]);
const AFTER_SUSTAINED = 'xstate.after.sustained.host-load.elevated';
const AFTER_COOLDOWN = 'xstate.after.cooldown.host-load.coolingDown';

/** Events offered in each state; delayed ones only where their timer runs, as time is global. */
function eventsFor(s: AnySnap): Ev[] {
  const events = [high(0.95), high(0.9, []), low(0.3), ev('HOST_LOAD', { load: 0.8 }), ev('HOST_LOAD', { load: 'high' })];
  if (s.matches('elevated')) events.push({ type: AFTER_SUSTAINED } as Ev);
  if (s.matches('coolingDown')) events.push({ type: AFTER_COOLDOWN } as Ev);
  return events;
}

describe('host-load coverage', () => {
  beforeEach(() => vi.useFakeTimers());
  afterEach(() => vi.useRealTimers());

  it('replays a shortest path to every state plus every event from it, reaching every state and every transition', () => {
    const cfg = readHostLoadConfig({});
    const model = createHostLoadMachine(xstate, new RecordingPolicyApi());
    const options = { events: (s: AnySnap) => eventsFor(s), serializeState: (s: AnySnap) => abstract(s) };
    const pathTo = new Map(getShortestPaths(model, options as never).map((p) => [abstract(p.state as AnySnap), p]));
    const edges = adjacencyMapToArray(getAdjacencyMap(model, options as never));
    expect(edges.length).toBeGreaterThan(15);

    const taken = new Set<string>();
    const visited = new Set<string>();
    for (const edge of edges) {
      const path = pathTo.get(abstract(edge.state as AnySnap));
      expect(path, `no path to ${abstract(edge.state as AnySnap)}`).toBeDefined();
      const steps = [...path!.steps.slice(1).map((s) => ({ event: s.event as Ev, expect: s.state as AnySnap })), { event: edge.event as Ev, expect: edge.nextState as AnySnap }];

      vi.clearAllTimers();
      const actor = createActor(createHostLoadMachine(xstate, new RecordingPolicyApi()), {
        inspect: (i) => {
          if (i.type !== '@xstate.microstep') return;
          for (const t of (i as unknown as { _transitions: Transition[] })._transitions) taken.add(transitionKey(t));
          for (const node of (i.snapshot as unknown as { _nodes: { id: string }[] })._nodes) visited.add(node.id);
        },
      }).start();

      for (const step of steps) {
        const before = abstract(actor.getSnapshot() as unknown as AnySnap);
        const e = step.event;
        if (e.type === AFTER_SUSTAINED || e.type === AFTER_COOLDOWN) {
          const delay = e.type === AFTER_SUSTAINED ? cfg.durationMs : cfg.cooldownMs;
          vi.advanceTimersByTime(delay - 1);
          expect(abstract(actor.getSnapshot() as unknown as AnySnap)).toBe(before);
          vi.advanceTimersByTime(1);
        } else {
          actor.send(e as never);
        }
        expect(abstract(actor.getSnapshot() as unknown as AnySnap), `after ${e.type} from ${before}`).toBe(abstract(step.expect));
      }
      actor.stop();
    }

    expect([...allTransitions(model)].filter((k) => !taken.has(k))).toEqual([]);
    const stateIds = [model.root, ...getStateNodes(model.root)].map((n) => n.id);
    expect(stateIds.filter((id) => !visited.has(id))).toEqual([]);
    expect(stateIds).toEqual(expect.arrayContaining(['host-load.normal', 'host-load.elevated', 'host-load.overloaded', 'host-load.coolingDown']));
  });
});
