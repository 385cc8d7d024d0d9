import { badge, fill, fmtDuration, h } from '../dom.ts';
import type { State } from '../store.ts';
import type { View } from './view.ts';

export function clusterView(): View {
  const grid = h('div', { class: 'cards', 'data-testid': 'agents' });
  const el = h('section', { class: 'view' }, h('h2', {}, 'Cluster'), h('p', { class: 'hint' }, 'This agent and its peers (from its config, or found through the fleet directory on etcd). Each agent’s health and load; a peer’s are what it answers over the authenticated peer link, and a peer is unreachable when its peer port accepts no connection.'), grid);
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
          self.directory ? [h('dt', {}, 'directory'), h('dd', { 'data-testid': 'directory' }, self.directory.kind, ' ', directoryBadge(self.directory.state))] : null,
        ),
        self.directory?.lastError ? h('ul', { class: 'problems' }, h('li', {}, `${self.directory.lastError.code}: ${self.directory.lastError.message}`)) : null,
        c.health.problems.length > 0 ? h('ul', { class: 'problems' }, c.health.problems.map((p) => h('li', {}, p))) : null,
      );
      const peers = c.peers.map((p) => {
        const st = p.status;
        const peerLoad = st ? Math.round(st.load * 100) : 0;
        const healthBadge = !p.reachable ? badge('unreachable', 'bad') : !st ? badge('no status', 'muted') : st.health.ok ? badge('healthy', 'ok') : badge('degraded', 'warn');
        return h(
          'article',
          { class: `card agent peer ${!p.reachable ? 'unreachable' : st && !st.health.ok ? 'degraded' : 'healthy'}`, 'data-agent': p.name },
          h('header', {}, h('h3', {}, p.name), badge('peer', 'muted'), badge(p.source === 'etcd' ? 'via etcd' : 'configured', 'muted'), p.reachable ? badge('reachable', 'ok') : null, healthBadge),
          st ? h('progress', { class: 'meter', max: 100, value: Math.min(100, peerLoad), title: `host load ${peerLoad} %` }) : null,
          h(
            'dl',
            {},
            st ? [h('dt', {}, 'load'), h('dd', {}, `${peerLoad} %`), h('dt', {}, 'uptime'), h('dd', {}, fmtDuration(st.uptimeMs)), h('dt', {}, 'VMs'), h('dd', {}, st.vms), h('dt', {}, 'embots'), h('dd', {}, st.embots)] : null,
            h('dt', {}, 'peer URL'),
            h('dd', { class: 'mono' }, p.url),
            h('dt', {}, 'checked'),
            h('dd', {}, p.checkedAt ? new Date(p.checkedAt).toLocaleTimeString() : 'not yet'),
          ),
          st && st.health.problems.length > 0 ? h('ul', { class: 'problems' }, st.health.problems.map((x) => h('li', {}, x))) : null,
        );
      });
      fill(grid, selfCard, peers);
    },
  };
}

/** The fleet directory's state: static (the config's peers), or etcd connected, connecting, unavailable (its peers last known kept), conflict (another agent holds this one's name). */
const DIRECTORY_BADGES: Readonly<Record<string, readonly [string, Parameters<typeof badge>[1]]>> = {
  connected: ['connected', 'ok'],
  unavailable: ['unavailable', 'warn'],
  conflict: ['name taken', 'bad'],
  static: ['static', 'info'],
};

function directoryBadge(state: string): HTMLElement {
  // Own keys only: a state named like an Object.prototype member is shown as it is.
  const [text, kind] = Object.hasOwn(DIRECTORY_BADGES, state) ? DIRECTORY_BADGES[state]! : [state, 'muted' as const];
  return badge(text, kind);
}
