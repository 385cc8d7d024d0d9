import { mkdtempSync, openSync, rmSync, truncateSync, writeSync, closeSync, mkdirSync, utimesSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../core/errors.ts';
import { GlobalImageIndex, LocalImageIndex, decodeIndexUpdate, encodeIndexUpdate, hashBlock, type IndexUpdateBody } from '../../images/index.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { rejection } from '../harness/expect-code.ts';
import { randomImage, writeImage } from '../harness/image-files.ts';
import { tempStores } from '../harness/temp-store.ts';

const BS = 4096;
const cleanups = cleanupsAfterEach();
const { tmpStoreFile, openStore } = tempStores(cleanups, 'embot-images-');

function tmpDir(): string {
  const d = mkdtempSync(path.join(tmpdir(), 'embot-images-dir-'));
  cleanups.push(() => rmSync(d, { recursive: true, force: true }));
  return d;
}

describe('local image index', () => {
  it('indexes a folder: every block hash at its offset, and survives a restart of the store', async () => {
    const dir = tmpDir();
    const bytes = randomImage(10, BS, 100);
    writeImage(path.join(dir, 'base.img'), bytes);
    const file = tmpStoreFile();
    const store = Store1(file);
    const idx = new LocalImageIndex(store.db);
    const delta = await idx.indexFolder(dir, 'local', BS);
    expect(delta.added).toHaveLength(10);
    expect(delta.changed.map((c) => c.manifest.name)).toEqual(['base.img']);
    const m = idx.manifest('base.img')!;
    expect(m.size).toBe(9 * BS + 100);
    expect(m.hashes[9]).toBe(hashBlock(bytes.subarray(9 * BS)));
    const loc = idx.locate(m.hashes[3]!)!;
    expect(loc.offset).toBe(3 * BS);
    expect(Buffer.compare(await idx.readBlock(loc), bytes.subarray(3 * BS, 4 * BS))).toBe(0);
    store.close();

    const again = new LocalImageIndex(Store1(file).db);
    expect(again.manifest('base.img')!.hashes).toEqual(m.hashes);
    expect(again.holds(m.hashes[0]!)).toBe(true);
    // Unchanged size and mtime: nothing re-read, nothing to tell the indexer.
    expect(await again.indexFolder(dir, 'local', BS)).toMatchObject({ added: [], removed: [], changed: [] });
  });

  it('re-checks a changed image and reports only the blocks that changed; a deleted file is dropped', async () => {
    const dir = tmpDir();
    const bytes = randomImage(8, BS);
    const file = writeImage(path.join(dir, 'disk.img'), bytes);
    const idx = new LocalImageIndex(openStore().db);
    await idx.indexFolder(dir, 'local', BS);
    const before = idx.manifest('disk.img')!.hashes;
    const fd = openSync(file, 'r+');
    writeSync(fd, Buffer.alloc(BS, 7), 0, BS, 5 * BS);
    closeSync(fd);
    utimesSync(file, new Date(), new Date(Date.now() + 5000));
    const delta = await idx.indexFolder(dir, 'local', BS);
    expect(delta.removed).toEqual([before[5]]);
    expect(delta.added).toEqual([hashBlock(Buffer.alloc(BS, 7))]);
    rmSync(file);
    const gone = await idx.indexFolder(dir, 'local', BS);
    expect(gone.dropped).toEqual([{ origin: 'local', name: 'disk.img' }]);
    expect(gone.removed).toHaveLength(8);
    expect(idx.heldHashes()).toEqual([]);
  });

  it('a truncated image: reading a block past its end is refused with IMAGE_TRUNCATED, and a re-index drops the lost blocks', async () => {
    const dir = tmpDir();
    const file = writeImage(path.join(dir, 'lib.img'), randomImage(6, BS));
    const idx = new LocalImageIndex(openStore().db);
    await idx.indexFolder(dir, 'library', BS);
    const last = idx.manifest('lib.img')!.hashes[5]!;
    truncateSync(file, 4 * BS + 10);
    await expect(idx.readBlock(idx.locate(last)!)).rejects.toMatchObject({ code: ErrorCodes.IMAGE_TRUNCATED });
    utimesSync(file, new Date(), new Date(Date.now() + 5000));
    const delta = await idx.indexFolder(dir, 'library', BS);
    expect(delta.removed).toContain(last);
    expect(idx.manifest('lib.img')!.hashes).toHaveLength(5);
  });

  it('an unknown image and a bad image name are coded errors', async () => {
    const dir = tmpDir();
    const idx = new LocalImageIndex(openStore().db);
    expect((await rejection(idx.indexImage('nope.img', path.join(dir, 'nope.img'), 'local', BS))).code).toBe(ErrorCodes.IMAGE_UNKNOWN);
    expect((await rejection(idx.indexImage('../etc', path.join(dir, 'x'), 'local', BS))).code).toBe(ErrorCodes.IMAGE_INVALID);
    mkdirSync(path.join(dir, 'sub'));
    expect(await idx.indexFolder(path.join(dir, 'missing'), 'local', BS)).toMatchObject({ added: [] });
  });
});

describe('index updates and the global index', () => {
  const h = (n: number): string => hashBlock(Buffer.from([n]));
  const manifest = (name: string, hashes: string[]) => ({ name, size: hashes.length * BS, blockSize: BS, hashes });

  it('round-trips an update; holders follow incremental updates; a host dropped is no longer offered', () => {
    const g = new GlobalImageIndex();
    const full: IndexUpdateBody = { seq: 1, full: true, added: [h(1), h(2)], removed: [], changed: [{ origin: 'local', manifest: manifest('a.img', [h(1), h(2)]) }], dropped: [] };
    g.apply('b', decodeIndexUpdate(encodeIndexUpdate(full)));
    g.apply('lib', decodeIndexUpdate(encodeIndexUpdate({ ...full, changed: [{ origin: 'library', manifest: manifest('a.img', [h(1), h(2)]) }] })));
    expect(g.holders(h(1))).toEqual([
      { source: 'b', via: 'b' },
      { source: 'library', via: 'lib' },
    ]);
    g.apply('b', decodeIndexUpdate(encodeIndexUpdate({ seq: 2, full: false, added: [h(3)], removed: [h(1)], changed: [{ origin: 'local', manifest: manifest('a.img', [h(3), h(2)]) }], dropped: [] })));
    expect(g.holders(h(1))).toEqual([{ source: 'library', via: 'lib' }]);
    expect(g.holders(h(3))).toEqual([{ source: 'b', via: 'b' }]);
    expect(g.dropHost('b')).toBe(true);
    expect(g.holders(h(3))).toEqual([]);
    expect(g.manifest('a.img')!.hashes).toEqual([h(1), h(2)]);
  });

  it('refuses an update out of sequence, an incremental one before any full one, and bodies that are not updates', () => {
    const g = new GlobalImageIndex();
    const inc: IndexUpdateBody = { seq: 2, full: false, added: [], removed: [], changed: [], dropped: [] };
    expect(() => g.apply('b', inc)).toThrow(expect.objectContaining({ code: ErrorCodes.INDEX_UPDATE_REFUSED }));
    g.apply('b', { ...inc, seq: 1, full: true });
    expect(() => g.apply('b', { ...inc, seq: 3 })).toThrow(expect.objectContaining({ code: ErrorCodes.INDEX_UPDATE_REFUSED }));
    const bad = [
      Buffer.from([0xc1]),
      encodeIndexUpdate({ ...inc, seq: 1 }).subarray(0, 5),
      Buffer.from(JSON.stringify({})),
    ];
    for (const b of bad) expect(() => decodeIndexUpdate(b)).toThrow(expect.objectContaining({ code: ErrorCodes.INDEX_UPDATE_REFUSED }));
    // A manifest whose hash list is short of its size (a truncated image's) is refused inside an update.
    const truncated = encodeIndexUpdate({ ...inc, seq: 1, changed: [{ origin: 'local', manifest: { ...manifest('t.img', [h(1)]), size: 3 * BS } }] });
    expect(() => decodeIndexUpdate(truncated)).toThrow(/truncated/);
  });
});

function Store1(file: string) {
  return openStore(file);
}
