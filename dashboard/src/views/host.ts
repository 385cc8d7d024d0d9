import type { EmbotInfo } from '../../../core/control/dashboard-api.ts';
import { badge, fill, fmtBytes, h, stateText } from '../dom.ts';
import { statechart } from '../statechart.ts';
import type { State } from '../store.ts';
import type { View } from './view.ts';

/** An element belongs to VM `name` when it is the VM or one of its devices (`disk:NAME.0`, `nic:NAME.0`). */
function ofVm(elementId: string, name: string): boolean {
  return elementId === `vm:${name}` || elementId.startsWith(`disk:${name}.`) || elementId.startsWith(`nic:${name}.`);
}

function embotCard(e: EmbotInfo, state: State): HTMLElement {
  const charts = state.snapshot?.charts[e.module] ?? {};
  return h(
    'div',
    { class: `embot ${e.status}`, 'data-embot': e.id },
    h('header', {}, h('strong', {}, e.type), ' ', h('span', { class: 'muted mono' }, e.id), ' ', badge(e.status, e.status === 'running' ? 'ok' : e.status === 'quarantined' ? 'bad' : 'muted')),
    e.error ? h('p', { class: 'error' }, e.error) : null,
    e.policies.map((p) => {
      const chart = charts[p.name];
      return h(
        'div',
        { class: 'policy', 'data-policy': p.name },
        h('div', {}, 'policy ', h('strong', {}, p.name), ' — state ', h('code', { class: 'state-value' }, stateText(p.state))),
        chart ? statechart(chart, p.state, `${e.type} / ${p.name}`) : h('p', { class: 'muted' }, 'no statechart (module not loaded here)'),
      );
    }),
  );
}

export function hostView(): View {
  const body = h('div', {});
  const el = h('section', { class: 'view' }, h('h2', {}, 'Host'), body);
  return {
    el,
    update(state: State): void {
      const snap = state.snapshot;
      if (!snap) return fill(body, h('p', { class: 'muted' }, 'connecting…'));
      const embots = snap.embots;
      const vms = snap.vms.map((vm) =>
        h(
          'article',
          { class: 'card vm', 'data-vm': vm.name },
          h('header', {}, h('h3', {}, vm.name), badge(vm.incoming === true ? `${vm.state} (incoming)` : vm.state, vm.state === 'running' ? 'ok' : vm.state === 'crashed' ? 'bad' : 'muted')),
          h('p', { class: 'muted' }, `${fmtBytes(vm.memory)} memory, ${vm.vcpus} vCPU`),
          embots.filter((e) => e.elementIds.some((id) => ofVm(id, vm.name))).map((e) => embotCard(e, state)),
        ),
      );
      const hostEmbots = embots.filter((e) => !snap.vms.some((vm) => e.elementIds.some((id) => ofVm(id, vm.name))));
      fill(
        body,
        h('h3', {}, `${snap.cluster.self.name}: ${snap.vms.length} VM${snap.vms.length === 1 ? '' : 's'}`),
        vms.length ? h('div', { class: 'stack', 'data-testid': 'vms' }, vms) : h('p', { class: 'muted' }, 'no VMs on this host'),
        hostEmbots.length ? h('article', { class: 'card' }, h('header', {}, h('h3', {}, 'host and other elements')), hostEmbots.map((e) => embotCard(e, state))) : null,
      );
    },
  };
}
