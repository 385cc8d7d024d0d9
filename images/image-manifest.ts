/**
 * An image as the index sees it: its size, its block size and the hash of every block in order.
 * Block i starts at i * blockSize; the last block may be short.
 */
import { createHash } from 'node:crypto';
import { EmbotError, ErrorCodes } from '../core/errors.ts';
import { MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, isBlockHash, type BlockHash } from './block-hash.ts';

export interface ImageManifest {
  readonly name: string;
  readonly size: number;
  readonly blockSize: number;
  readonly hashes: readonly BlockHash[];
}

/** Image names are file names in an images folder: no path separators, no dot files. */
const IMAGE_NAME = /^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$/;

export function isImageName(v: unknown): v is string {
  return typeof v === 'string' && IMAGE_NAME.test(v);
}

export function blockCount(size: number, blockSize: number): number {
  return Math.ceil(size / blockSize);
}

export function blockLength(m: Pick<ImageManifest, 'size' | 'blockSize'>, index: number): number {
  return Math.min(m.blockSize, m.size - index * m.blockSize);
}

/** Bytes of each distinct hash of the image (a hash that occurs twice is fetched once). */
export function distinctBlocks(m: ImageManifest): Map<BlockHash, number> {
  const out = new Map<BlockHash, number>();
  for (let i = 0; i < m.hashes.length; i++) if (!out.has(m.hashes[i]!)) out.set(m.hashes[i]!, blockLength(m, i));
  return out;
}

/**
 * Checks a manifest from outside (a peer's index update, an index answer).
 *
 * @throws EmbotError `EMBOT_ERR_IMAGE_INVALID` naming what is wrong.
 */
export function validateManifest(v: unknown): ImageManifest {
  const bad = (why: string): never => {
    throw new EmbotError(ErrorCodes.IMAGE_INVALID, `image manifest ${why}`);
  };
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return bad('must be a map');
  const o = v as Record<string, unknown>;
  if (!isImageName(o.name)) return bad('.name must be an image name');
  if (typeof o.size !== 'number' || !Number.isSafeInteger(o.size) || o.size < 0) return bad('.size must be a non-negative integer');
  if (typeof o.blockSize !== 'number' || !Number.isInteger(o.blockSize) || o.blockSize < MIN_BLOCK_SIZE || o.blockSize > MAX_BLOCK_SIZE) {
    return bad(`.blockSize must be an integer in ${MIN_BLOCK_SIZE}..${MAX_BLOCK_SIZE}`);
  }
  if (!Array.isArray(o.hashes)) return bad('.hashes must be an array');
  if (o.hashes.length !== blockCount(o.size, o.blockSize)) return bad(`.hashes must hold ${blockCount(o.size, o.blockSize)} hashes for ${o.size} bytes (has ${o.hashes.length}): truncated?`);
  for (let i = 0; i < o.hashes.length; i++) if (!isBlockHash(o.hashes[i])) return bad(`.hashes[${i}] must be a sha256 hex`);
  return { name: o.name, size: o.size, blockSize: o.blockSize, hashes: o.hashes as BlockHash[] };
}

/**
 * One image's identity beyond its name: the SHA-256 of its size, block size and block hashes in
 * order. A VM carries it with its image name, so a host building the image for it later can tell
 * whether the name still means the same bytes.
 */
export function manifestId(m: Pick<ImageManifest, 'size' | 'blockSize' | 'hashes'>): string {
  const h = createHash('sha256').update(`${m.size}:${m.blockSize}:`);
  for (const b of m.hashes) h.update(b);
  return h.digest('hex');
}
