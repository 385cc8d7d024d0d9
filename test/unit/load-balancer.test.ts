import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import * as xstate from 'xstate';
import { createActor } from 'xstate';
import { definePolicy, EMBOT_API_VERSION, type ModuleKit, type PolicyEvent as Ev } from '../../embots/policy-api.ts';
import entry, {
  BALANCER_DEFAULTS,
  createBalancerMachine,
  migrateTag,
  parseRecommendation,
  readBalancerConfig,
  type BalancerConfig,
  type BalancerContext,
} from '../../plugins/load-balancer/index.ts';
import { allStateIds, TransitionCoverage } from '../harness/coverage.ts';
import { edgeGraph, replayEveryEdge, sendAnsweringAttempt, type GraphSnapshot } from '../harness/path-replay.ts';
import { expectTypeOnlyImports, readPluginManifest } from '../harness/plugin-files.ts';
import { RecordingPolicyApi as PolicyApiDouble } from '../harness/policy-api-double.ts';
import { eventBuilder, outcomeBuilder } from '../harness/policy-events.ts';

const PLUGIN_DIR = new URL('../../plugins/load-balancer/', import.meta.url);

/** The policy API of the balancer embot on host a. */
const recordingApi = (config: Readonly<Record<string, unknown>> = {}) => new PolicyApiDouble(config, 'host:a', 'embot-balancer');

const ev = eventBuilder('host:a');
const recommend = (vm = 'web-1', extra: Record<string, unknown> = {}) => ev('MIGRATION_RECOMMENDED', { vm, vmLoad: 0.9, load: 0.9, reason: 'host load stayed high', ...extra });
const outcome = outcomeBuilder(ev, {
  effector: 'mobility',
  op: 'migrate',
  result: { migrationId: 'm1', vm: 'web-1', from: 'a', to: 'b', outcome: 'completed', totalMs: 40 },
  error: { code: 'EMBOT_ERR_EFFECTOR_FAILED', message: 'could not migrate web-1: b: denied (not enough memory)' },
});

function start(config: Partial<BalancerConfig> = {}) {
  const api = recordingApi(config);
  const actor = createActor(createBalancerMachine(xstate, api)).start();
  const send = (e: Ev) => actor.send(e as never);
  const lastTag = () => api.effects.at(-1)?.tag ?? 'none';
  const state = () => actor.getSnapshot().value;
  const context = () => actor.getSnapshot().context;
  return { api, actor, send, lastTag, state, context };
}

describe('load-balancer manifest and module', () => {
  const manifest = () => readPluginManifest(PLUGIN_DIR);

  it('has a manifest that ManifestSchema accepts: a balancer embot on every host, with the defaults the policy uses', () => {
    expect(manifest()).toMatchObject({ name: 'load-balancer', embotApi: EMBOT_API_VERSION, entry: 'index.ts' });
    expect(manifest().embots).toEqual([{ type: 'balancer', attachTo: { kind: 'host' }, policies: ['balancer'] }]);
    expect(manifest().config).toEqual({ ...BALANCER_DEFAULTS });
  });

  it('exports, through the kit, every policy its manifest names', () => {
    const kit: ModuleKit = { xstate, definePolicy, apiVersion: EMBOT_API_VERSION };
    const mod = entry(kit);
    for (const name of manifest().embots.flatMap((e) => e.policies)) {
      expect(mod.policies[name]?.name).toBe(name);
      const machine = mod.policies[name].create(recordingApi(manifest().config));
      expect(createActor(machine).start().getSnapshot().value).toBe('idle');
    }
  });

  it('imports nothing at run time (only `import type`)', () => {
    expectTypeOnlyImports(PLUGIN_DIR);
  });

  it.each([
    ['cooldownMs', 0],
    ['cooldownMs', '30s'],
    ['backoffMs', -1],
    ['maxFailures', 0],
    ['maxFailures', 2.5],
    ['migrationTimeoutMs', null],
  ])('refuses config %s = %j with a readable error naming the key', (key, value) => {
    expect(() => readBalancerConfig({ [key]: value })).toThrow(new RegExp(`load-balancer: config\\.${key} must be`));
    expect(() => createBalancerMachine(xstate, recordingApi({ [key]: value }))).toThrow(/load-balancer/);
  });

  it('fills missing config keys from the defaults', () => {
    expect(readBalancerConfig({ maxFailures: 5 })).toEqual({ ...BALANCER_DEFAULTS, maxFailures: 5 });
  });

  it.each([
    [{ vm: 'web-1', load: 0.9 }, { vm: 'web-1' }],
    [{ vm: 'db.1', to: 'c' }, { vm: 'db.1', to: 'c' }],
    [{ vm: '' }, undefined],
    [{ vm: 42 }, undefined],
    [{ vm: undefined, load: 0.9 }, undefined],
    [{ vm: 'web 1' }, undefined],
    [{ vm: 'web-1', to: 7 }, undefined],
    [{ vm: 'web-1', to: '' }, undefined],
    [null, undefined],
    ['web-1', undefined],
  ])('parseRecommendation(%j) → %j', (payload, expected) => {
    expect(parseRecommendation(payload)).toEqual(expected);
  });
});

describe('load-balancer policy behaviour', () => {
  beforeEach(() => {
    vi.useFakeTimers();
    vi.setSystemTime(1_000_000);
  });
  afterEach(() => vi.useRealTimers());

  it('moves the recommended VM once, cools down for cooldownMs, then acts again', () => {
    const { api, send, state, lastTag, context } = start();
    send(recommend('web-1'));
    expect(state()).toBe('migrating');
    expect(api.effects).toEqual([{ effector: 'mobility', op: 'migrate', args: { vm: 'web-1' }, tag: migrateTag(1) }]);
    send(outcome('EFFECT_DONE', lastTag()));
    expect(state()).toBe('coolingDown');
    expect(context()).toMatchObject({ vm: 'web-1', movedTo: 'b', moved: 1, failures: 0 });
    vi.advanceTimersByTime(BALANCER_DEFAULTS.cooldownMs - 1);
    expect(state()).toBe('coolingDown');
    vi.advanceTimersByTime(1);
    expect(state()).toBe('idle');
    send(recommend('web-2'));
    expect(api.effects.map((e) => [e.args['vm'], e.tag])).toEqual([
      ['web-1', migrateTag(1)],
      ['web-2', migrateTag(2)],
    ]);
    expect(api.emits).toEqual([]);
  });

  it('passes a requested target on to the mobility effector', () => {
    const { api, send } = start();
    send(recommend('db-1', { to: 'c' }));
    expect(api.effects[0]).toMatchObject({ args: { vm: 'db-1', to: 'c' } });
  });

  it('ignores, and counts, recommendations while migrating, cooling down and backing off', () => {
    const { api, send, state, lastTag, context } = start();
    send(recommend('web-1'));
    send(recommend('web-2'));
    send(recommend('web-1'));
    expect(state()).toBe('migrating');
    send(outcome('EFFECT_DONE', lastTag()));
    send(recommend('db-1'));
    expect(state()).toBe('coolingDown');
    vi.advanceTimersByTime(BALANCER_DEFAULTS.cooldownMs);
    send(recommend('web-2'));
    send(outcome('EFFECT_FAILED', lastTag()));
    expect(state()).toBe('backingOff');
    send(recommend('web-2'));
    expect(context().ignored).toBe(4);
    expect(api.effects.map((e) => e.args['vm'])).toEqual(['web-1', 'web-2']);
  });

  it('ignores the outcome of an older move and of other effects', () => {
    const { send, state, lastTag } = start({ cooldownMs: 10 });
    send(recommend('web-1'));
    const first = lastTag();
    send(outcome('EFFECT_DONE', first));
    vi.advanceTimersByTime(10);
    send(recommend('web-2'));
    send(outcome('EFFECT_DONE', first)); // a duplicate, late outcome of the first move
    send(outcome('EFFECT_FAILED', first));
    expect(state()).toBe('migrating');
    send(outcome('EFFECT_DONE', lastTag(), 'hypervisor')); // same tag, another effector
    send(ev('EFFECT_DONE', { effector: 'mobility', op: 'other', tag: lastTag() }));
    send(ev('EFFECT_DONE', null));
    expect(state()).toBe('migrating');
    send(outcome('EFFECT_DONE', lastTag()));
    expect(state()).toBe('coolingDown');
  });

  it('leaves a malformed recommendation alone, with a warning', () => {
    const { api, send, state } = start();
    for (const payload of [{}, { vm: '' }, { vm: 3 }, null, 'web-1', { vm: 'web-1', to: 5 }]) send(ev('MIGRATION_RECOMMENDED', payload));
    expect(state()).toBe('idle');
    expect(api.effects).toEqual([]);
    expect(api.logs.filter((l) => l.level === 'warn')).toHaveLength(6);
    expect(api.logs[0]!.message).toContain('without a usable vm name');
  });

  it('backs off for backoffMs after a failed move and raises an ALERT after maxFailures failures in a row', () => {
    const { api, send, state, lastTag, context } = start();
    for (let i = 1; i <= 3; i++) {
      send(recommend('web-1'));
      send(outcome('EFFECT_FAILED', lastTag()));
      expect(state()).toBe('backingOff');
      expect(api.logs.at(-1)!.message).toMatch(/could not move VM web-1: .*denied.*backing off for 10000 ms/);
      if (i < 3) expect(api.emits).toEqual([]);
      vi.advanceTimersByTime(BALANCER_DEFAULTS.backoffMs - 1);
      expect(state()).toBe('backingOff');
      vi.advanceTimersByTime(1);
      expect(state()).toBe('idle');
    }
    expect(api.emits).toEqual([
      {
        type: 'ALERT',
        payload: { severity: 'warning', vm: 'web-1', failures: 3, reason: expect.stringMatching(/3 moves in a row failed.*not enough memory/) },
      },
    ]);
    // The streak starts again: the next ALERT needs another three failures.
    expect(context()).toMatchObject({ failures: 0, alerts: 1 });
    send(recommend('web-1'));
    send(outcome('EFFECT_FAILED', lastTag()));
    expect(api.emits).toHaveLength(1);
  });

  it('a completed move resets the failure streak', () => {
    const { api, send, lastTag, context } = start({ maxFailures: 2, cooldownMs: 5, backoffMs: 5 });
    send(recommend());
    send(outcome('EFFECT_FAILED', lastTag()));
    vi.advanceTimersByTime(5);
    send(recommend());
    send(outcome('EFFECT_DONE', lastTag()));
    expect(context().failures).toBe(0);
    vi.advanceTimersByTime(5);
    send(recommend());
    send(outcome('EFFECT_FAILED', lastTag()));
    expect(api.emits).toEqual([]);
    expect(context().failures).toBe(1);
  });

  it('gives up waiting after migrationTimeoutMs (counted as a failure); a late outcome is then ignored', () => {
    const { api, send, state, context } = start({ migrationTimeoutMs: 1000, maxFailures: 1 });
    send(recommend());
    const tag = api.effects[0]!.tag!;
    vi.advanceTimersByTime(999);
    expect(state()).toBe('migrating');
    vi.advanceTimersByTime(1);
    expect(state()).toBe('backingOff');
    expect(api.emits[0]).toMatchObject({ type: 'ALERT', payload: { reason: expect.stringContaining('no outcome within migrationTimeoutMs') } });
    send(outcome('EFFECT_DONE', tag));
    expect(state()).toBe('backingOff');
    expect(context().moved).toBe(0);
  });

  it('delays are named and swappable with provide()', () => {
    const api = recordingApi();
    const machine = createBalancerMachine(xstate, api).provide({ delays: { cooldown: 7 } });
    const actor = createActor(machine).start();
    actor.send(recommend() as never);
    actor.send(outcome('EFFECT_DONE', migrateTag(1)) as never);
    vi.advanceTimersByTime(7);
    expect(actor.getSnapshot().value).toBe('idle');
  });

  // Pending delays across a restart are the runtime's job (embots/policy-timers.ts), not the policy's.
  it('has a persisted snapshot that survives JSON and resumes where it was', () => {
    const { actor, send, lastTag } = start();
    send(recommend());
    send(recommend());
    send(outcome('EFFECT_FAILED', lastTag()));
    const saved = JSON.parse(JSON.stringify(actor.getPersistedSnapshot()));
    actor.stop();
    const api = recordingApi();
    const restored = createActor(createBalancerMachine(xstate, api), { snapshot: saved }).start();
    expect(restored.getSnapshot().value).toBe('backingOff');
    expect(restored.getSnapshot().context).toMatchObject({ attempt: 1, vm: 'web-1', failures: 1, ignored: 1 });
    restored.send(recommend('db-1') as never);
    expect(restored.getSnapshot().context.ignored).toBe(2);
    expect(api.effects).toEqual([]);
  });
});

// ---- coverage of every state and every transition, paths generated with @xstate/graph ----

type AnySnap = GraphSnapshot<BalancerContext>;

const abstract = (s: AnySnap): string => JSON.stringify([s.value, s.context.failures]);
const AFTER = {
  cooldown: 'xstate.after.cooldown.balancer.coolingDown',
  backoff: 'xstate.after.backoff.balancer.backingOff',
  migrationTimeout: 'xstate.after.migrationTimeout.balancer.migrating',
} as const;

/** Events offered in each state; delayed ones only where their timer runs, as time is global. */
function eventsFor(s: AnySnap): Ev[] {
  const tag = migrateTag(s.context.attempt);
  const events = [
    recommend(),
    ev('MIGRATION_RECOMMENDED', { load: 0.9 }),
    outcome('EFFECT_DONE', tag),
    outcome('EFFECT_FAILED', tag),
    outcome('EFFECT_DONE', 'stale'),
  ];
  if (s.matches('coolingDown')) events.push({ type: AFTER.cooldown } as Ev);
  if (s.matches('backingOff')) events.push({ type: AFTER.backoff } as Ev);
  if (s.matches('migrating')) events.push({ type: AFTER.migrationTimeout } as Ev);
  return events;
}

describe.each([
  // With maxFailures 1 every failure raises the ALERT, so the plain back-off branches are
  // unreachable: coverage needs at least 2.
  ['an ALERT every second failure', { maxFailures: 2 }],
  ['the shipped defaults', {}],
])('load-balancer coverage with %s', (_name, budgets) => {
  const cfg = readBalancerConfig(budgets);

  beforeEach(() => {
    vi.useFakeTimers();
    vi.setSystemTime(1_000_000);
  });
  afterEach(() => vi.useRealTimers());

  it('replays a shortest path to every state plus every event from it, reaching every state and every transition', () => {
    const model = createBalancerMachine(xstate, recordingApi(budgets));
    const graph = edgeGraph(model, { events: eventsFor, abstract });
    expect(graph.edges.length).toBeGreaterThan(12);

    const coverage = new TransitionCoverage(model);
    replayEveryEdge(graph, () => createActor(createBalancerMachine(xstate, recordingApi(budgets)), { inspect: coverage.inspect }).start(), {
      abstract,
      delayOf: (e) => {
        const delayed = (Object.entries(AFTER) as [keyof typeof AFTER, string][]).find(([, type]) => type === e.type);
        if (!delayed) return undefined;
        return delayed[0] === 'cooldown' ? cfg.cooldownMs : delayed[0] === 'backoff' ? cfg.backoffMs : cfg.migrationTimeoutMs;
      },
      send: sendAnsweringAttempt(outcome, (before: AnySnap) => migrateTag(before.context.attempt)),
    });

    expect(coverage.missingTransitions()).toEqual([]);
    expect(coverage.missingStates()).toEqual([]);
    expect(allStateIds(model)).toEqual(['balancer', 'balancer.idle', 'balancer.migrating', 'balancer.coolingDown', 'balancer.backingOff']);
  });
});
