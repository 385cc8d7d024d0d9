/**
 * The byte layout of a PageBatch, shared by the sender and the receiver: page indexes as Uint32
 * little-endian, the pages concatenated in index order, a crc32 over both.
 */
import { endianness } from 'node:os';
import { crc32 } from './crc32.ts';

/** Bytes of one index on the wire. */
export const INDEX_BYTES = 4;

/** On a little-endian host a Uint32Array already is the wire form, so it goes out and comes in without a loop. */
const HOST_IS_LE = endianness() === 'LE';

/** Length of page `index` in a memory of `memoryBytes` (only the last page may be short). */
export function pageLength(memoryBytes: number, pageSize: number, index: number): number {
  return Math.min(pageSize, memoryBytes - index * pageSize);
}

/** Page indexes as Uint32 little-endian bytes (a view of `indexes` on a little-endian host). */
export function encodeIndexes(indexes: Uint32Array): Uint8Array {
  if (HOST_IS_LE) return new Uint8Array(indexes.buffer, indexes.byteOffset, indexes.byteLength);
  const out = new Uint8Array(indexes.length * INDEX_BYTES);
  const view = new DataView(out.buffer);
  for (let i = 0; i < indexes.length; i++) view.setUint32(i * INDEX_BYTES, indexes[i]!, true);
  return out;
}

/**
 * The inverse of {@link encodeIndexes}; a whole number of indexes is read (callers check the
 * length). May return a view of `bytes`, or of `scratch` when that is given and large enough
 * (a receiver reuses one instead of allocating per batch; the result is then valid until the
 * scratch is used again).
 */
export function decodeIndexes(bytes: Uint8Array, scratch?: Uint32Array): Uint32Array {
  const n = Math.floor(bytes.byteLength / INDEX_BYTES);
  if (HOST_IS_LE && bytes.byteOffset % INDEX_BYTES === 0) return new Uint32Array(bytes.buffer, bytes.byteOffset, n);
  const out = scratch !== undefined && scratch.length >= n ? scratch.subarray(0, n) : new Uint32Array(n);
  if (HOST_IS_LE) {
    // A received field sits at any offset of the frame; one copy aligns it (not slice(): on a Buffer that is a view).
    new Uint8Array(out.buffer, out.byteOffset, n * INDEX_BYTES).set(bytes.subarray(0, n * INDEX_BYTES));
    return out;
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let i = 0; i < n; i++) out[i] = view.getUint32(i * INDEX_BYTES, true);
  return out;
}

/** crc32 over the index bytes, then the page bytes, then the zero-page index bytes when there are any. */
export function batchChecksum(indexes: Uint8Array, pages: Uint8Array, zeros?: Uint8Array): number {
  const sum = crc32(pages, crc32(indexes));
  return zeros === undefined ? sum : crc32(zeros, sum);
}

/** Total page bytes of `indexes`. */
export function pagesBytes(indexes: Uint32Array, memoryBytes: number, pageSize: number): number {
  let total = 0;
  for (let i = 0; i < indexes.length; i++) total += pageLength(memoryBytes, pageSize, indexes[i]!);
  return total;
}

/**
 * The pages of `indexes`, concatenated. A run of consecutive indexes (the whole first round) is
 * returned as a view of `memory` without a copy: the frame encoder copies it anyway, and it does
 * so synchronously, before the VM can write again.
 */
export function gatherPages(memory: Uint8Array, pageSize: number, indexes: Uint32Array): Uint8Array {
  // A fresh gatherer's buffer is allocated for this call alone, so the result is the caller's to keep.
  return new PageGatherer().pages(memory, pageSize, indexes);
}

/**
 * {@link gatherPages} into a buffer that is reused from one batch to the next. The frame encoder
 * copies the pages out in the same synchronous step as the gather, so the buffer is free again
 * once the frame is sent, and scattered rounds cost no allocation per batch.
 *
 * @example
 * ```ts
 * const gather = new PageGatherer();
 * const pages = gather.pages(memory, 4096, dirtyIndexes); // valid until the next call
 * ```
 */
export class PageGatherer {
  private scratch = new Uint8Array(0);

  /** The pages of `indexes`, concatenated: a view of `memory` for a run, else of the reused buffer (valid until the next call). */
  pages(memory: Uint8Array, pageSize: number, indexes: Uint32Array): Uint8Array {
    const n = indexes.length;
    if (n === 0) return new Uint8Array(0);
    const first = indexes[0]!;
    if (indexes[n - 1]! - first === n - 1 && isAscendingRun(indexes)) {
      return memory.subarray(first * pageSize, Math.min((indexes[n - 1]! + 1) * pageSize, memory.byteLength));
    }
    const total = pagesBytes(indexes, memory.byteLength, pageSize);
    if (this.scratch.byteLength < total) this.scratch = new Uint8Array(total);
    const out = this.scratch;
    let at = 0;
    for (let i = 0; i < n; i++) {
      const start = indexes[i]! * pageSize;
      const end = Math.min(start + pageSize, memory.byteLength);
      out.set(memory.subarray(start, end), at);
      at += end - start;
    }
    return out.subarray(0, total);
  }
}

function isAscendingRun(indexes: Uint32Array): boolean {
  for (let i = 1; i < indexes.length; i++) if (indexes[i] !== indexes[i - 1]! + 1) return false;
  return true;
}

/** Cuts `indexes` into views of at most `pagesPerBatch` indexes each. */
export function splitIndexes(indexes: Uint32Array, pagesPerBatch: number): Uint32Array[] {
  const out: Uint32Array[] = [];
  for (let i = 0; i < indexes.length; i += pagesPerBatch) out.push(indexes.subarray(i, Math.min(indexes.length, i + pagesPerBatch)));
  return out;
}

/** Indexes 0..count-1. */
export function allPages(count: number): Uint32Array {
  const out = new Uint32Array(count);
  for (let i = 0; i < count; i++) out[i] = i;
  return out;
}
