import { ErrorCodes, EventError, StoreError } from '../core/errors.ts';
import { isValidElementId } from '../core/events.ts';
import type { QueuedEvent } from './event-queue.ts';
import { runLength } from './journal.ts';
import type { Journal, SpilledRun } from './journal.ts';

/** Where an incremental shipment of one hold queue stands. */
export interface HoldMark {
  /** {@link HoldQueue.generation} of the queue counted: a queue released and held again starts over. */
  readonly hold: number;
  /** Events of that queue already shipped, from its start (spilled ones included). */
  readonly shipped: number;
}

/**
 * Per element, how far its hold queue was shipped (`SensorService.serializeHeldSince`). Plain data, so a
 * migration can journal it; hand back the cursor the previous call returned.
 */
export type HoldCursor = Readonly<Record<string, HoldMark>>;

/** Queues of one process never share a generation, so a cursor cannot be mistaken for a later hold's. */
let generations = 0;

function badCursor(why: string): never {
  throw new EventError(ErrorCodes.EVENT_INVALID, `hold cursor: ${why}`);
}

/** Checks a cursor handed in by a caller (it may have been journaled and read back) and returns it. */
export function checkHoldCursor(cursor: unknown): HoldCursor {
  if (cursor === null || typeof cursor !== 'object' || Array.isArray(cursor)) return badCursor('expected a map of element id to { hold, shipped }');
  for (const [id, mark] of Object.entries(cursor)) {
    if (!isValidElementId(id)) return badCursor(`key ${JSON.stringify(id)} is not an element id`);
    if (mark === null || typeof mark !== 'object') return badCursor(`entry ${id} is not a { hold, shipped } map`);
    const { hold, shipped } = mark as { hold?: unknown; shipped?: unknown };
    if (!Number.isSafeInteger(hold) || !Number.isSafeInteger(shipped) || (shipped as number) < 0) return badCursor(`entry ${id} needs integer hold and shipped >= 0`);
  }
  return cursor as HoldCursor;
}

/** The cursor's mark for one element (own properties only: an element may be called `constructor`). */
export function markOf(cursor: HoldCursor | undefined, elementId: string): HoldMark | undefined {
  return cursor !== undefined && Object.hasOwn(cursor, elementId) ? cursor[elementId] : undefined;
}

/**
 * How many events of `hq` the cursor says were shipped; `EMBOT_ERR_ELEMENT_NOT_HELD` when the cursor counted an
 * earlier hold of the element (released and held again), `EMBOT_ERR_EVENT_INVALID` when it counts more than the queue has.
 */
export function shippedOf(cursor: HoldCursor | undefined, hq: HoldQueue, what: string): number {
  const mark = markOf(cursor, hq.elementId);
  if (mark === undefined) return 0;
  if (mark.hold !== hq.generation) {
    throw new EventError(ErrorCodes.ELEMENT_NOT_HELD, `${what}: the cursor counts an earlier hold of ${hq.elementId}, which was released; ship that element from the start`, { details: { elementId: hq.elementId } });
  }
  if (mark.shipped > hq.size) badCursor(`${what}: ${mark.shipped} events of ${hq.elementId} shipped but its hold queue has only ${hq.size}`);
  return mark.shipped;
}

/**
 * The events of one held element, in arrival order. Past `memoryLimit` entries in memory, the
 * oldest part moves to table `held_spill` (when a journal is there), so a long hold costs bounded
 * memory and never drops anything: the queue is always "spilled rows by pos, then memory". Every entry
 * is journaled (table `events`), so a spill row may just name it by seq: entries taken in from a peer
 * (`insertHeld`, on a migration's critical path) are written once that way; entries held as they arrive
 * spill with their bytes, so shipping them (`serializeHeldSince`) splices those bytes without decoding.
 *
 * @example
 * ```ts
 * const q = new HoldQueue('vm:a', 10_000, journal);
 * q.push(entry);
 * const all = q.take(); // spilled part first, then memory; the queue is empty afterwards
 * ```
 */
export class HoldQueue {
  readonly elementId: string;
  /** Unique in this process; {@link HoldCursor} marks name it. */
  readonly generation = ++generations;
  private readonly memoryLimit: number;
  private readonly journal: Journal | undefined;
  private memory: QueuedEvent[] = [];
  private spilledCount = 0;
  /** Consecutive spill positions stored the same way, in order: `withEvents` ones hold the events' bytes. */
  private spills: { readonly pos: number; count: number; readonly withEvents: boolean }[] = [];
  private pinnedCount = 0;

  constructor(elementId: string, memoryLimit: number, journal: Journal | undefined) {
    this.elementId = elementId;
    this.memoryLimit = Math.max(1, Math.floor(memoryLimit));
    this.journal = journal;
  }

  /** Events held, spilled ones included. */
  get size(): number {
    return this.spilledCount + this.memory.length;
  }

  get spilled(): number {
    return this.spilledCount;
  }

  /**
   * Appends an entry, which must be journaled when the queue has a journal; returns the entries that just moved to the
   * store (so the caller can forget their ids), or undefined. A spill this push causes stores the events' bytes unless
   * `spillEvents` is false (then the rows only name the journal rows: cheaper now, dearer to ship).
   */
  push(entry: QueuedEvent, spillEvents = true): readonly QueuedEvent[] | undefined {
    this.memory.push(entry);
    if (this.memory.length <= this.memoryLimit || this.journal === undefined || this.pinnedCount > 0) return undefined;
    // Spill down to half the limit so the next spill is limit/2 pushes away, not one.
    const count = this.memory.length - (this.memoryLimit >> 1);
    const moved = this.memory.slice(0, count);
    this.journal.writeSpill(this.elementId, this.spilledCount, moved, spillEvents);
    const last = this.spills.at(-1);
    if (last !== undefined && last.withEvents === spillEvents) last.count += count;
    else this.spills.push({ pos: this.spilledCount, count, withEvents: spillEvents });
    this.memory = this.memory.slice(count);
    this.spilledCount += count;
    return moved;
  }

  /**
   * Appends an entry that has no journal row yet (its event is durable in a `held_blobs` row): it stays in memory, and
   * so does everything after it, until the queue is emptied, since a spill row must name a journal row.
   */
  pushPinned(entry: QueuedEvent): void {
    this.memory.push(entry);
    this.pinnedCount++;
  }

  /** Entries appended with {@link pushPinned} still in the queue. */
  get pinned(): number {
    return this.pinnedCount;
  }

  /** Every entry in arrival order, without changing the queue. */
  entries(): QueuedEvent[] {
    return this.entriesFrom(0);
  }

  /**
   * The entries from position `start` on (0 = the oldest), in arrival order. A queue only grows while held, so a
   * position names the same entry for its whole life; only the spill rows at or after `start` are read.
   */
  entriesFrom(start: number): QueuedEvent[] {
    const from = Math.max(0, start);
    if (from >= this.spilledCount) return this.memory.slice(from - this.spilledCount);
    const spilled = this.journal!.readSpill(this.elementId, from);
    this.checked(spilled.length, this.spilledCount - from, from);
    return spilled.concat(this.memory);
  }

  /** The spilled entries from position `start` on as stored (bytes or journal rows, nothing decoded): for splicing into a shipment. */
  spilledRunsFrom(start: number): SpilledRun[] {
    const runs: SpilledRun[] = [];
    const journal = this.journal;
    for (const spill of this.spills) {
      const from = Math.max(start, spill.pos);
      const to = spill.pos + spill.count;
      if (from >= to) continue;
      const run: SpilledRun = spill.withEvents ? journal!.spilledBytes(this.elementId, from, to) : { rows: journal!.readSpillRows(this.elementId, from, to) };
      this.checked(runLength(run), to - from, from);
      runs.push(run);
    }
    return runs;
  }

  /** The entries in memory from position `start` on (positions count the spilled ones first). */
  memoryFrom(start: number): QueuedEvent[] {
    return this.memory.slice(Math.max(0, start - this.spilledCount));
  }

  /** Removes and returns every entry in arrival order (spill rows are deleted). */
  take(): QueuedEvent[] {
    const all = this.entries();
    this.clear();
    return all;
  }

  /**
   * Empties the queue without reading its spilled part back: returns the entries in memory; the spilled ones are left
   * to the caller, who deletes their journal rows (`Journal.deleteSpilledEvents`) before calling this, since the spill
   * rows name them.
   */
  discard(keepSpillRows = false): QueuedEvent[] {
    const memory = this.memory;
    this.clear(keepSpillRows);
    return memory;
  }

  /** `keepSpillRows`: the caller deletes them (`Journal.deleteSpill`). */
  private clear(keepSpillRows = false): void {
    if (this.spilledCount > 0 && !keepSpillRows) this.journal!.deleteSpill(this.elementId);
    this.memory = [];
    this.spilledCount = 0;
    this.spills = [];
    this.pinnedCount = 0;
  }

  /** Spilled entries read back must all be there: each has a journal row that lives as long as the hold. */
  private checked(found: number, expected: number, from: number): void {
    if (found !== expected) {
      throw new StoreError(ErrorCodes.STORE_CORRUPT, `hold queue ${this.elementId}: ${expected} spilled events expected from position ${from}, the store has ${found}`, {
        details: { elementId: this.elementId, expected, found },
      });
    }
  }
}
