import { describe, expect, it } from 'vitest';
import { ConfigError, ErrorCodes, type EmbotError } from '../../core/errors.ts';
import { checkDestinationList, MAX_DESTINATIONS, parseDestinationList, resolveDestinations } from '../../core/mobility/destinations.ts';

/** The `details.problem` of what `fn` throws; it must be a DESTINATIONS_INVALID ConfigError. */
function problemOf(fn: () => unknown): unknown {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(ConfigError);
    expect((e as EmbotError).code).toBe(ErrorCodes.DESTINATIONS_INVALID);
    return (e as EmbotError).details?.['problem'];
  }
  return 'accepted';
}

const cluster = { self: 'a', peers: ['b', 'c', 'd'] };

describe('destination lists', () => {
  it('keeps the order given and trims names', () => {
    expect(parseDestinationList(' c , b')).toEqual(['c', 'b']);
    expect(resolveDestinations(['d', 'b', 'c'], cluster)).toEqual(['d', 'b', 'c']);
    expect(resolveDestinations(['b'], cluster)).toEqual(['b']);
  });

  it.each([
    [[], 'empty'],
    [[''], 'empty'],
    [[' ', ''], 'empty'],
    [['b', ''], 'blank'],
    [['b', 'c', 'b'], 'duplicate'],
    [['b', ' b'], 'duplicate'],
    [Array.from({ length: MAX_DESTINATIONS + 1 }, (_, i) => `p${i}`), 'tooMany'],
  ])('refuses %j before anything else is looked at (%s)', (list, problem) => {
    expect(problemOf(() => checkDestinationList(list))).toBe(problem);
    expect(problemOf(() => resolveDestinations(list, cluster))).toBe(problem);
  });

  it('refuses the source itself and unknown peers, naming them', () => {
    expect(problemOf(() => resolveDestinations(['b', 'a'], cluster))).toBe('self');
    expect(problemOf(() => resolveDestinations(['b', 'zz', 'yy'], cluster))).toBe('unknown');
    expect(() => resolveDestinations(['b', 'zz', 'yy'], cluster)).toThrow("no peer named 'zz', 'yy'; known: b, c, d");
    expect(() => resolveDestinations(['b', 'a'], cluster)).toThrow("a is this agent, the migration's source");
    // A source with no peers at all says how to get some.
    expect(() => resolveDestinations(['b'], { self: 'a', peers: [] })).toThrow(/known: none \(use --peers\)/);
  });

  it('a list alone says nothing about peers: only resolveDestinations knows the cluster', () => {
    expect(checkDestinationList(['a', 'zz'])).toEqual(['a', 'zz']);
  });
});
