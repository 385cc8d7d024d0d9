/**
 * Reads a running VM's disk for the index (issue 14 point 2). What is indexed of it:
 *
 * - a qcow2 overlay (the qemu driver's disk on an image, disk-migration.ts): the blocks of the
 *   guest's disk the overlay itself holds, i.e. those the VM wrote; the rest of the disk is its base
 *   image, indexed as that image. Which blocks those are comes from `qemu-img map -U
 *   --output=json` (depth 0; `-U` because the running QEMU holds the file's lock). A block is
 *   indexed where it lies in the overlay file when the overlay holds all of it as one contiguous
 *   range (always so when the block size equals the overlay's cluster size, 64 KiB both by
 *   default: QEMU allocates whole clusters, copying the unwritten part from the base), or as a
 *   block of zeros when the overlay records it as zeros; any other block (part overlay, part base)
 *   is counted as `skipped`, not indexed.
 * - a raw disk: every block, like an image.
 *
 * Each block is hashed as the guest sees it. The map of a running QEMU's overlay is what QEMU has
 * written to the file: an allocation still in its metadata cache shows after its next flush.
 */
import { execFile } from 'node:child_process';
import { open, stat } from 'node:fs/promises';
import { promisify } from 'node:util';
import { EmbotError, ErrorCodes } from '../core/errors.ts';
import { hashBlock, type BlockHash } from './block-hash.ts';
import { hashPool } from './hash-pool.ts';
import { scanImage } from './image-scan.ts';

const run = promisify(execFile);
/** Bytes read at once from an overlay: a run of adjacent blocks. */
const READ_RUN = 4 * 1024 * 1024;
/** Fewer written bytes than this are hashed here: a worker's round trip would cost more than it saves. */
const INLINE_BELOW = 1024 * 1024;

const zeroHashes = new Map<number, BlockHash>();
function zeroHash(len: number): BlockHash {
  let h = zeroHashes.get(len);
  if (h === undefined) zeroHashes.set(len, (h = hashBlock(Buffer.alloc(len))));
  return h;
}

/** One disk of a VM on this host, as its driver has it. */
export interface VmDisk {
  readonly vm: string;
  /** Position among the VM's disks. */
  readonly disk: number;
  readonly path: string;
  readonly format: 'raw' | 'qcow2';
}

/** Where a block of a VM disk is: `fileOffset` in the disk's file, or -1 for a block of zeros. */
export interface VmDiskBlock {
  readonly idx: number;
  readonly hash: BlockHash;
  readonly fileOffset: number;
}

export interface ScannedVmDisk {
  /** The guest's disk size. */
  readonly size: number;
  readonly mtimeMs: number;
  readonly fileSize: number;
  /** The blocks hashed this time. */
  readonly blocks: readonly VmDiskBlock[];
  /** Blocks the overlay holds that `hash` said not to read (the index keeps what it has of them). */
  readonly unread: readonly { readonly idx: number; readonly fileOffset: number }[];
  /** Blocks the overlay holds only in part (not indexed). */
  readonly skipped: number;
}

/** One extent of `qemu-img map --output=json`. */
export interface MapExtent {
  readonly start: number;
  readonly length: number;
  readonly depth: number;
  readonly zero: boolean;
  readonly data: boolean;
  readonly offset?: number;
}

/**
 * Checks qemu-img's map output (input from outside this process).
 *
 * @throws EmbotError `EMBOT_ERR_IMAGE_INVALID` when it is not a list of extents.
 */
export function parseMap(text: string, what: string): MapExtent[] {
  const bad = (why: string): never => {
    throw new EmbotError(ErrorCodes.IMAGE_INVALID, `qemu-img map of ${what}: ${why}`);
  };
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    return bad('not JSON');
  }
  if (!Array.isArray(v)) return bad('not a list of extents');
  const nat = (x: unknown): x is number => typeof x === 'number' && Number.isSafeInteger(x) && x >= 0;
  return v.map((e: unknown, i) => {
    const o = e as Record<string, unknown>;
    if (typeof e !== 'object' || e === null || !nat(o.start) || !nat(o.length) || !nat(o.depth) || typeof o.zero !== 'boolean' || typeof o.data !== 'boolean' || (o.offset !== undefined && !nat(o.offset))) {
      return bad(`extent ${i} must be {start, length, depth, zero, data, offset?} with non-negative integers`);
    }
    return { start: o.start, length: o.length, depth: o.depth, zero: o.zero, data: o.data, ...(o.offset === undefined ? {} : { offset: o.offset }) };
  });
}

/**
 * The overlay's own blocks: for each block the extents at depth 0 touch, where it lies in the file
 * (-1: zeros), or `undefined` when the overlay holds it only in part.
 */
export function overlayBlocks(extents: readonly MapExtent[], size: number, blockSize: number): { readonly placed: Map<number, number>; readonly skipped: number } {
  const touched = new Set<number>();
  for (const e of extents) {
    if (e.depth !== 0 || e.length === 0) continue;
    for (let i = Math.floor(e.start / blockSize); i * blockSize < e.start + e.length; i++) touched.add(i);
  }
  const placed = new Map<number, number>();
  let skipped = 0;
  const sorted = [...extents].sort((a, b) => a.start - b.start);
  for (const i of [...touched].sort((a, b) => a - b)) {
    const from = i * blockSize;
    const to = Math.min(size, from + blockSize);
    const cover = sorted.filter((e) => e.start < to && e.start + e.length > from);
    const allTop = cover.every((e) => e.depth === 0) && cover.reduce((n, e) => n + Math.min(to, e.start + e.length) - Math.max(from, e.start), 0) === to - from;
    if (!allTop) {
      skipped++;
      continue;
    }
    if (cover.every((e) => e.zero && !e.data)) {
      placed.set(i, -1);
      continue;
    }
    // One contiguous range of the file: each extent continues where the previous one ended.
    let at: number | undefined;
    let ok = true;
    for (const e of cover) {
      if (!e.data || e.offset === undefined) {
        ok = false;
        break;
      }
      const here = e.offset + (Math.max(from, e.start) - e.start);
      const expected = at === undefined ? here : at;
      if (here !== expected) {
        ok = false;
        break;
      }
      at = here + (Math.min(to, e.start + e.length) - Math.max(from, e.start));
    }
    if (ok) placed.set(i, cover[0]!.offset! + (from - cover[0]!.start));
    else skipped++;
  }
  return { placed, skipped };
}

/**
 * Hashes what the index keeps of one VM disk (see the file comment).
 *
 * @throws EmbotError `EMBOT_ERR_IMAGE_UNKNOWN` when the file is gone, `EMBOT_ERR_IMAGE_INVALID`
 *   when qemu-img cannot map it or its map is not one, `EMBOT_ERR_IMAGE_TRUNCATED` when a block
 *   lies past the file's end.
 */
export async function scanVmDisk(d: VmDisk, blockSize: number, hash: (idx: number, fileOffset: number) => boolean = () => true): Promise<ScannedVmDisk> {
  const what = `VM ${d.vm} disk ${d.disk} (${d.path})`;
  const st = await stat(d.path).catch((e: unknown) => {
    throw new EmbotError(ErrorCodes.IMAGE_UNKNOWN, `${what}: cannot read it`, { cause: e });
  });
  if (d.format === 'raw') {
    const s = await scanImage(`vm-${d.disk}`, d.path, blockSize);
    return { size: s.size, mtimeMs: s.mtimeMs, fileSize: s.size, blocks: s.hashes.map((h, idx) => ({ idx, hash: h, fileOffset: idx * blockSize })), unread: [], skipped: 0 };
  }
  let out: string;
  try {
    out = (await run('qemu-img', ['map', '-U', '--output=json', '-f', 'qcow2', d.path], { maxBuffer: 64 * 1024 * 1024 })).stdout;
  } catch (e) {
    throw new EmbotError(ErrorCodes.IMAGE_INVALID, `${what}: qemu-img map failed: ${(e as { stderr?: string }).stderr?.trim() || (e as Error).message}`, { cause: e });
  }
  const extents = parseMap(out, what);
  const size = extents.reduce((n, e) => Math.max(n, e.start + e.length), 0);
  const { placed, skipped } = overlayBlocks(extents, size, blockSize);
  const blocks: VmDiskBlock[] = [];
  // Blocks next to each other in the guest and in the file are read together (up to READ_RUN
  // bytes): QEMU allocates a sequential write's clusters one after another.
  const runs: { idx: number; fileOffset: number; n: number }[] = [];
  const unread: { idx: number; fileOffset: number }[] = [];
  for (const [idx, fileOffset] of [...placed].sort(([a], [b]) => a - b)) {
    const len = Math.min(blockSize, size - idx * blockSize);
    if (fileOffset >= 0 && !hash(idx, fileOffset)) {
      unread.push({ idx, fileOffset });
      continue;
    }
    if (fileOffset < 0) {
      blocks.push({ idx, hash: zeroHash(len), fileOffset });
      continue;
    }
    const last = runs[runs.length - 1];
    if (last && last.idx + last.n === idx && last.fileOffset + last.n * blockSize === fileOffset && (last.n + 1) * blockSize <= Math.max(READ_RUN, blockSize)) last.n++;
    else runs.push({ idx, fileOffset, n: 1 });
  }
  const fh = await open(d.path, 'r');
  const readRun = async (buf: Buffer, r: { idx: number; fileOffset: number; n: number }): Promise<number> => {
    const len = Math.min(r.n * blockSize, size - r.idx * blockSize);
    let got = 0;
    while (got < len) {
      const { bytesRead } = await fh.read(buf, got, len - got, r.fileOffset + got);
      if (bytesRead === 0) throw new EmbotError(ErrorCodes.IMAGE_TRUNCATED, `${what}: block ${r.idx + Math.floor(got / blockSize)} lies past the file's end (${r.fileOffset + got})`);
      got += bytesRead;
    }
    return len;
  };
  const runBytes = Math.max(READ_RUN, blockSize);
  const total = runs.reduce((n, r) => n + r.n * blockSize, 0);
  // Runs in flight, in order: hashed on worker threads while the next ones are read (as image-scan.ts).
  const inFlight: { readonly r: (typeof runs)[number]; readonly job: Promise<{ readonly buf: ArrayBuffer; readonly hashes: BlockHash[] }> }[] = [];
  try {
    if (total < INLINE_BELOW) {
      const buf = Buffer.allocUnsafe(runBytes);
      for (const r of runs) {
        const len = await readRun(buf, r);
        for (let k = 0; k * blockSize < len; k++) blocks.push({ idx: r.idx + k, hash: hashBlock(buf.subarray(k * blockSize, Math.min((k + 1) * blockSize, len))), fileOffset: r.fileOffset + k * blockSize });
      }
    } else {
      const pool = hashPool();
      const free: ArrayBuffer[] = Array.from({ length: pool.size + 2 }, () => new ArrayBuffer(runBytes));
      let next = 0;
      while (next < runs.length || inFlight.length > 0) {
        while (next < runs.length && free.length > 0) {
          const ab = free.pop()!;
          const r = runs[next++]!;
          const len = await readRun(Buffer.from(ab), r);
          const job = pool.hash(ab, len, blockSize);
          // Rejections are reported where each is awaited, in order.
          job.catch(() => {});
          inFlight.push({ r, job });
        }
        const { r, job } = inFlight.shift()!;
        const done = await job;
        done.hashes.forEach((hash, k) => blocks.push({ idx: r.idx + k, hash, fileOffset: r.fileOffset + k * blockSize }));
        free.push(done.buf);
      }
    }
  } finally {
    await Promise.allSettled(inFlight.map((x) => x.job));
    await fh.close();
  }
  return { size, mtimeMs: st.mtimeMs, fileSize: st.size, blocks, unread, skipped };
}
