import type * as XState from 'xstate';
import type { AnyStateMachine } from 'xstate';

/** Version of the plugin API; a manifest's `embotApi` must equal it. */
export const EMBOT_API_VERSION = 1;

/** The xstate event a policy receives for every sensor event of its elements. */
export interface PolicyEvent<T extends string = string, P = unknown> {
  readonly type: T;
  readonly id: string;
  readonly ts: number;
  readonly elementId: string;
  readonly payload: P;
}

/**
 * Payload of the `EFFECT_DONE` / `EFFECT_FAILED` event that reports the outcome of
 * {@link PolicyApi.effect}. Outcomes come back as ordinary, journaled events, so a restart
 * between the call and its outcome loses nothing.
 */
export interface EffectOutcome {
  readonly effector: string;
  readonly op: string;
  readonly tag?: string;
  readonly result?: unknown;
  readonly error?: { readonly code: string; readonly message: string };
}

/**
 * What a policy's actions may do. The runtime hands one to every policy instance; actions
 * capture it when the policy's machine is created.
 */
export interface PolicyApi {
  /** Id of the embot running this policy. */
  readonly embotId: string;
  /** The element the embot was attached to (e.g. `vm:web-1`). */
  readonly elementId: string;
  /** The module's config merged over its manifest defaults. */
  readonly config: Readonly<Record<string, unknown>>;
  /**
   * Asks an effector to act. Never blocks; the outcome arrives as `EFFECT_DONE` or
   * `EFFECT_FAILED` (payload {@link EffectOutcome}) for `elementId`.
   */
  effect(effector: string, op: string, args: Readonly<Record<string, unknown>>, options?: { readonly tag?: string }): void;
  /** Raises an event through the sensor service (journaled, time-ordered). */
  emit(type: string, payload?: unknown, elementId?: string): void;
  log(level: 'debug' | 'info' | 'warn' | 'error', message: string, data?: Readonly<Record<string, unknown>>): void;
}

/** A named policy: a factory of an xstate machine bound to one {@link PolicyApi}. */
export interface PolicyDefinition<M extends AnyStateMachine = AnyStateMachine> {
  readonly name: string;
  create(api: PolicyApi): M;
}

/** What a module's entry returns: its policies by name. Embot types are declared in the manifest. */
export interface ModuleDefinition {
  readonly policies: Readonly<Record<string, PolicyDefinition>>;
}

/**
 * Handed to a module's entry. Modules import nothing at run time from embot or xstate: a module
 * shipped from a peer into a plugin cache resolves no packages, so everything it needs comes in
 * the kit. (`import type` is fine: types are erased.)
 */
export interface ModuleKit {
  readonly xstate: typeof XState;
  readonly definePolicy: typeof definePolicy;
  readonly apiVersion: number;
}

/** A module entry's default export. */
export type ModuleEntry = (kit: ModuleKit) => ModuleDefinition;

/**
 * Names a policy factory.
 *
 * @example
 * ```ts
 * import type { ModuleKit } from 'embot/embots';
 * export default ({ xstate: { setup }, definePolicy }: ModuleKit) => ({
 *   policies: {
 *     echo: definePolicy('echo', (api) =>
 *       setup({ actions: { say: () => api.log('info', 'hello') } })
 *         .createMachine({ initial: 'watching', states: { watching: { on: { PING: { actions: 'say' } } } } })),
 *   },
 * });
 * ```
 */
export function definePolicy<M extends AnyStateMachine>(name: string, create: (api: PolicyApi) => M): PolicyDefinition<M> {
  return { name, create };
}
