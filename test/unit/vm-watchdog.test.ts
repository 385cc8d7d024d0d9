import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import * as xstate from 'xstate';
import { createActor } from 'xstate';
import { definePolicy, EMBOT_API_VERSION, type ModuleKit, type PolicyEvent as Ev } from '../../embots/policy-api.ts';
import entry, {
  WATCHDOG_DEFAULTS,
  backoffDelay,
  createWatchdogMachine,
  readWatchdogConfig,
  restartTag,
  type WatchdogConfig,
} from '../../plugins/vm-watchdog/index.ts';
import { allStateIds, TransitionCoverage } from '../harness/coverage.ts';
import { edgeGraph, replayEveryEdge, sendAnsweringAttempt, type GraphSnapshot } from '../harness/path-replay.ts';
import { expectTypeOnlyImports, readPluginManifest } from '../harness/plugin-files.ts';
import { RecordingPolicyApi } from '../harness/policy-api-double.ts';
import { eventBuilder, outcomeBuilder } from '../harness/policy-events.ts';

const PLUGIN_DIR = new URL('../../plugins/vm-watchdog/', import.meta.url);

const ev = eventBuilder('vm:web-1');
const outcome = outcomeBuilder(ev, { effector: 'hypervisor', op: 'start', error: { code: 'EMBOT_ERR_VM_BAD_STATE', message: 'no can do' } });

function start(config: Partial<WatchdogConfig> = {}) {
  const api = new RecordingPolicyApi(config);
  const actor = createActor(createWatchdogMachine(xstate, api)).start();
  const send = (e: Ev) => actor.send(e as never);
  const lastTag = () => api.effects.at(-1)?.tag ?? 'none';
  const state = () => actor.getSnapshot().value;
  return { api, actor, send, lastTag, state };
}

describe('vm-watchdog manifest and module', () => {
  it('has a manifest that ManifestSchema accepts, with the config defaults the policy uses', () => {
    const manifest = readPluginManifest(PLUGIN_DIR);
    expect(manifest).toMatchObject({ name: 'vm-watchdog', embotApi: EMBOT_API_VERSION, entry: 'index.ts' });
    expect(manifest.embots).toEqual([{ type: 'watchdog', attachTo: { kind: 'vm' }, policies: ['watchdog'] }]);
    expect(manifest.config).toEqual({ ...WATCHDOG_DEFAULTS });
  });

  it('exports, through the kit, every policy its manifest names', () => {
    const kit: ModuleKit = { xstate, definePolicy, apiVersion: EMBOT_API_VERSION };
    const manifest = readPluginManifest(PLUGIN_DIR);
    const mod = entry(kit);
    for (const name of manifest.embots.flatMap((e) => e.policies)) {
      expect(mod.policies[name]?.name).toBe(name);
      const machine = mod.policies[name].create(new RecordingPolicyApi(manifest.config));
      expect(createActor(machine).start().getSnapshot().value).toEqual({ watching: 'settling' });
    }
  });

  it('imports nothing at run time (only `import type`)', () => {
    expectTypeOnlyImports(PLUGIN_DIR);
  });

  it.each([
    ['maxCrashes', 0],
    ['maxCrashes', 1.5],
    ['windowMs', -1],
    ['backoffMs', '5s'],
    ['maxBackoffs', -1],
    ['stableMs', null],
  ])('refuses config %s = %j with a readable error naming the key', (key, value) => {
    expect(() => readWatchdogConfig({ [key]: value })).toThrow(new RegExp(`vm-watchdog: config\\.${key} must be`));
    expect(() => createWatchdogMachine(xstate, new RecordingPolicyApi({ [key]: value }))).toThrow(/vm-watchdog/);
  });

  it('fills missing config keys from the defaults', () => {
    expect(readWatchdogConfig({ maxCrashes: 5 })).toEqual({ ...WATCHDOG_DEFAULTS, maxCrashes: 5 });
  });
});

describe('vm-watchdog policy behaviour', () => {
  beforeEach(() => {
    vi.useFakeTimers();
    vi.setSystemTime(1_000_000);
  });
  afterEach(() => vi.useRealTimers());

  it('restarts a crashed VM once and goes back to watching when the restart is done', () => {
    const { api, send, state, lastTag } = start();
    send(ev('VM_CRASHED'));
    expect(state()).toBe('restarting');
    expect(api.effects).toEqual([{ effector: 'hypervisor', op: 'start', args: { vm: 'web-1' }, tag: restartTag(1) }]);
    send(outcome('EFFECT_DONE', lastTag()));
    expect(state()).toEqual({ watching: 'settling' });
    expect(api.effects).toHaveLength(1);
    expect(api.emits).toEqual([]);
  });

  it('ignores the outcome of an older restart and of other effects', () => {
    const { send, state, lastTag } = start();
    send(ev('VM_CRASHED'));
    const first = lastTag();
    send(ev('VM_CRASHED')); // crashed again before the outcome: a new restart
    send(outcome('EFFECT_DONE', first));
    expect(state()).toBe('restarting');
    send(ev('EFFECT_DONE', { effector: 'hypervisor', op: 'stop', tag: lastTag() }));
    expect(state()).toBe('restarting');
    send(outcome('EFFECT_DONE', lastTag()));
    expect(state()).toEqual({ watching: 'settling' });
  });

  it('backs off after maxCrashes crashes in the window, doubling each time, then gives up with a critical ALERT', () => {
    const { api, send, state, lastTag } = start();
    for (let i = 0; i < 2; i++) {
      send(ev('VM_CRASHED'));
      send(outcome('EFFECT_DONE', lastTag()));
    }
    expect(api.effects).toHaveLength(2);

    for (const wait of [5_000, 10_000, 20_000]) {
      send(ev('VM_CRASHED'));
      expect(state()).toBe('backingOff');
      const before = api.effects.length;
      vi.advanceTimersByTime(wait - 1);
      expect(api.effects.length).toBe(before); // still waiting
      vi.advanceTimersByTime(1);
      expect(state()).toBe('restarting');
      expect(api.effects.length).toBe(before + 1);
      expect(api.logs.at(-1)?.message).toContain(`waiting ${wait} ms`);
      send(outcome('EFFECT_DONE', lastTag()));
    }

    send(ev('VM_CRASHED'));
    expect(state()).toBe('gaveUp');
    expect(api.emits).toEqual([
      {
        type: 'ALERT',
        payload: expect.objectContaining({ severity: 'critical', vm: 'web-1', crashes: 3, reason: expect.stringMatching(/crashed 3 times.*3 back-offs.*gave up/) }),
      },
    ]);
    const effects = api.effects.length;
    vi.advanceTimersByTime(10 * 60_000);
    expect(api.effects.length).toBe(effects); // stays given up

    send(ev('VM_STARTED')); // an operator started it
    expect(state()).toEqual({ watching: 'settling' });
    send(ev('VM_CRASHED')); // counters were reset: a plain restart
    expect(state()).toBe('restarting');
  });

  it('counts only crashes inside the sliding window', () => {
    const { api, send, state, lastTag } = start({ windowMs: 10_000, stableMs: 1_000_000 });
    for (let i = 0; i < 6; i++) {
      send(ev('VM_CRASHED'));
      expect(state()).toBe('restarting');
      send(outcome('EFFECT_DONE', lastTag()));
      vi.advanceTimersByTime(6_000); // at most two crashes share a window
    }
    expect(api.effects).toHaveLength(6);
  });

  it('forgives crashes and back-offs after the VM stays up for stableMs', () => {
    const { api, send, state, lastTag } = start({ stableMs: 30_000 });
    for (let i = 0; i < 2; i++) {
      send(ev('VM_CRASHED'));
      send(outcome('EFFECT_DONE', lastTag()));
    }
    vi.advanceTimersByTime(29_999);
    expect(state()).toEqual({ watching: 'settling' });
    vi.advanceTimersByTime(1);
    expect(state()).toEqual({ watching: 'stable' });
    send(ev('VM_CRASHED'));
    expect(state()).toBe('restarting'); // would be backingOff had the two earlier crashes still counted
    expect(api.effects).toHaveLength(3);
  });

  it('backs off when a restart fails, and gives up when failures outlast maxBackoffs', () => {
    const { api, send, state, lastTag } = start({ maxBackoffs: 2 });
    send(ev('VM_CRASHED'));
    send(outcome('EFFECT_FAILED', lastTag()));
    expect(state()).toBe('backingOff');
    vi.advanceTimersByTime(5_000);
    send(outcome('EFFECT_FAILED', lastTag()));
    expect(state()).toBe('backingOff');
    vi.advanceTimersByTime(10_000);
    expect(state()).toBe('restarting');
    send(outcome('EFFECT_FAILED', lastTag()));
    expect(state()).toBe('gaveUp');
    expect(api.emits).toEqual([
      { type: 'ALERT', payload: expect.objectContaining({ severity: 'critical', vm: 'web-1', reason: expect.stringContaining('no can do') }) },
    ]);
  });

  it('respects a deliberate stop: no restart until the VM is started again', () => {
    const { api, send, state } = start();
    send(ev('VM_STOPPED'));
    expect(state()).toBe('stoppedByOperator');
    vi.advanceTimersByTime(120_000);
    expect(api.effects).toEqual([]);
    send(ev('VM_STARTED'));
    expect(state()).toEqual({ watching: 'settling' });
  });

  it('resumes duty when a VM it stopped watching crashes (it was started unseen)', () => {
    const { api, send, state } = start();
    send(ev('VM_STOPPED'));
    send(ev('VM_CRASHED'));
    expect(state()).toBe('restarting');
    expect(api.effects).toHaveLength(1);
  });

  it('restarts from the backoff delay the machine names, swappable with provide()', () => {
    const api = new RecordingPolicyApi({ maxCrashes: 1 });
    const machine = createWatchdogMachine(xstate, api).provide({ delays: { backoff: 7 } });
    const actor = createActor(machine).start();
    actor.send(ev('VM_CRASHED') as never);
    expect(actor.getSnapshot().value).toBe('backingOff');
    vi.advanceTimersByTime(7);
    expect(actor.getSnapshot().value).toBe('restarting');
  });

  it('has a persisted snapshot that survives JSON and resumes where it was', () => {
    const { actor, send, lastTag } = start();
    send(ev('VM_CRASHED'));
    send(outcome('EFFECT_FAILED', lastTag()));
    const saved = JSON.parse(JSON.stringify(actor.getPersistedSnapshot()));
    const api = new RecordingPolicyApi();
    const restored = createActor(createWatchdogMachine(xstate, api), { snapshot: saved }).start();
    expect(restored.getSnapshot().value).toBe('backingOff');
    expect(restored.getSnapshot().context).toMatchObject({ crashes: [1_000_000], backoffs: 1, attempt: 1 });
  });

  it('computes doubling back-offs', () => {
    expect([1, 2, 3, 4].map((n) => backoffDelay(n, WATCHDOG_DEFAULTS))).toEqual([5_000, 10_000, 20_000, 40_000]);
  });
});

// ---- coverage of every state and every transition, paths generated with @xstate/graph ----

type AnySnap = GraphSnapshot<{ crashes: readonly number[]; backoffs: number; attempt: number }>;

const abstract = (s: AnySnap): string => JSON.stringify([s.value, s.context.crashes.length, s.context.backoffs]);
const AFTER_STABLE = 'xstate.after.stablePeriod.watchdog.watching.settling';
const AFTER_BACKOFF = 'xstate.after.backoff.watchdog.backingOff';

/** Events offered in each state; delayed ones only where their timer runs, as time is global. */
function eventsFor(s: AnySnap): Ev[] {
  const tag = restartTag(s.context.attempt);
  const events = [
    ev('VM_CRASHED'),
    ev('VM_STARTED'),
    ev('VM_STOPPED'),
    outcome('EFFECT_DONE', tag),
    outcome('EFFECT_FAILED', tag),
    outcome('EFFECT_DONE', 'stale'),
  ];
  if (s.matches({ watching: 'settling' })) events.push({ type: AFTER_STABLE } as Ev);
  if (s.matches('backingOff')) events.push({ type: AFTER_BACKOFF } as Ev);
  return events;
}

describe.each([
  // With maxCrashes < 3 a crash while restarting always spends the budget: the plain-restart
  // branch there is unreachable, so coverage needs at least 3.
  ['a single back-off', { maxCrashes: 3, maxBackoffs: 1 }],
  ['the shipped defaults', {}],
])('vm-watchdog coverage with %s', (_name, budgets) => {
  // A window wider than any path: which crashes count is tested above, here every crash counts.
  const config = { ...budgets, windowMs: 1e12 };
  const cfg = readWatchdogConfig(config);

  beforeEach(() => {
    vi.useFakeTimers();
    vi.setSystemTime(1_000_000);
  });
  afterEach(() => vi.useRealTimers());

  it('replays a shortest path to every state plus every event from it, reaching every state and every transition', () => {
    const model = createWatchdogMachine(xstate, new RecordingPolicyApi(config));
    const graph = edgeGraph(model, { events: eventsFor, abstract });
    expect(graph.edges.length).toBeGreaterThan(20);

    const coverage = new TransitionCoverage(model);
    replayEveryEdge(graph, () => createActor(createWatchdogMachine(xstate, new RecordingPolicyApi(config)), { inspect: coverage.inspect }).start(), {
      abstract,
      delayOf: (e, before) => (e.type === AFTER_STABLE ? cfg.stableMs : e.type === AFTER_BACKOFF ? backoffDelay(before.context.backoffs, cfg) : undefined),
      send: sendAnsweringAttempt(outcome, (before: AnySnap) => restartTag(before.context.attempt)),
    });

    expect(coverage.missingTransitions()).toEqual([]);
    expect(coverage.missingStates()).toEqual([]);
    expect(allStateIds(model)).toEqual(
      expect.arrayContaining(['watchdog.watching.settling', 'watchdog.watching.stable', 'watchdog.restarting', 'watchdog.backingOff', 'watchdog.stoppedByOperator', 'watchdog.gaveUp']),
    );
  });
});
