// A management module imports nothing at run time: xstate and definePolicy come in the kit.
import type { ModuleEntry, ModuleKit, PolicyApi, PolicyEvent } from 'embot';

/** `api.config` of the load monitor (manifest defaults merged with the user's config). */
export interface HostLoadConfig {
  /** Host load (0..1) above which the host counts as loaded; equal is not above. */
  readonly threshold: number;
  /** How long the load must stay above the threshold before a recommendation. */
  readonly durationMs: number;
  /** Quiet time after a recommendation, so the migration can take effect. */
  readonly cooldownMs: number;
}

export const HOST_LOAD_DEFAULTS: HostLoadConfig = { threshold: 0.8, durationMs: 10_000, cooldownMs: 30_000 };

export interface VmLoad {
  readonly name: string;
  readonly load: number;
}

/** Payload of `HOST_LOAD`, as the host sensor sends it. */
export interface HostLoadReading {
  readonly load: number;
  readonly topVms: readonly VmLoad[];
}

export interface HostLoadContext {
  /** The latest well-formed reading, if any. */
  readonly reading: HostLoadReading | null;
}

/** Payload stays `unknown`: it comes from a sensor, and guards check it before anything uses it. */
export type HostLoadEvent = PolicyEvent<'HOST_LOAD', unknown>;

export function readHostLoadConfig(config: Readonly<Record<string, unknown>>): HostLoadConfig {
  const merged = { ...HOST_LOAD_DEFAULTS, ...config };
  const { threshold } = merged;
  if (typeof threshold !== 'number' || !(threshold > 0 && threshold <= 1)) {
    throw new Error(`host-load: config.threshold must be a number in (0, 1], got ${JSON.stringify(threshold)}`);
  }
  const ms = (key: 'durationMs' | 'cooldownMs'): number => {
    const v = merged[key];
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 1) throw new Error(`host-load: config.${key} must be an integer ≥ 1, got ${JSON.stringify(v)}`);
    return v;
  };
  return { threshold, durationMs: ms('durationMs'), cooldownMs: ms('cooldownMs') };
}

const isLoad = (v: unknown): v is number => typeof v === 'number' && v >= 0 && v <= 1e6 && Number.isFinite(v);

/** The reading in a `HOST_LOAD` payload, or undefined if it is malformed. VM entries that are malformed are dropped. */
export function parseReading(payload: unknown): HostLoadReading | undefined {
  if (typeof payload !== 'object' || payload === null) return undefined;
  const { load, topVms } = payload as { load?: unknown; topVms?: unknown };
  if (!isLoad(load)) return undefined;
  if (topVms !== undefined && !Array.isArray(topVms)) return undefined;
  const vms = (topVms ?? []).filter(
    (v: unknown): v is VmLoad => typeof v === 'object' && v !== null && typeof (v as VmLoad).name === 'string' && (v as VmLoad).name !== '' && isLoad((v as VmLoad).load),
  );
  return { load, topVms: vms.map(({ name, load: l }) => ({ name, load: l })) };
}

/** The VM to move: the busiest one (the first of equals). */
export function busiestVm(reading: HostLoadReading | null): VmLoad | undefined {
  let best: VmLoad | undefined;
  for (const vm of reading?.topVms ?? []) if (!best || vm.load > best.load) best = vm;
  return best;
}

/**
 * The load-monitor policy: a reading above `threshold` makes the host `elevated`; if no reading
 * at or below the threshold arrives for `durationMs`, the host is `overloaded`: recommend
 * migrating its busiest VM (or ALERT if it has none), then stay quiet for `cooldownMs`.
 *
 * @example
 * ```ts
 * import * as xstate from 'xstate';
 * const actor = xstate.createActor(createHostLoadMachine(xstate, api)).start();
 * actor.send({ type: 'HOST_LOAD', id: 'e1', ts: Date.now(), elementId: 'host', payload: { load: 0.95, topVms: [{ name: 'web-1', load: 0.9 }] } });
 * ```
 */
export function createHostLoadMachine(xstate: ModuleKit['xstate'], api: PolicyApi) {
  const config = readHostLoadConfig(api.config);
  const { assign } = xstate;
  const above = (r: HostLoadReading | null | undefined): boolean => r != null && r.load > config.threshold;

  return xstate
    .setup({
      types: {} as { context: HostLoadContext; events: HostLoadEvent },
      actions: {
        recordReading: assign({ reading: ({ event }) => parseReading(event.payload) ?? null }),
        recommendMigration: ({ context }) => {
          const vm = busiestVm(context.reading);
          const load = context.reading?.load ?? 0;
          api.emit('MIGRATION_RECOMMENDED', {
            vm: vm?.name,
            vmLoad: vm?.load,
            load,
            reason: `host load ${load} stayed above ${config.threshold} for ${config.durationMs} ms; ${vm?.name} is the busiest VM`,
          });
        },
        alertNothingToMove: ({ context }) => {
          const load = context.reading?.load ?? 0;
          api.emit('ALERT', {
            severity: 'warning',
            reason: `host load ${load} stayed above ${config.threshold} for ${config.durationMs} ms and no VM is reported to move`,
            load,
          });
        },
        reportMalformedReading: ({ event }) =>
          api.log('warn', 'host-load: ignored a HOST_LOAD event without a numeric load', { eventId: event.id }),
      },
      guards: {
        isAboveThreshold: ({ event }) => above(parseReading(event.payload)),
        isAtOrBelowThreshold: ({ event }) => {
          const r = parseReading(event.payload);
          return r !== undefined && !above(r);
        },
        isWellFormed: ({ event }) => parseReading(event.payload) !== undefined,
        isMalformed: ({ event }) => parseReading(event.payload) === undefined,
        hasVmToMove: ({ context }) => busiestVm(context.reading) !== undefined,
        lastReadingAbove: ({ context }) => above(context.reading),
      },
      delays: {
        sustained: () => config.durationMs,
        cooldown: () => config.cooldownMs,
      },
    })
    .createMachine({
      id: 'host-load',
      context: { reading: null },
      initial: 'normal',
      // States handle the readings they understand; a malformed one falls through to here.
      on: { HOST_LOAD: { guard: 'isMalformed', actions: 'reportMalformedReading' } },
      states: {
        normal: {
          on: { HOST_LOAD: { guard: 'isAboveThreshold', target: 'elevated', actions: 'recordReading' } },
        },
        elevated: {
          after: { sustained: { target: 'overloaded' } },
          on: {
            HOST_LOAD: [
              { guard: 'isAboveThreshold', actions: 'recordReading' },
              { guard: 'isAtOrBelowThreshold', target: 'normal', actions: 'recordReading' },
            ],
          },
        },
        overloaded: {
          always: [
            { guard: 'hasVmToMove', target: 'coolingDown', actions: 'recommendMigration' },
            { target: 'coolingDown', actions: 'alertNothingToMove' },
          ],
        },
        coolingDown: {
          after: {
            cooldown: [{ guard: 'lastReadingAbove', target: 'elevated' }, { target: 'normal' }],
          },
          on: { HOST_LOAD: { guard: 'isWellFormed', actions: 'recordReading' } },
        },
      },
    });
}

const entry: ModuleEntry = (kit) => ({
  policies: {
    'host-load': kit.definePolicy('host-load', (api) => createHostLoadMachine(kit.xstate, api)),
  },
});

export default entry;
