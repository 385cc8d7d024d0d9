/**
 * Images benchmark (issue 14), every figure against a limit measured in the same run:
 * - indexing throughput (file read, sha256 per block, SQLite rows) vs the raw sha256 over the
 *   same bytes in memory (target >= 0.8);
 * - building an image at 0/50/70/90 % shared blocks between two real ImageServices on loopback
 *   (real PeerServer, authenticated link, BlockFetch frames): bytes moved (must equal the unshared
 *   share) and time vs copying the whole image from the library through the same path;
 * - placement of one VM over 1,000 candidate hosts with a 10,000-image global index: time per
 *   decision vs the brute-force computation (every block, every holder) on the same inputs.
 * - a running VM's qcow2 overlay in the index: first index vs the raw hash of its written bytes,
 *   and the unchanged re-check (nothing hashed) vs the same raw hash.
 *
 * @example
 * ```sh
 * npx tsx bench/images.bench.ts [--quick]
 * npm run bench -- --only images
 * ```
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { Store } from '../core/store/store.ts';
import { PeerServer, connectPeer, peerEndpoint, type PeerConnection } from '../core/wire/index.ts';
import {
  GlobalImageIndex,
  ImageService,
  LocalImageIndex,
  buildCosts,
  costTable,
  distinctBlocks,
  hashBlock,
  matrixTable,
  rankCandidates,
  type BlockHash,
  type BuildSummary,
} from '../images/index.ts';
import { derivedImage } from '../test/harness/image-files.ts';
import { fmt, renderTable, type BenchRow, type BenchTable } from './table.ts';

const MiB = 1024 * 1024;
const BLOCK = 64 * 1024;
const SECRET = randomBytes(32);

export interface ImagesBenchOptions {
  readonly quick?: boolean;
}

function ms(start: bigint): number {
  return Number(process.hrtime.bigint() - start) / 1e6;
}

async function indexing(root: string, bytes: number, runs: number): Promise<BenchRow> {
  const data = randomBytes(bytes);
  const file = path.join(root, 'index-me.img');
  writeFileSync(file, data);
  const rawRate = (): number => {
    const t = process.hrtime.bigint();
    for (let o = 0; o < data.byteLength; o += BLOCK) hashBlock(data.subarray(o, o + BLOCK));
    return bytes / MiB / (ms(t) / 1000);
  };
  // Each indexing run sits between two raw runs and is judged against their mean: on a machine
  // whose load drifts, the median of these paired ratios is steadier than best against best.
  const pairs: { idx: number; raw: number }[] = [];
  rawRate();
  for (let r = 0; r < runs; r++) {
    const before = rawRate();
    const store = Store.open({ file: path.join(root, `index-${r}.sqlite`) });
    const index = new LocalImageIndex(store.db);
    const t = process.hrtime.bigint();
    await index.indexImage('index-me.img', file, 'local', BLOCK);
    const idx = bytes / MiB / (ms(t) / 1000);
    store.close();
    pairs.push({ idx, raw: (before + rawRate()) / 2 });
  }
  pairs.sort((a, b) => a.idx / a.raw - b.idx / b.raw);
  const mid = pairs[Math.floor(pairs.length / 2)]!;
  const ratio = mid.idx / mid.raw;
  return {
    name: `index a ${bytes / MiB} MiB image (64 KiB blocks, file in page cache), median of ${runs} paired runs`,
    value: mid.idx,
    unit: 'MiB/s',
    limitName: 'raw sha256 per block, same bytes in memory, just before and after',
    limit: mid.raw,
    ratio,
    target: '>= 0.8',
    met: ratio >= 0.8,
  };
}

/**
 * A running VM's disk in the index (issue 14 point 2): a qcow2 overlay of 4x `written` on a raw
 * base, `written` bytes of it written (random, through qemu-io). Row 1: a first index of the disk
 * (qemu-img map, read and hash the written blocks, rows) vs the raw sha256 of the same bytes in
 * memory, paired like `indexing`. Row 2: the re-check of the unchanged disk (stat only, nothing
 * hashed) vs that raw hash: how much a re-check saves.
 */
async function vmDisk(root: string, written: number, runs: number): Promise<BenchRow[]> {
  const dir = path.join(root, 'vm-disk');
  mkdirSync(dir);
  const base = path.join(dir, 'base.img');
  writeFileSync(base, randomBytes(4 * written));
  const data = randomBytes(written);
  const src = path.join(dir, 'src.bin');
  writeFileSync(src, data);
  const disk = path.join(dir, 'disk0.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', disk]);
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -s ${src} ${written} ${written}`, disk], { stdio: 'ignore' });
  const rawMs = (): number => {
    const t = process.hrtime.bigint();
    for (let o = 0; o < data.byteLength; o += BLOCK) hashBlock(data.subarray(o, o + BLOCK));
    return ms(t);
  };
  const first: { ms: number; raw: number }[] = [];
  const again: { ms: number; raw: number }[] = [];
  rawMs();
  for (let r = 0; r < runs; r++) {
    const before = rawMs();
    const store = Store.open({ file: path.join(dir, `vm-${r}.sqlite`) });
    const index = new LocalImageIndex(store.db);
    const d = { vm: 'v', disk: 0, path: disk, format: 'qcow2' as const };
    let t = process.hrtime.bigint();
    await index.indexVmDisk(d, BLOCK);
    const firstMs = ms(t);
    if (index.hashedBlocks !== written / BLOCK) throw new Error(`indexed ${index.hashedBlocks} blocks of the overlay, expected ${written / BLOCK}`);
    t = process.hrtime.bigint();
    await index.indexVmDisk(d, BLOCK);
    const againMs = ms(t);
    if (index.hashedBlocks !== written / BLOCK) throw new Error('the unchanged re-check hashed blocks');
    store.close();
    const raw = (before + rawMs()) / 2;
    first.push({ ms: firstMs, raw });
    again.push({ ms: againMs, raw });
  }
  const median = (xs: { ms: number; raw: number }[]): { ms: number; raw: number } => [...xs].sort((a, b) => a.raw / a.ms - b.raw / b.ms)[Math.floor(xs.length / 2)]!;
  const f = median(first);
  const g = median(again);
  const mb = written / MiB;
  return [
    {
      name: `index a VM's qcow2 overlay, ${mb} MiB written of ${4 * mb} MiB (qemu-img map + hash), median of ${runs} paired runs`,
      value: mb / (f.ms / 1000),
      unit: 'MiB/s',
      limitName: 'raw sha256 per block of the written bytes, in memory, just before and after',
      limit: mb / (f.raw / 1000),
      ratio: f.raw / f.ms,
    },
    {
      name: `re-check the same overlay unchanged (mtime: nothing read, 0 blocks hashed)`,
      value: g.ms,
      unit: 'ms',
      limitName: `raw sha256 of its ${mb} MiB written, in memory`,
      limit: g.raw,
      ratio: g.raw / g.ms,
    },
  ];
}

interface Node {
  readonly service: ImageService;
  readonly server: PeerServer;
  readonly store: Store;
}

/** An ImageService behind its own PeerServer; `lib` is the indexer and serves the library. */
async function node(root: string, name: string, servers: Map<string, PeerServer>, library?: string): Promise<Node> {
  const server = await PeerServer.listen({ agent: name, secret: SECRET, listen: '127.0.0.1:0', requestTimeoutMs: 30_000 });
  servers.set(name, server);
  const dir = path.join(root, `images-${name}`);
  mkdirSync(dir, { recursive: true });
  const store = Store.open({ file: path.join(root, `${name}.sqlite`) });
  const service = new ImageService({
    agent: name,
    db: store.db,
    imagesDir: dir,
    libraryDir: library,
    blockSize: BLOCK,
    indexer: 'lib',
    costs: costTable({ default: 1 }),
    connect: (peer): Promise<PeerConnection> => connectPeer({ url: servers.get(peer)!.url, agent: name, secret: SECRET, expectedPeer: peer, requestTimeoutMs: 30_000 }),
    hostLoad: async () => ({ cpu: 0, freeMemory: 1 << 30 }),
    reindexMs: 0,
    requestTimeoutMs: 30_000,
    buildTimeoutMs: 120_000,
  });
  peerEndpoint(server).register(service.peerService());
  return { service, server, store };
}

async function builds(root: string, bytes: number): Promise<BenchRow[]> {
  const servers = new Map<string, PeerServer>();
  const libDir = path.join(root, 'library');
  mkdirSync(libDir);
  const blocks = bytes / BLOCK;
  const web = randomBytes(bytes);
  writeFileSync(path.join(libDir, 'web.img'), web);
  const nodes: Node[] = [await node(root, 'lib', servers, libDir)];
  try {
    await nodes[0]!.service.reindex();
    const run = async (name: string, shared: number): Promise<BuildSummary> => {
      const n = await node(root, name, servers);
      nodes.push(n);
      // The host has an image sharing `shared` of web's blocks (the rest its own).
      if (shared > 0) writeFileSync(path.join(root, `images-${name}`, 'base.img'), derivedImage(web, BLOCK, shared, shared).image);
      await n.service.reindex();
      const s = await n.service.build('web.img');
      if (Buffer.compare(readFileSync(path.join(root, `images-${name}`, 'web.img')), web) !== 0) throw new Error(`${name}: the built image differs from the library's`);
      return s;
    };
    // The whole-image copy before and after the shared builds, the faster one counted: on a
    // loaded machine one slow run would flatter every ratio.
    const first = await run('copy1', 0);
    const built = new Map<number, BuildSummary>();
    for (const pct of [0, 50, 70, 90]) built.set(pct, await run(`b${pct}`, Math.round((blocks * pct) / 100)));
    const second = await run('copy2', 0);
    const whole = first.ms <= second.ms ? first : second;
    const rows: BenchRow[] = [];
    for (const pct of [0, 50, 70, 90]) {
      const shared = Math.round((blocks * pct) / 100);
      const s = built.get(pct)!;
      const expected = (blocks - shared) * BLOCK;
      const exact = s.bytesFetched === expected;
      rows.push({
        name: `build ${bytes / MiB} MiB at ${pct}% shared: bytes moved (expected ${fmt(expected / MiB)} MiB${exact ? ', exact' : ', NOT exact'})`,
        value: s.bytesFetched / MiB,
        unit: 'MiB',
        limitName: 'whole-image copy',
        limit: whole.bytesFetched / MiB,
        ratio: s.bytesFetched / whole.bytesFetched,
        target: `= ${((100 - pct) / 100).toFixed(2)}`,
        met: exact,
      });
      rows.push({
        name: `build ${bytes / MiB} MiB at ${pct}% shared: time`,
        value: s.ms,
        unit: 'ms',
        limitName: 'whole-image copy, same path',
        limit: whole.ms,
        ratio: whole.ms / Math.max(1, s.ms),
      });
    }
    return rows;
  } finally {
    for (const n of nodes) {
      await n.service.close();
      await n.server.close();
      n.store.close();
    }
  }
}

function placement(hostsN: number, imagesN: number, blocksPerImage: number): BenchRow {
  const hosts = Array.from({ length: hostsN }, (_, i) => `h${i}`);
  const families = 20;
  const baseHashes = Array.from({ length: families }, (_, f) => Array.from({ length: blocksPerImage }, (_, b) => hashBlock(Buffer.from(`f${f}b${b}`))));
  const g = new GlobalImageIndex();
  const perHost = imagesN / hostsN;
  let k = 0;
  for (const h of hosts) {
    const changed = [];
    const added = new Set<BlockHash>();
    for (let i = 0; i < perHost; i++, k++) {
      // Each image is a family's base with a tenth of its blocks its own.
      const hashes = baseHashes[k % families]!.map((x, b) => (b % 10 === k % 10 ? hashBlock(Buffer.from(`img${k}b${b}`)) : x));
      hashes.forEach((x) => added.add(x));
      changed.push({ origin: 'local' as const, manifest: { name: `img${k}.img`, size: blocksPerImage * BLOCK, blockSize: BLOCK, hashes } });
    }
    g.apply(h, { seq: 1, full: true, added: [...added], removed: [], changed, dropped: [] });
  }
  // A rack of 40 hosts each; cost 1 in the rack, 4 across.
  const m = hosts.map((_, i) => hosts.map((__, j) => (i === j ? 0 : Math.floor(i / 40) === Math.floor(j / 40) ? 1 : 4)));
  const table = matrixTable(hosts, m);
  const vm = g.manifest('img12345.img') ?? g.manifest('img7.img')!;
  const blocks = distinctBlocks(vm);
  const candidates = hosts.map((host, i) => ({ host, cpu: (i % 10) / 10, freeMemory: (i % 7) * MiB }));
  const decide = (): void => {
    const costs = buildCosts(blocks, hosts, (h) => g.holders(h), table);
    rankCandidates(candidates, costs, { kind: 'within', percent: 10, by: 'cpu' });
  };
  const brute = (): void => {
    const costs = new Map<string, number>();
    for (const t of hosts) {
      let total = 0;
      for (const [h, bytes] of blocks) {
        let best = Infinity;
        for (const x of g.holders(h)) best = Math.min(best, x.via === t ? 0 : table.cost(x.source, t));
        total += (bytes / MiB) * best;
      }
      costs.set(t, total);
    }
    rankCandidates(candidates, costs, { kind: 'within', percent: 10, by: 'cpu' });
  };
  const time = (fn: () => void, n: number): number => {
    if (n > 1) fn();
    const t = process.hrtime.bigint();
    for (let i = 0; i < n; i++) fn();
    return ms(t) / n;
  };
  const d = time(decide, 20);
  // One brute-force pass takes tens of seconds at this size: timed once, unwarmed.
  const b = time(brute, 1);
  return { name: `place one VM (${blocksPerImage}-block image) over ${hostsN} candidates, ${imagesN} images indexed`, value: d, unit: 'ms/decision', limitName: 'brute force (every block × holder × candidate)', limit: b, ratio: b / d };
}

export async function run(opts: ImagesBenchOptions = {}): Promise<BenchTable> {
  const root = mkdtempSync(path.join(tmpdir(), 'embot-images-bench-'));
  try {
    const rows: BenchRow[] = [];
    rows.push(await indexing(root, opts.quick ? 16 * MiB : 64 * MiB, opts.quick ? 3 : 9));
    rows.push(...(await builds(root, opts.quick ? 8 * MiB : 64 * MiB)));
    rows.push(placement(1000, 10_000, opts.quick ? 32 : 64));
    rows.push(...(await vmDisk(root, opts.quick ? 4 * MiB : 16 * MiB, opts.quick ? 3 : 7)));
    return {
      title: 'images: indexing, construction from the cheapest holders, placement',
      rows,
      notes: [
        'builds run between ImageServices in this process over real authenticated PeerServer links on loopback (BlockFetch frames of 4 MiB), writing real files; the whole-image copy is a build at a host that holds none of the blocks, through the same path',
        'bytes-moved rows: ratio = bytes fetched / whole image, target = the unshared share; met = bytes fetched equal the unshared blocks exactly',
        'time rows: ratio = whole-copy time / build time (higher is better); the whole copy is run before and after the shared builds and the faster run counted; indexing: the median of paired ratios (each run against the raw hash just before and after it)',
      ],
    };
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  console.log(renderTable(await run({ quick: process.argv.includes('--quick') })));
  process.exit(0);
}
