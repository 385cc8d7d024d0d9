import { performance } from 'node:perf_hooks';
import { ErrorCodes, EventError, StoreError, describeError } from '../core/errors.ts';
import type { EmbotEvent, EmbotEventInput } from '../core/events.ts';
import { EventIdSource, isValidElementId, isValidEventType } from '../core/events.ts';
import type { Store } from '../core/store/store.ts';
import { EventQueue } from './event-queue.ts';
import type { QueuedEvent } from './event-queue.ts';
import { scanHeld, type HeldScan } from './held-scan.ts';
import { LazyShipment } from './lazy-shipment.ts';
import { HoldQueue, checkHoldCursor, shippedOf } from './hold-queue.ts';
import type { HoldCursor, HoldMark } from './hold-queue.ts';
import {
  Journal,
  assertElementIds,
  decodeHeld,
  encodeHeldParts,
  encodePayload,
  eventPackr,
  runLength,
  isValidEventId,
  isValidSource,
  isValidTs,
  makeEvent,
  whyNotEncodable,
} from './journal.ts';
import type { DecodedQueue, HeldPart } from './journal.ts';
import type { SensorContext, SensorLogic } from './sensor.ts';

export type { HoldCursor, HoldMark } from './hold-queue.ts';

/**
 * What {@link SensorService.emit} answers. `duplicate`: the id was taken here before (README "Events: idempotent
 * posts"), nothing was taken now, and `ts` is the first copy's; the re-post's only where this agent has the first
 * copy's ts nowhere at hand: an id still held in a migration shipment taken undecoded (`deferJournal`), or one minted
 * here and since processed.
 */
export type EmittedEvent = EmbotEvent & { readonly duplicate?: true };

export interface SensorServiceOptions {
  /** Agent name, prefix of event ids (EventIdSource in core/events.ts). */
  readonly host: string;
  /** When given: durable journal in table `events`; when absent: in-memory only. */
  readonly store?: Store;
  /** Events kept in memory per hold queue before spilling to table held_spill (default 10_000). */
  readonly holdMemoryLimit?: number;
  readonly now?: () => number;
  /** How many processed event ids are remembered to refuse duplicates (default 100_000). */
  readonly dedupWindow?: number;
  /** Failures that have no caller to throw to: a subscriber or sensor that threw, a journal write that failed. Default: console.warn. */
  readonly onError?: (error: unknown, where: string) => void;
  /** Delay before a redirection's sink gets a rejected batch again (default 50 ms); doubles per consecutive failure. */
  readonly forwardRetryMs?: number;
  /** Longest such delay (default 5_000 ms). */
  readonly forwardRetryMaxMs?: number;
  /** Most events handed to a sink in one call (default 10_000), so a forwarded batch fits a peer frame. */
  readonly forwardBatchMax?: number;
}

/**
 * Takes the events of redirected elements to their new owner. Resolving means the owner has them: their journal
 * rows are deleted then. Rejecting (or throwing) keeps the rows; the same batch is offered again after a back-off.
 */
export type ForwardSink = (events: readonly EmbotEvent[]) => Promise<void>;

/** One increment of {@link SensorService.serializeHeldSince}. */
export interface HeldShipment {
  /** The hold-queue byte form of {@link SensorService.serializeHeld}: `insertHeld` accepts it. */
  readonly bytes: Uint8Array;
  /** Hand this to the next call to get only what was held after this one. */
  readonly cursor: HoldCursor;
  /** Events in `bytes`. */
  readonly count: number;
}

export interface InsertHeldOptions {
  /**
   * true (default): events go to hold queues, created for elements not held yet (migration staging).
   * false: only elements already held keep theirs; the others' events go to dispatch (events forwarded after the switch).
   */
  readonly hold?: boolean;
  /**
   * true: the bytes are stored as one durable row (table `held_blobs`) instead of a journal row per event, and the
   * events wait in memory; {@link SensorService.release} journals them (off a migration's critical path), {@link
   * SensorService.drop} forgets them, and after a crash the next start journals what is left, so recovery treats them
   * like any journaled event. Only with a store and `hold` not false; events of an element that is redirected, or
   * whose hold queue spilled foreign events, make the call journal as usual.
   */
  readonly deferJournal?: boolean;
}

export interface InsertHeldResult {
  /** Events taken in. */
  readonly accepted: number;
  /** Events skipped because their id was already held, queued, journaled or recently processed here. */
  readonly duplicates: number;
}

export interface Subscriber {
  /** Called synchronously during dispatch. For one element, events arrive in (ts, arrival seq) order. */
  deliver(event: EmbotEvent, seq: number): void;
  /** durable: the subscriber will call sensors.complete([seq]) itself once processed+persisted. Non-durable: complete on return. */
  readonly durable?: boolean;
}

export interface SensorStats {
  /** Posted and not yet dispatched (time-ordered queue plus events waiting for their journal commit). */
  readonly queued: number;
  /** Events in hold queues, spilled ones included. */
  readonly held: number;
  readonly spilled: number;
  /** Held events of deferred shipments still as received bytes: decoded when their hold queue is first needed. */
  readonly undecoded: number;
  /** Events taken into the queue since start: posted or handed over by a migration (not muted or duplicate ones, not journal rows recovered at start). */
  readonly admitted: number;
  /** Rows in table `events` (0 without a store). */
  readonly journaled: number;
  /** Dispatched events still waiting for a durable subscriber's complete(). */
  readonly inFlight: number;
  readonly dispatched: number;
  readonly delivered: number;
  readonly unrouted: number;
  readonly muted: number;
  readonly duplicates: number;
  /** Subscriber deliver() calls that threw. */
  readonly deliveryErrors: number;
  /** Events refused after post: journal write failures and invalid sensor emits. */
  readonly rejected: number;
  /** Events handed to a redirection's sink whose promise resolved. */
  readonly forwarded: number;
  /** Sink calls that rejected or threw (each batch retried). */
  readonly forwardFailures: number;
  /** Events waiting for a sink: not handed over yet, being retried, or in a call that has not settled. */
  readonly forwardQueued: number;
}

interface Deferred {
  readonly promise: Promise<void>;
  resolve(): void;
  reject(e: unknown): void;
}

interface Redirection {
  readonly sink: ForwardSink;
  readonly elementIds: readonly string[];
  /** Accepted for forwarding, not handed to the sink yet, in arrival order. */
  buffer: QueuedEvent[];
  /** The batch the sink works on. One at a time, so a retried batch is never overtaken by later events. */
  sending: readonly QueuedEvent[] | null;
  /** Consecutive failures: they set the back-off. */
  failures: number;
  retry: ReturnType<typeof setTimeout> | null;
  ended: boolean;
  /** Resolved once an ended redirection has nothing left for its sink. */
  drained: (() => void)[];
}

export interface DropOptions {
  /**
   * true: everything in memory goes now, the journal and spill rows on the next turn of the event loop, in their own
   * transaction (a migration source's last step then does not wait for deleting a large hold queue). A crash in
   * between leaves rows that recovery re-queues to nobody (the elements are gone) and deletes.
   */
  readonly deleteLater?: boolean;
}

/** What a drop deletes from the store: rows of whole elements up to `bound`, spill rows, and single rows. */
interface DropPlan {
  readonly bound: number;
  readonly elements: string[];
  readonly spilledEvents: string[];
  readonly spillRows: string[];
  readonly loose: number[];
}

/** A `held_blobs` row: the seqs it numbers and the elements whose events are still only there. */
interface HeldBlob {
  readonly seq0: number;
  readonly count: number;
  readonly elements: Set<string>;
}

interface SensorSlot {
  readonly logic: SensorLogic;
  running: boolean;
}

const DEFAULT_HOLD_LIMIT = 10_000;
const DEFAULT_DEDUP_WINDOW = 100_000;
const DEFAULT_FORWARD_RETRY_MS = 50;
const DEFAULT_FORWARD_RETRY_MAX_MS = 5_000;
const DEFAULT_FORWARD_BATCH_MAX = 10_000;
/** Longest stretch of dispatch before yielding to I/O. */
const SLICE_MS = 10;

function invalid(message: string, details?: Record<string, unknown>): EventError {
  return new EventError(ErrorCodes.EVENT_INVALID, message, details ? { details } : undefined);
}

function muteKey(elementId: string, source: string): string {
  return `${elementId}\u0000${source}`;
}

function deferred(): Deferred {
  let resolve!: () => void;
  let reject!: (e: unknown) => void;
  const promise = new Promise<void>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/** Last id epoch per host name in this process: two services of one name never share an id namespace. */
const epochs = new Map<string, number>();

function claimEpoch(host: string, wanted: number): number {
  const last = epochs.get(host);
  const epoch = last === undefined || wanted > last ? wanted : last + 1;
  epochs.set(host, epoch);
  return epoch;
}

function defaultOnError(error: unknown, where: string): void {
  console.warn(`[embot sensors] ${where}: ${describeError(error)}`);
}

/**
 * The sensor service: one time-ordered event queue, per-element subscriptions, hold queues for
 * elements in migration, and (with a store) a journal that keeps every acknowledged event until
 * its durable subscribers have processed it.
 *
 * Posting is synchronous and cheap; journaling is a group commit per tick (every event posted in
 * one tick shares one transaction and one acknowledgement promise); dispatch drains the queue in
 * time slices on `setImmediate`.
 *
 * For live migration the source holds the VM's elements, ships their hold queues incrementally
 * ({@link SensorService.serializeHeldSince}) and, after the switch, redirects their events to the new
 * owner ({@link SensorService.redirect}); the target takes each increment with `insertHeld`, which
 * de-duplicates by event id.
 *
 * @example
 * ```ts
 * const sensors = new SensorService({ host: 'a', store });
 * sensors.recover();
 * sensors.subscribe('vm:web', { durable: true, deliver(e, seq) { handle(e); store.transaction(() => sensors.complete([seq])) } });
 * await sensors.emit({ elementId: 'vm:web', type: 'VM_CRASHED', payload: { name: 'web' } }); // journaled now
 * ```
 */
export class SensorService {
  private readonly store: Store | undefined;
  private readonly journal: Journal | undefined;
  private readonly holdLimit: number;
  private readonly forwardRetryMs: number;
  private readonly forwardRetryMaxMs: number;
  private readonly forwardBatchMax: number;
  private readonly now: () => number;
  private readonly onError: (error: unknown, where: string) => void;
  private readonly idSource: EventIdSource;
  /** `host.<epoch36>.` of the ids minted here, and how many were minted: such ids are unique by construction. */
  private readonly idPrefix: string;
  private minted = 0;

  private readonly queue = new EventQueue();
  private readonly holds = new Map<string, HoldQueue>();
  /** Spilled entries of a hold queue whose ids were not minted here: only those are read back when it is dropped. */
  private readonly foreignSpilled = new WeakMap<HoldQueue, number>();
  /** Element -> its active redirection. */
  private readonly redirects = new Map<string, Redirection>();
  /** Redirections that are active or still have events for their sink (an ended one drains, then leaves). */
  private readonly forwarding = new Set<Redirection>();
  private readonly subs = new Map<string, readonly Subscriber[]>();
  /** seq -> durable subscribers that have not completed it yet. */
  private readonly pending = new Map<number, number>();
  private readonly mutes = new Map<string, number>();
  /** Row deletes of drops with `deleteLater` not done yet. */
  private dropped: DropPlan[] = [];
  /** Blobs of deferred insertHeld calls whose events are held here without journal rows (few: one per shipment). */
  private readonly blobs: HeldBlob[] = [];
  /**
   * Element -> deferred shipments with events of it still undecoded, oldest first. Its hold queue is "its entries, then
   * these": {@link materialize} appends them before anything reads the queue or adds to it.
   */
  private readonly lazy = new Map<string, LazyShipment[]>();

  /**
   * Foreign ids (given by the producer) live in this service (staged, queued, held in memory, dispatched) plus the last
   * `dedupWindow` finished ones. Ids minted here are not kept: {@link isOwnDuplicate} recognises them by prefix and counter,
   * which saves two hash-set operations per event on the hot path. The value is the event's ts, so a repeated post is
   * answered with the first copy's (NaN where it was not decoded: {@link insertScanned}).
   */
  private readonly known = new Map<string, number>();
  private readonly recent: (string | undefined)[];
  private recentPos = 0;
  /** Producer-given ids recorded in the journal since the last prune of that table. */
  private takenSincePrune = 0;

  private seq: number;
  private readonly seqAtStart: number;
  private recovered = false;

  /** Durable mode: posted in this tick, waiting for the group commit. */
  private staged: QueuedEvent[] = [];
  private stagedPayloads: (Buffer | null)[] = [];
  /** How many of the staged events came with a producer-given id (the group commit records those: rememberTaken). */
  private stagedGiven = 0;
  private batch: Deferred | null = null;
  /** Journal rows whose events reached no durable subscriber; deleted in one transaction per slice. */
  private toDelete: number[] = [];

  private scheduled = false;
  private closed = false;
  private idleWaiters: (() => void)[] = [];
  private readonly sensors = new Map<string, SensorSlot>();
  private sensorsRunning = false;

  private nDispatched = 0;
  private nDelivered = 0;
  private nUnrouted = 0;
  private nMuted = 0;
  private nDuplicates = 0;
  private nDeliveryErrors = 0;
  private nRejected = 0;
  private nForwarded = 0;
  private nForwardFailures = 0;

  constructor(options: SensorServiceOptions) {
    if (typeof options?.host !== 'string' || !/^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/.test(options.host)) {
      throw invalid(`sensor service: host must be a short name of letters, digits, '_' or '-', got ${JSON.stringify(options?.host)}`);
    }
    this.store = options.store;
    this.journal = options.store ? new Journal(options.store) : undefined;
    this.holdLimit = options.holdMemoryLimit ?? DEFAULT_HOLD_LIMIT;
    if (!(this.holdLimit >= 1)) throw invalid(`sensor service: holdMemoryLimit must be >= 1, got ${this.holdLimit}`);
    this.forwardRetryMs = options.forwardRetryMs ?? DEFAULT_FORWARD_RETRY_MS;
    this.forwardRetryMaxMs = options.forwardRetryMaxMs ?? DEFAULT_FORWARD_RETRY_MAX_MS;
    this.forwardBatchMax = Math.floor(options.forwardBatchMax ?? DEFAULT_FORWARD_BATCH_MAX);
    if (!(this.forwardRetryMs >= 1) || !(this.forwardRetryMaxMs >= this.forwardRetryMs)) {
      throw invalid(`sensor service: need 1 <= forwardRetryMs <= forwardRetryMaxMs, got ${this.forwardRetryMs} and ${this.forwardRetryMaxMs}`);
    }
    if (!(this.forwardBatchMax >= 1)) throw invalid(`sensor service: forwardBatchMax must be >= 1, got ${String(options.forwardBatchMax)}`);
    this.now = options.now ?? Date.now;
    this.onError = options.onError ?? defaultOnError;
    const window = options.dedupWindow ?? DEFAULT_DEDUP_WINDOW;
    this.recent = new Array<string | undefined>(Math.max(1, Math.floor(window)));
    let epoch = claimEpoch(options.host, Date.now());
    if (this.journal) {
      // The store may know a later epoch (an earlier run in the same millisecond); it stores what is used.
      epoch = this.journal.claimIdEpoch(epoch);
      epochs.set(options.host, epoch);
    }
    this.idSource = new EventIdSource(options.host, epoch);
    this.idPrefix = `${options.host}.${epoch.toString(36)}.`;
    if (this.journal) {
      this.journal.clearAllSpill();
      // Deferred events of an earlier run become journal rows, so recover() handles them like the others.
      this.journal.convertBlobs((e, seq0) => this.onError(e, `held blob ${seq0} (its events are dropped)`));
      this.seq = this.journal.maxSeq();
    } else {
      this.seq = 0;
    }
    this.seqAtStart = this.seq;
  }

  /**
   * Validate (EventError EMBOT_ERR_EVENT_INVALID for bad elementId/type/ts/payload not msgpack-encodable), fill id/ts,
   * queue for journaling; returns the event synchronously. Non-blocking: sensors use this.
   */
  post(input: EmbotEventInput): EmbotEvent {
    return this.admit(input, undefined);
  }

  /** post + resolves once the event is journaled (the acknowledgement to a producer, e.g. the control API). */
  emit(input: EmbotEventInput): Promise<EmittedEvent> {
    let event: EmittedEvent;
    try {
      event = this.admit(input, undefined);
    } catch (e) {
      return Promise.reject(e);
    }
    const ack = this.ack();
    return ack === undefined ? Promise.resolve(event) : ack.then(() => event);
  }

  /** Validates all inputs first: one bad input rejects the call and posts none of them. */
  emitMany(inputs: readonly EmbotEventInput[]): Promise<EmittedEvent[]> {
    try {
      if (!Array.isArray(inputs)) throw invalid('emitMany: expected an array of events');
      for (let i = 0; i < inputs.length; i++) this.validate(inputs[i]!, `event ${i}`);
      const events = inputs.map((input) => this.admit(input, undefined));
      const ack = this.ack();
      return ack === undefined ? Promise.resolve(events) : ack.then(() => events);
    } catch (e) {
      return Promise.reject(e);
    }
  }

  subscribe(elementId: string, subscriber: Subscriber): () => void {
    if (!isValidElementId(elementId)) throw invalid(`subscribe: invalid element id ${JSON.stringify(elementId)}`);
    if (typeof subscriber?.deliver !== 'function') throw invalid('subscribe: subscriber needs a deliver(event, seq) function');
    // Copy on write: a dispatch in progress keeps iterating the array it started with.
    this.subs.set(elementId, [...(this.subs.get(elementId) ?? []), subscriber]);
    let active = true;
    return () => {
      if (!active) return;
      active = false;
      const list = this.subs.get(elementId);
      if (list === undefined) return;
      const next = list.filter((s) => s !== subscriber);
      if (next.length > 0) this.subs.set(elementId, next);
      else this.subs.delete(elementId);
    };
  }

  /**
   * Decrement the pending count of dispatched events; a journal row is deleted when its count reaches 0. Synchronous, so a
   * caller's surrounding store.transaction() covers the delete (the runtime commits snapshots + completes atomically).
   * Unknown seqs (already completed, never dispatched here) are ignored.
   */
  complete(seqs: Iterable<number>): void {
    const done: number[] = [];
    for (const seq of seqs) {
      const count = this.pending.get(seq);
      if (count === undefined) continue;
      if (count > 1) {
        this.pending.set(seq, count - 1);
        continue;
      }
      this.pending.delete(seq);
      done.push(seq);
    }
    const journal = this.journal;
    if (journal === undefined || done.length === 0) return;
    if (done.length === 1) journal.delete(done[0]!);
    else journal.transaction(() => journal.deleteMany(done));
  }

  hold(elementIds: readonly string[]): void {
    assertElementIds(elementIds, 'hold');
    if (this.dropped.length > 0) this.deleteDropped();
    const fresh: string[] = [];
    for (const id of elementIds) {
      if (this.holds.has(id)) continue;
      this.holds.set(id, new HoldQueue(id, this.holdLimit, this.journal));
      fresh.push(id);
    }
    if (fresh.length === 0 || this.queue.size === 0) return;
    // Events already queued but not dispatched belong to the hold too, or they would reach the
    // source's embots after their state was shipped.
    const set = new Set(fresh);
    const taken = this.queue.extract((e) => set.has(e.elementId));
    taken.sort((a, b) => a.seq - b.seq);
    for (const entry of taken) this.route(entry);
  }

  isHeld(elementId: string): boolean {
    return this.holds.has(elementId);
  }

  /** msgpackr bytes `{ v: 1, queues: [{ elementId, events }] }` of the hold queues (spilled part included); `EMBOT_ERR_ELEMENT_NOT_HELD` for an element that is not held. */
  serializeHeld(elementIds: readonly string[]): Uint8Array {
    assertElementIds(elementIds, 'serializeHeld');
    this.materializeAll(elementIds);
    const parts: HeldPart[] = [];
    for (const id of new Set(elementIds)) parts.push(this.heldPart(this.heldQueue(id, 'serializeHeld'), 0));
    return encodeHeldParts(parts);
  }

  /**
   * The events held since `cursor` (all of them without one), per element in arrival order, in the byte form of
   * {@link serializeHeld}, and the cursor for the next call: a migration ships the hold queues once, then only what
   * arrived in each dirty round. Hold queues only grow while held, so a cursor is a count per queue. Elements of the
   * cursor that are not asked for keep their mark. `EMBOT_ERR_ELEMENT_NOT_HELD` for an element that is not held, or
   * whose queue was released and held again since the cursor; `EMBOT_ERR_EVENT_INVALID` for a malformed cursor.
   *
   * @example
   * ```ts
   * let { bytes, cursor } = sensors.serializeHeldSince(ids); // ManagementEventState
   * ({ bytes, cursor } = sensors.serializeHeldSince(ids, cursor)); // DirtyObjects.events, once per round
   * ```
   */
  serializeHeldSince(elementIds: readonly string[], cursor?: HoldCursor): HeldShipment {
    assertElementIds(elementIds, 'serializeHeldSince');
    this.materializeAll(elementIds);
    const marks = cursor === undefined ? undefined : checkHoldCursor(cursor);
    const next: Record<string, HoldMark> = marks === undefined ? {} : { ...marks };
    const parts: HeldPart[] = [];
    let count = 0;
    for (const id of new Set(elementIds)) {
      const hq = this.heldQueue(id, 'serializeHeldSince');
      const part = this.heldPart(hq, shippedOf(marks, hq, 'serializeHeldSince'));
      parts.push(part);
      count += part.events.length;
      for (const run of part.spilled) count += runLength(run);
      next[id] = { hold: hq.generation, shipped: hq.size };
    }
    return { bytes: encodeHeldParts(parts), cursor: next, count };
  }

  /** Events held for these elements, spilled ones included (0 for an element that is not held). */
  heldCount(elementIds: readonly string[]): number {
    assertElementIds(elementIds, 'heldCount');
    let n = 0;
    for (const id of new Set(elementIds)) n += (this.holds.get(id)?.size ?? 0) + this.lazyCount(id);
    return n;
  }

  /** Rows still in the journal (table `events`) for these elements: queued, held, in flight or waiting for a sink. 0 without a store. */
  journaledFor(elementIds: readonly string[]): number {
    assertElementIds(elementIds, 'journaledFor');
    if (this.dropped.length > 0) this.deleteDropped();
    return this.journal?.countFor(elementIds) ?? 0;
  }

  /**
   * Creates/extends hold queues here (journals the events when durable); EventError EMBOT_ERR_HOLD_DECODE on garbage.
   * All or nothing: the bytes are fully validated before anything changes. Events whose id is already held, queued,
   * journaled or among the last `dedupWindow` processed here are skipped and counted as duplicates, so the same event
   * arriving in ManagementEventState, a dirty round and a forwarded batch is taken once. With `{ hold: false }`, events of
   * elements that are not held go to dispatch instead (events forwarded by the old owner after the switch).
   */
  insertHeld(bytes: Uint8Array, options?: InsertHeldOptions): InsertHeldResult {
    this.assertOpen();
    if (options !== undefined && (options === null || typeof options !== 'object')) throw invalid('insertHeld: options must be an object');
    const createHolds = options?.hold !== false;
    const defer = options?.deferJournal === true && createHolds && this.journal !== undefined;
    if (defer) {
      // Bytes the scan vouches for are staged without decoding their events (see LazyShipment).
      const scan = scanHeld(bytes, { rejectIdPrefix: this.idPrefix });
      if (scan !== undefined && this.canDefer(scan.queues)) {
        if (this.dropped.length > 0) this.deleteDropped();
        return this.insertScanned(bytes, scan);
      }
    }
    const decoded = decodeHeld(bytes);
    if (this.dropped.length > 0) this.deleteDropped();
    if (defer && this.canDefer(decoded)) return this.insertDeferred(bytes, decoded);
    const accepted: QueuedEvent[] = [];
    const journal = this.journal;
    const known = this.known;
    const prefix = this.idPrefix;
    let duplicates = 0;
    let keep = accepted;
    try {
      for (const q of decoded) {
        for (const event of q.events) {
          const id = event.id;
          if (id.startsWith(prefix)) {
            // Minted here: queued here once already, so a duplicate.
            if (!this.isMinted(id)) throw new EventError(ErrorCodes.HOLD_DECODE, `hold queue data: event id ${id} is in this agent's id namespace but was not minted here`);
            duplicates++;
            continue;
          }
          // The known set doubles as this batch's: an id repeated in the batch is found there too (undone on failure).
          // One hash operation: the set grows exactly when the id is new (a known id's ts is overwritten by its own).
          const size = known.size;
          known.set(id, event.ts);
          if (known.size === size) {
            duplicates++;
            continue;
          }
          accepted.push({ event, seq: this.seq + accepted.length + 1 });
        }
      }
      if (journal) {
        const ok = new Uint8Array(accepted.length);
        let inserted: number;
        try {
          inserted = journal.transaction(() => journal.insertMany(accepted, undefined, ok));
        } catch (cause) {
          throw new StoreError(ErrorCodes.STORE_CORRUPT, `insertHeld: journal write failed: ${describeError(cause)}`, { cause });
        }
        if (inserted < accepted.length) {
          // Journaled already (spilled here, or a row of an earlier run): that row is the one copy.
          keep = accepted.filter((_, i) => ok[i] === 1);
          for (let i = 0; i < accepted.length; i++) if (ok[i] === 0) known.delete(accepted[i]!.event.id);
        }
      }
    } catch (e) {
      for (const entry of accepted) known.delete(entry.event.id);
      throw e;
    }
    duplicates += accepted.length - keep.length;
    this.nDuplicates += duplicates;
    this.seq += accepted.length;
    if (createHolds) for (const q of decoded) if (!this.holds.has(q.elementId)) this.holds.set(q.elementId, new HoldQueue(q.elementId, this.holdLimit, journal));
    // Their spill rows name the journal rows just written instead of writing every event a second time.
    for (const entry of keep) this.route(entry, false);
    if (keep.length > 0) this.schedule();
    return { accepted: keep.length, duplicates };
  }

  /**
   * Merge hold queues back into the time-ordered queue by ts (to the sink for a redirected element), destroy them. Elements that are not held are ignored.
   * Events taken in with `deferJournal` are journaled first, in one transaction (`EMBOT_ERR_STORE_CORRUPT` when that fails: nothing is released then).
   */
  release(elementIds: readonly string[]): void {
    assertElementIds(elementIds, 'release');
    this.materializeAll(elementIds);
    const refused = this.blobs.length > 0 ? this.journalPinned(elementIds) : undefined;
    for (const id of elementIds) {
      const hq = this.holds.get(id);
      if (hq === undefined) continue;
      const entries = hq.take();
      this.holds.delete(id);
      const r = this.redirects.get(id);
      for (const entry of entries) {
        if (refused !== undefined && refused.has(entry.seq)) continue;
        this.remember(entry.event.id, entry.event.ts); // spilled ids were forgotten to bound memory
        if (r === undefined) this.queue.push(entry);
        else r.buffer.push(entry);
      }
    }
    if (this.queue.size > 0 || this.forwarding.size > 0) this.schedule();
  }

  /**
   * Deregister: discard hold queues + their journal rows + subscriptions (and undispatched events of those elements).
   * An active {@link redirect} of these elements stays: their events keep going to its sink.
   */
  drop(elementIds: readonly string[], options?: DropOptions): void {
    assertElementIds(elementIds, 'drop');
    if (options !== undefined && (options === null || typeof options !== 'object')) throw invalid('drop: options must be an object');
    const ids = [...new Set(elementIds)];
    const set = new Set(ids);
    this.materializeAll(ids);
    const queued = this.queue.size > 0 ? this.queue.extract((e) => set.has(e.elementId)) : [];
    const journal = this.journal;
    // Remembered as finished, so a copy forwarded back is refused as a duplicate.
    const finished: string[] = [];
    if (journal === undefined) {
      for (const id of ids) {
        const hq = this.holds.get(id);
        if (hq !== undefined) for (const entry of hq.take()) finished.push(entry.event.id);
        this.dropElement(id);
      }
    } else {
      let applyBlobs: (() => void) | undefined;
      const later = options?.deleteLater === true;
      journal.transaction(() => {
        // Elements with an event admitted this turn (staged: its journal commit and its acknowledgement come on the next
        // tick) are not deleted wholesale up to the bound: that event's seq is below it, it is not among the discarded,
        // and with deleteLater its row is written before the deletes run. It goes to the redirection installed before
        // the drop (a move's forwarding, finishSource), and its row is its one copy until the new owner takes it: a
        // wholesale delete took it, and a source killed before the owner took the event lost an acknowledged event
        // (fan-out-crash, `a` killed mid fan-out: a gap in the owner's sequence). Their discarded rows go one by one.
        const staged = new Set<string>();
        if (this.staged.length > 0) for (const entry of this.staged) if (set.has(entry.event.elementId)) staged.add(entry.event.elementId);
        const queuedCount = new Map<string, number>();
        for (const entry of queued) queuedCount.set(entry.event.elementId, (queuedCount.get(entry.event.elementId) ?? 0) + 1);
        const plan: DropPlan = { bound: this.seq, elements: [], spilledEvents: [], spillRows: [], loose: [] };
        const loose = plan.loose;
        const wholesale = new Set<string>();
        for (const id of ids) {
          const hq = this.holds.get(id);
          // Pinned entries (deferJournal) have no journal row: their blob forgets them below.
          const pinned = hq?.pinned ?? 0;
          const discarded = (hq?.size ?? 0) - pinned + (queuedCount.get(id) ?? 0);
          // Spilled entries are not read back, only the ids a copy could come back with (see isKnown).
          if (hq !== undefined && hq.spilled > 0 && this.foreignSpilled.has(hq)) for (const foreign of journal.spilledIdsOutside(id, this.idPrefix)) finished.push(foreign);
          if (hq !== undefined) for (const entry of hq.memoryFrom(0)) finished.push(entry.event.id);
          if (hq !== undefined && hq.spilled > 0) plan.spillRows.push(id);
          if (discarded > 0 && !staged.has(id) && journal.countFor([id]) === discarded) {
            // Every discarded entry has its row; when they are all the element has (nothing in flight or being
            // forwarded), one statement through index events_element deletes exactly them.
            plan.elements.push(id);
            hq?.discard(true);
            wholesale.add(id);
          } else if (hq !== undefined) {
            if (hq.spilled > 0) plan.spilledEvents.push(id);
            for (const entry of hq.discard(true)) if (pinned === 0 || !this.isPinnedSeq(entry.seq)) loose.push(entry.seq);
          }
          this.dropElement(id);
        }
        for (const entry of queued) if (!wholesale.has(entry.event.elementId)) loose.push(entry.seq);
        if (later) this.dropped.push(plan);
        else this.deletePlan(plan);
        if (this.blobs.length > 0) applyBlobs = this.forgetInBlobs(set);
      });
      applyBlobs?.();
      if (later) setImmediate(this.deleteDropped);
    }
    for (const entry of queued) finished.push(entry.event.id);
    for (const id of finished) this.finish(id);
  }

  /** The row deletes of a drop; inside a transaction. */
  private deletePlan(plan: DropPlan): void {
    const journal = this.journal!;
    for (const id of plan.elements) journal.deleteElementUpTo(id, plan.bound);
    // Before their spill rows go: those name the rows.
    for (const id of plan.spilledEvents) journal.deleteSpilledEvents(id);
    for (const id of plan.spillRows) journal.deleteSpill(id);
    journal.deleteMany(plan.loose);
  }

  /**
   * The row deletes of drops with `deleteLater`, in one transaction. Runs on the next turn, and before anything could
   * reuse those rows' keys: a hold (spill positions restart at 0), a count of journaled rows, close. A failure is
   * reported: the rows come back on recovery, to nobody (the elements are gone), and are deleted then.
   */
  private readonly deleteDropped = (): void => {
    if (this.dropped.length === 0) return;
    const plans = this.dropped;
    this.dropped = [];
    const journal = this.journal!;
    try {
      journal.transaction(() => {
        for (const plan of plans) this.deletePlan(plan);
      });
    } catch (e) {
      this.onError(e, 'journal delete of dropped elements');
    }
  };

  /** Whether every element of this shipment may be taken in by {@link insertDeferred}. */
  private canDefer(decoded: readonly { readonly elementId: string }[]): boolean {
    for (const q of decoded) {
      if (this.redirects.has(q.elementId)) return false;
      // A spilled foreign id is only found through its journal row, which a deferred insert does not try to write.
      const hq = this.holds.get(q.elementId);
      if (hq !== undefined && this.foreignSpilled.has(hq)) return false;
    }
    return true;
  }

  /** insertHeld with `deferJournal`: one `held_blobs` row, the events pinned in memory. */
  private insertDeferred(bytes: Uint8Array, decoded: readonly DecodedQueue[]): InsertHeldResult {
    const known = this.known;
    const prefix = this.idPrefix;
    const accepted: QueuedEvent[] = [];
    const skip: number[] = [];
    const elements: string[] = [];
    let index = 0;
    try {
      for (const q of decoded) {
        const before = accepted.length;
        for (const event of q.events) {
          const id = event.id;
          if (id.startsWith(prefix)) {
            if (!this.isMinted(id)) throw new EventError(ErrorCodes.HOLD_DECODE, `hold queue data: event id ${id} is in this agent's id namespace but was not minted here`);
            skip.push(index++);
            continue;
          }
          const size = known.size;
          known.set(id, event.ts);
          if (known.size === size) {
            skip.push(index++);
            continue;
          }
          index++;
          accepted.push({ event, seq: this.seq + accepted.length + 1 });
        }
        if (accepted.length > before) elements.push(q.elementId);
      }
      if (accepted.length > 0) this.writeBlob(bytes, accepted.length, elements, skip);
    } catch (e) {
      for (const entry of accepted) known.delete(entry.event.id);
      throw e;
    }
    this.tookBlob(accepted.length, skip.length, decoded);
    for (const entry of accepted) this.holds.get(entry.event.elementId)!.pushPinned(entry);
    return { accepted: accepted.length, duplicates: skip.length };
  }

  /** The `held_blobs` row of a deferred shipment whose accepted events are numbered from the next seq on. */
  private writeBlob(bytes: Uint8Array, accepted: number, elements: readonly string[], skip: readonly number[]): void {
    const seq0 = this.seq + 1;
    try {
      this.journal!.insertBlob(seq0, accepted, elements, skip, Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength));
    } catch (cause) {
      throw new StoreError(ErrorCodes.STORE_CORRUPT, `insertHeld: held blob write failed: ${describeError(cause)}`, { cause });
    }
    this.blobs.push({ seq0, count: accepted, elements: new Set(elements) });
  }

  /** After a deferred shipment's row is written: its seqs are taken and its elements have hold queues. */
  private tookBlob(accepted: number, duplicates: number, queues: readonly { readonly elementId: string }[]): void {
    this.seq += accepted;
    this.nDuplicates += duplicates;
    for (const q of queues) if (!this.holds.has(q.elementId)) this.holds.set(q.elementId, new HoldQueue(q.elementId, this.holdLimit, this.journal));
  }

  /**
   * insertHeld with `deferJournal` for bytes {@link scanHeld} vouched for: what {@link insertDeferred} does, with the
   * events left undecoded until their hold queue is needed. The ids are de-duplicated now, so the counts, the blob row
   * and the seqs are the ones the decoding path gives.
   */
  private insertScanned(bytes: Uint8Array, scan: HeldScan): InsertHeldResult {
    const known = this.known;
    const ids = scan.ids;
    const skip: number[] = [];
    const elements: string[] = [];
    let accepted = 0;
    for (const q of scan.queues) {
      const before = accepted;
      for (let i = q.first; i < q.first + q.count; i++) {
        // The scan does not decode ts. One hash operation, as in insertHeld: a known id's ts is lost (NaN) only when the
        // shipment repeats it, and firstTs then falls back to its journal row.
        const size = known.size;
        known.set(ids[i]!, NaN);
        if (known.size === size) skip.push(i);
        else accepted++;
      }
      if (accepted > before) elements.push(q.elementId);
    }
    if (accepted > 0) {
      try {
        this.writeBlob(bytes, accepted, elements, skip);
      } catch (e) {
        const skipped = new Set(skip);
        for (let i = 0; i < ids.length; i++) if (!skipped.has(i)) known.delete(ids[i]!);
        throw e;
      }
      const shipment = new LazyShipment(this.seq + 1, bytes, scan, new Set(skip));
      for (const id of elements) {
        const list = this.lazy.get(id);
        if (list === undefined) this.lazy.set(id, [shipment]);
        else list.push(shipment);
      }
    }
    this.tookBlob(accepted, skip.length, scan.queues);
    return { accepted, duplicates: skip.length };
  }

  /**
   * Appends the undecoded events of `elementId` (deferred shipments) to its hold queue, as pinned entries. Throws
   * `EMBOT_ERR_HOLD_DECODE` if a shipment does not decode (the scan vouched for it: a bug); that shipment and the later
   * ones stay undecoded, and their blob rows keep the events for the next start.
   */
  private materialize(elementId: string): void {
    const list = this.lazy.get(elementId);
    if (list === undefined) return;
    const hq = this.holds.get(elementId);
    while (list.length > 0) {
      const entries = list[0]!.take(elementId);
      list.shift();
      if (hq !== undefined) for (const entry of entries) hq.pushPinned(entry);
    }
    this.lazy.delete(elementId);
  }

  private materializeAll(elementIds: Iterable<string>): void {
    if (this.lazy.size === 0) return;
    for (const id of elementIds) this.materialize(id);
  }

  /** Undecoded events of `elementId`. */
  private lazyCount(elementId: string): number {
    const list = this.lazy.get(elementId);
    if (list === undefined) return 0;
    let n = 0;
    for (const shipment of list) n += shipment.countOf(elementId);
    return n;
  }

  private isPinnedSeq(seq: number): boolean {
    for (const b of this.blobs) if (seq >= b.seq0 && seq < b.seq0 + b.count) return true;
    return false;
  }

  /**
   * Journals the pinned entries of these elements' hold queues and takes the elements out of their blobs, in one
   * transaction; returns the seqs of entries refused because their id was journaled already (that row is the one copy).
   */
  private journalPinned(elementIds: readonly string[]): Set<number> {
    const journal = this.journal!;
    const set = new Set<string>();
    const entries: QueuedEvent[] = [];
    for (const id of elementIds) {
      const hq = this.holds.get(id);
      if (hq === undefined || set.has(id)) continue;
      set.add(id);
      if (hq.pinned === 0) continue;
      for (const entry of hq.memoryFrom(0)) if (this.isPinnedSeq(entry.seq)) entries.push(entry);
    }
    const refused = new Set<number>();
    if (set.size === 0) return refused;
    const ok = new Uint8Array(entries.length);
    try {
      const apply = journal.transaction(() => {
        journal.insertMany(entries, undefined, ok);
        return this.forgetInBlobs(set);
      });
      apply();
    } catch (cause) {
      throw new StoreError(ErrorCodes.STORE_CORRUPT, `release: journal write of ${entries.length} deferred events failed: ${describeError(cause)}`, { cause });
    }
    for (let i = 0; i < entries.length; i++) {
      if (ok[i] === 1) continue;
      refused.add(entries[i]!.seq);
      this.nDuplicates++;
    }
    return refused;
  }

  /**
   * Takes these elements out of every blob's row (updated, or deleted when no element is left); call inside a
   * transaction. The blobs in memory change once it commits: the returned function does that.
   */
  private forgetInBlobs(elementIds: ReadonlySet<string>): () => void {
    const journal = this.journal!;
    const changes: { readonly blob: HeldBlob; readonly left: Set<string> }[] = [];
    for (const b of this.blobs) {
      const left = new Set([...b.elements].filter((id) => !elementIds.has(id)));
      if (left.size === b.elements.size) continue;
      journal.setBlobElements(b.seq0, [...left]);
      changes.push({ blob: b, left });
    }
    return () => {
      for (const { blob, left } of changes) {
        blob.elements.clear();
        for (const id of left) blob.elements.add(id);
        if (left.size === 0) this.blobs.splice(this.blobs.indexOf(blob), 1);
      }
    };
  }

  /** Forgets the hold queue and the subscriptions of a dropped element. */
  private dropElement(id: string): void {
    this.holds.delete(id);
    this.subs.delete(id);
  }

  /**
   * After the switch: events of these elements (posted by sensors or `emit`, recovered, released, or inserted with
   * `{ hold: false }`) are no longer queued or dispatched here but handed to `sink`, in arrival order, in one batch per
   * tick after their journal commit (at most `forwardBatchMax` per call, one call at a time). Their journal rows go when
   * the sink resolves; when it rejects they stay and the batch is retried with a doubling back-off. Events already queued
   * here for these elements move to the sink too. Hold queues are left as they are and stop growing, so one last
   * `serializeHeldSince(ids, cursor)` ships exactly what was held after the last round; then {@link drop} them (drop keeps
   * the redirection). A redirection wins over a hold: end it before this agent takes the element back.
   *
   * Returns the function that ends the redirection (after the grace period): later events of these elements are
   * dispatched here as usual (to nobody: counted unrouted); events already handed over keep going to the sink until it
   * takes them or the service closes (their rows stay for {@link recover} then). Its promise resolves once the sink took
   * the last of them (never, when the service closes first). `EMBOT_ERR_EVENT_INVALID` when an element is already
   * redirected.
   *
   * @example
   * ```ts
   * const stop = sensors.redirect(ids, (events) => peer.request({ type: 'ForwardedEvents', migrationId, events: encodeEvents(events) }).then(() => {}));
   * const rest = sensors.serializeHeldSince(ids, cursor); // held since the last round: send it too
   * sensors.drop(ids);
   * setTimeout(stop, graceMs);
   * ```
   */
  redirect(elementIds: readonly string[], sink: ForwardSink): () => Promise<void> {
    this.assertOpen();
    assertElementIds(elementIds, 'redirect');
    if (typeof sink !== 'function') throw invalid('redirect: sink must be a function (events) => Promise<void>');
    const ids = [...new Set(elementIds)];
    for (const id of ids) if (this.redirects.has(id)) throw invalid(`redirect: ${id} is already redirected; end that redirection first`, { elementId: id });
    const r: Redirection = { sink, elementIds: ids, buffer: [], sending: null, failures: 0, retry: null, ended: false, drained: [] };
    for (const id of ids) this.redirects.set(id, r);
    this.forwarding.add(r);
    if (this.queue.size > 0) {
      const set = new Set(ids);
      const taken = this.queue.extract((e) => set.has(e.elementId));
      if (taken.length > 0) {
        taken.sort((a, b) => a.seq - b.seq);
        for (const entry of taken) r.buffer.push(entry);
        this.schedule();
      }
    }
    let active = true;
    let drained: Promise<void> | undefined;
    return () => {
      if (!active) return drained!;
      active = false;
      r.ended = true;
      for (const id of ids) if (this.redirects.get(id) === r) this.redirects.delete(id);
      drained = new Promise<void>((resolve) => r.drained.push(resolve));
      if (r.buffer.length === 0 && r.sending === null) this.drainedAll(r);
      return drained;
    };
  }

  /** On agent start: re-queue the journaled-but-unprocessed events (table events) in (ts, seq) order; returns how many. Only the first call does anything. */
  recover(): number {
    this.assertOpen();
    if (this.journal === undefined || this.recovered) return 0;
    this.recovered = true;
    let n = 0;
    for (const entry of this.journal.all()) {
      if (entry.seq > this.seqAtStart || this.isKnown(entry.event.id)) continue;
      this.remember(entry.event.id, entry.event.ts);
      this.route(entry);
      n++;
    }
    // Producer-given ids taken before the restart (README "Events: idempotent posts"): those still journaled are
    // known now; the processed ones fill the window as if they had been processed in this run, oldest first.
    for (const [id, ts] of this.journal.recentTaken(this.recent.length)) {
      if (this.known.has(id)) continue;
      this.known.set(id, ts);
      this.finish(id);
    }
    if (n > 0) this.schedule();
    return n;
  }

  /** Registers a sensor and restores its persisted state; starts it at once when sensors are running. */
  addSensor(sensor: SensorLogic): void {
    if (sensor === null || typeof sensor !== 'object' || typeof sensor.name !== 'string' || sensor.name.length === 0 || typeof sensor.start !== 'function' || typeof sensor.stop !== 'function') {
      throw new EventError(ErrorCodes.SENSOR_INVALID, 'addSensor: a sensor needs a name, start(ctx) and stop()');
    }
    if (this.sensors.has(sensor.name)) throw new EventError(ErrorCodes.SENSOR_EXISTS, `addSensor: a sensor named ${sensor.name} is already added`, { details: { sensor: sensor.name } });
    const slot: SensorSlot = { logic: sensor, running: false };
    this.sensors.set(sensor.name, slot);
    const saved = this.store?.getComponentState(`sensor:${sensor.name}`);
    if (saved !== undefined && typeof sensor.restoreState === 'function') {
      try {
        sensor.restoreState(eventPackr.unpack(saved));
      } catch (e) {
        this.onError(e, `sensor ${sensor.name} restoreState`);
      }
    }
    if (this.sensorsRunning) this.startSensor(slot);
  }

  startSensors(): void {
    this.assertOpen();
    this.sensorsRunning = true;
    for (const slot of this.sensors.values()) if (!slot.running) this.startSensor(slot);
  }

  /** Stops every sensor and persists its `getPersistedState()` under `sensor:<name>`. A sensor that throws is reported, the others still stop. */
  stopSensors(): void {
    this.sensorsRunning = false;
    for (const slot of this.sensors.values()) {
      const { logic } = slot;
      if (slot.running) {
        slot.running = false;
        try {
          logic.stop();
        } catch (e) {
          this.onError(e, `sensor ${logic.name} stop`);
        }
      }
      if (this.store && typeof logic.getPersistedState === 'function') {
        try {
          const state = logic.getPersistedState();
          if (state !== undefined) this.store.setComponentState(`sensor:${logic.name}`, eventPackr.pack(state));
        } catch (e) {
          this.onError(e, `sensor ${logic.name} getPersistedState`);
        }
      }
    }
  }

  /**
   * While muted, events posted by sensor `sensorName` (event.source) for `elementId` are suppressed and counted (so an
   * effector's own action cannot re-trigger the policy that caused it). Returns the unmute function. Counted mutes nest.
   */
  mute(elementId: string, sensorName: string): () => void {
    if (!isValidElementId(elementId)) throw invalid(`mute: invalid element id ${JSON.stringify(elementId)}`);
    if (!isValidSource(sensorName) || sensorName === undefined) throw invalid(`mute: invalid sensor name ${JSON.stringify(sensorName)}`);
    const key = muteKey(elementId, sensorName);
    this.mutes.set(key, (this.mutes.get(key) ?? 0) + 1);
    let active = true;
    return () => {
      if (!active) return;
      active = false;
      const n = this.mutes.get(key) ?? 0;
      if (n > 1) this.mutes.set(key, n - 1);
      else this.mutes.delete(key);
    };
  }

  stats(): SensorStats {
    let held = 0;
    let spilled = 0;
    let undecoded = 0;
    for (const hq of this.holds.values()) {
      const lazy = this.lazyCount(hq.elementId);
      held += hq.size + lazy;
      undecoded += lazy;
      spilled += hq.spilled;
    }
    let forwardQueued = 0;
    for (const r of this.forwarding) forwardQueued += r.buffer.length + (r.sending?.length ?? 0);
    return {
      queued: this.queue.size + this.staged.length,
      admitted: this.seq - this.seqAtStart,
      held,
      spilled,
      undecoded,
      journaled: this.journal?.rows ?? 0,
      inFlight: this.pending.size,
      dispatched: this.nDispatched,
      delivered: this.nDelivered,
      unrouted: this.nUnrouted,
      muted: this.nMuted,
      duplicates: this.nDuplicates,
      deliveryErrors: this.nDeliveryErrors,
      rejected: this.nRejected,
      forwarded: this.nForwarded,
      forwardFailures: this.nForwardFailures,
      forwardQueued,
    };
  }

  /** Resolves when everything posted so far is journaled and dispatched (for tests and orderly shutdown). */
  idle(): Promise<void> {
    if (this.closed || (!this.scheduled && this.staged.length === 0 && this.queue.size === 0)) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /**
   * Stops sensors, journals what was posted (so every acknowledgement holds), and stops dispatch and forwarding. Queued
   * events, and events a sink has not taken, stay in the journal for {@link recover} on the next start. The store is the
   * caller's to close.
   */
  close(): Promise<void> {
    if (this.closed) return Promise.resolve();
    this.stopSensors();
    if (this.staged.length > 0) this.flush();
    if (this.toDelete.length > 0) this.flushDeletes();
    if (this.dropped.length > 0) this.deleteDropped();
    this.closed = true;
    for (const r of this.forwarding) if (r.retry !== null) clearTimeout(r.retry);
    this.settleIdle();
    return Promise.resolve();
  }

  // ---- internals ----------------------------------------------------------------------------

  private assertOpen(): void {
    if (this.closed) throw new EventError(ErrorCodes.AGENT_STOPPED, 'sensor service is closed');
  }

  /** Throws what {@link admit} would throw, without side effects (emitMany's all-or-nothing check). */
  private validate(input: EmbotEventInput, what: string): void {
    if (input === null || typeof input !== 'object') throw invalid(`${what}: expected an event object`);
    if (!isValidElementId(input.elementId)) throw invalid(`${what}: invalid elementId ${JSON.stringify(input.elementId)}`, { elementId: String(input.elementId) });
    if (!isValidEventType(input.type)) throw invalid(`${what}: invalid type ${JSON.stringify(input.type)} (SCREAMING_CASE, at most 64 characters)`, { type: String(input.type) });
    if (input.ts !== undefined && !isValidTs(input.ts)) throw invalid(`${what}: ts must be a finite number >= 0, got ${String(input.ts)}`);
    if (input.id !== undefined) {
      if (!isValidEventId(input.id)) throw invalid(`${what}: id must be a non-empty string of at most 256 characters`);
      // An id in this agent's own namespace that it has not minted yet would collide with a future event.
      if (input.id.startsWith(this.idPrefix) && !this.isMinted(input.id)) throw invalid(`${what}: id ${input.id} is in this agent's id namespace but was not minted here`);
    }
    if (!isValidSource(input.source)) throw invalid(`${what}: source must be a non-empty string of at most 128 characters`);
    const payload: unknown = input.payload;
    if (payload !== undefined && payload !== null) {
      const why = whyNotEncodable(payload);
      if (why !== undefined) throw invalid(`${what}: payload is not msgpack-encodable: it holds ${why}`, { elementId: input.elementId, type: input.type });
    }
  }

  private admit(input: EmbotEventInput, defaultSource: string | undefined): EmittedEvent {
    if (this.closed) this.assertOpen();
    this.validate(input, 'event');
    const elementId = input.elementId;
    const ts = input.ts ?? this.now();
    const source = input.source ?? defaultSource;
    const payload = input.payload ?? null;
    let id = input.id;
    const generated = id === undefined;
    if (generated) {
      id = this.idSource.next();
      this.minted++;
    }
    let bytes: Buffer | null = null;
    if (this.journal !== undefined && payload !== null) {
      try {
        bytes = encodePayload(payload);
      } catch (cause) {
        throw new EventError(ErrorCodes.EVENT_INVALID, `event: payload is not msgpack-encodable: ${describeError(cause)}`, { cause });
      }
    }
    const event = makeEvent(id!, ts, elementId, input.type, payload, source);
    if (source !== undefined && this.mutes.size > 0 && this.mutes.has(muteKey(elementId, source))) {
      this.nMuted++;
      return event;
    }
    if (!generated) {
      if (this.isKnown(id!)) {
        this.nDuplicates++;
        return { ...event, ts: this.firstTs(id!) ?? ts, duplicate: true };
      }
      this.remember(id!, ts);
    }
    const entry: QueuedEvent = { event, seq: ++this.seq };
    if (this.journal !== undefined) {
      this.staged.push(entry);
      this.stagedPayloads.push(bytes);
      if (!generated) this.stagedGiven++;
    } else {
      this.route(entry);
    }
    if (!this.scheduled) this.schedule();
    return event;
  }

  /** The acknowledgement shared by every emit of this tick; undefined when nothing waits for a journal commit. */
  private ack(): Promise<void> | undefined {
    if (this.staged.length === 0) return undefined;
    if (this.batch === null) this.batch = deferred();
    return this.batch.promise;
  }

  /** `spillEvents`: see {@link HoldQueue.push}. */
  private route(entry: QueuedEvent, spillEvents = true): void {
    // One test on the hot path: with no hold and no redirection every event goes straight to the queue.
    if (this.holds.size === 0 && this.redirects.size === 0) {
      this.queue.push(entry);
      return;
    }
    const r = this.redirects.size > 0 ? this.redirects.get(entry.event.elementId) : undefined;
    if (r !== undefined) {
      r.buffer.push(entry); // handed to the sink by this tick or the next (every caller schedules one)
      return;
    }
    const hq = this.holds.get(entry.event.elementId);
    if (hq === undefined) {
      this.queue.push(entry);
      return;
    }
    // Events of a deferred shipment came first: they go in before this one.
    if (this.lazy.size > 0) {
      try {
        this.materialize(entry.event.elementId);
      } catch (e) {
        this.onError(e, `held shipment of ${entry.event.elementId} (its events stay in the store for the next start)`);
      }
    }
    let moved: readonly QueuedEvent[] | undefined;
    try {
      moved = hq.push(entry, spillEvents);
    } catch (e) {
      // The spill write failed; the event is still in memory (and journaled), so nothing is lost.
      this.onError(e, `hold queue ${entry.event.elementId} spill`);
      return;
    }
    if (moved === undefined) return;
    let foreign = 0;
    for (const m of moved) {
      const id = m.event.id;
      if (id.startsWith(this.idPrefix)) continue;
      this.known.delete(id);
      foreign++;
    }
    if (foreign > 0) this.foreignSpilled.set(hq, (this.foreignSpilled.get(hq) ?? 0) + foreign);
  }

  private schedule(): void {
    if (this.scheduled || this.closed) return;
    this.scheduled = true;
    setImmediate(this.tick);
  }

  private readonly tick = (): void => {
    this.scheduled = false;
    if (this.closed) return;
    if (this.staged.length > 0) this.flush();
    if (this.forwarding.size > 0) this.forward();
    this.drain();
    if (this.toDelete.length > 0) this.flushDeletes();
    if (this.closed) return;
    if (this.queue.size > 0 || this.staged.length > 0) this.schedule();
    else this.settleIdle();
  };

  /** The group commit: every event staged since the last tick in one transaction, then one acknowledgement. */
  private flush(): void {
    const journal = this.journal!;
    const entries = this.staged;
    const payloads = this.stagedPayloads;
    const batch = this.batch;
    const given = this.stagedGiven;
    this.staged = [];
    this.stagedPayloads = [];
    this.stagedGiven = 0;
    this.batch = null;
    const ok = new Uint8Array(entries.length);
    try {
      journal.transaction(() => {
        journal.insertMany(entries, payloads, ok);
        if (given > 0) this.rememberTaken(entries, ok);
      });
    } catch (cause) {
      for (const entry of entries) this.forget(entry.event.id);
      this.nRejected += entries.length;
      const error = new StoreError(ErrorCodes.STORE_CORRUPT, `sensor journal write failed, ${entries.length} events not acknowledged: ${describeError(cause)}`, { cause });
      if (batch) batch.reject(error);
      else this.onError(error, 'journal');
      return;
    }
    for (let i = 0; i < entries.length; i++) {
      const entry = entries[i]!;
      if (ok[i] === 1) {
        this.route(entry);
      } else {
        // Already journaled (a spilled held event, or a row of an earlier run): the journal row is the one copy.
        this.nDuplicates++;
        this.forget(entry.event.id);
      }
    }
    batch?.resolve();
  }

  private drain(): void {
    const queue = this.queue;
    const start = performance.now();
    let n = 0;
    for (;;) {
      const entry = queue.pop();
      if (entry === undefined) return;
      this.dispatch(entry);
      if ((++n & 1023) === 0 && (this.closed || performance.now() - start > SLICE_MS)) return;
    }
  }

  private dispatch(entry: QueuedEvent): void {
    const { event, seq } = entry;
    this.nDispatched++;
    this.finish(event.id);
    const subs = this.subs.get(event.elementId);
    if (subs === undefined) {
      this.nUnrouted++;
      if (this.journal !== undefined) this.toDelete.push(seq);
      return;
    }
    let durable = 0;
    for (let i = 0; i < subs.length; i++) if (subs[i]!.durable === true) durable++;
    if (durable > 0) this.pending.set(seq, durable);
    else if (this.journal !== undefined) this.toDelete.push(seq);
    for (let i = 0; i < subs.length; i++) {
      try {
        subs[i]!.deliver(event, seq);
        this.nDelivered++;
      } catch (e) {
        // A durable subscriber that threw keeps its pending count: the journal row stays for recovery.
        this.nDeliveryErrors++;
        this.onError(e, `subscriber of ${event.elementId} failed on ${event.type} ${event.id}`);
      }
    }
  }

  /** Whether an event with this id is live here or was processed recently. */
  private isKnown(id: string): boolean {
    return id.startsWith(this.idPrefix) ? this.isMinted(id) : this.known.has(id);
  }

  /** Every id minted here was queued here once, so one coming back is a duplicate (no set needed for them). */
  private isMinted(id: string): boolean {
    const tail = id.slice(this.idPrefix.length);
    return /^[0-9a-z]{1,11}$/.test(tail) && parseInt(tail, 36) < this.minted;
  }

  private remember(id: string, ts: number): void {
    if (!id.startsWith(this.idPrefix)) this.known.set(id, ts);
  }

  /** The ts of the first copy of a known id, where this agent still has it. */
  private firstTs(id: string): number | undefined {
    const ts = id.startsWith(this.idPrefix) ? NaN : this.known.get(id);
    if (ts !== undefined && !Number.isNaN(ts)) return ts;
    // Minted here, or taken undecoded by a migration: its journal row has it until it is processed.
    try {
      return this.journal?.tsOf(id);
    } catch (e) {
      this.onError(e, `journal lookup of event ${id}`);
      return undefined;
    }
  }

  private forget(id: string): void {
    if (!id.startsWith(this.idPrefix)) this.known.delete(id);
  }

  /**
   * Records the producer-given ids of the rows just journaled, in their transaction, so the window survives a restart
   * (recover reads them back): a post re-sent after a restart is refused even when its first copy was processed.
   * Ids minted here need no record (isMinted); the table keeps the newest window's worth.
   */
  private rememberTaken(entries: readonly QueuedEvent[], ok: Uint8Array): void {
    let ids: string[] | undefined;
    let ts: number[] | undefined;
    for (let i = 0; i < entries.length; i++) {
      const e = entries[i]!.event;
      if (ok[i] === 1 && !e.id.startsWith(this.idPrefix)) {
        (ids ??= []).push(e.id);
        (ts ??= []).push(e.ts);
      }
    }
    if (ids === undefined) return;
    const journal = this.journal!;
    journal.rememberTaken(ids, ts!, this.now());
    this.takenSincePrune += ids.length;
    // A tenth of the window between prunes: the table holds at most 1.1 windows.
    if (this.takenSincePrune * 10 >= this.recent.length) {
      journal.pruneTaken(this.recent.length);
      this.takenSincePrune = 0;
    }
  }

  /** Remembers a processed foreign id for the de-duplication window. */
  private finish(id: string): void {
    if (id.startsWith(this.idPrefix)) return;
    const old = this.recent[this.recentPos];
    if (old !== undefined) this.known.delete(old);
    this.recent[this.recentPos] = id;
    if (++this.recentPos === this.recent.length) this.recentPos = 0;
  }

  private flushDeletes(): void {
    const journal = this.journal!;
    const seqs = this.toDelete;
    this.toDelete = [];
    try {
      journal.transaction(() => journal.deleteMany(seqs));
    } catch (e) {
      // Left rows are re-delivered after a restart to subscribers that did not ask for durability: harmless.
      this.onError(e, 'journal delete');
    }
  }

  private heldQueue(elementId: string, what: string): HoldQueue {
    const hq = this.holds.get(elementId);
    if (hq === undefined) throw new EventError(ErrorCodes.ELEMENT_NOT_HELD, `${what}: element ${elementId} is not held`, { details: { elementId } });
    return hq;
  }

  /** A hold queue from position `start` on, its spilled part as stored: what {@link encodeHeldParts} splices. */
  private heldPart(hq: HoldQueue, start: number): HeldPart {
    return { elementId: hq.elementId, spilled: hq.spilledRunsFrom(start), events: hq.memoryFrom(start).map((e) => e.event) };
  }

  /** Deletes the journal rows of these entries in one transaction; a failure is reported, not thrown (the rows only come back on recovery). */
  private deleteRows(entries: readonly QueuedEvent[], where: string): void {
    const journal = this.journal;
    if (journal === undefined) return;
    try {
      journal.transaction(() => journal.deleteMany(entries.map((e) => e.seq)));
    } catch (e) {
      this.onError(e, where);
    }
  }

  /** Hands each redirection's buffered events to its sink, unless a call is still out or a retry is waiting. */
  private forward(): void {
    for (const r of this.forwarding) {
      if (r.sending === null && r.retry === null && r.buffer.length > 0) this.send(r);
    }
  }

  private send(r: Redirection): void {
    const all = r.buffer;
    const n = Math.min(all.length, this.forwardBatchMax);
    const batch = n === all.length ? all : all.slice(0, n);
    r.buffer = n === all.length ? [] : all.slice(n);
    r.sending = batch;
    const events = batch.map((e) => e.event);
    let result: Promise<void>;
    try {
      result = Promise.resolve(r.sink(events));
    } catch (e) {
      result = Promise.reject(e);
    }
    result.then(
      () => this.forwarded(r, batch),
      (e: unknown) => this.forwardFailed(r, batch, e),
    );
  }

  private forwarded(r: Redirection, batch: readonly QueuedEvent[]): void {
    r.sending = null;
    r.failures = 0;
    this.nForwarded += batch.length;
    // After close the store may be closed too: the rows stay and come back through recover().
    if (this.closed) return;
    this.deleteRows(batch, 'journal delete of forwarded events');
    for (let i = 0; i < batch.length; i++) this.finish(batch[i]!.event.id);
    if (r.buffer.length > 0) this.schedule();
    else if (r.ended) this.drainedAll(r);
  }

  /** An ended redirection has nothing left for its sink: it leaves, and whoever waits for that is told. */
  private drainedAll(r: Redirection): void {
    this.forwarding.delete(r);
    const waiting = r.drained;
    r.drained = [];
    for (const resolve of waiting) resolve();
  }

  private forwardFailed(r: Redirection, batch: readonly QueuedEvent[], error: unknown): void {
    r.sending = null;
    r.failures++;
    this.nForwardFailures++;
    r.buffer = batch.concat(r.buffer);
    this.onError(error, `forwarding ${batch.length} events of ${r.elementIds.join(', ')} (attempt ${r.failures})`);
    if (this.closed) return;
    const delay = Math.min(this.forwardRetryMaxMs, this.forwardRetryMs * 2 ** Math.min(r.failures - 1, 30));
    r.retry = setTimeout(() => {
      r.retry = null;
      this.schedule();
    }, delay);
    // A retry alone must not keep a stopping process alive: the rows wait in the journal.
    r.retry.unref();
  }

  private settleIdle(): void {
    if (this.idleWaiters.length === 0) return;
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const w of waiters) w();
  }

  private startSensor(slot: SensorSlot): void {
    const name = slot.logic.name;
    const ctx: SensorContext = {
      emit: (input) => {
        if (this.closed) return;
        try {
          this.admit(input, name);
        } catch (e) {
          // A sensor's bad event must not throw into its timer callback and take the agent down.
          this.nRejected++;
          this.onError(e, `sensor ${name} emit`);
        }
      },
      now: this.now,
    };
    try {
      slot.logic.start(ctx);
      slot.running = true;
    } catch (e) {
      this.onError(e, `sensor ${name} start`);
    }
  }
}
