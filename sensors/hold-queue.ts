import { ErrorCodes, EventError } from '../core/errors.ts';
import { isValidElementId } from '../core/events.ts';
import type { QueuedEvent } from './event-queue.ts';
import type { Journal } from './journal.ts';

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
 * memory and never drops anything: the queue is always "spilled rows by pos, then memory".
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

  /** Appends; returns the entries that just moved to the store (so the caller can forget their ids), or undefined. */
  push(entry: QueuedEvent): readonly QueuedEvent[] | undefined {
    this.memory.push(entry);
    if (this.memory.length <= this.memoryLimit || this.journal === undefined) return undefined;
    // Spill down to half the limit so the next spill is limit/2 pushes away, not one.
    const count = this.memory.length - (this.memoryLimit >> 1);
    const moved = this.memory.slice(0, count);
    this.journal.writeSpill(this.elementId, this.spilledCount, moved);
    this.memory = this.memory.slice(count);
    this.spilledCount += count;
    return moved;
  }

  /** Every entry in arrival order, without changing the queue. */
  entries(): QueuedEvent[] {
    if (this.spilledCount === 0) return this.memory.slice();
    return this.journal!.readSpill(this.elementId).concat(this.memory);
  }

  /**
   * The entries from position `start` on (0 = the oldest), in arrival order. A queue only grows while held, so a
   * position names the same entry for its whole life; only the spill rows at or after `start` are read.
   */
  entriesFrom(start: number): QueuedEvent[] {
    if (start <= 0) return this.entries();
    if (start >= this.spilledCount) return this.memory.slice(start - this.spilledCount);
    return this.journal!.readSpill(this.elementId, start).concat(this.memory);
  }

  /** Removes and returns every entry in arrival order (spill rows are deleted). */
  take(): QueuedEvent[] {
    const all = this.entries();
    if (this.spilledCount > 0) this.journal!.deleteSpill(this.elementId);
    this.memory = [];
    this.spilledCount = 0;
    return all;
  }
}
