import { pack, unpack } from 'msgpackr';
import { ErrorCodes, EventError, ProtocolError, describeError } from '../errors.ts';
import type { EmbotEvent, EmbotEventInput } from '../events.ts';
import type { PeerConnection } from '../wire/peer-connection.ts';
import type { ForwardedEventsAck } from '../wire/frames.ts';
import { decodeHeld } from '../../sensors/index.ts';
import type { MobilityHost } from './mobility-host.ts';
import { ForwardingJournal, type ForwardRecord, type ForwardingRow } from './forwarding-journal.ts';

export type { ForwardRecord } from './forwarding-journal.ts';

/** Where an event posted for an element goes. */
export type EventDestination =
  | { readonly kind: 'here' }
  /** The element moved; inside the grace period its events are journaled here and forwarded. */
  | { readonly kind: 'forward'; readonly owner: string; readonly migrationId: string }
  /** The grace period just ended; events accepted before it are still being handed over. Refuse once `settled`. */
  | { readonly kind: 'settling'; readonly owner: string; readonly migrationId: string; readonly settled: Promise<void> }
  /** The element moved and the grace period is over: refuse, naming the owner. */
  | { readonly kind: 'moved'; readonly owner: string; readonly migrationId: string };

/** What forwarding uses of its agent. */
export type ForwardingHost = Pick<MobilityHost, 'store' | 'sensors' | 'objects' | 'logger'>;

export interface ForwardingOptions {
  readonly host: ForwardingHost;
  /** Opens an authenticated connection to the named peer. */
  readonly connect: (peer: string) => Promise<PeerConnection>;
  /** First pause before a batch the peer did not take is offered again (default 100 ms); doubles per failure up to `retryMaxMs` (default 2 s). */
  readonly retryMs?: number;
  readonly retryMaxMs?: number;
  /** How long the new owner remembers the ids of forwarded events it took (default one day). */
  readonly rememberMs?: number;
}

interface Active {
  readonly rec: ForwardRecord;
  rest: Uint8Array | undefined;
  /** A hand-over of `rest` in flight, shared by the pump and the sink. */
  restSending: Promise<void> | undefined;
  conn: PeerConnection | undefined;
  expired: boolean;
  endRedirect: () => Promise<void>;
  /** From the end of the grace period: resolves once nothing accepted for forwarding is left. */
  settled: Promise<void> | undefined;
  timer: ReturnType<typeof setTimeout> | undefined;
  pump: ReturnType<typeof setTimeout> | undefined;
  /** Sinks waiting out a back-off: woken early when the grace period ends or the agent stops. */
  readonly waiting: Set<() => void>;
  /** The VM came back (see reclaim): the redirect ended early. */
  reclaimed: boolean;
  /** Something of this forwarding became a dead letter: every later batch does too, so the owner's stream has no gap. */
  gaveUp: boolean;
  /** Requests on `conn` not answered yet: the grace period's end does not cut them off (the peer may be taking them). */
  busy: number;
  /** Closes `conn` once it has been idle {@link IDLE_LINK_MS}; the next batch dials again. */
  idle: ReturnType<typeof setTimeout> | undefined;
}

/**
 * A forwarding's link is closed after this long without a request. Every VM moved to a peer keeps
 * a forwarding for the grace period (30 s by default); held open, their links piled up on a host
 * moving many VMs to one peer until the peer's per-peer link limit (32) refused the next
 * migration's links (`EMBOT_ERR_PEER_LIMIT`). Late events are few: a dial when one comes is cheap.
 */
export const IDLE_LINK_MS = 1000;

const ONE_DAY_MS = 24 * 3600_000;

/**
 * After a completed migration the source forwards late events of the moved elements to their new
 * owner until the grace period ends (DESIGN.md "Nothing lost after the switch"). One instance owns
 * every forwarding of this agent, whether it began at the end of a migration or was restored from
 * the journal by a restarted agent:
 *
 * - the record (what moved, to whom, until when, and the events held after the last round) is
 *   written in the transaction that drops the elements, so a crash either leaves the migration
 *   unsettled (recovery settles it and starts the forwarding) or leaves the forwarding journaled;
 * - the held rest goes first, then the sensor service's redirect hands over batches in order, one
 *   at a time; a batch the peer did not take is offered again after a capped doubling pause, each
 *   attempt on a fresh connection once the last one closed or failed (a peer restarted on another
 *   process is reached again);
 * - at the end of the grace period whatever still waits is offered once more at once, then becomes a
 *   dead letter with the reason (and so does everything after it, so the owner's stream has no gap), and
 *   later events for those elements are refused with the new owner's name (a tombstone).
 */
export class Forwarding {
  readonly journal: ForwardingJournal;
  private readonly active = new Map<string, Active>();
  /** Element -> the forwarding it belongs to (while one is active). */
  private readonly byElement = new Map<string, Active>();
  private readonly retryMs: number;
  private readonly retryMaxMs: number;
  /** Until the agent re-queued its journaled events, an expired redirection must stay: those rows go to it. */
  private eventsRecovered = false;
  private readonly endLater = new Map<Active, () => void>();
  private closed = false;

  constructor(private readonly o: ForwardingOptions) {
    this.journal = new ForwardingJournal(o.host.store);
    this.retryMs = o.retryMs ?? 100;
    this.retryMaxMs = o.retryMaxMs ?? 2000;
  }

  private get host(): ForwardingHost {
    return this.o.host;
  }

  /**
   * Starts forwarding `rec` (the redirect is installed at once, so events for the elements are not
   * dispatched here any more). `rest`: events held after the last round (hold-queue bytes, also when
   * they hold no event), handed over before any redirected one, flagged as the hand-over the new
   * owner waits for. Journal it with {@link record} in the transaction that drops the elements.
   * `link`: an open connection to the new owner (the migration's own) this forwarding takes over, so
   * the hand-over, which the new owner's events wait for, does not wait for a dial. Returns whether
   * it took the link (it closes it then).
   */
  start(rec: ForwardRecord, rest: Uint8Array | undefined, link?: PeerConnection): boolean {
    if (this.closed) return false;
    // An older forwarding of the same VM (it moved here and away again) ends: the elements have one redirect.
    this.reclaim(rec.vm);
    const conn = link?.isOpen && link.remoteAgent === rec.peer ? link : undefined;
    const a: Active = { rec, rest: rest && rest.byteLength > 0 ? rest : undefined, restSending: undefined, conn, expired: false, endRedirect: () => Promise.resolve(), settled: undefined, timer: undefined, pump: undefined, waiting: new Set(), busy: 0, reclaimed: false, gaveUp: false, idle: undefined };
    a.endRedirect = this.host.sensors.redirect(rec.elementIds, (events) => this.sink(a, events));
    this.active.set(rec.migrationId, a);
    for (const id of rec.elementIds) this.byElement.set(id, a);
    a.timer = setTimeout(() => this.expire(a), Math.max(0, rec.until - Date.now()));
    a.timer.unref();
    if (a.rest) this.pumpRest(a, 0);
    else if (conn) this.closeWhenIdle(a, conn);
    return conn !== undefined;
  }

  /** Arms the idle close of `conn` (see {@link IDLE_LINK_MS}); a request meanwhile disarms it. */
  private closeWhenIdle(a: Active, conn: PeerConnection): void {
    if (a.idle) clearTimeout(a.idle);
    a.idle = setTimeout(() => {
      a.idle = undefined;
      if (a.busy > 0 || a.conn !== conn) return;
      a.conn = undefined;
      void conn.close().catch(() => {});
    }, IDLE_LINK_MS);
    a.idle.unref();
  }

  /** Journals `rec` with its tombstones: inside the transaction that drops the moved elements. */
  record(rec: ForwardRecord, rest: Uint8Array | undefined): void {
    this.journal.record(rec, rest);
  }

  /** On start, before journaled events are re-queued: resumes every forwarding not yet settled. */
  restore(): number {
    const rows = this.journal.open();
    for (const row of rows) {
      this.start(row, row.rest);
      this.host.logger.info(`forwarding events of ${row.vm} to ${row.peer} ${row.until > Date.now() ? `until ${new Date(row.until).toISOString()}` : '(grace period over: waiting events become dead letters)'}`, { migrationId: row.migrationId });
    }
    return rows.length;
  }

  /** The agent re-queued its journaled events: expired redirections may end now. */
  afterEventsRecovered(): void {
    this.eventsRecovered = true;
    for (const end of this.endLater.values()) end();
    this.endLater.clear();
  }

  /**
   * The VM `vm` is coming back to this agent (it is the target of a migration again): its forwarding
   * stops taking events (they are held for the migration now; posted ones are refused naming the
   * current owner until the commit), what it already took still goes to the current owner, and a
   * restart does not resume it.
   */
  reclaim(vm: string): void {
    for (const a of this.active.values()) {
      if (a.rec.vm !== vm || a.reclaimed) continue;
      a.reclaimed = true;
      void a.endRedirect();
      for (const id of a.rec.elementIds) if (this.byElement.get(id) === a) this.byElement.delete(id);
      this.journal.end(a.rec.migrationId);
      this.host.logger.info(`migration ${a.rec.migrationId}: ${vm} comes back; its events are no longer forwarded to ${a.rec.peer}`);
    }
  }

  /** Where an event posted for `elementId` goes. */
  destination(elementId: string): EventDestination {
    const a = this.byElement.get(elementId);
    // The deadline counts, not only its timer (which may not have run yet, e.g. right after a restart).
    if (a && !a.expired && Date.now() >= a.rec.until) this.expire(a);
    if (a && !a.expired) return { kind: 'forward', owner: a.rec.peer, migrationId: a.rec.migrationId };
    if (a?.settled) return { kind: 'settling', owner: a.rec.peer, migrationId: a.rec.migrationId, settled: a.settled };
    if (this.host.objects.has(elementId)) return { kind: 'here' };
    const moved = this.journal.movedTo(elementId);
    return moved ? { kind: 'moved', owner: moved.owner, migrationId: moved.migrationId } : { kind: 'here' };
  }

  /**
   * Rejects with EMBOT_ERR_ELEMENT_MOVED (naming the owner) for an element that moved away and whose
   * grace period is over; else tells whether the event will be forwarded. Right after the end of the
   * grace period the refusal waits (up to `settleWaitMs`) until the events accepted before it were
   * handed over: a producer that follows the refusal to the owner then cannot overtake them there.
   * Resolves in the same turn for an event to forward, so the grace period cannot end between the
   * answer and the event's journaling.
   */
  async admit(input: Pick<EmbotEventInput, 'elementId'>, settleWaitMs = 10_000): Promise<{ readonly forwardedTo?: string }> {
    let d = this.destination(input.elementId);
    if (d.kind === 'settling') {
      let timer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([d.settled, new Promise<void>((resolve) => (timer = setTimeout(resolve, settleWaitMs)))]);
      clearTimeout(timer);
      d = { kind: 'moved', owner: d.owner, migrationId: d.migrationId };
    }
    if (d.kind === 'moved') {
      throw new EventError(ErrorCodes.ELEMENT_MOVED, `element ${input.elementId} moved to ${d.owner} (migration ${d.migrationId}) and its grace period is over: post the event to ${d.owner}`, {
        details: { elementId: input.elementId, owner: d.owner, migrationId: d.migrationId },
      });
    }
    return d.kind === 'forward' ? { forwardedTo: d.owner } : {};
  }

  /** Counts of one forwarding, for the migration summary. */
  counts(migrationId: string): { readonly forwarded: number; readonly deadLettered: number } | undefined {
    const row: ForwardingRow | undefined = this.journal.get(migrationId);
    return row && { forwarded: row.forwarded, deadLettered: row.deadLettered };
  }

  /** Ends every forwarding without touching the journal: a restarted agent resumes them. */
  close(): void {
    this.closed = true;
    for (const a of this.active.values()) {
      if (a.timer) clearTimeout(a.timer);
      if (a.pump) clearTimeout(a.pump);
      if (a.idle) clearTimeout(a.idle);
      for (const wake of a.waiting) wake();
      void a.conn?.close().catch(() => {});
    }
    this.active.clear();
    this.byElement.clear();
  }

  // ---- the new owner's side ----

  /**
   * The events of a ForwardedEvents frame: those not taken before (by id, also across restarts of either
   * side) are journaled here; the ids are remembered once they are.
   */
  async receive(migrationId: string, events: readonly EmbotEvent[]): Promise<Omit<ForwardedEventsAck, 'replyTo'>> {
    const seen = this.journal.seen(events.map((e) => e.id));
    const fresh = seen.size === 0 ? events : events.filter((e) => !seen.has(e.id));
    const before = this.host.sensors.stats().duplicates;
    await this.host.sensors.emitMany(fresh);
    const duplicates = this.host.sensors.stats().duplicates - before + seen.size;
    this.journal.remember(fresh.map((e) => e.id), this.o.rememberMs ?? ONE_DAY_MS);
    return { type: 'ForwardedEventsAck', migrationId, accepted: events.length - duplicates, duplicates };
  }

  // ---- internals ----

  /**
   * The redirect's sink: the rest first, then the batch, offered again after a capped doubling
   * pause until the peer takes it (one batch at a time, so nothing overtakes it); once the grace
   * period is over, each batch gets one more attempt (at once, also one that was waiting out a
   * back-off) and is a dead letter when that fails, as is every batch after a dead letter. Rejects
   * only when the agent stops: the rows stay for the next start.
   */
  private async sink(a: Active, events: readonly EmbotEvent[]): Promise<void> {
    const bytes = pack(events);
    let lastTry = false;
    for (let attempt = 0; ; attempt++) {
      if (this.closed) throw new EventError(ErrorCodes.AGENT_STOPPED, 'forwarding stopped with the agent; the events stay journaled');
      if (a.expired) {
        // Once something was dead-lettered, what follows it is too: the new owner never processes an event whose predecessor it lacks.
        // Otherwise one last attempt from the end of the grace period on: a batch that was waiting out a back-off then
        // (its owner restarted meanwhile) is offered once more, as the batches behind it are, instead of becoming the one
        // dead letter in a stream the owner otherwise took (random-faults seed 1882673222: seq 218 of 1269).
        if (lastTry || a.gaveUp) {
          this.deadLetter(a, events);
          return;
        }
        lastTry = true;
      }
      try {
        await this.sendRest(a);
        const reply = await this.request(a, bytes);
        this.journal.countForwarded(a.rec.migrationId, reply.accepted + reply.duplicates);
        if (attempt > 0) this.host.logger.info(`forwarding to ${a.rec.peer} resumed`, { migrationId: a.rec.migrationId, attempts: attempt + 1 });
        return;
      } catch (e) {
        if (attempt === 0 || attempt % 10 === 0) {
          this.host.logger.warn(`cannot forward ${events.length} events of ${a.rec.vm} to ${a.rec.peer} yet; retrying on a new connection`, { migrationId: a.rec.migrationId, attempt, error: describeError(e) });
        }
        // After the grace period the next pass is the last try or the dead letter: no back-off to wait out.
        if (!a.expired) await this.pause(a, attempt);
      }
    }
  }

  private backOff(attempt: number): number {
    return Math.min(this.retryMaxMs, this.retryMs * 2 ** Math.min(attempt, 20));
  }

  /** Waits out the back-off of `attempt`, or less when the grace period ends or the agent stops. */
  private pause(a: Active, attempt: number): Promise<void> {
    return new Promise((resolve) => {
      const wake = (): void => {
        clearTimeout(t);
        a.waiting.delete(wake);
        resolve();
      };
      const t = setTimeout(wake, this.backOff(attempt));
      t.unref();
      a.waiting.add(wake);
    });
  }

  private async request(a: Active, events: Uint8Array, handOver = false): Promise<Omit<ForwardedEventsAck, 'replyTo'>> {
    if (!a.conn?.isOpen) {
      void a.conn?.close().catch(() => {});
      a.conn = undefined;
      a.conn = await this.o.connect(a.rec.peer);
    }
    const conn = a.conn;
    if (a.idle) clearTimeout(a.idle);
    a.idle = undefined;
    a.busy++;
    try {
      const reply = await conn.request({ type: 'ForwardedEvents', migrationId: a.rec.migrationId, events, ...(handOver ? { handOver } : {}) });
      if (reply.type !== 'ForwardedEventsAck') throw new ProtocolError(ErrorCodes.REQUEST_FAILED, `${a.rec.peer} answered ForwardedEvents with ${(reply as { type: string }).type}`);
      return reply;
    } catch (e) {
      // The next attempt opens a fresh connection: a link that failed once is not trusted again.
      if (a.conn === conn) a.conn = undefined;
      void conn.close().catch(() => {});
      throw e;
    } finally {
      a.busy--;
      if (a.expired && a.busy === 0 && a.conn === conn && !this.active.has(a.rec.migrationId)) {
        a.conn = undefined;
        void conn.close().catch(() => {});
      } else if (a.busy === 0 && a.conn === conn) {
        this.closeWhenIdle(a, conn);
      }
    }
  }

  private sendRest(a: Active): Promise<void> {
    if (a.rest === undefined) return Promise.resolve();
    a.restSending ??= (async () => {
      try {
        // Flagged: the new owner holds the elements' events until it has what we held (forwarding-hand-over.ts).
        const reply = await this.request(a, a.rest!, true);
        a.rest = undefined;
        if (!this.closed) this.journal.restTaken(a.rec.migrationId, reply.accepted + reply.duplicates);
      } catch (e) {
        // The grace period ended while this attempt was out: nothing will offer the rest again.
        if (a.expired && !this.closed) this.deadLetterRest(a);
        throw e;
      } finally {
        a.restSending = undefined;
      }
    })();
    return a.restSending;
  }

  /** Offers the held rest until the peer takes it (the redirect may have nothing to send meanwhile). */
  private pumpRest(a: Active, attempt: number): void {
    a.pump = setTimeout(() => {
      a.pump = undefined;
      if (this.closed || a.expired || a.rest === undefined) return;
      this.sendRest(a).catch((e: unknown) => {
        this.host.logger.warn(`cannot hand the held events of ${a.rec.vm} to ${a.rec.peer} yet; retrying`, { migrationId: a.rec.migrationId, attempt, error: describeError(e) });
        this.pumpRest(a, attempt + 1);
      });
    }, attempt === 0 ? 0 : this.backOff(attempt - 1));
    a.pump.unref();
  }

  private expire(a: Active): void {
    if (this.closed || a.expired) return;
    if (a.timer) clearTimeout(a.timer);
    a.expired = true;
    if (a.pump) clearTimeout(a.pump);
    for (const wake of a.waiting) wake();
    // The held rest waiting out a back-off gets one last offer now (sendRest dead-letters it when that fails);
    // the forwarding is settled only once that offer (or one in flight) is answered: refusals wait for it.
    const restDone = (a.rest !== undefined && a.restSending === undefined ? this.sendRest(a) : (a.restSending ?? Promise.resolve())).catch(() => undefined);
    let settle = (): void => {};
    a.settled = new Promise<void>((resolve) => (settle = resolve));
    void a.settled.then(() => this.settled(a));
    const end = (): void => void Promise.all([restDone, a.endRedirect()]).then(settle);
    // Events admitted before this moment may still wait for their journal commit (the sensor service's next
    // turn): the redirection takes them first, then ends.
    if (this.eventsRecovered) setImmediate(end);
    else this.endLater.set(a, end);
  }

  /** The redirection ended and its sink took (or dead-lettered) everything it had: the forwarding is over. */
  private settled(a: Active): void {
    // After close the store may be gone; the forwarding resumes (and ends) on the next start.
    if (this.closed) return;
    for (const id of a.rec.elementIds) if (this.byElement.get(id) === a) this.byElement.delete(id);
    this.active.delete(a.rec.migrationId);
    if (a.idle) clearTimeout(a.idle);
    if (a.busy === 0) {
      void a.conn?.close().catch(() => {});
      a.conn = undefined;
    }
    this.journal.end(a.rec.migrationId);
    const counts = this.counts(a.rec.migrationId);
    this.host.logger.info(`grace period of migration ${a.rec.migrationId} over: events for ${a.rec.vm} are refused here now, naming ${a.rec.peer}`, { ...counts });
  }

  private deadLetterRest(a: Active): void {
    if (a.rest === undefined) return;
    let events: EmbotEvent[] = [];
    try {
      events = decodeForwarded(a.rest);
    } catch (e) {
      this.host.logger.error(`held events of ${a.rec.vm} cannot be decoded to dead-letter them`, { migrationId: a.rec.migrationId, error: describeError(e) });
      a.gaveUp = true;
    }
    a.rest = undefined;
    this.deadLetter(a, events);
    this.journal.restTaken(a.rec.migrationId, 0);
  }

  private deadLetter(a: Active, events: readonly EmbotEvent[]): void {
    if (events.length === 0) return;
    a.gaveUp = true;
    const reason = `EMBOT_ERR_ELEMENT_MOVED: the grace period of migration ${a.rec.migrationId} ended (${new Date(a.rec.until).toISOString()}) before ${a.rec.peer}, the new owner of ${a.rec.vm}, took this event`;
    const n = this.journal.deadLetter(a.rec.migrationId, events, reason);
    this.host.logger.warn(`${n} events for ${a.rec.vm} became dead letters: ${a.rec.peer} did not take them within the grace period`, { migrationId: a.rec.migrationId });
  }
}

/** Forwarded events come as a list, or (the rest of the hold queues) in the hold-queue format. */
export function decodeForwarded(bytes: Uint8Array): EmbotEvent[] {
  let v: unknown;
  try {
    v = unpack(bytes) as unknown;
  } catch (cause) {
    throw new ProtocolError(ErrorCodes.FRAME_MALFORMED, `forwarded events are not msgpack: ${describeError(cause)}`, { cause });
  }
  if (Array.isArray(v)) return v as EmbotEvent[];
  if (v !== null && typeof v === 'object' && 'queues' in v) return decodeHeld(bytes).flatMap((q) => [...q.events]);
  throw new ProtocolError(ErrorCodes.FRAME_MALFORMED, 'forwarded events must be a list of events or hold queues');
}
