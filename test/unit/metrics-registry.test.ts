import { describe, expect, it } from 'vitest';
import { AgentMetrics, reasonLabel, stateLabel, type DirectoryView, type EventCounts, type MetricsSources, type MigrationView } from '../../core/metrics/index.ts';
import { parseExposition, type Exposition } from '../harness/prometheus.ts';

const ZERO: EventCounts = { admitted: 0, dispatched: 0, delivered: 0, unrouted: 0, muted: 0, duplicates: 0, rejected: 0, deliveryErrors: 0, forwarded: 0, queued: 0, held: 0, spilled: 0, inFlight: 0, forwardQueued: 0, parked: 0, deadLetters: 0 };

function rig(name = 'a'): { metrics: AgentMetrics; state: { events: EventCounts; migrations: MigrationView[]; eventReads: number; directory: DirectoryView } } {
  const state = { events: ZERO, migrations: [] as MigrationView[], eventReads: 0, directory: { kind: 'static', state: 'static', peers: [{ source: 'config' }] } as DirectoryView };
  const sources: MetricsSources = {
    agent: { name, version: '1.2.3', driver: 'sim' },
    events: () => {
      state.eventReads++;
      return state.events;
    },
    embots: () => [
      { module: 'watch', status: 'running', policies: [{ name: 'p', state: 'idle' }] },
      { module: 'watch', status: 'quarantined', policies: [{ name: 'p', state: { busy: { phase: 'two' } } }] },
    ],
    plugins: () => [{ name: 'watch', status: 'loaded', restarts: 2 }],
    vms: () => [{ state: 'running' }, { state: 'running' }, { state: 'stopped' }],
    migrations: () => state.migrations,
    udp: () => [{ vm: 'web', buffered: 7, dropped: 3, droppedBy: { overflow: 2, closed: 1, none: 0 } }],
    directory: () => state.directory,
  };
  return { metrics: new AgentMetrics(sources), state };
}

async function scrape(m: AgentMetrics): Promise<Exposition & { value(name: string, labels?: Record<string, string>): number | undefined }> {
  const e = parseExposition(await m.text());
  return {
    ...e,
    value(name, labels = {}) {
      const f = e.families.find((x) => x.name === name);
      const s = f?.metrics.find((x) => Object.entries(labels).every(([k, v]) => x.labels?.[k] === v) && Object.keys(x.labels ?? {}).length === Object.keys(labels).length);
      return s?.value === undefined ? undefined : Number(s.value);
    },
  };
}

const end = (over: Partial<Parameters<AgentMetrics['migrationFinished']>[0]> = {}): Parameters<AgentMetrics['migrationFinished']>[0] => ({
  migrationId: 'm-1', from: 'a', outcome: 'completed', totalMs: 1500, downtimeMs: 12, bytes: 5000, memoryBytes: 4096, ...over,
});

describe('AgentMetrics', () => {
  it('two agents in one process keep two registries', async () => {
    const a = await scrape(rig('a').metrics);
    const b = await scrape(rig('b').metrics);
    expect(a.value('embot_agent_info', { agent: 'a', version: '1.2.3', driver: 'sim' })).toBe(1);
    expect(b.value('embot_agent_info', { agent: 'b', version: '1.2.3', driver: 'sim' })).toBe(1);
    expect(a.value('embot_agent_info', { agent: 'b', version: '1.2.3', driver: 'sim' })).toBeUndefined();
  });

  it('reads the services\' counts on scrape, each source once per scrape', async () => {
    const { metrics, state } = rig();
    state.events = { ...ZERO, admitted: 10, dispatched: 9, held: 4, spilled: 1, deadLetters: 2, queued: 1 };
    const first = await scrape(metrics);
    expect(state.eventReads).toBe(1);
    expect(first.value('embot_events_in_total')).toBe(10);
    expect(first.value('embot_events_dispatched_total')).toBe(9);
    expect(first.value('embot_events_held')).toBe(4);
    expect(first.value('embot_events_spilled')).toBe(1);
    expect(first.value('embot_events_dead_letters')).toBe(2);
    state.events = { ...state.events, admitted: 25, dispatched: 25, held: 0 };
    const second = await scrape(metrics);
    expect(state.eventReads).toBe(2);
    expect(second.value('embot_events_in_total')).toBe(25);
    expect(second.value('embot_events_held')).toBe(0);
  });

  it('embots, policies (nested states as a.b), plugins, VMs and UDP relays by their labels', async () => {
    const s = await scrape(rig().metrics);
    expect(s.value('embot_embots', { status: 'running' })).toBe(1);
    expect(s.value('embot_embots', { status: 'quarantined' })).toBe(1);
    expect(s.value('embot_policies', { module: 'watch', policy: 'p', state: 'busy.phase.two' })).toBe(1);
    expect(s.value('embot_plugin_restarts_total', { plugin: 'watch' })).toBe(2);
    expect(s.value('embot_vms', { state: 'running' })).toBe(2);
    expect(s.value('embot_udp_packets_buffered_total', { vm: 'web' })).toBe(7);
    expect(s.value('embot_udp_packets_dropped_total', { vm: 'web', reason: 'overflow' })).toBe(2);
    expect(s.value('embot_udp_packets_dropped_total', { vm: 'web', reason: 'none' })).toBeUndefined();
  });

  it('a completed migration: started once, succeeded, seconds and bytes in their units', async () => {
    const { metrics } = rig();
    metrics.migrationStarted('m-1', 'source');
    metrics.migrationStarted('m-1', 'source'); // every progress report says so again
    metrics.migrationFinished(end({ precopy: { perPath: [{ name: 'primary', bytes: 3000 }, { name: 'p1', bytes: 1096 }] } }), 'source');
    const s = await scrape(metrics);
    expect(s.value('embot_migrations_started_total', { role: 'source' })).toBe(1);
    expect(s.value('embot_migrations_succeeded_total', { role: 'source' })).toBe(1);
    expect(s.histogram('embot_migration_duration_seconds', { role: 'source', outcome: 'completed' })).toMatchObject({ count: 1, sum: 1.5 });
    expect(s.histogram('embot_migration_downtime_seconds', { role: 'source' })).toMatchObject({ count: 1, sum: 0.012 });
    expect(s.histogram('embot_migration_downtime_seconds', { role: 'source' }).buckets.get('0.025')).toBe(1);
    expect(s.value('embot_migration_data_processed_bytes_total', { role: 'source', phase: 'memory' })).toBe(4096);
    expect(s.value('embot_migration_data_processed_bytes_total', { role: 'source', phase: 'management' })).toBe(904);
    expect(s.value('embot_migration_path_bytes_total', { path: 'p1' })).toBe(1096);
  });

  it('aborted and denied ones: by a reason label of bounded cardinality, no downtime observed', async () => {
    const { metrics } = rig();
    metrics.migrationFinished(end({ migrationId: 'm-2', outcome: 'aborted', reason: 'sendingState failed: no module x [EMBOT_ERR_PLUGIN_LOAD_FAILED]', downtimeMs: null }), 'source');
    metrics.migrationFinished(end({ migrationId: 'm-3', outcome: 'aborted', reason: 'cancelled during migratingVm: by operator' }), 'source');
    metrics.migrationFinished(end({ migrationId: 'm-4', from: 'b', outcome: 'denied', reason: 'not enough memory' }), 'target');
    const s = await scrape(metrics);
    expect(s.value('embot_migrations_aborted_total', { role: 'source', reason: 'EMBOT_ERR_PLUGIN_LOAD_FAILED' })).toBe(1);
    expect(s.value('embot_migrations_aborted_total', { role: 'source', reason: 'cancelled' })).toBe(1);
    expect(s.value('embot_migrations_failed_total', { role: 'target', reason: 'denied' })).toBe(1);
    // A target that denied at once never reported progress: it still counts as started.
    expect(s.value('embot_migrations_started_total', { role: 'target' })).toBe(1);
    expect(s.histogram('embot_migration_downtime_seconds', { role: 'source' }).count).toBe(0);
  });

  it('running migrations: remaining bytes and rates while they run, gone once they end', async () => {
    const { metrics, state } = rig();
    state.migrations = [
      { id: 'm-9', role: 'source', vm: 'web', phase: 'migratingVm', outcome: null, progress: { bytes: 100, memoryBytes: 80, memoryTotal: 1000, remainingBytes: 920, rateBytesPerSec: 5e6, dirtyRateBytesPerSec: 1e5 } },
      { id: 'm-8', role: 'source', vm: 'db', phase: 'completed', outcome: 'completed' },
    ];
    const s = await scrape(metrics);
    const l = { migration_id: 'm-9', vm: 'web', role: 'source' };
    expect(s.value('embot_migrations_running', { role: 'source' })).toBe(1);
    expect(s.value('embot_migration_data_remaining_bytes', l)).toBe(920);
    expect(s.value('embot_migration_memory_transfer_rate_bytes_per_second', l)).toBe(5e6);
    expect(s.value('embot_migration_dirty_memory_rate_bytes_per_second', l)).toBe(1e5);
    expect(s.value('embot_migration_data_remaining_bytes', { migration_id: 'm-8', vm: 'db', role: 'source' })).toBeUndefined();
    state.migrations = [];
    const after = await scrape(metrics);
    expect(after.value('embot_migrations_running', { role: 'source' })).toBe(0);
    expect(after.families.find((f) => f.name === 'embot_migration_data_remaining_bytes')?.metrics).toEqual([]);
  });

  it('the block fetch handle counts bytes per source and ignores what is not a byte count', async () => {
    const { metrics } = rig();
    metrics.blocks.fetched('b', 65536);
    metrics.blocks.fetched('b', 4096);
    metrics.blocks.fetched('c', -1);
    metrics.blocks.fetched('c', Number.NaN);
    const s = await scrape(metrics);
    expect(s.value('embot_block_fetched_bytes_total', { source: 'b' })).toBe(69632);
    expect(s.value('embot_block_fetched_bytes_total', { source: 'c' })).toBeUndefined();
  });

  it('the fleet directory: every state a series, 1 for the current one; peers by source, both sources always there', async () => {
    const { metrics, state } = rig();
    const first = await scrape(metrics);
    expect(first.value('embot_directory_state', { kind: 'static', state: 'static' })).toBe(1);
    expect(first.value('embot_directory_state', { kind: 'static', state: 'conflict' })).toBe(0);
    expect(first.value('embot_directory_peers', { source: 'config' })).toBe(1);
    expect(first.value('embot_directory_peers', { source: 'etcd' })).toBe(0);
    state.directory = { kind: 'etcd', state: 'conflict', peers: [{ source: 'config' }, { source: 'etcd' }, { source: 'etcd' }] };
    const second = await scrape(metrics);
    expect(second.value('embot_directory_state', { kind: 'etcd', state: 'conflict' })).toBe(1);
    expect(second.value('embot_directory_state', { kind: 'etcd', state: 'connected' })).toBe(0);
    // The old kind's series are gone, not left at their last value.
    expect(second.value('embot_directory_state', { kind: 'static', state: 'static' })).toBeUndefined();
    expect(second.value('embot_directory_peers', { source: 'etcd' })).toBe(2);
  });

  it('a migration to several destinations counts each destination by outcome, at the source only', async () => {
    const { metrics } = rig();
    metrics.migrationFinished(end({ migrationId: 'f-1', destinations: [{ outcome: 'won' }, { outcome: 'terminated' }, { outcome: 'bootFailed' }] }), 'source');
    metrics.migrationFinished(end({ migrationId: 'f-2', outcome: 'aborted', reason: 'no destination booted', destinations: [{ outcome: 'bootFailed' }, { outcome: 'failed' }] }), 'source');
    metrics.migrationFinished(end({ migrationId: 'f-1~b', destinations: [{ outcome: 'won' }] }), 'target');
    const m = await scrape(metrics);
    expect(m.value('embot_fanout_destinations_total', { outcome: 'won' })).toBe(1);
    expect(m.value('embot_fanout_destinations_total', { outcome: 'terminated' })).toBe(1);
    expect(m.value('embot_fanout_destinations_total', { outcome: 'bootFailed' })).toBe(2);
    expect(m.value('embot_fanout_destinations_total', { outcome: 'failed' })).toBe(1);
  });

  it('plugin errors and quarantines count by module', async () => {
    const { metrics } = rig();
    metrics.pluginError('watch');
    metrics.pluginError('watch');
    metrics.embotQuarantined('watch');
    const s = await scrape(metrics);
    expect(s.value('embot_plugin_errors_total', { plugin: 'watch' })).toBe(2);
    expect(s.value('embot_embot_quarantines_total', { module: 'watch' })).toBe(1);
  });
});

describe('labels', () => {
  it('stateLabel: a string as is, nested as a.b, parallel regions joined with commas', () => {
    expect(stateLabel('idle')).toBe('idle');
    expect(stateLabel({ a: 'b' })).toBe('a.b');
    expect(stateLabel({ a: { b: 'c' }, x: 'y' })).toBe('a.b.c,x.y');
  });

  it('reasonLabel: the error code when there is one, else a small set of kinds', () => {
    expect(reasonLabel('migratingVm failed: boom [EMBOT_ERR_VM_BAD_STATE]')).toBe('EMBOT_ERR_VM_BAD_STATE');
    expect(reasonLabel('sendingState timed out after 3000 ms')).toBe('timeout');
    expect(reasonLabel('the agent stopped')).toBe('agent_stopped');
    expect(reasonLabel('the source disconnected')).toBe('disconnected');
    // A target's record of the source's Abort: the source's reason word for word after the phase.
    expect(reasonLabel('aborted by source in booted: terminated: c booted first (migration m-1)')).toBe('source_aborted');
    expect(reasonLabel(undefined)).toBe('unknown');
    expect(reasonLabel('something nobody foresaw')).toBe('other');
  });
});
