/**
 * VM memory the sim driver has let go of (a VM removed, an incoming VM discarded), kept for the
 * next VM of the same size.
 *
 * Why: a fresh `Uint8Array` of a VM's size is external memory to V8, and V8 answers every few tens
 * of MB of it with a mark-compact of the whole heap; its pages are also faulted in and zeroed by
 * the kernel on first touch. An agent that receives and sends VMs (every migration target and
 * source, and each destination of a fan-out that loses) paid both per migration: profiled at an
 * 8 MiB destination, GC was the largest single item of its CPU (BENCHMARKS.md, "Time to the
 * first boot"). A reused buffer is already mapped; it is zeroed here, which costs a memset instead,
 * done a little after it was given back (off the migration's path: the next incoming VM's
 * PrepareIncoming waited for it) unless a take comes first.
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

/** A given-back buffer is zeroed this long after, when the burst of work that freed it is likely over. */
const ZERO_AFTER_MS = 20;

interface FreeBuffer {
  readonly memory: Uint8Array;
  zeroed: boolean;
}

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
  private readonly free: FreeBuffer[] = [];
  private freeBytes = 0;
  private zeroTimer: ReturnType<typeof setTimeout> | undefined;
  private readonly maxFreeBytes: number;
  private readonly maxBufferBytes: number;

  constructor(o: MemoryPoolOptions = {}) {
    this.maxFreeBytes = o.maxFreeBytes ?? DEFAULT_POOL_BYTES;
    this.maxBufferBytes = o.maxBufferBytes ?? DEFAULT_POOL_BYTES;
  }

  /** Zeroed memory of exactly `bytes` (a VM's memory is zero until written). */
  take(bytes: number): Uint8Array {
    let pick = -1;
    for (let i = this.free.length - 1; i >= 0; i--) {
      const b = this.free[i]!;
      if (b.memory.byteLength !== bytes) continue;
      if (pick < 0 || (b.zeroed && !this.free[pick]!.zeroed)) pick = i;
      if (b.zeroed) break;
    }
    if (pick >= 0) {
      const [b] = this.free.splice(pick, 1);
      this.freeBytes -= bytes;
      this.counts.reused++;
      return b!.zeroed ? b!.memory : b!.memory.fill(0);
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
    if (this.free.some((b) => b.memory === memory)) return;
    // The oldest go first: sizes in use now are likelier to come again.
    while (this.free.length > 0 && this.freeBytes + bytes > this.maxFreeBytes) this.freeBytes -= this.free.shift()!.memory.byteLength;
    if (this.freeBytes + bytes > this.maxFreeBytes) return;
    this.free.push({ memory, zeroed: false });
    this.freeBytes += bytes;
    this.counts.kept++;
    this.zeroSoon();
  }

  /** Zeroes one kept buffer per turn, a little later, until all are; never holds the process open. */
  private zeroSoon(): void {
    if (this.zeroTimer !== undefined) return;
    this.zeroTimer = setTimeout(() => {
      this.zeroTimer = undefined;
      const b = this.free.find((x) => !x.zeroed);
      if (b === undefined) return;
      b.memory.fill(0);
      b.zeroed = true;
      if (this.free.some((x) => !x.zeroed)) this.zeroSoon();
    }, ZERO_AFTER_MS);
    this.zeroTimer.unref?.();
  }

  /** Bytes kept free now. */
  get bytes(): number {
    return this.freeBytes;
  }
}
