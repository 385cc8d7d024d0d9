/**
 * The fleet directory on etcd: this agent's record under `<prefix>/agents/<name>` on a lease kept
 * alive, and a watch of that folder so peers appear and leave while the agent runs. Static peers
 * from config stay and win over a record of the same name.
 *
 * Failure model (README "Fleet directory (etcd)"): etcd unreachable (at start or later) leaves the
 * peers last known in place, marks the directory `unavailable` with a coded warning and retries
 * with back-off; a reconnect re-publishes the record and re-lists the folder, so peers that left
 * meanwhile go then. Each attempt uses a fresh client, so no half-broken stream outlives it.
 */
// Types only: etcd3 (gRPC, protobufjs) is loaded when a directory first connects, so an agent with a static directory never pays for it.
import type { Etcd3, IKeyValue, Lease, Watcher } from 'etcd3';
import { describeError, ErrorCodes } from '../errors.ts';
import type { Logger } from '../logger.ts';
import type { PeerMap } from '../wire/peers.ts';
import { agentsPrefix, checkRecord, encodeRecord, recordKey } from './directory-record.ts';
import { PeerDirectoryView, type DirectoryState, type DirectoryStatus, type PeerChange, type PeerDirectory, type PeerEntry, type SelfAnnouncement } from './peer-directory.ts';

export interface EtcdPeerDirectoryOptions {
  /** This agent's name: its own record is not a peer. */
  readonly self: string;
  /** etcd client URLs (`http://127.0.0.1:2379`). */
  readonly endpoints: readonly string[];
  /** Key prefix of this fleet (`/embot`); records live under `<prefix>/agents/`. */
  readonly prefix: string;
  /** Lease TTL of this agent's record: how long a SIGKILLed agent stays listed. */
  readonly ttlSeconds: number;
  /** Whether this agent's peer links are TLS (`peer.tls`): a record's URL must then be wss://, else ws:// on loopback. */
  readonly tls: boolean;
  /** Peers from config; they win over etcd records of the same name. */
  readonly staticPeers: PeerMap;
  /** What this agent's record says about it. */
  readonly version: string;
  readonly startedAt: number;
  readonly log: Logger;
  /** Back-off between attempts to reach etcd, doubling from `minMs` to `maxMs` (default 250 ms .. 5 s). */
  readonly retry?: { readonly minMs: number; readonly maxMs: number };
}

/** One unary etcd call may take this long before the attempt counts as failed (etcd down answers nothing). */
const CALL_TIMEOUT_MS = 3000;
/** A revoke at stop is best effort: a dead etcd must not hold the agent's shutdown. */
const REVOKE_TIMEOUT_MS = 2000;

/** One connection attempt and what it set up; `dead` once it failed or the directory closed. */
interface Session {
  readonly client: Etcd3;
  lease: Lease | undefined;
  watcher: Watcher | undefined;
  leaseOk: boolean;
  watchOk: boolean;
  dead: boolean;
}

/**
 * @example
 * ```ts
 * const dir = new EtcdPeerDirectory({ self: 'a', endpoints: ['http://127.0.0.1:2379'], prefix: '/embot', ttlSeconds: 10, tls: false,
 *   staticPeers: new Map(), version: '0.1.0', startedAt: Date.now(), log });
 * dir.start({ url: 'ws://127.0.0.1:7401/' });
 * dir.on('change', (c) => console.log(c.name, c.url ?? 'left'));
 * await dir.close(); // revokes the lease: the others see `a` leave at once
 * ```
 */
export class EtcdPeerDirectory extends PeerDirectoryView implements PeerDirectory {
  readonly kind = 'etcd';
  private state: DirectoryState = 'connecting';
  private lastError: { readonly code: string; readonly message: string } | undefined;
  private readonly fromEtcd = new Map<string, string>();
  private readonly shadowed = new Set<string>();
  private self: SelfAnnouncement | undefined;
  private session: Session | undefined;
  private started = false;
  private closed = false;
  private attempt = 0;
  private retryTimer: NodeJS.Timeout | undefined;
  private readonly folder: string;

  constructor(private readonly o: EtcdPeerDirectoryOptions) {
    super();
    this.folder = agentsPrefix(o.prefix);
    for (const [name, url] of o.staticPeers) this.current.set(name, url);
  }

  readonly start = (self: SelfAnnouncement | undefined): void => {
    if (this.started || this.closed) return;
    this.started = true;
    this.self = self;
    void this.connect().catch((e: unknown) => this.unavailable(e));
  };

  list(): readonly PeerEntry[] {
    return [...this.current].map(([name, url]) => ({ name, url, source: this.o.staticPeers.has(name) ? ('config' as const) : ('etcd' as const) }));
  }

  status(): DirectoryStatus {
    return { kind: 'etcd', state: this.state, peers: this.list(), ...(this.lastError ? { lastError: this.lastError } : {}) };
  }

  override on(event: 'change', listener: (change: PeerChange) => void): this {
    return super.on(event, listener);
  }

  override off(event: 'change', listener: (change: PeerChange) => void): this {
    return super.off(event, listener);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.retryTimer);
    const s = this.session;
    this.session = undefined;
    this.state = 'closed';
    if (!s) return;
    s.dead = true;
    // Revoked, not left to expire: the other agents see this one leave now, not a TTL later.
    if (s.lease && s.leaseOk) await withTimeout(s.lease.revoke(), REVOKE_TIMEOUT_MS).catch((e: unknown) => this.o.log.debug('directory: lease not revoked', { error: describeError(e) }));
    await teardown(s);
  }

  private async connect(): Promise<void> {
    const [{ Etcd3 }, { ExponentialBackoff, noop }] = await Promise.all([import('etcd3'), import('cockatiel')]);
    if (this.closed) return;
    const client = new Etcd3({
      hosts: [...this.o.endpoints],
      dialTimeout: CALL_TIMEOUT_MS,
      // Our own loop retries (a fresh session with back-off); the library's retries and 5 s circuit
      // breaker would only delay seeing etcd come back. The watch stream's own reconnect stays, short.
      faultHandling: { host: () => noop, global: noop, watchBackoff: new ExponentialBackoff({ initialDelay: 100, maxDelay: 1000 }).next() },
      defaultCallOptions: (ctx) => (ctx.isStream ? {} : { deadline: Date.now() + CALL_TIMEOUT_MS }),
    });
    const s: Session = { client, lease: undefined, watcher: undefined, leaseOk: true, watchOk: false, dead: false };
    this.session = s;
    try {
      if (this.self) {
        const lease = client.lease(this.o.ttlSeconds);
        s.lease = lease;
        s.leaseOk = false;
        lease.on('lost', (e) => this.failed(s, e));
        lease.on('keepaliveFailed', (e) => this.health(s, 'lease', false, e));
        lease.on('keepaliveSucceeded', () => this.health(s, 'lease', true));
        const record = { name: this.o.self, url: this.self.url, version: this.o.version, startedAt: this.o.startedAt };
        await lease.put(recordKey(this.o.prefix, this.o.self)).value(encodeRecord(record));
        s.leaseOk = true;
      }
      const listed = await client.getAll().prefix(this.folder).exec();
      if (s.dead) return;
      this.replaceAll(listed.kvs);
      // From the revision listed on, so nothing written between the list and the watch is missed.
      const watcher = await client.watch().prefix(this.folder).startRevision((BigInt(listed.header.revision) + 1n).toString()).create();
      s.watcher = watcher;
      if (s.dead) {
        await teardown(s);
        return;
      }
      watcher.on('put', (kv) => this.put(kv));
      watcher.on('delete', (kv) => this.remove(kv));
      watcher.on('disconnected', (e) => this.health(s, 'watch', false, e));
      watcher.on('connected', () => this.health(s, 'watch', true));
      watcher.on('error', (e) => this.failed(s, e));
      s.watchOk = true;
      this.attempt = 0;
      this.health(s, 'watch', true);
    } catch (e) {
      this.failed(s, e);
    }
  }

  /** One side of a live session (lease keep-alive, watch stream) lost or regained etcd. */
  private health(s: Session, side: 'lease' | 'watch', ok: boolean, error?: unknown): void {
    if (s.dead || this.session !== s) return;
    if (side === 'lease') s.leaseOk = ok;
    else s.watchOk = ok;
    if (s.leaseOk && s.watchOk) {
      if (this.state !== 'connected') this.o.log.info(`directory: connected to etcd (${this.o.endpoints.join(',')}), ${this.fromEtcd.size} peer record(s)`);
      this.state = 'connected';
      this.lastError = undefined;
    } else if (!ok) this.unavailable(error);
  }

  /** The session cannot go on (etcd down at connect, lease lost, watch cancelled): a fresh one later. */
  private failed(s: Session, error: unknown): void {
    if (s.dead || this.closed) return;
    s.dead = true;
    if (this.session === s) this.session = undefined;
    void teardown(s);
    this.unavailable(error);
    const retry = this.o.retry ?? { minMs: 250, maxMs: 5000 };
    const delay = Math.min(retry.maxMs, retry.minMs * 2 ** Math.min(this.attempt, 16));
    this.attempt++;
    this.retryTimer = setTimeout(() => void this.connect().catch((e: unknown) => this.unavailable(e)), delay);
    this.retryTimer.unref();
  }

  private unavailable(error: unknown): void {
    const message = `etcd ${this.o.endpoints.join(',')} unreachable: ${describeError(error)}; using the ${this.current.size} peer(s) known, retrying`;
    // Once per outage: a down etcd is retried every few seconds and must not flood the log.
    if (this.state !== 'unavailable') this.o.log.warn(`directory: ${message}`, { code: ErrorCodes.DIRECTORY_UNAVAILABLE, endpoints: this.o.endpoints });
    this.state = 'unavailable';
    this.lastError = { code: ErrorCodes.DIRECTORY_UNAVAILABLE, message };
  }

  private replaceAll(kvs: readonly IKeyValue[]): void {
    const seen = new Set<string>();
    for (const kv of kvs) {
      const name = this.put(kv);
      if (name !== undefined) seen.add(name);
    }
    for (const name of [...this.fromEtcd.keys()]) if (!seen.has(name)) this.drop(name);
  }

  /** A record written: a peer appears or moves, or a bad record is reported and ignored. Returns its name when it is a peer's record. */
  private put(kv: IKeyValue): string | undefined {
    const key = kv.key.toString();
    const check = checkRecord(this.o.prefix, key, kv.value.toString(), { tls: this.o.tls });
    if (!check.ok) {
      this.o.log.warn(`directory: ignored record ${key}: ${check.reason}`, { code: ErrorCodes.DIRECTORY_RECORD_INVALID, key, reason: check.reason });
      // The last good record of that name (if any) stays: a bad write does not take a peer away.
      return check.name !== undefined && this.fromEtcd.has(check.name) ? check.name : undefined;
    }
    const { name, url } = check.record;
    if (name === this.o.self) return undefined;
    this.fromEtcd.set(name, url);
    if (this.o.staticPeers.has(name)) {
      if (!this.shadowed.has(name)) {
        this.shadowed.add(name);
        this.o.log.info(`directory: peer ${name} is in config (${this.o.staticPeers.get(name)}); its etcd record (${url}) is not used`);
      }
      return name;
    }
    const before = this.current.get(name);
    if (before !== url) {
      this.o.log.info(before === undefined ? `directory: peer ${name} joined (${url})` : `directory: peer ${name} moved to ${url}`, { peer: name, url });
      this.current.set(name, url);
      this.emit('change', { name, url, source: 'etcd' } satisfies PeerChange);
    }
    return name;
  }

  private remove(kv: IKeyValue): void {
    const key = kv.key.toString();
    if (key.startsWith(this.folder)) this.drop(key.slice(this.folder.length));
  }

  private drop(name: string): void {
    if (!this.fromEtcd.delete(name) || this.o.staticPeers.has(name)) return;
    this.current.delete(name);
    this.o.log.info(`directory: peer ${name} left`, { peer: name });
    this.emit('change', { name, url: undefined, source: 'etcd' } satisfies PeerChange);
  }
}

async function teardown(s: Session): Promise<void> {
  s.lease?.release();
  await s.watcher?.cancel().catch(() => {});
  s.client.close();
}

function withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([p, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`no answer in ${ms} ms`)), ms)))]).finally(() => clearTimeout(timer));
}
