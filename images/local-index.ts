/**
 * The host's block index (the local indexer of the document): which of its images has which hash
 * at which offset, in the agent's SQLite store so it survives restarts. Re-indexing an image whose
 * size or mtime changed re-hashes it and rewrites only the blocks whose hash changed; every change
 * is reported as the host-level delta the global indexer consumes (hashes this host gained, lost).
 */
import { readdirSync, statSync } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import type Database from 'better-sqlite3';
import { EmbotError, ErrorCodes } from '../core/errors.ts';
import type { BlockHash } from './block-hash.ts';
import { blockLength, isImageName, type ImageManifest } from './image-manifest.ts';
import { scanImage } from './image-scan.ts';
import { scanVmDisk, type VmDisk } from './vm-disk-scan.ts';

/** Where an image came from: the host's own images folder, or the image library it serves. */
export type ImageOrigin = 'local' | 'library';

export interface ImageInfo {
  readonly name: string;
  readonly origin: ImageOrigin;
  readonly path: string;
  readonly size: number;
  readonly blockSize: number;
  readonly blocks: number;
  readonly indexedAt: number;
}

/** What one (re)index changed, at host level: hashes this host gained or lost, images added or dropped. */
export interface IndexDelta {
  readonly added: readonly BlockHash[];
  readonly removed: readonly BlockHash[];
  /** Images whose manifest is new or changed. */
  readonly changed: readonly { readonly origin: ImageOrigin; readonly manifest: ImageManifest }[];
  readonly dropped: readonly { readonly origin: ImageOrigin; readonly name: string }[];
}

/** Default share of a changed VM disk's indexed blocks re-hashed per re-check (LocalImageIndex). */
export const DEFAULT_VM_RECHECK_BYTES = 64 * 1024 * 1024;

export const EMPTY_DELTA: IndexDelta = { added: [], removed: [], changed: [], dropped: [] };

/** Where to read one block of this host: an image, or a running VM's disk (`image` then says which). */
export interface BlockLocation {
  readonly origin: ImageOrigin | 'vm';
  readonly image: string;
  readonly path: string;
  /** -1: a block of zeros (a VM disk's overlay records it without data). */
  readonly offset: number;
  readonly length: number;
}

/** A VM disk this host indexes (vm-disk-scan.ts says what of it). */
export interface VmDiskInfo extends VmDisk {
  readonly size: number;
  readonly blockSize: number;
  /** Blocks indexed (a qcow2 overlay: those the VM wrote). */
  readonly blocks: number;
  readonly indexedAt: number;
}

interface VmDiskRow {
  vm: string;
  disk: number;
  path: string;
  format: 'raw' | 'qcow2';
  size: number;
  block_size: number;
  mtime_ms: number;
  indexed_at: number;
}

interface ImageRow {
  name: string;
  origin: ImageOrigin;
  path: string;
  size: number;
  block_size: number;
  mtime_ms: number;
  indexed_at: number;
}

export function mergeDeltas(a: IndexDelta, b: IndexDelta): IndexDelta {
  // A hash lost then regained (or the reverse) within one batch cancels out.
  const added = new Set(a.added);
  const removed = new Set(a.removed);
  for (const h of b.removed) if (!added.delete(h)) removed.add(h);
  for (const h of b.added) if (!removed.delete(h)) added.add(h);
  return { added: [...added], removed: [...removed], changed: [...a.changed, ...b.changed], dropped: [...a.dropped, ...b.dropped] };
}

export class LocalImageIndex {
  private readonly db: Database.Database;
  /** How many blocks of this host's images have each hash: a hash is "held" while its count is > 0. */
  private readonly counts = new Map<BlockHash, number>();

  private readonly locateStmt: Database.Statement<[string]>;
  private readonly locateVmStmt: Database.Statement<[string]>;
  /** Blocks hashed by this index since it was opened (a re-check that finds nothing changed hashes none). */
  hashedBlocks = 0;
  /** Per VM disk: where the round of re-hashing its indexed blocks is, since its file last changed. */
  private readonly passes = new Map<string, { cursor: number; mtime: number; checked: number }>();
  /** Bytes of a VM disk's already indexed blocks re-hashed per re-check. */
  private readonly vmRecheckBytes: number;

  constructor(db: Database.Database, options: { readonly vmRecheckBytes?: number } = {}) {
    this.db = db;
    this.vmRecheckBytes = options.vmRecheckBytes ?? DEFAULT_VM_RECHECK_BYTES;
    // Prepared once: a build or a block request looks up hundreds of blocks.
    this.locateStmt = db.prepare(
      `SELECT b.origin, b.image, b.idx, i.path, i.size, i.block_size FROM image_blocks b JOIN images i ON i.origin = b.origin AND i.name = b.image
       WHERE b.hash = ? ORDER BY b.origin = 'local' DESC LIMIT 1`,
    );
    this.locateVmStmt = db.prepare(
      `SELECT b.vm, b.disk, b.idx, b.file_offset, d.path, d.size, d.block_size FROM vm_disk_blocks b JOIN vm_disks d ON d.vm = b.vm AND d.disk = b.disk WHERE b.hash = ? LIMIT 1`,
    );
    for (const r of db.prepare('SELECT hash, count(*) AS n FROM image_blocks GROUP BY hash').all() as { hash: string; n: number }[]) this.counts.set(r.hash, r.n);
    for (const r of db.prepare('SELECT hash, count(*) AS n FROM vm_disk_blocks GROUP BY hash').all() as { hash: string; n: number }[]) this.counts.set(r.hash, (this.counts.get(r.hash) ?? 0) + r.n);
  }

  /** Every distinct hash this host holds. */
  heldHashes(): BlockHash[] {
    return [...this.counts.keys()];
  }

  holds(hash: BlockHash): boolean {
    return this.counts.has(hash);
  }

  images(): ImageInfo[] {
    const rows = this.db.prepare('SELECT * FROM images ORDER BY origin, name').all() as ImageRow[];
    return rows.map((r) => ({
      name: r.name,
      origin: r.origin,
      path: r.path,
      size: r.size,
      blockSize: r.block_size,
      blocks: Math.ceil(r.size / r.block_size),
      indexedAt: r.indexed_at,
    }));
  }

  manifest(name: string, origin?: ImageOrigin): (ImageManifest & { readonly origin: ImageOrigin; readonly path: string }) | undefined {
    const row = (
      origin === undefined
        ? this.db.prepare("SELECT * FROM images WHERE name = ? ORDER BY origin = 'local' DESC LIMIT 1").get(name)
        : this.db.prepare('SELECT * FROM images WHERE name = ? AND origin = ?').get(name, origin)
    ) as ImageRow | undefined;
    if (!row) return undefined;
    const hashes = (this.db.prepare('SELECT hash FROM image_blocks WHERE origin = ? AND image = ? ORDER BY idx').all(row.origin, row.name) as { hash: string }[]).map((r) => r.hash);
    return { name: row.name, size: row.size, blockSize: row.block_size, hashes, origin: row.origin, path: row.path };
  }

  /** One place this host has the block (its own images before the library's). */
  locate(hash: BlockHash): BlockLocation | undefined {
    const r = this.locateStmt.get(hash) as { origin: ImageOrigin; image: string; idx: number; path: string; size: number; block_size: number } | undefined;
    if (!r) {
      // Images first: a running VM's disk changes under the reader.
      const v = this.locateVmStmt.get(hash) as { vm: string; disk: number; idx: number; file_offset: number; path: string; size: number; block_size: number } | undefined;
      if (!v) return undefined;
      return { origin: 'vm', image: `${v.vm}/disk${v.disk}`, path: v.path, offset: v.file_offset, length: blockLength({ size: v.size, blockSize: v.block_size }, v.idx) };
    }
    return { origin: r.origin, image: r.image, path: r.path, offset: r.idx * r.block_size, length: blockLength({ size: r.size, blockSize: r.block_size }, r.idx) };
  }

  /**
   * Reads one block this host holds.
   *
   * @throws EmbotError `EMBOT_ERR_IMAGE_TRUNCATED` when the file is shorter than the index says.
   */
  async readBlock(loc: BlockLocation): Promise<Buffer> {
    if (loc.offset < 0) return Buffer.alloc(loc.length);
    const buf = Buffer.allocUnsafe(loc.length);
    const fh = await open(loc.path, 'r');
    try {
      let got = 0;
      while (got < loc.length) {
        const { bytesRead } = await fh.read(buf, got, loc.length - got, loc.offset + got);
        if (bytesRead === 0) throw new EmbotError(ErrorCodes.IMAGE_TRUNCATED, `image ${loc.image}: ${loc.path} ends inside block at ${loc.offset} (${got} of ${loc.length} bytes)`);
        got += bytesRead;
      }
    } finally {
      await fh.close();
    }
    return buf;
  }

  /**
   * A reader of many blocks that keeps each image file open between blocks (a build or a block
   * request reads hundreds); close it when done.
   */
  blockReader(): { read(loc: BlockLocation): Promise<Buffer>; close(): Promise<void> } {
    const handles = new Map<string, Promise<FileHandle>>();
    return {
      read: async (loc) => {
        if (loc.offset < 0) return Buffer.alloc(loc.length);
        let h = handles.get(loc.path);
        if (!h) handles.set(loc.path, (h = open(loc.path, 'r')));
        const fh = await h;
        const buf = Buffer.allocUnsafe(loc.length);
        let got = 0;
        while (got < loc.length) {
          const { bytesRead } = await fh.read(buf, got, loc.length - got, loc.offset + got);
          if (bytesRead === 0) throw new EmbotError(ErrorCodes.IMAGE_TRUNCATED, `image ${loc.image}: ${loc.path} ends inside block at ${loc.offset} (${got} of ${loc.length} bytes)`);
          got += bytesRead;
        }
        return buf;
      },
      close: async () => {
        for (const h of handles.values()) await h.then((fh) => fh.close()).catch(() => {});
        handles.clear();
      },
    };
  }

  /**
   * Indexes (or re-indexes) one image file. Unchanged size and mtime: nothing is read.
   *
   * @throws EmbotError `EMBOT_ERR_IMAGE_INVALID` for a bad name, `EMBOT_ERR_IMAGE_UNKNOWN` for a missing file.
   */
  async indexImage(name: string, file: string, origin: ImageOrigin, blockSize: number): Promise<IndexDelta> {
    if (!isImageName(name)) throw new EmbotError(ErrorCodes.IMAGE_INVALID, `${JSON.stringify(name)} is not an image name (letters, digits, _ . + -)`);
    const row = this.db.prepare('SELECT * FROM images WHERE origin = ? AND name = ?').get(origin, name) as ImageRow | undefined;
    const st = statSync(file, { throwIfNoEntry: false });
    if (!st?.isFile()) throw new EmbotError(ErrorCodes.IMAGE_UNKNOWN, `image ${name}: no file at ${file}`);
    if (row && row.size === st.size && row.mtime_ms === st.mtimeMs && row.block_size === blockSize && row.path === file) return EMPTY_DELTA;
    const scanned = await scanImage(name, file, blockSize);
    this.hashedBlocks += scanned.hashes.length;
    const old = row ? (this.db.prepare('SELECT idx, hash FROM image_blocks WHERE origin = ? AND image = ? ORDER BY idx').all(origin, name) as { idx: number; hash: string }[]) : [];
    const gained: BlockHash[] = [];
    const lost: BlockHash[] = [];
    const upsert = this.db.prepare('INSERT INTO image_blocks(origin, image, idx, hash) VALUES (?, ?, ?, ?) ON CONFLICT(origin, image, idx) DO UPDATE SET hash = excluded.hash');
    const del = this.db.prepare('DELETE FROM image_blocks WHERE origin = ? AND image = ? AND idx >= ?');
    this.db.transaction(() => {
      // Only blocks whose hash changed are written: re-indexing a VM disk touches what the VM wrote.
      for (let i = 0; i < scanned.hashes.length; i++) {
        const h = scanned.hashes[i]!;
        const was = old[i]?.hash;
        if (was === h) continue;
        if (was !== undefined) this.release(was, lost);
        this.acquire(h, gained);
        upsert.run(origin, name, i, h);
      }
      for (let i = scanned.hashes.length; i < old.length; i++) this.release(old[i]!.hash, lost);
      del.run(origin, name, scanned.hashes.length);
      this.db
        .prepare(
          `INSERT INTO images(name, origin, path, size, block_size, mtime_ms, indexed_at) VALUES (?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT(origin, name) DO UPDATE SET path = excluded.path, size = excluded.size, block_size = excluded.block_size, mtime_ms = excluded.mtime_ms, indexed_at = excluded.indexed_at`,
        )
        .run(name, origin, file, scanned.size, blockSize, scanned.mtimeMs, Date.now());
    })();
    const manifest: ImageManifest = { name, size: scanned.size, blockSize, hashes: scanned.hashes };
    return netDelta(gained, lost, [{ origin, manifest }], []);
  }

  /** Forgets an image (its file was deleted). */
  removeImage(name: string, origin: ImageOrigin): IndexDelta {
    const rows = this.db.prepare('SELECT hash FROM image_blocks WHERE origin = ? AND image = ?').all(origin, name) as { hash: string }[];
    const lost: BlockHash[] = [];
    this.db.transaction(() => {
      for (const r of rows) this.release(r.hash, lost);
      this.db.prepare('DELETE FROM image_blocks WHERE origin = ? AND image = ?').run(origin, name);
      this.db.prepare('DELETE FROM images WHERE origin = ? AND name = ?').run(origin, name);
    })();
    return netDelta([], lost, [], [{ origin, name }]);
  }

  /**
   * Indexes every regular file of `dir` whose name is an image name, and forgets the images of
   * that origin whose file is gone. A missing folder holds no images.
   */
  async indexFolder(dir: string, origin: ImageOrigin, blockSize: number): Promise<IndexDelta> {
    let names: string[] = [];
    try {
      names = readdirSync(dir, { withFileTypes: true })
        .filter((d) => d.isFile() && isImageName(d.name) && !d.name.endsWith('.part'))
        .map((d) => d.name);
    } catch {
      names = [];
    }
    let delta = EMPTY_DELTA;
    const present = new Set(names);
    for (const info of this.images()) {
      if (info.origin === origin && (!present.has(info.name) || path.dirname(info.path) !== path.resolve(dir))) delta = mergeDeltas(delta, this.removeImage(info.name, origin));
    }
    for (const n of names.sort()) delta = mergeDeltas(delta, await this.indexImage(n, path.resolve(dir, n), origin, blockSize));
    return delta;
  }

  /** The VM disks this host indexes. */
  vmDisks(): VmDiskInfo[] {
    const rows = this.db.prepare('SELECT d.*, (SELECT count(*) FROM vm_disk_blocks b WHERE b.vm = d.vm AND b.disk = d.disk) AS n FROM vm_disks d ORDER BY vm, disk').all() as (VmDiskRow & { n: number })[];
    return rows.map((r) => ({ vm: r.vm, disk: r.disk, path: r.path, format: r.format, size: r.size, blockSize: r.block_size, blocks: r.n, indexedAt: r.indexed_at }));
  }

  /**
   * Indexes (or re-checks) one running VM's disk: nothing is read while its file's mtime is what
   * the index has; else its blocks are hashed again (a qcow2 overlay: only those the VM wrote) and
   * only the rows whose hash or place changed are written. The delta is host-level hashes only (a
   * VM disk is no image: no manifest travels).
   *
   * @throws EmbotError what scanVmDisk throws.
   */
  async indexVmDisk(d: VmDisk, blockSize: number): Promise<IndexDelta> {
    const row = this.db.prepare('SELECT * FROM vm_disks WHERE vm = ? AND disk = ?').get(d.vm, d.disk) as VmDiskRow | undefined;
    const st = statSync(d.path, { throwIfNoEntry: false });
    if (!st?.isFile()) throw new EmbotError(ErrorCodes.IMAGE_UNKNOWN, `VM ${d.vm} disk ${d.disk}: no file at ${d.path}`);
    if (row && row.path === d.path && row.format === d.format && row.block_size === blockSize && row.mtime_ms === st.mtimeMs) return EMPTY_DELTA;
    const old = new Map(
      row && row.path === d.path && row.block_size === blockSize
        ? (this.db.prepare('SELECT idx, hash, file_offset FROM vm_disk_blocks WHERE vm = ? AND disk = ?').all(d.vm, d.disk) as { idx: number; hash: string; file_offset: number }[]).map((r) => [r.idx, r])
        : [],
    );
    // Blocks new to the overlay (or moved in it) are hashed; those already indexed where they are,
    // which the VM may have rewritten in place, a budget at a time, round robin: each is checked
    // again within ceil(indexed / budget) re-checks. The stored mtime moves only once a whole round
    // has passed since the file last changed, so an unfinished round goes on at the next re-check.
    const key = `${d.vm}\u0000${d.disk}`;
    const pass = this.passes.get(key) ?? { cursor: 0, mtime: Number.NaN, checked: 0 };
    this.passes.set(key, pass);
    if (pass.mtime !== st.mtimeMs) {
      pass.mtime = st.mtimeMs;
      pass.checked = 0;
    }
    const indexed = [...old.values()].filter((r) => r.file_offset >= 0).map((r) => r.idx).sort((x, y) => x - y);
    const budget = Math.max(1, Math.floor(this.vmRecheckBytes / blockSize));
    const window = new Set<number>();
    if (indexed.length > 0) {
      let i = indexed.findIndex((x) => x >= pass.cursor);
      if (i < 0) i = 0;
      for (let k = 0; k < Math.min(budget, indexed.length); k++) window.add(indexed[(i + k) % indexed.length]!);
      pass.cursor = indexed[(i + Math.min(budget, indexed.length)) % indexed.length]!;
    }
    const scanned = await scanVmDisk(d, blockSize, (idx, fileOffset) => {
      const was = old.get(idx);
      return was === undefined || was.file_offset !== fileOffset || window.has(idx);
    });
    this.hashedBlocks += scanned.blocks.filter((b) => b.fileOffset >= 0).length;
    pass.checked += window.size;
    const roundDone = pass.checked >= indexed.length;
    const gained: BlockHash[] = [];
    const lost: BlockHash[] = [];
    const upsert = this.db.prepare(
      'INSERT INTO vm_disk_blocks(vm, disk, idx, hash, file_offset) VALUES (?, ?, ?, ?, ?) ON CONFLICT(vm, disk, idx) DO UPDATE SET hash = excluded.hash, file_offset = excluded.file_offset',
    );
    const del = this.db.prepare('DELETE FROM vm_disk_blocks WHERE vm = ? AND disk = ? AND idx = ?');
    this.db.transaction(() => {
      if (old.size === 0 && row) this.dropVmDiskRows(d.vm, d.disk, lost);
      const seen = new Set<number>(scanned.unread.map((u) => u.idx));
      for (const b of scanned.blocks) {
        seen.add(b.idx);
        const was = old.get(b.idx);
        if (was && was.hash === b.hash && was.file_offset === b.fileOffset) continue;
        if (was?.hash !== b.hash) {
          if (was) this.release(was.hash, lost);
          this.acquire(b.hash, gained);
        }
        upsert.run(d.vm, d.disk, b.idx, b.hash, b.fileOffset);
      }
      for (const [idx, r] of old) {
        if (seen.has(idx)) continue;
        this.release(r.hash, lost);
        del.run(d.vm, d.disk, idx);
      }
      this.db
        .prepare(
          `INSERT INTO vm_disks(vm, disk, path, format, size, block_size, mtime_ms, indexed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT(vm, disk) DO UPDATE SET path = excluded.path, format = excluded.format, size = excluded.size, block_size = excluded.block_size, mtime_ms = excluded.mtime_ms, indexed_at = excluded.indexed_at`,
        )
        .run(d.vm, d.disk, d.path, d.format, scanned.size, blockSize, roundDone ? scanned.mtimeMs : (row?.mtime_ms ?? -1), Date.now());
    })();
    return netDelta(gained, lost, [], []);
  }

  /** Forgets a VM disk (the VM was removed or moved away). */
  removeVmDisk(vm: string, disk: number): IndexDelta {
    this.passes.delete(`${vm}\u0000${disk}`);
    const lost: BlockHash[] = [];
    this.db.transaction(() => {
      this.dropVmDiskRows(vm, disk, lost);
      this.db.prepare('DELETE FROM vm_disks WHERE vm = ? AND disk = ?').run(vm, disk);
    })();
    return netDelta([], lost, [], []);
  }

  /**
   * Indexes the disks of the VMs running here now and forgets those of VMs that are not. A disk
   * that cannot be read is left out of this round (its entries stay until the VM is gone) and
   * reported in `failed`.
   */
  async indexVmDisks(disks: readonly VmDisk[], blockSize: number): Promise<{ readonly delta: IndexDelta; readonly failed: readonly { readonly disk: VmDisk; readonly error: unknown }[] }> {
    let delta = EMPTY_DELTA;
    const present = new Set(disks.map((d) => `${d.vm}\u0000${d.disk}`));
    for (const r of this.vmDisks()) if (!present.has(`${r.vm}\u0000${r.disk}`)) delta = mergeDeltas(delta, this.removeVmDisk(r.vm, r.disk));
    const failed: { disk: VmDisk; error: unknown }[] = [];
    for (const d of disks) {
      try {
        delta = mergeDeltas(delta, await this.indexVmDisk(d, blockSize));
      } catch (error) {
        failed.push({ disk: d, error });
      }
    }
    return { delta, failed };
  }

  private dropVmDiskRows(vm: string, disk: number, lost: BlockHash[]): void {
    const rows = this.db.prepare('SELECT hash FROM vm_disk_blocks WHERE vm = ? AND disk = ?').all(vm, disk) as { hash: string }[];
    for (const r of rows) this.release(r.hash, lost);
    this.db.prepare('DELETE FROM vm_disk_blocks WHERE vm = ? AND disk = ?').run(vm, disk);
  }

  private acquire(h: BlockHash, gained: BlockHash[]): void {
    const n = this.counts.get(h) ?? 0;
    if (n === 0) gained.push(h);
    this.counts.set(h, n + 1);
  }

  private release(h: BlockHash, lost: BlockHash[]): void {
    const n = this.counts.get(h) ?? 0;
    if (n <= 1) {
      this.counts.delete(h);
      lost.push(h);
    } else this.counts.set(h, n - 1);
  }
}

function netDelta(gained: BlockHash[], lost: BlockHash[], changed: IndexDelta['changed'], dropped: IndexDelta['dropped']): IndexDelta {
  // A hash both lost and gained within one change (moved inside the image) nets out.
  return mergeDeltas(EMPTY_DELTA, { added: gained, removed: lost, changed, dropped });
}
