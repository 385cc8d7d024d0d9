// A management module imports nothing at run time: xstate and definePolicy come in the kit.
import type { EffectOutcome, ModuleEntry, ModuleKit, PolicyApi, PolicyEvent } from 'embot';

/** `api.config` of the balancer (manifest defaults merged with the user's config). */
export interface BalancerConfig {
  /** Quiet time after a completed move, so the host's load can settle before the next one. */
  readonly cooldownMs: number;
  /** Wait after a failed move before acting on recommendations again. */
  readonly backoffMs: number;
  /** Consecutive failed moves that raise an ALERT (then the count starts again). */
  readonly maxFailures: number;
  /**
   * Longest wait for the outcome of a move. The mobility service bounds every migration itself;
   * this only matters when the outcome can never come (the agent restarted mid-move), so the
   * balancer is not stuck in `migrating` for ever.
   */
  readonly migrationTimeoutMs: number;
}

export const BALANCER_DEFAULTS: BalancerConfig = { cooldownMs: 30_000, backoffMs: 10_000, maxFailures: 3, migrationTimeoutMs: 600_000 };

/** What the balancer acts on: `MIGRATION_RECOMMENDED` from host-load (or an operator). */
export interface Recommendation {
  readonly vm: string;
  /** Peer to move to; without it the mobility effector tries the peers in turn. */
  readonly to?: string;
}

export interface BalancerContext {
  /** Moves asked for so far; tags each move so a late outcome of an older one is ignored. */
  readonly attempt: number;
  /** The VM of the current (or last) move. */
  readonly vm: string | null;
  /** Where the last completed move went. */
  readonly movedTo: string | null;
  /** Completed moves. */
  readonly moved: number;
  /** Failed moves since the last success or the last ALERT. */
  readonly failures: number;
  /** ALERTs raised. */
  readonly alerts: number;
  /** Recommendations that arrived while a move was running, cooling down or backing off. */
  readonly ignored: number;
}

/** Payloads stay `unknown`: they come from other embots and operators, and guards check them. */
export type BalancerEvent =
  | PolicyEvent<'MIGRATION_RECOMMENDED', unknown>
  | PolicyEvent<'EFFECT_DONE', EffectOutcome>
  | PolicyEvent<'EFFECT_FAILED', EffectOutcome>;

/** The config with defaults filled in; throws a readable Error on a bad value (the runtime quarantines the embot). */
export function readBalancerConfig(config: Readonly<Record<string, unknown>>): BalancerConfig {
  const merged = { ...BALANCER_DEFAULTS, ...config };
  const int = (key: keyof BalancerConfig): number => {
    const v = merged[key];
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 1) throw new Error(`load-balancer: config.${key} must be an integer ≥ 1, got ${JSON.stringify(v)}`);
    return v;
  };
  return { cooldownMs: int('cooldownMs'), backoffMs: int('backoffMs'), maxFailures: int('maxFailures'), migrationTimeoutMs: int('migrationTimeoutMs') };
}

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

/** The recommendation in a `MIGRATION_RECOMMENDED` payload, or undefined when it names no usable VM. */
export function parseRecommendation(payload: unknown): Recommendation | undefined {
  if (typeof payload !== 'object' || payload === null) return undefined;
  const { vm, to } = payload as { vm?: unknown; to?: unknown };
  if (typeof vm !== 'string' || !NAME.test(vm)) return undefined;
  if (to !== undefined && (typeof to !== 'string' || !NAME.test(to))) return undefined;
  return to === undefined ? { vm } : { vm, to };
}

export const migrateTag = (attempt: number): string => `balancer-migrate-${attempt}`;

/** The peer a completed move went to, from the effect's result (a MigrationSummary). */
function targetOf(outcome: EffectOutcome | undefined): string | null {
  const to = (outcome?.result as { to?: unknown } | null | undefined)?.to;
  return typeof to === 'string' ? to : null;
}

/**
 * The balancer policy: on `MIGRATION_RECOMMENDED {vm}` it moves the VM away through the
 * mobility effector, then stays quiet for `cooldownMs`; a failed move backs off for
 * `backoffMs`, and `maxFailures` failed moves in a row raise an ALERT. Recommendations that
 * arrive while it is busy are counted and dropped (host-load repeats itself if the host stays
 * loaded).
 *
 * @example
 * ```ts
 * import * as xstate from 'xstate';
 * const actor = xstate.createActor(createBalancerMachine(xstate, api)).start();
 * actor.send({ type: 'MIGRATION_RECOMMENDED', id: 'e1', ts: Date.now(), elementId: 'host:a', payload: { vm: 'web-1', load: 0.9 } });
 * // api.effect('mobility', 'migrate', { vm: 'web-1' }, { tag: 'balancer-migrate-1' }) was called
 * ```
 */
export function createBalancerMachine(xstate: ModuleKit['xstate'], api: PolicyApi) {
  const config = readBalancerConfig(api.config);
  const { assign, and } = xstate;

  const isCurrentMove = ({ context, event }: { context: BalancerContext; event: BalancerEvent }): boolean => {
    if (event.type !== 'EFFECT_DONE' && event.type !== 'EFFECT_FAILED') return false;
    const outcome = event.payload;
    return outcome?.effector === 'mobility' && outcome.op === 'migrate' && outcome.tag === migrateTag(context.attempt);
  };

  // A failed or timed-out move: the last one the budget allows raises the ALERT.
  const onFailure = [
    { guard: 'failureBudgetSpent', target: 'backingOff', actions: ['countFailure', 'reportFailure', 'raiseAlert', 'startNewStreak'] },
    { target: 'backingOff', actions: ['countFailure', 'reportFailure'] },
  ] as const;

  return xstate
    .setup({
      types: {} as { context: BalancerContext; events: BalancerEvent },
      actions: {
        recordVm: assign({ vm: ({ event }) => parseRecommendation(event.payload)?.vm ?? null }),
        nextAttempt: assign({ attempt: ({ context }) => context.attempt + 1 }),
        migrateVm: ({ context, event }) => {
          const rec = parseRecommendation(event.payload);
          if (!rec) return;
          api.log('info', `moving VM ${rec.vm} off this host${rec.to ? ` to ${rec.to}` : ''}`, { attempt: context.attempt });
          api.effect('mobility', 'migrate', rec.to ? { vm: rec.vm, to: rec.to } : { vm: rec.vm }, { tag: migrateTag(context.attempt) });
        },
        recordSuccess: assign({
          moved: ({ context }) => context.moved + 1,
          failures: 0,
          movedTo: ({ event }) => targetOf(event.payload as EffectOutcome | undefined),
        }),
        reportSuccess: ({ context, event }) =>
          api.log('info', `moved VM ${context.vm} to ${targetOf(event.payload as EffectOutcome | undefined) ?? 'a peer'}; cooling down for ${config.cooldownMs} ms`),
        countFailure: assign({ failures: ({ context }) => context.failures + 1 }),
        reportFailure: ({ context, event }) =>
          api.log('warn', `could not move VM ${context.vm}: ${failureReason(event)}; backing off for ${config.backoffMs} ms`, { failures: context.failures }),
        // Runs after countFailure, so context.failures is the streak including this failure.
        raiseAlert: ({ context, event }) =>
          api.emit('ALERT', {
            severity: 'warning',
            reason: `load-balancer: ${context.failures} moves in a row failed; the host stays loaded (last: VM ${context.vm}: ${failureReason(event)})`,
            vm: context.vm,
            failures: context.failures,
          }),
        // The next ALERT comes after another maxFailures failures, not after every one.
        startNewStreak: assign({ failures: 0, alerts: ({ context }) => context.alerts + 1 }),
        countIgnored: assign({ ignored: ({ context }) => context.ignored + 1 }),
        reportMalformed: ({ event }) => api.log('warn', 'load-balancer: ignored a MIGRATION_RECOMMENDED without a usable vm name', { eventId: event.id }),
      },
      guards: {
        isUsableRecommendation: ({ event }) => parseRecommendation(event.payload) !== undefined,
        isCurrentMove,
        // Checked before countFailure: this failure is the one that spends the budget.
        failureBudgetSpent: ({ context }) => context.failures + 1 >= config.maxFailures,
      },
      delays: {
        cooldown: () => config.cooldownMs,
        backoff: () => config.backoffMs,
        migrationTimeout: () => config.migrationTimeoutMs,
      },
    })
    .createMachine({
      id: 'balancer',
      context: { attempt: 0, vm: null, movedTo: null, moved: 0, failures: 0, alerts: 0, ignored: 0 },
      initial: 'idle',
      states: {
        idle: {
          on: {
            MIGRATION_RECOMMENDED: [
              { guard: 'isUsableRecommendation', target: 'migrating', actions: ['recordVm', 'nextAttempt', 'migrateVm'] },
              { actions: 'reportMalformed' },
            ],
          },
        },
        migrating: {
          after: { migrationTimeout: [...onFailure] },
          on: {
            EFFECT_DONE: { guard: 'isCurrentMove', target: 'coolingDown', actions: ['recordSuccess', 'reportSuccess'] },
            EFFECT_FAILED: [
              { guard: and(['isCurrentMove', 'failureBudgetSpent']), target: 'backingOff', actions: ['countFailure', 'reportFailure', 'raiseAlert', 'startNewStreak'] },
              { guard: 'isCurrentMove', target: 'backingOff', actions: ['countFailure', 'reportFailure'] },
            ],
            MIGRATION_RECOMMENDED: { actions: 'countIgnored' },
          },
        },
        coolingDown: {
          after: { cooldown: { target: 'idle' } },
          on: { MIGRATION_RECOMMENDED: { actions: 'countIgnored' } },
        },
        backingOff: {
          after: { backoff: { target: 'idle' } },
          on: { MIGRATION_RECOMMENDED: { actions: 'countIgnored' } },
        },
      },
    });
}

function failureReason(event: { readonly type: string; readonly payload?: unknown }): string {
  if (event.type === 'EFFECT_FAILED') return (event.payload as EffectOutcome | undefined)?.error?.message ?? 'unknown error';
  return 'no outcome within migrationTimeoutMs';
}

const entry: ModuleEntry = (kit) => ({
  policies: {
    balancer: kit.definePolicy('balancer', (api) => createBalancerMachine(kit.xstate, api)),
  },
});

export default entry;
