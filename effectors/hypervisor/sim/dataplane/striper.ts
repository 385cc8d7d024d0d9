/**
 * Stripes page batches over several data paths: every path has its own short queue and window
 * of batches in flight, a batch goes to the path expected to finish it first, a capped path is
 * paced by its token bucket, and the batches of a path that fails move to the others.
 */
import { EffectorError, ErrorCodes, describeError, isEmbotError } from '../../../../core/errors.ts';
import type { PeerConnection, RequestBody } from '../../../../core/wire/index.ts';
import { TokenBucket } from './token-bucket.ts';

export interface DataPath {
  readonly name: string;
  readonly conn: PeerConnection;
  /** Bandwidth cap in bytes/s, enforced by a token bucket (a stand-in for a NIC's speed). */
  readonly capBytesPerSec?: number;
}

/** One unit of work: pages to send in one PageBatch. */
export interface Batch {
  readonly round: number;
  readonly indexes: Uint32Array;
  /** All-zero pages sent as indexes only (the full round's). */
  readonly zeros?: Uint32Array;
  /** Page bytes. */
  readonly bytes: number;
  readonly final: boolean;
  /** Times the receiver refused it. */
  rejections: number;
  /** Times it was sent. */
  sends: number;
  /** The send whose answer counts; older answers (from a failed path) are ignored. */
  current: object | undefined;
}

export interface PathReport {
  readonly name: string;
  /** Page bytes acknowledged on this path. */
  readonly bytes: number;
  /** Batches acknowledged on this path. */
  readonly batches: number;
  readonly failed: boolean;
  /** Why it failed, when it did. */
  readonly error?: string;
  /** Estimated rate (min of cap and measured), bytes/s; 0 once failed. */
  readonly rateBytesPerSec: number;
}

export interface StriperOptions {
  readonly migrationId: string;
  /**
   * Builds the frame for a batch at the moment it is sent (pages read then). The frame goes to
   * `conn.request` at once, which encodes it synchronously: its buffers may be reused afterwards.
   */
  readonly build: (batch: Batch, path: string) => RequestBody<'PageBatch'>;
  readonly requestTimeoutMs?: number;
  /** Page bytes in flight per path. */
  readonly windowBytes: number;
  /** Refusals of one batch before the migration fails (the first send plus this many minus one re-sends). */
  readonly maxRejections?: number;
  readonly onAck?: (batch: Batch, path: string) => void;
}

/** Rate assumed for an uncapped path before it was measured: optimistic, so it gets work. */
const UNMEASURED_RATE = 1024 * 1024 * 1024;
/**
 * Burst of a capped path, in seconds of its rate. Its bucket starts empty, so the burst is no
 * head start: it only lets a path catch up on a timer that fired late under load.
 */
const BURST_SECONDS = 0.1;
/** Batches a path may hold beyond its window, so the choice of path stays close to send time. */
const QUEUE_BATCHES = 2;

interface PathState {
  readonly path: DataPath;
  readonly bucket: TokenBucket | undefined;
  readonly queue: Batch[];
  readonly inflight: Set<Batch>;
  queuedBytes: number;
  inflightBytes: number;
  failed: boolean;
  error: string | undefined;
  pumping: boolean;
  ackedBytes: number;
  batches: number;
  busyMs: number;
  busySince: number | undefined;
}

interface Round {
  readonly pending: Batch[];
  outstanding: number;
  readonly resolve: () => void;
  readonly reject: (e: unknown) => void;
}

/**
 * @example
 * ```ts
 * const striper = new Striper(paths, { migrationId, windowBytes: 1 << 20, build: (b, path) => frameFor(b, path) });
 * await striper.send(batchesOfRound);   // resolves when every batch is acknowledged
 * console.log(striper.report());
 * striper.dispose();
 * ```
 */
export class Striper {
  /** Batches sent more than once (after a refusal or a path failure). */
  resent = 0;
  private readonly states: PathState[];
  private readonly o: StriperOptions;
  private round: Round | undefined;
  private fatal: unknown;
  private readonly unwatch: (() => void)[] = [];

  constructor(paths: readonly DataPath[], o: StriperOptions) {
    if (paths.length === 0) throw new EffectorError(ErrorCodes.DATAPLANE_NO_PATH, 'a migration needs at least one data path');
    const names = new Set<string>();
    for (const p of paths) {
      if (names.has(p.name)) throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `data path ${p.name} is given twice`);
      names.add(p.name);
    }
    this.o = o;
    this.states = paths.map((path) => ({
      path,
      bucket: path.capBytesPerSec === undefined ? undefined : new TokenBucket(path.capBytesPerSec, Math.max(path.capBytesPerSec * BURST_SECONDS, 64 * 1024), { initialBytes: 0 }),
      queue: [],
      inflight: new Set(),
      queuedBytes: 0,
      inflightBytes: 0,
      failed: false,
      error: undefined,
      pumping: false,
      ackedBytes: 0,
      batches: 0,
      busyMs: 0,
      busySince: undefined,
    }));
    for (const s of this.states) {
      if (!s.path.conn.isOpen) {
        this.failPath(s, `connection to ${s.path.conn.remoteAgent} is not open`);
        continue;
      }
      const onClose = (): void => this.failPath(s, `connection to ${s.path.conn.remoteAgent} closed`);
      s.path.conn.once('close', onClose);
      this.unwatch.push(() => s.path.conn.off('close', onClose));
    }
  }

  /** Sends `batches` and resolves when all are acknowledged; rejects when no path is left or a batch is refused too often. */
  send(batches: readonly Batch[]): Promise<void> {
    if (this.fatal !== undefined) return Promise.reject(this.fatal);
    if (this.round) return Promise.reject(new EffectorError(ErrorCodes.EFFECTOR_FAILED, 'a round is already being sent'));
    if (batches.length === 0) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      this.round = { pending: [...batches], outstanding: batches.length, resolve, reject };
      this.fill();
    });
  }

  /** Fails the current round (and every later one) with `error`. */
  abort(error: unknown): void {
    this.fail(error);
  }

  /** Sum of the live paths' rates, bytes/s. */
  get rateBytesPerSec(): number {
    let sum = 0;
    for (const s of this.states) if (!s.failed) sum += this.rate(s);
    return sum;
  }

  /** Paths that have not failed. */
  get livePaths(): number {
    return this.states.filter((s) => !s.failed).length;
  }

  report(): PathReport[] {
    return this.states.map((s) => ({
      name: s.path.name,
      bytes: s.ackedBytes,
      batches: s.batches,
      failed: s.failed,
      ...(s.error !== undefined ? { error: s.error } : {}),
      rateBytesPerSec: s.failed ? 0 : Math.round(this.rate(s)),
    }));
  }

  /** Stops watching the connections (they belong to the caller). */
  dispose(): void {
    for (const u of this.unwatch.splice(0)) u();
  }

  // -------------------------------------------------------------------------------------------

  private rate(s: PathState): number {
    const busy = s.busyMs + (s.busySince === undefined ? 0 : performance.now() - s.busySince);
    const measured = busy > 5 && s.ackedBytes > 0 ? (s.ackedBytes * 1000) / busy : undefined;
    const cap = s.path.capBytesPerSec;
    if (cap === undefined) return measured ?? UNMEASURED_RATE;
    return measured === undefined ? cap : Math.min(cap, measured);
  }

  /** Hands pending batches to the paths expected to finish them first, while they have room. */
  private fill(): void {
    const round = this.round;
    if (!round || this.fatal !== undefined) return;
    while (round.pending.length > 0) {
      const batch = round.pending[0]!;
      let best: PathState | undefined;
      let bestFinish = Infinity;
      for (const s of this.states) {
        if (s.failed || s.queue.length >= QUEUE_BATCHES) continue;
        const finish = (s.queuedBytes + s.inflightBytes + batch.bytes) / this.rate(s);
        if (finish < bestFinish) {
          bestFinish = finish;
          best = s;
        }
      }
      if (!best) break;
      round.pending.shift();
      best.queue.push(batch);
      best.queuedBytes += batch.bytes;
    }
    for (const s of this.states) if (s.queue.length > 0) this.pump(s).catch((e: unknown) => this.fail(e));
  }

  private async pump(s: PathState): Promise<void> {
    if (s.pumping) return;
    s.pumping = true;
    try {
      while (!s.failed && this.fatal === undefined && s.queue.length > 0 && (s.inflightBytes === 0 || s.inflightBytes + s.queue[0]!.bytes <= this.o.windowBytes)) {
        const batch = s.queue[0]!;
        // The batch stays queued while the bucket paces it, so a path failing meanwhile hands it on.
        if (s.bucket) await s.bucket.take(batch.bytes);
        if (s.failed || this.fatal !== undefined || s.queue[0] !== batch) break;
        s.queue.shift();
        s.queuedBytes -= batch.bytes;
        this.transmit(s, batch);
      }
    } finally {
      s.pumping = false;
    }
  }

  private transmit(s: PathState, batch: Batch): void {
    let body: RequestBody<'PageBatch'>;
    try {
      body = this.o.build(batch, s.path.name);
    } catch (e) {
      this.fail(e);
      return;
    }
    const token = {};
    batch.current = token;
    if (batch.sends > 0) this.resent++;
    batch.sends++;
    s.inflight.add(batch);
    s.inflightBytes += batch.bytes;
    if (s.busySince === undefined) s.busySince = performance.now();
    const timeout = this.o.requestTimeoutMs;
    s.path.conn.request(body, timeout === undefined ? undefined : { timeoutMs: timeout }).then(
      (reply) => {
        if (batch.current !== token) return;
        this.landed(s, batch);
        if (reply.ok) this.acked(s, batch);
        else this.refused(batch, reply.reason ?? 'no reason given');
      },
      (e: unknown) => {
        if (batch.current !== token) return;
        if (isEmbotError(e, ErrorCodes.CONNECTION_CLOSED) || isEmbotError(e, ErrorCodes.REQUEST_TIMEOUT)) {
          this.failPath(s, describeError(e));
        } else {
          // The peer answered with an Error frame (no handler, handler threw): the batch, not the path, failed.
          this.landed(s, batch);
          this.refused(batch, describeError(e));
        }
      },
    );
  }

  /** The batch is no longer in flight on `s`. */
  private landed(s: PathState, batch: Batch): void {
    if (!s.inflight.delete(batch)) return;
    s.inflightBytes -= batch.bytes;
    if (s.inflight.size === 0 && s.busySince !== undefined) {
      s.busyMs += performance.now() - s.busySince;
      s.busySince = undefined;
    }
  }

  private acked(s: PathState, batch: Batch): void {
    batch.current = undefined;
    s.ackedBytes += batch.bytes;
    s.batches++;
    try {
      this.o.onAck?.(batch, s.path.name);
    } catch (e) {
      this.fail(e);
      return;
    }
    const round = this.round;
    if (round && --round.outstanding === 0) {
      this.round = undefined;
      round.resolve();
      return;
    }
    this.fill();
  }

  private refused(batch: Batch, reason: string): void {
    batch.current = undefined;
    batch.rejections++;
    const max = this.o.maxRejections ?? 4;
    if (batch.rejections >= max) {
      this.fail(
        new EffectorError(ErrorCodes.PAGE_BATCH_REJECTED, `the target refused a page batch of round ${batch.round} ${batch.rejections} times; last reason: ${reason}`, {
          details: { migrationId: this.o.migrationId, round: batch.round, pages: batch.indexes.length, reason },
        }),
      );
      return;
    }
    this.round?.pending.unshift(batch);
    this.fill();
  }

  private failPath(s: PathState, why: string): void {
    if (s.failed) return;
    s.failed = true;
    s.error = why;
    if (s.busySince !== undefined) {
      s.busyMs += performance.now() - s.busySince;
      s.busySince = undefined;
    }
    const orphans = [...s.inflight, ...s.queue];
    s.inflight.clear();
    s.queue.length = 0;
    s.inflightBytes = 0;
    s.queuedBytes = 0;
    for (const b of orphans) b.current = undefined;
    if (this.round) this.round.pending.unshift(...orphans);
    if (this.states.every((x) => x.failed)) {
      this.fail(
        new EffectorError(ErrorCodes.DATAPLANE_NO_PATH, `every data path of migration ${this.o.migrationId} failed: ${this.states.map((x) => `${x.path.name} (${x.error})`).join(', ')}`, {
          details: { migrationId: this.o.migrationId, paths: this.states.map((x) => ({ name: x.path.name, error: x.error })) },
        }),
      );
      return;
    }
    this.fill();
  }

  private fail(error: unknown): void {
    if (this.fatal !== undefined) return;
    this.fatal = error ?? new EffectorError(ErrorCodes.EFFECTOR_FAILED, 'data plane failed');
    const round = this.round;
    this.round = undefined;
    round?.reject(this.fatal);
  }
}
