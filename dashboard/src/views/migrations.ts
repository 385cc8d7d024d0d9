import type { MigrationInfo } from '../../../core/control/dashboard-api.ts';
import { ApiError, cancelMigration, cancelPrewarm, startMigration, startPrewarm, switchPrewarm, targets } from '../api.ts';
import { badge, fill, fmtBytes, fmtMs, fmtRate, fmtTime, h } from '../dom.ts';
import { rateChart } from '../linechart.ts';
import { migrationKey, type State } from '../store.ts';
import type { View } from './view.ts';

/** The source's phases in protocol order; which of them carry the management hand-off (DESIGN.md steps 1–3, 5–6). */
const SOURCE_PHASES = ['requesting', 'holding', 'sendingState', 'sendingEvents', 'migratingVm', 'syncingDirty', 'completing', 'finishing', 'completed'] as const;
/** A migration to several destinations waits for the first boot and the verdict after the copy. */
const FAN_OUT_PHASES = ['requesting', 'holding', 'sendingState', 'sendingEvents', 'migratingVm', 'booting', 'awaitingDecision', 'syncingDirty', 'completing', 'finishing', 'completed'] as const;
const MANAGEMENT_PHASES = new Set(['holding', 'sendingState', 'sendingEvents', 'syncingDirty', 'completing', 'receivingState', 'receivingEvents', 'committing']);

function outcomeBadge(m: MigrationInfo): HTMLElement {
  if (m.outcome === null) return badge('running', 'info');
  return badge(m.outcome, m.outcome === 'completed' ? 'ok' : 'bad');
}

function timeline(m: MigrationInfo, state: State): HTMLElement {
  const seen = state.phases.get(migrationKey(m)) ?? [];
  const done = m.summary?.phases ?? [];
  const fanOut = [...done, ...seen].some((p) => p.phase === 'booting' || p.phase === 'awaitingDecision');
  const names: string[] = m.role === 'source' ? [...(fanOut ? FAN_OUT_PHASES : SOURCE_PHASES)] : [...new Set([...done.map((p) => p.phase), ...seen.map((p) => p.phase)])];
  for (const p of [...done.map((x) => x.phase), ...seen.map((x) => x.phase)]) if (!names.includes(p)) names.push(p);
  const reached = new Set([...done.map((p) => p.phase), ...seen.map((p) => p.phase)]);
  // A page opened mid-migration did not see the early phases go by; the source passes them in order.
  const at = names.indexOf(m.phase);
  if (m.role === 'source' && at >= 0 && m.outcome !== 'aborted') for (const n of names.slice(0, at + 1)) reached.add(n);
  const msOf = new Map(done.map((p) => [p.phase, p.ms]));
  return h(
    'ol',
    { class: 'timeline', 'data-testid': 'timeline' },
    names.map((name) =>
      h(
        'li',
        { class: [name === m.phase && m.outcome === null ? 'current' : '', reached.has(name) ? 'reached' : '', MANAGEMENT_PHASES.has(name) ? 'management' : ''].filter(Boolean).join(' '), title: MANAGEMENT_PHASES.has(name) ? 'management hand-off' : 'VM data plane' },
        h('span', { class: 'phase-name' }, name),
        msOf.has(name) ? h('span', { class: 'phase-ms' }, fmtMs(msOf.get(name))) : null,
      ),
    ),
  );
}

function stat(label: string, value: string | number): HTMLElement[] {
  return [h('dt', {}, label), h('dd', {}, value)];
}

/** Per destination of a migration to several: every attempt's destinations, how each ended. */
function destinationsTable(ds: NonNullable<NonNullable<MigrationInfo['summary']>['destinations']>, winner: string | null | undefined): HTMLElement {
  return h(
    'table',
    { class: 'destinations', 'data-testid': 'destinations' },
    h('thead', {}, h('tr', {}, ['destination', 'attempt', 'outcome', 'boot ready', 'bytes', 'reason'].map((c) => h('th', {}, c)))),
    h(
      'tbody',
      {},
      ds.map((d) =>
        h(
          'tr',
          { 'data-destination': d.name, class: d.name === winner && d.outcome === 'won' ? 'winner' : '' },
          h('td', {}, d.name),
          h('td', {}, d.attempt),
          h('td', {}, badge(d.outcome, d.outcome === 'won' ? 'ok' : d.outcome === 'terminated' ? 'muted' : 'bad')),
          h('td', {}, fmtMs(d.bootReadyMs)),
          h('td', {}, fmtBytes(d.bytes)),
          h('td', { class: 'muted' }, d.reason ?? ''),
        ),
      ),
    ),
  );
}

/** What a pre-warm card's buttons do; the chosen destinations outlive the card's re-render on each push. */
interface PrewarmActions {
  chosen(id: string): ReadonlySet<string> | undefined;
  choose(id: string, dest: string, on: boolean, warming: readonly string[]): void;
  switchNow(m: MigrationInfo): void;
  cancel(m: MigrationInfo): void;
}

/** A running pre-warm: per destination copied, remaining, rates, exit condition; switch to all or some, or cancel. */
function prewarmPanel(m: MigrationInfo, pw: NonNullable<MigrationInfo['prewarm']>, actions: PrewarmActions): HTMLElement {
  const warming = pw.destinations.filter((d) => d.status === 'warming').map((d) => d.name);
  const chosen = actions.chosen(m.id);
  const commanded = pw.commandedAt !== null;
  return h(
    'div',
    { class: 'prewarm', 'data-testid': 'prewarm' },
    h(
      'p',
      { class: 'prewarm-head' },
      badge(commanded ? 'switching' : 'warming', commanded ? 'info' : 'warn'),
      ` exit condition: remaining / (rate − dirty rate) < ${fmtMs(pw.downtimeLimitMs)} on ${Math.round(pw.exitShare * 100)} % of the chosen destinations`,
      commanded ? h('span', { class: 'muted' }, ` · switch commanded at ${fmtTime(pw.commandedAt)}`) : null,
    ),
    h(
      'table',
      { class: 'destinations prewarm-destinations', 'data-testid': 'prewarm-destinations' },
      h('thead', {}, h('tr', {}, ['switch to', 'destination', 'status', 'copied', 'remaining', 'rate', 'dirty rate', 'rounds', 'exit condition'].map((c) => h('th', {}, c)))),
      h(
        'tbody',
        {},
        pw.destinations.map((d) => {
          const box = h('input', { type: 'checkbox', 'data-testid': 'prewarm-choose', 'aria-label': `switch to ${d.name}`, disabled: commanded || d.status !== 'warming' });
          box.checked = d.status === 'warming' && (chosen === undefined || chosen.has(d.name));
          box.addEventListener('change', () => actions.choose(m.id, d.name, box.checked, warming));
          return h(
            'tr',
            { 'data-destination': d.name, class: `status-${d.status}` },
            h('td', {}, box),
            h('td', { class: 'mono' }, d.name),
            h('td', {}, badge(d.status, d.status === 'dropped' ? 'muted' : 'info')),
            h('td', { class: 'num', 'data-field': 'copied' }, fmtBytes(d.copiedBytes)),
            h('td', { class: 'num', 'data-field': 'remaining' }, fmtBytes(d.remainingBytes)),
            h('td', { class: 'num', 'data-field': 'rate' }, fmtRate(d.rateBytesPerSec)),
            h('td', { class: 'num', 'data-field': 'dirty' }, fmtRate(d.dirtyRateBytesPerSec)),
            h('td', { class: 'num', 'data-field': 'rounds' }, d.rounds),
            h('td', { 'data-field': 'exit' }, d.exitConditionMet ? badge('met', 'ok') : badge('not met', 'warn')),
          );
        }),
      ),
    ),
    commanded
      ? null
      : h(
          'div',
          { class: 'prewarm-actions' },
          h('button', { type: 'button', 'data-testid': 'prewarm-switch', onclick: () => actions.switchNow(m) }, 'Switch now'),
          h('span', { class: 'muted small' }, ' to the ticked destinations (all warmed ones unless you untick some) '),
          h('button', { type: 'button', class: 'danger', 'data-testid': 'prewarm-cancel', onclick: () => actions.cancel(m) }, 'Cancel pre-warm'),
        ),
  );
}

/** A child migration (one destination of a migration to several) inside its parent's card. */
function childRow(c: MigrationInfo): HTMLElement {
  return h(
    'div',
    { class: 'child', 'data-destination': c.peer },
    h('span', { class: 'mono' }, c.peer),
    ' ',
    c.outcome === null ? badge(c.phase, 'info') : badge(c.outcome, c.outcome === 'completed' ? 'ok' : 'bad'),
    c.progress && c.outcome === null ? h('progress', { max: 100, value: c.progress.percent }) : null,
    c.progress && c.outcome === null ? ` ${c.progress.percent} % · ${fmtRate(c.progress.rateBytesPerSec)}` : '',
    c.reason ? h('span', { class: 'muted' }, ` ${c.reason}`) : null,
  );
}

/** `<id>~<peer>` is one destination of migration `<id>` to several (core/mobility/fan-out.ts). */
function parentOf(id: string): string | undefined {
  const at = id.lastIndexOf('~');
  return at > 0 ? id.slice(0, at) : undefined;
}

function migrationCard(m: MigrationInfo, state: State, onCancel: (id: string) => void, children: readonly MigrationInfo[], prewarm: PrewarmActions): HTMLElement {
  const p = m.progress;
  const pw = m.outcome === null ? m.prewarm : undefined;
  const sum = m.summary;
  const running = m.outcome === null;
  return h(
    'article',
    { class: `card migration ${running ? 'running' : `outcome-${m.outcome}`}`, 'data-migration': m.id, 'data-vm': m.vm },
    h(
      'header',
      {},
      h('h3', {}, m.vm),
      h('span', { class: 'muted' }, m.role === 'source' ? ` → ${m.peer}` : ` ← ${m.peer}`),
      outcomeBadge(m),
      badge(m.role, 'muted'),
      h('span', { class: 'muted mono' }, m.id),
      running && m.role === 'source' && !pw ? h('button', { class: 'danger', onclick: () => onCancel(m.id) }, 'Cancel') : null,
    ),
    running && p ? h('progress', { max: 100, value: p.percent, class: 'migration-progress' }) : null,
    h('div', { class: 'phase-line' }, 'phase ', h('strong', { class: 'phase' }, m.phase), running && p ? ` — ${p.percent} %` : ''),
    timeline(m, state),
    h(
      'div',
      { class: 'migration-body' },
      h(
        'dl',
        { class: 'stats' },
        stat('destination', m.peer),
        p ? stat('round', p.round ?? '–') : stat('rounds', sum?.rounds ?? '–'),
        p ? stat('memory', `${fmtBytes(p.memoryBytes)} / ${fmtBytes(p.memoryTotal)}`) : stat('memory', fmtBytes(sum?.memoryBytes)),
        p ? stat('remaining', fmtBytes(p.remainingBytes)) : [],
        p ? stat('send rate', fmtRate(p.rateBytesPerSec)) : stat('send rate', fmtRate(sum?.precopy?.rateBytesPerSec)),
        p ? stat('dirty rate', fmtRate(p.dirtyRateBytesPerSec)) : stat('dirty rate', sum?.precopy ? `${fmtRate(sum.precopy.initialDirtyRate)} → ${fmtRate(sum.precopy.finalDirtyRate)}` : '–'),
        stat('expected downtime', fmtMs(p?.expectedDowntimeMs ?? sum?.precopy?.expectedDowntimeMs)),
        stat('actual downtime', fmtMs(sum?.downtimeMs)),
        stat('paths', sum ? `${sum.paths}${sum.plan ? ` (${sum.plan.paths.join(', ')})` : ''}` : '–'),
        stat('estimate / threshold', sum ? `${fmtMs(sum.estimateMs)} / ${fmtMs(sum.thresholdMs)}` : '–'),
        stat('bytes', fmtBytes(sum?.bytes ?? p?.bytes)),
      ),
      running ? rateChart(state.samples.get(migrationKey(m)) ?? []) : null,
    ),
    sum
      ? h(
          'div',
          { class: 'handoff' },
          h('strong', {}, sum.outcome === 'completed' ? 'management hand-off: ' : 'management staged, not handed off (the source kept it): '),
          `${sum.embots} embot(s), ${sum.events} event(s), modules ${sum.modules.map((x) => x.split('#')[0]).join(', ') || 'none'} (${sum.modulesShipped} shipped), ${sum.forwarded} forwarded after the switch`,
          sum.deadLettered ? `, ${sum.deadLettered} dead-lettered` : '',
          `; total ${fmtMs(sum.totalMs)}`,
        )
      : null,
    pw ? prewarmPanel(m, pw, prewarm) : null,
    sum?.destinations?.length ? destinationsTable(sum.destinations, sum.winner) : null,
    children.length && !sum?.destinations?.length ? h('div', { class: 'children', 'data-testid': 'destinations-live' }, h('strong', {}, 'destinations'), children.map(childRow)) : null,
    m.reason ? h('p', { class: 'error' }, m.reason) : null,
    sum?.plan?.decisions.length ? h('details', {}, h('summary', {}, 'path planner decisions'), h('ul', {}, sum.plan.decisions.map((d) => h('li', {}, d)))) : null,
    h('p', { class: 'muted small' }, `started ${fmtTime(m.startedAt)}, updated ${fmtTime(m.updatedAt)}`),
  );
}

export function migrationsView(): View {
  const vmSelect = h('select', { name: 'vm', 'data-testid': 'migrate-vm' });
  // Several selected: a migration to several destinations at once, first to boot wins (issue 13).
  const targetSelect = h('select', { name: 'to', multiple: true, size: 3, 'data-testid': 'migrate-to', title: 'Ctrl/Shift-click for several destinations (first to boot wins)' });
  const message = h('p', { class: 'form-message', role: 'status' });
  const rankNote = h('span', { class: 'muted small' });
  let knownVms = '';

  async function loadTargets(): Promise<void> {
    const vm = vmSelect.value;
    if (!vm) return fill(targetSelect);
    try {
      const list = await targets(vm);
      fill(targetSelect, list.map((t) => h('option', { value: t.name }, `${t.name}${t.reachable ? '' : ' (unreachable)'}${t.score === undefined ? '' : ` — score ${t.score}`}`)));
      rankNote.textContent = list[0] ? `ranked by ${list[0].rankedBy}` : 'no peers configured';
    } catch (e) {
      message.textContent = e instanceof Error ? e.message : String(e);
    }
  }
  vmSelect.addEventListener('change', () => void loadTargets());

  const form = h(
    'form',
    { class: 'migrate-form', 'data-testid': 'migrate-form' },
    h('label', {}, 'VM ', vmSelect),
    h('label', {}, 'to ', targetSelect),
    rankNote,
    h('button', { type: 'submit' }, 'Start migration'),
    h('button', { type: 'button', 'data-testid': 'prewarm-start', title: 'copy to the selected targets now and keep them current; switch later from its card', onclick: () => prewarmSelected() }, 'Pre-warm'),
    message,
  );
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const vm = vmSelect.value;
    const to = [...targetSelect.selectedOptions].map((o) => o.value);
    if (!vm || to.length === 0) {
      message.textContent = 'pick a VM and a target';
      return;
    }
    message.textContent = `starting ${vm} → ${to.join(', ')}…`;
    startMigration(vm, to).then(
      (r) => (message.textContent = `migration ${r.id} started`),
      (e: unknown) => (message.textContent = e instanceof ApiError ? `${e.code}: ${e.message}` : String(e)),
    );
  });

  function prewarmSelected(): void {
    const vm = vmSelect.value;
    const to = [...targetSelect.selectedOptions].map((o) => o.value);
    if (!vm || to.length === 0) {
      message.textContent = 'pick a VM and one or more targets to pre-warm';
      return;
    }
    message.textContent = `pre-warming ${vm} at ${to.join(', ')}…`;
    startPrewarm(vm, to).then(
      (r) => (message.textContent = `pre-warm ${r.id} started`),
      (e: unknown) => (message.textContent = e instanceof ApiError ? `${e.code}: ${e.message}` : String(e)),
    );
  }

  // Per pre-warm, the destinations ticked for its switch (absent: every one still warming).
  const chosenOf = new Map<string, Set<string>>();
  const prewarmActions: PrewarmActions = {
    chosen: (id) => chosenOf.get(id),
    choose(id, dest, on, warming) {
      const set = new Set(chosenOf.get(id) ?? warming);
      if (on) set.add(dest);
      else set.delete(dest);
      chosenOf.set(id, set);
    },
    switchNow(m) {
      const warming = (m.prewarm?.destinations ?? []).filter((d) => d.status === 'warming').map((d) => d.name);
      const picked = warming.filter((n) => chosenOf.get(m.id)?.has(n) ?? true);
      if (picked.length === 0) {
        message.textContent = 'tick at least one warmed destination to switch to';
        return;
      }
      const to = picked.length === warming.length ? undefined : picked;
      message.textContent = `switching ${m.vm} to ${(to ?? warming).join(', ')}…`;
      switchPrewarm(m.vm, to).then(
        (r) => (message.textContent = `switch of ${m.vm} commanded (migration ${r.id})`),
        (e: unknown) => (message.textContent = e instanceof ApiError ? `${e.code}: ${e.message}` : String(e)),
      );
    },
    cancel(m) {
      cancelPrewarm(m.vm).then(
        (r) => (message.textContent = `cancelling pre-warm ${r.id}…`),
        (e: unknown) => (message.textContent = e instanceof ApiError ? `${e.code}: ${e.message}` : String(e)),
      );
    },
  };

  const onCancel = (id: string): void => {
    cancelMigration(id).then(
      (r) => (message.textContent = r.cancelled ? `cancelling ${id}…` : `${id} is not running here`),
      (e: unknown) => (message.textContent = e instanceof ApiError ? `${e.code}: ${e.message}` : String(e)),
    );
  };

  const live = h('div', { class: 'stack', 'data-testid': 'live-migrations' });
  const past = h('div', { class: 'stack', 'data-testid': 'past-migrations' });
  const el = h(
    'section',
    { class: 'view' },
    h('h2', {}, 'Migrations'),
    form,
    h('p', { class: 'hint' }, 'Select several targets for a migration to several destinations at once (first to boot wins); each destination’s state shows in its card. Pre-warm copies to the selected targets now and keeps them current while the VM runs here; its card then offers Switch now (to all or the ticked destinations) and Cancel pre-warm.'),
    h('h3', {}, 'Running'),
    live,
    h('h3', {}, 'Past'),
    past,
  );
  return {
    el,
    update(state: State): void {
      const snap = state.snapshot;
      if (!snap) return;
      const vms = snap.vms.map((v) => v.name).join('\n');
      if (vms !== knownVms) {
        knownVms = vms;
        const keep = vmSelect.value;
        fill(vmSelect, snap.vms.map((v) => h('option', { value: v.name }, v.name)));
        if (snap.vms.some((v) => v.name === keep)) vmSelect.value = keep;
        void loadTargets();
      }
      const every = [...state.migrations.values()].sort((a, b) => b.startedAt - a.startedAt);
      // A destination of a migration to several shows inside its parent's card when the parent is known here.
      const ids = new Set(every.map((m) => m.id));
      const childrenOf = new Map<string, MigrationInfo[]>();
      for (const m of every) {
        const p = parentOf(m.id);
        if (p !== undefined && ids.has(p)) childrenOf.set(p, [...(childrenOf.get(p) ?? []), m]);
      }
      const all = every.filter((m) => { const p = parentOf(m.id); return p === undefined || !ids.has(p); });
      const card = (m: MigrationInfo): HTMLElement => migrationCard(m, state, onCancel, childrenOf.get(m.id) ?? [], prewarmActions);
      const running = all.filter((m) => m.outcome === null);
      fill(live, running.length ? running.map(card) : h('p', { class: 'muted' }, 'none running'));
      const done = all.filter((m) => m.outcome !== null).slice(0, 30);
      fill(past, done.length ? done.map(card) : h('p', { class: 'muted' }, 'none yet'));
    },
  };
}
