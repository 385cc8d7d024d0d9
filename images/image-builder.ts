/**
 * Construction of an image at a host from its cheapest holders (the document's Table 1): every
 * distinct block the host already has is copied locally; every other one is fetched from the
 * cheapest holder the global index names, in batches, one batch in flight per holder and all
 * holders at once. Each block is verified against its hash on arrival; a corrupt or missing block
 * goes to its next holder, and a holder that fails (its link closes, it times out) hands all its
 * outstanding blocks to their next holders. The image is written to `<out>.part` and renamed into
 * place only once every block is in.
 */
import { open, rename, rm } from 'node:fs/promises';
import { EmbotError, ErrorCodes, describeError } from '../core/errors.ts';
import { hashBlock, type BlockHash } from './block-hash.ts';
import type { Holder } from './global-index.ts';
import { distinctBlocks, type ImageManifest } from './image-manifest.ts';
import { LIBRARY_SOURCE, MIB, type CostTable } from './network-cost.ts';

/** Asks one agent for blocks; one entry per hash asked, undefined for a block it does not have. */
export interface BlockFetcher {
  fetch(via: string, hashes: readonly BlockHash[]): Promise<readonly (Uint8Array | undefined)[]>;
}

/** Blocks the building host already has. */
export interface LocalBlocks {
  has(hash: BlockHash): boolean;
  read(hash: BlockHash): Promise<Uint8Array | undefined>;
}

export interface BuildProgress {
  readonly bytesDone: number;
  readonly bytesTotal: number;
  readonly blocksDone: number;
  readonly blocksTotal: number;
}

export interface BuildOptions {
  readonly manifest: ImageManifest;
  /** The host the image is built at (its own blocks cost nothing). */
  readonly host: string;
  /** Final path of the image. */
  readonly out: string;
  readonly local: LocalBlocks;
  readonly holders: (hash: BlockHash) => readonly Holder[];
  readonly costs: CostTable;
  readonly fetcher: BlockFetcher;
  /** Bytes asked of one holder in one request. Default 4 MiB. */
  readonly batchBytes?: number;
  readonly onProgress?: (p: BuildProgress) => void;
}

export type FetchProblem = 'failed' | 'corrupt' | 'missing';

export interface BuildSummary {
  readonly image: string;
  readonly host: string;
  readonly size: number;
  readonly blocks: number;
  readonly distinctBlocks: number;
  /** Bytes of distinct blocks the host already had. */
  readonly bytesLocal: number;
  readonly blocksLocal: number;
  /** Bytes that crossed the network (verified blocks only). */
  readonly bytesFetched: number;
  readonly blocksFetched: number;
  /** source (host or `library`) → bytes fetched from it. */
  readonly bySource: Readonly<Record<string, number>>;
  readonly blocksBySource: Readonly<Record<string, number>>;
  /** Σ MiB × cost(source → host) over the fetched blocks. */
  readonly costPaid: number;
  /** What copying the whole image from the library would cost. */
  readonly wholeImageCost: number;
  /** Blocks that went to a next holder, and why. */
  readonly retries: readonly { readonly via: string; readonly source: string; readonly problem: FetchProblem; readonly blocks: number; readonly reason: string }[];
  readonly ms: number;
  /** The host held this very image already (same blocks): nothing was fetched or written. */
  readonly alreadyThere?: boolean;
}

const DEFAULT_BATCH_BYTES = 4 * MIB;

interface Pending {
  readonly hash: BlockHash;
  readonly bytes: number;
  readonly options: readonly Holder[];
  next: number;
}

/**
 * Builds the image; resolves with the summary once it is in place.
 *
 * @throws EmbotError `EMBOT_ERR_BLOCK_UNAVAILABLE` when some block has no holder left (nothing is
 *   left behind: the partial file is removed).
 */
export async function buildImage(o: BuildOptions): Promise<BuildSummary> {
  const started = Date.now();
  const m = o.manifest;
  const distinct = distinctBlocks(m);
  const positions = new Map<BlockHash, number[]>();
  m.hashes.forEach((h, i) => positions.get(h)?.push(i) ?? positions.set(h, [i]));
  const part = `${o.out}.part`;
  const fh = await open(part, 'w');
  let done = false;
  try {
    await fh.truncate(m.size);
    let bytesDone = 0;
    let blocksDone = 0;
    const progress = (): void => o.onProgress?.({ bytesDone, bytesTotal: m.size, blocksDone, blocksTotal: m.hashes.length });
    const write = async (h: BlockHash, data: Uint8Array): Promise<void> => {
      for (const i of positions.get(h)!) {
        await fh.write(data, 0, data.byteLength, i * m.blockSize);
        bytesDone += data.byteLength;
        blocksDone++;
      }
      progress();
    };

    let bytesLocal = 0;
    let blocksLocal = 0;
    const remote: Pending[] = [];
    for (const [h, bytes] of distinct) {
      if (o.local.has(h)) {
        const data = await o.local.read(h).catch(() => undefined);
        // A local copy that no longer hashes right (the file changed under the index) is fetched instead.
        if (data && data.byteLength === bytes && hashBlock(data) === h) {
          await write(h, data);
          bytesLocal += bytes;
          blocksLocal++;
          continue;
        }
      }
      const options = [...dedupeVia(o.holders(h).filter((x) => x.via !== o.host))].sort(
        (a, b) => o.costs.cost(a.source, o.host) - o.costs.cost(b.source, o.host) || cmp(a.via, b.via) || cmp(a.source, b.source),
      );
      remote.push({ hash: h, bytes, options, next: 0 });
    }

    const bySource: Record<string, number> = {};
    const blocksBySource: Record<string, number> = {};
    const retries: { via: string; source: string; problem: FetchProblem; blocks: number; reason: string }[] = [];
    let costPaid = 0;
    const dead = new Set<string>();
    const queues = new Map<string, Pending[]>();
    const running = new Map<string, Promise<void>>();
    let failure: EmbotError | undefined;

    const enqueue = (p: Pending): void => {
      while (p.next < p.options.length && dead.has(p.options[p.next]!.via)) p.next++;
      const holder = p.options[p.next];
      if (!holder) {
        failure ??= new EmbotError(ErrorCodes.BLOCK_UNAVAILABLE, `image ${m.name}: block ${p.hash.slice(0, 16)}… has no holder left (tried ${p.options.map((x) => x.via).join(', ') || 'none known'})`, {
          details: { hash: p.hash, tried: p.options.map((x) => x.via) },
        });
        return;
      }
      const q = queues.get(holder.via) ?? [];
      queues.set(holder.via, q);
      q.push(p);
      if (!running.has(holder.via)) running.set(holder.via, worker(holder.via).finally(() => running.delete(holder.via)));
    };
    const retry = (ps: readonly Pending[], via: string, problem: FetchProblem, reason: string): void => {
      if (ps.length === 0) return;
      retries.push({ via, source: ps[0]!.options[ps[0]!.next]!.source, problem, blocks: ps.length, reason });
      for (const p of ps) {
        p.next++;
        enqueue(p);
      }
    };

    const worker = async (via: string): Promise<void> => {
      // Started by the first block queued for this holder: let the rest of the synchronous queueing land first, so batches are full.
      await null;
      const q = queues.get(via)!;
      while (q.length > 0 && failure === undefined) {
        const batch: Pending[] = [];
        let bytes = 0;
        while (q.length > 0 && (batch.length === 0 || bytes + q[0]!.bytes <= (o.batchBytes ?? DEFAULT_BATCH_BYTES))) {
          const p = q.shift()!;
          batch.push(p);
          bytes += p.bytes;
        }
        let got: readonly (Uint8Array | undefined)[];
        try {
          got = await o.fetcher.fetch(
            via,
            batch.map((p) => p.hash),
          );
          if (got.length !== batch.length) throw new Error(`answered ${got.length} blocks for ${batch.length}`);
        } catch (e) {
          // The holder is gone for this build: everything it still owed goes to next holders.
          dead.add(via);
          const owed = [...batch, ...q.splice(0)];
          retry(owed, via, 'failed', describeError(e));
          return;
        }
        const missing: Pending[] = [];
        const corrupt: Pending[] = [];
        for (let i = 0; i < batch.length; i++) {
          const p = batch[i]!;
          const data = got[i];
          if (data === undefined) missing.push(p);
          else if (data.byteLength !== p.bytes || hashBlock(data) !== p.hash) corrupt.push(p);
          else {
            const source = p.options[p.next]!.source;
            await write(p.hash, data);
            bySource[source] = (bySource[source] ?? 0) + p.bytes;
            blocksBySource[source] = (blocksBySource[source] ?? 0) + 1;
            costPaid += (p.bytes / MIB) * o.costs.cost(source, o.host);
          }
        }
        retry(missing, via, 'missing', 'the holder no longer has these blocks');
        retry(corrupt, via, 'corrupt', `${ErrorCodes.BLOCK_HASH_MISMATCH}: bytes do not hash to the block's hash`);
      }
    };

    for (const p of remote) enqueue(p);
    for (;;) {
      while (running.size > 0) await Promise.all([...running.values()]);
      // A block handed to a holder whose worker was just finishing waits in its queue: start it again.
      const stranded = failure === undefined ? [...queues].filter(([via, q]) => q.length > 0 && !running.has(via)) : [];
      if (stranded.length === 0) break;
      for (const [via] of stranded) running.set(via, worker(via).finally(() => running.delete(via)));
    }
    if (failure) throw failure;

    await fh.sync();
    await fh.close();
    await rename(part, o.out);
    done = true;
    const bytesFetched = Object.values(bySource).reduce((a, b) => a + b, 0);
    return {
      image: m.name,
      host: o.host,
      size: m.size,
      blocks: m.hashes.length,
      distinctBlocks: distinct.size,
      bytesLocal,
      blocksLocal,
      bytesFetched,
      blocksFetched: Object.values(blocksBySource).reduce((a, b) => a + b, 0),
      bySource,
      blocksBySource,
      costPaid,
      wholeImageCost: (m.size / MIB) * o.costs.cost(LIBRARY_SOURCE, o.host),
      retries,
      ms: Date.now() - started,
    };
  } finally {
    if (!done) {
      await fh.close().catch(() => {});
      await rm(part, { force: true });
    }
  }
}

function cmp(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** One option per agent: a host that has a block in its images and its library is asked once. */
function* dedupeVia(hs: readonly Holder[]): Iterable<Holder> {
  const seen = new Set<string>();
  for (const h of hs) {
    if (seen.has(h.via)) continue;
    seen.add(h.via);
    yield h;
  }
}
