import type { PolicyEvent } from '../policy-api.ts';
import type { PolicyChart } from '../policy-chart.ts';

/**
 * Messages between the agent and a module worker. One worker runs every embot of one module, so
 * a throw, a hang or a crash in plugin code costs that module a restart, never the agent.
 */

/** A pending delayed event of a policy, with its absolute deadline (xstate does not persist these). */
export interface PersistedTimer {
  readonly id: string;
  readonly event: { readonly type: string } & Readonly<Record<string, unknown>>;
  readonly deadline: number;
}

export interface PolicyState {
  readonly snapshot: unknown;
  readonly timers: readonly PersistedTimer[];
}

export interface EmbotSpawn {
  readonly embotId: string;
  readonly elementId: string;
  readonly policies: readonly string[];
  /** Policy name → state to restore; a policy absent here starts fresh. */
  readonly restore?: Readonly<Record<string, PolicyState>>;
}

export interface BatchItem {
  readonly embotId: string;
  readonly event: PolicyEvent;
}

export interface EffectRequest {
  readonly embotId: string;
  readonly elementId: string;
  readonly effector: string;
  readonly op: string;
  readonly args: Readonly<Record<string, unknown>>;
  readonly tag?: string;
}

export interface EmitRequest {
  readonly embotId: string;
  readonly elementId: string;
  readonly type: string;
  readonly payload: unknown;
}

export interface PolicyUpdate {
  readonly embotId: string;
  readonly policy: string;
  readonly state: PolicyState;
  /** xstate state value, for `embot embots`. */
  readonly value: unknown;
}

export interface EmbotFailure {
  readonly embotId: string;
  readonly error: { readonly code: string; readonly message: string };
}

/** What processing produced: new policy states, and the outbox to perform once they are committed. */
export interface Outcome {
  readonly updates: readonly PolicyUpdate[];
  readonly effects: readonly EffectRequest[];
  readonly emits: readonly EmitRequest[];
  readonly failures: readonly EmbotFailure[];
}

export type HostToWorker =
  | { readonly t: 'init'; readonly module: string; /** The module bundled into one ESM text (see bundleModule). */ readonly code: string; readonly config: Readonly<Record<string, unknown>>; readonly progress: SharedArrayBuffer }
  | { readonly t: 'spawn'; readonly reqId: number; readonly embots: readonly EmbotSpawn[] }
  | { readonly t: 'batch'; readonly reqId: number; readonly items: readonly BatchItem[] }
  | { readonly t: 'stop'; readonly reqId: number; readonly embotIds: readonly string[] };

export type WorkerToHost =
  | { readonly t: 'ready'; readonly policies: readonly string[]; /** Each policy's statechart, for the dashboard (absent for one whose machine could not be read). */ readonly charts?: Readonly<Record<string, PolicyChart>> }
  | { readonly t: 'init-failed'; readonly error: { readonly code: string; readonly message: string } }
  | ({ readonly t: 'done'; readonly reqId: number } & Outcome)
  /** A delayed transition fired inside the worker, outside any batch. */
  | ({ readonly t: 'timer' } & Outcome)
  | { readonly t: 'log'; readonly embotId: string; readonly level: 'debug' | 'info' | 'warn' | 'error'; readonly message: string; readonly data?: Readonly<Record<string, unknown>> };

/**
 * Slot layout of the shared progress buffer: the worker writes which item of which request it is
 * processing, so when a batch hangs the host knows which embot to quarantine.
 */
export const PROGRESS_REQ = 0;
export const PROGRESS_ITEM = 1;
export const PROGRESS_SLOTS = 2;
