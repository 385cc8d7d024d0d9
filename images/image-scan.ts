/**
 * Cuts an image file into blocks and hashes them. Reads in large slices (many blocks per read) so
 * the file system costs little next to the hash, and hashes them on worker threads while the next
 * slices are read: bench/images.bench.ts holds indexing to within 0.8 of the raw hash on the same
 * bytes.
 */
import { open, stat } from 'node:fs/promises';
import { EmbotError, ErrorCodes } from '../core/errors.ts';
import { hashBlock, type BlockHash } from './block-hash.ts';
import { hashPool } from './hash-pool.ts';
import type { ImageManifest } from './image-manifest.ts';

/** Bytes per read: a whole number of blocks near 4 MiB. */
const READ_TARGET = 4 * 1024 * 1024;
/** Smaller files are hashed here: a worker's round trip would cost more than it saves. */
const INLINE_BELOW = 1024 * 1024;

export interface ScannedImage extends ImageManifest {
  readonly mtimeMs: number;
}

/**
 * Hashes every block of the file at `path`.
 *
 * @throws EmbotError `EMBOT_ERR_IMAGE_UNKNOWN` when the file is missing or not a regular file,
 *   `EMBOT_ERR_IMAGE_TRUNCATED` when it shrank while being read.
 */
export async function scanImage(name: string, path: string, blockSize: number): Promise<ScannedImage> {
  const st = await stat(path).catch((e: unknown) => {
    throw new EmbotError(ErrorCodes.IMAGE_UNKNOWN, `image ${name}: cannot read ${path}`, { cause: e });
  });
  if (!st.isFile()) throw new EmbotError(ErrorCodes.IMAGE_UNKNOWN, `image ${name}: ${path} is not a regular file`);
  const size = st.size;
  const perRead = Math.max(1, Math.floor(READ_TARGET / blockSize)) * blockSize;
  const sliceBytes = Math.min(perRead, Math.max(size, 1));
  const hashes: BlockHash[] = [];
  const fh = await open(path, 'r');
  const readSlice = async (buf: Buffer, offset: number): Promise<number> => {
    const want = Math.min(buf.byteLength, size - offset);
    let got = 0;
    while (got < want) {
      const { bytesRead } = await fh.read(buf, got, want - got, offset + got);
      if (bytesRead === 0) throw new EmbotError(ErrorCodes.IMAGE_TRUNCATED, `image ${name}: ${path} ended at ${offset + got} of ${size} bytes while it was indexed`);
      got += bytesRead;
    }
    return want;
  };
  // Slices in flight, in file order: each is hashed by a worker (hash-pool.ts) while the next ones
  // are read here, so indexing runs at the hash's pace, not read + hash + rows.
  const inFlight: Promise<{ readonly buf: ArrayBuffer; readonly hashes: BlockHash[] }>[] = [];
  try {
    if (size < INLINE_BELOW) {
      const buf = Buffer.allocUnsafe(sliceBytes);
      for (let offset = 0; offset < size; ) {
        const want = await readSlice(buf, offset);
        for (let o = 0; o < want; o += blockSize) hashes.push(hashBlock(buf.subarray(o, Math.min(o + blockSize, want))));
        offset += want;
      }
    } else {
      const pool = hashPool();
      const free: ArrayBuffer[] = Array.from({ length: pool.size + 2 }, () => new ArrayBuffer(sliceBytes));
      let offset = 0;
      while (offset < size || inFlight.length > 0) {
        while (offset < size && free.length > 0) {
          const ab = free.pop()!;
          const want = await readSlice(Buffer.from(ab), offset);
          const job = pool.hash(ab, want, blockSize);
          // Rejections are reported where each is awaited, in order.
          job.catch(() => {});
          inFlight.push(job);
          offset += want;
        }
        const done = await inFlight.shift()!;
        for (const h of done.hashes) hashes.push(h);
        free.push(done.buf);
      }
    }
  } finally {
    await Promise.allSettled(inFlight);
    await fh.close();
  }
  return { name, size, blockSize, hashes, mtimeMs: st.mtimeMs };
}
