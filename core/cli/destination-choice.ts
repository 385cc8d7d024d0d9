import { InvalidArgumentError } from 'commander';
import type { ControlClient } from '../control/client.ts';
import type { AgentStatus } from '../control/control-api.ts';
import { EmbotError, ErrorCodes, isEmbotError } from '../errors.ts';
import { buildTopology, chooseDestinations, sharedNodes, type DestinationChoice, type SharedNodes, type Topology } from '../mobility/destination-topology.ts';

/**
 * `embot migrate VM --to auto --count N` and the shared-node warning of `--to b,c` (issue 13
 * point 5, README "Where destinations are"). The agent's status carries its peers and topology;
 * the choice itself is core/mobility/destination-topology.ts.
 */

/** `--count`: a whole number of at least 1 (the upper bound, the candidates, is known only later). */
export function parseCount(raw: string): number {
  const n = Number(raw);
  if (!/^\d+$/.test(raw.trim()) || n < 1) throw new InvalidArgumentError(`--count must be a whole number of at least 1, got '${raw}' [${ErrorCodes.DESTINATIONS_INVALID}]`);
  return n;
}

function topologyOf(status: AgentStatus): Topology | undefined {
  const d = status.destinations;
  return d?.topology ? buildTopology(d.topology, [status.name, ...d.peers]) : undefined;
}

/**
 * The candidates best first: by the placement of the VM's image when it has one (only peers, only
 * hosts that can build it), else the peers in config order.
 */
async function rankCandidates(client: ControlClient, vm: string, peers: readonly string[]): Promise<{ readonly ranked: readonly string[]; readonly by: 'placement' | 'config' }> {
  try {
    const report = await client.place({ vm, candidates: peers });
    return { ranked: report.candidates.filter((c) => Number.isFinite(c.cost) && peers.includes(c.host)).map((c) => c.host), by: 'placement' };
  } catch (e) {
    // No images here, or a VM without an image: nothing to rank by but the operator's order.
    if (isEmbotError(e) && (e.code === ErrorCodes.IMAGE_UNKNOWN || e.code === ErrorCodes.CONTROL_NOT_FOUND)) return { ranked: peers, by: 'config' };
    throw e;
  }
}

export type AutoChoice = DestinationChoice & { readonly rankedBy: 'placement' | 'config' };

/**
 * `--to auto --count N`: N of the source agent's peers whose paths from it share no node.
 *
 * @throws EmbotError `EMBOT_ERR_DESTINATIONS_INVALID` (count out of range), `EMBOT_ERR_CONFIG_INVALID` (topology).
 */
export async function chooseAuto(client: ControlClient, vm: string, count: number): Promise<AutoChoice> {
  const status = await client.status();
  const peers = status.destinations?.peers ?? [];
  if (peers.length === 0) throw new EmbotError(ErrorCodes.DESTINATIONS_INVALID, `${status.name} has no peers to choose from (peer.peers in its config)`, { details: { problem: 'count', names: [] } });
  const { ranked, by } = await rankCandidates(client, vm, peers);
  return { ...chooseDestinations(topologyOf(status), status.name, ranked, count), rankedBy: by };
}

/** `--to b,c`: which chosen destinations share a node (empty without a topology or when disjoint). */
export async function sharedOf(client: ControlClient, to: readonly string[]): Promise<readonly SharedNodes[]> {
  const status = await client.status();
  const t = topologyOf(status);
  if (t === undefined) return [];
  const known = to.filter((d) => t.hosts.has(d));
  // An unknown name is the agent's to refuse (DESTINATIONS_INVALID, problem 'unknown'), not ours.
  return known.length === to.length ? sharedNodes(t, status.name, to) : [];
}

export function renderChoice(c: AutoChoice): string {
  const route = (d: string): string => (c.how === 'noTopology' ? d : `${d} via ${c.routes[d]?.join('→') || 'no other node'}`);
  let out = `auto: ${c.chosen.map(route).join(', ')} (${c.reason}; ranked by ${c.rankedBy === 'placement' ? 'placement' : 'config order'}: ${c.ranked.join(', ')})\n`;
  if (c.how === 'fallback') out += renderShared(c.shared);
  return out;
}

export function renderShared(shared: readonly SharedNodes[]): string {
  return shared.map((s) => `warning: ${s.destinations.join(' and ')} share ${s.nodes.join(', ')} on their paths from here; one failing there fails both\n`).join('');
}
