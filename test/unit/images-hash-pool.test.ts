/**
 * Indexing hashes on worker threads (images/hash-pool.ts): the hashes are the block hashes, in file
 * order, whatever order the workers finish in; buffers come back whole for the next read.
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { HashPool } from '../../images/hash-pool.ts';
import { hashBlock, scanImage } from '../../images/index.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { writeImage } from '../harness/image-files.ts';

const cleanups = cleanupsAfterEach();
const pool = new HashPool(2);
afterAll(() => pool.close());

function tmpDir(): string {
  const d = mkdtempSync(path.join(tmpdir(), 'embot-hash-pool-'));
  cleanups.push(() => rmSync(d, { recursive: true, force: true }));
  return d;
}

const inline = (bytes: Buffer, bs: number): string[] => Array.from({ length: Math.ceil(bytes.byteLength / bs) }, (_, i) => hashBlock(bytes.subarray(i * bs, (i + 1) * bs)));

describe('block hashing on worker threads', () => {
  it('a pool hashes a slice block by block (a short last block included) and hands the buffer back intact', async () => {
    const bytes = randomBytes(5 * 4096 + 100);
    const ab = new ArrayBuffer(bytes.byteLength + 4096);
    bytes.copy(Buffer.from(ab));
    const r = await pool.hash(ab, bytes.byteLength, 4096);
    expect(ab.byteLength).toBe(0); // transferred
    expect(r.hashes).toEqual(inline(bytes, 4096));
    expect(Buffer.compare(Buffer.from(r.buf, 0, bytes.byteLength), bytes)).toBe(0);
  });

  it('many slices at once over two workers: every answer matches its own slice', async () => {
    const slices = Array.from({ length: 12 }, (_, i) => randomBytes(65536 * (1 + (i % 3))));
    const out = await Promise.all(slices.map((s) => pool.hash(new Uint8Array(s).buffer, s.byteLength, 65536)));
    out.forEach((r, i) => expect(r.hashes).toEqual(inline(slices[i]!, 65536)));
  });

  it('scanImage of a file of many slices (over the pool) gives the block hashes in file order', async () => {
    const bytes = randomBytes(13 * 1024 * 1024 + 4096 * 3);
    const file = writeImage(path.join(tmpDir(), 'big.img'), bytes);
    const scanned = await scanImage('big.img', file, 65536);
    expect(scanned.size).toBe(bytes.byteLength);
    expect(scanned.hashes).toEqual(inline(bytes, 65536));
  });
});
