/**
 * The CRC-32 (IEEE, zlib's) of page batches. @node-rs/crc32 computes the same values with SIMD, ~2.2x
 * zlib's speed on this machine (14.7 vs 6.6 GB/s); the checksum is the main per-byte cost of a page
 * batch at both ends, so it is used when its prebuilt binary loads, and zlib's crc32 otherwise. Both
 * ends then agree whichever each of them uses.
 */
import { createRequire } from 'node:module';
import { crc32 as zlibCrc32 } from 'node:zlib';

export type Crc32 = (data: Uint8Array, initial?: number) => number;

export interface Crc32Choice {
  readonly crc32: Crc32;
  readonly implementation: '@node-rs/crc32' | 'node:zlib';
}

/** The standard check value: CRC-32 of the ASCII bytes "123456789". */
const CHECK = 0xcbf43926;

/**
 * `@node-rs/crc32` when it loads and gives the standard check value, else `node:zlib`.
 *
 * @example
 * ```ts
 * const { crc32, implementation } = chooseCrc32();
 * crc32(pages, crc32(indexes)); // same value with either implementation
 * ```
 */
export function chooseCrc32(load: () => unknown = () => createRequire(import.meta.url)('@node-rs/crc32')): Crc32Choice {
  try {
    const native = (load() as { crc32?: unknown }).crc32;
    if (typeof native === 'function') {
      const fn = native as (input: Uint8Array, initial?: number) => number;
      if (fn(Buffer.from('123456789')) === CHECK) return { crc32: fn, implementation: '@node-rs/crc32' };
    }
  } catch {
    // No prebuilt binary for this platform: zlib's crc32 computes the same values.
  }
  return { crc32: zlibCrc32, implementation: 'node:zlib' };
}

export const { crc32, implementation: CRC32_IMPLEMENTATION } = chooseCrc32();
