import type { Sample } from './store.ts';
import { fmtRate, s } from './dom.ts';

const W = 420;
const H = 120;
const PAD_L = 8;
const PAD_B = 16;

/** Send rate and dirty rate of a running migration over time, one polyline each. */
export function rateChart(samples: readonly Sample[]): SVGSVGElement {
  const svg = s('svg', { class: 'ratechart', viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: 'img', 'aria-label': 'send rate and dirty rate' });
  svg.append(s('rect', { x: 0, y: 0, width: W, height: H, class: 'bg' }));
  if (samples.length === 0) {
    svg.append(s('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle', class: 'axis' }, 'waiting for the first pre-copy round…'));
    return svg;
  }
  const t0 = samples[0]!.at;
  const t1 = Math.max(samples.at(-1)!.at, t0 + 1);
  const max = Math.max(1, ...samples.map((p) => Math.max(p.rate, p.dirty)));
  const x = (t: number): number => PAD_L + ((t - t0) / (t1 - t0)) * (W - PAD_L * 2);
  const y = (v: number): number => H - PAD_B - (v / max) * (H - PAD_B - 14);
  const line = (pick: (p: Sample) => number, cls: string): SVGPolylineElement => s('polyline', { class: cls, points: samples.map((p) => `${x(p.at).toFixed(1)},${y(pick(p)).toFixed(1)}`).join(' ') });
  svg.append(line((p) => p.rate, 'rate'), line((p) => p.dirty, 'dirty'));
  // The newest reading as a dot: visible from the first sample on.
  const lastP = samples.at(-1)!;
  svg.append(s('circle', { cx: x(lastP.at), cy: y(lastP.rate), r: 3, class: 'rate' }), s('circle', { cx: x(lastP.at), cy: y(lastP.dirty), r: 3, class: 'dirty' }));
  svg.append(s('text', { x: PAD_L, y: 11, class: 'axis' }, `max ${fmtRate(max)}`));
  svg.append(s('text', { x: W - PAD_L, y: H - 3, class: 'axis', 'text-anchor': 'end' }, `${((t1 - t0) / 1000).toFixed(1)} s`));
  svg.append(s('rect', { x: W - 150, y: 4, width: 10, height: 4, class: 'rate-key' }), s('text', { x: W - 136, y: 10, class: 'axis' }, 'sent/s'));
  svg.append(s('rect', { x: W - 80, y: 4, width: 10, height: 4, class: 'dirty-key' }), s('text', { x: W - 66, y: 10, class: 'axis' }, 'dirtied/s'));
  return svg;
}
