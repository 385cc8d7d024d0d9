/**
 * The fleet directory contract: who this agent's peers are, by name. Today's static map from config
 * and tomorrow's etcd-backed view implement the same interface (nats.js style: the interface is
 * public in core/index.ts, the implementations are internal), so mobility, images, the dashboard
 * and the control API read one live `ReadonlyMap<string, string>` and never ask where it came from.
 */
import { EventEmitter } from 'node:events';

/** Where a peer's URL came from: the agent's config (`peer.peers`, `--peers`) or an etcd record. */
export const PEER_SOURCES = ['config', 'etcd'] as const;
export type PeerSource = (typeof PEER_SOURCES)[number];

export interface PeerEntry {
  readonly name: string;
  /** Normalized ws:// or wss:// URL. */
  readonly url: string;
  readonly source: PeerSource;
}

/**
 * `static`: the config map, nothing to connect to. `connecting`: etcd not reached yet (first try).
 * `connected`: registered and watching. `conflict`: watching, but another live agent's record holds
 * this agent's name, so this one is not registered (it claims the name once that record goes).
 * `unavailable`: etcd unreachable; the peers last known stay usable and it is retried with
 * back-off. `closed`: after `close()`.
 */
export const DIRECTORY_STATES = ['static', 'connecting', 'connected', 'conflict', 'unavailable', 'closed'] as const;
export type DirectoryState = (typeof DIRECTORY_STATES)[number];

export interface DirectoryStatus {
  readonly kind: 'static' | 'etcd';
  readonly state: DirectoryState;
  readonly peers: readonly PeerEntry[];
  /** The last failure to reach the directory (etcd), coded; absent while all is well. */
  readonly lastError?: { readonly code: string; readonly message: string };
}

/** One change of the live view: `url` undefined means the peer left. */
export interface PeerChange {
  readonly name: string;
  readonly url: string | undefined;
  readonly source: PeerSource;
}

/** What this agent tells a registering directory about itself once its peer endpoint listens. */
export interface SelfAnnouncement {
  /** This agent's own peer URL (ws:// or wss://), the one other agents dial. */
  readonly url: string;
}

/**
 * A live, read-only name → URL view of the fleet, shaped like the `PeerMap` it replaces. Consumers
 * that resolve a name at the time they need it (mobility's `migrate --to`) see peers that appeared
 * after start; consumers that copy the keys once (warm connections) do not.
 */
export interface PeerDirectory extends ReadonlyMap<string, string> {
  readonly kind: 'static' | 'etcd';
  /** Every peer with where it came from, config order first. */
  list(): readonly PeerEntry[];
  status(): DirectoryStatus;
  on(event: 'change', listener: (change: PeerChange) => void): this;
  off(event: 'change', listener: (change: PeerChange) => void): this;
  /**
   * Optional capability of a directory that lives somewhere else (etcd): connect, watch, and publish
   * this agent (`self`; undefined when it has no peer endpoint, so nobody could dial it). Returns at
   * once: the connection is made, and retried, in the background. A static directory has no such
   * method: it has nothing to connect to and nobody would read what it published.
   */
  readonly start?: (self: SelfAnnouncement | undefined) => void;
  /** Stops watching and withdraws this agent's own record (etcd: the lease is revoked). */
  close(): Promise<void>;
}

/** The read-only map part every directory shares: a view over `current`, which the subclass keeps up to date. */
export abstract class PeerDirectoryView extends EventEmitter implements ReadonlyMap<string, string> {
  protected readonly current = new Map<string, string>();

  get size(): number {
    return this.current.size;
  }
  get(name: string): string | undefined {
    return this.current.get(name);
  }
  has(name: string): boolean {
    return this.current.has(name);
  }
  keys(): MapIterator<string> {
    return this.current.keys();
  }
  values(): MapIterator<string> {
    return this.current.values();
  }
  entries(): MapIterator<[string, string]> {
    return this.current.entries();
  }
  forEach(fn: (url: string, name: string, map: ReadonlyMap<string, string>) => void, thisArg?: unknown): void {
    for (const [name, url] of this.current) fn.call(thisArg, url, name, this);
  }
  [Symbol.iterator](): MapIterator<[string, string]> {
    return this.current.entries();
  }
}
