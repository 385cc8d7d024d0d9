import fc from 'fast-check';
import { validateConfig } from '../../core/config/config.ts';
import { parseCount, renderChoice } from '../../core/cli/destination-choice.ts';
import { describe, expect, it } from 'vitest';
import { buildTopology, chooseDestinations, intervening, sharedNodes, sourceUplink, type Topology, type TopologyConfig } from '../../core/mobility/destination-topology.ts';

/** Two racks under one spine, a third rack under a second spine joined to the first by a core router. */
const FABRIC: TopologyConfig = {
  nodes: ['tor1', 'tor2', 'tor3', 'spine1', 'spine2', 'core'],
  links: [
    ['a', 'tor1'], ['b', 'tor1'], ['c', 'tor2'], ['d', 'tor2'], ['e', 'tor3'], ['f', 'tor3'],
    ['tor1', 'spine1'], ['tor2', 'spine1'], ['tor3', 'spine2'], ['spine1', 'core'], ['spine2', 'core'],
  ],
};
const HOSTS = ['a', 'b', 'c', 'd', 'e', 'f'];

function problemOf(f: () => unknown): { code: string; problem: unknown; names: unknown } {
  try {
    f();
  } catch (e) {
    const err = e as { code: string; details?: { problem?: unknown; names?: unknown } };
    return { code: err.code, problem: err.details?.problem, names: err.details?.names };
  }
  throw new Error('expected a refusal');
}

describe('topology config', () => {
  it('paths in a tree: intervening nodes and the source uplink', () => {
    const t = buildTopology(FABRIC, HOSTS);
    expect(intervening(t, 'a', 'e')).toEqual(['tor1', 'spine1', 'core', 'spine2', 'tor3']);
    expect(intervening(t, 'a', 'b')).toEqual(['tor1']);
    expect(sourceUplink(t, 'a')).toEqual(['tor1']);
    expect(sharedNodes(t, 'a', ['c', 'd'])).toEqual([{ destinations: ['c', 'd'], nodes: ['spine1', 'tor2'] }]);
    expect(sharedNodes(t, 'a', ['b', 'c'])).toEqual([]);
    // Both leave rack tor1 through spine1: one spine failing would take out both.
    expect(sharedNodes(t, 'a', ['b', 'c', 'e'])).toEqual([{ destinations: ['c', 'e'], nodes: ['spine1'] }]);
  });

  it.each([
    ['an unknown name in a link', { nodes: ['tor1'], links: [['a', 'tor1'], ['b', 'torX']] }, 'unknownName', ['torX']],
    ['a node named like a host', { nodes: ['tor1', 'b'], links: [['a', 'tor1']] }, 'nodeIsHost', ['b']],
    ['a link to itself', { nodes: ['tor1'], links: [['tor1', 'tor1']] }, 'selfLink', ['tor1']],
    ['a cycle', { nodes: ['t1', 't2'], links: [['a', 't1'], ['b', 't2'], ['t1', 't2'], ['a', 't2']] }, 'cycle', ['a', 't2']],
    ['a repeated link', { nodes: ['t1'], links: [['a', 't1'], ['b', 't1'], ['t1', 'a']] }, 'cycle', ['t1', 'a']],
    ['a host in no link', { nodes: ['t1'], links: [['a', 't1']] }, 'hostMissing', ['b']],
    ['hosts with no path between them', { nodes: ['t1', 't2'], links: [['a', 't1'], ['b', 't2']] }, 'disconnected', ['b']],
  ] as const)('refuses %s with a coded error naming it', (_what, config, problem, names) => {
    const got = problemOf(() => buildTopology(config as unknown as TopologyConfig, ['a', 'b']));
    expect(got).toEqual({ code: 'EMBOT_ERR_CONFIG_INVALID', problem, names });
  });
});

describe('chooseDestinations', () => {
  const t = buildTopology(FABRIC, HOSTS);

  it('skips a candidate sharing a node with a better-ranked one', () => {
    const c = chooseDestinations(t, 'a', ['c', 'd', 'e', 'b'], 2);
    expect(c.how).toBe('disjoint');
    expect(c.chosen).toEqual(['c', 'b']);
    expect(c.uplink).toEqual(['tor1']);
    expect(c.routes).toEqual({ c: ['spine1', 'tor2'], b: [] });
    // From e, a and c both cross core (spine2 is e's uplink); f sits in e's own rack.
    expect(chooseDestinations(t, 'e', ['a', 'c', 'f'], 2).chosen).toEqual(['a', 'f']);
  });

  it('falls back to the top N by rank, naming the shared nodes, when no disjoint set exists', () => {
    const c = chooseDestinations(t, 'a', ['c', 'd', 'e'], 3);
    expect(c.how).toBe('fallback');
    expect(c.chosen).toEqual(['c', 'd', 'e']);
    expect(c.shared.map((s) => s.destinations)).toEqual([['c', 'd'], ['c', 'e'], ['d', 'e']]);
  });

  it('without a topology takes the first N by rank', () => {
    expect(chooseDestinations(undefined, 'a', ['c', 'd', 'e'], 2)).toMatchObject({ how: 'noTopology', chosen: ['c', 'd'] });
  });

  it.each([0, -1, 4, 1.5])('refuses count %s', (n) => {
    expect(problemOf(() => chooseDestinations(t, 'a', ['c', 'd', 'e'], n))).toMatchObject({ code: 'EMBOT_ERR_DESTINATIONS_INVALID', problem: 'count' });
  });

  it('refuses a candidate that is not in the topology', () => {
    expect(problemOf(() => chooseDestinations(t, 'a', ['c', 'zz'], 1))).toMatchObject({ code: 'EMBOT_ERR_CONFIG_INVALID', problem: 'unknownName', names: ['zz'] });
  });
});

/** A random tree: node i > 0 hangs under a random earlier node; some leaves are hosts. */
const arbTree = fc.integer({ min: 2, max: 14 }).chain((size) =>
  fc.tuple(
    fc.array(fc.nat(), { minLength: size - 1, maxLength: size - 1 }),
    fc.array(fc.boolean(), { minLength: size, maxLength: size }),
  ).map(([parents, hostFlags]) => {
    const name = (i: number, host: boolean): string => (host ? `h${i}` : `n${i}`);
    const isHost = hostFlags.map((f, i) => f || i === 0 || i === 1);
    const links: [string, string][] = parents.map((p, k) => {
      const i = k + 1;
      const parent = p % i;
      return [name(i, isHost[i]!), name(parent, isHost[parent]!)];
    });
    const hosts = isHost.flatMap((h, i) => (h ? [name(i, true)] : []));
    const nodes = isHost.flatMap((h, i) => (h ? [] : [name(i, false)]));
    return { config: { nodes, links } as TopologyConfig, hosts };
  }),
);

function bruteForce(t: Topology, source: string, ranked: readonly string[], count: number): readonly string[] | undefined {
  // Every combination of `count` positions in lexicographic order; the first pairwise-disjoint one.
  const combos = (start: number, k: number): number[][] => (k === 0 ? [[]] : Array.from({ length: Math.max(0, ranked.length - start) }, (_, o) => start + o).flatMap((i) => combos(i + 1, k - 1).map((rest) => [i, ...rest])));
  for (const combo of combos(0, count)) {
    const set = combo.map((i) => ranked[i]!);
    if (sharedNodes(t, source, set).length === 0) return set;
  }
  return undefined;
}

describe('chooseDestinations against brute force (random trees)', () => {
  it('finds the first disjoint set in rank order whenever one exists, and falls back only when none does', () => {
    fc.assert(
      fc.property(arbTree, fc.nat(), fc.nat(), fc.nat(), ({ config, hosts }, srcPick, countPick, shuffleSeed) => {
        const t = buildTopology(config, hosts);
        const source = hosts[srcPick % hosts.length]!;
        const others = hosts.filter((h) => h !== source);
        const ranked = [...others].sort((x, y) => ((x.charCodeAt(1) * 31 + shuffleSeed) % 17) - ((y.charCodeAt(1) * 31 + shuffleSeed) % 17) || x.localeCompare(y));
        const count = 1 + (countPick % ranked.length);
        const got = chooseDestinations(t, source, ranked, count);
        const expected = bruteForce(t, source, ranked, count);
        if (expected === undefined) {
          expect(got.how).toBe('fallback');
          expect(got.chosen).toEqual(ranked.slice(0, count));
          expect(got.shared.length).toBeGreaterThan(0);
        } else {
          expect(got.how).toBe('disjoint');
          expect(got.chosen).toEqual(expected);
          expect(sharedNodes(t, source, got.chosen)).toEqual([]);
        }
      }),
      { numRuns: 300 },
    );
  });
});

describe('topology in the agent config', () => {
  const base = { name: 'a', peer: { peers: { b: 'ws://127.0.0.1:7402', c: 'ws://127.0.0.1:7403' } } };

  it('takes a tree naming this agent and every peer', () => {
    const config = validateConfig({ ...base, topology: { nodes: ['tor1', 'tor2'], links: [['a', 'tor1'], ['b', 'tor1'], ['c', 'tor2'], ['tor1', 'tor2']] } });
    expect(config.topology?.links).toHaveLength(4);
  });

  it.each([
    ['an unknown name', { nodes: ['tor1'], links: [['a', 'tor1'], ['b', 'tor1'], ['c', 'torX']] }, /torX/],
    ['a peer missing', { nodes: ['tor1'], links: [['a', 'tor1'], ['b', 'tor1']] }, /host c not in any link/],
    ['a cycle', { nodes: ['t1', 't2'], links: [['a', 't1'], ['b', 't1'], ['c', 't2'], ['t1', 't2'], ['b', 't2']] }, /closes a cycle/],
    ['a link of one name', { nodes: ['t1'], links: [['a']] }, /topology\.links/],
  ])('refuses %s with EMBOT_ERR_CONFIG_INVALID naming it', (_what, topology, message) => {
    let err: { code?: string; message?: string } = {};
    try {
      validateConfig({ ...base, topology });
    } catch (e) {
      err = e as typeof err;
    }
    expect(err.code).toBe('EMBOT_ERR_CONFIG_INVALID');
    expect(err.message).toMatch(message);
  });
});

describe('CLI rendering and --count parsing', () => {
  const t = buildTopology(FABRIC, HOSTS);

  it('names each chosen destination with its route, and warns per shared pair on a fallback', () => {
    expect(renderChoice({ ...chooseDestinations(t, 'a', ['c', 'd', 'b'], 2), rankedBy: 'config' })).toBe(
      'auto: c via spine1→tor2, b via no other node (first 2 by rank whose paths from a share no node; ranked by config order: c, d, b)\n',
    );
    const fallback = renderChoice({ ...chooseDestinations(t, 'a', ['c', 'd'], 2), rankedBy: 'placement' });
    expect(fallback).toMatch(/no 2 of 2 candidates have node-disjoint paths from a/);
    expect(fallback).toContain('warning: c and d share spine1, tor2 on their paths from here');
  });

  it.each(['0', '-1', '1.5', 'x', ''])('--count %j is a usage error', (raw) => {
    expect(() => parseCount(raw)).toThrow(/--count must be a whole number of at least 1/);
  });

  it('--count 3 is 3', () => expect(parseCount('3')).toBe(3));
});
