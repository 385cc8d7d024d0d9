/**
 * The index update a host sends its group's global indexer: a full index, or the change since the
 * previous update (hashes gained and lost, manifests changed, images dropped). Carried as the `body`
 * of an IndexUpdate frame, msgpack with hash lists packed as raw 32-byte hashes.
 */
import { Packr } from 'msgpackr';
import { EmbotError, ErrorCodes } from '../core/errors.ts';
import { packHashes, unpackHashes, type BlockHash } from './block-hash.ts';
import { isImageName, validateManifest, type ImageManifest } from './image-manifest.ts';
import type { ImageOrigin, IndexDelta } from './local-index.ts';

export interface IndexUpdateBody extends IndexDelta {
  /** 1, 2, 3… per host since its last full update (which restarts the count at its own seq). */
  readonly seq: number;
  readonly full: boolean;
}

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
  });
}

export function encodeManifest(m: ImageManifest): Uint8Array {
  return packr.pack(wireManifest(m));
}

function refused(why: string, cause?: unknown): never {
  throw new EmbotError(ErrorCodes.INDEX_UPDATE_REFUSED, `index update ${why}`, cause === undefined ? undefined : { cause });
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
  return { seq: v.seq, full: v.full, added: hashList(v.added, 'added'), removed: hashList(v.removed, 'removed'), changed, dropped };
}
