/**
 * The target side of the pre-copy data plane: checks each PageBatch and writes its pages into the
 * incoming VM's memory.
 */
import type { PageBatch, PageBatchAck, RequestHandler } from '../../../../core/wire/index.ts';
import { EffectorError, ErrorCodes } from '../../../../core/errors.ts';
import { INDEX_BYTES, batchChecksum, decodeIndexes, pageLength } from './page-batch.ts';

export interface PageReceiverOptions {
  readonly memoryBytes: number;
  readonly pageSize: number;
  /** When set, batches of another migration are refused. */
  readonly migrationId?: string;
  /** Memory to fill (e.g. `driver.pages(vm).memory` of the target VM); default a new zeroed buffer. */
  readonly memory?: Uint8Array;
  /**
   * The memory is all zero to begin with and nothing but this receiver writes it (the sim driver's
   * pooled incoming memory), so a zero page that no batch wrote before needs no write. Default
   * false: a zero page is always written (the own buffer is public, and callers fill it).
   */
  readonly memoryIsZero?: boolean;
}

export type ApplyResult = { readonly ok: true } | { readonly ok: false; readonly reason: string };

export interface PageReceiverStats {
  /** Batches accepted (a re-sent batch counts again). */
  readonly batches: number;
  /** Page bytes accepted. */
  readonly bytes: number;
  /** Batches refused. */
  readonly rejected: number;
}

/**
 * Applies page batches to a memory image. A batch is checked whole (checksum, page size, index
 * bounds, byte count) before any byte of it is written, so a refused batch changes nothing.
 *
 * Every page remembers the round that last wrote it and a batch from an older round does not
 * overwrite it: rounds are barriers at the sender, but a batch still in a socket of a path that
 * failed could otherwise land after its re-sent, newer copy.
 *
 * @example
 * ```ts
 * const receiver = new PageReceiver({ memoryBytes: 64 << 20, pageSize: 4096 });
 * server.handle('PageBatch', pageBatchHandler(receiver));
 * // ... after the migration:
 * if (receiver.finalReceived) driver.pages('vm1').memory.set(receiver.memory);
 * ```
 */
export class PageReceiver {
  readonly memory: Uint8Array;
  readonly pageSize: number;
  readonly pageCount: number;
  readonly migrationId: string | undefined;
  private readonly pageRound: Uint32Array;
  /** Per page: 1 once a batch wrote its bytes (so it may no longer be zero). */
  private readonly written: Uint8Array;
  private readonly startsZero: boolean;
  private final = false;
  private cpu: Uint8Array | undefined;
  private counts = { batches: 0, bytes: 0, rejected: 0 };
  /** Aligned copies of a batch's indexes and zero-page indexes, reused: apply() is synchronous and keeps none of them. */
  private indexScratch = new Uint32Array(0);
  private zeroScratch = new Uint32Array(0);

  constructor(o: PageReceiverOptions) {
    if (!Number.isSafeInteger(o.memoryBytes) || o.memoryBytes <= 0) {
      throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `PageReceiver memoryBytes must be a positive integer, got ${String(o.memoryBytes)}`);
    }
    if (!Number.isSafeInteger(o.pageSize) || o.pageSize <= 0) {
      throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `PageReceiver pageSize must be a positive integer, got ${String(o.pageSize)}`);
    }
    if (o.memory !== undefined && o.memory.byteLength !== o.memoryBytes) {
      throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `PageReceiver memory has ${o.memory.byteLength} bytes, expected ${o.memoryBytes}`);
    }
    this.memory = o.memory ?? new Uint8Array(o.memoryBytes);
    this.pageSize = o.pageSize;
    this.pageCount = Math.ceil(o.memoryBytes / o.pageSize);
    this.migrationId = o.migrationId;
    this.pageRound = new Uint32Array(this.pageCount);
    this.written = new Uint8Array(this.pageCount);
    this.startsZero = o.memoryIsZero === true;
  }

  /** True once the batch with `final: true` (the end of stop-and-copy) was applied. */
  get finalReceived(): boolean {
    return this.final;
  }

  /** The CPU state that came with the final batch (a copy). */
  get cpuState(): Uint8Array | undefined {
    return this.cpu;
  }

  get stats(): PageReceiverStats {
    return { ...this.counts };
  }

  /** Checks and applies one batch; on refusal nothing is written and the reason says why. */
  apply(frame: PageBatch): ApplyResult {
    let indexes: Uint32Array | undefined;
    if (frame.indexes.byteLength % INDEX_BYTES === 0) {
      const n = frame.indexes.byteLength / INDEX_BYTES;
      // Bounded by the page count: a batch naming more pages than exist is refused anyway.
      if (this.indexScratch.length < n && n <= this.pageCount) this.indexScratch = new Uint32Array(n);
      indexes = decodeIndexes(frame.indexes, this.indexScratch);
    }
    let zeros: Uint32Array | undefined;
    if (frame.zeros !== undefined && frame.zeros.byteLength % INDEX_BYTES === 0) {
      const n = frame.zeros.byteLength / INDEX_BYTES;
      if (this.zeroScratch.length < n && n <= this.pageCount) this.zeroScratch = new Uint32Array(n);
      zeros = decodeIndexes(frame.zeros, this.zeroScratch);
    }
    const problem = this.check(frame, indexes, zeros);
    if (problem !== undefined || indexes === undefined) {
      this.counts.rejected++;
      return { ok: false, reason: problem ?? 'no indexes' };
    }
    this.write(indexes, frame.pages, frame.round);
    if (zeros !== undefined) this.writeZeros(zeros, frame.round);
    this.counts.batches++;
    this.counts.bytes += frame.pages.byteLength;
    if (frame.final) {
      this.final = true;
      if (frame.cpu !== undefined) this.cpu = new Uint8Array(frame.cpu);
    }
    return { ok: true };
  }

  private check(frame: PageBatch, indexes: Uint32Array | undefined, zeros: Uint32Array | undefined): string | undefined {
    if (this.migrationId !== undefined && frame.migrationId !== this.migrationId) {
      return `batch of migration ${frame.migrationId}, expected ${this.migrationId}`;
    }
    if (frame.pageSize !== this.pageSize) return `page size ${frame.pageSize}, expected ${this.pageSize}`;
    if (indexes === undefined) return `indexes field of ${frame.indexes.byteLength} bytes is not a whole number of Uint32`;
    if (frame.zeros !== undefined && zeros === undefined) return `zeros field of ${frame.zeros.byteLength} bytes is not a whole number of Uint32`;
    if (frame.cpu !== undefined && !frame.final) return 'CPU state on a batch that is not final';
    if (batchChecksum(frame.indexes, frame.pages, frame.zeros) !== frame.checksum) return 'bad checksum';
    let expected = 0;
    const { memory, pageSize, pageCount } = this;
    const fullPages = Math.floor(memory.byteLength / pageSize);
    for (let i = 0; i < indexes.length; i++) {
      const index = indexes[i]!;
      if (index >= pageCount) return `page index ${index} out of range 0..${pageCount - 1}`;
      expected += index < fullPages ? pageSize : pageLength(memory.byteLength, pageSize, index);
    }
    if (frame.pages.byteLength !== expected) return `pages field has ${frame.pages.byteLength} bytes, the indexes need ${expected}`;
    if (zeros !== undefined) {
      for (let i = 0; i < zeros.length; i++) if (zeros[i]! >= pageCount) return `zero page index ${zeros[i]!} out of range 0..${pageCount - 1}`;
    }
    return undefined;
  }

  /**
   * Zeroes runs of consecutive zero pages with one fill each; a page a newer round wrote is left
   * alone, and so is one still zero from the start (a fresh VM's memory, mostly).
   */
  private writeZeros(zeros: Uint32Array, round: number): void {
    const { memory, pageSize, pageRound, written, startsZero } = this;
    let runStart = -1;
    let runEnd = 0;
    const flush = (): void => {
      if (runStart >= 0) memory.fill(0, runStart, runEnd);
      runStart = -1;
    };
    for (let i = 0; i < zeros.length; i++) {
      const index = zeros[i]!;
      if (round < pageRound[index]!) {
        flush();
        continue;
      }
      pageRound[index] = round;
      if (startsZero && written[index] === 0) {
        flush();
        continue;
      }
      const start = index * pageSize;
      if (runStart < 0 || start !== runEnd) {
        flush();
        runStart = start;
      }
      runEnd = Math.min(start + pageSize, memory.byteLength);
    }
    flush();
  }

  /** Writes runs of consecutive pages with one copy each. */
  private write(indexes: Uint32Array, pages: Uint8Array, round: number): void {
    const { memory, pageSize, pageRound, written } = this;
    let src = 0;
    let runStart = -1;
    let runSrc = 0;
    let runEnd = 0; // exclusive byte offset in memory
    const flush = (): void => {
      if (runStart >= 0) memory.set(pages.subarray(runSrc, runSrc + (runEnd - runStart)), runStart);
      runStart = -1;
    };
    for (let i = 0; i < indexes.length; i++) {
      const index = indexes[i]!;
      const start = index * pageSize;
      const len = pageLength(memory.byteLength, pageSize, index);
      if (round < pageRound[index]!) {
        flush();
      } else {
        pageRound[index] = round;
        written[index] = 1;
        if (runStart >= 0 && start === runEnd) {
          runEnd += len;
        } else {
          flush();
          runStart = start;
          runSrc = src;
          runEnd = start + len;
        }
      }
      src += len;
    }
    flush();
  }
}

/**
 * A PeerServer / PeerConnection handler that feeds `receiver` and answers PageBatchAck.
 *
 * @example
 * ```ts
 * server.handle('PageBatch', pageBatchHandler(receiver));
 * ```
 */
export function pageBatchHandler(receiver: PageReceiver): RequestHandler<'PageBatch'> {
  return (frame): Omit<PageBatchAck, 'replyTo'> => {
    const r = receiver.apply(frame);
    return r.ok ? { type: 'PageBatchAck', migrationId: frame.migrationId, ok: true } : { type: 'PageBatchAck', migrationId: frame.migrationId, ok: false, reason: r.reason };
  };
}
