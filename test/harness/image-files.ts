/**
 * Generated raw images for the image tests and benchmarks: a base image of random blocks and
 * images that share a known fraction of its blocks, so what a build must fetch is known exactly.
 */
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { prng } from './prng.ts';

/** `blocks` random blocks of `blockSize` (the last one `tail` bytes when given). */
export function randomImage(blocks: number, blockSize: number, tail?: number): Buffer {
  const b = randomBytes(blocks * blockSize);
  return tail === undefined ? b : b.subarray(0, (blocks - 1) * blockSize + tail);
}

/**
 * A copy of `base` in which all but `shared` of its blocks (chosen by `seed`) are replaced by fresh
 * random ones: exactly `blocks - shared` blocks differ from every block of `base`.
 */
export function derivedImage(base: Buffer, blockSize: number, shared: number, seed = 1): { image: Buffer; changed: number[] } {
  const n = Math.ceil(base.byteLength / blockSize);
  const order = [...Array(n).keys()];
  const rnd = prng(seed);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(rnd() * (i + 1));
    [order[i], order[j]] = [order[j]!, order[i]!];
  }
  const changed = order.slice(shared).sort((a, b) => a - b);
  const image = Buffer.from(base);
  for (const i of changed) randomBytes(Math.min(blockSize, base.byteLength - i * blockSize)).copy(image, i * blockSize);
  return { image, changed };
}

export function writeImage(file: string, bytes: Uint8Array): string {
  writeFileSync(file, bytes);
  return file;
}
