import { describeError } from '../errors.ts';
import type { Logger } from '../logger.ts';
import type { SensorService } from '../../sensors/index.ts';
import type { MigrationJournal } from './migration-journal.ts';

/** What the new owner's wait for a source's hand-over uses of its agent. */
export interface HandOverHost {
  readonly sensors: Pick<SensorService, 'hold' | 'release'>;
  readonly journal: Pick<MigrationJournal, 'notes' | 'pendingHandOvers'>;
  readonly logger: Logger;
}

export interface HandOverOptions {
  readonly host: HandOverHost;
  /**
   * How long the new owner waits for the hand-over after its commit (or after its restart): the
   * source's grace period plus a step. A source gone for longer has dead-lettered what it held.
   */
  readonly waitMs: number;
  /** A migration of `vm` away from this agent is under way: the hold is that migration's now, not the wait's to release. */
  readonly leaving: (vm: string) => boolean;
}

/** How one wait ended: what `observe` reports. */
export interface HandOverEnd {
  readonly migrationId: string;
  readonly vm: string;
  /** The hand-over came (false: `waitMs` passed first). */
  readonly handedOver: boolean;
  /** From the commit (or the restart) to the release. */
  readonly waitedMs: number;
  /** Of that, how long the running embots' events were held for the hand-over alone: what the wait costs. */
  readonly heldMs: number;
}

interface Wait {
  readonly migrationId: string;
  readonly vm: string;
  readonly scope: readonly string[];
  /** The moved embots run here (attached): released events have someone to go to. */
  ready: boolean;
  handedOver: boolean;
  timedOut: boolean;
  timer: ReturnType<typeof setTimeout> | undefined;
  /** When the wait began (the commit, or the restart), and when the embots ran: for the log. */
  readonly since: number;
  readyAt: number;
}

/**
 * The new owner's side of the hand-over at the end of a migration (DESIGN.md "Exactly once, in
 * order"): the source forwards the events it held after its last dirty round (its "rest") only
 * once it knows the target committed, so an event posted here after the commit has a later `ts`
 * than they do and must not be dispatched before them. The hold the target put on the moved
 * elements at staging therefore stays after the commit until the source's hand-over (its first
 * ForwardedEvents, flagged `handOver`, sent even when it holds nothing) is journaled here; the
 * release then merges both by `ts`. The wait is journaled with the commit (migration notes
 * `handOver: 'pending'`), so a target restarted before the hand-over holds the recovered and the
 * new events again until it comes. A source that never hands over (gone for longer than its
 * grace period) costs a delay of `waitMs`, not an event.
 *
 * @example
 * ```ts
 * host.store.transaction(() => { commitEverything(); waits.journalPending(id); });
 * waits.begin(id, vm, scope, attachAll(host, scope)); // released on handedOver(id) or after waitMs
 * ```
 */
export class HandOverWaits {
  private readonly waits = new Map<string, Wait>();
  /** Restored waits start their clock, and may release, once the agent re-queued its journaled events. */
  private eventsRecovered = false;
  private closed = false;
  private readonly observers = new Set<(end: HandOverEnd) => void>();

  constructor(private readonly o: HandOverOptions) {}

  /** Inside the commit's transaction: after a crash the restarted target knows it still waits. */
  journalPending(migrationId: string): void {
    this.o.host.journal.notes(migrationId, 'target', { handOver: 'pending' });
  }

  /**
   * After the commit: the elements of `scope` (held since staging) stay held until the source's
   * hand-over is in and `ready` (the embots attached) resolved, or `waitMs` passed. When `ready`
   * rejects nothing is released: dispatched now the events would reach no embot, held they come
   * back to the embots on the next start.
   */
  begin(migrationId: string, vm: string, scope: readonly string[], ready: Promise<unknown>): void {
    if (this.closed) return;
    const w = this.add(migrationId, vm, scope);
    this.arm(w);
    void ready.then(
      () => {
        w.ready = true;
        w.readyAt = performance.now();
        this.settle(w);
      },
      () => {
        if (this.waits.get(migrationId) !== w) return;
        this.waits.delete(migrationId);
        if (w.timer !== undefined) clearTimeout(w.timer);
      },
    );
  }

  /**
   * On start, before journaled events are re-queued: the moved elements of every committed
   * migration whose hand-over had not come are held again, so what the journal gives back and
   * what is posted now waits for it. Returns how many.
   */
  restore(): number {
    let n = 0;
    for (const row of this.o.host.journal.pendingHandOvers()) {
      const scope = row.notes.scope ?? [`vm:${row.vm}`];
      this.o.host.sensors.hold(scope);
      this.add(row.id, row.vm, scope);
      this.o.host.logger.info(`migration ${row.id}: waiting for ${row.peer} to hand over the events it held for ${row.vm}`, { migrationId: row.id });
      n++;
    }
    return n;
  }

  /** The agent attached its embots and re-queued its journaled events: restored waits count from now. */
  afterEventsRecovered(): void {
    this.eventsRecovered = true;
    for (const w of this.waits.values()) {
      if (w.timer !== undefined) continue;
      w.ready = true;
      this.arm(w);
      this.settle(w);
    }
  }

  /** Calls `fn` as each wait ends with a release (the bench measures what the wait costs); returns the unsubscribe. */
  observe(fn: (end: HandOverEnd) => void): () => void {
    this.observers.add(fn);
    return () => void this.observers.delete(fn);
  }

  /** Whether this agent still waits for the hand-over of `migrationId`. */
  isWaiting(migrationId: string): boolean {
    return this.waits.has(migrationId);
  }

  /** The source's hand-over of `migrationId` is journaled here (its events are in the hold queues). */
  handedOver(migrationId: string): void {
    const w = this.waits.get(migrationId);
    if (!w) return;
    w.handedOver = true;
    this.settle(w);
  }

  /** Stops the clocks; the journal keeps what is pending for the next start. */
  close(): void {
    this.closed = true;
    for (const w of this.waits.values()) if (w.timer !== undefined) clearTimeout(w.timer);
    this.waits.clear();
  }

  private add(migrationId: string, vm: string, scope: readonly string[]): Wait {
    const w: Wait = { migrationId, vm, scope, ready: false, handedOver: false, timedOut: false, timer: undefined, since: performance.now(), readyAt: 0 };
    this.waits.set(migrationId, w);
    return w;
  }

  private arm(w: Wait): void {
    w.timer = setTimeout(() => {
      w.timedOut = true;
      this.settle(w);
    }, this.o.waitMs);
    w.timer.unref();
  }

  private settle(w: Wait): void {
    if (this.closed || this.waits.get(w.migrationId) !== w) return;
    if (!w.ready || !(w.handedOver || w.timedOut)) return;
    // A restored wait releases only after recovery re-queued the journal (its events go into the hold first).
    if (!this.eventsRecovered && w.timer === undefined) return;
    this.waits.delete(w.migrationId);
    if (w.timer !== undefined) clearTimeout(w.timer);
    const host = this.o.host;
    const now = performance.now();
    const waitedMs = Math.round((now - w.since) * 10) / 10;
    // What the wait added: the time the running embots' events were held for the hand-over alone.
    const heldMs = Math.round((now - Math.max(w.since, w.readyAt)) * 10) / 10;
    if (!w.handedOver) {
      host.logger.warn(`migration ${w.migrationId}: no hand-over of the events the source held for ${w.vm} within ${this.o.waitMs} ms; its events are dispatched here now`, { migrationId: w.migrationId });
    } else {
      host.logger.info(`migration ${w.migrationId}: the source handed over; the events of ${w.vm} flow here`, { migrationId: w.migrationId, waitedMs, heldMs });
    }
    try {
      host.journal.notes(w.migrationId, 'target', { handOver: 'done' });
      // Moving on already: that migration holds the elements and ships their queues; releasing them here would dispatch to embots it froze.
      if (!this.o.leaving(w.vm)) host.sensors.release(w.scope);
    } catch (e) {
      host.logger.error(`migration ${w.migrationId}: could not release the events of ${w.vm} after the hand-over`, { migrationId: w.migrationId, error: describeError(e) });
      return;
    }
    const end: HandOverEnd = { migrationId: w.migrationId, vm: w.vm, handedOver: w.handedOver, waitedMs, heldMs };
    for (const fn of this.observers) fn(end);
  }
}
