/**
 * The large buffers of the data plane's links, shared by every link of the process: a link's
 * PageBatch encode buffers (peer-connection.ts) and its reused receive buffers (receive-buffer.ts).
 *
 * Why shared: a migration takes fresh links (warm-connections.ts never returns a taken one), so
 * buffers kept per link were allocated anew by every migration: at a source, a window of 1 MiB
 * encode buffers per destination; at a destination, a 1 MiB read buffer and a 1 MiB assembly
 * buffer. V8 counts them as external memory and answers every few tens of MB of it with a
 * mark-compact of the whole heap, which profiling showed as the largest item of a destination's
 * CPU per migration (BENCHMARKS.md, "Time to the first boot"). A buffer goes back here only when
 * its link can no longer touch it (a send's write callback, the link's close).
 */
import { Buffer } from 'node:buffer';

/** Buffers are sized in steps of this, so frames of one size (± a header, ± CPU state) share them. */
export const BULK_BUFFER_STEP = 64 * 1024;
/** Free buffers kept: a few links' windows of batches in flight (4 per path) with slack. */
export const MAX_FREE_BULK_BUFFERS = 24;

export class BulkBuffers {
  private readonly free: Buffer[] = [];

  constructor(private readonly maxFree = MAX_FREE_BULK_BUFFERS) {}

  /** A buffer of at least `bytes` (contents undefined), close to that size so a small frame does not pin a big buffer. */
  take(bytes: number): Buffer {
    for (let i = this.free.length - 1; i >= 0; i--) {
      const b = this.free[i]!;
      if (b.byteLength >= bytes && b.byteLength - bytes < 2 * BULK_BUFFER_STEP) {
        this.free.splice(i, 1);
        return b;
      }
    }
    return Buffer.allocUnsafeSlow(Math.ceil(bytes / BULK_BUFFER_STEP) * BULK_BUFFER_STEP);
  }

  /** Gives back a buffer from {@link take} that nothing reads or writes any more. */
  give(buffer: Buffer): void {
    if (this.free.length < this.maxFree && !this.free.includes(buffer)) this.free.push(buffer);
  }

  /** Free buffers now (tests). */
  get size(): number {
    return this.free.length;
  }
}

/** The process's pool. */
export const bulkBuffers = new BulkBuffers();
