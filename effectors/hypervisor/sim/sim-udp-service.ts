/**
 * The UDP service a `sim` VM runs (seed 002): a sequence-numbered counter on a real UDP socket.
 * Each request `{"seq": N}` is answered with `{"seq": N, "served": n}`, where `n` counts the
 * requests this VM has served so far (this one included). `served` is part of the VM's state: a
 * migration hands it to the target's service (`new SimUdpService({ served })`), as memory would be.
 *
 * Halting follows the seed: before the offline phase the VM is told to stop processing UDP.
 * {@link SimUdpService.halt} first serves what already reached the VM (everything queued at its
 * socket before the halt, found with a marker datagram the service sends to itself: one kernel
 * receive queue is FIFO across senders), then stops. A datagram that arrives while halted is
 * discarded and counted in `droppedWhileHalted` — which is why the relay in front of it must buffer.
 */
import { randomBytes } from 'node:crypto';
import dgram from 'node:dgram';
import { EffectorError, ErrorCodes } from '../../../core/errors.ts';

export interface UdpAddress {
  readonly host: string;
  readonly port: number;
}

export type SimUdpServiceState = 'serving' | 'halting' | 'halted' | 'closed';

/** One served request, for observers (tests, the VM sensor). */
export interface ServedRequest {
  readonly seq: number;
  readonly served: number;
  readonly from: UdpAddress;
}

export interface SimUdpServiceOptions {
  /** Loopback address to bind (default 127.0.0.1). */
  readonly host?: string;
  /** Port to bind (default 0: ephemeral). */
  readonly port?: number;
  /** Requests already served, carried over from the source VM on migration (default 0). */
  readonly served?: number;
  /** SO_RCVBUF in bytes (default 4 MiB, capped by the kernel's rmem_max): room for bursts from a draining relay. */
  readonly recvBufferSize?: number;
  /** How long {@link SimUdpService.halt} waits for its marker before halting anyway (default 1000 ms). */
  readonly haltTimeoutMs?: number;
  /** Called for every served request, after the reply was sent. */
  readonly onServe?: (r: ServedRequest) => void;
}

export interface SimUdpServiceStats {
  readonly state: SimUdpServiceState;
  readonly served: number;
  /** Requests answered with an error reply (not JSON, no integer `seq`). */
  readonly rejected: number;
  /** Datagrams that arrived while halted: lost, as for a VM that is not running. */
  readonly droppedWhileHalted: number;
}

const MiB = 1024 * 1024;
const MARKER_BYTES = 16;

/**
 * A sim VM's UDP counter service.
 *
 * @example
 * ```ts
 * const svc = await SimUdpService.start();             // 127.0.0.1:<ephemeral>
 * // … clients (or the relay) send {"seq":1} to svc.address and get {"seq":1,"served":1}
 * await svc.halt();                                      // offline phase begins
 * const target = await SimUdpService.start({ served: svc.served }); // the counter moves with the VM
 * await svc.close();
 * ```
 */
export class SimUdpService {
  private readonly socket: dgram.Socket;
  private readonly onServe: ((r: ServedRequest) => void) | undefined;
  private readonly haltTimeoutMs: number;
  private servedCount: number;
  private rejectedCount = 0;
  private droppedCount = 0;
  private mode: SimUdpServiceState = 'serving';
  private marker: Buffer | undefined;
  private halting: { promise: Promise<void>; resolve: () => void; timer: NodeJS.Timeout } | undefined;
  private bound: UdpAddress | undefined;

  private constructor(opts: SimUdpServiceOptions) {
    const served = opts.served ?? 0;
    if (!Number.isSafeInteger(served) || served < 0) {
      throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `served must be a non-negative integer, got ${String(served)}`);
    }
    this.servedCount = served;
    this.onServe = opts.onServe;
    this.haltTimeoutMs = opts.haltTimeoutMs ?? 1000;
    this.socket = dgram.createSocket({ type: 'udp4', recvBufferSize: opts.recvBufferSize ?? 4 * MiB });
    this.socket.on('message', (msg, rinfo) => this.onMessage(msg, rinfo));
    // A send error (e.g. the peer's port closed) must not take the VM down; UDP gives no guarantee anyway.
    this.socket.on('error', () => undefined);
  }

  /** Binds the service; resolves once it is reachable at {@link SimUdpService.address}. */
  static async start(opts: SimUdpServiceOptions = {}): Promise<SimUdpService> {
    const svc = new SimUdpService(opts);
    await new Promise<void>((resolve, reject) => {
      svc.socket.once('error', reject);
      svc.socket.bind({ address: opts.host ?? '127.0.0.1', port: opts.port ?? 0 }, () => {
        svc.socket.off('error', reject);
        resolve();
      });
    });
    const a = svc.socket.address();
    svc.bound = { host: a.address, port: a.port };
    return svc;
  }

  get address(): UdpAddress {
    if (!this.bound) throw new EffectorError(ErrorCodes.VM_BAD_STATE, 'UDP service is not bound');
    return this.bound;
  }

  /** Requests served so far: the counter that migrates with the VM. */
  get served(): number {
    return this.servedCount;
  }

  get state(): SimUdpServiceState {
    return this.mode;
  }

  stats(): SimUdpServiceStats {
    return { state: this.mode, served: this.servedCount, rejected: this.rejectedCount, droppedWhileHalted: this.droppedCount };
  }

  /**
   * Tells the VM to stop processing UDP. Datagrams already queued at the socket are served first;
   * resolves when the service is halted. Idempotent while halting or halted.
   */
  halt(): Promise<void> {
    if (this.mode === 'closed') return Promise.reject(new EffectorError(ErrorCodes.VM_BAD_STATE, 'UDP service is closed'));
    if (this.mode === 'halted') return Promise.resolve();
    if (this.halting) return this.halting.promise;
    this.mode = 'halting';
    this.marker = randomBytes(MARKER_BYTES);
    let resolve!: () => void;
    const promise = new Promise<void>((r) => (resolve = r));
    // If the marker is lost (receive buffer overflowed) the VM halts anyway; what overflowed was lost by the kernel.
    const timer = setTimeout(() => this.finishHalt(), this.haltTimeoutMs);
    this.halting = { promise, resolve, timer };
    this.socket.send(this.marker, this.address.port, this.address.host);
    return promise;
  }

  /** Tells the VM to process UDP again (after a migration completed here, or aborted at the source). */
  resume(): void {
    if (this.mode === 'closed') throw new EffectorError(ErrorCodes.VM_BAD_STATE, 'UDP service is closed');
    if (this.halting) {
      clearTimeout(this.halting.timer);
      this.halting.resolve();
      this.halting = undefined;
    }
    this.marker = undefined;
    this.mode = 'serving';
  }

  async close(): Promise<void> {
    if (this.mode === 'closed') return;
    if (this.halting) {
      clearTimeout(this.halting.timer);
      this.halting.resolve();
      this.halting = undefined;
    }
    this.mode = 'closed';
    await new Promise<void>((r) => this.socket.close(() => r()));
  }

  private finishHalt(): void {
    if (this.mode !== 'halting' || !this.halting) return;
    clearTimeout(this.halting.timer);
    this.mode = 'halted';
    this.marker = undefined;
    const { resolve } = this.halting;
    this.halting = undefined;
    resolve();
  }

  private onMessage(msg: Buffer, rinfo: dgram.RemoteInfo): void {
    if (this.mode === 'halted' || this.mode === 'closed') {
      this.droppedCount++;
      return;
    }
    if (this.mode === 'halting' && this.marker && msg.length === MARKER_BYTES && msg.equals(this.marker)) {
      this.finishHalt();
      return;
    }
    const seq = parseSeq(msg);
    if (seq === undefined) {
      this.rejectedCount++;
      const err = { error: ErrorCodes.UDP_REQUEST_INVALID, message: 'expected {"seq": <non-negative integer>}' };
      this.socket.send(JSON.stringify(err), rinfo.port, rinfo.address);
      return;
    }
    const served = ++this.servedCount;
    this.socket.send(`{"seq":${seq},"served":${served}}`, rinfo.port, rinfo.address);
    this.onServe?.({ seq, served, from: { host: rinfo.address, port: rinfo.port } });
  }
}

/** The `seq` of a request, or undefined when the datagram is not `{"seq": <non-negative safe integer>, …}`. */
export function parseSeq(msg: Uint8Array): number | undefined {
  let v: unknown;
  try {
    v = JSON.parse(Buffer.from(msg.buffer, msg.byteOffset, msg.byteLength).toString('utf8'));
  } catch {
    return undefined;
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return undefined;
  const seq = (v as { seq?: unknown }).seq;
  return typeof seq === 'number' && Number.isSafeInteger(seq) && seq >= 0 ? seq : undefined;
}
