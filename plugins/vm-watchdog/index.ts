// A management module imports nothing at run time: xstate and definePolicy come in the kit.
import type { EffectOutcome, ModuleEntry, ModuleKit, PolicyApi, PolicyEvent } from 'embot';

/** `api.config` of the watchdog (manifest defaults merged with the user's config). */
export interface WatchdogConfig {
  /** Crashes within `windowMs` that make the watchdog back off before the next restart. */
  readonly maxCrashes: number;
  readonly windowMs: number;
  /** First back-off; each further back-off without a stable period doubles it. */
  readonly backoffMs: number;
  /** Back-offs without a stable period before the watchdog gives up and raises an ALERT. */
  readonly maxBackoffs: number;
  /** Running this long without a crash forgives every crash and back-off so far. */
  readonly stableMs: number;
}

export const WATCHDOG_DEFAULTS: WatchdogConfig = {
  maxCrashes: 3,
  windowMs: 60_000,
  backoffMs: 5_000,
  maxBackoffs: 3,
  stableMs: 30_000,
};

export interface WatchdogContext {
  readonly vm: string;
  /** `ts` of the crashes inside the window, oldest first, at most `maxCrashes` of them. */
  readonly crashes: readonly number[];
  /** Back-offs since the last stable period. */
  readonly backoffs: number;
  /** Restarts asked for so far; tags each restart so a late outcome of an older one is ignored. */
  readonly attempt: number;
}

export type WatchdogEvent =
  | PolicyEvent<'VM_CRASHED'>
  | PolicyEvent<'VM_STARTED'>
  | PolicyEvent<'VM_STOPPED'>
  | PolicyEvent<'EFFECT_DONE', EffectOutcome>
  | PolicyEvent<'EFFECT_FAILED', EffectOutcome>;

/** The config with defaults filled in; throws a readable Error on a bad value (the runtime quarantines the embot). */
export function readWatchdogConfig(config: Readonly<Record<string, unknown>>): WatchdogConfig {
  const merged = { ...WATCHDOG_DEFAULTS, ...config };
  const int = (key: keyof WatchdogConfig, min: number): number => {
    const v = merged[key];
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min) {
      throw new Error(`vm-watchdog: config.${key} must be an integer ≥ ${min}, got ${JSON.stringify(v)}`);
    }
    return v;
  };
  return {
    maxCrashes: int('maxCrashes', 1),
    windowMs: int('windowMs', 1),
    backoffMs: int('backoffMs', 1),
    maxBackoffs: int('maxBackoffs', 0),
    stableMs: int('stableMs', 1),
  };
}

/** Crash times still inside the window once a crash at `ts` is counted. */
export function crashesWithin(crashes: readonly number[], ts: number, config: WatchdogConfig): readonly number[] {
  return [...crashes.filter((t) => ts - t < config.windowMs), ts].slice(-config.maxCrashes);
}

/** Back-off before restart number `backoffs` (1-based): doubles each time. */
export function backoffDelay(backoffs: number, config: WatchdogConfig): number {
  return config.backoffMs * 2 ** Math.max(0, backoffs - 1);
}

export const restartTag = (attempt: number): string => `watchdog-restart-${attempt}`;

const vmNameOf = (elementId: string): string => (elementId.startsWith('vm:') ? elementId.slice(3) : elementId);

/**
 * The watchdog policy: restart a crashed VM; after `maxCrashes` crashes within `windowMs`, wait
 * (doubling back-off) before restarting; after `maxBackoffs` back-offs without a stable
 * period, give up and raise a critical ALERT. A deliberate stop is respected.
 *
 * @example
 * ```ts
 * import * as xstate from 'xstate';
 * const machine = createWatchdogMachine(xstate, api).provide({ actions: { raiseAlert: () => {} } });
 * const actor = xstate.createActor(machine).start();
 * actor.send({ type: 'VM_CRASHED', id: 'e1', ts: Date.now(), elementId: 'vm:web-1', payload: {} });
 * ```
 */
export function createWatchdogMachine(xstate: ModuleKit['xstate'], api: PolicyApi) {
  const config = readWatchdogConfig(api.config);
  const { assign, and } = xstate;

  const isCurrentRestart = ({ context, event }: { context: WatchdogContext; event: WatchdogEvent }): boolean => {
    if (event.type !== 'EFFECT_DONE' && event.type !== 'EFFECT_FAILED') return false;
    const outcome = event.payload;
    return outcome?.effector === 'hypervisor' && outcome.op === 'start' && outcome.tag === restartTag(context.attempt);
  };

  // What a crash leads to, in every state that restarts the VM.
  const onCrash = [
    { guard: and(['crashBudgetSpent', 'backoffsSpent']), target: 'gaveUp', actions: ['recordCrash', 'raiseAlert'] },
    { guard: 'crashBudgetSpent', target: 'backingOff', actions: ['recordCrash', 'countBackoff'] },
    { target: 'restarting', reenter: true, actions: 'recordCrash' },
  ] as const;

  return xstate
    .setup({
      types: {} as { context: WatchdogContext; events: WatchdogEvent },
      actions: {
        recordCrash: assign({ crashes: ({ context, event }) => crashesWithin(context.crashes, event.ts, config) }),
        countBackoff: assign({ backoffs: ({ context }) => context.backoffs + 1 }),
        forgetCrashes: assign({ crashes: [], backoffs: 0 }),
        nextAttempt: assign({ attempt: ({ context }) => context.attempt + 1 }),
        restartVm: ({ context }) => api.effect('hypervisor', 'start', { vm: context.vm }, { tag: restartTag(context.attempt) }),
        reportBackoff: ({ context }) =>
          api.log('warn', `VM ${context.vm} keeps crashing; waiting ${backoffDelay(context.backoffs, config)} ms before restarting it`, {
            crashes: context.crashes.length,
            backoffs: context.backoffs,
          }),
        raiseAlert: ({ context, event }) => {
          const why =
            event.type === 'EFFECT_FAILED'
              ? `restarting VM ${context.vm} failed after ${context.backoffs} back-offs: ${event.payload?.error?.message ?? 'unknown error'}`
              : `VM ${context.vm} crashed ${context.crashes.length} times within ${config.windowMs} ms after ${context.backoffs} back-offs`;
          api.emit('ALERT', { severity: 'critical', reason: `${why}; the watchdog gave up`, vm: context.vm, crashes: context.crashes.length });
        },
      },
      guards: {
        crashBudgetSpent: ({ context, event }) => crashesWithin(context.crashes, event.ts, config).length >= config.maxCrashes,
        backoffsSpent: ({ context }) => context.backoffs >= config.maxBackoffs,
        isCurrentRestart,
      },
      delays: {
        stablePeriod: () => config.stableMs,
        backoff: ({ context }) => backoffDelay(context.backoffs, config),
      },
    })
    .createMachine({
      id: 'watchdog',
      context: { vm: vmNameOf(api.elementId), crashes: [], backoffs: 0, attempt: 0 },
      initial: 'watching',
      states: {
        watching: {
          initial: 'settling',
          states: {
            settling: { after: { stablePeriod: { target: 'stable', actions: 'forgetCrashes' } } },
            stable: {},
          },
          on: {
            VM_CRASHED: [...onCrash],
            VM_STOPPED: { target: 'stoppedByOperator' },
          },
        },
        restarting: {
          entry: ['nextAttempt', 'restartVm'],
          on: {
            EFFECT_DONE: { guard: 'isCurrentRestart', target: 'watching' },
            EFFECT_FAILED: [
              { guard: and(['isCurrentRestart', 'backoffsSpent']), target: 'gaveUp', actions: 'raiseAlert' },
              { guard: 'isCurrentRestart', target: 'backingOff', actions: 'countBackoff' },
            ],
            // Up before our outcome arrived (the sensor was faster, or someone else started it).
            VM_STARTED: { target: 'watching' },
            // Crashed again before the outcome of the restart arrived.
            VM_CRASHED: [...onCrash],
            VM_STOPPED: { target: 'stoppedByOperator' },
          },
        },
        backingOff: {
          entry: 'reportBackoff',
          after: { backoff: { target: 'restarting' } },
          on: {
            VM_STARTED: { target: 'watching' },
            VM_STOPPED: { target: 'stoppedByOperator' },
          },
        },
        stoppedByOperator: {
          on: {
            VM_STARTED: { target: 'watching', actions: 'forgetCrashes' },
            // Started without us seeing it (e.g. the sensor was muted), then crashed: resume duty.
            VM_CRASHED: { target: 'restarting', actions: ['forgetCrashes', 'recordCrash'] },
          },
        },
        gaveUp: {
          on: {
            VM_STARTED: { target: 'watching', actions: 'forgetCrashes' },
            VM_CRASHED: { target: 'restarting', actions: ['forgetCrashes', 'recordCrash'] },
            VM_STOPPED: { target: 'stoppedByOperator' },
          },
        },
      },
    });
}

const entry: ModuleEntry = (kit) => ({
  policies: {
    watchdog: kit.definePolicy('watchdog', (api) => createWatchdogMachine(kit.xstate, api)),
  },
});

export default entry;
