import { badge, fill, h } from '../dom.ts';
import type { State } from '../store.ts';
import type { View } from './view.ts';

export function pluginsView(): View {
  const body = h('div', { class: 'stack', 'data-testid': 'plugins' });
  const el = h('section', { class: 'view' }, h('h2', {}, 'Plugins'), body);
  return {
    el,
    update(state: State): void {
      const snap = state.snapshot;
      if (!snap) return;
      if (snap.plugins.length === 0) return fill(body, h('p', { class: 'muted' }, 'no plugins'));
      fill(
        body,
        snap.plugins.map((p) => {
          const embots = snap.embots.filter((e) => e.module === p.name);
          const quarantined = embots.filter((e) => e.status === 'quarantined');
          const kind = p.status === 'loaded' ? (quarantined.length ? 'warn' : 'ok') : p.status === 'unloaded' ? 'muted' : 'bad';
          return h(
            'article',
            { class: `card plugin status-${p.status}`, 'data-plugin': p.name },
            h('header', {}, h('h3', {}, p.name), h('span', { class: 'muted' }, `@${p.version}`), badge(p.status, kind), quarantined.length ? badge(`${quarantined.length} quarantined`, 'bad') : null),
            h('dl', {}, h('dt', {}, 'embot types'), h('dd', {}, p.embotTypes.join(', ') || '–'), h('dt', {}, 'embots'), h('dd', {}, embots.length), h('dt', {}, 'restarts'), h('dd', {}, p.restarts), h('dt', {}, 'hash'), h('dd', { class: 'mono' }, p.hash.slice(0, 16) || '–')),
            p.error ? h('p', { class: 'error', 'data-testid': 'plugin-error' }, p.error) : null,
            quarantined.length
              ? h('ul', { class: 'quarantined' }, quarantined.map((e) => h('li', { 'data-embot': e.id }, h('span', { class: 'mono' }, e.id), ': ', h('span', { class: 'error', 'data-testid': 'embot-error' }, e.error ?? 'quarantined'))))
              : null,
          );
        }),
      );
    },
  };
}
