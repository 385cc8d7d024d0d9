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
const GAP_X = 70;
const GAP_Y = 46;

/** Sizes a state and its children (children in a grid, roughly square). */
function measure(node: ChartNode): Box {
  const leafW = Math.max(84, node.key.length * 8 + 28);
  if (node.children.length === 0) return { node, x: 0, y: 0, w: leafW, h: LEAF_H, children: [] };
  const kids = node.children.map(measure);
  const cols = Math.ceil(Math.sqrt(kids.length));
  const rows = Math.ceil(kids.length / cols);
  const colW = Math.max(...kids.map((k) => k.w));
  const rowH = Math.max(...kids.map((k) => k.h));
  kids.forEach((k, i) => {
    k.x = PAD + (i % cols) * (colW + GAP_X) + (colW - k.w) / 2;
    k.y = HEADER + PAD + Math.floor(i / cols) * (rowH + GAP_Y) + (rowH - k.h) / 2;
  });
  return { node, x: 0, y: 0, w: Math.max(leafW, PAD * 2 + cols * colW + (cols - 1) * GAP_X), h: HEADER + PAD * 2 + rows * rowH + (rows - 1) * GAP_Y, children: kids };
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

/** Where the segment from the centre of `a` towards `(tx, ty)` leaves box `a`. */
function edgePoint(a: { x: number; y: number; w: number; h: number }, tx: number, ty: number): [number, number] {
  const cx = a.x + a.w / 2;
  const cy = a.y + a.h / 2;
  const dx = tx - cx;
  const dy = ty - cy;
  if (dx === 0 && dy === 0) return [cx, cy];
  const sx = dx === 0 ? Infinity : a.w / 2 / Math.abs(dx);
  const sy = dy === 0 ? Infinity : a.h / 2 / Math.abs(dy);
  const k = Math.min(sx, sy);
  return [cx + dx * k, cy + dy * k];
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
      // Two states with transitions both ways: each direction bends to its own side.
      const [x1, y1] = edgePoint(b, to.x + to.w / 2, to.y + to.h / 2);
      const [x2, y2] = edgePoint(to, b.x + b.w / 2, b.y + b.h / 2);
      const mx = (x1 + x2) / 2;
      const my = (y1 + y2) / 2;
      const len = Math.hypot(x2 - x1, y2 - y1) || 1;
      const bend = 14;
      const cx = mx + (-(y2 - y1) / len) * bend;
      const cy = my + ((x2 - x1) / len) * bend;
      edges.append(s('path', { d: `M ${x1} ${y1} Q ${cx} ${cy} ${x2} ${y2}`, class: 'edge', 'marker-end': `url(#${markerId})` }));
      edges.append(s('text', { x: cx, y: cy - 3, class: 'edge-label', 'text-anchor': 'middle' }, [...new Set(labels)].join(', ')));
    }
  }
  svg.append(states, edges);
  return svg;
}
