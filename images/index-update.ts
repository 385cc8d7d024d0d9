/**
 * The index update a host sends its group's global indexer: a full index, or the change since the
 * previous update (hashes gained and lost, manifests changed, images dropped). Carried as the `body`
 * of an IndexUpdate frame, msgpack with hash lists packed as raw 32-byte hashes.
 */
import { Packr } from 'msgpackr';
import { EmbotError, ErrorCodes } from '../core/errors.ts';
import { packHashes, unpackHashes, type BlockHash } from './block-hash.ts';
import { isImageName, validateManifest, type ImageManifest } from './image-manifest.ts';
import type { Holder } from './global-index.ts';
import type { ImageOrigin, IndexDelta } from './local-index.ts';
import { LIBRARY_SOURCE } from './network-cost.ts';

/** A host's load, carried with its updates so placement can show it beside the cost. */
export interface HostLoad {
  /** CPU load, 0..1. */
  readonly cpu: number;
  /** Free memory, bytes. */
  readonly freeMemory: number;
}

export interface IndexUpdateBody extends IndexDelta {
  /** 1, 2, 3… per host since its last full update (which restarts the count at its own seq). */
  readonly seq: number;
  readonly full: boolean;
  readonly load?: HostLoad;
  /** The member's fresh measured links (images.cost.measure): cost of a MiB between it and each peer. */
  readonly links?: readonly MeasuredLink[];
}

/** One measured link as it travels: `cost` of one MiB between the sender and `peer` (ms). */
export interface MeasuredLink {
  readonly peer: string;
  readonly cost: number;
}

/** A member reports at most this many links. */
export const MAX_LINKS = 1024;

const packr = new Packr({ useRecords: false, moreTypes: false });

interface WireManifest {
  n: string;
  s: number;
  b: number;
  h: Uint8Array;
}

const wireManifest = (m: ImageManifest): WireManifest => ({ n: m.name, s: m.size, b: m.blockSize, h: packHashes(m.hashes) });

export function encodeIndexUpdate(u: IndexUpdateBody): Uint8Array {
  return packr.pack({
    seq: u.seq,
    full: u.full,
    added: packHashes(u.added),
    removed: packHashes(u.removed),
    changed: u.changed.map((c) => ({ o: c.origin, m: wireManifest(c.manifest) })),
    dropped: u.dropped.map((d) => ({ o: d.origin, n: d.name })),
    ...(u.load ? { load: [u.load.cpu, u.load.freeMemory] } : {}),
    ...(u.links && u.links.length > 0 ? { links: u.links.map((l) => [l.peer, l.cost]) } : {}),
  });
}

export function encodeManifest(m: ImageManifest): Uint8Array {
  return packr.pack(wireManifest(m));
}

/** What the global indexer answers about one image. */
export interface IndexAnswerBody {
  readonly manifest: ImageManifest;
  /** Holders of each distinct block of the manifest. */
  readonly holders: ReadonlyMap<BlockHash, readonly Holder[]>;
  /** Last load each member reported. */
  readonly loads: ReadonlyMap<string, HostLoad>;
  /** Members the indexer currently offers. */
  readonly members: readonly string[];
  /** Links the members measured: [from, to, cost of a MiB]. */
  readonly links?: readonly (readonly [string, string, number])[];
}

export function encodeIndexAnswer(a: IndexAnswerBody): Uint8Array {
  const hosts: string[] = [];
  const at = new Map<string, number>();
  const idx = (h: string): number => at.get(h) ?? (at.set(h, hosts.push(h) - 1), hosts.length - 1);
  const holders: number[][] = [];
  const order: BlockHash[] = [];
  for (const [h, list] of a.holders) {
    order.push(h);
    holders.push(list.map((x) => idx(x.via) * 2 + (x.source === x.via ? 0 : 1)));
  }
  return packr.pack({ m: wireManifest(a.manifest), v: hosts, o: packHashes(order), h: holders, l: [...a.loads].map(([host, l]) => [host, l.cpu, l.freeMemory]), mem: a.members, ...(a.links && a.links.length > 0 ? { k: a.links } : {}) });
}

/** @throws EmbotError `EMBOT_ERR_IMAGE_INVALID` when the answer is not one. */
export function decodeIndexAnswer(bytes: Uint8Array): IndexAnswerBody {
  const bad = (why: string): never => {
    throw new EmbotError(ErrorCodes.IMAGE_INVALID, `index answer ${why}`);
  };
  let v: unknown;
  try {
    v = packr.unpack(bytes);
  } catch {
    return bad('is not msgpack');
  }
  if (!isMap(v) || !Array.isArray(v.v) || !Array.isArray(v.h) || !Array.isArray(v.l) || !Array.isArray(v.mem) || !(v.o instanceof Uint8Array)) return bad('must be {m, v, o, h, l, mem}');
  const manifest = decodeManifest(v.m);
  const hosts = v.v as unknown[];
  if (!hosts.every((h) => typeof h === 'string')) return bad('.v must be host names');
  const rows = v.h as unknown[];
  const order = unpackHashes(v.o) ?? bad('.o must be raw hashes');
  if (order.length !== rows.length) return bad('.o and .h differ in length');
  const holders = new Map<BlockHash, Holder[]>();
  order.forEach((h, i) => {
    const list = rows[i];
    if (!Array.isArray(list)) return bad('.h[] must be arrays');
    holders.set(
      h,
      list.map((n: unknown) => {
        if (typeof n !== 'number' || !Number.isInteger(n) || n < 0 || n >= hosts.length * 2) return bad('.h[] holds a bad host index');
        const via = hosts[n >> 1] as string;
        return { via, source: n & 1 ? LIBRARY_SOURCE : via };
      }),
    );
  });
  const loads = new Map<string, HostLoad>();
  for (const row of v.l as unknown[]) {
    if (!Array.isArray(row) || typeof row[0] !== 'string' || typeof row[1] !== 'number' || typeof row[2] !== 'number') return bad('.l must be [host, cpu, freeMemory] rows');
    loads.set(row[0], { cpu: row[1], freeMemory: row[2] });
  }
  let links: [string, string, number][] | undefined;
  if (v.k !== undefined) {
    if (!Array.isArray(v.k) || !v.k.every((r: unknown) => Array.isArray(r) && typeof r[0] === 'string' && typeof r[1] === 'string' && isCost(r[2]))) return bad('.k must be [from, to, cost] rows with a non-negative cost');
    links = v.k as [string, string, number][];
  }
  return { manifest, holders, loads, members: (v.mem as unknown[]).filter((x): x is string => typeof x === 'string'), ...(links ? { links } : {}) };
}

function refused(why: string, cause?: unknown): never {
  throw new EmbotError(ErrorCodes.INDEX_UPDATE_REFUSED, `index update ${why}`, cause === undefined ? undefined : { cause });
}

function isCost(v: unknown): v is number {
  return typeof v === 'number' && Number.isFinite(v) && v >= 0;
}

function isMap(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v) && !(v instanceof Uint8Array);
}

function hashList(v: unknown, what: string): BlockHash[] {
  const list = v instanceof Uint8Array ? unpackHashes(v) : undefined;
  return list ?? refused(`.${what} must be raw 32-byte hashes`);
}

function origin(v: unknown): ImageOrigin {
  return v === 'local' || v === 'library' ? v : refused('origin must be local or library');
}

/** Decodes a manifest in its wire form; throws `EMBOT_ERR_IMAGE_INVALID` when it is not one. */
export function decodeManifest(v: unknown): ImageManifest {
  if (!isMap(v)) return validateManifest(undefined);
  const hashes = v.h instanceof Uint8Array ? unpackHashes(v.h) : undefined;
  return validateManifest({ name: v.n, size: v.s, blockSize: v.b, hashes });
}

/**
 * Decodes and checks an update from a peer.
 *
 * @throws EmbotError `EMBOT_ERR_INDEX_UPDATE_REFUSED` when it is not msgpack or not the shape above
 *   (a manifest inside that is not valid says why in its cause).
 */
export function decodeIndexUpdate(bytes: Uint8Array): IndexUpdateBody {
  let v: unknown;
  try {
    v = packr.unpack(bytes);
  } catch (e) {
    return refused('is not msgpack', e);
  }
  if (!isMap(v)) return refused('must be a map');
  if (typeof v.seq !== 'number' || !Number.isSafeInteger(v.seq) || v.seq < 1) return refused('.seq must be a positive integer');
  if (typeof v.full !== 'boolean') return refused('.full must be a boolean');
  if (!Array.isArray(v.changed) || !Array.isArray(v.dropped)) return refused('.changed and .dropped must be arrays');
  const changed = v.changed.map((c: unknown) => {
    if (!isMap(c)) return refused('.changed[] must be maps');
    try {
      return { origin: origin(c.o), manifest: decodeManifest(c.m) };
    } catch (e) {
      return refused(`.changed[]: ${(e as Error).message}`, e);
    }
  });
  const dropped = v.dropped.map((d: unknown) => {
    if (!isMap(d) || !isImageName(d.n)) return refused('.dropped[] must be {o, n} with an image name');
    return { origin: origin(d.o), name: d.n };
  });
  let load: HostLoad | undefined;
  if (v.load !== undefined) {
    const l = v.load;
    if (!Array.isArray(l) || l.length !== 2 || !l.every((x) => typeof x === 'number' && Number.isFinite(x) && x >= 0)) return refused('.load must be [cpu, freeMemory], non-negative numbers');
    load = { cpu: l[0] as number, freeMemory: l[1] as number };
  }
  let links: MeasuredLink[] | undefined;
  if (v.links !== undefined) {
    const l = v.links;
    if (!Array.isArray(l) || l.length > MAX_LINKS || !l.every((r: unknown) => Array.isArray(r) && r.length === 2 && typeof r[0] === 'string' && r[0].length > 0 && r[0].length <= 64 && isCost(r[1]))) {
      return refused(`.links must be at most ${MAX_LINKS} [peer, cost] rows, a peer name and a non-negative finite cost`);
    }
    links = (l as [string, number][]).map(([peer, cost]) => ({ peer, cost }));
  }
  return { seq: v.seq, full: v.full, added: hashList(v.added, 'added'), removed: hashList(v.removed, 'removed'), changed, dropped, ...(load ? { load } : {}), ...(links ? { links } : {}) };
}
