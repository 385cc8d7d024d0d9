/**
 * The full round's split of a VM's memory into pages to send and pages that are all zero, which
 * go as indexes only (QEMU's zero-page flag): a VM's memory starts zero and a fresh or idle one is
 * mostly so, and on a machine whose cores the destinations share, bytes not sent are the cheapest.
 */

/** Zero pages named per batch at most (4 bytes each on the wire). */
export const MAX_ZEROS_PER_BATCH = 16_384;

/** Bytes compared against zero at once before looking page by page. */
const CHUNK_BYTES = 64 * 1024;
const ZERO_CHUNK = Buffer.alloc(CHUNK_BYTES);

export interface RoundZeroBatch {
  /** Pages to send, ascending. */
  readonly indexes: Uint32Array;
  /** All-zero pages among the same range, ascending. */
  readonly zeros: Uint32Array;
}

/**
 * Memory looked at between two turns of the event loop. A large VM's memory that was never
 * written costs a page fault per page on its first read (measured: a fresh 1 GiB sim VM took 4.4 s
 * to split on this machine, whose own memory the host backs lazily), and one synchronous split
 * blocked the agent that long: its control API stopped answering and `embot migrate` lost its
 * connection (ECONNRESET). 32 MiB is ~0.1 s at that worst rate and one slice for the VMs the
 * benches time, so their split does not wait for a turn.
 */
export const SCAN_SLICE_BYTES = 32 * 1024 * 1024;

/**
 * Pages `0..pageCount-1` of `memory` in order, cut into batches of at most `pagesPerBatch` pages
 * to send, the zero pages between them riding along as indexes (at most {@link MAX_ZEROS_PER_BATCH}
 * per batch). Looked at from the first page to the last, yielding to the event loop after every
 * `sliceBytes`: a page written after its look is in the dirty log (taken before the split), so a
 * later round sends it whatever this one said.
 *
 * @example
 * ```ts
 * const batches = await splitZeroPages(memory, 4096, 2048, 256); // [{ indexes, zeros }, ...]
 * ```
 */
export async function splitZeroPages(memory: Uint8Array, pageSize: number, pageCount: number, pagesPerBatch: number, sliceBytes = SCAN_SLICE_BYTES): Promise<RoundZeroBatch[]> {
  const mem = Buffer.from(memory.buffer, memory.byteOffset, memory.byteLength);
  const zero = pageSize <= CHUNK_BYTES ? ZERO_CHUNK : Buffer.alloc(pageSize);
  const out: RoundZeroBatch[] = [];
  const send = new Uint32Array(pagesPerBatch);
  const zeros = new Uint32Array(MAX_ZEROS_PER_BATCH);
  let nSend = 0;
  let nZeros = 0;
  const cut = (): void => {
    out.push({ indexes: send.slice(0, nSend), zeros: zeros.slice(0, nZeros) });
    nSend = 0;
    nZeros = 0;
  };
  const isZero = (start: number, end: number): boolean => zero.compare(mem, start, end, 0, end - start) === 0;
  const pagesPerChunk = Math.max(1, Math.floor(CHUNK_BYTES / pageSize));
  const pagesPerSlice = Math.max(pagesPerChunk, Math.floor(sliceBytes / pageSize));
  let sliceEnd = pagesPerSlice;
  for (let page = 0; page < pageCount; ) {
    if (page >= sliceEnd) {
      await new Promise<void>((resolve) => setImmediate(resolve));
      sliceEnd = page + pagesPerSlice;
    }
    // A whole chunk of zeros (the common case in a fresh VM) is one compare for all its pages.
    const chunkEnd = Math.min(pageCount, page + pagesPerChunk);
    const chunkZero = chunkEnd - page > 1 && isZero(page * pageSize, Math.min(chunkEnd * pageSize, memory.byteLength));
    for (; page < chunkEnd; page++) {
      const start = page * pageSize;
      if (chunkZero || isZero(start, Math.min(start + pageSize, memory.byteLength))) {
        zeros[nZeros++] = page;
        if (nZeros === MAX_ZEROS_PER_BATCH) cut();
      } else {
        send[nSend++] = page;
        if (nSend === pagesPerBatch) cut();
      }
    }
  }
  if (nSend > 0 || nZeros > 0) cut();
  return out;
}
