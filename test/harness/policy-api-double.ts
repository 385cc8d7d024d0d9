import type { PolicyApi } from '../../embots/policy-api.ts';

/** One `api.effect(...)` call as the policy made it. */
export interface RecordedEffect {
  readonly effector: string;
  readonly op: string;
  readonly args: Readonly<Record<string, unknown>>;
  readonly tag?: string;
}

/**
 * Test double of the runtime's PolicyApi: records what the policy asks for and does nothing else,
 * so a test drives a policy machine with plain events and reads its requests back.
 *
 * @example
 * ```ts
 * const api = new RecordingPolicyApi({ maxCrashes: 1 }, 'vm:web-1');
 * const actor = createActor(createWatchdogMachine(xstate, api)).start();
 * actor.send({ type: 'VM_CRASHED', id: 'e1', ts: Date.now(), elementId: 'vm:web-1', payload: {} });
 * expect(api.effects).toEqual([{ effector: 'hypervisor', op: 'start', args: { vm: 'web-1' }, tag: 'watchdog-restart-1' }]);
 * ```
 */
export class RecordingPolicyApi implements PolicyApi {
  readonly effects: RecordedEffect[] = [];
  readonly emits: { readonly type: string; readonly payload: unknown }[] = [];
  readonly logs: { readonly level: string; readonly message: string }[] = [];

  constructor(
    readonly config: Readonly<Record<string, unknown>> = {},
    readonly elementId = 'vm:web-1',
    readonly embotId = 'embot-1',
  ) {}

  effect(effector: string, op: string, args: Readonly<Record<string, unknown>>, options?: { readonly tag?: string }): void {
    this.effects.push({ effector, op, args, tag: options?.tag });
  }

  emit(type: string, payload?: unknown): void {
    this.emits.push({ type, payload });
  }

  log(level: 'debug' | 'info' | 'warn' | 'error', message: string): void {
    this.logs.push({ level, message });
  }
}
