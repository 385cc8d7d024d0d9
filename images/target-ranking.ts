/**
 * The dashboard's migration-target list ranked by placement (issue 14): the hosts where building
 * the VM's image costs the network least come first. Structural types only, so the control layer's
 * `TargetChoice` fits without this folder importing it.
 */
import { describeError } from '../core/errors.ts';
import type { PlacementReport } from './image-service.ts';
import type { PlacementPolicy } from './placement.ts';

export interface TargetLike {
  readonly name: string;
  readonly reachable: boolean;
}

export type RankedTarget<T extends TargetLike> = T & { readonly score?: number; readonly why?: string; readonly rankedBy: string };

/** The two things the ranking needs of the image service. */
export interface PlacementSource {
  vmImage(vm: string): string | undefined;
  place(image: string, candidates: readonly string[] | undefined, policy: PlacementPolicy): Promise<PlacementReport>;
}

export const RANKED_BY_PLACEMENT = 'placement:cheapest';

/**
 * Orders `candidates` for `vm`: reachable before unreachable (an unreachable host cannot take the
 * VM whatever it costs), then by the network cost of building the VM's image there; a host that
 * cannot build it (no holder for some block) last. `score` is that cost, `why` says it in words.
 * A VM without an image, or a placement that fails (the indexer is away), leaves the order as
 * given, with `why` saying so.
 */
export async function rankTargetsByImage<T extends TargetLike>(images: PlacementSource, vm: string, candidates: readonly T[]): Promise<RankedTarget<T>[]> {
  const image = images.vmImage(vm);
  if (image === undefined || candidates.length === 0) return candidates.map((c) => ({ rankedBy: 'configured-order', ...c }));
  let report: PlacementReport;
  try {
    report = await images.place(image, candidates.map((c) => c.name), { kind: 'cheapest' });
  } catch (e) {
    return candidates.map((c) => ({ ...c, rankedBy: 'configured-order', why: `placement unavailable: ${describeError(e)}` }));
  }
  const rank = new Map(report.candidates.map((c, i) => [c.host, { i, cost: c.cost }]));
  const key = (c: T): [number, number] => [c.reachable ? 0 : 1, rank.get(c.name)?.i ?? Number.MAX_SAFE_INTEGER];
  const ordered = [...candidates].sort((a, b) => {
    const [ra, ia] = key(a);
    const [rb, ib] = key(b);
    return ra - rb || ia - ib;
  });
  return ordered.map((c) => {
    const cost = rank.get(c.name)?.cost;
    if (cost === undefined) return { ...c, rankedBy: RANKED_BY_PLACEMENT, why: `not ranked for ${image}` };
    if (!Number.isFinite(cost)) return { ...c, rankedBy: RANKED_BY_PLACEMENT, why: `cannot build ${image}: some block has no holder` };
    return { ...c, rankedBy: RANKED_BY_PLACEMENT, score: cost, why: cost === 0 ? `holds ${image} already` : `building ${image} costs ${cost.toFixed(2)}` };
  });
}
