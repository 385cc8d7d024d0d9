/**
 * Placement by network cost (the document's selection process): the cost of building an image at
 * a candidate host is, over the image's distinct blocks, the block's MiB times the cost from its
 * cheapest holder to the candidate (0 when the candidate holds it). Candidates are ranked under one
 * of the document's three policies, with CPU load and free memory beside the cost.
 */
import { EmbotError, ErrorCodes } from '../core/errors.ts';
import type { BlockHash } from './block-hash.ts';
import type { Holder } from './global-index.ts';
import { MIB, type CostTable } from './network-cost.ts';

export interface Candidate {
  readonly host: string;
  /** CPU load, 0..1 (lower is better). */
  readonly cpu: number;
  /** Free memory, bytes (higher is better). */
  readonly freeMemory: number;
}

/** The other metric of policies 2 and 3. */
export type PlacementMetric = 'cpu' | 'memory';

export type PlacementPolicy =
  /** 1: the cheapest first. */
  | { readonly kind: 'cheapest' }
  /** 2: among the `x` cheapest, the best by `by` first (then the rest by cost). */
  | { readonly kind: 'top'; readonly x: number; readonly by: PlacementMetric }
  /** 3: among those at most `percent` % costlier than the cheapest, the best by `by` first. */
  | { readonly kind: 'within'; readonly percent: number; readonly by: PlacementMetric };

export interface RankedCandidate extends Candidate {
  /** Network cost of building the image there; Infinity when some block has no holder. */
  readonly cost: number;
  /** The policy picked it from its preferred set (top x, within x %), or it is the cheapest. */
  readonly preferred: boolean;
}

/**
 * Build cost at every candidate. `blocks` maps each distinct hash to its bytes; `holdersOf` gives
 * who holds a hash (a host's own copy, or a library served by a host). A candidate that holds a
 * block itself (either way) pays nothing for it. Blocks with the same holder set are summed first,
 * so the work is candidates × holder sets × their size, not candidates × blocks.
 */
export function buildCosts(blocks: ReadonlyMap<BlockHash, number>, candidates: readonly string[], holdersOf: (h: BlockHash) => readonly Holder[], table: CostTable): Map<string, number> {
  const groups = new Map<string, { holders: Holder[]; bytes: number }>();
  for (const [h, bytes] of blocks) {
    const holders = [...holdersOf(h)].sort((a, b) => cmp(a.via, b.via) || cmp(a.source, b.source));
    const key = holders.map((x) => `${x.via}\u0001${x.source}`).join('\u0000');
    const g = groups.get(key);
    if (g) g.bytes += bytes;
    else groups.set(key, { holders, bytes });
  }
  const out = new Map<string, number>();
  for (const t of candidates) {
    let total = 0;
    for (const g of groups.values()) {
      let best = Infinity;
      for (const s of g.holders) {
        const c = s.via === t ? 0 : table.cost(s.source, t);
        if (c < best) best = c;
        if (best === 0) break;
      }
      total += (g.bytes / MIB) * best;
    }
    out.set(t, total);
  }
  return out;
}

function cmp(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

function metric(c: Candidate, by: PlacementMetric): number {
  return by === 'cpu' ? c.cpu : -c.freeMemory;
}

const byCost = (a: RankedCandidate, b: RankedCandidate): number => a.cost - b.cost || (a.host < b.host ? -1 : a.host > b.host ? 1 : 0);

/**
 * Ranks candidates under a policy. Ties break on cost, then host name, so the ranking is a function
 * of its inputs.
 *
 * @throws EmbotError `EMBOT_ERR_PLACEMENT_INPUT_INVALID` for no candidates, a repeated host, or a
 *   policy parameter out of range.
 */
export function rankCandidates(candidates: readonly Candidate[], costs: ReadonlyMap<string, number>, policy: PlacementPolicy): RankedCandidate[] {
  if (candidates.length === 0) throw new EmbotError(ErrorCodes.PLACEMENT_INPUT_INVALID, 'placement needs at least one candidate host');
  if (new Set(candidates.map((c) => c.host)).size !== candidates.length) throw new EmbotError(ErrorCodes.PLACEMENT_INPUT_INVALID, 'a candidate host is named twice');
  if (policy.kind === 'top' && !(Number.isInteger(policy.x) && policy.x >= 1)) throw new EmbotError(ErrorCodes.PLACEMENT_INPUT_INVALID, 'policy top needs x >= 1');
  if (policy.kind === 'within' && !(Number.isFinite(policy.percent) && policy.percent >= 0)) throw new EmbotError(ErrorCodes.PLACEMENT_INPUT_INVALID, 'policy within needs percent >= 0');
  const all = candidates.map((c) => ({ ...c, cost: costs.get(c.host) ?? Infinity, preferred: false })).sort(byCost);
  if (policy.kind === 'cheapest') return all.map((c, i) => ({ ...c, preferred: i === 0 }));
  const cheapest = all[0]!.cost;
  const inSet =
    policy.kind === 'top'
      ? (_c: RankedCandidate, i: number) => i < policy.x && Number.isFinite(_c.cost)
      : (c: RankedCandidate) => Number.isFinite(c.cost) && c.cost <= cheapest * (1 + policy.percent / 100);
  const preferred: RankedCandidate[] = [];
  const rest: RankedCandidate[] = [];
  all.forEach((c, i) => (inSet(c, i) ? preferred : rest).push(c));
  preferred.sort((a, b) => metric(a, policy.by) - metric(b, policy.by) || byCost(a, b));
  return [...preferred.map((c) => ({ ...c, preferred: true })), ...rest];
}

/** `cheapest`, `top:3:cpu`, `within:10:memory` → a policy. */
export function parsePolicy(text: string): PlacementPolicy {
  const [kind, n, by = 'cpu'] = text.split(':');
  const metricOk = by === 'cpu' || by === 'memory';
  if (kind === 'cheapest' && n === undefined) return { kind: 'cheapest' };
  if (kind === 'top' && metricOk && n !== undefined && /^[1-9][0-9]*$/.test(n)) return { kind: 'top', x: Number(n), by };
  if (kind === 'within' && metricOk && n !== undefined && /^[0-9]+(\.[0-9]+)?$/.test(n)) return { kind: 'within', percent: Number(n), by };
  throw new EmbotError(ErrorCodes.PLACEMENT_INPUT_INVALID, `policy ${JSON.stringify(text)}: use cheapest, top:X[:cpu|memory] or within:PERCENT[:cpu|memory]`);
}
