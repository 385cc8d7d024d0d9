import type { EmbotEvent } from '../../../core/control/dashboard-api.ts';
import { fill, fmtTime, h } from '../dom.ts';
import type { State } from '../store.ts';
import type { View } from './view.ts';

const SHOWN = 300;
const PAYLOAD_CHARS = 300;

function payloadText(p: unknown): string {
  if (p === undefined || p === null) return '';
  let text: string;
  try {
    text = JSON.stringify(p);
  } catch {
    text = String(p);
  }
  return text.length > PAYLOAD_CHARS ? `${text.slice(0, PAYLOAD_CHARS)}…` : text;
}

export function eventsView(): View {
  const element = h('input', { type: 'search', placeholder: 'element contains…', 'data-testid': 'filter-element' });
  const type = h('input', { type: 'search', placeholder: 'type contains…', 'data-testid': 'filter-type' });
  const source = h('input', { type: 'search', placeholder: 'source contains…', 'data-testid': 'filter-source' });
  const count = h('span', { class: 'muted' });
  const rows = h('tbody', {});
  let last: State | undefined;
  const el = h(
    'section',
    { class: 'view' },
    h('h2', {}, 'Event stream'),
    h('div', { class: 'filters' }, element, type, source, count),
    h('table', { class: 'events', 'data-testid': 'events' }, h('thead', {}, h('tr', {}, h('th', {}, 'time'), h('th', {}, 'type'), h('th', {}, 'element'), h('th', {}, 'source'), h('th', {}, 'payload'))), rows),
  );
  const render = (): void => {
    if (!last) return;
    const fe = element.value.trim().toLowerCase();
    const ft = type.value.trim().toLowerCase();
    const fs = source.value.trim().toLowerCase();
    const match = (e: EmbotEvent): boolean => (!fe || e.elementId.toLowerCase().includes(fe)) && (!ft || e.type.toLowerCase().includes(ft)) && (!fs || (e.source ?? '').toLowerCase().includes(fs));
    const shown = last.events.filter(match).slice(-SHOWN).reverse();
    count.textContent = `${shown.length} of ${last.events.length} recent events${last.droppedEvents ? ` (${last.droppedEvents} skipped in bursts)` : ''}`;
    fill(
      rows,
      shown.map((e) =>
        h('tr', { 'data-event': e.id }, h('td', { class: 'mono' }, fmtTime(e.ts)), h('td', {}, h('code', {}, e.type)), h('td', { class: 'mono' }, e.elementId), h('td', { class: 'muted' }, e.source ?? ''), h('td', { class: 'mono payload' }, payloadText(e.payload))),
      ),
    );
  };
  for (const input of [element, type, source]) input.addEventListener('input', render);
  return {
    el,
    update(state: State): void {
      last = state;
      render();
    },
  };
}
