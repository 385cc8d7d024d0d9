import type { DashboardSnapshot, EmbotEvent, LiveMessage, MigrationInfo } from '../../core/control/dashboard-api.ts';

/** One reading of a running migration, for its rate chart. */
export interface Sample {
  readonly at: number;
  readonly rate: number;
  readonly dirty: number;
  readonly remaining: number;
}

export interface PhaseMark {
  readonly phase: string;
  readonly at: number;
}

/** What the page knows: the last snapshot with every live message applied to it. */
export interface State {
  snapshot: DashboardSnapshot | undefined;
  connected: boolean;
  /** Recent events, newest last. */
  events: EmbotEvent[];
  droppedEvents: number;
  migrations: Map<string, MigrationInfo>;
  samples: Map<string, Sample[]>;
  phases: Map<string, PhaseMark[]>;
}

const MAX_EVENTS = 1000;
const MAX_SAMPLES = 600;

export function emptyState(): State {
  return { snapshot: undefined, connected: false, events: [], droppedEvents: 0, migrations: new Map(), samples: new Map(), phases: new Map() };
}

export function migrationKey(m: MigrationInfo): string {
  return `${m.role}:${m.id}`;
}

export function apply(state: State, msg: LiveMessage): void {
  switch (msg.kind) {
    case 'snapshot': {
      state.snapshot = msg.snapshot;
      state.events = [...msg.snapshot.events];
      state.migrations = new Map(msg.snapshot.migrations.map((m) => [migrationKey(m), m]));
      for (const m of msg.snapshot.migrations) track(state, m);
      return;
    }
    case 'events':
      state.events.push(...msg.events);
      if (state.events.length > MAX_EVENTS) state.events.splice(0, state.events.length - MAX_EVENTS);
      state.droppedEvents += msg.dropped;
      return;
    case 'migration':
      state.migrations.set(migrationKey(msg.migration), msg.migration);
      track(state, msg.migration);
      return;
    default:
      if (!state.snapshot) return;
      if (msg.kind === 'embots') state.snapshot = { ...state.snapshot, embots: msg.embots };
      else if (msg.kind === 'plugins') state.snapshot = { ...state.snapshot, plugins: msg.plugins, charts: msg.charts };
      else if (msg.kind === 'vms') state.snapshot = { ...state.snapshot, vms: msg.vms };
      else if (msg.kind === 'cluster') state.snapshot = { ...state.snapshot, cluster: msg.cluster };
  }
}

/** Keeps a running migration's phase marks and rate samples (the server sends the current reading only). */
function track(state: State, m: MigrationInfo): void {
  const key = migrationKey(m);
  const marks = state.phases.get(key) ?? [];
  if (marks.at(-1)?.phase !== m.phase) marks.push({ phase: m.phase, at: m.updatedAt });
  state.phases.set(key, marks);
  const p = m.progress;
  if (p && m.outcome === null && (p.rateBytesPerSec !== undefined || p.dirtyRateBytesPerSec !== undefined)) {
    const list = state.samples.get(key) ?? [];
    // The record's updatedAt moves with phases only; a reading's time is when it arrived.
    list.push({ at: Date.now(), rate: p.rateBytesPerSec ?? 0, dirty: p.dirtyRateBytesPerSec ?? 0, remaining: p.remainingBytes ?? 0 });
    if (list.length > MAX_SAMPLES) list.splice(0, list.length - MAX_SAMPLES);
    state.samples.set(key, list);
  }
}
