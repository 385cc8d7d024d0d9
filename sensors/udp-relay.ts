/**
 * The agent's UDP relay for one VM (seed 002: UDP during the offline phase of a migration).
 *
 * **Addressing design: the source relay keeps the client-facing address and re-points.** Clients
 * always talk to `127.0.0.1:udpPort` on the host where the VM started. After the switch that relay
 * forwards each client packet to the target relay's *peer* socket inside a small envelope that
 * names the original client, and the target relay sends the VM's replies back the same way, so the
 * client keeps sending to, and hearing from, one address. Chains compose (A → B → C): each relay
 * remembers per client where replies go (`direct` or `via` a relay). Past the grace period (when
 * the lead closes the source relay) clients must re-resolve the VM's address on its new host.
 *
 * Data path of one relay:
 * - client socket (the VM's address) ← clients; one upstream socket per client → the VM's service
 *   (`setBackend`), so the service's reply names the client by the socket it reached;
 * - peer socket ← forwarded envelopes from a source relay, → replies back to it; when this relay is
 *   re-pointed, it sends its own forwarded envelopes from here and takes the replies here.
 *
 * Migration, as the lead drives it (source A, target B):
 * ```
 * A.pause(); await serviceA.halt();                 // VM offline: A buffers in arrival order
 * … stop-and-copy; serviceB = SimUdpService.start({ served: serviceA.served })
 * B = await UdpRelay.start({ backend: serviceB.address, paused: true })
 * bytes = encodePackets(A.handOver())                // ship in a peer frame
 * B.deliverFirst(decodePackets(bytes))               // before anything B receives later; B resumes
 * A.repoint(B.peerAddress)                            // A's later arrivals (and leftovers) go to B
 * ```
 * On abort before `handOver()`: `serviceA.resume(); A.resume()` (the buffer drains to service A).
 * On abort after it: `serviceA.resume(); A.deliverFirst(packets)` (the hand-over goes first, then
 * what A buffered since). The target side discards B (`B.close()`; its held packets count as dropped).
 *
 * Guarantees: per client, packets reach the service in arrival order; the buffer is bounded
 * (`bufferLimit`) and every packet past it is counted in `dropped` and emitted as a `drop` event;
 * a packet carries `(origin relay, number)` from the relay it first reached, so the relay that
 * delivers it to a service drops exact duplicates and counts late (reordered) packets and gaps.
 * The peer socket trusts any loopback sender for forwarded envelopes; replies are accepted only from
 * relays this one was re-pointed to, and from any relay between `handOver()` and `repoint()` (the
 * target may answer handed-over packets before the source learns its address). Peers are agents on
 * one machine or a trusted network.
 */
import { randomBytes } from 'node:crypto';
import dgram from 'node:dgram';
import { isIPv4 } from 'node:net';
import { EventEmitter } from 'eventemitter3';
import { EffectorError, ErrorCodes, ProtocolError } from '../core/errors.ts';

export interface UdpAddress {
  readonly host: string;
  readonly port: number;
}

/** `forwarding` to the local service, `buffering` (VM offline), `repointed` to a target relay. */
export type UdpRelayMode = 'forwarding' | 'buffering' | 'repointed' | 'closed';

/** A client packet held by a relay, as handed over to the target relay. */
export interface BufferedPacket {
  /** The client that sent it: replies go back to this address. */
  readonly client: UdpAddress;
  readonly data: Uint8Array;
  /** Epoch ms (fractional) when it reached the relay that buffered it. */
  readonly arrivedAt: number;
  /** Id of the relay the client sent it to (u32). */
  readonly origin: number;
  /** Per (origin, client) number given by that relay, from 0: duplicates and gaps are found with it. */
  readonly number: number;
  /**
   * The peer address of the relay that handed this packet over ({@link UdpRelay.handOver} sets it):
   * the relay delivering it sends the replies back through there. Absent: reply to the client directly.
   */
  readonly via?: UdpAddress;
}

export type UdpDropReason = 'buffer-full' | 'too-many-clients' | 'no-backend' | 'closed';

export interface UdpDrop {
  readonly reason: UdpDropReason;
  readonly client: UdpAddress;
  readonly bytes: number;
}

export interface UdpRelayStats {
  readonly mode: UdpRelayMode;
  /** Client packets taken in: from clients, and forwarded envelopes from a source relay. */
  readonly received: number;
  /** Sent on at once (nothing was queued ahead of them). */
  readonly forwarded: number;
  /** Put in the buffer (while paused, or behind a buffer that was still draining). */
  readonly buffered: number;
  /** Lost on purpose: past the buffer limit, too many clients, no backend, or queued when closed. */
  readonly dropped: number;
  readonly droppedBytes: number;
  readonly droppedBy: Readonly<Record<UdpDropReason, number>>;
  /** Buffered or handed-in packets sent on after the pause. */
  readonly delivered: number;
  readonly handedOver: number;
  readonly handedIn: number;
  /** Replies relayed back towards clients. */
  readonly replies: number;
  /** Exact repeats of an (origin, number) already delivered to the service here: dropped. */
  readonly duplicates: number;
  /** Packets delivered after a higher number from the same origin and client. */
  readonly reordered: number;
  /** Numbers skipped and not (yet) filled by a late packet: lost between relays. */
  readonly gaps: number;
  /** Peer datagrams that are not a valid envelope. */
  readonly malformed: number;
  /** Replies from an unexpected sender, or for a client this relay does not know. */
  readonly unroutable: number;
  readonly sendErrors: number;
  /** Largest time from arrival to delivery over buffered packets, ms (0 when none). */
  readonly maxBufferedLatencyMs: number;
  readonly meanBufferedLatencyMs: number;
  readonly bufferedNow: number;
  readonly bufferedBytesNow: number;
  readonly clients: number;
}

export interface UdpRelayOptions {
  /** Loopback address to bind both sockets on (default 127.0.0.1). */
  readonly host?: string;
  /** Client-facing port: the VM's `udpPort` (default 0: ephemeral). */
  readonly port?: number;
  /** Peer port for relay-to-relay envelopes (default 0: ephemeral). */
  readonly peerPort?: number;
  /** The VM's UDP service; without it packets are dropped (`no-backend`) unless paused. */
  readonly backend?: UdpAddress;
  /** Start buffering: a target relay waits for the hand-over before it delivers anything. */
  readonly paused?: boolean;
  /** Buffer bound (defaults 65,536 packets, 32 MiB); handed-in packets count towards it but are never dropped. */
  readonly bufferLimit?: { readonly packets?: number; readonly bytes?: number };
  /** Packets sent per event-loop turn while draining (default 32): spares the receiver's socket buffer. */
  readonly drainBatch?: number;
  /** Client table bound (default 4096). */
  readonly maxClients?: number;
  /** A client silent this long is forgotten and its upstream socket closed (default 120 s). */
  readonly clientIdleMs?: number;
  /** SO_RCVBUF of every socket (default 4 MiB, capped by the kernel's rmem_max). */
  readonly recvBufferSize?: number;
  /** Epoch-ms clock (default `performance.timeOrigin + performance.now()`). */
  readonly now?: () => number;
}

export interface UdpRelayEvents {
  /** Every packet lost on purpose: drops are counted and reported, never silent. */
  drop: (d: UdpDrop) => void;
  /** The buffer emptied after a resume, a hand-over delivery or a re-point. */
  drained: () => void;
}

const MiB = 1024 * 1024;
const WINDOW = 1024;

type Route = { readonly kind: 'direct' } | { readonly kind: 'via'; readonly via: UdpAddress };

interface DedupWindow {
  highest: number;
  readonly ring: Float64Array;
}

interface ClientEntry {
  readonly key: string;
  readonly address: UdpAddress;
  route: Route;
  upstream: dgram.Socket | undefined;
  nextNumber: number;
  lastSeen: number;
  readonly windows: Map<number, DedupWindow>;
}

type Destination = { readonly kind: 'backend' } | { readonly kind: 'remote'; readonly remote: UdpAddress };

const keyOf = (a: UdpAddress): string => `${a.host}:${a.port}`;
const DIRECT: Route = { kind: 'direct' };
const defaultNow = (): number => performance.timeOrigin + performance.now();

/**
 * The UDP relay in front of one VM's UDP service.
 *
 * @example
 * ```ts
 * const svc = await SimUdpService.start();
 * const relay = await UdpRelay.start({ port: 0, backend: svc.address });
 * // clients send to relay.address; replies come back from relay.address
 * relay.pause();                        // VM offline: packets buffered in arrival order
 * const packets = relay.handOver();     // in order, with client address and arrival time
 * relay.deliverFirst(packets);          // (abort) back to the same service, then resumes
 * ```
 */
export class UdpRelay extends EventEmitter<UdpRelayEvents> {
  /** This relay's id in the `origin` of packets it numbers. */
  readonly id: number;
  private readonly clientSocket: dgram.Socket;
  private readonly peerSocket: dgram.Socket;
  private readonly host: string;
  private readonly now: () => number;
  private readonly limitPackets: number;
  private readonly limitBytes: number;
  private readonly drainBatch: number;
  private readonly maxClients: number;
  private readonly clientIdleMs: number;
  private readonly recvBufferSize: number;
  private readonly clients = new Map<string, ClientEntry>();
  /** Relays this one was re-pointed to: the only senders replies are accepted from. */
  private readonly remotes = new Set<string>();
  private backend: UdpAddress | undefined;
  private backendKey = '';
  private destination: Destination = { kind: 'backend' };
  private paused: boolean;
  private closed = false;
  private queue: BufferedPacket[] = [];
  private head = 0;
  /** Handed-in packets at `queue[head…]`: later hand-overs queue behind them, ahead of arrivals. */
  private handedPending = 0;
  /** Set by handOver() until repoint(): replies are then taken from the (still unknown) target relay. */
  private awaitingTarget = false;
  private queuedBytes = 0;
  private drainScheduled = false;
  private drainWaiters: (() => void)[] = [];
  private sweepTimer: NodeJS.Timeout | undefined;
  private clientAddr: UdpAddress | undefined;
  private peerAddr: UdpAddress | undefined;
  private peerKey = '';
  private readonly c = {
    received: 0,
    forwarded: 0,
    buffered: 0,
    dropped: 0,
    droppedBytes: 0,
    delivered: 0,
    handedOver: 0,
    handedIn: 0,
    replies: 0,
    duplicates: 0,
    reordered: 0,
    gaps: 0,
    malformed: 0,
    unroutable: 0,
    sendErrors: 0,
    latencyMax: 0,
    latencySum: 0,
    latencyCount: 0,
  };
  private readonly droppedBy: Record<UdpDropReason, number> = { 'buffer-full': 0, 'too-many-clients': 0, 'no-backend': 0, closed: 0 };

  private constructor(opts: UdpRelayOptions) {
    super();
    this.id = randomBytes(4).readUInt32BE(0);
    this.host = opts.host ?? '127.0.0.1';
    this.now = opts.now ?? defaultNow;
    this.limitPackets = positiveInt(opts.bufferLimit?.packets ?? 65_536, 'bufferLimit.packets');
    this.limitBytes = positiveInt(opts.bufferLimit?.bytes ?? 32 * MiB, 'bufferLimit.bytes');
    this.drainBatch = positiveInt(opts.drainBatch ?? 32, 'drainBatch');
    this.maxClients = positiveInt(opts.maxClients ?? 4096, 'maxClients');
    this.clientIdleMs = positiveInt(opts.clientIdleMs ?? 120_000, 'clientIdleMs');
    this.recvBufferSize = positiveInt(opts.recvBufferSize ?? 4 * MiB, 'recvBufferSize');
    this.paused = opts.paused === true;
    if (opts.backend) this.setBackend(opts.backend);
    this.clientSocket = dgram.createSocket({ type: 'udp4', recvBufferSize: this.recvBufferSize });
    this.peerSocket = dgram.createSocket({ type: 'udp4', recvBufferSize: this.recvBufferSize });
    this.clientSocket.on('message', (msg, rinfo) => this.onClientPacket(msg, rinfo));
    this.peerSocket.on('message', (msg, rinfo) => this.onPeerDatagram(msg, rinfo));
    // After bind, socket errors are failed sends (UDP has no connection to lose): count, keep going.
    const countError = (): void => void this.c.sendErrors++;
    this.clientSocket.on('error', countError);
    this.peerSocket.on('error', countError);
  }

  /** Binds the client-facing and peer sockets. Rejects with EMBOT_ERR_EFFECTOR_FAILED if a port is taken. */
  static async start(opts: UdpRelayOptions = {}): Promise<UdpRelay> {
    const relay = new UdpRelay(opts);
    try {
      relay.clientAddr = await bindSocket(relay.clientSocket, relay.host, opts.port ?? 0);
      relay.peerAddr = await bindSocket(relay.peerSocket, relay.host, opts.peerPort ?? 0);
      relay.peerKey = keyOf(relay.peerAddr);
    } catch (e) {
      await relay.close();
      throw new EffectorError(ErrorCodes.EFFECTOR_FAILED, `cannot bind UDP relay on ${relay.host}: ${(e as Error).message}`, { cause: e });
    }
    relay.sweepTimer = setInterval(() => relay.sweepIdle(), Math.max(1000, Math.floor(relay.clientIdleMs / 2)));
    relay.sweepTimer.unref();
    return relay;
  }

  /** The address clients use (the VM's UDP address on this host). */
  get address(): UdpAddress {
    if (!this.clientAddr) throw new EffectorError(ErrorCodes.UDP_RELAY_BAD_STATE, 'UDP relay is not bound');
    return this.clientAddr;
  }

  /** Where a source relay re-points to: `A.repoint(B.peerAddress)`. */
  get peerAddress(): UdpAddress {
    if (!this.peerAddr) throw new EffectorError(ErrorCodes.UDP_RELAY_BAD_STATE, 'UDP relay is not bound');
    return this.peerAddr;
  }

  get mode(): UdpRelayMode {
    if (this.closed) return 'closed';
    if (this.paused) return 'buffering';
    return this.destination.kind === 'remote' ? 'repointed' : 'forwarding';
  }

  /** Points the relay at the VM's UDP service (also after the VM's service restarted elsewhere on this host). */
  setBackend(addr: UdpAddress): void {
    checkAddress(addr, 'backend');
    this.backend = { host: addr.host, port: addr.port };
    this.backendKey = keyOf(addr);
  }

  /** The VM goes offline: from now on client packets are buffered in arrival order (bounded). */
  pause(): void {
    this.assertOpen('pause');
    this.paused = true;
  }

  /** The VM processes again: the buffer drains to the current destination in order, then packets flow straight through. */
  resume(): void {
    this.assertOpen('resume');
    this.paused = false;
    this.scheduleDrain();
  }

  /**
   * Takes the buffer, oldest first, for the target relay. Only while paused (the VM is offline).
   * Later arrivals keep buffering here until {@link UdpRelay.repoint} sends them after these.
   */
  handOver(): BufferedPacket[] {
    this.assertOpen('handOver');
    if (!this.paused) throw new EffectorError(ErrorCodes.UDP_RELAY_BAD_STATE, `handOver needs a paused relay (mode ${this.mode})`);
    const out: BufferedPacket[] = [];
    const self = this.peerAddress;
    // Replies come back hop by hop: the target answers this relay, which knows the client's route.
    for (let i = this.head; i < this.queue.length; i++) out.push({ ...this.queue[i], via: self });
    this.queue = [];
    this.head = 0;
    this.handedPending = 0;
    this.queuedBytes = 0;
    this.c.handedOver += out.length;
    this.awaitingTarget = true;
    return out;
  }

  /**
   * From now on client packets go to the relay at `remote` (a target relay's {@link UdpRelay.peerAddress})
   * and its replies come back through here. What is still buffered goes first, in order. Resumes.
   */
  repoint(remote: UdpAddress): void {
    this.assertOpen('repoint');
    checkAddress(remote, 'remote');
    this.destination = { kind: 'remote', remote: { host: remote.host, port: remote.port } };
    this.remotes.add(keyOf(remote));
    this.awaitingTarget = false;
    this.resume();
  }

  /**
   * Queues `packets` (a hand-over, oldest first) behind earlier hand-overs and ahead of every packet
   * that arrived here and is not yet delivered, so they reach the service before any packet that
   * arrives afterwards; then resumes unless `resume: false` (they wait for {@link UdpRelay.resume}).
   * Handed-in packets are never dropped for the buffer limit: they were accepted upstream.
   */
  deliverFirst(packets: readonly BufferedPacket[], opts: { readonly resume?: boolean } = {}): void {
    this.assertOpen('deliverFirst');
    const split = this.head + this.handedPending;
    this.queue = [...this.queue.slice(this.head, split), ...packets, ...this.queue.slice(split)];
    this.head = 0;
    this.handedPending += packets.length;
    for (const p of packets) this.queuedBytes += p.data.byteLength;
    this.c.handedIn += packets.length;
    if (opts.resume !== false) this.paused = false;
    this.scheduleDrain();
  }

  /** Resolves when nothing is buffered and the relay is not paused (at once if so already). */
  whenDrained(): Promise<void> {
    if (this.closed) return Promise.resolve();
    if (this.queue.length - this.head === 0 && !this.paused) return Promise.resolve();
    return new Promise((r) => this.drainWaiters.push(r));
  }

  stats(): UdpRelayStats {
    const c = this.c;
    return {
      mode: this.mode,
      received: c.received,
      forwarded: c.forwarded,
      buffered: c.buffered,
      dropped: c.dropped,
      droppedBytes: c.droppedBytes,
      droppedBy: { ...this.droppedBy },
      delivered: c.delivered,
      handedOver: c.handedOver,
      handedIn: c.handedIn,
      replies: c.replies,
      duplicates: c.duplicates,
      reordered: c.reordered,
      gaps: c.gaps,
      malformed: c.malformed,
      unroutable: c.unroutable,
      sendErrors: c.sendErrors,
      maxBufferedLatencyMs: c.latencyMax,
      meanBufferedLatencyMs: c.latencyCount ? c.latencySum / c.latencyCount : 0,
      bufferedNow: this.queue.length - this.head,
      bufferedBytesNow: this.queuedBytes,
      clients: this.clients.size,
    };
  }

  /** Closes every socket. Packets still buffered are dropped with reason `closed` (counted, emitted). */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.sweepTimer) clearInterval(this.sweepTimer);
    for (let i = this.head; i < this.queue.length; i++) this.drop(this.queue[i].client, this.queue[i].data.byteLength, 'closed');
    this.queue = [];
    this.head = 0;
    this.handedPending = 0;
    this.queuedBytes = 0;
    const sockets = [this.clientSocket, this.peerSocket];
    for (const e of this.clients.values()) if (e.upstream) sockets.push(e.upstream);
    this.clients.clear();
    await Promise.all(sockets.map((s) => closeSocket(s)));
    for (const w of this.drainWaiters.splice(0)) w();
  }

  // --- inbound -------------------------------------------------------------------------------

  private onClientPacket(msg: Buffer, rinfo: dgram.RemoteInfo): void {
    if (this.closed) return;
    const client = { host: rinfo.address, port: rinfo.port };
    this.c.received++;
    if (!this.hasRoom(msg.byteLength)) return this.drop(client, msg.byteLength, 'buffer-full');
    const entry = this.entryFor(client, DIRECT);
    if (!entry) return this.drop(client, msg.byteLength, 'too-many-clients');
    // Numbered only once accepted, so a relay downstream sees a gap only for loss in transit.
    this.ingress({ client: entry.address, data: msg, arrivedAt: this.now(), origin: this.id, number: entry.nextNumber++ });
  }

  private onPeerDatagram(msg: Buffer, rinfo: dgram.RemoteInfo): void {
    if (this.closed) return;
    const env = decodeEnvelope(msg);
    if (!env) {
      this.c.malformed++;
      return;
    }
    const sender = { host: rinfo.address, port: rinfo.port };
    if (env.kind === KIND_REPLY) {
      if (!this.awaitingTarget && !this.remotes.has(keyOf(sender))) {
        this.c.unroutable++;
        return;
      }
      const entry = this.clients.get(keyOf(env.client));
      if (!entry) {
        this.c.unroutable++;
        return;
      }
      this.replyTo(entry, env.data);
      return;
    }
    this.c.received++;
    if (!this.hasRoom(env.data.byteLength)) return this.drop(env.client, env.data.byteLength, 'buffer-full');
    const entry = this.entryFor(env.client, { kind: 'via', via: sender });
    if (!entry) return this.drop(env.client, env.data.byteLength, 'too-many-clients');
    this.ingress({ client: entry.address, data: env.data, arrivedAt: this.now(), origin: env.origin, number: env.number, via: sender });
  }

  private onUpstreamReply(entry: ClientEntry, msg: Buffer, rinfo: dgram.RemoteInfo): void {
    if (this.closed) return;
    if (`${rinfo.address}:${rinfo.port}` !== this.backendKey) {
      this.c.unroutable++;
      return;
    }
    this.replyTo(entry, msg);
  }

  private replyTo(entry: ClientEntry, data: Uint8Array): void {
    entry.lastSeen = this.now();
    this.c.replies++;
    if (entry.route.kind === 'direct') this.clientSocket.send(data, entry.address.port, entry.address.host);
    else this.peerSocket.send(encodeEnvelope(KIND_REPLY, entry.address, 0, 0, data), entry.route.via.port, entry.route.via.host);
  }

  // --- the buffer ----------------------------------------------------------------------------

  /** False when a packet of `bytes` would have to be queued and the buffer is full. */
  private hasRoom(bytes: number): boolean {
    if (!this.paused && this.head >= this.queue.length) return true;
    return this.queue.length - this.head < this.limitPackets && this.queuedBytes + bytes <= this.limitBytes;
  }

  /** Takes an accepted packet (see {@link UdpRelay.hasRoom}): straight on, or behind what is queued. */
  private ingress(p: BufferedPacket): void {
    if (this.paused || this.head < this.queue.length) {
      this.queue.push(p);
      this.queuedBytes += p.data.byteLength;
      this.c.buffered++;
      this.scheduleDrain();
      return;
    }
    if (this.send(p)) this.c.forwarded++;
  }

  private scheduleDrain(): void {
    if (this.drainScheduled || this.paused || this.closed) return;
    if (this.head >= this.queue.length) {
      this.notifyDrained();
      return;
    }
    this.drainScheduled = true;
    setImmediate(() => this.drainStep());
  }

  private drainStep(): void {
    this.drainScheduled = false;
    if (this.paused || this.closed) return;
    const end = Math.min(this.queue.length, this.head + this.drainBatch);
    const now = this.now();
    while (this.head < end) {
      const p = this.queue[this.head++];
      if (this.handedPending > 0) this.handedPending--;
      this.queuedBytes -= p.data.byteLength;
      if (!this.send(p)) continue;
      this.c.delivered++;
      const latency = Math.max(0, now - p.arrivedAt);
      this.c.latencySum += latency;
      this.c.latencyCount++;
      if (latency > this.c.latencyMax) this.c.latencyMax = latency;
    }
    if (this.head > 4096 && this.head * 2 > this.queue.length) {
      this.queue = this.queue.slice(this.head);
      this.head = 0;
    }
    if (this.head >= this.queue.length) {
      this.queue = [];
      this.head = 0;
      this.handedPending = 0;
      this.queuedBytes = 0;
      this.notifyDrained();
    } else this.scheduleDrain();
  }

  private notifyDrained(): void {
    this.emit('drained');
    for (const w of this.drainWaiters.splice(0)) w();
  }

  /** Sends one packet to the current destination; false when it was dropped or was a duplicate. */
  private send(p: BufferedPacket): boolean {
    if (this.destination.kind === 'remote') {
      const r = this.destination.remote;
      this.peerSocket.send(encodeEnvelope(KIND_FORWARD, p.client, p.origin, p.number, p.data), r.port, r.host);
      return true;
    }
    const backend = this.backend;
    if (!backend) {
      this.drop(p.client, p.data.byteLength, 'no-backend');
      return false;
    }
    // A hand-over given back to the relay that made it (abort) names this relay as `via`: keep the route it knew.
    const route: Route | undefined = !p.via ? DIRECT : keyOf(p.via) === this.peerKey ? undefined : { kind: 'via', via: p.via };
    const entry = this.entryFor(p.client, route);
    if (!entry) {
      this.drop(p.client, p.data.byteLength, 'too-many-clients');
      return false;
    }
    if (!this.admit(entry, p.origin, p.number)) return false;
    entry.upstream ??= this.openUpstream(entry);
    entry.upstream.send(p.data, backend.port, backend.host);
    return true;
  }

  /** Anti-replay window per (origin, client): false for an exact duplicate. */
  private admit(entry: ClientEntry, origin: number, n: number): boolean {
    let w = entry.windows.get(origin);
    if (!w) {
      w = { highest: n - 1, ring: new Float64Array(WINDOW).fill(-1) };
      entry.windows.set(origin, w);
    }
    if (n > w.highest) {
      this.c.gaps += n - w.highest - 1;
      w.highest = n;
      w.ring[n % WINDOW] = n;
      return true;
    }
    if (n > w.highest - WINDOW && w.ring[n % WINDOW] === n) {
      this.c.duplicates++;
      return false;
    }
    // Late: older than the window it cannot be told from a duplicate, so it is delivered (UDP allows it).
    if (n > w.highest - WINDOW) {
      w.ring[n % WINDOW] = n;
      this.c.gaps = Math.max(0, this.c.gaps - 1);
    }
    this.c.reordered++;
    return true;
  }

  private drop(client: UdpAddress, bytes: number, reason: UdpDropReason): void {
    this.c.dropped++;
    this.c.droppedBytes += bytes;
    this.droppedBy[reason]++;
    this.emit('drop', { reason, client, bytes });
  }

  // --- clients -------------------------------------------------------------------------------

  /** The client's entry, created if there is room; `route` (when given) is where its replies go from now on. */
  private entryFor(client: UdpAddress, route: Route | undefined): ClientEntry | undefined {
    const key = keyOf(client);
    let e = this.clients.get(key);
    if (e) {
      // Replies follow the path the client's latest packet came by (direct, or through a relay).
      if (route) e.route = route;
      e.lastSeen = this.now();
      return e;
    }
    if (this.clients.size >= this.maxClients) return undefined;
    e = { key, address: { host: client.host, port: client.port }, route: route ?? DIRECT, upstream: undefined, nextNumber: 0, lastSeen: this.now(), windows: new Map() };
    this.clients.set(key, e);
    return e;
  }

  private openUpstream(entry: ClientEntry): dgram.Socket {
    const s = dgram.createSocket({ type: 'udp4', recvBufferSize: this.recvBufferSize });
    s.on('message', (msg, rinfo) => this.onUpstreamReply(entry, msg, rinfo));
    s.on('error', () => void this.c.sendErrors++);
    // Sends made before the bind completes are queued by dgram in order.
    s.bind({ address: this.host, port: 0 });
    return s;
  }

  private sweepIdle(): void {
    const cutoff = this.now() - this.clientIdleMs;
    const queued = new Set<string>();
    for (let i = this.head; i < this.queue.length; i++) queued.add(keyOf(this.queue[i].client));
    for (const [key, e] of this.clients) {
      if (e.lastSeen >= cutoff || queued.has(key)) continue;
      this.clients.delete(key);
      if (e.upstream) void closeSocket(e.upstream);
    }
  }

  private assertOpen(op: string): void {
    if (this.closed) throw new EffectorError(ErrorCodes.UDP_RELAY_BAD_STATE, `${op} on a closed UDP relay`);
  }
}

function positiveInt(v: number, name: string): number {
  if (!Number.isSafeInteger(v) || v < 1) throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `${name} must be a positive integer, got ${String(v)}`);
  return v;
}

function checkAddress(a: UdpAddress, name: string): void {
  if (!isIPv4(a.host) || !Number.isInteger(a.port) || a.port < 1 || a.port > 65535) {
    throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `${name} must be an IPv4 address and a port 1..65535, got ${String(a.host)}:${String(a.port)}`);
  }
}

function bindSocket(s: dgram.Socket, host: string, port: number): Promise<UdpAddress> {
  return new Promise((resolve, reject) => {
    s.once('error', reject);
    s.bind({ address: host, port }, () => {
      s.off('error', reject);
      const a = s.address();
      resolve({ host: a.address, port: a.port });
    });
  });
}

function closeSocket(s: dgram.Socket): Promise<void> {
  return new Promise((r) => {
    try {
      s.close(() => r());
    } catch {
      r(); // never bound, or closed already
    }
  });
}

// --- relay-to-relay envelope ---------------------------------------------------------------------
// magic 0xEB 0x55 · version 1 · kind · origin u32 · number hi u32 · number lo u32 · client port u16 ·
// client host length u8 · client host (ASCII IPv4) · payload

const ENV_MAGIC0 = 0xeb;
const ENV_MAGIC1 = 0x55;
const ENV_VERSION = 1;
const KIND_FORWARD = 1;
const KIND_REPLY = 2;
const ENV_FIXED = 19;
const TWO32 = 2 ** 32;

interface Envelope {
  readonly kind: typeof KIND_FORWARD | typeof KIND_REPLY;
  readonly origin: number;
  readonly number: number;
  readonly client: UdpAddress;
  readonly data: Uint8Array;
}

function encodeEnvelope(kind: number, client: UdpAddress, origin: number, n: number, data: Uint8Array): Buffer {
  const hostLen = client.host.length;
  const buf = Buffer.allocUnsafe(ENV_FIXED + hostLen + data.byteLength);
  buf[0] = ENV_MAGIC0;
  buf[1] = ENV_MAGIC1;
  buf[2] = ENV_VERSION;
  buf[3] = kind;
  buf.writeUInt32BE(origin >>> 0, 4);
  buf.writeUInt32BE(Math.floor(n / TWO32), 8);
  buf.writeUInt32BE(n % TWO32, 12);
  buf.writeUInt16BE(client.port, 16);
  buf[18] = hostLen;
  buf.write(client.host, ENV_FIXED, 'latin1');
  buf.set(data, ENV_FIXED + hostLen);
  return buf;
}

function decodeEnvelope(buf: Buffer): Envelope | undefined {
  if (buf.length < ENV_FIXED || buf[0] !== ENV_MAGIC0 || buf[1] !== ENV_MAGIC1 || buf[2] !== ENV_VERSION) return undefined;
  const kind = buf[3];
  if (kind !== KIND_FORWARD && kind !== KIND_REPLY) return undefined;
  const hostLen = buf[18];
  if (buf.length < ENV_FIXED + hostLen) return undefined;
  const host = buf.toString('latin1', ENV_FIXED, ENV_FIXED + hostLen);
  const port = buf.readUInt16BE(16);
  if (!isIPv4(host) || port === 0) return undefined;
  const hi = buf.readUInt32BE(8);
  if (hi >= 2 ** 21) return undefined;
  return { kind, origin: buf.readUInt32BE(4), number: hi * TWO32 + buf.readUInt32BE(12), client: { host, port }, data: buf.subarray(ENV_FIXED + hostLen) };
}

// --- hand-over codec -----------------------------------------------------------------------------
// magic "EUPK" · version u8 · count u32, then per packet: origin u32 · number hi u32 · number lo u32 ·
// arrivedAt f64 · client port u16 · client host len u8 · host · via port u16 (0 = none) ·
// via host len u8 · via host · data length u32 · data

const PK_MAGIC = [0x45, 0x55, 0x50, 0x4b] as const;
const PK_VERSION = 1;
const PK_HEADER = 9;
/** Largest UDP payload over IPv4. */
export const MAX_UDP_PAYLOAD = 65_507;

/**
 * Encodes a hand-over (from {@link UdpRelay.handOver}) as one byte array, for a peer frame.
 *
 * @example
 * ```ts
 * const bytes = encodePackets(source.handOver());
 * target.deliverFirst(decodePackets(bytes));
 * ```
 */
export function encodePackets(packets: readonly BufferedPacket[]): Uint8Array {
  let size = PK_HEADER;
  for (const p of packets) size += 30 + p.client.host.length + (p.via?.host.length ?? 0) + p.data.byteLength;
  const buf = Buffer.alloc(size);
  buf.set(PK_MAGIC, 0);
  buf[4] = PK_VERSION;
  buf.writeUInt32BE(packets.length, 5);
  let o = PK_HEADER;
  for (const p of packets) {
    buf.writeUInt32BE(p.origin >>> 0, o);
    buf.writeUInt32BE(Math.floor(p.number / TWO32), o + 4);
    buf.writeUInt32BE(p.number % TWO32, o + 8);
    buf.writeDoubleBE(p.arrivedAt, o + 12);
    o += 20;
    o = writeAddr(buf, o, p.client);
    if (p.via) o = writeAddr(buf, o, p.via);
    else {
      buf.writeUInt16BE(0, o);
      buf[o + 2] = 0;
      o += 3;
    }
    buf.writeUInt32BE(p.data.byteLength, o);
    buf.set(p.data, o + 4);
    o += 4 + p.data.byteLength;
  }
  return new Uint8Array(buf.buffer, buf.byteOffset, o);
}

function writeAddr(buf: Buffer, o: number, a: UdpAddress): number {
  buf.writeUInt16BE(a.port, o);
  buf[o + 2] = a.host.length;
  buf.write(a.host, o + 3, 'latin1');
  return o + 3 + a.host.length;
}

/**
 * Decodes {@link encodePackets} output. Anything else — wrong magic or version, truncation, trailing
 * bytes, a count that does not match, a bad address or timestamp, an oversize payload — throws a
 * ProtocolError with code EMBOT_ERR_UDP_PACKETS_DECODE and the offset in `details`.
 */
export function decodePackets(bytes: Uint8Array): BufferedPacket[] {
  const fail = (why: string, offset: number): never => {
    throw new ProtocolError(ErrorCodes.UDP_PACKETS_DECODE, `bad UDP hand-over: ${why} at byte ${offset}`, { details: { offset } });
  };
  if (!(bytes instanceof Uint8Array)) fail('not a byte array', 0);
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (buf.length < PK_HEADER) fail('too short for the header', 0);
  for (let i = 0; i < 4; i++) if (buf[i] !== PK_MAGIC[i]) fail('wrong magic', i);
  if (buf[4] !== PK_VERSION) fail(`unknown version ${buf[4]}`, 4);
  const count = buf.readUInt32BE(5);
  const out: BufferedPacket[] = [];
  let o = PK_HEADER;
  const need = (n: number, what: string): void => {
    if (o + n > buf.length) fail(`truncated ${what}`, o);
  };
  const readAddr = (what: string, optional: boolean): UdpAddress | undefined => {
    need(3, what);
    const port = buf.readUInt16BE(o);
    const len = buf[o + 2];
    o += 3;
    if (optional && port === 0 && len === 0) return undefined;
    need(len, `${what} host`);
    const host = buf.toString('latin1', o, o + len);
    if (port === 0 || !isIPv4(host)) fail(`bad ${what} address`, o - 3);
    o += len;
    return { host, port };
  };
  for (let i = 0; i < count; i++) {
    need(20, 'packet header');
    const origin = buf.readUInt32BE(o);
    const hi = buf.readUInt32BE(o + 4);
    if (hi >= 2 ** 21) fail('packet number out of range', o + 4);
    const n = hi * TWO32 + buf.readUInt32BE(o + 8);
    const arrivedAt = buf.readDoubleBE(o + 12);
    if (!Number.isFinite(arrivedAt) || arrivedAt < 0) fail('bad arrival time', o + 12);
    o += 20;
    const client = readAddr('client', false)!;
    const via = readAddr('via', true);
    need(4, 'data length');
    const len = buf.readUInt32BE(o);
    if (len > MAX_UDP_PAYLOAD) fail(`payload of ${len} bytes exceeds ${MAX_UDP_PAYLOAD}`, o);
    o += 4;
    need(len, 'data');
    const data = new Uint8Array(buf.subarray(o, o + len)); // a copy: the caller may reuse `bytes`
    o += len;
    out.push(via ? { client, data, arrivedAt, origin, number: n, via } : { client, data, arrivedAt, origin, number: n });
  }
  if (o !== buf.length) fail(`${buf.length - o} trailing bytes after ${count} packets`, o);
  return out;
}
