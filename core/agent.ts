import { isAbsolute, join, resolve } from 'node:path';
import { readFileSync } from 'node:fs';
import { pack, unpack } from 'msgpackr';
import type { AgentConfig } from './config/config.ts';
import type { Logger } from './logger.ts';
import { Store } from './store/store.ts';
import { ServiceRegistry } from './registry.ts';
import { ManagedObjectService } from './objects/object-service.ts';
import type { ManagedElement } from './objects/managed-element.ts';
import { ModuleCatalogue, type ModuleRecord } from './plugins/catalogue.ts';
import { PluginStatusStore } from './plugins/plugin-status-store.ts';
import { describeError, EffectorError, EmbotError, ErrorCodes, type ErrorCode } from './errors.ts';
import type { EmbotEvent, EmbotEventInput } from './events.ts';
import type { AgentControl, AgentStatus, CreateVmRequest, DeadLetter, EmbotInfo, EmittedEvent, MigrateOptions, PluginInfo, RemovedVm, RemoveVmOptions, VmAction, VmChecksum, VmInfo as ControlVmInfo } from './control/control-api.ts';
import { startControlServer } from './control/server.ts';
import { createDashboard, type Dashboard } from './control/dashboard-routes.ts';
import { wireLiveSources } from './control/live-sources.ts';
import { AgentMetrics, type MetricsSources, type UdpView } from './metrics/index.ts';
import { HostSensor, SensorService, VmSensor, VmUdpServices } from '../sensors/index.ts';
import { EffectorRegistry, HypervisorEffector, createDriver, unsupported, type DriverChoice, type HypervisorDriver, type VmInfo } from '../effectors/index.ts';
import { EMBOT_API_VERSION, EmbotRuntime, type AttachableElement } from '../embots/index.ts';
import { MigrationJournal } from './mobility/migration-journal.ts';
import { MobilityService } from './mobility/mobility-service.ts';
import { AgentModuleProvider } from './mobility/module-provider.ts';
import { MobilityEffector } from './mobility/mobility-effector.ts';
import { PluginCache } from './mobility/plugin-cache.ts';
import { createTrustPolicy } from './mobility/trust-policy.ts';
import type { MobilityHost } from './mobility/mobility-host.ts';
import type { MigrationImageBuild, MigrationInfo, MigrationSummary } from './mobility/migration-record.ts';
import type { Destinations } from './mobility/destinations.ts';
import { loadClusterSecret } from './wire/auth.ts';
import { connectNamedPeer } from './wire/peer-client.ts';
import type { PeerStatusReply } from './wire/frames.ts';
import type { PeerConnection } from './wire/peer-connection.ts';
import { peerEndpoint, type PeerEndpoint } from './wire/peer-services.ts';
import { ImageService, costTable, imagesDirOf, rankTargetsByImage, type BuildSummary, type VmImageRef } from '../images/index.ts';
import { loadPeerTls } from './wire/peer-tls.ts';
import { createPeerDirectory } from './peers/create-peer-directory.ts';
import type { PeerDirectory } from './peers/peer-directory.ts';

/** The package version, found from the sources (`core/`) or from a build (`dist/core/`). */
const VERSION = ((): string => {
  for (const rel of ['../package.json', '../../package.json']) {
    try {
      return (JSON.parse(readFileSync(new URL(rel, import.meta.url), 'utf8')) as { version: string }).version;
    } catch {
      /* try the next place */
    }
  }
  return '0.0.0';
})();
const RECENT_EVENTS = 1000;
/** Driver process notices worth an operator's eye; a guest's own QMP events (STOP, RESUME…) are not logged. */
const DRIVER_NOTICES: ReadonlySet<string> = new Set(['REATTACH_FAILED', 'RAM_SIZE_UNKNOWN', 'MIGRATION_CANCELLED', 'QMP_DETACHED', 'QMP_REATTACHED']);
/** How long the dashboard waits for a peer's status before showing it without one. */
const PEER_STATUS_TIMEOUT_MS = 3000;

/** Services of one agent, found by name through the registry. */
export interface AgentServices {
  readonly store: Store;
  readonly objects: ManagedObjectService;
  readonly sensors: SensorService;
  readonly effectors: EffectorRegistry;
  readonly hypervisor: HypervisorDriver;
  readonly runtime: EmbotRuntime;
  readonly plugins: PluginStatusStore;
  readonly mobility: MobilityService;
  readonly images: ImageService;
  readonly peer: PeerEndpoint;
}

export interface RunningAgent {
  readonly name: string;
  readonly peerUrl: string | undefined;
  readonly control: AgentControl;
  readonly controlUrl: string;
  readonly services: ServiceRegistry<AgentServices>;
  /** The agent's Prometheus registry (`GET /metrics`); `metrics.blocks` takes the block fetcher's bytes. */
  readonly metrics: AgentMetrics;
  stop(): Promise<void>;
}

/**
 * Starts one agent: store, managed objects, sim hypervisor, sensor service with host and VM
 * sensors, embot runtime with the plugins folder (watched), control API on loopback. After a
 * crash it comes back where it was: elements, VMs, embots with their policy state and pending
 * delays, and the journaled events not yet processed.
 *
 * @example
 * ```ts
 * const agent = await startAgent(loadConfig({ flags: { control: { port: 0 } } }), logger);
 * await new ControlClient(agent.controlUrl).status();
 * await agent.stop();
 * ```
 */
export async function startAgent(config: AgentConfig, logger: Logger): Promise<RunningAgent> {
  const agent = new AgentImpl(config, logger);
  try {
    await agent.start();
  } catch (e) {
    await agent.stop().catch(() => {});
    throw e;
  }
  return agent;
}

class AgentImpl implements RunningAgent, AgentControl, MobilityHost {
  readonly name: string;
  readonly services = new ServiceRegistry<AgentServices>();
  controlUrl = '';
  get control(): AgentControl {
    return this;
  }
  private readonly startedAt = Date.now();
  readonly store: Store;
  readonly objects: ManagedObjectService;
  readonly sensors: SensorService;
  readonly driver: HypervisorDriver;
  /** The driver's spec for a `vm create` request. */
  private readonly specFor: (r: CreateVmRequest & { readonly imageName?: string }) => { readonly name: string };
  /** Component-state key of the driver's persisted state (one per driver kind). */
  private readonly driverStateKey: string;
  private readonly effectors = new EffectorRegistry();
  readonly runtime: EmbotRuntime;
  private readonly plugins: PluginStatusStore;
  private catalogue: ModuleCatalogue | undefined;
  private controlServer: { url: string; close(): Promise<void> } | undefined;
  private dashboard: Dashboard | undefined;
  private readonly recent: EmbotEvent[] = [];
  private readonly loading = new Set<Promise<void>>();
  private stopped = false;
  readonly journal: MigrationJournal;
  readonly modules: AgentModuleProvider;
  readonly mobility: MobilityService;
  /** Who the peers are (config, and etcd with `directory.kind: etcd`): a live view read at each use. */
  private readonly directory: PeerDirectory;
  /** Images and placement (issue 14): block index, global indexer, builds. */
  readonly images: ImageService;
  private readonly connectPeer: (peer: string) => Promise<PeerConnection>;
  /** The peer endpoint features register their frames with (once the peer server listens). */
  peer: PeerEndpoint | undefined;
  readonly migratingIn = new Set<string>();
  /** Per removed VM: its embots ending and its elements going (the driver's vm-removed), until done. */
  private readonly vmCleanups = new Map<string, Promise<void>>();
  readonly udp: VmUdpServices;
  readonly hostMemory: number;
  readonly reassemblyCpuPerPath: number;
  readonly allowedSources: readonly string[];
  readonly metrics: AgentMetrics;
  /** Modules loaded from the plugin cache (shipped by peers), by name. */
  private readonly shipped = new Map<string, { name: string; version: string; hash: string; dir: string; embotTypes: string[] }>();

  constructor(private readonly config: AgentConfig, private readonly log: Logger) {
    this.name = config.name;
    this.store = Store.open({ file: join(resolve(config.dataDir), 'embot.sqlite'), synchronous: config.store.synchronous });
    this.objects = new ManagedObjectService({ store: this.store });
    // Read lazily: the image service is built below, and a qemu image disk is an overlay on its file.
    const chosen = createDriver(driverChoice(config, (image) => this.images.imagePath(image)));
    this.driver = chosen.driver;
    this.specFor = chosen.specFor;
    this.driverStateKey = `driver:${config.driver}`;
    this.sensors = new SensorService({ host: config.name, store: this.store });
    this.effectors.register(new HypervisorEffector(this.driver, this.specFor));
    this.plugins = new PluginStatusStore(this.store);
    this.runtime = new EmbotRuntime({ store: this.store, sensors: this.sensors, effectors: this.effectors, moduleConfig: (m) => config.modules[m] });
    this.journal = new MigrationJournal(this.store);
    this.udp = new VmUdpServices(log.child('udp'));
    this.hostMemory = config.sim.hostMemory;
    this.reassemblyCpuPerPath = config.dataplane.reassemblyCpuPerPath;
    this.allowedSources = config.mobility.allowedSources;
    const trust = createTrustPolicy(config.mobility.trust);
    this.modules = new AgentModuleProvider(this.runtime, new PluginCache(join(resolve(config.dataDir), 'plugin-cache')), trust, (m) => {
      this.shipped.set(m.name, { name: m.name, version: m.version, hash: m.hash, dir: m.dir, embotTypes: m.manifest.embots.map((t) => t.type) });
      this.plugins.record({ name: m.name, version: m.version, hash: m.hash, status: 'loaded' });
    });
    this.directory = createPeerDirectory(config, { version: VERSION, startedAt: this.startedAt }, log.child('directory'));
    // Who this agent is on its peer links, read once for mobility and the agent's own peer requests.
    const peerAuth = {
      agent: config.name,
      secret: config.peer.secretFile ? loadClusterSecret(config.peer.secretFile) : undefined,
      tls: config.peer.tls ? loadPeerTls(config.peer.tls, config.name) : undefined,
      protocol: config.peer.protocol,
    };
    this.mobility = new MobilityService({
      host: this,
      secret: peerAuth.secret,
      tls: peerAuth.tls,
      protocol: peerAuth.protocol,
      listen: config.peer.listen,
      // Live: a peer etcd lists after start is a valid `migrate --to`, and gets warm links (mobility follows its changes).
      peers: this.directory,
      stepTimeoutMs: config.mobility.stepTimeoutMs,
      vmTimeoutMs: config.mobility.vmTimeoutMs,
      maxDirtyRounds: config.mobility.maxDirtyRounds,
      forwardGraceMs: config.mobility.forwardGraceMs,
      dataplane: config.dataplane,
      warmConnections: config.mobility.warmConnections,
      prewarmExitShare: config.mobility.prewarmExitShare,
    });
    const peerMap = this.directory;
    this.connectPeer = (peer) => connectNamedPeer(peerMap, peer, { ...peerAuth, requestTimeoutMs: config.mobility.stepTimeoutMs });
    this.images = new ImageService({
      agent: config.name,
      db: this.store.db,
      imagesDir: imagesDirOf(resolve(config.dataDir), config.images.dir),
      libraryDir: config.imageLibrary === undefined ? undefined : resolve(config.imageLibrary),
      blockSize: config.images.blockSize,
      indexer: config.images.indexer ?? config.name,
      members: config.images.members,
      costs: costTable(config.images.cost),
      connect: this.connectPeer,
      hostLoad: async () => ({ cpu: Math.min(1, await this.hostLoad()), freeMemory: Math.max(0, this.hostMemory - this.driver.list().reduce((s, v) => s + v.memory, 0)) }),
      reindexMs: config.images.reindexMs,
      requestTimeoutMs: config.mobility.stepTimeoutMs,
      buildTimeoutMs: config.images.buildTimeoutMs,
      log: log.child('images'),
      onFetched: (source, bytes) => this.metrics.blocks.fetched(source, bytes),
      // The VM's element travels with it, so a host it moved to knows its image for the next move.
      vmImageOf: (vm) => {
        const st = this.objects.get(`vm:${vm}`)?.state;
        return typeof st?.['image'] === 'string' ? { image: st['image'], ...(typeof st['imageManifest'] === 'string' ? { manifest: st['imageManifest'] } : {}) } : undefined;
      },
      ...(config.images.cost.measure ? { measure: config.images.cost.measure, probePeers: () => [...this.directory.keys()] } : {}),
      // The VMs' own disks are indexed with the images (a qemu overlay: the blocks the VM wrote).
      vmDisks: () =>
        this.driver.list().flatMap((vm) => {
          const disks = (this.driver.spec(vm.name) as { readonly disks?: readonly { readonly path: string; readonly format?: string }[] } | undefined)?.disks ?? [];
          return disks.flatMap((d, disk) => (d.format === 'raw' || d.format === 'qcow2' ? [{ vm: vm.name, disk, path: d.path, format: d.format }] : []));
        }),
    });
    const r = this.services;
    r.register('store', this.store);
    r.register('images', this.images);
    r.register('objects', this.objects);
    r.register('sensors', this.sensors);
    r.register('effectors', this.effectors);
    r.register('hypervisor', this.driver);
    r.register('runtime', this.runtime);
    r.register('plugins', this.plugins);
    r.register('mobility', this.mobility);
    this.effectors.register(new MobilityEffector(this.mobility));
    this.metrics = new AgentMetrics(this.metricsSources());
  }

  /** What a `/metrics` scrape reads: the services' own counts (nothing is counted on the event path for it). */
  private metricsSources(): MetricsSources {
    return {
      agent: { name: this.name, version: VERSION, driver: this.config.driver },
      events: () => ({ ...this.sensors.stats(), parked: this.runtime.parkedCount(), deadLetters: this.runtime.deadLetterCount() }),
      embots: () => this.runtime.list(),
      plugins: () => this.listPlugins(),
      vms: () => this.driver.list(),
      migrations: () => this.mobility.list(),
      udp: () => {
        const out: UdpView[] = [];
        for (const vm of this.driver.list()) {
          const s = this.udp.stats(vm.name);
          if (s) out.push({ vm: vm.name, buffered: s.buffered, dropped: s.dropped, droppedBy: s.droppedBy });
        }
        return out;
      },
      directory: () => this.directory.status(),
    };
  }

  get agent(): string {
    return this.name;
  }

  /** `ws://…` (`wss://…` with TLS) where peers reach this agent, when it has a cluster secret or TLS. */
  get peerUrl(): string | undefined {
    return this.mobility.peerUrl;
  }

  get logger(): Logger {
    return this.log;
  }

  async start(): Promise<void> {
    const log = this.log;
    this.objects.load();
    // What the driver reports of its VMs' processes (a QEMU it could not re-attach to, a migration
    // it cancelled, QMP dropped and taken back) goes to the log, from the restore on.
    this.driver.events.on('vm-event', (e) => {
      if (DRIVER_NOTICES.has(e.event)) log[e.event === 'REATTACH_FAILED' || e.event === 'RAM_SIZE_UNKNOWN' ? 'warn' : 'info'](`VM ${e.name}: ${e.event}`, { ...e.data });
    });
    // The VMs come back before anything looks at them: qemu re-attaches to its running QEMUs
    // (never starting a second one), the sim recreates its VMs. Without persisted state qemu
    // still finds the VMs its state dirs hold.
    const saved = this.store.getComponentState(this.driverStateKey);
    if (saved) await this.driver.restoreState(unpack(saved));
    else if (this.config.driver !== 'sim') await this.driver.restoreState(undefined);

    this.runtime.on('processed', (events) => {
      for (const e of events) this.recent.push(e);
      if (this.recent.length > RECENT_EVENTS) this.recent.splice(0, this.recent.length - RECENT_EVENTS);
    });
    this.runtime.on('embot-quarantined', (e) => log.warn(`embot ${e.embotId} quarantined`, { code: e.code, reason: e.reason }));
    this.runtime.on('embot-quarantined', (e) => this.metrics.embotQuarantined(this.runtime.get(e.embotId)?.module ?? 'unknown'));
    this.runtime.on('module-status', (e) => {
      if (e.error !== undefined || e.status === 'error' || e.status === 'disabled') this.metrics.pluginError(e.module);
    });
    this.mobility.on('progress', (m) => this.metrics.migrationStarted(m.id, m.role));
    this.mobility.on('finished', (s) => this.metrics.migrationFinished(s, s.from === this.name ? 'source' : 'target'));
    this.runtime.on('module-status', (e) => {
      const m = this.catalogue?.get(e.module);
      if (m) this.plugins.record({ name: m.name, version: m.version, hash: m.hash, status: e.status, ...(e.error ? { error: e.error } : {}), restarts: e.restarts });
      if (e.status === 'disabled') {
        this.plugins.disable(e.module, e.error ?? 'disabled');
        log.error(`module ${e.module} disabled`, { reason: e.error });
      } else if (e.error) log.warn(`module ${e.module}: ${e.error}`);
    });
    this.runtime.on('log', (e) => {
      const data = e.data && typeof e.data === 'object' ? (e.data as Record<string, unknown>) : {};
      const l = log.child(e.embotId);
      if (e.level === 'error' || e.level === 'warn' || e.level === 'debug') l[e.level](e.message, data);
      else l.info(e.message, data);
    });

    // Elements: the host, and one tree per VM the driver knows (restored after a restart).
    const hostId = `host:${this.name}`;
    if (!this.objects.has(hostId)) this.objects.register({ id: hostId, kind: 'host', state: { name: this.name } });
    for (const vm of this.driver.list()) await this.adoptDriverVm(vm);
    this.driver.events.on('vm-state', (e) => {
      this.persistDriver();
      // An incoming migration registers the VM's elements and embots itself, at its commit.
      if (this.migratingIn.has(e.name)) return;
      const late = e.reason === 'reattach' && e.from === null && !this.objects.has(`vm:${e.name}`) ? this.driver.get(e.name) : undefined;
      if (late) {
        // A QEMU the restore could attach to only later (qemu-driver attachLate), with no element kept for it.
        void this.adoptDriverVm(late).then((el) => {
          if (el) for (const dep of this.objects.subtree(el)) void this.attach(dep);
        });
        return;
      }
      this.syncUdp(e.name, e.to);
      if (e.reason === 'create') {
        const vm = this.driver.get(e.name);
        // The VM and its dependents (disk, nic) each get the embots that attach to their kind.
        if (vm) for (const el of this.objects.subtree(this.ensureVmElement(vm).id)) void this.attach(el);
      } else if (this.objects.has(`vm:${e.name}`)) {
        this.objects.update(`vm:${e.name}`, { state: e.to });
      }
    });
    this.driver.events.on('vm-removed', (e) => {
      this.persistDriver();
      // A migrated VM's relay stays for the grace period, forwarding to its new host.
      if (!this.udp.isRepointed(e.name)) void this.udp.remove(e.name);
      // Its disk's blocks are no longer here: the indexer stops offering this host for them.
      void this.images.reindex().catch(() => {});
      const id = `vm:${e.name}`;
      const scope = this.objects.has(id) ? this.objects.subtree(id).map((x) => x.id) : [id];
      const ended = this.runtime
        .detach(scope)
        .then(() => {
          if (this.objects.has(id)) this.objects.deregister(id, { withDependents: true });
        })
        // Reported, not thrown: nobody may be waiting on it (a removal after a migration out).
        .catch((err: unknown) => log.error(`could not end the management of removed VM ${e.name}`, { error: describeError(err) }));
      // `vm remove` waits for its embots to have ended before it answers.
      this.vmCleanups.set(e.name, ended);
      void ended.finally(() => {
        if (this.vmCleanups.get(e.name) === ended) this.vmCleanups.delete(e.name);
      });
    });

    // A migration interrupted by a crash is finished or rolled back first; a VM whose fate only
    // the target knows stays frozen (held, no embots) until it answers.
    const { frozen } = this.mobility.recover();
    for (const el of this.objects.list()) if (!frozen.has(el.id)) await this.attach(el);

    if (this.config.safe) {
      log.warn('safe mode: no plugins loaded');
    } else {
      await this.startCatalogue();
    }

    const recovered = this.sensors.recover();
    if (recovered) log.info(`re-queued ${recovered} journaled events not yet processed`);
    this.mobility.eventsRecovered();
    this.sensors.addSensor(new HostSensor({ agent: this.name, intervalMs: this.config.sensors.host.intervalMs, source: this.config.sensors.host.source, hostCpus: this.config.sim.hostCpus, vmLoads: () => this.vmLoads() }));
    this.sensors.addSensor(new VmSensor({ driver: this.driver, intervalMs: this.config.sensors.vm.intervalMs }));
    this.sensors.startSensors();

    this.dashboard = this.startDashboard();
    this.controlServer = await startControlServer({ host: this.config.control.host, port: this.config.control.port, ...(this.config.control.token ? { token: this.config.control.token } : {}), control: this, metrics: this.metrics, dashboard: this.dashboard, logger: log.child('control') });
    this.controlUrl = this.controlServer.url;
    await this.mobility.start();
    // Published only with a peer endpoint: without one nobody could dial the URL.
    const selfUrl = this.mobility.peerUrl;
    this.directory.start?.(selfUrl === undefined ? undefined : { url: selfUrl });
    const server = this.mobility.peerServer;
    if (server) {
      // Block and index frames are the second protocol on the peer link; they bypass mobility.
      this.peer = peerEndpoint(server);
      this.services.register('peer', this.peer);
      this.peer.register(this.images.peerService());
      this.peer.register({ name: 'status', handlers: { PeerStatus: () => this.peerStatus() } });
    }
    await this.images.start();
  }

  /** The web dashboard and its live channel, fed by the runtime's, mobility's and driver's own events. */
  private startDashboard(): Dashboard {
    const dashboard = createDashboard({
      host: {
        control: this,
        policyCharts: () => this.runtime.policyCharts(),
        peers: () => this.directory.list(),
        hostLoad: () => this.hostLoad(),
        cancelMigration: (id) => this.mobility.cancel(id),
        rankTargets: (vm, candidates) => rankTargetsByImage(this.images, vm, candidates),
        peerStatus: async (peer) => {
          const conn = await this.connectPeer(peer);
          try {
            return await conn.request({ type: 'PeerStatus' }, { timeoutMs: PEER_STATUS_TIMEOUT_MS });
          } finally {
            void conn.close().catch(() => {});
          }
        },
      },
      ...(this.config.control.token ? { token: this.config.control.token } : {}),
      logger: this.log.child('dashboard'),
    });
    wireLiveSources(dashboard.hub, { runtime: this.runtime, mobility: this.mobility, vms: this.driver.events, getMigration: (id) => this.mobility.get(id) });
    return dashboard;
  }

  private async startCatalogue(): Promise<void> {
    const catalogue = new ModuleCatalogue({ dir: resolve(this.config.pluginsDir), apiVersion: EMBOT_API_VERSION, watch: true });
    this.catalogue = catalogue;
    const track = (p: Promise<void>) => {
      this.loading.add(p);
      void p.finally(() => this.loading.delete(p));
    };
    catalogue.on('module-added', (m) => track(this.loadModule(m)));
    catalogue.on('module-changed', (m) => track(this.loadModule(m)));
    catalogue.on('module-removed', (m) => track(this.unloadModule(m)));
    catalogue.on('module-invalid', (p) => {
      this.log.warn(`plugin folder ${p.dir} is not a usable module`, { code: p.error.code, error: p.error.message });
      if (p.name) this.plugins.record({ name: p.name, version: '0.0.0', hash: '', status: 'error', error: `${p.error.code}: ${p.error.message}` });
      if (p.name) this.metrics.pluginError(p.name);
    });
    catalogue.on('watch-error', (e) => this.log.warn(`plugin watcher: ${e.message}`));
    catalogue.start();
    await catalogue.ready();
    while (this.loading.size) await Promise.all([...this.loading]);
  }

  private async loadModule(m: ModuleRecord): Promise<void> {
    if (this.stopped) return;
    if (this.plugins.isDisabled(m.name)) {
      this.log.warn(`module ${m.name} is disabled; enable it to load it`);
      return;
    }
    try {
      await this.runtime.loadModule(m);
      this.plugins.record({ name: m.name, version: m.version, hash: m.hash, status: 'loaded' });
      this.log.info(`module ${m.name}@${m.version} loaded`, { hash: m.hash.slice(0, 12) });
    } catch (e) {
      this.plugins.record({ name: m.name, version: m.version, hash: m.hash, status: 'error', error: describeError(e) });
      this.log.error(`module ${m.name} failed to load`, { error: describeError(e) });
    }
  }

  private async unloadModule(m: ModuleRecord): Promise<void> {
    await this.runtime.unloadModule(m.name);
    this.plugins.record({ name: m.name, version: m.version, hash: m.hash, status: 'unloaded' });
    this.log.info(`module ${m.name} unloaded`);
  }

  /**
   * A VM the driver holds after a restart: its element (and UDP service), or, when it had moved
   * away and its removal was cut by the restart, the removal finished (not adopted: two owners).
   * Returns the VM's element id, undefined when removed.
   */
  private async adoptDriverVm(vm: VmInfo): Promise<string | undefined> {
    if (!this.objects.has(`vm:${vm.name}`) && this.mobility.movedAway(vm.name)) {
      this.log.info(`VM ${vm.name} had moved to another host before the restart: removing what was left of it here`);
      await this.driver.remove(vm.name).catch((e: unknown) => this.log.warn(`could not remove VM ${vm.name}, which had moved away`, { error: describeError(e) }));
      return undefined;
    }
    const id = this.ensureVmElement(vm).id;
    const udpPort = this.udpPortOf(vm.name);
    if (udpPort !== undefined) await this.udp.ensure(vm.name, udpPort, vm.state === 'running');
    return id;
  }

  private ensureVmElement(vm: VmInfo): ManagedElement {
    const id = `vm:${vm.name}`;
    const existing = this.objects.get(id);
    if (existing) return existing;
    return this.objects.registerTree(
      {
        id,
        kind: 'vm',
        state: this.vmElementState(vm),
        dependents: [`disk:${vm.name}.0`, `nic:${vm.name}.0`],
      },
      [
        { id: `disk:${vm.name}.0`, kind: 'disk', state: { vm: vm.name } },
        { id: `nic:${vm.name}.0`, kind: 'nic', state: { vm: vm.name } },
      ],
    );
  }

  attach(el: ManagedElement): Promise<void> {
    // Gone meanwhile: at a restart the attach loop walks a list taken before recover()'s discard of
    // an uncommitted incoming VM ended, and that discard deregisters the VM's tree (CI 11:30: a
    // restarted destination exited with "no managed element nic:app.0").
    if (!this.objects.has(el.id)) return Promise.resolve();
    const scope: AttachableElement = { id: el.id, kind: el.kind, scope: this.objects.subtree(el.id).map((e) => e.id) };
    return this.runtime.attach(scope).catch((e) => this.log.error(`could not attach embots to ${el.id}`, { error: describeError(e) }));
  }

  /** The VM element's state: what every driver tells, and the spec's dirty rate and UDP port where the driver has them (sim). */
  private vmElementState(vm: VmInfo): Record<string, unknown> {
    const spec = this.driver.spec(vm.name) as { readonly dirtyRate?: unknown } | undefined;
    const udpPort = this.udpPortOf(vm.name);
    return {
      name: vm.name,
      state: vm.state,
      memory: vm.memory,
      vcpus: vm.vcpus,
      ...(typeof spec?.dirtyRate === 'number' ? { dirtyRate: spec.dirtyRate } : {}),
      ...(udpPort === undefined ? {} : { udpPort }),
      ...imageState(this.images.vmImageRef(vm.name)),
    };
  }

  private udpPortOf(name: string): number | undefined {
    return this.driver.capabilities.udpService?.udpPort(name);
  }

  private syncUdp(name: string, state: string): void {
    const udpPort = this.udpPortOf(name);
    if (udpPort === undefined) return;
    void this.udp
      .ensure(name, udpPort, state === 'running')
      .catch((e) => this.log.warn(`UDP service of ${name} not available`, { error: describeError(e), port: udpPort }));
  }

  private persistDriver(): void {
    this.store.setComponentState(this.driverStateKey, pack(this.driver.getPersistedState()));
  }

  /** This agent's health and load as a peer asks for it (the peer's dashboard cluster view). */
  private async peerStatus(): Promise<Omit<PeerStatusReply, 'replyTo'>> {
    const st = this.status();
    return {
      type: 'PeerStatusReply',
      name: this.name,
      uptimeMs: Math.max(0, Math.round(st.uptimeMs)),
      load: Math.max(0, await this.hostLoad().catch(() => 0)),
      vms: st.counts.vms,
      embots: st.counts.embots,
      quarantined: st.counts.quarantinedEmbots,
      modulesWithErrors: st.counts.modulesWithErrors,
      deadLetters: st.counts.deadLetters,
    };
  }

  /** 0..1: the running VMs' loads over the host's CPUs (the sim host's view of itself). */
  async hostLoad(): Promise<number> {
    return (await this.vmLoads()).reduce((sum, v) => sum + v.load, 0) / this.config.sim.hostCpus;
  }

  private async vmLoads(): Promise<{ name: string; load: number }[]> {
    const running = this.driver.list().filter((v) => v.state === 'running');
    const loads = await Promise.all(
      running.map((v) =>
        this.driver.stats(v.name).then(
          (s) => ({ name: v.name, load: s.load }),
          // Gone between list() and stats(): its state event tells.
          () => undefined,
        ),
      ),
    );
    return loads.filter((l): l is { name: string; load: number } => l !== undefined);
  }

  // ---- AgentControl ----

  status(): AgentStatus {
    const embots = this.runtime.list();
    const plugins = this.listPlugins();
    const s = this.sensors.stats();
    return {
      name: this.name,
      version: VERSION,
      pid: process.pid,
      startedAt: this.startedAt,
      uptimeMs: Date.now() - this.startedAt,
      driver: this.config.driver,
      safe: this.config.safe,
      dataDir: resolve(this.config.dataDir),
      pluginsDir: resolve(this.config.pluginsDir),
      control: { host: this.config.control.host, port: this.controlServer ? Number(new URL(this.controlServer.url).port) : this.config.control.port },
      counts: {
        vms: this.driver.list().length,
        elements: this.objects.list().length,
        embots: embots.length,
        quarantinedEmbots: embots.filter((e) => e.status === 'quarantined').length,
        modules: plugins.filter((p) => p.status === 'loaded').length,
        modulesWithErrors: plugins.filter((p) => p.status === 'error' || p.status === 'disabled').length,
        queuedEvents: s.queued,
        heldEvents: s.held,
        parkedEvents: this.runtime.parkedCount(),
        deadLetters: this.runtime.deadLetterCount(),
      },
      // A topology names hosts from config (checked at start): with one, peers found in etcd are no `--to auto` candidates, which it could not place.
      destinations: { peers: this.config.topology ? Object.keys(this.config.peer.peers) : [...this.directory.keys()], ...(this.config.topology ? { topology: this.config.topology } : {}) },
      directory: this.directory.status(),
    };
  }

  listVms(): readonly ControlVmInfo[] {
    return this.driver.list();
  }

  async createVm(request: CreateVmRequest): Promise<ControlVmInfo> {
    // `--image NAME` (not a path): an image of this host's index (issue 14). The qemu driver boots
    // its file; the sim keeps no disk of its own, so the VM's image is the indexed file itself.
    const named = request.image !== undefined && !isAbsolute(request.image) ? request.image : undefined;
    if (named === undefined) return this.driver.create(this.specFor(request));
    const file = this.images.imagePath(named);
    if (file === undefined) throw new EffectorError(ErrorCodes.IMAGE_UNKNOWN, `no image ${JSON.stringify(named)} on ${this.name} (see embot images; build it with embot image build ${named} --on ${this.name})`);
    const { image: _named, ...rest } = request;
    const info = await this.driver.create(this.specFor(this.config.driver === 'sim' ? rest : { ...rest, image: file, imageName: named }));
    const ref = this.images.setVmImage(info.name, named);
    if (this.objects.has(`vm:${info.name}`)) this.objects.update(`vm:${info.name}`, imageState(ref));
    return info;
  }

  async vmAction(name: string, action: VmAction): Promise<ControlVmInfo> {
    switch (action) {
      case 'start':
        return this.driver.start(name);
      case 'stop':
        return this.driver.stop(name);
      case 'kill':
        return this.driver.kill(name);
      case 'crash': {
        const faults = this.driver.capabilities.faults;
        if (!faults) throw unsupported(this.driver.name, 'faults', 'crash a VM');
        return faults.crash(name);
      }
      default:
        throw new EffectorError(ErrorCodes.EFFECTOR_OP_UNKNOWN, `unknown VM action '${String(action)}'`);
    }
  }

  async removeVm(name: string, options: RemoveVmOptions = {}): Promise<RemovedVm> {
    const vm = this.driver.get(name);
    if (!vm) throw new EffectorError(ErrorCodes.VM_UNKNOWN, `no VM named ${name}`, { details: { vm: name } });
    this.refuseRemoveWhileMigrating(name);
    const live = vm.state === 'running' || vm.state === 'paused';
    if (live && options.force !== true) {
      throw new EffectorError(ErrorCodes.VM_BAD_STATE, `VM ${name} is ${vm.state}; stop it first (embot vm stop ${name}), kill it (embot vm kill ${name}), or remove it with --force (kills it first)`, {
        details: { vm: name, state: vm.state, op: 'remove', problem: 'running' },
      });
    }
    if (live) await this.driver.kill(name);
    // A migration may have started while the kill ran.
    this.refuseRemoveWhileMigrating(name);
    const id = `vm:${name}`;
    const scope = this.objects.has(id) ? this.objects.subtree(id).map((x) => x.id) : [id];
    const inScope = new Set(scope);
    const embots = this.runtime.list().filter((e) => inScope.has(e.elementIds[0] ?? '')).length;
    await this.driver.remove(name);
    await this.vmCleanups.get(name);
    // What the embots' end left: their held and queued events (the VM_REMOVED the sensor just
    // posted among them, nobody left to take it) and the stored embots of a module not loaded.
    const events = this.sensors.journaledFor(scope);
    this.sensors.drop(scope);
    this.runtime.forget(scope);
    this.images.forgetVm(name);
    return { name, removed: true, was: vm.state, killed: live, embots, events };
  }

  private refuseRemoveWhileMigrating(name: string): void {
    const open = this.mobility.list().filter((x) => x.vm === name && x.outcome === null);
    // A fan-out or pre-warm lists its own row and one per destination: name the whole one.
    const m = open.find((x) => x.prewarm !== undefined) ?? open.find((x) => !x.id.includes('~')) ?? open[0];
    if (m === undefined && !this.migratingIn.has(name)) return;
    const what = m?.prewarm ? 'pre-warming' : 'migrating';
    throw new EffectorError(ErrorCodes.VM_BAD_STATE, `VM ${name} is ${what}${m ? ` (${m.id}, ${m.role})` : ' in'}; remove it once that migration has ended${m?.prewarm ? ` (embot prewarm ${name} --cancel stops it)` : ''}`, {
      details: { vm: name, op: 'remove', problem: 'migrating', ...(m ? { migration: m.id, role: m.role } : {}) },
    });
  }

  async vmChecksum(name: string): Promise<VmChecksum> {
    const vm = this.driver.get(name);
    if (!vm) throw new EffectorError(ErrorCodes.VM_UNKNOWN, `no VM named ${name}`, { details: { vm: name } });
    const checksum = this.driver.capabilities.memoryChecksum;
    if (!checksum) throw unsupported(this.driver.name, 'memoryChecksum', "checksum a VM's memory");
    return { name, state: vm.state, memory: vm.memory, sha256: await checksum.checksum(name) };
  }

  async setVmLoad(name: string, load: number): Promise<ControlVmInfo> {
    const knob = this.driver.capabilities.loadKnob;
    if (!knob) throw unsupported(this.driver.name, 'loadKnob', "set a VM's load");
    await knob.setLoad(name, load);
    const vm = this.driver.get(name);
    if (!vm) throw new EffectorError(ErrorCodes.VM_UNKNOWN, `no VM named ${name}`, { details: { vm: name } });
    return vm;
  }

  listEmbots(): readonly EmbotInfo[] {
    return this.runtime.list();
  }

  listPlugins(): readonly PluginInfo[] {
    const loaded = new Map(this.runtime.loadedModules().map((m) => [m.name, m]));
    return this.plugins.list().map((p) => {
      const fromFolder = this.catalogue?.get(p.name);
      const rec = fromFolder ? { dir: fromFolder.dir, embotTypes: fromFolder.manifest.embots.map((t) => t.type) } : this.shipped.get(p.name);
      return {
        name: p.name,
        version: p.version,
        hash: p.hash,
        status: p.status,
        ...(p.error ? { error: p.error } : {}),
        restarts: loaded.get(p.name)?.restarts ?? p.restarts,
        embotTypes: rec?.embotTypes ?? [],
        dir: rec?.dir ?? '',
      };
    });
  }

  /** Refused with EMBOT_ERR_ELEMENT_MOVED for an element that moved away after its grace period; inside it, journaled and forwarded. */
  async emitEvent(input: EmbotEventInput): Promise<EmittedEvent> {
    const { forwardedTo } = await this.mobility.admitEvent(input.elementId);
    const event = await this.sensors.emit({ ...input, source: input.source ?? 'control' });
    return forwardedTo === undefined ? event : { ...event, forwardedTo };
  }

  listDeadLetters(opts: { limit: number }): readonly DeadLetter[] {
    return this.runtime.deadLetters(opts.limit);
  }

  listEvents(opts: { limit: number }): readonly EmbotEvent[] {
    return this.recent.slice(-Math.max(0, opts.limit));
  }

  migrate(vm: string, to: Destinations | undefined, options: MigrateOptions = {}): { readonly id: string } {
    return this.mobility.migrate(vm, to, options);
  }

  prewarm(vm: string, to: readonly string[], options: MigrateOptions = {}): { readonly id: string } {
    return this.mobility.prewarm(vm, to, options);
  }

  cancelPrewarm(vm: string): { readonly id: string } {
    return this.mobility.cancelPrewarm(vm);
  }

  /** MobilityHost: the VM's image (`vm create --image`) built at the target before anything moves (issue 14). */
  async prepareTarget(vm: string, target: string): Promise<MigrationImageBuild | undefined> {
    const ref = this.images.vmImageRef(vm);
    if (ref === undefined) return undefined;
    const image = ref.image;
    let s: BuildSummary;
    try {
      s = await this.images.buildFor(target, ref);
    } catch (e) {
      const code = (e as { code?: unknown }).code;
      throw new EmbotError(typeof code === 'string' && code.startsWith('EMBOT_ERR_') ? (code as ErrorCode) : ErrorCodes.BLOCK_UNAVAILABLE, `building image ${image} at ${target} failed, nothing moved: ${describeError(e)} [${String(code ?? 'no code')}]`);
    }
    return { image, host: target, alreadyThere: s.alreadyThere === true, bytesFetched: s.bytesFetched, bytesLocal: s.bytesLocal, bySource: s.bySource, ms: s.ms };
  }

  listMigrations(): readonly MigrationInfo[] {
    return this.mobility.list();
  }

  getMigration(id: string): MigrationInfo | undefined {
    return this.mobility.get(id);
  }

  waitMigration(id: string): Promise<MigrationSummary | undefined> {
    return this.mobility.wait(id);
  }

  // ---- lifecycle ----

  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    this.sensors.stopSensors();
    // First: the lease is revoked while this agent still answers, so peers drop it before it goes.
    await this.directory.close().catch(() => {});
    await this.images.close().catch(() => {});
    await this.mobility.close().catch(() => {});
    this.dashboard?.close();
    await this.controlServer?.close().catch(() => {});
    await this.catalogue?.close().catch(() => {});
    await this.sensors.idle().catch(() => {});
    await this.runtime.close().catch(() => {});
    await this.sensors.close().catch(() => {});
    try {
      this.persistDriver();
    } catch {
      /* store may already be unusable; the driver state was written on every change */
    }
    await this.driver.close().catch((e: unknown) => this.log.warn('hypervisor driver did not close cleanly', { error: describeError(e) }));
    await this.udp.close().catch(() => {});
    this.store.close();
  }
}

/** The driver the config asks for, with its settings (exported for its unit test: the config's keys reach the driver). */
export function driverChoice(config: AgentConfig, imagePath: (image: string) => string | undefined): DriverChoice {
  if (config.driver === 'qemu') {
    const q = config.qemu;
    const shape = { memory: q.defaultMemory, vcpus: q.defaultVcpus, ...(q.defaultBootImage === undefined ? {} : { bootImage: resolve(q.defaultBootImage) }) };
    return {
      kind: 'qemu',
      qemu: {
        ...(q.spareIncoming ? { spareIncoming: shape } : {}),
        root: resolve(q.stateDir ?? join(config.dataDir, 'qemu')),
        imagePath,
        binary: q.binary,
        accel: q.accel,
        ...(q.listenHost === undefined ? {} : { listenHost: q.listenHost }),
        ...(q.cpuThrottle === undefined ? {} : { cpuThrottle: q.cpuThrottle }),
        ...(q.stepTimeoutMs === undefined ? {} : { timeoutMs: q.stepTimeoutMs }),
        relayBufferBytes: q.relay.bufferBytes,
        relayStallBudgetMs: q.relay.stallBudgetMs,
        // Set on each QEMU as it starts, so a migration out sends nothing before `migrate` when they apply.
        migrationDefaults: { autoConverge: config.dataplane.autoConverge, downtimeLimitMs: config.dataplane.downtimeLimitMs },
        // QEMU's own migration stream uses the peer links' certificates: VM memory never crosses in clear where they do not.
        ...(config.peer.tls === undefined ? {} : { tls: config.peer.tls }),
      },
      defaults: shape,
    };
  }
  return { kind: 'sim', sim: { pageSize: config.sim.pageSize, defaults: { memory: config.sim.defaultMemory, dirtyRate: config.sim.defaultDirtyRate }, startMemory: config.sim.startMemory } };
}

/** A VM element's image fields (issue 14): its image travels with it for the next migration onward. */
function imageState(ref: VmImageRef | undefined): Record<string, string> {
  return ref === undefined ? {} : { image: ref.image, ...(ref.manifest === undefined ? {} : { imageManifest: ref.manifest }) };
}
