import { ConfigError, EmbotError, ErrorCodes } from '../errors.ts';

/**
 * Where destinations are (issue 13 point 5): the network as a tree of hosts and the switches or
 * routers between them, and the choice of N destinations whose paths from the source share no
 * intervening node, so one switch failing cannot take out two destinations of one migration.
 *
 * A tree, not a general graph: in a tree the path between two hosts is unique, so "the nodes a
 * copy crosses" is a fact of the config rather than of routing the agent cannot see. Cycles are
 * refused (README "Several destinations", "Where destinations are").
 */

/** `topology` of the agent config: switch/router names, and links between them and hosts. */
export interface TopologyConfig {
  /** Intervening nodes (switches, routers); every other link end must be a host (this agent or a peer). */
  readonly nodes: readonly string[];
  readonly links: readonly (readonly [string, string])[];
}

/** What is wrong with a topology; `details.problem` of its `EMBOT_ERR_CONFIG_INVALID`. */
export type TopologyProblem = 'unknownName' | 'nodeIsHost' | 'selfLink' | 'cycle' | 'hostMissing' | 'disconnected';

export interface Topology {
  readonly hosts: ReadonlySet<string>;
  readonly adjacency: ReadonlyMap<string, readonly string[]>;
}

function refuse(problem: TopologyProblem, message: string, names: readonly string[]): never {
  throw new EmbotError(ErrorCodes.CONFIG_INVALID, `topology: ${message}`, { details: { problem, names: [...names] } });
}

/**
 * Checks a topology against the hosts it must place (this agent and its peers) and builds it.
 *
 * @throws EmbotError `EMBOT_ERR_CONFIG_INVALID`, `details.problem` a TopologyProblem naming the culprits.
 * @example
 * ```ts
 * const t = buildTopology({ nodes: ['tor1'], links: [['a', 'tor1'], ['b', 'tor1']] }, ['a', 'b']);
 * ```
 */
export function buildTopology(config: TopologyConfig, hosts: readonly string[]): Topology {
  const hostSet = new Set(hosts);
  const nodeSet = new Set(config.nodes);
  const clash = config.nodes.filter((n) => hostSet.has(n));
  if (clash.length > 0) refuse('nodeIsHost', `${clash.join(', ')} named both as a node and as a host (this agent or a peer)`, clash);
  const adjacency = new Map<string, string[]>();
  // Union-find over the names: a link joining two names already connected closes a cycle.
  const parent = new Map<string, string>();
  const find = (x: string): string => {
    let r = x;
    while (parent.get(r) !== undefined && parent.get(r) !== r) r = parent.get(r)!;
    parent.set(x, r);
    return r;
  };
  for (const [a, b] of config.links) {
    const unknown = [a, b].filter((n) => !hostSet.has(n) && !nodeSet.has(n));
    if (unknown.length > 0) refuse('unknownName', `link [${a}, ${b}] names ${unknown.join(', ')}, neither a node in topology.nodes nor a host (known hosts: ${hosts.join(', ') || 'none'})`, unknown);
    if (a === b) refuse('selfLink', `link [${a}, ${b}] joins ${a} to itself`, [a]);
    if (!parent.has(a)) parent.set(a, a);
    if (!parent.has(b)) parent.set(b, b);
    const ra = find(a);
    const rb = find(b);
    if (ra === rb) refuse('cycle', `link [${a}, ${b}] closes a cycle (or repeats a link); the topology must be a tree, where each path is unique`, [a, b]);
    parent.set(ra, rb);
    adjacency.set(a, [...(adjacency.get(a) ?? []), b]);
    adjacency.set(b, [...(adjacency.get(b) ?? []), a]);
  }
  const missing = hosts.filter((h) => !adjacency.has(h));
  if (missing.length > 0) refuse('hostMissing', `host${missing.length === 1 ? '' : 's'} ${missing.join(', ')} not in any link`, missing);
  const roots = new Set(hosts.map(find));
  if (roots.size > 1) {
    const first = find(hosts[0]!);
    const apart = hosts.filter((h) => find(h) !== first);
    refuse('disconnected', `no path from ${hosts[0]} to ${apart.join(', ')}`, apart);
  }
  return { hosts: hostSet, adjacency };
}

/** The nodes strictly between `from` and `to` on their (unique) path, in order from `from`. */
export function intervening(t: Topology, from: string, to: string): readonly string[] {
  const prev = new Map<string, string>([[from, from]]);
  const queue = [from];
  while (queue.length > 0) {
    const at = queue.shift()!;
    if (at === to) break;
    for (const next of t.adjacency.get(at) ?? []) {
      if (!prev.has(next)) {
        prev.set(next, at);
        queue.push(next);
      }
    }
  }
  if (!prev.has(to)) throw new EmbotError(ErrorCodes.CONFIG_INVALID, `topology: no path from ${from} to ${to}`, { details: { problem: 'disconnected', names: [to] } });
  const path: string[] = [];
  for (let at = prev.get(to)!; at !== from; at = prev.get(at)!) path.unshift(at);
  return path;
}

/**
 * The nodes on the path from `source` to every other host: the source's own uplink. They fail with
 * the source's connectivity whatever the choice, so they are not what two destinations "share".
 */
export function sourceUplink(t: Topology, source: string): readonly string[] {
  const others = [...t.hosts].filter((h) => h !== source);
  if (others.length === 0) return [];
  let common = intervening(t, source, others[0]!);
  for (const h of others.slice(1)) {
    const on = new Set(intervening(t, source, h));
    common = common.filter((n) => on.has(n));
  }
  return common;
}

/** Per destination: the intervening nodes of its path from the source, less the source's uplink. */
export function routes(t: Topology, source: string, destinations: readonly string[]): ReadonlyMap<string, readonly string[]> {
  for (const name of [source, ...destinations]) {
    if (!t.hosts.has(name)) throw new EmbotError(ErrorCodes.CONFIG_INVALID, `topology: ${name} is not a host of the topology`, { details: { problem: 'unknownName', names: [name] } });
  }
  const uplink = new Set(sourceUplink(t, source));
  return new Map(destinations.map((d) => [d, intervening(t, source, d).filter((n) => !uplink.has(n))]));
}

/** Two destinations whose paths from the source cross the same nodes. */
export interface SharedNodes {
  readonly destinations: readonly [string, string];
  readonly nodes: readonly string[];
}

/** Every pair of `destinations` sharing an intervening node (empty: node-disjoint). */
export function sharedNodes(t: Topology, source: string, destinations: readonly string[]): readonly SharedNodes[] {
  const r = routes(t, source, destinations);
  const out: SharedNodes[] = [];
  for (let i = 0; i < destinations.length; i++) {
    for (let j = i + 1; j < destinations.length; j++) {
      const a = destinations[i]!;
      const b = destinations[j]!;
      const onB = new Set(r.get(b));
      const nodes = r.get(a)!.filter((n) => onB.has(n));
      if (nodes.length > 0) out.push({ destinations: [a, b], nodes });
    }
  }
  return out;
}

/** The choice and why: the `destinationChoice` of `embot migrate --to auto --count N --json`. */
export interface DestinationChoice {
  readonly chosen: readonly string[];
  /** `disjoint`: no two chosen paths share a node; `fallback`: no such set of `count` exists, so the top `count` by rank; `noTopology`: none configured, the top `count` by rank. */
  readonly how: 'disjoint' | 'fallback' | 'noTopology';
  readonly reason: string;
  /** Candidates in the order they were ranked. */
  readonly ranked: readonly string[];
  /** Each chosen destination's intervening nodes (less the source's uplink); empty without a topology. */
  readonly routes: Readonly<Record<string, readonly string[]>>;
  /** The source's uplink, not counted as shared. */
  readonly uplink: readonly string[];
  /** Pairs of the chosen set that share nodes (only with `fallback`). */
  readonly shared: readonly SharedNodes[];
}

/**
 * Chooses `count` of the `ranked` candidates (best first) whose paths from `source` are pairwise
 * node-disjoint: the first such set in rank order (lexicographic over rank positions), found by
 * backtracking. When none exists, the top `count` by rank, said so in `how` and `shared`.
 *
 * @throws ConfigError `EMBOT_ERR_DESTINATIONS_INVALID` (`details.problem` 'count') for a count below 1
 *   or above the candidates; EmbotError `EMBOT_ERR_CONFIG_INVALID` for a name not in the topology.
 */
export function chooseDestinations(t: Topology | undefined, source: string, ranked: readonly string[], count: number): DestinationChoice {
  if (!Number.isInteger(count) || count < 1 || count > ranked.length) {
    throw new ConfigError(ErrorCodes.DESTINATIONS_INVALID, `--count must be a whole number from 1 to ${ranked.length} (the candidate destinations: ${ranked.join(', ') || 'none'}), got ${count}`, { details: { problem: 'count', names: [...ranked] } });
  }
  if (t === undefined) {
    const chosen = ranked.slice(0, count);
    return { chosen, how: 'noTopology', reason: `no topology configured: the first ${count} by rank`, ranked, routes: {}, uplink: [], shared: [] };
  }
  const r = routes(t, source, ranked);
  const uplink = sourceUplink(t, source);
  const picked: number[] = [];
  const used = new Set<string>();
  const search = (from: number): boolean => {
    if (picked.length === count) return true;
    for (let i = from; i <= ranked.length - (count - picked.length); i++) {
      const nodes = r.get(ranked[i]!)!;
      if (nodes.some((n) => used.has(n))) continue;
      picked.push(i);
      for (const n of nodes) used.add(n);
      if (search(i + 1)) return true;
      picked.pop();
      for (const n of nodes) used.delete(n);
    }
    return false;
  };
  const routesOf = (chosen: readonly string[]): Record<string, readonly string[]> => Object.fromEntries(chosen.map((d) => [d, r.get(d)!]));
  if (search(0)) {
    const chosen = picked.map((i) => ranked[i]!);
    return { chosen, how: 'disjoint', reason: `first ${count} by rank whose paths from ${source} share no node`, ranked, routes: routesOf(chosen), uplink, shared: [] };
  }
  const chosen = ranked.slice(0, count);
  return {
    chosen,
    how: 'fallback',
    reason: `no ${count} of ${ranked.length} candidates have node-disjoint paths from ${source}: the first ${count} by rank, sharing nodes`,
    ranked,
    routes: routesOf(chosen),
    uplink,
    shared: sharedNodes(t, source, chosen),
  };
}
