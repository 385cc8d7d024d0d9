/**
 * The CRC-32 (IEEE, zlib's) of page batches: the main per-byte cost of a batch at both ends after
 * the copies, so the fastest implementation that loads is used. In order:
 * - `isa-l`: Intel ISA-L's crc32_gzip_refl through a small addon (effectors/hypervisor/sim/dataplane/native),
 *   built at install when libisal-dev is present; VPCLMULQDQ/AVX-512 folding, ~33 GB/s streaming
 *   and ~60 GB/s from cache on the development machine;
 * - `@node-rs/crc32`: SIMD (PCLMULQDQ), ~16 GB/s there; a prebuilt binary;
 * - `node:zlib`: ~6.6 GB/s, always there.
 * All give the same values, so the two ends agree whichever each of them uses.
 */
import { createRequire } from 'node:module';
import { crc32 as zlibCrc32 } from 'node:zlib';

export type Crc32 = (data: Uint8Array, initial?: number) => number;

export type Crc32Implementation = 'isa-l' | '@node-rs/crc32' | 'node:zlib';

export interface Crc32Choice {
  readonly crc32: Crc32;
  readonly implementation: Crc32Implementation;
}

/** A native implementation to try: `load` returns its module (with a `crc32` function) or throws. */
export interface Crc32Candidate {
  readonly implementation: Exclude<Crc32Implementation, 'node:zlib'>;
  readonly load: () => unknown;
}

/** The standard check value: CRC-32 of the ASCII bytes "123456789". */
const CHECK = 0xcbf43926;

const require = createRequire(import.meta.url);

/** Where the install step puts the ISA-L addon (see native/build.mjs). */
export const ISAL_ADDON_PATH = new URL('./native/build/Release/crc32_isal.node', import.meta.url).pathname;

export const DEFAULT_CRC32_CANDIDATES: readonly Crc32Candidate[] = [
  { implementation: 'isa-l', load: () => require(ISAL_ADDON_PATH) },
  { implementation: '@node-rs/crc32', load: () => require('@node-rs/crc32') },
];

/**
 * The first candidate that loads and gives the standard check value, else `node:zlib`.
 *
 * @example
 * ```ts
 * const { crc32, implementation } = chooseCrc32();
 * crc32(pages, crc32(indexes)); // same value with any implementation
 * ```
 */
export function chooseCrc32(candidates: readonly Crc32Candidate[] = DEFAULT_CRC32_CANDIDATES): Crc32Choice {
  for (const c of candidates) {
    try {
      const native = (c.load() as { crc32?: unknown }).crc32;
      if (typeof native !== 'function') continue;
      const fn = native as Crc32;
      // A continuation too: batches are checksummed as indexes, then pages.
      if (fn(Buffer.from('123456789')) === CHECK && fn(Buffer.from('456789'), fn(Buffer.from('123'))) === CHECK) return { crc32: fn, implementation: c.implementation };
    } catch {
      // Not built or no binary for this platform: the next one computes the same values.
    }
  }
  return { crc32: zlibCrc32, implementation: 'node:zlib' };
}

export const { crc32, implementation: CRC32_IMPLEMENTATION } = chooseCrc32();
