/**
 * Transition coverage of an xstate machine, measured from inspection events: which state nodes
 * were entered and which transition candidates were taken, across any number of actors.
 * Transitions are keyed `<state id>|<event>|<candidate index>`.
 */
import type { AnyStateMachine, InspectionEvent } from 'xstate';
import { getStateNodes } from '@xstate/graph';

type StateNode = AnyStateMachine['root'];

/** `<state id>|<event>|<candidate index>` for every transition candidate the machine defines. */
export function allTransitions(machine: AnyStateMachine): Set<string> {
  const keys = new Set<string>();
  for (const node of [machine.root, ...getStateNodes(machine.root)]) {
    for (const [event, defs] of node.transitions) defs.forEach((_d: unknown, i: number) => keys.add(`${node.id}|${event}|${i}`));
    node.always?.forEach((_d: unknown, i: number) => keys.add(`${node.id}|always|${i}`));
  }
  return keys;
}

export function allStateIds(machine: AnyStateMachine): string[] {
  return [machine.root, ...getStateNodes(machine.root)].map((n) => n.id);
}

export function transitionKey(t: { source: StateNode; eventType: string }): string {
  const always = t.source.always?.indexOf(t as never) ?? -1;
  if (always >= 0) return `${t.source.id}|always|${always}`;
  return `${t.source.id}|${t.eventType}|${t.source.transitions.get(t.eventType)?.indexOf(t as never)}`;
}

/**
 * Collects coverage from every actor given its `inspect`; compare against the machine at the end.
 *
 * @example
 * ```ts
 * const coverage = new TransitionCoverage(createSourceMachine());
 * createActor(machine, { input, inspect: coverage.inspect }).start();
 * // ... after all scenarios:
 * expect(coverage.missingTransitions()).toEqual([]);
 * ```
 */
export class TransitionCoverage {
  readonly taken = new Set<string>();
  readonly visited = new Set<string>();

  constructor(private readonly machine: AnyStateMachine) {}

  readonly inspect = (i: InspectionEvent): void => {
    if (i.type !== '@xstate.microstep') return;
    for (const t of (i as unknown as { _transitions: { source: StateNode; eventType: string }[] })._transitions) {
      this.taken.add(transitionKey(t));
      this.visited.add(t.source.id);
    }
    for (const node of (i.snapshot as unknown as { _nodes?: { id: string }[] })._nodes ?? []) this.visited.add(node.id);
  };

  missingTransitions(): string[] {
    return [...allTransitions(this.machine)].filter((k) => !this.taken.has(k));
  }

  missingStates(): string[] {
    return allStateIds(this.machine).filter((id) => !this.visited.has(id));
  }
}
