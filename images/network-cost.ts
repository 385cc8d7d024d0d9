/**
 * Network cost between two hosts: what moving one MiB from `from` to `to` costs, in the units the
 * operator chose (hops, milliseconds...). From configuration, as racks (same host 0, same rack
 * `sameRack`, else `crossRack`) or an explicit matrix, or from measured round-trip time and
 * throughput (costFromMeasurement). The image library is the source named `library`.
 */
import { EmbotError, ErrorCodes } from '../core/errors.ts';

export const LIBRARY_SOURCE = 'library';
export const MIB = 1024 * 1024;

export interface CostTable {
  /** Cost of moving one MiB from `from` to `to`; 0 when they are the same host. */
  cost(from: string, to: string): number;
}

/** `images.cost` of the agent config (README "Images and placement"). */
export interface CostConfig {
  /** Rack name → hosts in it (the library may be placed in a rack too). */
  readonly racks?: Readonly<Record<string, readonly string[]>>;
  readonly sameRack?: number;
  readonly crossRack?: number;
  /** from → to → cost; a pair given one way holds both ways unless the other way is given too. */
  readonly matrix?: Readonly<Record<string, Readonly<Record<string, number>>>>;
  /** Any pair neither racks nor the matrix name. */
  readonly default?: number;
}

export const DEFAULT_COST = { sameRack: 1, crossRack: 4, default: 10 } as const;

function checkCost(v: unknown, where: string): number {
  if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) throw new EmbotError(ErrorCodes.CONFIG_INVALID, `images.cost${where} must be a non-negative number`);
  return v;
}

/**
 * Builds the cost table of a cost config; the matrix wins over racks for the pairs it names.
 *
 * @throws EmbotError `EMBOT_ERR_CONFIG_INVALID` for a negative or non-number cost, or a host in two racks.
 */
export function costTable(config: CostConfig = {}): CostTable {
  const sameRack = checkCost(config.sameRack ?? DEFAULT_COST.sameRack, '.sameRack');
  const crossRack = checkCost(config.crossRack ?? DEFAULT_COST.crossRack, '.crossRack');
  const fallback = checkCost(config.default ?? DEFAULT_COST.default, '.default');
  const rackOf = new Map<string, string>();
  for (const [rack, hosts] of Object.entries(config.racks ?? {})) {
    for (const h of hosts) {
      if (rackOf.has(h) && rackOf.get(h) !== rack) throw new EmbotError(ErrorCodes.CONFIG_INVALID, `images.cost.racks: ${h} is in racks ${rackOf.get(h)} and ${rack}`);
      rackOf.set(h, rack);
    }
  }
  const pairs = new Map<string, number>();
  const key = (a: string, b: string): string => `${a}\u0000${b}`;
  for (const [from, row] of Object.entries(config.matrix ?? {})) {
    for (const [to, c] of Object.entries(row)) {
      checkCost(c, `.matrix.${from}.${to}`);
      pairs.set(key(from, to), c);
      if (config.matrix?.[to]?.[from] === undefined) pairs.set(key(to, from), c);
    }
  }
  return {
    cost(from, to) {
      if (from === to) return 0;
      const explicit = pairs.get(key(from, to));
      if (explicit !== undefined) return explicit;
      const rf = rackOf.get(from);
      const rt = rackOf.get(to);
      if (rf !== undefined && rt !== undefined) return rf === rt ? sameRack : crossRack;
      return fallback;
    },
  };
}

/** A dense matrix (tests, benchmarks, measured costs): `hosts[i]` → `hosts[j]` costs `m[i][j]`. */
export function matrixTable(hosts: readonly string[], m: readonly (readonly number[])[], fallback: number = DEFAULT_COST.default): CostTable {
  const at = new Map(hosts.map((h, i) => [h, i]));
  return {
    cost(from, to) {
      if (from === to) return 0;
      const i = at.get(from);
      const j = at.get(to);
      return i === undefined || j === undefined ? fallback : m[i]![j]!;
    },
  };
}

export interface LinkMeasurement {
  readonly rttMs: number;
  readonly bytesPerSec: number;
}

/**
 * Cost of one MiB over a measured link, in milliseconds: its transfer time plus one round trip per
 * request of `requestBytes` (blocks are fetched in batches, one request at a time per holder).
 */
export function costFromMeasurement(m: LinkMeasurement, requestBytes: number): number {
  if (!(m.bytesPerSec > 0) || !(m.rttMs >= 0) || !(requestBytes > 0)) throw new EmbotError(ErrorCodes.PLACEMENT_INPUT_INVALID, 'a link measurement needs rttMs >= 0, bytesPerSec > 0 and requestBytes > 0');
  return (MIB / m.bytesPerSec) * 1000 + m.rttMs * (MIB / requestBytes);
}
