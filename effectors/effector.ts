/**
 * One action on the world. Policies reach effectors only through the runtime's API
 * (`api.effect(name, op, args)`), never by import, so the runtime can mute sensors, isolate
 * failures and report outcomes as events.
 *
 * @example
 * ```ts
 * const hv: Effector = {
 *   name: 'hypervisor',
 *   ops: ['start', 'stop'],
 *   mutes: ['vm'],
 *   elementOf: (args) => `vm:${String(args.vm)}`,
 *   async invoke(op, args) { if (op === 'start') return driver.start(String(args.vm)); },
 * };
 * ```
 */
export interface Effector {
  readonly name: string;
  readonly ops: readonly string[];
  /** Sensors whose events about the acted-on element are muted while this effector acts on it. */
  readonly mutes?: readonly string[];
  /** Element the operation acts on (for muting), if any. */
  elementOf?(args: Readonly<Record<string, unknown>>): string | undefined;
  invoke(op: string, args: Readonly<Record<string, unknown>>): Promise<unknown>;
  getPersistedState?(): unknown;
  restoreState?(state: unknown): void;
}
