import type { PolicyEvent } from '../../embots/policy-api.ts';

/** The outcome events the runtime delivers for an `api.effect(...)`. */
export type OutcomeType = 'EFFECT_DONE' | 'EFFECT_FAILED';

/** Builds one event for a fixed element; `payload` defaults to `{}`. */
export type EventBuilder = (type: string, payload?: unknown) => PolicyEvent;

/** Builds the outcome of an effect with `tag`; `effector` defaults to the one the builder was made for. */
export type OutcomeBuilder = (type: OutcomeType, tag: string, effector?: string) => PolicyEvent;

/** What an effect's outcome carries: its identity, the result when done, the error when failed. */
export interface EffectShape {
  readonly effector: string;
  readonly op: string;
  /** Omitted from `EFFECT_DONE` when undefined. */
  readonly result?: unknown;
  readonly error: { readonly code: string; readonly message: string };
}

// One counter for every builder: ids stay unique across the builders of a test file.
let seq = 0;

/**
 * Events for one element as the runtime delivers them to a policy, stamped with `Date.now()` (the
 * faked clock under `vi.useFakeTimers()`) and a fresh id.
 *
 * @example
 * ```ts
 * const ev = eventBuilder('vm:web-1');
 * actor.send(ev('VM_CRASHED')); // { type: 'VM_CRASHED', id: 'e0', ts: Date.now(), elementId: 'vm:web-1', payload: {} }
 * ```
 */
export function eventBuilder(elementId: string): EventBuilder {
  return (type, payload = {}) => ({ type, id: `e${seq++}`, ts: Date.now(), elementId, payload });
}

/**
 * `EFFECT_DONE` / `EFFECT_FAILED` events answering one kind of effect, built with `ev`.
 *
 * @example
 * ```ts
 * const outcome = outcomeBuilder(ev, { effector: 'hypervisor', op: 'start', error: { code: 'EMBOT_ERR_VM_BAD_STATE', message: 'no can do' } });
 * actor.send(outcome('EFFECT_DONE', api.effects.at(-1)!.tag!));
 * ```
 */
export function outcomeBuilder(ev: EventBuilder, effect: EffectShape): OutcomeBuilder {
  return (type, tag, effector = effect.effector) =>
    ev(type, {
      effector,
      op: effect.op,
      tag,
      ...(type === 'EFFECT_DONE' ? (effect.result === undefined ? {} : { result: effect.result }) : { error: effect.error }),
    });
}
