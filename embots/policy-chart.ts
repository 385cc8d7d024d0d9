/**
 * A policy's statechart as plain data, read from its xstate machine definition inside the module
 * worker (plugin code never runs in the agent), so the dashboard can draw it and light up the
 * active state from the policy's state value.
 */

export interface ChartTransition {
  /** The event type (`xstate.after.…` for a delay, `` for an eventless `always`). */
  readonly event: string;
  /** Target state paths (dot-joined), empty for a self/internal transition. */
  readonly targets: readonly string[];
}

export interface ChartNode {
  /** Dot-joined path from the root, '' for the root. */
  readonly path: string;
  readonly key: string;
  readonly type: 'atomic' | 'compound' | 'parallel' | 'final' | 'history';
  /** Key of the initial child (compound states). */
  readonly initial?: string;
  readonly children: readonly ChartNode[];
  readonly transitions: readonly ChartTransition[];
}

export interface PolicyChart {
  readonly id: string;
  readonly root: ChartNode;
  /** True when the machine had more states or transitions than {@link MAX_CHART_NODES} allows; the rest is left out. */
  readonly truncated: boolean;
}

/** A chart is for looking at: a machine larger than this is cut (and says so) rather than shipped whole. */
export const MAX_CHART_NODES = 300;
const MAX_TRANSITIONS_PER_NODE = 50;

/** The slice of xstate's StateNode this reads (v5). */
interface StateNodeLike {
  readonly key: string;
  readonly path: readonly string[];
  readonly type: string;
  readonly states: Readonly<Record<string, StateNodeLike>>;
  readonly initial?: { readonly target?: readonly StateNodeLike[] };
  readonly transitions?: ReadonlyMap<string, readonly { readonly eventType: string; readonly target?: readonly StateNodeLike[] }[]>;
  readonly always?: readonly { readonly target?: readonly StateNodeLike[] }[];
}

/** Reads the chart of an xstate v5 machine; undefined for something that is not one. */
export function describeMachine(machine: unknown): PolicyChart | undefined {
  const m = machine as { readonly id?: unknown; readonly root?: StateNodeLike } | null;
  if (!m || typeof m !== 'object' || !m.root || typeof m.root !== 'object') return undefined;
  let budget = MAX_CHART_NODES;
  let truncated = false;
  const pathOf = (n: StateNodeLike): string => n.path.join('.');
  const walk = (n: StateNodeLike): ChartNode => {
    budget--;
    const transitions: ChartTransition[] = [];
    for (const [event, defs] of n.transitions ?? new Map()) {
      for (const d of defs) {
        if (transitions.length >= MAX_TRANSITIONS_PER_NODE) {
          truncated = true;
          break;
        }
        transitions.push({ event, targets: (d.target ?? []).map(pathOf) });
      }
    }
    for (const d of n.always ?? []) transitions.push({ event: '', targets: (d.target ?? []).map(pathOf) });
    const children: ChartNode[] = [];
    for (const child of Object.values(n.states ?? {})) {
      if (budget <= 0) {
        truncated = true;
        break;
      }
      children.push(walk(child));
    }
    const initial = n.initial?.target?.[0]?.key;
    return { path: pathOf(n), key: n.key, type: chartType(n.type), ...(initial === undefined ? {} : { initial }), children, transitions };
  };
  const root = walk(m.root);
  return { id: typeof m.id === 'string' ? m.id : root.key, root, truncated };
}

function chartType(t: string): ChartNode['type'] {
  return t === 'compound' || t === 'parallel' || t === 'final' || t === 'history' ? t : 'atomic';
}

/**
 * The dot-joined paths of the states a state value names: `'idle'` → `['idle']`,
 * `{ running: 'hot' }` → `['running', 'running.hot']`.
 */
export function activePaths(value: unknown, prefix = ''): string[] {
  const join = (k: string): string => (prefix === '' ? k : `${prefix}.${k}`);
  if (typeof value === 'string') return [join(value)];
  if (!value || typeof value !== 'object') return [];
  const out: string[] = [];
  for (const [k, v] of Object.entries(value as Record<string, unknown>)) {
    out.push(join(k));
    out.push(...activePaths(v, join(k)));
  }
  return out;
}
