import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import * as xstate from 'xstate';
import { createActor } from 'xstate';
import { definePolicy, EMBOT_API_VERSION, type ModuleKit, type PolicyEvent as Ev } from '../../embots/policy-api.ts';
import entry, {
  HOST_LOAD_DEFAULTS,
  busiestVm,
  createHostLoadMachine,
  parseReading,
  readHostLoadConfig,
  type HostLoadConfig,
} from '../../plugins/host-load/index.ts';
import { allStateIds, TransitionCoverage } from '../harness/coverage.ts';
import { edgeGraph, replayEveryEdge, type GraphSnapshot } from '../harness/path-replay.ts';
import { expectTypeOnlyImports, readPluginManifest } from '../harness/plugin-files.ts';
import { RecordingPolicyApi as PolicyApiDouble } from '../harness/policy-api-double.ts';
import { eventBuilder } from '../harness/policy-events.ts';

const PLUGIN_DIR = new URL('../../plugins/host-load/', import.meta.url);

/** The policy API of the load-monitor embot on host h1. */
const recordingApi = (config: Readonly<Record<string, unknown>> = {}) => new PolicyApiDouble(config, 'host:h1', 'embot-host');

const ev = eventBuilder('host:h1');
const VMS = [
  { name: 'db-1', load: 0.4 },
  { name: 'web-1', load: 0.9 },
  { name: 'web-2', load: 0.9 },
];
const high = (load = 0.95, topVms: unknown = VMS) => ev('HOST_LOAD', { load, topVms });
const low = (load = 0.3) => ev('HOST_LOAD', { load, topVms: VMS });

function start(config: Partial<HostLoadConfig> = {}) {
  const api = recordingApi(config);
  const actor = createActor(createHostLoadMachine(xstate, api)).start();
  return { api, send: (e: Ev) => actor.send(e as never), state: () => actor.getSnapshot().value, actor };
}

describe('host-load manifest and module', () => {
  it('has a manifest that ManifestSchema accepts, with the config defaults the policy uses', () => {
    const manifest = readPluginManifest(PLUGIN_DIR);
    expect(manifest).toMatchObject({ name: 'host-load', embotApi: EMBOT_API_VERSION, entry: 'index.ts' });
    expect(manifest.embots).toEqual([{ type: 'load-monitor', attachTo: { kind: 'host' }, policies: ['host-load'] }]);
    expect(manifest.config).toEqual({ ...HOST_LOAD_DEFAULTS });
  });

  it('exports, through the kit, every policy its manifest names', () => {
    const kit: ModuleKit = { xstate, definePolicy, apiVersion: EMBOT_API_VERSION };
    const manifest = readPluginManifest(PLUGIN_DIR);
    const mod = entry(kit);
    for (const name of manifest.embots.flatMap((e) => e.policies)) {
      expect(mod.policies[name]?.name).toBe(name);
      expect(createActor(mod.policies[name].create(recordingApi(manifest.config))).start().getSnapshot().value).toBe('normal');
    }
  });

  it('imports nothing at run time (only `import type`)', () => {
    expectTypeOnlyImports(PLUGIN_DIR);
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
    expect(() => createHostLoadMachine(xstate, recordingApi({ [key]: value }))).toThrow(/host-load/);
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
    const machine = createHostLoadMachine(xstate, recordingApi()).provide({
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
    const restored = createActor(createHostLoadMachine(xstate, recordingApi()), { snapshot: saved }).start();
    expect(restored.getSnapshot().value).toBe('elevated');
    expect(restored.getSnapshot().context.reading?.load).toBe(0.93);
  });
});

// ---- coverage of every state and every transition, paths generated with @xstate/graph ----

type AnySnap = GraphSnapshot;

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
    const model = createHostLoadMachine(xstate, recordingApi());
    const graph = edgeGraph(model, { events: eventsFor, abstract });
    expect(graph.edges.length).toBeGreaterThan(15);

    const coverage = new TransitionCoverage(model);
    replayEveryEdge(graph, () => createActor(createHostLoadMachine(xstate, recordingApi()), { inspect: coverage.inspect }).start(), {
      abstract,
      delayOf: (e) => (e.type === AFTER_SUSTAINED ? cfg.durationMs : e.type === AFTER_COOLDOWN ? cfg.cooldownMs : undefined),
      send: (actor, e) => actor.send(e),
    });

    expect(coverage.missingTransitions()).toEqual([]);
    expect(coverage.missingStates()).toEqual([]);
    expect(allStateIds(model)).toEqual(expect.arrayContaining(['host-load.normal', 'host-load.elevated', 'host-load.overloaded', 'host-load.coolingDown']));
  });
});
