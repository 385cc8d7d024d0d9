/**
 * The agent's images service: keeps the host's block index (its images folder and, when it has
 * one, the image library it serves), shares it with its group's global indexer over the peer link,
 * serves blocks to peers, and builds images and ranks placements on request. When this agent is
 * the group's indexer it also consolidates the members' updates (GlobalImageIndex).
 *
 * Every frame comes through the peer endpoint (core/wire/peer-services.ts), so only authenticated
 * peers reach it; the indexer also takes updates only from configured members when there are any.
 */
import { existsSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import type Database from 'better-sqlite3';
import { Packr } from 'msgpackr';
import { EmbotError, ErrorCodes, ProtocolError, describeError } from '../core/errors.ts';
import type { Logger } from '../core/logger.ts';
import type { PeerConnection } from '../core/wire/peer-connection.ts';
import type { PeerFrameService } from '../core/wire/peer-services.ts';
import { BLOCK_HASH_BYTES, hashBlock, packHashes, unpackHashes, type BlockHash } from './block-hash.ts';
import { GlobalImageIndex, type Holder } from './global-index.ts';
import { blockServeFault, corruptServedBlock } from './fault-points.ts';
import { buildImage, type BlockFetcher, type BuildProgress, type BuildSummary } from './image-builder.ts';
import { distinctBlocks, isImageName, manifestId, type ImageManifest } from './image-manifest.ts';
import { decodeIndexAnswer, decodeIndexUpdate, encodeIndexAnswer, encodeIndexUpdate, type HostLoad, type IndexAnswerBody, type IndexUpdateBody, type MeasuredLink } from './index-update.ts';
import { EMPTY_DELTA, LocalImageIndex, mergeDeltas, type ImageInfo, type IndexDelta, type VmDiskInfo } from './local-index.ts';
import type { VmDisk } from './vm-disk-scan.ts';
import { LIBRARY_SOURCE, MIB, type CostTable } from './network-cost.ts';
import { LinkMeasurements, groupMeasuredTable, type LinkReport, type MeasureConfig } from './link-probe.ts';
import { buildCosts, rankCandidates, type PlacementPolicy, type RankedCandidate } from './placement.ts';

/** Blocks one BlockFetch may ask for; a 4 MiB batch of 64 KiB blocks is 64. */
export const MAX_BLOCKS_PER_FETCH = 1024;
const MISSING = 0xffffffff;
const summaryPackr = new Packr({ useRecords: false });

export interface ImageServiceOptions {
  readonly agent: string;
  readonly db: Database.Database;
  /** This host's images (built images land here). */
  readonly imagesDir: string;
  /** The image library this agent serves, if any. */
  readonly libraryDir?: string | undefined;
  readonly blockSize: number;
  /** The group's global indexer (this agent's own name: it is the indexer). */
  readonly indexer: string;
  /** Agents the indexer takes updates from; empty: any authenticated peer. */
  readonly members?: readonly string[];
  readonly costs: CostTable;
  /** An authenticated link to a named peer. */
  readonly connect: (peer: string) => Promise<PeerConnection>;
  readonly hostLoad: () => Promise<HostLoad>;
  /** Re-check the folders and report load this often; 0: only on demand. */
  readonly reindexMs: number;
  /** Timeout of one block request and of a remote build. */
  readonly requestTimeoutMs: number;
  readonly buildTimeoutMs: number;
  readonly log?: Logger;
  /** Block bytes a build here fetched, by the source they came from (the agent's metrics). */
  readonly onFetched?: (source: string, bytes: number) => void;
  /** The image a VM carries with it (the agent: its managed element's state), if any. */
  readonly vmImageOf?: (vm: string) => VmImageRef | undefined;
  /** The disks of the VMs on this host now (indexed with the images; vm-disk-scan.ts says what of them). */
  readonly vmDisks?: () => readonly VmDisk[];
  /** Measure this host's links to `probePeers` and let them override `costs` (link-probe.ts). */
  readonly measure?: MeasureConfig;
  readonly probePeers?: () => readonly string[];
}

/** A VM's image: its name and, when known, the id of the manifest it was created on (manifestId). */
export interface VmImageRef {
  readonly image: string;
  readonly manifest?: string;
}

export interface ImagesReport {
  readonly host: string;
  readonly indexer: string;
  readonly blockSize: number;
  readonly images: readonly ImageInfo[];
  /** The running VMs' disks indexed here. */
  readonly vmDisks: readonly VmDiskInfo[];
  /** This host's measured links in use (only with `images.cost.measure`). */
  readonly links?: readonly LinkReport[];
  /** As the indexer sees the group (only on the indexer). */
  readonly group?: { readonly members: readonly string[]; readonly images: ReturnType<GlobalImageIndex['catalogue']> };
}

export interface PlacementReport {
  readonly image: string;
  readonly policy: PlacementPolicy;
  readonly candidates: readonly (RankedCandidate & { readonly indexed: boolean })[];
}

/** A build started through the control API, polled by the CLI for progress. */
export interface BuildJob {
  readonly id: string;
  readonly image: string;
  readonly on: string;
  readonly state: 'running' | 'done' | 'failed';
  /** Local builds only: a remote build reports at its end. */
  readonly progress?: BuildProgress;
  readonly summary?: BuildSummary;
  readonly error?: { readonly code: string; readonly message: string };
  readonly startedAt: number;
}

const MAX_JOBS = 100;

export class ImageService {
  readonly index: LocalImageIndex;
  /** Only on the indexer. */
  readonly global: GlobalImageIndex | undefined;
  private readonly o: ImageServiceOptions;
  private readonly loads = new Map<string, HostLoad>();
  /** On the indexer: each member's measured links, from its last update. */
  private readonly groupLinks = new Map<string, readonly MeasuredLink[]>();
  /** The link each member's last update came on: when it closes, the member is dropped. */
  private readonly memberLinks = new Map<string, PeerConnection>();
  private readonly links = new Map<string, Promise<PeerConnection>>();
  private seq = 0;
  private needFull = true;
  private chain: Promise<unknown> = Promise.resolve();
  private timer: NodeJS.Timeout | undefined;
  private closed = false;
  private readonly jobs = new Map<string, BuildJob>();
  private jobSeq = 0;
  /** Measured links (images.cost.measure), else undefined. */
  readonly measured: LinkMeasurements | undefined;
  /** What moving a MiB costs: the configured table, with this host's measured links over it when measuring. */
  private readonly costs: CostTable;
  private probeTimer: NodeJS.Timeout | undefined;

  constructor(o: ImageServiceOptions) {
    this.o = o;
    this.index = new LocalImageIndex(o.db);
    this.global = o.indexer === o.agent ? new GlobalImageIndex() : undefined;
    this.measured = o.measure ? new LinkMeasurements(o.agent, o.measure) : undefined;
    this.costs = this.measured ? this.measured.table(o.costs) : o.costs;
    mkdirSync(o.imagesDir, { recursive: true });
  }

  get isIndexer(): boolean {
    return this.global !== undefined;
  }

  /** Indexes the folders, sends the first (full) update, and re-checks every `reindexMs`. */
  async start(): Promise<void> {
    await this.reindex().catch((e: unknown) => this.o.log?.warn('images: first index update not delivered; retried', { error: describeError(e) }));
    if (this.o.reindexMs > 0) {
      this.timer = setInterval(() => void this.reindex().catch((e: unknown) => this.o.log?.debug('images: index update not delivered', { error: describeError(e) })), this.o.reindexMs);
      this.timer.unref();
    }
    if (this.measured) {
      void this.probeLinks();
      this.probeTimer = setInterval(() => void this.probeLinks(), this.measured.config.probeMs);
      this.probeTimer.unref();
    }
  }

  /**
   * Probes the round trip to each peer (`probePeers`) over its authenticated link. A peer that
   * cannot be reached or answers garbage keeps (or falls back to) its configured cost.
   */
  async probeLinks(): Promise<void> {
    const m = this.measured;
    if (!m || this.closed) return;
    for (const peer of this.o.probePeers?.() ?? []) {
      if (peer === this.o.agent) continue;
      try {
        await m.probe(peer, await this.link(peer), this.o.requestTimeoutMs);
      } catch (e) {
        this.o.log?.warn(`images: link probe of ${peer} failed; its cost is the configured one`, { error: describeError(e), code: (e as { code?: string }).code });
      }
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.timer) clearInterval(this.timer);
    if (this.probeTimer) clearInterval(this.probeTimer);
    await this.chain.catch(() => {});
    for (const l of this.links.values()) void l.then((c) => c.close()).catch(() => {});
    this.links.clear();
  }

  /** The frames this service serves, for the peer endpoint. */
  peerService(): PeerFrameService {
    return {
      name: 'images',
      handlers: {
        BlockFetch: (f) => this.serveBlocks(f.hashes),
        IndexUpdate: (f, conn) => this.acceptUpdate(f.body, conn),
        IndexQuery: (f) => ({ type: 'IndexAnswer', body: encodeIndexAnswer(this.answer(f.image)) }),
        ImageBuild: async (f) => {
          if (!isImageName(f.image)) throw new EmbotError(ErrorCodes.IMAGE_INVALID, `${JSON.stringify(String(f.image).slice(0, 64))} is not an image name`);
          return { type: 'ImageBuilt', summary: summaryPackr.pack(await this.build(f.image)) };
        },
      },
    };
  }

  report(): ImagesReport {
    return {
      host: this.o.agent,
      indexer: this.o.indexer,
      blockSize: this.o.blockSize,
      images: this.index.images(),
      vmDisks: this.index.vmDisks(),
      ...(this.measured ? { links: this.measured.report() } : {}),
      ...(this.global ? { group: { members: this.global.members, images: this.global.catalogue() } } : {}),
    };
  }

  /** Path of a local image by name (for `vm create --image NAME`), own images before the library's. */
  imagePath(name: string): string | undefined {
    return this.index.manifest(name)?.path;
  }

  /**
   * Re-checks the images folder and the library, and sends what changed (or the whole index when
   * the indexer has not got it) with this host's load.
   */
  reindex(): Promise<IndexDelta> {
    const run = async (): Promise<IndexDelta> => {
      let delta = await this.index.indexFolder(this.o.imagesDir, 'local', this.o.blockSize);
      if (this.o.libraryDir !== undefined) delta = mergeDeltas(delta, await this.index.indexFolder(this.o.libraryDir, 'library', this.o.blockSize));
      if (this.o.vmDisks !== undefined) {
        const vms = await this.index.indexVmDisks(this.o.vmDisks(), this.o.blockSize);
        delta = mergeDeltas(delta, vms.delta);
        for (const f of vms.failed) this.o.log?.warn(`images: VM ${f.disk.vm} disk ${f.disk.disk} not re-checked this round`, { error: describeError(f.error) });
      }
      await this.publish(delta);
      return delta;
    };
    const p = this.chain.then(run, run);
    this.chain = p.catch(() => {});
    return p;
  }

  private async publish(delta: IndexDelta): Promise<void> {
    if (this.closed) return;
    const load = await this.o.hostLoad().catch(() => undefined);
    const full = this.needFull;
    // This host's fresh measured links travel with every update: the indexer's answers carry them to placement anywhere.
    const links = this.measured?.report().map((l) => ({ peer: l.peer, cost: l.cost }));
    const extra = { ...(load ? { load } : {}), ...(links ? { links } : {}) };
    const body: IndexUpdateBody = full ? { ...this.fullIndex(), seq: this.seq + 1, full: true, ...extra } : { ...delta, seq: this.seq + 1, full: false, ...extra };
    try {
      if (this.global) this.applyUpdate(this.o.agent, body);
      else {
        const conn = await this.link(this.o.indexer);
        const ack = await conn.request({ type: 'IndexUpdate', body: encodeIndexUpdate(body) }, { timeoutMs: this.o.requestTimeoutMs });
        if (ack.seq !== body.seq) throw new EmbotError(ErrorCodes.INDEX_UPDATE_REFUSED, `the indexer acknowledged update ${ack.seq}, not ${body.seq}`);
      }
      this.seq = body.seq;
      this.needFull = false;
    } catch (e) {
      // The indexer lost (or never had) our last state: the next update is the whole index.
      this.needFull = true;
      throw e;
    }
  }

  private fullIndex(): IndexDelta {
    const changed = this.index.images().map((i) => ({ origin: i.origin, manifest: this.index.manifest(i.name, i.origin)! }));
    return { ...EMPTY_DELTA, added: this.index.heldHashes(), changed };
  }

  private applyUpdate(host: string, body: IndexUpdateBody): void {
    this.global!.apply(host, body);
    if (body.load) this.loads.set(host, body.load);
    // No links in an update: none of the member's measurements is fresh any more.
    this.groupLinks.set(host, body.links ?? []);
  }

  private acceptUpdate(bytes: Uint8Array, conn: PeerConnection): { type: 'IndexUpdateAck'; seq: number } {
    const from = conn.remoteAgent;
    if (!this.global) throw new EmbotError(ErrorCodes.INDEX_UPDATE_REFUSED, `${this.o.agent} is not the group's global indexer (${this.o.indexer} is)`);
    const members = this.o.members ?? [];
    if (members.length > 0 && !members.includes(from)) throw new EmbotError(ErrorCodes.INDEX_UPDATE_REFUSED, `${from} is not a member of ${this.o.agent}'s index group`);
    if (from === this.o.agent) throw new EmbotError(ErrorCodes.INDEX_UPDATE_REFUSED, 'an index update must come from another agent');
    const body = decodeIndexUpdate(bytes);
    this.applyUpdate(from, body);
    if (this.memberLinks.get(from) !== conn) {
      this.memberLinks.set(from, conn);
      conn.once('close', () => {
        if (this.memberLinks.get(from) !== conn) return;
        // The host is gone (or its link is): it is no longer offered until it sends its index again.
        this.memberLinks.delete(from);
        this.loads.delete(from);
        this.groupLinks.delete(from);
        this.global?.dropHost(from);
        this.o.log?.info(`images: ${from} left the index`);
      });
    }
    return { type: 'IndexUpdateAck', seq: body.seq };
  }

  private answer(image: string): IndexAnswerBody {
    if (!this.global) throw new EmbotError(ErrorCodes.REQUEST_FAILED, `${this.o.agent} is not the group's global indexer (${this.o.indexer} is)`);
    if (!isImageName(image)) throw new EmbotError(ErrorCodes.IMAGE_INVALID, `${JSON.stringify(String(image).slice(0, 64))} is not an image name`);
    const manifest = this.global.manifest(image);
    if (!manifest) throw new EmbotError(ErrorCodes.IMAGE_UNKNOWN, `no host of ${this.o.agent}'s group and no library holds image ${image}`);
    const holders = new Map<BlockHash, Holder[]>();
    for (const h of distinctBlocks(manifest).keys()) holders.set(h, this.global.holders(h));
    const links: [string, string, number][] = [];
    for (const [from, list] of this.groupLinks) for (const l of list) links.push([from, l.peer, l.cost]);
    return { manifest, holders, loads: new Map(this.loads), members: this.global.members, ...(links.length > 0 ? { links } : {}) };
  }

  /** What the indexer knows about an image (asked over the link unless this agent is the indexer). */
  async query(image: string): Promise<IndexAnswerBody> {
    if (this.global) return this.answer(image);
    const conn = await this.link(this.o.indexer);
    const reply = await conn.request({ type: 'IndexQuery', image }, { timeoutMs: this.o.requestTimeoutMs });
    return decodeIndexAnswer(reply.body);
  }

  private async serveBlocks(packed: Uint8Array): Promise<{ type: 'BlockData'; sizes: Uint8Array; data: Uint8Array }> {
    const hashes = unpackHashes(packed);
    if (hashes === undefined || hashes.length === 0 || hashes.length > MAX_BLOCKS_PER_FETCH) {
      throw new ProtocolError(ErrorCodes.FRAME_MALFORMED, `BlockFetch.hashes must be 1..${MAX_BLOCKS_PER_FETCH} raw ${BLOCK_HASH_BYTES}-byte hashes (got ${packed.byteLength} bytes)`);
    }
    blockServeFault();
    const sizes = Buffer.alloc(hashes.length * 4);
    const parts: Buffer[] = [];
    let stale = false;
    const reader = this.index.blockReader();
    try {
      for (let i = 0; i < hashes.length; i++) {
        const h = hashes[i]!;
        const loc = this.index.locate(h);
        let data: Buffer | undefined;
        if (loc) {
          data = await reader.read(loc).catch(() => undefined);
          // The file changed or shrank since it was indexed: say "not here" rather than serve wrong bytes.
          if (data === undefined || hashBlock(data) !== h) {
            data = undefined;
            stale = true;
          }
        }
        sizes.writeUInt32LE(data ? data.byteLength : MISSING, i * 4);
        if (data) parts.push(parts.length === 0 ? corruptServedBlock(data) : data);
      }
    } finally {
      await reader.close();
    }
    if (stale) void this.reindex().catch(() => {});
    return { type: 'BlockData', sizes, data: Buffer.concat(parts) };
  }

  private fetcher(): BlockFetcher {
    return {
      fetch: async (via, hashes) => {
        const conn = await this.link(via);
        const t0 = performance.now();
        const reply = await conn.request({ type: 'BlockFetch', hashes: packHashes(hashes) }, { timeoutMs: this.o.requestTimeoutMs });
        this.measured?.recordTransfer(via, reply.data.byteLength, performance.now() - t0);
        if (reply.sizes.byteLength !== hashes.length * 4) throw new EmbotError(ErrorCodes.BLOCK_UNAVAILABLE, `${via} answered ${reply.sizes.byteLength / 4} sizes for ${hashes.length} blocks`);
        const sizes = Buffer.from(reply.sizes.buffer, reply.sizes.byteOffset, reply.sizes.byteLength);
        const out: (Uint8Array | undefined)[] = [];
        let o = 0;
        for (let i = 0; i < hashes.length; i++) {
          const n = sizes.readUInt32LE(i * 4);
          if (n === MISSING) {
            out.push(undefined);
            continue;
          }
          if (o + n > reply.data.byteLength) throw new EmbotError(ErrorCodes.BLOCK_UNAVAILABLE, `${via} announced more block bytes than it sent`);
          // Copied: the reply's buffer may be reused by the link once this returns.
          out.push(Buffer.from(reply.data.subarray(o, o + n)));
          o += n;
        }
        return out;
      },
    };
  }

  /**
   * Builds `image` here from its cheapest holders and indexes it.
   *
   * @throws EmbotError `EMBOT_ERR_IMAGE_UNKNOWN` when nobody holds it, `EMBOT_ERR_BLOCK_UNAVAILABLE`
   *   when some block could be fetched from no holder.
   */
  async build(image: string, onProgress?: (p: BuildProgress) => void): Promise<BuildSummary> {
    const answer = await this.query(image);
    const here = this.index.manifest(image);
    if (here && sameBlocks(here, answer.manifest)) return alreadyBuilt(answer.manifest, this.o.agent, this.costs);
    const reader = this.index.blockReader();
    const summary = await buildImage({
      manifest: answer.manifest,
      host: this.o.agent,
      out: path.join(this.o.imagesDir, image),
      local: {
        has: (h) => this.index.holds(h),
        read: async (h) => {
          const loc = this.index.locate(h);
          return loc ? reader.read(loc) : undefined;
        },
      },
      holders: (h) => answer.holders.get(h) ?? [],
      costs: this.costs,
      fetcher: this.fetcher(),
      ...(onProgress ? { onProgress } : {}),
    }).finally(() => reader.close());
    await this.reindex().catch((e: unknown) => this.o.log?.warn('images: the built image is indexed here but the indexer has not got it yet', { error: describeError(e) }));
    this.o.log?.info(`images: built ${image}`, { bytesFetched: summary.bytesFetched, bytesLocal: summary.bytesLocal, bySource: summary.bySource });
    for (const [source, bytes] of Object.entries(summary.bySource)) this.o.onFetched?.(source, bytes);
    return summary;
  }

  /** Builds `image` at another agent (ImageBuild over the peer link). */
  async buildAt(host: string, image: string): Promise<BuildSummary> {
    if (host === this.o.agent) return this.build(image);
    const conn = await this.link(host);
    const reply = await conn.request({ type: 'ImageBuild', image }, { timeoutMs: this.o.buildTimeoutMs });
    return summaryPackr.unpack(reply.summary) as BuildSummary;
  }

  /** Starts a build of `image` at `on` (this agent or a peer); poll it with getBuild. */
  startBuild(image: string, on: string): { readonly id: string } {
    if (!isImageName(image)) throw new EmbotError(ErrorCodes.IMAGE_INVALID, `${JSON.stringify(String(image).slice(0, 64))} is not an image name`);
    const id = `build-${Date.now().toString(36)}-${++this.jobSeq}`;
    const set = (patch: Partial<BuildJob>): void => void this.jobs.set(id, { ...this.jobs.get(id)!, ...patch });
    this.jobs.set(id, { id, image, on, state: 'running', startedAt: Date.now() });
    while (this.jobs.size > MAX_JOBS) this.jobs.delete(this.jobs.keys().next().value!);
    const run = on === this.o.agent ? this.build(image, (progress) => set({ progress })) : this.buildAt(on, image);
    run.then(
      (summary) => set({ state: 'done', summary }),
      (e: unknown) => set({ state: 'failed', error: { code: (e as { code?: string }).code ?? ErrorCodes.REQUEST_FAILED, message: describeError(e) } }),
    );
    return { id };
  }

  getBuild(id: string): BuildJob | undefined {
    return this.jobs.get(id);
  }

  /** The image a VM was created with (`vm create --image`), wherever it was created (see vmImageRef). */
  vmImage(vm: string): string | undefined {
    return this.vmImageRef(vm)?.image;
  }

  /**
   * The image a VM runs on and the manifest id it had when the VM was created: what the VM carries
   * (`vmImageOf`, its managed element, which travels with it to every host it moves to) before
   * what this host's store remembers of a VM created here.
   */
  vmImageRef(vm: string): VmImageRef | undefined {
    const carried = this.o.vmImageOf?.(vm);
    if (carried !== undefined) {
      if (isImageName(carried.image)) return carried;
      this.o.log?.warn(`images: VM ${vm} carries ${JSON.stringify(String(carried.image).slice(0, 64))}, not an image name; ignored`);
    }
    const get = (k: string): string | undefined => (this.o.db.prepare('SELECT value FROM meta WHERE key = ?').get(k) as { value: string } | undefined)?.value;
    const image = get(`images.vm.${vm}`);
    if (image === undefined) return undefined;
    const manifest = get(`images.vmManifest.${vm}`);
    return { image, ...(manifest === undefined ? {} : { manifest }) };
  }

  /** Forgets the image of a VM removed here (`vm remove`): a VM created again under its name starts without it. */
  forgetVm(vm: string): void {
    this.o.db.prepare('DELETE FROM meta WHERE key IN (?, ?)').run(`images.vm.${vm}`, `images.vmManifest.${vm}`);
  }

  /** Remembers a VM created here on `image`, with the manifest id this host has of it now. */
  setVmImage(vm: string, image: string): VmImageRef {
    const m = this.index.manifest(image);
    const ref: VmImageRef = { image, ...(m ? { manifest: manifestId(m) } : {}) };
    const put = this.o.db.prepare('INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value');
    this.o.db.transaction(() => {
      put.run(`images.vm.${vm}`, image);
      if (ref.manifest !== undefined) put.run(`images.vmManifest.${vm}`, ref.manifest);
      else this.o.db.prepare('DELETE FROM meta WHERE key = ?').run(`images.vmManifest.${vm}`);
    })();
    return ref;
  }

  /**
   * Builds a VM's image at `host` (a migration's first step), after checking that the group's
   * image of that name is still the one the VM was created on.
   *
   * @throws EmbotError `EMBOT_ERR_IMAGE_CHANGED` when its manifest id differs (a qcow2 overlay on
   *   other bytes would be a corrupt disk), or what `query` and `buildAt` throw.
   */
  async buildFor(host: string, ref: VmImageRef): Promise<BuildSummary> {
    if (ref.manifest !== undefined) {
      const now = manifestId((await this.query(ref.image)).manifest);
      if (now !== ref.manifest) {
        throw new EmbotError(ErrorCodes.IMAGE_CHANGED, `image ${ref.image} is not the one the VM was created on (manifest ${now.slice(0, 12)}…, the VM's ${ref.manifest.slice(0, 12)}…)`, {
          details: { image: ref.image, expected: ref.manifest, found: now },
        });
      }
    }
    return this.buildAt(host, ref.image);
  }

  /** Ranks candidate hosts (default: the group's members but this agent) for a VM of `image` by the network cost of building the image there. */
  async place(image: string, candidatesGiven: readonly string[] | undefined, policy: PlacementPolicy): Promise<PlacementReport> {
    const answer = await this.query(image);
    const candidates = candidatesGiven ?? answer.members.filter((m) => m !== this.o.agent);
    if (candidates.length === 0) throw new EmbotError(ErrorCodes.PLACEMENT_INPUT_INVALID, `no candidate hosts: name them (--candidates) or add members to ${this.o.indexer}'s index group`);
    // Links any member measured (the indexer's answer), then this host's own, then the config.
    const table = answer.links && answer.links.length > 0 ? groupMeasuredTable(answer.links, this.costs) : this.costs;
    const costs = buildCosts(distinctBlocks(answer.manifest), candidates, (h) => answer.holders.get(h) ?? [], table);
    const loads = new Map(answer.loads);
    if (!loads.has(this.o.agent)) loads.set(this.o.agent, await this.o.hostLoad());
    const ranked = rankCandidates(
      candidates.map((host) => ({ host, cpu: loads.get(host)?.cpu ?? 1, freeMemory: loads.get(host)?.freeMemory ?? 0 })),
      costs,
      policy,
    );
    return { image, policy, candidates: ranked.map((c) => ({ ...c, indexed: answer.members.includes(c.host) })) };
  }

  private link(peer: string): Promise<PeerConnection> {
    let l = this.links.get(peer);
    if (!l) {
      l = this.o.connect(peer).then((conn) => {
        conn.once('close', () => {
          if (this.links.get(peer) === l) this.links.delete(peer);
          // Our update link to the indexer closed: the indexer dropped us; send everything again.
          if (peer === this.o.indexer) {
            this.needFull = true;
            if (!this.closed) setTimeout(() => void this.reindex().catch(() => {}), 1000).unref();
          }
        });
        return conn;
      });
      this.links.set(peer, l);
      l.catch(() => {
        if (this.links.get(peer) === l) this.links.delete(peer);
      });
    }
    return l;
  }
}

function sameBlocks(a: ImageManifest, b: ImageManifest): boolean {
  return a.size === b.size && a.blockSize === b.blockSize && a.hashes.length === b.hashes.length && a.hashes.every((h, i) => h === b.hashes[i]);
}

/** The summary of a build that had nothing to do: the host holds the image, every block local. */
function alreadyBuilt(m: ImageManifest, host: string, costs: CostTable): BuildSummary {
  const distinct = distinctBlocks(m);
  let bytes = 0;
  for (const n of distinct.values()) bytes += n;
  return {
    image: m.name, host, size: m.size, blocks: m.hashes.length, distinctBlocks: distinct.size,
    bytesLocal: bytes, blocksLocal: distinct.size, bytesFetched: 0, blocksFetched: 0, bySource: {}, blocksBySource: {},
    costPaid: 0, wholeImageCost: (m.size / MIB) * costs.cost(LIBRARY_SOURCE, host), retries: [], ms: 0, alreadyThere: true,
  };
}

export function imagesDirOf(dataDir: string, configured: string | undefined): string {
  return path.resolve(configured ?? path.join(dataDir, 'images'));
}

export function libraryExists(dir: string | undefined): boolean {
  return dir !== undefined && existsSync(dir);
}
