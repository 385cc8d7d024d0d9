import { Counter, Gauge, Histogram, Registry } from 'prom-client';
// Every state a directory can be in is a series of `embot_directory_state` (1 for the current one), so an alert need not know which exist.
import { DIRECTORY_STATES, PEER_SOURCES } from '../peers/peer-directory.ts';

/**
 * One agent's Prometheus registry (issue 15). Its own `Registry`, never prom-client's global one:
 * tests and benches run several agents in one process.
 *
 * The event path pays nothing: the services already count (sensor stats, runtime lists, UDP relay
 * stats); those counts are read when `/metrics` is scraped (`collect()`). Only what no service
 * keeps is counted here, from events the services already emit (a migration's start and end,
 * plugin errors, quarantines) — none of them per-event.
 *
 * Names and units follow Prometheus conventions (`_total`, `_bytes`, `_seconds`); the migration
 * family mirrors KubeVirt's `kubevirt_vmi_migration_*`, with a rate named what it is
 * (`_bytes_per_second`, not a `_bytes` gauge carrying a rate).
 */

/** What the sensor service and the runtime count, read on scrape. */
export interface EventCounts {
  /** Events taken into this agent's queue (posted, or handed over by a migration), since start. */
  readonly admitted: number;
  readonly dispatched: number;
  readonly delivered: number;
  readonly unrouted: number;
  readonly muted: number;
  readonly duplicates: number;
  readonly rejected: number;
  readonly deliveryErrors: number;
  readonly forwarded: number;
  /** Queue depths now. */
  readonly queued: number;
  readonly held: number;
  readonly spilled: number;
  readonly inFlight: number;
  readonly forwardQueued: number;
  readonly parked: number;
  /** Rows in the dead-letter table. */
  readonly deadLetters: number;
}

export interface EmbotView {
  readonly module: string;
  readonly status: string;
  readonly policies: readonly { readonly name: string; readonly state: unknown }[];
}

export interface PluginView {
  readonly name: string;
  readonly status: string;
  readonly restarts: number;
}

/** A migration as the control API lists it (structural: core/mobility's MigrationInfo fits). */
export interface MigrationView {
  readonly id: string;
  readonly role: 'source' | 'target';
  readonly vm: string;
  readonly phase: string;
  readonly outcome: string | null;
  readonly progress?: {
    readonly bytes: number;
    readonly memoryBytes: number;
    readonly memoryTotal: number;
    readonly remainingBytes?: number;
    readonly rateBytesPerSec?: number;
    readonly dirtyRateBytesPerSec?: number;
  };
}

/** A finished migration's summary (structural: core/mobility's MigrationSummary fits). */
export interface MigrationEnd {
  readonly migrationId: string;
  readonly from: string;
  readonly outcome: string;
  readonly reason?: string;
  readonly totalMs: number;
  readonly downtimeMs: number | null;
  readonly bytes: number;
  readonly memoryBytes: number;
  readonly precopy?: { readonly perPath: readonly { readonly name: string; readonly bytes: number }[] };
  /** A migration to several destinations (source side): each destination of each attempt, with its outcome (won, terminated, bootFailed, denied, failed). */
  readonly destinations?: readonly { readonly outcome: string }[];
}

/** The fleet directory as the agent sees it (structural: core/peers' DirectoryStatus fits). */
export interface DirectoryView {
  readonly kind: string;
  readonly state: string;
  readonly peers: readonly { readonly source: string }[];
}


export interface UdpView {
  readonly vm: string;
  readonly buffered: number;
  readonly dropped: number;
  readonly droppedBy: Readonly<Record<string, number>>;
}

/** Where the scrape reads from; the agent wires its services in (core/agent.ts). */
export interface MetricsSources {
  readonly agent: { readonly name: string; readonly version: string; readonly driver: string };
  events(): EventCounts;
  embots(): readonly EmbotView[];
  plugins(): readonly PluginView[];
  vms(): readonly { readonly state: string }[];
  migrations(): readonly MigrationView[];
  udp(): readonly UdpView[];
  directory(): DirectoryView;
}

/** The typed handle the block fetcher (images) increments: bytes it fetched, by the holder they came from. */
export interface BlockFetchMetrics {
  fetched(source: string, bytes: number): void;
}

export type MigrationRole = 'source' | 'target';

const DURATION_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600];
const DOWNTIME_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

/**
 * The agent's metrics. `text()` is what `GET /metrics` serves.
 *
 * @example
 * ```ts
 * const metrics = new AgentMetrics(sources);
 * mobility.on('finished', (s) => metrics.migrationFinished(s, s.from === name ? 'source' : 'target'));
 * const body = await metrics.text();
 * ```
 */
export class AgentMetrics {
  readonly registry = new Registry();
  /** For the images engineer's block fetcher: `metrics.blocks.fetched('b', 4096)`. */
  readonly blocks: BlockFetchMetrics;
  private readonly started = new Set<string>();
  private readonly migrationsStarted: Counter<'role'>;
  private readonly migrationsSucceeded: Counter<'role'>;
  private readonly migrationsFailed: Counter<'role' | 'reason'>;
  private readonly migrationsAborted: Counter<'role' | 'reason'>;
  private readonly migrationDuration: Histogram<'role' | 'outcome'>;
  private readonly migrationDowntime: Histogram<'role'>;
  private readonly migrationPhaseBytes: Counter<'role' | 'phase'>;
  private readonly migrationPathBytes: Counter<'path'>;
  private readonly fanOutDestinations: Counter<'outcome'>;
  private readonly pluginErrors: Counter<'plugin'>;
  private readonly quarantines: Counter<'module'>;

  constructor(sources: MetricsSources) {
    const registers = [this.registry];
    // Several metrics read one source (16 read the event counts): once per scrape, not once per metric.
    const s: MetricsSources = {
      agent: sources.agent,
      events: oncePerScrape(() => sources.events()),
      embots: oncePerScrape(() => sources.embots()),
      plugins: oncePerScrape(() => sources.plugins()),
      vms: oncePerScrape(() => sources.vms()),
      migrations: oncePerScrape(() => sources.migrations()),
      udp: oncePerScrape(() => sources.udp()),
      directory: oncePerScrape(() => sources.directory()),
    };

    new Gauge({ name: 'embot_agent_info', help: 'This agent: always 1, its name, version and hypervisor driver as labels.', labelNames: ['agent', 'version', 'driver'], registers })
      .set({ agent: s.agent.name, version: s.agent.version, driver: s.agent.driver }, 1);

    // ---- events (read from the sensor service's and the runtime's own counts on scrape) ----
    const eventCounter = (name: string, help: string, pick: (e: EventCounts) => number): void => {
      new Counter({
        name,
        help,
        registers,
        collect() {
          this.reset();
          this.inc(pick(s.events()));
        },
      });
    };
    const eventGauge = (name: string, help: string, pick: (e: EventCounts) => number): void => {
      new Gauge({
        name,
        help,
        registers,
        collect() {
          this.set(pick(s.events()));
        },
      });
    };
    eventCounter('embot_events_in_total', 'Events taken into this agent (posted by sensors and the control API, or handed over by a migration) since it started.', (e) => e.admitted);
    eventCounter('embot_events_dispatched_total', 'Events dispatched from the time-ordered queue.', (e) => e.dispatched);
    eventCounter('embot_events_delivered_total', 'Deliveries of dispatched events to subscribing embots.', (e) => e.delivered);
    eventCounter('embot_events_unrouted_total', 'Dispatched events no embot subscribed to.', (e) => e.unrouted);
    eventCounter('embot_events_muted_total', "Events suppressed while their sensor was muted (an effector's own action).", (e) => e.muted);
    eventCounter('embot_events_duplicates_total', 'Events dropped as duplicates of an id already seen.', (e) => e.duplicates);
    eventCounter('embot_events_rejected_total', 'Events refused after they were posted (journal write failures, invalid sensor emits).', (e) => e.rejected);
    eventCounter('embot_events_delivery_errors_total', 'Deliveries that threw in the subscriber.', (e) => e.deliveryErrors);
    eventCounter('embot_events_forwarded_total', "Events forwarded to a moved VM's new agent.", (e) => e.forwarded);
    eventGauge('embot_events_queued', 'Events posted and not yet dispatched.', (e) => e.queued);
    eventGauge('embot_events_held', 'Events in hold queues (elements migrating), spilled ones included.', (e) => e.held);
    eventGauge('embot_events_spilled', 'Held events spilled to the journal.', (e) => e.spilled);
    eventGauge('embot_events_in_flight', 'Dispatched events a durable subscriber has not completed.', (e) => e.inFlight);
    eventGauge('embot_events_forward_queued', 'Events waiting to be forwarded to another agent.', (e) => e.forwardQueued);
    eventGauge('embot_events_parked', 'Events parked for embots not running yet.', (e) => e.parked);
    eventGauge('embot_events_dead_letters', 'Events in the dead-letter table (see `embot events dead`).', (e) => e.deadLetters);

    // ---- embots, policies, plugins ----
    new Gauge({
      name: 'embot_embots',
      help: 'Embots on this agent, by status.',
      labelNames: ['status'],
      registers,
      collect() {
        this.reset();
        for (const e of s.embots()) this.inc({ status: e.status });
      },
    });
    new Gauge({
      name: 'embot_policies',
      help: 'Policies of the embots on this agent, by module, policy and current state.',
      labelNames: ['module', 'policy', 'state'],
      registers,
      collect() {
        this.reset();
        for (const e of s.embots()) for (const p of e.policies) this.inc({ module: e.module, policy: p.name, state: stateLabel(p.state) });
      },
    });
    new Gauge({
      name: 'embot_plugins',
      help: 'Plugins (management modules) known to this agent, by status.',
      labelNames: ['status'],
      registers,
      collect() {
        this.reset();
        for (const p of s.plugins()) this.inc({ status: p.status });
      },
    });
    new Counter({
      name: 'embot_plugin_restarts_total',
      help: "Restarts of a plugin's worker after it crashed or hung.",
      labelNames: ['plugin'],
      registers,
      collect() {
        this.reset();
        for (const p of s.plugins()) this.inc({ plugin: p.name }, p.restarts);
      },
    });
    this.pluginErrors = new Counter({ name: 'embot_plugin_errors_total', help: 'Errors a plugin reported or caused (load failures, crashes, disabling).', labelNames: ['plugin'], registers });
    this.quarantines = new Counter({ name: 'embot_embot_quarantines_total', help: 'Embots quarantined (a policy kept failing), by module.', labelNames: ['module'], registers });
    new Gauge({
      name: 'embot_vms',
      help: 'VMs on this agent, by state.',
      labelNames: ['state'],
      registers,
      collect() {
        this.reset();
        for (const v of s.vms()) this.inc({ state: v.state });
      },
    });

    // ---- migrations (counted at their start and end; running ones read on scrape) ----
    this.migrationsStarted = new Counter({ name: 'embot_migrations_started_total', help: 'Migrations started, by role (source or target).', labelNames: ['role'], registers });
    this.migrationsSucceeded = new Counter({ name: 'embot_migrations_succeeded_total', help: 'Migrations completed, by role.', labelNames: ['role'], registers });
    this.migrationsFailed = new Counter({ name: 'embot_migrations_failed_total', help: 'Migrations that did not happen (denied by the target), by role and reason.', labelNames: ['role', 'reason'], registers });
    this.migrationsAborted = new Counter({ name: 'embot_migrations_aborted_total', help: 'Migrations aborted and rolled back (the VM stays at the source), by role and reason.', labelNames: ['role', 'reason'], registers });
    this.migrationDuration = new Histogram({ name: 'embot_migration_duration_seconds', help: 'Time from a migration start to its end, by role and outcome.', labelNames: ['role', 'outcome'], buckets: DURATION_BUCKETS, registers });
    this.migrationDowntime = new Histogram({ name: 'embot_migration_downtime_seconds', help: "Completed migrations: from the VM's stop at the source to the target's acknowledgement.", labelNames: ['role'], buckets: DOWNTIME_BUCKETS, registers });
    this.migrationPhaseBytes = new Counter({ name: 'embot_migration_data_processed_bytes_total', help: "Bytes a migration moved, by role and phase: 'memory' (the VM's memory) or 'management' (elements, embots, events).", labelNames: ['role', 'phase'], registers });
    this.migrationPathBytes = new Counter({ name: 'embot_migration_path_bytes_total', help: 'Memory bytes sent per data path (source side).', labelNames: ['path'], registers });
    this.fanOutDestinations = new Counter({
      name: 'embot_fanout_destinations_total',
      help: 'Destinations of migrations to several destinations (source side), by outcome: won, terminated (another won), bootFailed, denied, failed.',
      labelNames: ['outcome'],
      registers,
    });
    new Gauge({
      name: 'embot_migrations_running',
      help: 'Migrations running now, by role.',
      labelNames: ['role'],
      registers,
      collect() {
        this.reset();
        this.set({ role: 'source' }, 0);
        this.set({ role: 'target' }, 0);
        for (const m of running(s)) this.inc({ role: m.role });
      },
    });
    const runningGauge = (name: string, help: string, pick: (p: NonNullable<MigrationView['progress']>) => number | undefined): void => {
      new Gauge({
        name,
        help,
        labelNames: ['migration_id', 'vm', 'role'],
        registers,
        collect() {
          this.reset();
          for (const m of running(s)) {
            const v = m.progress && pick(m.progress);
            if (v !== undefined) this.set({ migration_id: m.id, vm: m.vm, role: m.role }, v);
          }
        },
      });
    };
    runningGauge('embot_migration_data_processed_bytes', 'Running migrations: bytes moved so far (management state, events, memory).', (p) => p.bytes);
    runningGauge('embot_migration_data_total_bytes', "Running migrations: the VM's memory to copy.", (p) => p.memoryTotal);
    runningGauge('embot_migration_data_remaining_bytes', 'Running migrations: dirty memory left to copy (pre-copy).', (p) => p.remainingBytes);
    runningGauge('embot_migration_memory_transfer_rate_bytes_per_second', 'Running migrations: memory copy rate.', (p) => p.rateBytesPerSec);
    runningGauge('embot_migration_dirty_memory_rate_bytes_per_second', "Running migrations: the rate the guest dirties memory.", (p) => p.dirtyRateBytesPerSec);

    // ---- fleet directory ----
    new Gauge({
      name: 'embot_directory_state',
      help: "The fleet directory's state: 1 for the current one (conflict: another live agent holds this one's name in etcd; unavailable: etcd unreachable, the peers last known kept).",
      labelNames: ['kind', 'state'],
      registers,
      collect() {
        this.reset();
        const d = s.directory();
        for (const state of DIRECTORY_STATES) this.set({ kind: d.kind, state }, state === d.state ? 1 : 0);
      },
    });
    new Gauge({
      name: 'embot_directory_peers',
      help: 'Peers this agent knows, by where they came from (config, etcd).',
      labelNames: ['source'],
      registers,
      collect() {
        this.reset();
        for (const source of PEER_SOURCES) this.set({ source }, 0);
        for (const p of s.directory().peers) this.inc({ source: p.source });
      },
    });

    // ---- UDP relays and block fetches ----
    new Counter({
      name: 'embot_udp_packets_buffered_total',
      help: "Client packets a VM's UDP relay buffered while the VM was paused or moving, by VM.",
      labelNames: ['vm'],
      registers,
      collect() {
        this.reset();
        for (const u of s.udp()) this.inc({ vm: u.vm }, u.buffered);
      },
    });
    new Counter({
      name: 'embot_udp_packets_dropped_total',
      help: "Client packets a VM's UDP relay dropped, by VM and reason.",
      labelNames: ['vm', 'reason'],
      registers,
      collect() {
        this.reset();
        for (const u of s.udp()) for (const [reason, n] of Object.entries(u.droppedBy)) if (n > 0) this.inc({ vm: u.vm, reason }, n);
      },
    });
    const blockBytes = new Counter({ name: 'embot_block_fetched_bytes_total', help: 'Image block bytes fetched, by the holder they came from.', labelNames: ['source'], registers });
    this.blocks = {
      fetched: (source, bytes) => {
        if (Number.isFinite(bytes) && bytes > 0) blockBytes.inc({ source }, bytes);
      },
    };
  }

  /** Prometheus text format (version 0.0.4). */
  get contentType(): string {
    return this.registry.contentType;
  }

  text(): Promise<string> {
    return this.registry.metrics();
  }

  /** A migration showed up (its first progress report); counted once per id and role. */
  migrationStarted(id: string, role: MigrationRole): void {
    const k = `${role}:${id}`;
    if (this.started.has(k)) return;
    this.started.add(k);
    this.migrationsStarted.inc({ role });
  }

  migrationFinished(s: MigrationEnd, role: MigrationRole): void {
    // A target that denied at once may never have reported progress: it still started.
    this.migrationStarted(s.migrationId, role);
    this.started.delete(`${role}:${s.migrationId}`);
    if (s.outcome === 'completed') this.migrationsSucceeded.inc({ role });
    else if (s.outcome === 'aborted') this.migrationsAborted.inc({ role, reason: reasonLabel(s.reason) });
    else this.migrationsFailed.inc({ role, reason: s.outcome === 'denied' ? 'denied' : reasonLabel(s.reason) });
    this.migrationDuration.observe({ role, outcome: s.outcome }, s.totalMs / 1000);
    if (s.outcome === 'completed' && s.downtimeMs !== null) this.migrationDowntime.observe({ role }, s.downtimeMs / 1000);
    const memory = Math.max(0, s.memoryBytes);
    if (memory > 0) this.migrationPhaseBytes.inc({ role, phase: 'memory' }, memory);
    const management = Math.max(0, s.bytes - memory);
    if (management > 0) this.migrationPhaseBytes.inc({ role, phase: 'management' }, management);
    for (const p of s.precopy?.perPath ?? []) if (p.bytes > 0) this.migrationPathBytes.inc({ path: p.name }, p.bytes);
    if (role === 'source') for (const d of s.destinations ?? []) this.fanOutDestinations.inc({ outcome: d.outcome });
  }

  pluginError(plugin: string): void {
    this.pluginErrors.inc({ plugin });
  }

  embotQuarantined(module: string): void {
    this.quarantines.inc({ module });
  }
}

/**
 * A scrape calls every metric's collect() in one synchronous pass (prom-client's registry starts
 * them all before its first await), so a value kept until the next microtask is shared by that
 * scrape alone; the next scrape reads afresh.
 */
function oncePerScrape<T>(read: () => T): () => T {
  let cached: { readonly value: T } | undefined;
  return () => {
    if (cached) return cached.value;
    cached = { value: read() };
    queueMicrotask(() => (cached = undefined));
    return cached.value;
  };
}

function running(s: MetricsSources): MigrationView[] {
  return s.migrations().filter((m) => m.outcome === null);
}

/** An xstate state value as one label: `idle`, or `a.b` for nested states, `a.b,c.d` for parallel ones. */
export function stateLabel(state: unknown): string {
  if (typeof state === 'string') return state;
  if (state && typeof state === 'object') {
    return Object.entries(state as Record<string, unknown>)
      .map(([k, v]) => (v === undefined || (typeof v === 'object' && v !== null && Object.keys(v).length === 0) ? k : `${k}.${stateLabel(v)}`))
      .join(',');
  }
  return String(state);
}

/**
 * A failure reason as a label of bounded cardinality: the error code when the text carries one,
 * else the kind of failure (the free text stays in the migration's summary and logs).
 */
export function reasonLabel(reason: string | undefined): string {
  if (!reason) return 'unknown';
  const code = /EMBOT_ERR_[A-Z0-9_]+/.exec(reason);
  if (code) return code[0];
  if (/cancel/i.test(reason)) return 'cancelled';
  if (/timed out|timeout/i.test(reason)) return 'timeout';
  if (/agent stopped/i.test(reason)) return 'agent_stopped';
  if (/disconnect/i.test(reason)) return 'disconnected';
  if (/source aborted|aborted by source/i.test(reason)) return 'source_aborted';
  if (/denied/i.test(reason)) return 'denied';
  return 'other';
}
