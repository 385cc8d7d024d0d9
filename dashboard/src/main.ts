import type { LiveMessage } from '../../core/control/dashboard-api.ts';
import { badge, fill, h } from './dom.ts';
import { apply, emptyState } from './store.ts';
import { clusterView } from './views/cluster.ts';
import { eventsView } from './views/events.ts';
import { hostView } from './views/host.ts';
import { migrationsView } from './views/migrations.ts';
import { pluginsView } from './views/plugins.ts';
import type { View } from './views/view.ts';
import './style.css';

const ROUTES: Readonly<Record<string, { readonly title: string; readonly make: () => View }>> = {
  cluster: { title: 'Cluster', make: clusterView },
  host: { title: 'Host', make: hostView },
  migrations: { title: 'Migrations', make: migrationsView },
  events: { title: 'Events', make: eventsView },
  plugins: { title: 'Plugins', make: pluginsView },
};
const KINDS: readonly LiveMessage['kind'][] = ['snapshot', 'events', 'embots', 'plugins', 'vms', 'cluster', 'migration'];

const state = emptyState();
const app = document.getElementById('app')!;
const conn = h('span', { class: 'conn', 'data-testid': 'connection' });
const agentName = h('span', { class: 'agent-name', 'data-testid': 'agent-name' });
const nav = h('nav', {});
const main = h('main', {});
app.append(h('header', { class: 'top' }, h('h1', {}, 'embot'), agentName, nav, conn), main);

let current: { name: string; view: View } | undefined;

function route(): string {
  const name = location.hash.replace(/^#\/?/, '');
  return name in ROUTES ? name : 'cluster';
}

function show(): void {
  const name = route();
  if (current?.name !== name) {
    current = { name, view: ROUTES[name]!.make() };
    fill(main, current.view.el);
    document.body.dataset['view'] = name;
  }
  fill(nav, Object.entries(ROUTES).map(([key, r]) => h('a', { href: `#/${key}`, class: key === name ? 'current' : '', 'data-nav': key }, r.title)));
  render();
}

let scheduled = false;
/** Many messages in one frame draw once. */
function render(): void {
  if (scheduled) return;
  scheduled = true;
  requestAnimationFrame(() => {
    scheduled = false;
    agentName.textContent = state.snapshot?.cluster.self.name ?? '';
    fill(conn, state.connected ? badge('live', 'ok') : badge('disconnected', 'bad'));
    current?.view.update(state);
  });
}

function connect(): void {
  // The HttpOnly cookie authenticates the stream; EventSource reconnects by itself and each
  // reconnection starts with a fresh snapshot.
  const source = new EventSource('/ui/live');
  source.addEventListener('open', () => {
    state.connected = true;
    render();
  });
  source.addEventListener('error', () => {
    state.connected = false;
    render();
  });
  for (const kind of KINDS) {
    source.addEventListener(kind, (ev) => {
      apply(state, JSON.parse((ev as MessageEvent<string>).data) as LiveMessage);
      render();
    });
  }
}

window.addEventListener('hashchange', show);
show();
connect();
