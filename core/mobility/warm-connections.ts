/**
 * Pre-dialled, authenticated, idle peer links, one pool per configured peer (issue 12's fixed
 * cost): a migration's control link and its primary data path each cost a connect, a TLS session
 * (wss) and the auth handshake, on the critical path of `requesting`. Like the target's spare
 * incoming QEMU, this keeps that work done ahead: the next migration to a peer takes an idle link
 * instead of dialling, and replacements are dialled once every link taken to that peer has closed
 * (the end of its migration, so the dials do not compete with the migration they follow for CPU).
 *
 * A taken link belongs to its migration alone and is never returned: the target aborts a
 * migration when its source's link drops (mobility-service.ts), and a link shared by two
 * migrations would give a drop two meanings. An idle link that drops is re-dialled with back-off;
 * a pool never blocks a migration (no idle link and no dial in flight: the caller dials, as
 * without the pool); idle links do not keep the process alive and close with `close()`.
 */
import { CloseCodes } from '../wire/close-codes.ts';
import type { HandlerTable, PeerConnection } from '../wire/peer-connection.ts';

export interface WarmConnectionsOptions {
  /** The peers to keep links to at the start (the agent's peer names then; addPeer/removePeer follow the directory). */
  readonly peers: readonly string[];
  /** Idle links kept per peer: a migration takes one for control and one for its primary data path. */
  readonly perPeer: number;
  /** Opens one authenticated link to `peer`, without migration-specific handlers (the taker adds them). */
  readonly dial: (peer: string) => Promise<PeerConnection>;
  /** First re-dial delay after a drop or a failed dial; doubles per failure up to `maxBackoffMs`. */
  readonly backoffMs?: number;
  readonly maxBackoffMs?: number;
  readonly onError?: (peer: string, error: unknown) => void;
}

/** What the pool did, for tests and the bench. */
export interface WarmConnectionCounts {
  /** Links dialled (successfully) by the pool. */
  dialled: number;
  /** Links (or dials in flight) handed to migrations. */
  taken: number;
  /** Idle links that closed before anyone took them. */
  dropped: number;
  /** Dials that failed. */
  failed: number;
}

export const DEFAULT_WARM_BACKOFF_MS = 200;
export const DEFAULT_WARM_MAX_BACKOFF_MS = 10_000;

interface Slot {
  readonly peer: string;
  conn: PeerConnection | undefined;
  /** A dial in flight; a taker may claim it (`claimed`), then the pool lets go of it. */
  dialling: Promise<PeerConnection> | undefined;
  claimed: boolean;
  timer: NodeJS.Timeout | undefined;
  failures: number;
  /** When the idle link was parked: one that lived long before dropping resets the back-off. */
  parkedAt: number;
  /** Removes the idle link's close listener. */
  unwatch: (() => void) | undefined;
  /** The peer left (removePeer): a dial that lands is closed, nothing is re-dialled. */
  removed: boolean;
}

export class WarmConnections {
  readonly counts: WarmConnectionCounts = { dialled: 0, taken: 0, dropped: 0, failed: 0 };
  private slots: Slot[] = [];
  /** Taken links (and claimed dials) per peer not yet closed: the slots refill once none is left. */
  private readonly inUse = new Map<string, number>();
  private closed = false;

  constructor(private readonly o: WarmConnectionsOptions) {}

  /** Dials every slot in the background; failures are retried with back-off, never thrown. */
  start(): void {
    for (const peer of this.o.peers) this.addPeer(peer);
  }

  /** Keeps links to `peer` too (one the fleet directory found after the start); kept already: nothing. */
  addPeer(peer: string): void {
    if (this.closed || this.slots.some((s) => s.peer === peer)) return;
    for (let i = 0; i < this.o.perPeer; i++) {
      const slot: Slot = { peer, conn: undefined, dialling: undefined, claimed: false, timer: undefined, failures: 0, parkedAt: 0, unwatch: undefined, removed: false };
      this.slots.push(slot);
      this.fill(slot);
    }
  }

  /** Stops keeping links to `peer` (it left the directory, or moved: its idle links go to the old URL) and closes its idle ones. */
  removePeer(peer: string): void {
    for (const s of this.slots) {
      if (s.peer !== peer) continue;
      s.removed = true;
      clearTimeout(s.timer);
      s.timer = undefined;
      s.unwatch?.();
      s.unwatch = undefined;
      if (s.conn) void s.conn.close(CloseCodes.GOING_AWAY, 'peer left the directory');
      s.conn = undefined;
    }
    this.slots = this.slots.filter((s) => s.peer !== peer);
  }

  /** Idle, open links to `peer` right now. */
  idle(peer: string): number {
    return this.slots.filter((s) => s.peer === peer && s.conn?.isOpen === true).length;
  }

  /**
   * A link of the caller's own to `peer`: an idle one, else a dial the pool has in flight (no worse
   * than dialling afresh), else undefined (the caller dials). The link holds the process again
   * like any other; its slot is refilled once it closes.
   */
  take(peer: string): Promise<PeerConnection> | undefined {
    if (this.closed) return undefined;
    const ready = this.slots.find((s) => s.peer === peer && s.conn?.isOpen === true);
    if (ready) {
      const conn = ready.conn!;
      ready.failures = 0;
      ready.unwatch?.();
      ready.conn = undefined;
      this.handOver(ready, conn);
      return Promise.resolve(conn);
    }
    const inFlight = this.slots.find((s) => s.peer === peer && s.dialling !== undefined && !s.claimed);
    if (inFlight) {
      inFlight.claimed = true;
      this.counts.taken++;
      const dialling = inFlight.dialling!;
      this.use(peer, dialling.then((c) => c.closed, () => undefined));
      return dialling;
    }
    return undefined;
  }

  /** Closes every idle link and stops dialling; links already taken stay with their migrations. */
  async close(): Promise<void> {
    this.closed = true;
    const closing: Promise<unknown>[] = [];
    for (const s of this.slots) {
      clearTimeout(s.timer);
      s.unwatch?.();
      if (s.conn) closing.push(s.conn.close(CloseCodes.GOING_AWAY, 'agent stopping'));
      s.conn = undefined;
      // A dial nobody claimed is closed when it lands (fill sees `closed`).
      if (s.dialling && !s.claimed) closing.push(s.dialling.catch(() => undefined));
    }
    await Promise.all(closing);
  }

  private handOver(slot: Slot, conn: PeerConnection): void {
    this.counts.taken++;
    conn.holdProcess(true);
    this.use(slot.peer, conn.closed);
  }

  /**
   * Refills the peer's empty slots once every link taken to it has closed: a migration's data path
   * closes mid-migration, and a dial then (both sides' handshake CPU) would land inside its later
   * steps; once its control link closes too, the migration is over.
   */
  private use(peer: string, done: Promise<unknown>): void {
    this.inUse.set(peer, (this.inUse.get(peer) ?? 0) + 1);
    void done.then(() => {
      const left = (this.inUse.get(peer) ?? 1) - 1;
      this.inUse.set(peer, left);
      if (left === 0) for (const s of this.slots) if (s.peer === peer) this.fill(s);
    });
  }

  private fill(slot: Slot): void {
    if (this.closed || slot.removed || slot.conn || slot.dialling || slot.timer) return;
    const dialling = this.o.dial(slot.peer);
    slot.dialling = dialling;
    slot.claimed = false;
    dialling.then(
      (conn) => {
        const claimed = slot.claimed;
        slot.dialling = undefined;
        slot.claimed = false;
        this.counts.dialled++;
        if (claimed) {
          // The taker has it (counted in `use`): the slot refills with the peer's others.
          slot.failures = 0;
          return;
        }
        if (this.closed || slot.removed) {
          void conn.close(CloseCodes.GOING_AWAY, this.closed ? 'agent stopping' : 'peer left the directory');
          return;
        }
        this.park(slot, conn);
      },
      (error: unknown) => {
        const claimed = slot.claimed;
        slot.dialling = undefined;
        slot.claimed = false;
        this.counts.failed++;
        this.o.onError?.(slot.peer, error);
        // A claimed dial that failed: its taker dials itself; the slot waits for the peer's links like the others.
        if (claimed || slot.removed) return;
        this.retry(slot, ++slot.failures);
      },
    );
    // A claimed dial's failure is the taker's to see; the pool only needs to not crash on it.
    dialling.catch(() => {});
  }

  private park(slot: Slot, conn: PeerConnection): void {
    conn.holdProcess(false);
    slot.conn = conn;
    slot.parkedAt = Date.now();
    const onClose = (): void => {
      if (slot.conn !== conn) return;
      slot.conn = undefined;
      slot.unwatch = undefined;
      this.counts.dropped++;
      // A peer that keeps dropping fresh links backs off as from failed dials; a long-lived link's drop starts over.
      if (Date.now() - slot.parkedAt >= (this.o.maxBackoffMs ?? DEFAULT_WARM_MAX_BACKOFF_MS)) slot.failures = 0;
      this.retry(slot, ++slot.failures);
    };
    conn.once('close', onClose);
    slot.unwatch = () => conn.off('close', onClose);
  }

  private retry(slot: Slot, failures: number): void {
    if (this.closed || slot.removed) return;
    const base = this.o.backoffMs ?? DEFAULT_WARM_BACKOFF_MS;
    const delay = Math.min(this.o.maxBackoffMs ?? DEFAULT_WARM_MAX_BACKOFF_MS, base * 2 ** (failures - 1));
    slot.timer = setTimeout(() => {
      slot.timer = undefined;
      this.fill(slot);
    }, delay);
    // Waiting to re-dial is no reason for the process to stay up.
    slot.timer.unref();
  }
}

/**
 * A migration's own link to `peer`: the pool's (with `handlers` installed before the caller's first
 * request, so the peer's requests find them) or, without one or when the pool's dial in flight
 * fails, `dial()` as without the pool.
 */
export async function takeOrDial(pool: WarmConnections | undefined, peer: string, handlers: HandlerTable, dial: () => Promise<PeerConnection>): Promise<PeerConnection> {
  const warm = pool?.take(peer);
  if (warm === undefined) return dial();
  let conn: PeerConnection;
  try {
    conn = await warm;
  } catch {
    return dial();
  }
  // Closed between the take and now (the peer restarted): a stale link must not fail the migration.
  if (!conn.isOpen) return dial();
  for (const [type, handler] of Object.entries(handlers) as [keyof HandlerTable, NonNullable<HandlerTable[keyof HandlerTable]>][]) {
    conn.handle(type, handler as never);
  }
  return conn;
}
