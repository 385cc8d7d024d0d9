import type { EmbotEventInput } from '../core/events.ts';

/**
 * What a sensor gets from the sensor service. `emit` never blocks the sensor: events are queued
 * and journaled by the service.
 */
export interface SensorContext {
  emit(input: EmbotEventInput): void;
  now(): number;
}

/**
 * The contract of every sensor (like xstate's ActorLogic: a small interface, state hooks that the
 * agent maps onto the store).
 *
 * @example
 * ```ts
 * const tick: SensorLogic = {
 *   name: 'tick',
 *   start(ctx) { this.timer = setInterval(() => ctx.emit({ elementId: 'host', type: 'TICK' }), 1000) },
 *   stop() { clearInterval(this.timer) },
 * };
 * ```
 */
export interface SensorLogic {
  readonly name: string;
  start(ctx: SensorContext): void;
  stop(): void;
  /** State to keep across restarts (e.g. last reading), msgpackr-encodable. */
  getPersistedState?(): unknown;
  restoreState?(state: unknown): void;
}
