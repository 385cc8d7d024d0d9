import type { ChartNode, PolicyChart } from '../../embots/policy-chart.ts';
import { activePaths } from '../../embots/policy-chart.ts';
import { s } from './dom.ts';

interface Box {
  readonly node: ChartNode;
  x: number;
  y: number;
  readonly w: number;
  readonly h: number;
  readonly children: readonly Box[];
}

const LEAF_H = 34;
const PAD = 12;
const HEADER = 20;
const GAP_X = 96;
/** Room above and below a row of states for the arcs between them. */
const ARC_ROOM = 70;
const MAX_ARC = 62;

/**
 * Sizes a state and its children. Children sit in one row, in definition order: transitions
 * between them are arcs, forward ones above the row and backward ones below, each label at its
 * arc's top, so labels of different pairs land at different places.
 */
function measure(node: ChartNode): Box {
  const leafW = Math.max(84, node.key.length * 8 + 28);
  if (node.children.length === 0) return { node, x: 0, y: 0, w: leafW, h: LEAF_H, children: [] };
  const kids = node.children.map(measure);
  const rowH = Math.max(...kids.map((k) => k.h));
  // A row whose states have no transitions between them needs no room for arcs.
  const arcs = node.children.some((c) => c.transitions.some((t) => t.targets.length > 0)) ? ARC_ROOM : 12;
  let x = PAD + 18;
  for (const k of kids) {
    k.x = x;
    k.y = HEADER + arcs + (rowH - k.h) / 2;
    x += k.w + GAP_X;
  }
  return { node, x: 0, y: 0, w: Math.max(leafW, x - GAP_X + PAD), h: HEADER + arcs * 2 + rowH, children: kids };
}

function flatten(b: Box, ox: number, oy: number, out: Map<string, { x: number; y: number; w: number; h: number; box: Box }>): void {
  const x = ox + b.x;
  const y = oy + b.y;
  out.set(b.node.path, { x, y, w: b.w, h: b.h, box: b });
  for (const c of b.children) flatten(c, x, y, out);
}

function eventLabel(event: string): string {
  // xstate names a delayed transition `xstate.after.<delay>.<state id>`; the delay is ms or a named delay.
  const after = /^xstate\.after\.([^.]+)\./.exec(event);
  if (after) return /^\d+$/.test(after[1]!) ? `after ${after[1]} ms` : `after ${after[1]}`;
  if (event === '') return 'always';
  return event;
}

let markerSeq = 0;

/**
 * Draws a policy's statechart (from its machine definition) as SVG, with the states of `value`
 * marked active. Every label is a text node.
 */
export function statechart(chart: PolicyChart, value: unknown, title: string): SVGSVGElement {
  const root = measure(chart.root);
  const boxes = new Map<string, { x: number; y: number; w: number; h: number; box: Box }>();
  flatten(root, 0, 0, boxes);
  const active = new Set(activePaths(value));
  const markerId = `arrow-${++markerSeq}`;
  const svg = s('svg', { class: 'statechart', viewBox: `-4 -4 ${root.w + 8} ${root.h + 8}`, width: root.w + 8, height: root.h + 8, role: 'img', 'aria-label': title });
  svg.append(s('title', {}, title));
  svg.append(s('defs', {}, s('marker', { id: markerId, viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse' }, s('path', { d: 'M 0 0 L 10 5 L 0 10 z', class: 'arrowhead' }))));

  const states = s('g', { class: 'states' });
  const edges = s('g', { class: 'edges' });
  for (const [path, b] of boxes) {
    const isRoot = path === '';
    const isCompound = b.box.children.length > 0;
    const cls = ['state', isRoot ? 'root' : '', isCompound ? 'compound' : 'leaf', active.has(path) ? 'active' : '', b.box.node.type === 'final' ? 'final' : ''].filter(Boolean).join(' ');
    const g = s('g', { class: cls, 'data-state': path || '(root)' });
    g.append(s('rect', { x: b.x, y: b.y, width: b.w, height: b.h, rx: isCompound ? 10 : 16 }));
    const label = isRoot ? chart.id : b.box.node.key;
    g.append(isCompound ? s('text', { x: b.x + 10, y: b.y + 15, class: 'label compound-label' }, label) : s('text', { x: b.x + b.w / 2, y: b.y + b.h / 2 + 4, class: 'label', 'text-anchor': 'middle' }, label));
    states.append(g);

    // Initial-state marker: a dot with an arrow into the initial child.
    const initial = b.box.node.initial;
    const init = initial === undefined ? undefined : boxes.get(isRoot ? initial : `${path}.${initial}`);
    if (init) {
      const dx = init.x - 14;
      const dy = init.y + init.h / 2;
      edges.append(s('circle', { cx: dx - 6, cy: dy, r: 4, class: 'initial' }));
      edges.append(s('line', { x1: dx - 2, y1: dy, x2: init.x, y2: dy, class: 'edge', 'marker-end': `url(#${markerId})` }));
    }
  }
  const capped = { up: 0, down: 0 };
  for (const [path, b] of boxes) {
    const byTarget = new Map<string, string[]>();
    for (const t of b.box.node.transitions) {
      for (const target of t.targets) {
        if (target === path) continue;
        const list = byTarget.get(target) ?? [];
        list.push(eventLabel(t.event));
        byTarget.set(target, list);
      }
    }
    for (const [target, labels] of byTarget) {
      const to = boxes.get(target);
      if (!to) continue;
      // Forward (left to right) above the row, backward below: a pair both ways gets two arcs.
      const forward = to.x + to.w / 2 >= b.x + b.w / 2;
      const x1 = b.x + b.w / 2 + (forward ? 6 : -6);
      const x2 = to.x + to.w / 2 + (forward ? -6 : 6);
      const y1 = forward ? b.y : b.y + b.h;
      const y2 = forward ? to.y : to.y + to.h;
      // Long arcs all reach the cap: stagger them so their labels do not sit on one line.
      const wanted = 16 + Math.abs(x2 - x1) * 0.18;
      const lift = wanted < MAX_ARC ? wanted : MAX_ARC - ((forward ? capped.up++ : capped.down++) % 3) * 14;
      const top = forward ? Math.min(y1, y2) - lift : Math.max(y1, y2) + lift;
      const mx = (x1 + x2) / 2;
      edges.append(s('path', { d: `M ${x1} ${y1} C ${x1} ${top} ${x2} ${top} ${x2} ${y2}`, class: 'edge', 'marker-end': `url(#${markerId})` }));
      // A cubic with both control points at `top` peaks three quarters of the way there.
      const apex = (forward ? Math.min(y1, y2) : Math.max(y1, y2)) + (top - (forward ? Math.min(y1, y2) : Math.max(y1, y2))) * 0.75;
      edges.append(s('text', { x: mx, y: forward ? apex - 3 : apex + 11, class: 'edge-label', 'text-anchor': 'middle' }, [...new Set(labels)].join(', ')));
    }
  }
  svg.append(states, edges);
  return svg;
}
