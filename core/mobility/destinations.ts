import { ConfigError, ErrorCodes } from '../errors.ts';

/**
 * Where a migration goes: one peer (today's path, unchanged) or several at once (issue 13:
 * first to boot wins). A list of one name is the single path too.
 */
export type Destinations = string | readonly string[];

/** Why a destination list is refused; `details.problem` of `EMBOT_ERR_DESTINATIONS_INVALID`. */
export type DestinationProblem = 'empty' | 'blank' | 'duplicate' | 'tooMany' | 'self' | 'unknown';

/** Most destinations one migration may name: each costs a full copy of the VM on the source's links. */
export const MAX_DESTINATIONS = 8;

function refuse(problem: DestinationProblem, message: string, names: readonly string[]): never {
  throw new ConfigError(ErrorCodes.DESTINATIONS_INVALID, message, { details: { problem, names: [...names] } });
}

/**
 * What can be told from the list alone, so the CLI refuses it before asking the agent: not empty,
 * no blank name, no name twice, at most `MAX_DESTINATIONS`. Names are trimmed.
 *
 * @throws ConfigError `EMBOT_ERR_DESTINATIONS_INVALID` with `details.problem`.
 * @example
 * ```ts
 * checkDestinationList(['b', ' c ']); // ['b', 'c']
 * checkDestinationList(['b', 'b']);   // throws, problem 'duplicate'
 * ```
 */
export function checkDestinationList(raw: readonly string[]): readonly string[] {
  const names = raw.map((n) => n.trim());
  if (names.length === 0 || names.every((n) => n === '')) refuse('empty', 'no destination given; expected --to PEER or --to PEER,PEER…', []);
  if (names.some((n) => n === '')) refuse('blank', `a destination name is empty in ${JSON.stringify(raw.join(','))}; expected PEER,PEER…`, names);
  const twice = names.filter((n, i) => names.indexOf(n) !== i);
  if (twice.length > 0) refuse('duplicate', `destination${twice.length === 1 ? '' : 's'} ${[...new Set(twice)].join(', ')} named more than once`, [...new Set(twice)]);
  if (names.length > MAX_DESTINATIONS) refuse('tooMany', `${names.length} destinations; at most ${MAX_DESTINATIONS}`, names);
  return names;
}

/**
 * `--to b,c,…` as the CLI takes it: comma-separated peer names, checked as `checkDestinationList`.
 */
export function parseDestinationList(raw: string): readonly string[] {
  return checkDestinationList(raw.split(','));
}

/**
 * The full check the source agent makes before a several-destination migration: the list checks,
 * then no destination is the source itself and every one is a configured peer.
 *
 * @throws ConfigError `EMBOT_ERR_DESTINATIONS_INVALID` (problem `self` or `unknown` here).
 */
export function resolveDestinations(raw: readonly string[], agent: { readonly self: string; readonly peers: Iterable<string> }): readonly string[] {
  const names = checkDestinationList(raw);
  if (names.includes(agent.self)) refuse('self', `${agent.self} is this agent, the migration's source; it cannot also be a destination`, [agent.self]);
  const known = new Set(agent.peers);
  const unknown = names.filter((n) => !known.has(n));
  if (unknown.length > 0) refuse('unknown', `no peer named ${unknown.map((n) => `'${n}'`).join(', ')}; known: ${[...known].join(', ') || 'none (use --peers)'}`, unknown);
  return names;
}
