import type { AnyActorRef, EventObject } from 'xstate';
import type { PersistedTimer } from './worker/worker-protocol.ts';

/**
 * xstate v5 keeps pending delayed events (`after`, delayed `raise`/`sendTo`) in its system
 * scheduler and leaves them out of `getPersistedSnapshot()`; a restored actor would never fire
 * them. We read them from `system.getSnapshot()` as absolute deadlines and re-arm them after a
 * restore (or a migration) with the time that is left, so a back-off fires when it would have.
 *
 * Only events the root actor scheduled for itself are kept: policies do not spawn children.
 */
export function pendingTimers(actor: AnyActorRef): PersistedTimer[] {
  const scheduled = actor.system.getSnapshot()._scheduledEvents;
  const out: PersistedTimer[] = [];
  for (const key in scheduled) {
    const s = scheduled[key]!;
    if (s.source !== actor || s.target !== actor) continue;
    out.push({ id: s.id, event: s.event as PersistedTimer['event'], deadline: s.startedAt + s.delay });
  }
  return out;
}

/** Re-arms timers on a started, restored actor; an overdue deadline fires at once (delay 0). */
export function rearmTimers(actor: AnyActorRef, timers: readonly PersistedTimer[], now: number = Date.now()): void {
  for (const t of timers) {
    actor.system.scheduler.schedule(actor, actor, t.event as EventObject, Math.max(0, t.deadline - now), t.id);
  }
}
