/**
 * The group's global indexer (the document's global IBI): every member host's index and the
 * library's, consolidated in memory from the members' incremental updates. A host that disappears
 * (its update link closes) is dropped and stops being offered as a holder; it sends its whole
 * index again when it comes back, so nothing here needs to survive a restart.
 */
import { EmbotError, ErrorCodes } from '../core/errors.ts';
import type { BlockHash } from './block-hash.ts';
import type { IndexUpdateBody } from './index-update.ts';
import type { ImageManifest } from './image-manifest.ts';
import { LIBRARY_SOURCE } from './network-cost.ts';

/** Where a block can be fetched: a host's own images, or the library that host serves. */
export interface Holder {
  /** The source as the cost table names it: the host, or `library`. */
  readonly source: string;
  /** The agent to ask. */
  readonly via: string;
}

interface HostEntry {
  seq: number;
  readonly images: Map<string, ImageManifest>;
  readonly library: Map<string, ImageManifest>;
  readonly hashes: Set<BlockHash>;
  /** Blocks of the host's own images by hash. */
  readonly own: Map<BlockHash, number>;
  /** Blocks of the library it serves by hash. The rest of `hashes` is in its running VMs' disks. */
  readonly lib: Map<BlockHash, number>;
}

export class GlobalImageIndex {
  private readonly hosts = new Map<string, HostEntry>();
  /** hash → hosts that hold it (own images or library). */
  private readonly holdersOf = new Map<BlockHash, Set<string>>();

  /** Member hosts currently indexed. */
  get members(): string[] {
    return [...this.hosts.keys()].sort();
  }

  /**
   * Applies one host's update. A full update replaces what the host had; an incremental one must
   * follow the last applied sequence number.
   *
   * @throws EmbotError `EMBOT_ERR_INDEX_UPDATE_REFUSED` for an incremental update out of sequence
   *   (the host then sends a full one).
   */
  apply(host: string, u: IndexUpdateBody): void {
    let entry = this.hosts.get(host);
    if (!u.full) {
      if (!entry) throw new EmbotError(ErrorCodes.INDEX_UPDATE_REFUSED, `incremental index update ${u.seq} from ${host}, which has sent no full index yet`, { details: { expected: 'full' } });
      if (u.seq !== entry.seq + 1) throw new EmbotError(ErrorCodes.INDEX_UPDATE_REFUSED, `index update ${u.seq} from ${host} out of sequence (expected ${entry.seq + 1})`, { details: { expected: entry.seq + 1 } });
    } else if (entry) {
      this.dropHost(host);
      entry = undefined;
    }
    entry ??= { seq: 0, images: new Map(), library: new Map(), hashes: new Set(), own: new Map(), lib: new Map() };
    this.hosts.set(host, entry);
    entry.seq = u.seq;
    const e = entry;
    const set = (images: Map<string, ImageManifest>, counts: Map<BlockHash, number>, name: string, m: ImageManifest | undefined): void => {
      const old = images.get(name);
      for (const h of old?.hashes ?? []) {
        const n = counts.get(h)!;
        if (n <= 1) counts.delete(h);
        else counts.set(h, n - 1);
      }
      if (m) {
        images.set(name, m);
        for (const h of m.hashes) counts.set(h, (counts.get(h) ?? 0) + 1);
      } else images.delete(name);
    };
    for (const d of u.dropped) {
      if (d.origin === 'library') set(e.library, e.lib, d.name, undefined);
      else set(e.images, e.own, d.name, undefined);
    }
    for (const c of u.changed) {
      if (c.origin === 'library') set(e.library, e.lib, c.manifest.name, c.manifest);
      else set(e.images, e.own, c.manifest.name, c.manifest);
    }
    for (const h of u.removed) {
      entry.hashes.delete(h);
      const set = this.holdersOf.get(h);
      set?.delete(host);
      if (set?.size === 0) this.holdersOf.delete(h);
    }
    for (const h of u.added) {
      entry.hashes.add(h);
      let set = this.holdersOf.get(h);
      if (!set) this.holdersOf.set(h, (set = new Set()));
      set.add(host);
    }
  }

  /** Forgets a host: it is no longer offered as a holder. */
  dropHost(host: string): boolean {
    const entry = this.hosts.get(host);
    if (!entry) return false;
    for (const h of entry.hashes) {
      const set = this.holdersOf.get(h);
      set?.delete(host);
      if (set?.size === 0) this.holdersOf.delete(h);
    }
    this.hosts.delete(host);
    return true;
  }

  /**
   * Who can serve a block: a host that has it only in the library it serves as `library` via that
   * host, any other holder (its own images, its running VMs' disks) as itself.
   */
  holders(hash: BlockHash): Holder[] {
    const out: Holder[] = [];
    for (const host of this.holdersOf.get(hash) ?? []) {
      const e = this.hosts.get(host)!;
      if (!e.own.has(hash) && e.lib.has(hash)) out.push({ source: LIBRARY_SOURCE, via: host });
      else out.push({ source: host, via: host });
    }
    return out;
  }

  /** The manifest of an image by name: the library's first, else any host's. */
  manifest(name: string): ImageManifest | undefined {
    for (const e of this.hosts.values()) {
      const m = e.library.get(name);
      if (m) return m;
    }
    for (const e of this.hosts.values()) {
      const m = e.images.get(name);
      if (m) return m;
    }
    return undefined;
  }

  /** Every image name known, with the hosts that hold it and whether the library has it. */
  catalogue(): { name: string; size: number; hosts: string[]; library: boolean }[] {
    const out = new Map<string, { name: string; size: number; hosts: string[]; library: boolean }>();
    for (const [host, e] of this.hosts) {
      for (const m of e.images.values()) {
        const row = out.get(m.name) ?? { name: m.name, size: m.size, hosts: [], library: false };
        row.hosts.push(host);
        out.set(m.name, row);
      }
      for (const m of e.library.values()) {
        const row = out.get(m.name) ?? { name: m.name, size: m.size, hosts: [], library: false };
        row.library = true;
        out.set(m.name, row);
      }
    }
    return [...out.values()].sort((a, b) => a.name.localeCompare(b.name));
  }
}
