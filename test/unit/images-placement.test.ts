import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../core/errors.ts';
import { buildCosts, costTable, matrixTable, parsePolicy, rankCandidates, type Candidate, type PlacementPolicy } from '../../images/index.ts';

const MIB = 1024 * 1024;

/** Brute force: for every candidate and every block, every holder's cost; then the policy's order by exhaustive comparison. */
function bruteForce(
  hosts: readonly string[],
  m: readonly (readonly number[])[],
  blocks: readonly { bytes: number; holders: readonly number[] }[],
  candidates: readonly Candidate[],
  policy: PlacementPolicy,
): { host: string; cost: number }[] {
  const costOf = (t: string): number => {
    const ti = hosts.indexOf(t);
    let total = 0;
    for (const b of blocks) {
      let best = Infinity;
      for (const s of b.holders) best = Math.min(best, s === ti ? 0 : m[s]![ti]!);
      total += (b.bytes / MIB) * best;
    }
    return total;
  };
  const rows = candidates.map((c) => ({ ...c, cost: costOf(c.host) }));
  const metric = (c: Candidate): number => (policy.kind === 'cheapest' ? 0 : policy.by === 'cpu' ? c.cpu : -c.freeMemory);
  const costOrder = [...rows].sort((a, b) => a.cost - b.cost || (a.host < b.host ? -1 : 1));
  const cheapest = costOrder[0]!.cost;
  const preferred = (c: (typeof rows)[number]): boolean =>
    policy.kind === 'cheapest'
      ? false
      : policy.kind === 'top'
        ? costOrder.indexOf(c) < policy.x && Number.isFinite(c.cost)
        : Number.isFinite(c.cost) && c.cost <= cheapest * (1 + policy.percent / 100);
  // Selection: repeatedly take the candidate no other remaining candidate beats.
  const beats = (a: (typeof rows)[number], b: (typeof rows)[number]): boolean => {
    const pa = preferred(a);
    const pb = preferred(b);
    if (pa !== pb) return pa;
    if (pa && metric(a) !== metric(b)) return metric(a) < metric(b);
    if (a.cost !== b.cost) return a.cost < b.cost;
    return a.host < b.host;
  };
  const left = [...rows];
  const out: { host: string; cost: number }[] = [];
  while (left.length > 0) {
    const best = left.find((a) => left.every((b) => a === b || beats(a, b)))!;
    out.push({ host: best.host, cost: best.cost });
    left.splice(left.indexOf(best), 1);
  }
  return out;
}

const policyArb: fc.Arbitrary<PlacementPolicy> = fc.oneof(
  fc.constant({ kind: 'cheapest' as const }),
  fc.record({ kind: fc.constant('top' as const), x: fc.integer({ min: 1, max: 6 }), by: fc.constantFrom('cpu' as const, 'memory' as const) }),
  fc.record({ kind: fc.constant('within' as const), percent: fc.integer({ min: 0, max: 80 }), by: fc.constantFrom('cpu' as const, 'memory' as const) }),
);

describe('placement by network cost', () => {
  it('equals brute force on random cost matrices, holder sets and policies', () => {
    const scenario = fc
      .integer({ min: 2, max: 8 })
      .chain((n) =>
        fc.record({
          n: fc.constant(n),
          matrix: fc.array(fc.array(fc.integer({ min: 1, max: 20 }), { minLength: n, maxLength: n }), { minLength: n, maxLength: n }),
          blocks: fc.array(fc.record({ bytes: fc.integer({ min: 1, max: 4 * MIB }), holders: fc.uniqueArray(fc.integer({ min: 0, max: n - 1 }), { maxLength: n }) }), { minLength: 1, maxLength: 30 }),
          candidates: fc.uniqueArray(fc.integer({ min: 0, max: n - 1 }), { minLength: 1, maxLength: n }),
          cpu: fc.array(fc.integer({ min: 0, max: 4 }).map((x) => x / 4), { minLength: n, maxLength: n }),
          mem: fc.array(fc.integer({ min: 0, max: 3 }).map((x) => x * MIB), { minLength: n, maxLength: n }),
          policy: policyArb,
        }),
      );
    fc.assert(
      fc.property(scenario, (s) => {
        const hosts = Array.from({ length: s.n }, (_, i) => `h${i}`);
        const blocks = s.blocks.map((b, i) => ({ hash: `b${i}`, ...b }));
        const candidates = s.candidates.map((i) => ({ host: hosts[i]!, cpu: s.cpu[i]!, freeMemory: s.mem[i]! }));
        const costs = buildCosts(
          new Map(blocks.map((b) => [b.hash, b.bytes])),
          candidates.map((c) => c.host),
          (h) => blocks.find((b) => b.hash === h)!.holders.map((i) => ({ source: hosts[i]!, via: hosts[i]! })),
          matrixTable(hosts, s.matrix),
        );
        const ranked = rankCandidates(candidates, costs, s.policy).map((r) => ({ host: r.host, cost: r.cost }));
        const expected = bruteForce(hosts, s.matrix, blocks, candidates, s.policy);
        expect(ranked.map((r) => r.host)).toEqual(expected.map((r) => r.host));
        ranked.forEach((r, i) => (Number.isFinite(r.cost) ? expect(r.cost).toBeCloseTo(expected[i]!.cost, 6) : expect(expected[i]!.cost).toBe(Infinity)));
      }),
      { numRuns: 300 },
    );
  });

  it('policies: the top x by CPU, within x % by free memory', () => {
    const costs = new Map([['a', 10], ['b', 11], ['c', 30], ['d', 12]]);
    const cands: Candidate[] = [
      { host: 'a', cpu: 0.9, freeMemory: 1 },
      { host: 'b', cpu: 0.1, freeMemory: 2 },
      { host: 'c', cpu: 0.0, freeMemory: 9 },
      { host: 'd', cpu: 0.5, freeMemory: 5 },
    ];
    expect(rankCandidates(cands, costs, parsePolicy('cheapest')).map((c) => c.host)).toEqual(['a', 'b', 'd', 'c']);
    expect(rankCandidates(cands, costs, parsePolicy('top:2:cpu')).map((c) => c.host)).toEqual(['b', 'a', 'd', 'c']);
    expect(rankCandidates(cands, costs, parsePolicy('within:20:memory')).map((c) => c.host)).toEqual(['d', 'b', 'a', 'c']);
  });

  it('bad input: no candidates, a repeated host, a policy it cannot parse, a negative configured cost', () => {
    expect(() => rankCandidates([], new Map(), { kind: 'cheapest' })).toThrow(expect.objectContaining({ code: ErrorCodes.PLACEMENT_INPUT_INVALID }));
    const a = { host: 'a', cpu: 0, freeMemory: 0 };
    expect(() => rankCandidates([a, a], new Map(), { kind: 'cheapest' })).toThrow(expect.objectContaining({ code: ErrorCodes.PLACEMENT_INPUT_INVALID }));
    for (const p of ['top', 'top:0', 'within:x', 'best', 'top:2:disk']) expect(() => parsePolicy(p)).toThrow(expect.objectContaining({ code: ErrorCodes.PLACEMENT_INPUT_INVALID }));
    expect(() => costTable({ sameRack: -1 })).toThrow(expect.objectContaining({ code: ErrorCodes.CONFIG_INVALID }));
    expect(() => costTable({ racks: { r1: ['a'], r2: ['a'] } })).toThrow(expect.objectContaining({ code: ErrorCodes.CONFIG_INVALID }));
  });

  it('cost config: racks, a matrix over them (one direction given holds both ways), the default', () => {
    const t = costTable({ racks: { r1: ['a', 'b'], r2: ['c'] }, sameRack: 2, crossRack: 7, matrix: { a: { c: 3 }, c: { b: 9 } }, default: 50 });
    expect([t.cost('a', 'a'), t.cost('a', 'b'), t.cost('a', 'c'), t.cost('c', 'a'), t.cost('c', 'b'), t.cost('b', 'c'), t.cost('a', 'zz')]).toEqual([0, 2, 3, 3, 9, 9, 50]);
  });
});
