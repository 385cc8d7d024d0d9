import { badge, fill, fmtDuration, h } from '../dom.ts';
import type { State } from '../store.ts';
import type { View } from './view.ts';

export function clusterView(): View {
  const grid = h('div', { class: 'cards', 'data-testid': 'agents' });
  const el = h('section', { class: 'view' }, h('h2', {}, 'Cluster'), h('p', { class: 'hint' }, 'This agent and the peers it is configured with. Health and load are this agent’s own; a peer is reachable when its peer port accepts a connection.'), grid);
  return {
    el,
    update(state: State): void {
      const c = state.snapshot?.cluster;
      if (!c) return fill(grid, h('p', { class: 'muted' }, 'connecting…'));
      const self = c.self;
      const load = Math.round(c.load * 100);
      const selfCard = h(
        'article',
        { class: `card agent ${c.health.ok ? 'healthy' : 'degraded'}`, 'data-agent': self.name },
        h('header', {}, h('h3', {}, self.name), badge('this agent', 'info'), c.health.ok ? badge('healthy', 'ok') : badge('degraded', 'warn')),
        h('progress', { class: 'meter', max: 100, value: Math.min(100, load), title: `host load ${load} %` }),
        h('dl', {},
          h('dt', {}, 'load'), h('dd', {}, `${load} %`),
          h('dt', {}, 'driver'), h('dd', {}, self.driver),
          h('dt', {}, 'uptime'), h('dd', {}, fmtDuration(self.uptimeMs)),
          h('dt', {}, 'VMs'), h('dd', {}, self.counts.vms),
          h('dt', {}, 'embots'), h('dd', {}, `${self.counts.embots} (${self.counts.quarantinedEmbots} quarantined)`),
          h('dt', {}, 'events'), h('dd', {}, `${self.counts.queuedEvents} queued, ${self.counts.heldEvents} held, ${self.counts.deadLetters} dead`),
          h('dt', {}, 'version'), h('dd', {}, self.version),
        ),
        c.health.problems.length > 0 ? h('ul', { class: 'problems' }, c.health.problems.map((p) => h('li', {}, p))) : null,
      );
      const peers = c.peers.map((p) =>
        h(
          'article',
          { class: `card agent peer ${p.reachable ? 'healthy' : 'unreachable'}`, 'data-agent': p.name },
          h('header', {}, h('h3', {}, p.name), badge('peer', 'muted'), p.reachable ? badge('reachable', 'ok') : badge('unreachable', 'bad')),
          h('dl', {}, h('dt', {}, 'peer URL'), h('dd', { class: 'mono' }, p.url), h('dt', {}, 'checked'), h('dd', {}, p.checkedAt ? new Date(p.checkedAt).toLocaleTimeString() : 'not yet')),
        ),
      );
      fill(grid, selfCard, peers);
    },
  };
}
