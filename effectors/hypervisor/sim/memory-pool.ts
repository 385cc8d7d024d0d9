/**
 * VM memory the sim driver has let go of (a VM removed, an incoming VM discarded), kept for the
 * next VM of the same size.
 *
 * Why: a fresh `Uint8Array` of a VM's size is external memory to V8, and V8 answers every few tens
 * of MB of it with a mark-compact of the whole heap; its pages are also faulted in and zeroed by
 * the kernel on first touch. An agent that receives and sends VMs (every migration target and
 * source, and each destination of a fan-out that loses) paid both per migration: profiled at an
 * 8 MiB destination, GC was the largest single item of its CPU (BENCHMARKS.md, "Time to the
 * first boot"). A reused buffer is already mapped; it is zeroed here, which costs a memset instead.
 *
 * Bounded in bytes, and only for VMs small enough that this matters: a large VM's copy dwarfs its
 * allocation, and keeping its memory idle would cost the host more than it saves.
 */
export interface MemoryPoolOptions {
  /** Free bytes kept at most (default 64 MiB). */
  readonly maxFreeBytes?: number;
  /** Buffers larger than this are never kept (default 64 MiB). */
  readonly maxBufferBytes?: number;
}

export interface MemoryPoolCounts {
  /** Buffers handed out that were reused. */
  reused: number;
  /** Buffers handed out that were allocated. */
  allocated: number;
  /** Buffers given back and kept. */
  kept: number;
}

export const DEFAULT_POOL_BYTES = 64 * 1024 * 1024;

/**
 * @example
 * ```ts
 * const pool = new MemoryPool();
 * const memory = pool.take(8 << 20); // all zero, reused or new
 * // ... once nothing reads or writes `memory` any more:
 * pool.give(memory);
 * ```
 */
export class MemoryPool {
  readonly counts: MemoryPoolCounts = { reused: 0, allocated: 0, kept: 0 };
  private readonly free: Uint8Array[] = [];
  private freeBytes = 0;
  private readonly maxFreeBytes: number;
  private readonly maxBufferBytes: number;

  constructor(o: MemoryPoolOptions = {}) {
    this.maxFreeBytes = o.maxFreeBytes ?? DEFAULT_POOL_BYTES;
    this.maxBufferBytes = o.maxBufferBytes ?? DEFAULT_POOL_BYTES;
  }

  /** Zeroed memory of exactly `bytes` (a VM's memory is zero until written). */
  take(bytes: number): Uint8Array {
    for (let i = this.free.length - 1; i >= 0; i--) {
      const b = this.free[i]!;
      if (b.byteLength !== bytes) continue;
      this.free.splice(i, 1);
      this.freeBytes -= bytes;
      this.counts.reused++;
      return b.fill(0);
    }
    this.counts.allocated++;
    return new Uint8Array(bytes);
  }

  /**
   * Keeps `memory` for a later {@link take}. Only for memory nothing reads or writes any more:
   * the next VM of its size gets it. Whole buffers only (a view into a larger one is not kept).
   */
  give(memory: Uint8Array): void {
    const bytes = memory.byteLength;
    if (bytes === 0 || bytes > this.maxBufferBytes || memory.byteOffset !== 0 || memory.buffer.byteLength !== bytes) return;
    if (this.free.includes(memory)) return;
    // The oldest go first: sizes in use now are likelier to come again.
    while (this.free.length > 0 && this.freeBytes + bytes > this.maxFreeBytes) this.freeBytes -= this.free.shift()!.byteLength;
    if (this.freeBytes + bytes > this.maxFreeBytes) return;
    this.free.push(memory);
    this.freeBytes += bytes;
    this.counts.kept++;
  }

  /** Bytes kept free now. */
  get bytes(): number {
    return this.freeBytes;
  }
}
