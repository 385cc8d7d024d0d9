/**
 * One QEMU migration stream copied to several incoming QEMUs (issue 13, README "Several
 * destinations", qemu). QEMU's `migrate` writes into a loopback TCP port of the relay, and only a
 * connection from this agent's own user is taken (its owner read from /proc/net/tcp,
 * loopback-peer.ts; another user's is closed unread, and the relay waits on for QEMU's); the relay
 * opens one connection to every destination's incoming QEMU and writes each chunk it reads to all.
 *
 * Why TCP and not a unix socket (which it was, in a 0700 dir, and still is without /proc/net/tcp):
 * a unix socket holds ~200 KiB (net.core.wmem_default; neither QEMU nor Node can raise it), so on
 * two cores QEMU's migration thread blocked every ~200 KiB until the relay was scheduled to read,
 * and the hop ran at a third of a direct migration's rate; a loopback TCP connection's buffers
 * grow to MiBs and keep QEMU writing (BENCHMARKS.md, "Several destinations with qemu").
 *
 * Why per-destination TLS here and not QEMU's: QEMU's TLS session is keyed to one peer, its bytes
 * cannot be replayed to another. The source QEMU therefore writes plaintext to the local socket
 * only, and the relay wraps each destination's copy in a TLS session of its own with the cluster
 * certificates — the same checks QEMU's `tls-creds-x509` does: the destination's certificate must
 * come from the cluster CA and name the destination agent (QEMU's `tls-hostname`), and the relay
 * presents the source agent's certificate, which the incoming QEMU's `tls-authz` admits. Memory
 * never leaves the host in clear when `peer.tls` is set.
 *
 * Pace: the source is read as fast as the fastest live destination takes it; a slower one gets
 * its copy from a queue of its own. Once that queue holds more than `bufferLimitBytes` the source
 * waits for it (reading stops, so the queue stops there), for at most `stallBudgetMs` in all over
 * the stream; a destination still over its bound when its budget is spent is dropped with outcome
 * `tooSlow` (its connection destroyed: its incoming QEMU sees the stream break). The budget is for
 * a destination that starts late (its QEMU slow to come up on a loaded host) and would otherwise
 * be dropped for a backlog it clears a moment later: the race keeps its backup at the cost of a
 * bounded wait, and one that stays slow still holds nobody for longer than that.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, connect as netConnect, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { checkServerIdentity, connect as tlsConnect, type PeerCertificate } from 'node:tls';
import { EffectorError, ErrorCodes } from '../../../core/errors.ts';
import { userBufferReadsOf } from '../../../core/wire/user-buffer-reads.ts';
import { loopbackPeerUid, loopbackTableReadable, readLoopbackTable } from './loopback-peer.ts';

/** Default bound of one destination's queue: past it the source waits for it (its stall budget), then it is `tooSlow`. */
export const DEFAULT_RELAY_BUFFER_BYTES = 64 * 1024 * 1024;

/** Default time in all that one destination over its bound may hold the source's stream (0: dropped at once). */
export const DEFAULT_RELAY_STALL_BUDGET_MS = 3000;

/** How often a destination over its bound is looked at (Node tells 'drain' only once its queue is empty). */
const STALL_CHECK_MS = 10;

export interface RelayTls {
  /** PEM: the cluster CA, the source agent's certificate and key. */
  readonly ca: string | Buffer;
  readonly cert: string | Buffer;
  readonly key: string | Buffer;
}

export interface RelayDestination {
  readonly name: string;
  /** The destination's listener as its prepareIncoming answered it: `tcp:HOST:PORT`. */
  readonly uri: string;
  /** With TLS, the agent name the destination's certificate must carry. */
  readonly tls?: RelayTls & { readonly serverName: string };
}

export type RelayOutcome = 'delivered' | 'tooSlow' | 'failed' | 'dropped';

export interface RelayResult {
  readonly name: string;
  readonly outcome: RelayOutcome;
  /** Bytes written to this destination's connection (queued ones included when it was dropped). */
  readonly bytes: number;
  /** Most bytes queued for it at once. */
  readonly maxQueuedBytes: number;
  /** How long in all the source's stream waited for it while its queue was over the bound. */
  readonly heldMs: number;
  readonly reason?: string;
}

/** How QEMU reaches the relay: a loopback TCP port (default where /proc/net/tcp tells its owner) or a unix socket in a 0700 dir. */
export type RelaySourceTransport = 'tcp' | 'unix';

export interface StreamRelayOptions {
  readonly destinations: readonly RelayDestination[];
  /** Default 'tcp' where /proc/net/tcp is readable, else 'unix'; 'unix' is also the bench's A/B. */
  readonly source?: RelaySourceTransport;
  readonly bufferLimitBytes?: number;
  /** Time in all one destination over its bound may hold the stream before it is `tooSlow` ({@link DEFAULT_RELAY_STALL_BUDGET_MS}; 0: at once). */
  readonly stallBudgetMs?: number;
  /** Where the relay's private socket dir is made with the unix transport (default the OS temp dir); the qemu driver uses the VM's state dir, so an agent killed mid-stream leaves nothing elsewhere. */
  readonly parentDir?: string;
  /** A destination that is not connected (TLS handshake done) within this long is `failed`. Default 10 s. */
  readonly connectTimeoutMs?: number;
  /**
   * Size of the slabs QEMU's stream is read into ({@link DEFAULT_RELAY_SLAB_BYTES}); 0 reads with
   * Node's own 64 KiB buffers (the bench's A/B).
   */
  readonly slabBytes?: number;
}

/**
 * Default slab QEMU's stream is read into: each read takes whatever the socket holds, up to
 * {@link MAX_RELAY_READ_BYTES}, instead of Node's 64 KiB, into the next free part of the slab. The
 * chunk read is written to every destination as it is (one Buffer shared, never copied). When every
 * live destination's socket took it whole (nothing queued anywhere: the kernel has its copy), the
 * next read goes into the same bytes again, so a relay whose destinations keep up reads and sends
 * from one cache-warm 256 KiB; otherwise the next read goes after it, and a full slab is left to the
 * writes still holding it.
 */
export const DEFAULT_RELAY_SLAB_BYTES = 4 * 1024 * 1024;
/** A slab with less room than this left is replaced (a read must be able to take a socket's worth). */
const SLAB_MIN_ROOM = 512 * 1024;
/**
 * Most one read takes: a loopback TCP connection can hold MiBs, and one chunk goes whole into every
 * destination's queue, so a read is also kept to a quarter of the bound (a destination is judged
 * on its backlog, not on one read's size). 256 KiB fits a core's L2 with the reused slab part
 * (A/B against 1 MiB and 128 KiB: BENCHMARKS.md, "Several destinations with qemu").
 */
const MAX_RELAY_READ_BYTES = 256 * 1024;

/** `tcp:HOST:PORT` → host and port; a coded error for anything else (the URI comes from a peer). */
export function parseTcpUri(uri: string): { readonly host: string; readonly port: number } {
  const m = /^tcp:(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/.exec(typeof uri === 'string' ? uri : '');
  const port = m ? Number(m[2]) : NaN;
  if (!m || !(port >= 1 && port <= 65535)) {
    throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `a relay destination must be tcp:HOST:PORT, not ${JSON.stringify(uri)}`, { details: { uri } });
  }
  return { host: m[1]!.replace(/^\[|\]$/g, ''), port };
}

interface Dest {
  readonly name: string;
  readonly socket: Socket;
  connected: boolean;
  live: boolean;
  /** Its queue is past the pace mark; cleared on 'drain'. */
  full: boolean;
  bytes: number;
  maxQueued: number;
  ended: boolean;
  /** It closed cleanly before the source's end: delivered if the source sends nothing more, else failed. */
  peerDone: boolean;
  /** Since when its queue is over the bound and the source waits for it (undefined: it is not). */
  overSince: number | undefined;
  /** Time the source waited for it before this stall. */
  heldMs: number;
  /** While over: the end of its budget, and the look at its queue. */
  stallTimer: NodeJS.Timeout | undefined;
  stallCheck: NodeJS.Timeout | undefined;
  readonly done: Promise<RelayResult>;
  settle: (r: RelayResult) => void;
}

/**
 * @example
 * ```ts
 * const relay = await StreamRelay.open({ destinations: [{ name: 'b', uri: 'tcp:127.0.0.1:4001' }, { name: 'c', uri: 'tcp:127.0.0.1:4002' }] });
 * await qmp.execute('migrate', { uri: relay.uri });          // tcp:127.0.0.1:PORT (or unix:…/relay-XXXX/s)
 * const [b, c] = await Promise.all([relay.result('b'), relay.result('c')]); // outcome 'delivered' | 'tooSlow' | …
 * relay.close();
 * ```
 */
export class StreamRelay {
  private sourceUri: string;
  private readonly dests = new Map<string, Dest>();
  private source: Socket | undefined;
  private sourceEnded = false;
  private closed = false;
  private readonly limit: number;
  private readonly stallBudgetMs: number;
  /** Queue length past which a destination counts as not taking more (the source pauses when all are past it). */
  private readonly paceBytes: number;
  private readonly slabBytes: number;
  /** Whether the source is read into slabs (else Node's 64 KiB reads: Node's internals did not fit, or slabBytes 0). */
  slabReads = false;
  /** Reads that went into the bytes of the one before (every destination had taken it whole). */
  slabReuses = 0;
  /** Every destination is gone: the source's stream is cut so QEMU's migration fails. */
  onAllDropped: (() => void) | undefined;
  /** Connections to the source port closed unread: not from this agent's user (tcp), or a second writer. */
  refusedSources = 0;

  private constructor(
    private readonly server: Server,
    private readonly dir: string | undefined,
    readonly transport: RelaySourceTransport,
    o: StreamRelayOptions,
  ) {
    this.sourceUri = dir === undefined ? '' : `unix:${join(dir, 's')}`;
    this.limit = o.bufferLimitBytes ?? DEFAULT_RELAY_BUFFER_BYTES;
    this.stallBudgetMs = o.stallBudgetMs ?? DEFAULT_RELAY_STALL_BUDGET_MS;
    if (!Number.isSafeInteger(this.stallBudgetMs) || this.stallBudgetMs < 0) {
      throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `the relay's stall budget must be a whole number of ms (0 or more), not ${o.stallBudgetMs}`);
    }
    // Not the socket's 16 KiB high-water mark: one read of QEMU's stream is 64 KiB, so pausing at
    // write()'s `false` stopped the source after every chunk (6x slower than a direct migration).
    this.paceBytes = Math.min(4 * 1024 * 1024, Math.floor(this.limit / 2));
    this.slabBytes = o.slabBytes ?? DEFAULT_RELAY_SLAB_BYTES;
    if (!Number.isSafeInteger(this.slabBytes) || (this.slabBytes !== 0 && this.slabBytes < SLAB_MIN_ROOM)) {
      throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `the relay's read slab must be 0 or at least ${SLAB_MIN_ROOM} bytes, not ${o.slabBytes}`);
    }
    if (!Number.isSafeInteger(this.limit) || this.limit < 1) {
      throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `the relay's buffer bound must be a positive integer of bytes, not ${o.bufferLimitBytes}`);
    }
  }

  /** Listens on a fresh unix socket and starts connecting to every destination (handshakes overlap QEMU's setup). */
  static async open(o: StreamRelayOptions): Promise<StreamRelay> {
    if (o.destinations.length === 0) throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, 'a relay needs at least one destination');
    const names = new Set(o.destinations.map((d) => d.name));
    if (names.size !== o.destinations.length) throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, 'a relay destination is named twice');
    const targets = o.destinations.map((d) => ({ d, at: parseTcpUri(d.uri) }));
    if (o.source !== undefined && o.source !== 'tcp' && o.source !== 'unix') {
      throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `the relay's source transport must be tcp or unix, not ${JSON.stringify(o.source)}`);
    }
    const transport: RelaySourceTransport = o.source ?? (loopbackTableReadable() ? 'tcp' : 'unix');
    const dir = transport === 'unix' ? mkdtempSync(join(o.parentDir ?? tmpdir(), 'relay-')) : undefined;
    const server = createServer({ pauseOnConnect: true });
    let relay: StreamRelay;
    try {
      relay = new StreamRelay(server, dir, transport, o);
    } catch (e) {
      if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
      throw e;
    }
    server.on('connection', (s) => relay.accept(s));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      const listening = (): void => {
        server.off('error', reject);
        const a = server.address();
        if (dir === undefined && a !== null && typeof a === 'object') relay.sourceUri = `tcp:127.0.0.1:${a.port}`;
        resolve();
      };
      if (dir === undefined) server.listen({ host: '127.0.0.1', port: 0 }, listening);
      else server.listen(join(dir, 's'), listening);
    });
    const connectTimeoutMs = o.connectTimeoutMs ?? 10_000;
    for (const { d, at } of targets) relay.connectTo(d, at, connectTimeoutMs);
    return relay;
  }

  /** Where QEMU migrates to: `tcp:127.0.0.1:PORT` or `unix:PATH`. */
  get uri(): string {
    return this.sourceUri;
  }

  /** One destination's end: delivered (the whole stream handed to its connection) or dropped and why. */
  result(name: string): Promise<RelayResult> {
    const d = this.dests.get(name);
    if (!d) return Promise.reject(new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `${name} is not a destination of this relay`));
    return d.done;
  }

  /** Destinations still being fed. */
  liveNames(): string[] {
    return [...this.dests.values()].filter((d) => d.live).map((d) => d.name);
  }

  /** Stops feeding `name` (its migration was cut elsewhere: aborted, its hand-over failed). */
  drop(name: string, reason: string): void {
    const d = this.dests.get(name);
    if (d) this.kill(d, 'dropped', reason);
  }

  /** Cuts everything; destinations not delivered yet are `dropped`. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const d of this.dests.values()) this.kill(d, 'dropped', 'the relay was closed');
    this.source?.destroy();
    this.server.close();
    if (this.dir !== undefined) rmSync(this.dir, { recursive: true, force: true });
  }

  private connectTo(d: RelayDestination, at: { host: string; port: number }, timeoutMs: number): void {
    const socket = d.tls
      ? tlsConnect({
          host: at.host,
          port: at.port,
          ca: d.tls.ca,
          cert: d.tls.cert,
          key: d.tls.key,
          // The cluster's certificates name agents, not hosts: the check is QEMU's tls-hostname's.
          checkServerIdentity: (_host: string, cert: PeerCertificate) => checkServerIdentity(d.tls!.serverName, cert),
        })
      : netConnect({ host: at.host, port: at.port });
    socket.setNoDelay(true);
    let settle: (r: RelayResult) => void = () => {};
    const done = new Promise<RelayResult>((r) => (settle = r));
    const dest: Dest = {
      name: d.name,
      socket,
      connected: false,
      live: true,
      full: false,
      bytes: 0,
      maxQueued: 0,
      ended: false,
      peerDone: false,
      overSince: undefined,
      heldMs: 0,
      stallTimer: undefined,
      stallCheck: undefined,
      done,
      settle,
    };
    this.dests.set(d.name, dest);
    const timer = setTimeout(() => this.kill(dest, 'failed', `not connected within ${timeoutMs} ms`), timeoutMs);
    socket.once(d.tls ? 'secureConnect' : 'connect', () => {
      clearTimeout(timer);
      dest.connected = true;
    });
    socket.on('drain', () => {
      dest.full = false;
      this.pace();
    });
    // An incoming QEMU without a return path sends nothing back: bytes from it are not QEMU's.
    socket.on('data', () => this.kill(dest, 'failed', 'the destination sent bytes on a one-way stream'));
    socket.on('error', (e) => this.kill(dest, 'failed', `connection to ${d.name}: ${e.message}`));
    socket.on('finish', () => {
      // Every byte is in the kernel's hands; whether the incoming QEMU took them all its bootIncoming says.
      // (Node also ends our side by itself when the peer closes first: that is no delivery.)
      if (!dest.live || !dest.ended) return;
      dest.live = false;
      settle({ name: dest.name, outcome: 'delivered', bytes: dest.bytes, maxQueuedBytes: dest.maxQueued, heldMs: dest.heldMs });
    });
    socket.on('close', (hadError) => {
      clearTimeout(timer);
      // An incoming QEMU closes once it has read the stream's last section, which can be before
      // the source's own close reaches us: a clean close with nothing left queued is judged when
      // the source ends (more bytes after it mean it closed early).
      if (!hadError && dest.live && dest.connected && dest.socket.writableLength === 0) {
        dest.peerDone = true;
        if (this.sourceEnded) this.finish(dest);
        else this.pace();
        return;
      }
      this.kill(dest, 'failed', `${d.name} closed the stream before its end`);
    });
  }

  private accept(s: Socket): void {
    if (this.source || this.closed || (this.transport === 'tcp' && !this.ownUser(s))) {
      // One QEMU, one channel: a second writer would interleave bytes into every destination's
      // stream; another user's connection is not QEMU's (closed unread, QEMU's still awaited).
      this.refusedSources++;
      s.destroy();
      return;
    }
    this.source = s;
    const maxRead = Math.max(64 * 1024, Math.min(MAX_RELAY_READ_BYTES, Math.floor(this.limit / 4)));
    this.slabReads =
      this.slabBytes > 0 &&
      readIntoSlabs(s, this.slabBytes, maxRead, (chunk) => {
        this.fanOut(chunk);
        const free = this.allTookWhole();
        if (free) this.slabReuses++;
        return free;
      });
    if (!this.slabReads) s.on('data', (chunk: Buffer) => this.fanOut(chunk));
    s.on('end', () => {
      this.sourceEnded = true;
      // Nothing more is read, so nobody is held and no queue grows: a stall ends here.
      for (const d of this.dests.values()) this.endStall(d);
      for (const d of this.dests.values()) if (d.live) this.finish(d);
    });
    s.on('error', () => {});
    s.on('close', () => {
      if (!this.sourceEnded) for (const d of this.dests.values()) this.kill(d, 'failed', 'the source stream broke');
    });
    this.pace();
  }

  /** Every live destination's socket took the last chunk whole: Node counts an unfinished write in writableLength until it completes. Per read, so no array. */
  private allTookWhole(): boolean {
    for (const d of this.dests.values()) if (d.live && d.socket.writableLength !== 0) return false;
    return true;
  }

  /** The connecting socket belongs to this process's user (QEMU runs as the agent's user). */
  private ownUser(s: Socket): boolean {
    const table = readLoopbackTable();
    const ours = this.server.address();
    if (table === undefined || s.remotePort === undefined || ours === null || typeof ours !== 'object') return false;
    return loopbackPeerUid(table, s.remotePort, ours.port) === process.getuid?.();
  }

  private fanOut(chunk: Buffer): void {
    for (const d of this.dests.values()) {
      if (!d.live) continue;
      if (d.peerDone) {
        this.kill(d, 'failed', `${d.name} closed the stream before its end`);
        continue;
      }
      d.bytes += chunk.length;
      d.socket.write(chunk);
      const queued = d.socket.writableLength;
      if (queued > this.paceBytes) d.full = true;
      if (queued > d.maxQueued) d.maxQueued = queued;
      if (queued > this.limit && d.overSince === undefined) this.stall(d, queued);
    }
    this.pace();
  }

  /** `d`'s queue passed the bound: the source waits for it while its budget lasts, else it is dropped. */
  private stall(d: Dest, queued: number): void {
    const left = this.stallBudgetMs - d.heldMs;
    const over = `${queued} bytes queued for ${d.name}, over the relay's bound of ${this.limit}`;
    if (left <= 0 || this.sourceEnded) return this.kill(d, 'tooSlow', this.stallBudgetMs === 0 ? over : `${over}, after the stream waited ${d.heldMs} ms for it`);
    d.overSince = Date.now();
    d.stallTimer = setTimeout(() => {
      const held = d.heldMs + (Date.now() - (d.overSince ?? Date.now()));
      this.kill(d, 'tooSlow', `${d.socket.writableLength} bytes queued for ${d.name}, over the relay's bound of ${this.limit} after the stream waited ${held} ms for it (its budget ${this.stallBudgetMs} ms)`);
    }, left);
    // Back under half the bound: the stream goes on (half, so one read does not start the next stall).
    d.stallCheck = setInterval(() => {
      if (d.socket.writableLength > this.limit / 2) return;
      this.endStall(d);
      this.pace();
    }, STALL_CHECK_MS);
  }

  private endStall(d: Dest): void {
    clearTimeout(d.stallTimer);
    clearInterval(d.stallCheck);
    d.stallTimer = d.stallCheck = undefined;
    if (d.overSince !== undefined) d.heldMs += Date.now() - d.overSince;
    d.overSince = undefined;
  }

  /** Read on while at least one live destination takes more (the fastest sets the pace). */
  private pace(): void {
    const s = this.source;
    if (!s || this.sourceEnded) return;
    // Called per read: loops, no arrays. Not yet connected ones queue too (their bound still holds), but do not hold the others back until they pass it.
    for (const d of this.dests.values()) if (d.live && d.overSince !== undefined) return void s.pause();
    let live = false;
    for (const d of this.dests.values()) {
      if (!d.live) continue;
      if (!d.full) return void s.resume();
      live = true;
    }
    if (live) s.pause();
  }

  private finish(d: Dest): void {
    d.ended = true;
    if (d.peerDone) {
      d.live = false;
      d.settle({ name: d.name, outcome: 'delivered', bytes: d.bytes, maxQueuedBytes: d.maxQueued, heldMs: d.heldMs });
      return;
    }
    d.socket.end();
  }

  private kill(d: Dest, outcome: RelayOutcome, reason: string): void {
    if (!d.live) return;
    this.endStall(d);
    d.live = false;
    d.socket.destroy();
    d.settle({ name: d.name, outcome, bytes: d.bytes, maxQueuedBytes: d.maxQueued, heldMs: d.heldMs, reason });
    if (!this.closed && [...this.dests.values()].every((x) => !x.live)) {
      this.source?.destroy();
      this.onAllDropped?.();
    } else this.pace();
  }
}

/**
 * Switches an accepted socket (which cannot be given `onread`) to Node's user-buffer reads into
 * slabs, `onChunk` called with each read's bytes (true back: nothing holds them any more, the next
 * read goes into the same bytes). Only when Node's socket has the shape
 * core/wire/user-buffer-reads.ts expects and is not reading yet: else false, nothing changed, and
 * the caller reads with 'data' (the gain is lost, never the data). Pause and resume work as with
 * 'data' (net.Socket stops and starts the handle's reads itself in user-buffer mode).
 */
function readIntoSlabs(socket: Socket, slabBytes: number, maxRead: number, onChunk: (chunk: Buffer) => boolean): boolean {
  const hooks = userBufferReadsOf(socket, 0);
  if (hooks === undefined || hooks.socket._handle.reading === true) return false;
  const { socket: s, kBuffer, kBufferCb, kBufferGen } = hooks;
  let slab = Buffer.allocUnsafeSlow(slabBytes);
  let at = 0;
  s[kBufferCb] = (nread: number): boolean => {
    const chunk = slab.subarray(at, at + nread);
    at += nread;
    // True: nothing holds the chunk any more, its bytes take the next read.
    if (onChunk(chunk)) at -= nread;
    return true;
  };
  // Called by Node after each read for the buffer of the next one.
  s[kBufferGen] = (): Buffer => {
    if (slab.length - at < SLAB_MIN_ROOM) {
      slab = Buffer.allocUnsafeSlow(slabBytes);
      at = 0;
    }
    return slab.subarray(at, at + maxRead);
  };
  const first = slab.subarray(0, maxRead);
  s[kBuffer] = first;
  s._handle.useUserBuffer(first);
  return true;
}
