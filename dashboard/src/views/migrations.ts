import type { MigrationInfo } from '../../../core/control/dashboard-api.ts';
import { ApiError, cancelMigration, cancelPrewarm, startMigration, startPrewarm, switchPrewarm, targets } from '../api.ts';
import { badge, fill, fmtBytes, fmtElapsed, fmtMs, fmtRate, fmtTime, h } from '../dom.ts';
import { rateChart } from '../linechart.ts';
import { migrationKey, type State } from '../store.ts';
import type { View } from './view.ts';

/** The source's phases in protocol order; which of them carry the management hand-off (DESIGN.md steps 1–3, 5–6). */
const SOURCE_PHASES = ['requesting', 'holding', 'sendingState', 'sendingEvents', 'migratingVm', 'syncingDirty', 'completing', 'finishing', 'completed'] as const;
/** A migration to several destinations waits for the first boot and the verdict after the copy. */
const FAN_OUT_PHASES = ['requesting', 'holding', 'sendingState', 'sendingEvents', 'migratingVm', 'booting', 'awaitingDecision', 'syncingDirty', 'completing', 'finishing', 'completed'] as const;
const FAN_OUT_ROW_PHASES = new Set(['racing', 'committing', 'takingBack']);
const MANAGEMENT_PHASES = new Set(['holding', 'sendingState', 'sendingEvents', 'syncingDirty', 'completing', 'receivingState', 'receivingEvents', 'committing']);

function outcomeBadge(m: MigrationInfo): HTMLElement {
  if (m.outcome === null) return badge('running', 'info');
  return badge(m.outcome, m.outcome === 'completed' ? 'ok' : 'bad');
}

function timeline(m: MigrationInfo, state: State): HTMLElement {
  // A migration to several destinations' own row has phases of its own (fan-out-decision.ts: racing,
  // committing, takingBack) around its children's steps; appended after `completed` they read as
  // steps after the end.
  const seenAll = state.phases.get(migrationKey(m)) ?? [];
  const seen = m.role === 'source' ? seenAll.filter((p) => !FAN_OUT_ROW_PHASES.has(p.phase)) : seenAll;
  const done = m.summary?.phases ?? [];
  const fanOut = seen.length < seenAll.length || [...done, ...seen].some((p) => p.phase === 'booting' || p.phase === 'awaitingDecision');
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

/** What each of the driver's copy phases means for the figures beside it (core/mobility/migration-record.ts). */
const COPY_PHASE_NOTES: Readonly<Record<string, string>> = {
  'pre-switchover': 'the VM is paused for the management hand-over',
  'stop-and-copy': "the VM is stopped and the rest goes now (QEMU's figures stay those at the stop until it completes)",
  completed: 'the figures are final',
};

/** The attribute a copy phase's duration is kept in, so the view's clock can redraw it between pushes. */
const SINCE_ATTR = 'data-copy-since';

/**
 * Where the driver's copy of the VM's memory is and for how long (`copyPhase`, `copyPhaseSince`):
 * in the stop-and-copy QEMU holds its lock and its figures stop moving, and the card must not look
 * stuck. The duration counts on the page's clock from the agent's timestamp, redrawn by the view
 * between pushes (see `tickCopyPhases`).
 */
function copyPhaseLine(p: NonNullable<MigrationInfo['progress']>, now: number, compact = false): HTMLElement | null {
  const phase = p.copyPhase;
  if (phase === undefined || phase === '') return null;
  const since = p.copyPhaseSince;
  const timed = since !== undefined && phase !== 'completed';
  const note = COPY_PHASE_NOTES[phase];
  return h(
    'span',
    { class: `copy-phase copy-${phase === 'stop-and-copy' || phase === 'pre-switchover' ? 'stopped' : 'moving'}`, 'data-testid': 'copy-phase', 'data-copy-phase': phase },
    compact ? '' : 'copy ',
    h('strong', {}, phase === 'completed' ? 'completed' : phase),
    timed ? ' for ' : '',
    timed ? h('span', { class: 'copy-elapsed', [SINCE_ATTR]: since }, fmtElapsed(now - since)) : null,
    note && !compact ? h('span', { class: 'muted' }, ` — ${note}`) : null,
  );
}

/** Redraws every copy phase's duration under `root` (between pushes the figures may not change at all). */
function tickCopyPhases(root: HTMLElement, now: number): void {
  for (const el of root.querySelectorAll<HTMLElement>(`[${SINCE_ATTR}]`)) {
    const since = Number(el.getAttribute(SINCE_ATTR));
    if (Number.isFinite(since)) el.textContent = fmtElapsed(now - since);
  }
}

/** How often a shown copy phase's duration is redrawn. */
const COPY_TICK_MS = 200;

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

/** What a pre-warm panel's buttons do. */
interface PrewarmActions {
  /** `to` undefined: every destination still warming. */
  switchNow(m: MigrationInfo, to: readonly string[] | undefined): void;
  cancel(m: MigrationInfo): void;
}

type PrewarmInfo = NonNullable<MigrationInfo['prewarm']>;

/** One running pre-warm's panel, kept across pushes and updated in place (see `prewarmPanel`). */
interface PrewarmPanel {
  readonly el: HTMLElement;
  update(m: MigrationInfo, pw: PrewarmInfo): void;
}

const PREWARM_FIELDS = ['copied', 'remaining', 'rate', 'dirty', 'rounds'] as const;

/**
 * A running pre-warm: per destination copied, remaining, rates, rounds, exit condition; switch to
 * all or the ticked ones, or cancel. Its destinations push a reading every held round (many a
 * second), so the panel is built once and its cells rewritten: a panel rebuilt on each push would
 * lose a click between its mousedown and mouseup, and a tick half-way.
 */
function prewarmPanel(actions: PrewarmActions, message: (text: string) => void): PrewarmPanel {
  let latest: { m: MigrationInfo; pw: PrewarmInfo } | undefined;
  /** Unticked by the person at the page; every other warming destination is in the switch. */
  const unticked = new Set<string>();
  const rows = new Map<string, { readonly tr: HTMLTableRowElement; readonly box: HTMLInputElement; readonly cells: ReadonlyMap<string, HTMLTableCellElement> }>();
  const stateBadge = h('span', {});
  const condition = h('span', {});
  const commandedNote = h('span', { class: 'muted' });
  const tbody = h('tbody', {});
  const warmingNow = (): string[] => (latest?.pw.destinations ?? []).filter((d) => d.status === 'warming').map((d) => d.name);
  const switchButton = h('button', { type: 'button', 'data-testid': 'prewarm-switch' }, 'Switch now');
  switchButton.addEventListener('click', () => {
    if (!latest) return;
    const warming = warmingNow();
    const picked = warming.filter((n) => !unticked.has(n));
    if (picked.length === 0) return message('tick at least one warmed destination to switch to');
    actions.switchNow(latest.m, picked.length === warming.length ? undefined : picked);
  });
  const cancelButton = h('button', { type: 'button', class: 'danger', 'data-testid': 'prewarm-cancel' }, 'Cancel pre-warm');
  cancelButton.addEventListener('click', () => latest && actions.cancel(latest.m));
  const actionsEl = h('div', { class: 'prewarm-actions' }, switchButton, h('span', { class: 'muted small' }, 'to the ticked destinations (every warmed one unless you untick some)'), cancelButton);
  const el = h(
    'div',
    { class: 'prewarm', 'data-testid': 'prewarm' },
    h('p', { class: 'prewarm-head' }, stateBadge, ' ', condition, commandedNote),
    h(
      'table',
      { class: 'destinations prewarm-destinations', 'data-testid': 'prewarm-destinations' },
      h('thead', {}, h('tr', {}, ['switch to', 'destination', 'status', 'copied', 'remaining', 'rate', 'dirty rate', 'rounds', 'exit condition'].map((c) => h('th', {}, c)))),
      tbody,
    ),
    actionsEl,
  );

  function row(name: string): NonNullable<ReturnType<typeof rows.get>> {
    const have = rows.get(name);
    if (have) return have;
    const box = h('input', { type: 'checkbox', 'data-testid': 'prewarm-choose', 'aria-label': `switch to ${name}` });
    box.addEventListener('change', () => (box.checked ? unticked.delete(name) : unticked.add(name)));
    const cells = new Map<string, HTMLTableCellElement>([
      ['status', h('td', { 'data-field': 'status' })],
      ...PREWARM_FIELDS.map((f): [string, HTMLTableCellElement] => [f, h('td', { class: 'num', 'data-field': f })]),
      ['exit', h('td', { 'data-field': 'exit' })],
    ]);
    const tr = h('tr', { 'data-destination': name }, h('td', {}, box), h('td', { class: 'mono' }, name), [...cells.values()]);
    tbody.append(tr);
    const made = { tr, box, cells };
    rows.set(name, made);
    return made;
  }

  return {
    el,
    update(m, pw) {
      latest = { m, pw };
      const commanded = pw.commandedAt !== null;
      fill(stateBadge, badge(commanded ? 'switching' : 'warming', commanded ? 'info' : 'warn'));
      condition.textContent = `exit condition: remaining / (rate − dirty rate) < ${fmtMs(pw.downtimeLimitMs)} on ${Math.round(pw.exitShare * 100)} % of the chosen destinations`;
      commandedNote.textContent = pw.commandedAt === null ? '' : ` · switch commanded at ${fmtTime(pw.commandedAt)}`;
      for (const d of pw.destinations) {
        const r = row(d.name);
        r.tr.className = `status-${d.status}`;
        const usable = !commanded && d.status === 'warming';
        r.box.disabled = !usable;
        r.box.checked = d.status === 'selected' || (usable && !unticked.has(d.name));
        const cell = (f: string): HTMLTableCellElement => r.cells.get(f)!;
        fill(cell('status'), badge(d.status, d.status === 'dropped' ? 'muted' : 'info'));
        cell('copied').textContent = fmtBytes(d.copiedBytes);
        cell('remaining').textContent = fmtBytes(d.remainingBytes);
        cell('rate').textContent = fmtRate(d.rateBytesPerSec);
        cell('dirty').textContent = fmtRate(d.dirtyRateBytesPerSec);
        cell('rounds').textContent = String(d.rounds);
        fill(cell('exit'), d.exitConditionMet ? badge('met', 'ok') : badge('not met', 'warn'));
      }
      actionsEl.hidden = commanded;
    },
  };
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
    c.progress && c.outcome === null && c.progress.copyPhase ? [' · ', copyPhaseLine(c.progress, Date.now(), true)] : null,
    c.reason ? h('span', { class: 'muted' }, ` ${c.reason}`) : null,
  );
}

/** `<id>~<peer>` is one destination of migration `<id>` to several (core/mobility/fan-out.ts). */
function parentOf(id: string): string | undefined {
  const at = id.lastIndexOf('~');
  return at > 0 ? id.slice(0, at) : undefined;
}

/** Where a running card's controls go (its pre-warm panel, or Cancel); `keepCard` places them. */
const PANEL_SLOT = 'prewarm-slot';

function migrationCard(m: MigrationInfo, state: State, children: readonly MigrationInfo[]): HTMLElement {
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
    ),
    running && p ? h('progress', { max: 100, value: p.percent, class: 'migration-progress' }) : null,
    h('div', { class: 'phase-line' }, 'phase ', h('strong', { class: 'phase' }, m.phase), running && p ? ` — ${p.percent} %` : '', pw ? (pw.commandedAt === null ? ' — pre-warm: copies held until the switch' : ' — pre-warm: switching') : ''),
    running && p?.copyPhase && !pw ? h('div', { class: 'copy-line' }, copyPhaseLine(p, Date.now())) : null,
    // A running pre-warm's parent has no copy of its own: its destinations' state is its panel below.
    pw ? null : timeline(m, state),
    pw
      ? null
      : h(
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
    // The card's controls (the pre-warm panel, or Cancel), placed by keepCard: they outlive the pushes.
    running && (pw || m.role === 'source') ? h('div', { hidden: true, 'data-slot': PANEL_SLOT }) : null,
    sum?.destinations?.length ? destinationsTable(sum.destinations, sum.winner) : null,
    children.length && !sum?.destinations?.length && !pw ? h('div', { class: 'children', 'data-testid': 'destinations-live' }, h('strong', {}, 'destinations'), children.map(childRow)) : null,
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

  // A refill (the VM list changed, or another VM was picked) keeps the targets already picked, and
  // only the newest request fills the list: an older answer arriving late would drop the picks.
  let targetsAsked = 0;
  async function loadTargets(): Promise<void> {
    const vm = vmSelect.value;
    const asked = ++targetsAsked;
    if (!vm) return fill(targetSelect);
    try {
      const list = await targets(vm);
      if (asked !== targetsAsked || vm !== vmSelect.value) return;
      const picked = new Set([...targetSelect.selectedOptions].map((o) => o.value));
      fill(targetSelect, list.map((t) => h('option', { value: t.name, selected: picked.has(t.name) }, `${t.name}${t.reachable ? '' : ' (unreachable)'}${t.score === undefined ? '' : ` — score ${t.score}`}`)));
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

  const say = (text: string): void => void (message.textContent = text);
  const prewarmActions: PrewarmActions = {
    switchNow(m, to) {
      say(`switching ${m.vm} to ${to ? to.join(', ') : 'every warmed destination'}…`);
      switchPrewarm(m.vm, to).then(
        (r) => say(`switch of ${m.vm} commanded (migration ${r.id})`),
        (e: unknown) => say(e instanceof ApiError ? `${e.code}: ${e.message}` : String(e)),
      );
    },
    cancel(m) {
      cancelPrewarm(m.vm).then(
        (r) => (message.textContent = `cancelling pre-warm ${r.id}…`),
        (e: unknown) => (message.textContent = e instanceof ApiError ? `${e.code}: ${e.message}` : String(e)),
      );
    },
  };

  // One panel per running pre-warm, updated in place; dropped once it is not running.
  const panels = new Map<string, PrewarmPanel>();
  const prewarmPanelOf = (m: MigrationInfo, pw: PrewarmInfo): HTMLElement => {
    let panel = panels.get(m.id);
    if (!panel) panels.set(m.id, (panel = prewarmPanel(prewarmActions, say)));
    panel.update(m, pw);
    return panel.el;
  };
  // Running cards are kept and rewritten around their pre-warm panel, never replaced: Chromium drops
  // a click whose target left the document between mousedown and mouseup, and the held rounds push
  // several times a second, so a replaced card lost ticks and presses on its panel.
  const liveCards = new Map<string, HTMLElement>();
  const cancelRows = new Map<string, HTMLElement>();
  const cancelRowOf = (id: string): HTMLElement => {
    let row = cancelRows.get(id);
    if (!row) cancelRows.set(id, (row = h('div', { class: 'card-actions' }, h('button', { type: 'button', class: 'danger', onclick: () => onCancel(id) }, 'Cancel'))));
    return row;
  };
  const keepCard = (m: MigrationInfo, fresh: HTMLElement): HTMLElement => {
    const slot = fresh.querySelector(`:scope > [data-slot="${PANEL_SLOT}"]`);
    const panel = m.prewarm ? prewarmPanelOf(m, m.prewarm) : slot ? cancelRowOf(m.id) : undefined;
    const kept = liveCards.get(m.id);
    if (!kept || !panel || panel.parentNode !== kept) {
      if (slot) panel ? slot.replaceWith(panel) : slot.remove();
      liveCards.set(m.id, fresh);
      return fresh;
    }
    for (const a of ['class', 'data-vm']) kept.setAttribute(a, fresh.getAttribute(a) ?? '');
    for (const n of [...kept.childNodes]) if (n !== panel) n.remove();
    let before = true;
    for (const n of [...fresh.childNodes]) {
      if (n === slot) before = false;
      else if (before) kept.insertBefore(n, panel);
      else kept.append(n);
    }
    return kept;
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
  // A copy phase's duration keeps counting while the agent sends nothing new (QEMU's stop-and-copy);
  // the clock ends with the view (another view replaces this one's element).
  const clock = setInterval(() => (el.isConnected ? tickCopyPhases(live, Date.now()) : clearInterval(clock)), COPY_TICK_MS);
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
      const card = (m: MigrationInfo): HTMLElement => migrationCard(m, state, childrenOf.get(m.id) ?? []);
      const running = all.filter((m) => m.outcome === null);
      for (const id of panels.keys()) if (!running.some((m) => m.id === id && m.prewarm)) panels.delete(id);
      for (const id of liveCards.keys()) if (!running.some((m) => m.id === id)) liveCards.delete(id);
      for (const id of cancelRows.keys()) if (!running.some((m) => m.id === id)) cancelRows.delete(id);
      const liveNow = running.map((m) => keepCard(m, card(m)));
      // Re-inserting an unchanged list would detach every card: only a changed order is re-filled.
      const same = liveNow.length === live.children.length && liveNow.every((c, i) => live.children[i] === c);
      if (!same) fill(live, liveNow.length ? liveNow : h('p', { class: 'muted' }, 'none running'));
      const done = all.filter((m) => m.outcome !== null).slice(0, 30);
      fill(past, done.length ? done.map(card) : h('p', { class: 'muted' }, 'none yet'));
    },
  };
}
