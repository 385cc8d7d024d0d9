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

export const EMPTY_DELTA: IndexDelta = { added: [], removed: [], changed: [], dropped: [] };

/** Where to read one block of this host. */
export interface BlockLocation {
  readonly origin: ImageOrigin;
  readonly image: string;
  readonly path: string;
  readonly offset: number;
  readonly length: number;
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

  constructor(db: Database.Database) {
    this.db = db;
    // Prepared once: a build or a block request looks up hundreds of blocks.
    this.locateStmt = db.prepare(
      `SELECT b.origin, b.image, b.idx, i.path, i.size, i.block_size FROM image_blocks b JOIN images i ON i.origin = b.origin AND i.name = b.image
       WHERE b.hash = ? ORDER BY b.origin = 'local' DESC LIMIT 1`,
    );
    for (const r of db.prepare('SELECT hash, count(*) AS n FROM image_blocks GROUP BY hash').all() as { hash: string; n: number }[]) this.counts.set(r.hash, r.n);
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
    if (!r) return undefined;
    return { origin: r.origin, image: r.image, path: r.path, offset: r.idx * r.block_size, length: blockLength({ size: r.size, blockSize: r.block_size }, r.idx) };
  }

  /**
   * Reads one block this host holds.
   *
   * @throws EmbotError `EMBOT_ERR_IMAGE_TRUNCATED` when the file is shorter than the index says.
   */
  async readBlock(loc: BlockLocation): Promise<Buffer> {
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
