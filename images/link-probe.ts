/**
 * Measured network cost (issue 14 point 3): this host's links to its peers, measured instead of
 * configured. The round trip comes from a Ping over the authenticated peer link (probed every
 * `probeMs`), the throughput from the block fetches this host makes (bytes of a reply over its
 * time, replies of at least MIN_TRANSFER_BYTES only, so latency does not pass for bandwidth). A
 * measurement older than `maxAgeMs` is not used; a link with none (or a peer whose probe answer
 * was not one) costs what the config says.
 */
import { EmbotError, ErrorCodes } from '../core/errors.ts';
import { costFromMeasurement, type CostTable } from './network-cost.ts';

/** `images.cost.measure` of the agent config (README "Images and placement"). */
export interface MeasureConfig {
  /** Ping each peer this often. */
  readonly probeMs: number;
  /** A measurement older than this is not used. */
  readonly maxAgeMs: number;
  /** Throughput assumed for a link with a round trip measured but no block fetch yet. */
  readonly assumeBytesPerSec: number;
  /** Bytes per block request (the cost adds one round trip per request). */
  readonly requestBytes: number;
}

export const DEFAULT_MEASURE: MeasureConfig = { probeMs: 10_000, maxAgeMs: 60_000, assumeBytesPerSec: 100 * 1024 * 1024, requestBytes: 4 * 1024 * 1024 };

/** A reply smaller than this says more about latency than bandwidth: not counted as throughput. */
export const MIN_TRANSFER_BYTES = 256 * 1024;

/** What one link's measurement looks like in `embot images --json` (`links`). */
export interface LinkReport {
  readonly peer: string;
  readonly rttMs: number;
  /** Measured from block fetches; absent: none yet (the assumed figure is used). */
  readonly bytesPerSec?: number;
  /** Age of the round trip, ms. */
  readonly ageMs: number;
  /** Cost of one MiB from the peer to this host, ms (what the cost table uses while fresh). */
  readonly cost: number;
}

/** Enough of a peer link to probe it. */
export interface Probeable {
  request(frame: { readonly type: 'Ping'; readonly ts: number }, options?: { readonly timeoutMs?: number }): Promise<unknown>;
}

interface Link {
  rttMs: number;
  rttAt: number;
  bytesPerSec?: number;
  bpsAt?: number;
}

/**
 * Checks a peer's answer to a probe.
 *
 * @throws EmbotError `EMBOT_ERR_COST_PROBE_INVALID` unless it is a Pong echoing `sentTs`.
 */
export function checkProbeReply(peer: string, sentTs: number, reply: unknown): void {
  const r = reply as { type?: unknown; ts?: unknown } | null;
  if (typeof r !== 'object' || r === null || r.type !== 'Pong') throw new EmbotError(ErrorCodes.COST_PROBE_INVALID, `${peer} answered a link probe with ${describe(r?.type)}, not a Pong`, { details: { peer } });
  if (r.ts !== sentTs) throw new EmbotError(ErrorCodes.COST_PROBE_INVALID, `${peer} answered a link probe with ts ${describe(r.ts)}, not the ${sentTs} it was sent`, { details: { peer } });
}

function describe(v: unknown): string {
  return typeof v === 'string' || typeof v === 'number' ? JSON.stringify(v) : typeof v;
}

export class LinkMeasurements {
  private readonly links = new Map<string, Link>();
  private readonly now: () => number;

  constructor(
    readonly self: string,
    readonly config: MeasureConfig,
    now?: () => number,
  ) {
    this.now = now ?? Date.now;
  }

  /**
   * Measures the round trip to `peer` over `conn`. A bad answer forgets what was measured of the
   * link (its cost is the config's again) and rejects.
   *
   * @throws EmbotError `EMBOT_ERR_COST_PROBE_INVALID` for an answer that is not the Pong asked for;
   *   the link's own errors (closed, timeout) as they are.
   */
  async probe(peer: string, conn: Probeable, timeoutMs: number): Promise<number> {
    const ts = this.now();
    const t0 = performance.now();
    try {
      const reply = await conn.request({ type: 'Ping', ts }, { timeoutMs });
      checkProbeReply(peer, ts, reply);
    } catch (e) {
      this.links.delete(peer);
      throw e;
    }
    const rttMs = performance.now() - t0;
    const l = this.links.get(peer);
    if (l) {
      l.rttMs = rttMs;
      l.rttAt = this.now();
    } else this.links.set(peer, { rttMs, rttAt: this.now() });
    return rttMs;
  }

  /** A block fetch from `peer`: `bytes` arrived `ms` after the request. */
  recordTransfer(peer: string, bytes: number, ms: number): void {
    const l = this.links.get(peer);
    if (!l || bytes < MIN_TRANSFER_BYTES || !(ms > 0)) return;
    l.bytesPerSec = bytes / (ms / 1000);
    l.bpsAt = this.now();
  }

  /** Cost of one MiB from `peer` to this host, if the link has a fresh measurement. */
  measuredCost(peer: string): number | undefined {
    const l = this.links.get(peer);
    const now = this.now();
    if (!l || now - l.rttAt > this.config.maxAgeMs) return undefined;
    const bps = l.bytesPerSec !== undefined && l.bpsAt !== undefined && now - l.bpsAt <= this.config.maxAgeMs ? l.bytesPerSec : this.config.assumeBytesPerSec;
    return costFromMeasurement({ rttMs: l.rttMs, bytesPerSec: bps }, this.config.requestBytes);
  }

  /** The cost table with this host's measured links over `configured` (links both ways alike). */
  table(configured: CostTable): CostTable {
    return {
      cost: (from, to) => {
        if (from === to) return 0;
        const other = to === this.self ? from : from === this.self ? to : undefined;
        const m = other === undefined ? undefined : this.measuredCost(other);
        return m ?? configured.cost(from, to);
      },
    };
  }

  report(): LinkReport[] {
    const now = this.now();
    const out: LinkReport[] = [];
    for (const [peer, l] of [...this.links].sort(([a], [b]) => a.localeCompare(b))) {
      const cost = this.measuredCost(peer);
      if (cost === undefined) continue;
      out.push({ peer, rttMs: l.rttMs, ...(l.bytesPerSec === undefined ? {} : { bytesPerSec: Math.round(l.bytesPerSec) }), ageMs: now - l.rttAt, cost });
    }
    return out;
  }
}

/**
 * The cost table with the links the group's members measured (the indexer's answer) over `base`:
 * a pair measured from both ends costs the mean of the two.
 */
export function groupMeasuredTable(links: readonly (readonly [string, string, number])[], base: CostTable): CostTable {
  const sums = new Map<string, { sum: number; n: number }>();
  const key = (a: string, b: string): string => (a < b ? `${a}\u0000${b}` : `${b}\u0000${a}`);
  for (const [from, to, cost] of links) {
    if (from === to) continue;
    const e = sums.get(key(from, to)) ?? { sum: 0, n: 0 };
    e.sum += cost;
    e.n++;
    sums.set(key(from, to), e);
  }
  return {
    cost: (from, to) => {
      if (from === to) return 0;
      const e = sums.get(key(from, to));
      return e ? e.sum / e.n : base.cost(from, to);
    },
  };
}
