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
import { readFileSync, writeFileSync } from 'node:fs';
import { describeError, ErrorCodes } from '../errors.ts';
import type { Logger } from '../logger.ts';
import type { PeerMap } from '../wire/peers.ts';
import type { EtcdClientCredentials } from './etcd-client-credentials.ts';
import { agentsPrefix, checkRecord, encodeRecord, recordKey, type DirectoryRecord } from './directory-record.ts';
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
  /**
   * Where the id of the lease this agent's record is written on is kept, so that after a SIGKILL
   * and a restart inside the old lease's TTL the agent knows the record it finds as its own (its
   * port may have changed). None: only a record with this agent's own URL counts as its own.
   */
  readonly leaseFile?: string;
  /** TLS to etcd (README "Fleet directory (etcd)": `directory.tls`). */
  readonly credentials?: EtcdClientCredentials['credentials'];
  /** etcd user/password (`directory.auth`). */
  readonly auth?: EtcdClientCredentials['auth'];
  /** Back-off between attempts to reach etcd, doubling from `minMs` to `maxMs` (default 250 ms .. 5 s). */
  readonly retry?: { readonly minMs: number; readonly maxMs: number };
}

/** Lease ids kept in the lease file: more than the leases one record can outlive (one per outage inside a TTL). */
const LEASES_KEPT = 8;
/** One unary etcd call may take this long before the attempt counts as failed (etcd down answers nothing). */
const CALL_TIMEOUT_MS = 3000;
/** A revoke at stop is best effort: a dead etcd must not hold the agent's shutdown. */
const REVOKE_TIMEOUT_MS = 2000;

/** One connection attempt and what it set up; `dead` once it failed or the directory closed. */
interface Session {
  readonly client: Etcd3;
  lease: Lease | undefined;
  /** The granted lease's id: a record on it is this session's own. */
  leaseId: string | undefined;
  watcher: Watcher | undefined;
  leaseOk: boolean;
  watchOk: boolean;
  /** The record that holds this agent's name instead of its own (another live agent's), while it does. */
  nameHeldBy: DirectoryRecord | undefined;
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
  private leasesKnown: Set<string> | undefined;

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
      ...(this.o.credentials ? { credentials: { ...this.o.credentials } } : {}),
      ...(this.o.auth ? { auth: { ...this.o.auth, callOptions: () => ({ deadline: Date.now() + CALL_TIMEOUT_MS }) } } : {}),
      dialTimeout: CALL_TIMEOUT_MS,
      // Our own loop retries (a fresh session with back-off); the library's retries and 5 s circuit
      // breaker would only delay seeing etcd come back. The watch stream's own reconnect stays, short.
      faultHandling: { host: () => noop, global: noop, watchBackoff: new ExponentialBackoff({ initialDelay: 100, maxDelay: 1000 }).next() },
      defaultCallOptions: (ctx) => (ctx.isStream ? {} : { deadline: Date.now() + CALL_TIMEOUT_MS }),
    });
    const s: Session = { client, lease: undefined, leaseId: undefined, watcher: undefined, leaseOk: true, watchOk: false, nameHeldBy: undefined, dead: false };
    this.session = s;
    try {
      if (this.self) {
        const lease = client.lease(this.o.ttlSeconds);
        s.lease = lease;
        s.leaseOk = false;
        lease.on('lost', (e) => this.failed(s, e));
        lease.on('keepaliveFailed', (e) => this.health(s, 'lease', false, e));
        lease.on('keepaliveSucceeded', () => this.health(s, 'lease', true));
        s.leaseId = await lease.grant();
        this.keepLeaseId(s.leaseId);
        await this.claim(s);
        s.leaseOk = true;
      }
      const listed = await client.getAll().prefix(this.folder).exec();
      if (s.dead) return;
      this.replaceAll(listed.kvs);
      // The holder's record went between the claim and this list: the watch (from after the list) will not say so.
      if (s.nameHeldBy !== undefined && !listed.kvs.some((kv) => this.isOwnKey(kv))) await this.claim(s);
      // From the revision listed on, so nothing written between the list and the watch is missed.
      const watcher = await client.watch().prefix(this.folder).startRevision((BigInt(listed.header.revision) + 1n).toString()).create();
      s.watcher = watcher;
      if (s.dead) {
        await teardown(s);
        return;
      }
      watcher.on('put', (kv) => (this.isOwnKey(kv) ? this.ownRecordWritten(s, kv) : this.put(kv)));
      watcher.on('delete', (kv) => (this.isOwnKey(kv) ? this.ownRecordDeleted(s) : this.remove(kv)));
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
      if (s.nameHeldBy !== undefined) return this.conflict(s.nameHeldBy);
      if (this.state !== 'connected') this.o.log.info(`directory: connected to etcd (${this.o.endpoints.join(',')}), ${this.fromEtcd.size} peer record(s)`);
      this.state = 'connected';
      this.lastError = undefined;
    } else if (!ok) this.unavailable(error);
  }

  /**
   * Writes this agent's record unless another live agent's holds the name. A record of the name on
   * a lease this agent made (its lease file: a SIGKILL and restart inside the old lease's TTL, a
   * session lost to an outage) is its own from before, and so is one with this agent's URL (nobody
   * else can listen on that endpoint while this agent does): it is replaced. So is a record of the
   * name that is not one. Every write is conditional on what was read, so two agents starting with
   * one name at once cannot both win.
   */
  private async claim(s: Session): Promise<void> {
    const self = this.self;
    if (self === undefined || s.leaseId === undefined) return;
    const key = recordKey(this.o.prefix, this.o.self);
    const value = encodeRecord({ name: this.o.self, url: self.url, version: this.o.version, startedAt: this.o.startedAt });
    const put = () => s.client.put(key).value(value).lease(s.leaseId!);
    for (let tries = 0; tries < 5 && !s.dead; tries++) {
      const created = await s.client.if(key, 'Create', '==', 0).then(put()).else(s.client.get(key)).commit();
      if (created.succeeded) return this.claimed(s);
      const held = created.responses[0]?.response_range?.kvs[0];
      if (held === undefined) continue; // gone between the compare and the read: try again
      if (held.lease === s.leaseId) return this.claimed(s);
      const holder = this.otherHolder(s, held);
      if (holder !== undefined) return this.nameHeld(s, holder);
      const replaced = await s.client.if(key, 'Mod', '==', held.mod_revision).then(put()).commit();
      if (replaced.succeeded) return this.claimed(s);
    }
    if (!s.dead) throw new Error(`the record ${key} kept changing while this agent wrote its own`);
  }

  /** The live agent other than this one whose record `kv` (of this agent's key) is; undefined when it is this agent's own (its lease now or before, its URL) or no record. */
  private otherHolder(s: Session, kv: IKeyValue): DirectoryRecord | undefined {
    if (kv.lease === s.leaseId || this.ownLeases().has(kv.lease)) return undefined;
    const check = checkRecord(this.o.prefix, kv.key.toString(), kv.value.toString(), { tls: this.o.tls });
    return check.ok && check.record.url !== this.self?.url ? check.record : undefined;
  }

  private nameHeld(s: Session, holder: DirectoryRecord): void {
    s.nameHeldBy = holder;
    if (s.leaseOk && s.watchOk) this.conflict(holder);
  }

  /** The leases this agent wrote its record on, from the lease file (its runs before) and this run. */
  private ownLeases(): Set<string> {
    if (this.leasesKnown === undefined) {
      this.leasesKnown = new Set();
      if (this.o.leaseFile !== undefined) {
        try {
          for (const id of readFileSync(this.o.leaseFile, 'utf8').split('\n')) if (/^\d+$/.test(id)) this.leasesKnown.add(id);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'ENOENT') this.o.log.warn(`directory: ${this.o.leaseFile} not read: ${describeError(e)}`);
        }
      }
    }
    return this.leasesKnown;
  }

  /** Remembers a granted lease (here and in the lease file, the last few) before a record goes on it. */
  private keepLeaseId(id: string): void {
    const known = this.ownLeases();
    known.add(id);
    if (this.o.leaseFile === undefined) return;
    try {
      // Several: an outage makes a new lease while the record may still be on an older one.
      writeFileSync(this.o.leaseFile, `${[...known].slice(-LEASES_KEPT).join('\n')}\n`);
    } catch (e) {
      this.o.log.warn(`directory: ${this.o.leaseFile} not written (a restart inside the TTL will wait for its old record to expire): ${describeError(e)}`);
    }
  }

  private claimed(s: Session): void {
    const was = s.nameHeldBy;
    s.nameHeldBy = undefined;
    if (was !== undefined) {
      this.o.log.info(`directory: registered as ${this.o.self} (the record of the agent at ${was.url} is gone)`);
      if (s.leaseOk && s.watchOk) this.health(s, 'watch', true);
    }
  }

  private isOwnKey(kv: IKeyValue): boolean {
    return kv.key.toString() === recordKey(this.o.prefix, this.o.self);
  }

  /** A write to this agent's key: its own, or another agent's that took the name (one without this check, or by hand). */
  private ownRecordWritten(s: Session, kv: IKeyValue): void {
    if (s.dead || this.self === undefined) return;
    const holder = this.otherHolder(s, kv);
    if (holder !== undefined) this.nameHeld(s, holder);
  }

  /** This agent's key deleted: the holder left (or its lease expired), so the name is free to claim; or this agent's own record was removed by hand, so it is written again. */
  private ownRecordDeleted(s: Session): void {
    if (s.dead || this.self === undefined) return;
    void this.claim(s).catch((e: unknown) => this.failed(s, e));
  }

  private conflict(holder: DirectoryRecord): void {
    const message = `the name ${this.o.self} is held in etcd by another live agent (${holder.url}, version ${holder.version}, started ${new Date(holder.startedAt).toISOString()}): this agent is not registered (it still reads its peers) and registers once that record goes; give one of them another name`;
    // Once per conflict: the watch may report the holder's record again (a keep-alive does not, a re-put does).
    if (this.state !== 'conflict') this.o.log.error(`directory: ${message}`, { code: ErrorCodes.DIRECTORY_NAME_TAKEN, holder: holder.url });
    this.state = 'conflict';
    this.lastError = { code: ErrorCodes.DIRECTORY_NAME_TAKEN, message };
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
