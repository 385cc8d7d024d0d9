/**
 * Replays every edge of a policy machine's abstract state graph (@xstate/graph) on a real actor
 * under fake timers: a shortest path to the edge's source, then the edge, checking the abstract
 * state after each step. Pair it with TransitionCoverage (./coverage.ts) to prove every state and
 * transition was reached.
 */
import { adjacencyMapToArray, getAdjacencyMap, getShortestPaths } from '@xstate/graph';
import { expect, vi } from 'vitest';
import type { AnyActorRef, AnyStateMachine, Snapshot } from 'xstate';
import type { OutcomeBuilder } from './policy-events.ts';

/** A machine snapshot as the graph options see it. */
export type GraphSnapshot<C = unknown> = Snapshot<unknown> & { value: unknown; context: C; matches(v: unknown): boolean };

/** One step of a replay: the event to send and the snapshot the model says follows. */
export interface ReplayStep<S, E> {
  readonly event: E;
  readonly expect: S;
}

export interface GraphOptions<S, E> {
  /** Events offered in each state; delayed ones only where their timer runs, as time is global. */
  readonly events: (s: S) => E[];
  /** Snapshots with equal strings are one node of the graph. */
  readonly abstract: (s: S) => string;
}

export interface GraphEdge<S, E> {
  readonly state: S;
  readonly event: E;
  readonly nextState: S;
}

export interface EdgeGraph<S, E> {
  readonly edges: readonly GraphEdge<S, E>[];
  /** The steps of a shortest path to `edge`'s source, then `edge` itself; fails the test if there is no such path. */
  stepsThrough(edge: GraphEdge<S, E>): ReplayStep<S, E>[];
}

/**
 * The abstract graph of `machine` and, for each edge, how to reach and take it.
 *
 * @example
 * ```ts
 * const graph = edgeGraph(model, { events: eventsFor, abstract });
 * expect(graph.edges.length).toBeGreaterThan(12);
 * replayEveryEdge(graph, () => createActor(model, { inspect: coverage.inspect }).start(), { abstract, delayOf, send });
 * ```
 */
export function edgeGraph<S extends GraphSnapshot, E extends { type: string }>(machine: AnyStateMachine, options: GraphOptions<S, E>): EdgeGraph<S, E> {
  const traversal = { events: (s: S) => options.events(s), serializeState: (s: S) => options.abstract(s) };
  const paths = getShortestPaths(machine, traversal as never);
  const pathTo = new Map(paths.map((p) => [options.abstract(p.state as unknown as S), p]));
  const edges = adjacencyMapToArray(getAdjacencyMap(machine, traversal as never)) as unknown as GraphEdge<S, E>[];
  return {
    edges,
    stepsThrough(edge) {
      const path = pathTo.get(options.abstract(edge.state));
      expect(path, `no path to ${options.abstract(edge.state)}`).toBeDefined();
      return [...path!.steps.slice(1).map((s) => ({ event: s.event as E, expect: s.state as unknown as S })), { event: edge.event, expect: edge.nextState }];
    },
  };
}

export interface ReplayOptions<S, E> {
  readonly abstract: (s: S) => string;
  /** The delay a synthetic `xstate.after.*` event stands for; undefined for an event to send. */
  readonly delayOf: (e: E, before: S) => number | undefined;
  /** Sends an ordinary event to `actor` (given the snapshot before it). */
  readonly send: (actor: AnyActorRef, e: E, before: S) => void;
}

/**
 * Runs `steps` on `actor` under fake timers: a delayed event is a wait that must change nothing until
 * its last millisecond; after every step the actor's abstract state must be the model's.
 *
 * @example
 * ```ts
 * replaySteps(actor, graph.stepsThrough(edge), { abstract, delayOf: () => undefined, send: (a, e) => a.send(e) });
 * ```
 */
export function replaySteps<S, E extends { type: string }>(actor: AnyActorRef, steps: readonly ReplayStep<S, E>[], options: ReplayOptions<S, E>): void {
  const { abstract } = options;
  for (const step of steps) {
    const before = actor.getSnapshot() as S;
    const e = step.event;
    const delay = options.delayOf(e, before);
    if (delay !== undefined) {
      vi.advanceTimersByTime(delay - 1);
      expect(abstract(actor.getSnapshot() as S)).toBe(abstract(before));
      vi.advanceTimersByTime(1);
    } else {
      options.send(actor, e, before);
    }
    expect(abstract(actor.getSnapshot() as S), `after ${e.type} from ${abstract(before)}`).toBe(abstract(step.expect));
  }
}

/**
 * Replays every edge of `graph`, each on a fresh actor from `start` with no timer left over from the
 * one before; `start` wires the actor's `inspect` to whatever measures coverage.
 *
 * @example
 * ```ts
 * const coverage = new TransitionCoverage(model);
 * replayEveryEdge(graph, () => createActor(model, { inspect: coverage.inspect }).start(), { abstract, delayOf, send });
 * expect(coverage.missingTransitions()).toEqual([]);
 * ```
 */
export function replayEveryEdge<S, E extends { type: string }>(graph: EdgeGraph<S, E>, start: () => AnyActorRef, options: ReplayOptions<S, E>): void {
  for (const edge of graph.edges) {
    const steps = graph.stepsThrough(edge);
    vi.clearAllTimers();
    const actor = start();
    replaySteps(actor, steps, options);
    actor.stop();
  }
}

/**
 * A `send` for policies that tag each effect by attempt. Abstract states merge attempts, so an
 * outcome from the model (other than one tagged `stale`) is rebuilt to answer the attempt this actor
 * is waiting for; any other event is sent re-stamped with the current time.
 *
 * @example
 * ```ts
 * const send = sendAnsweringAttempt(outcome, (before: Snap) => restartTag(before.context.attempt));
 * ```
 */
export function sendAnsweringAttempt<S, E extends { type: string; payload: unknown }>(outcome: OutcomeBuilder, tagOf: (before: S) => string): ReplayOptions<S, E>['send'] {
  return (actor, e, before) => {
    if ((e.type === 'EFFECT_DONE' || e.type === 'EFFECT_FAILED') && (e.payload as { tag: string }).tag !== 'stale') {
      actor.send(outcome(e.type, tagOf(before)));
    } else {
      actor.send({ ...e, ts: Date.now() });
    }
  };
}
