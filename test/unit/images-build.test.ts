import { mkdtempSync, readFileSync, rmSync, existsSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../core/errors.ts';
import {
  GlobalImageIndex,
  LocalImageIndex,
  buildImage,
  costTable,
  hashBlock,
  type BlockFetcher,
  type BlockHash,
  type ImageOrigin,
} from '../../images/index.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { rejection } from '../harness/expect-code.ts';
import { derivedImage, randomImage, writeImage } from '../harness/image-files.ts';
import { tempStores } from '../harness/temp-store.ts';

const BS = 4096;
const BLOCKS = 100;
const cleanups = cleanupsAfterEach();
const { openStore } = tempStores(cleanups, 'embot-build-');

function tmpDir(): string {
  const d = mkdtempSync(path.join(tmpdir(), 'embot-build-dir-'));
  cleanups.push(() => rmSync(d, { recursive: true, force: true }));
  return d;
}

/** One host of the test cluster: a real store and images folder, indexed; its index reported to `global`. */
async function host(global: GlobalImageIndex, name: string, images: Record<string, Buffer>, origin: ImageOrigin = 'local') {
  const dir = tmpDir();
  for (const [n, b] of Object.entries(images)) writeImage(path.join(dir, n), b);
  const index = new LocalImageIndex(openStore().db);
  const delta = await index.indexFolder(dir, origin, BS);
  global.apply(name, { ...delta, seq: 1, full: true });
  return { name, dir, index };
}

type Host = Awaited<ReturnType<typeof host>>;

/** Serves blocks from the hosts' real indexes and files, in process (the peer link is tested in the integration test). */
function fetcherOver(hosts: readonly Host[]): BlockFetcher & { asked: Map<string, number> } {
  const asked = new Map<string, number>();
  return {
    asked,
    async fetch(via, hashes) {
      const h = hosts.find((x) => x.name === via)!;
      asked.set(via, (asked.get(via) ?? 0) + hashes.length);
      return Promise.all(hashes.map(async (x) => {
        const loc = h.index.locate(x);
        return loc ? h.index.readBlock(loc) : undefined;
      }));
    },
  };
}

function localOf(h: Host) {
  return {
    has: (x: BlockHash) => h.index.holds(x),
    read: async (x: BlockHash) => h.index.readBlock(h.index.locate(x)!),
  };
}

describe('image construction from the cheapest holders', () => {
  for (const share of [0, 50, 70, 90]) {
    it(`${share}% of blocks shared: bytes fetched equal the unshared blocks exactly, the image is byte-identical`, async () => {
      const base = randomImage(BLOCKS, BS);
      const { image: target } = derivedImage(base, BS, Math.round((BLOCKS * share) / 100), share + 1);
      const global = new GlobalImageIndex();
      const b = await host(global, 'b', { 'base.img': base });
      const lib = await host(global, 'lib', { 'web.img': target }, 'library');
      const out = path.join(b.dir, 'web.img');
      const summary = await buildImage({
        manifest: global.manifest('web.img')!,
        host: 'b',
        out,
        local: localOf(b),
        holders: (x) => global.holders(x),
        costs: costTable({ default: 4 }),
        fetcher: fetcherOver([b, lib]),
      });
      const unshared = BLOCKS - Math.round((BLOCKS * share) / 100);
      expect(summary.bytesFetched).toBe(unshared * BS);
      expect(summary.bytesLocal).toBe((BLOCKS - unshared) * BS);
      expect(summary.bySource).toEqual(unshared > 0 ? { library: unshared * BS } : {});
      expect(summary.costPaid).toBeCloseTo(((unshared * BS) / 2 ** 20) * 4);
      expect(summary.wholeImageCost).toBeCloseTo(((BLOCKS * BS) / 2 ** 20) * 4);
      expect(Buffer.compare(readFileSync(out), target)).toBe(0);
    });
  }

  it('fetches each block from its cheapest holder: a same-rack host before the library', async () => {
    const base = randomImage(40, BS);
    const { image: web } = derivedImage(base, BS, 10, 3);
    const global = new GlobalImageIndex();
    const a = await host(global, 'a', {});
    const c = await host(global, 'c', { 'web-copy.img': web.subarray(0, 20 * BS) });
    const lib = await host(global, 'lib', { 'web.img': web }, 'library');
    const costs = costTable({ racks: { r1: ['a', 'c'], r2: ['lib', 'library'] }, sameRack: 1, crossRack: 5 });
    const summary = await buildImage({ manifest: global.manifest('web.img')!, host: 'a', out: path.join(a.dir, 'web.img'), local: localOf(a), holders: (x) => global.holders(x), costs, fetcher: fetcherOver([a, c, lib]) });
    expect(summary.bySource).toEqual({ c: 20 * BS, library: 20 * BS });
    expect(summary.costPaid).toBeCloseTo(((20 * BS) / 2 ** 20) * (1 + 5));
    expect(Buffer.compare(readFileSync(path.join(a.dir, 'web.img')), web)).toBe(0);
  });

  it('FAULT INJECTION (corrupt block): a holder serving bytes that do not match the hash; the block comes from the next holder and the summary says so', async () => {
    const web = randomImage(20, BS, 1000);
    const global = new GlobalImageIndex();
    const a = await host(global, 'a', {});
    const c = await host(global, 'c', { 'web.img': web });
    const lib = await host(global, 'lib', { 'web.img': web }, 'library');
    const honest = fetcherOver([c, lib]);
    const corrupting: BlockFetcher = {
      async fetch(via, hashes) {
        const got = await honest.fetch(via, hashes);
        if (via !== 'c') return got;
        // The fault: c flips one byte of its third block.
        return got.map((b, i) => (i === 2 && b ? Buffer.concat([Buffer.from([b[0]! ^ 0xff]), b.subarray(1)]) : b));
      },
    };
    const costs = costTable({ matrix: { c: { a: 1 }, library: { a: 3 } } });
    const summary = await buildImage({ manifest: global.manifest('web.img')!, host: 'a', out: path.join(a.dir, 'web.img'), local: localOf(a), holders: (x) => global.holders(x), costs, fetcher: corrupting });
    expect(summary.retries).toEqual([expect.objectContaining({ via: 'c', problem: 'corrupt', blocks: 1, reason: expect.stringContaining(ErrorCodes.BLOCK_HASH_MISMATCH) })]);
    expect(summary.blocksBySource).toEqual({ c: 19, library: 1 });
    expect(Buffer.compare(readFileSync(path.join(a.dir, 'web.img')), web)).toBe(0);
  });

  it('a block nobody has but the library comes from the library; a block nobody has at all fails the build with BLOCK_UNAVAILABLE and leaves no file', async () => {
    const web = randomImage(10, BS);
    const global = new GlobalImageIndex();
    const a = await host(global, 'a', {});
    const c = await host(global, 'c', { 'part.img': web.subarray(0, 9 * BS) });
    const lib = await host(global, 'lib', { 'web.img': web }, 'library');
    const costs = costTable({ matrix: { c: { a: 1 }, library: { a: 3 } } });
    const summary = await buildImage({ manifest: global.manifest('web.img')!, host: 'a', out: path.join(a.dir, 'web.img'), local: localOf(a), holders: (x) => global.holders(x), costs, fetcher: fetcherOver([c, lib]) });
    expect(summary.bySource).toEqual({ c: 9 * BS, library: BS });

    global.dropHost('lib');
    const out = path.join(a.dir, 'again.img');
    const e = await rejection(buildImage({ manifest: { ...global.manifest('part.img')!, name: 'x.img', hashes: [...global.manifest('part.img')!.hashes, hashBlock(Buffer.from('nobody'))], size: 10 * BS }, host: 'a', out, local: localOf(a), holders: (x) => global.holders(x), costs, fetcher: fetcherOver([c]) }));
    expect(e.code).toBe(ErrorCodes.BLOCK_UNAVAILABLE);
    expect(existsSync(out)).toBe(false);
    expect(readdirSync(a.dir).filter((n) => n.endsWith('.part'))).toEqual([]);
  });

  it('a holder that fails mid-build (in process: its fetch rejects after the first batch) hands its blocks to the next holder', async () => {
    const web = randomImage(64, BS);
    const global = new GlobalImageIndex();
    const a = await host(global, 'a', {});
    const c = await host(global, 'c', { 'web.img': web });
    const lib = await host(global, 'lib', { 'web.img': web }, 'library');
    const honest = fetcherOver([c, lib]);
    let calls = 0;
    const dying: BlockFetcher = {
      async fetch(via, hashes) {
        if (via === 'c' && ++calls > 1) throw new Error('connection closed');
        return honest.fetch(via, hashes);
      },
    };
    const costs = costTable({ matrix: { c: { a: 1 }, library: { a: 3 } } });
    const summary = await buildImage({ manifest: global.manifest('web.img')!, host: 'a', out: path.join(a.dir, 'web.img'), local: localOf(a), holders: (x) => global.holders(x), costs, fetcher: dying, batchBytes: 16 * BS });
    expect(summary.blocksBySource).toEqual({ c: 16, library: 48 });
    expect(summary.retries).toEqual([expect.objectContaining({ via: 'c', problem: 'failed', blocks: 48 })]);
    expect(Buffer.compare(readFileSync(path.join(a.dir, 'web.img')), web)).toBe(0);
  });
});
