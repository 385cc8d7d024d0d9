import type { EmbotEvent } from '../core/events.ts';

/** An event waiting in a queue, with the arrival sequence that breaks `ts` ties (and names its journal row). */
export interface QueuedEvent {
  readonly event: EmbotEvent;
  readonly seq: number;
}

/** Total order of dispatch: `ts`, then arrival `seq`. */
export function before(a: QueuedEvent, b: QueuedEvent): boolean {
  const ta = a.event.ts;
  const tb = b.event.ts;
  return ta < tb || (ta === tb && a.seq < b.seq);
}

/**
 * The time-ordered queue: pops the smallest `(ts, seq)` first.
 *
 * Almost every event arrives with a `ts` no older than the previous one, so such events go to a
 * plain FIFO run (O(1) push and pop); only out-of-order arrivals (old timestamps, released hold
 * queues, recovered journal rows) pay for the binary heap. `pop` takes the smaller of both heads.
 *
 * @example
 * ```ts
 * const q = new EventQueue();
 * q.push({ event: { id: 'a.1', ts: 20, elementId: 'vm:a', type: 'T', payload: null }, seq: 1 });
 * q.push({ event: { id: 'a.2', ts: 10, elementId: 'vm:a', type: 'T', payload: null }, seq: 2 });
 * q.pop()?.seq; // 2
 * ```
 */
export class EventQueue {
  private run: QueuedEvent[] = [];
  private runHead = 0;
  private heap: QueuedEvent[] = [];

  get size(): number {
    return this.run.length - this.runHead + this.heap.length;
  }

  push(entry: QueuedEvent): void {
    const run = this.run;
    if (run.length === this.runHead || !before(entry, run[run.length - 1]!)) {
      run.push(entry);
      return;
    }
    this.heapPush(entry);
  }

  /** The next entry without removing it. */
  peek(): QueuedEvent | undefined {
    const r = this.runHead < this.run.length ? this.run[this.runHead] : undefined;
    const h = this.heap.length > 0 ? this.heap[0] : undefined;
    if (r === undefined) return h;
    if (h === undefined) return r;
    return before(h, r) ? h : r;
  }

  pop(): QueuedEvent | undefined {
    const run = this.run;
    const heap = this.heap;
    if (this.runHead < run.length) {
      const r = run[this.runHead]!;
      if (heap.length === 0 || !before(heap[0]!, r)) {
        run[this.runHead++] = undefined as unknown as QueuedEvent; // let the event be collected
        if (this.runHead === run.length) {
          run.length = 0;
          this.runHead = 0;
        } else if (this.runHead >= 4096 && this.runHead * 2 >= run.length) {
          this.run = run.slice(this.runHead);
          this.runHead = 0;
        }
        return r;
      }
    } else if (heap.length === 0) {
      return undefined;
    }
    return this.heapPop();
  }

  /** Removes and returns every entry whose event matches, in no particular order (hold, drop). O(n). */
  extract(match: (event: EmbotEvent) => boolean): QueuedEvent[] {
    const out: QueuedEvent[] = [];
    const keptRun: QueuedEvent[] = [];
    for (let i = this.runHead; i < this.run.length; i++) {
      const e = this.run[i]!;
      if (match(e.event)) out.push(e);
      else keptRun.push(e);
    }
    const keptHeap: QueuedEvent[] = [];
    for (const e of this.heap) {
      if (match(e.event)) out.push(e);
      else keptHeap.push(e);
    }
    if (out.length === 0) return out;
    this.run = keptRun; // a subsequence of a sorted run is still sorted
    this.runHead = 0;
    this.heap = keptHeap;
    for (let i = (keptHeap.length >> 1) - 1; i >= 0; i--) this.siftDown(i);
    return out;
  }

  clear(): void {
    this.run = [];
    this.runHead = 0;
    this.heap = [];
  }

  private heapPush(entry: QueuedEvent): void {
    const heap = this.heap;
    let i = heap.length;
    heap.push(entry);
    while (i > 0) {
      const parent = (i - 1) >> 1;
      const p = heap[parent]!;
      if (!before(entry, p)) break;
      heap[i] = p;
      i = parent;
    }
    heap[i] = entry;
  }

  private heapPop(): QueuedEvent {
    const heap = this.heap;
    const top = heap[0]!;
    const last = heap.pop()!;
    if (heap.length > 0) {
      heap[0] = last;
      this.siftDown(0);
    }
    return top;
  }

  private siftDown(start: number): void {
    const heap = this.heap;
    const n = heap.length;
    const item = heap[start]!;
    let i = start;
    for (;;) {
      let child = 2 * i + 1;
      if (child >= n) break;
      if (child + 1 < n && before(heap[child + 1]!, heap[child]!)) child++;
      const c = heap[child]!;
      if (!before(c, item)) break;
      heap[i] = c;
      i = child;
    }
    heap[i] = item;
  }
}
