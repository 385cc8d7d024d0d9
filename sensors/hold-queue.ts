import type { QueuedEvent } from './event-queue.ts';
import type { Journal } from './journal.ts';

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

  /** Removes and returns every entry in arrival order (spill rows are deleted). */
  take(): QueuedEvent[] {
    const all = this.entries();
    if (this.spilledCount > 0) this.journal!.deleteSpill(this.elementId);
    this.memory = [];
    this.spilledCount = 0;
    return all;
  }
}
