/**
 * A shipment of held events taken in with `deferJournal` whose bytes a scan vouched for (sensors/held-scan.ts): its
 * events stay bytes until an element's hold queue is first needed (released, shipped on, dropped, or given another
 * event), so a migration's target stages 100k events without building 100k objects before the switch.
 */
import { ErrorCodes, EventError } from '../core/errors.ts';
import type { QueuedEvent } from './event-queue.ts';
import type { HeldScan } from './held-scan.ts';
import { decodeHeld, type DecodedQueue } from './journal.ts';

interface QueueSpan {
  /** Position of the element's queue in the bytes. */
  readonly queue: number;
  /** Index of its first event among all events of the bytes. */
  readonly first: number;
  /** Seq of its first accepted event. */
  readonly seq: number;
  /** Its events that are not duplicates. */
  readonly accepted: number;
}

/**
 * Numbers events like `Journal.insertBlob` does (seq0, seq0 + 1, ... in byte order, duplicates skipped), so an event
 * has the same seq whether it is taken from here or recovered from the blob's row after a restart.
 *
 * @example
 * ```ts
 * const shipment = new LazyShipment(seq0, bytes, scanHeld(bytes)!, new Set(duplicateIndexes));
 * for (const entry of shipment.take('vm:web')) holdQueue.pushPinned(entry); // decoded now
 * ```
 */
export class LazyShipment {
  private readonly spans = new Map<string, QueueSpan>();
  private bytes: Uint8Array | undefined;
  private decoded: DecodedQueue[] | undefined;

  constructor(
    readonly seq0: number,
    bytes: Uint8Array,
    scan: HeldScan,
    private readonly skip: ReadonlySet<number>,
  ) {
    this.bytes = bytes;
    let seq = seq0;
    scan.queues.forEach((q, queue) => {
      let accepted = 0;
      for (let i = q.first; i < q.first + q.count; i++) if (!skip.has(i)) accepted++;
      if (accepted > 0) this.spans.set(q.elementId, { queue, first: q.first, seq, accepted });
      seq += accepted;
    });
  }

  /** Elements with events here that were not taken yet. */
  get elements(): IterableIterator<string> {
    return this.spans.keys();
  }

  /** Events of `elementId` not taken yet. */
  countOf(elementId: string): number {
    return this.spans.get(elementId)?.accepted ?? 0;
  }

  /**
   * The events of `elementId` with their seqs, in arrival order; they are no longer here afterwards. The bytes are
   * decoded on the first call and let go once every element was taken. Throws `EMBOT_ERR_HOLD_DECODE` when they do not
   * decode (a scan vouched for them, so that is a bug), and then keeps the events.
   */
  take(elementId: string): QueuedEvent[] {
    const span = this.spans.get(elementId);
    if (span === undefined) return [];
    // Decoded before anything changes: bytes that do not decode (EMBOT_ERR_HOLD_DECODE) leave the events here.
    const decoded = (this.decoded ??= decodeHeld(this.bytes!));
    const q = decoded[span.queue];
    if (q?.elementId !== elementId) throw new EventError(ErrorCodes.HOLD_DECODE, `held shipment ${this.seq0}: queue ${span.queue} decodes as ${q?.elementId}, expected ${elementId}`);
    this.spans.delete(elementId);
    if (this.spans.size === 0) {
      this.decoded = undefined;
      this.bytes = undefined;
    }
    const out: QueuedEvent[] = [];
    let seq = span.seq;
    for (let i = 0; i < q.events.length; i++) {
      if (this.skip.has(span.first + i)) continue;
      out.push({ event: q.events[i]!, seq: seq++ });
    }
    return out;
  }
}
