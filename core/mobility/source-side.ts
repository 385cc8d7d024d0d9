import { pack } from 'msgpackr';
import { ErrorCodes, ProtocolError, describeError, isEmbotError } from '../errors.ts';
import type { PeerConnection } from '../wire/peer-connection.ts';
import { PROTOCOL_VERSION, type MigrationStateFailed, type ProtocolFeature, type ReplyOf, type RequestType } from '../wire/frames.ts';
import type { DirtyRoundResult, MigrateVmResult, SourceInput, SourceSteps } from './mobility-contract.ts';
import type { MobilityHost } from './mobility-host.ts';
import type { HeldShipment, HoldCursor } from '../../sensors/index.ts';
import type { MigrationImageBuild, MigrationPlanSummary, MigrationProgress, MigrationStopMarks, MigrationSummary, MigrationVmSteps } from './migration-record.ts';
import type { SourceOutput } from './source-machine.ts';
import { ASSUMED_MIN_BANDWIDTH_BYTES_PER_SEC, planPaths, resolveThreshold, type PathCandidate, type PathProbe } from './path-planner.ts';
import { batchChecksum, DEFAULT_BATCH_BYTES, WINDOW_BATCHES, type MigrateOutResult, type MigrationPath } from '../../effectors/index.ts';
import type { AgentConfig } from '../config/config.ts';
import type { Forwarding } from './forwarding.ts';
import type { FanOutMove, FanOutShared } from './fan-out-shared.ts';
import { targetRefusal, type TargetReply } from './target-refusal.ts';

export type DataplaneConfig = AgentConfig['dataplane'];

/** The primary data path's name: a connection of its own to the target's peer URL. */
const PRIMARY_PATH = 'direct';

/** The VM's SLA, if its element carries one (`state.sla.maxMigrationMs`). */
function vmSla(host: MobilityHost, vmElement: string): { maxMigrationMs?: number } | undefined {
  const sla = host.objects.get(vmElement)?.state['sla'];
  return sla && typeof sla === 'object' ? (sla as { maxMigrationMs?: number }) : undefined;
}

/**
 * Bandwidth of an uncapped path: `bytes` of zero pages sent as PageBatches for a migration id
 * the target does not stage (it refuses them after reading them), timed. One batch goes first,
 * untimed (a fresh link's first batch also pays for its connection warming up); the timed ones
 * go with as many in flight as pre-copy keeps per path. One at a time, each waiting for its ack,
 * they measured 417 MB/s on a loopback path that then carried 1.5 GiB/s.
 */
export async function measurePath(conn: PeerConnection, migrationId: string, path: string, bytes: number, pageSize: number): Promise<number> {
  const batch = DEFAULT_BATCH_BYTES;
  const pages = new Uint8Array(batch);
  const indexes = new Uint8Array((batch / pageSize) * 4);
  const checksum = batchChecksum(indexes, pages);
  const send = (): Promise<unknown> => conn.request({ type: 'PageBatch', migrationId: `${migrationId}.probe`, path, round: 0, final: false, pageSize, indexes, pages, checksum });
  await send();
  const count = Math.max(1, Math.ceil(bytes / batch));
  const started = performance.now();
  const inFlight = new Set<Promise<unknown>>();
  for (let i = 0; i < count; i++) {
    const p: Promise<unknown> = send().finally(() => inFlight.delete(p));
    inFlight.add(p);
    if (inFlight.size >= WINDOW_BATCHES) await Promise.race(inFlight);
  }
  await Promise.all(inFlight);
  return (count * batch) / Math.max(1e-3, (performance.now() - started) / 1000);
}

export interface SourceSideOptions {
  readonly host: MobilityHost;
  readonly migrationId: string;
  readonly vm: string;
  readonly target: string;
  /** The target's peer URL: the primary data path goes there on a connection of its own. */
  readonly targetUrl: string;
  readonly connect: () => Promise<PeerConnection>;
  /** Opens an authenticated data path (another WebSocket, maybe from another local address). */
  readonly openPath: (p: PathCandidate) => Promise<PeerConnection>;
  readonly dataplane: DataplaneConfig;
  /** Threshold time given for this migration (overrides the VM's and the default). */
  readonly thresholdMs?: number;
  readonly stepTimeoutMs: number;
  readonly vmTimeoutMs: number;
  readonly forwardGraceMs: number;
  /** Takes the moved elements' late events to the target after the switch (and after a restart). */
  readonly forwarding: Forwarding;
  readonly onProgress: (p: Partial<MigrationProgress>) => void;
  /**
   * A child of a migration to several destinations (fan-out.ts): the hold, the embots' detach, the
   * switch and the VM's restart belong to the coordinator; this side moves one destination's copy.
   */
  readonly fanOut?: { readonly shared: FanOutShared; readonly move: FanOutMove };
}

/** Counters that end up in the migration summary. */
export interface SourceStats {
  embots: number;
  events: number;
  modules: readonly string[];
  bytes: number;
  memoryBytes: number;
  dirtyRounds: number;
  stoppedAt: number | undefined;
  downtimeMs: number | undefined;
  forwarded: number;
  plan: MigrationPlanSummary | undefined;
  precopy: MigrateOutResult | undefined;
  udp: { readonly handedOver: number; readonly dropped: number; readonly maxBufferedLatencyMs: number } | undefined;
  vmSteps: MigrationVmSteps | undefined;
  imageBuild: MigrationImageBuild | undefined;
  /** performance.now() of the steps after the stop, for `vmSteps.afterStop`. */
  marks: { stop?: number; copyEnd?: number; memoryAck?: number; finalRoundOut?: number; finalRound?: number; complete?: number };
}

/**
 * The work of each source step for one migration (the source machine decides the order and the
 * failure paths). Holds the VM's elements from the first step, so from then on every event for
 * them is either shipped or, on roll-back, released here: never both, never neither.
 */
export class SourceSide implements SourceSteps {
  readonly vmElement: string;
  readonly stats: SourceStats = { embots: 0, events: 0, modules: [], bytes: 0, memoryBytes: 0, dirtyRounds: 0, stoppedAt: undefined, downtimeMs: undefined, forwarded: 0, plan: undefined, precopy: undefined, udp: undefined, vmSteps: undefined, imageBuild: undefined, marks: {} };
  private conn: PeerConnection | undefined;
  private scope: readonly string[] = [];
  private cursor: HoldCursor | undefined;
  /** The events serialized while ManagementState was with the target, for sendEventState. */
  private shipment: HeldShipment | undefined;
  private held = false;
  private detached = false;
  private wasRunning = false;
  private vmStopped = false;
  private unmute: (() => void) | undefined;
  private udpPaused: Promise<void> | undefined;
  /** Cancels the driver's migrateOut on a roll-back (qemu: migrate_cancel, the VM runs here again). */
  private readonly vmMoveAbort = new AbortController();
  /** The driver's migrateOut while it runs: a roll-back waits for it to settle before it looks at the VM. */
  private vmMove: Promise<unknown> | undefined;
  /**
   * The primary data path, dialled alongside StartMigration so its connect + authentication is off
   * the critical path; migrateVm takes it (and closes it with its paths), a denial or a roll-back
   * closes it.
   */
  private earlyPrimary: Promise<PeerConnection> | undefined;
  /**
   * PrepareIncoming sent right after the permit when its channel count cannot change (see
   * `channelsKnownAtPermit`): the target readies the incoming VM (qemu: starts its process, ~50-120
   * ms) while the management state and events are staged; migrateVm awaits the reply.
   */
  private earlyPrepare: { readonly channels: number; readonly reply: Promise<ReplyOf<'PrepareIncoming'>> } | undefined;

  constructor(private readonly o: SourceSideOptions) {
    this.vmElement = `vm:${o.vm}`;
  }

  /** Set by the fan-out coordinator before it cancels this child: the Abort's reason, word for word. */
  terminatedWith: string | undefined;

  private get host(): MobilityHost {
    return this.o.host;
  }

  private async request<T extends RequestType>(body: Parameters<PeerConnection['request']>[0] & { type: T }, timeoutMs = this.o.stepTimeoutMs): Promise<ReplyOf<T>> {
    if (this.conn === undefined) {
      this.conn = await this.o.connect();
      // An agent of an older build (a rolling upgrade): said once per migration, as what it changes.
      if (this.conn.protocol < PROTOCOL_VERSION) {
        const conn = this.conn;
        const changes = (Object.keys(WITHOUT_FEATURE) as ProtocolFeature[]).filter((f) => !conn.supports(f)).map((f) => WITHOUT_FEATURE[f]);
        this.host.logger.info(`the link to ${this.o.target} runs wire protocol ${conn.protocol} (its build is older): ${changes.join(', ')}`, { peer: this.o.target, protocol: conn.protocol });
      }
    }
    return (await this.conn.request(body, { timeoutMs })) as ReplyOf<T>;
  }

  /** The steps after the stop, relative to it (a pre-warm's command and lift before it). */
  private afterStop(): { readonly afterStop?: MigrationStopMarks } {
    const m = this.stats.marks;
    const stop = m.stop ?? this.o.fanOut?.shared.stoppedPerf;
    if (stop === undefined) return {};
    const shared = this.o.fanOut?.shared;
    const all = { command: shared?.commandedPerf, lift: shared?.liftedPerf, copyEnd: m.copyEnd, memoryAck: m.memoryAck, finalRoundOut: m.finalRoundOut, finalRound: m.finalRound, complete: m.complete };
    const out: Record<string, number> = {};
    for (const [k, v] of Object.entries(all)) if (v !== undefined) out[k] = Math.round((v - stop) * 10) / 10;
    return { afterStop: out as MigrationStopMarks };
  }

  /** The migration's report, from the machine's output and what the steps counted. */
  summarize(out: SourceOutput, totalMs: number): MigrationSummary {
    const s = this.stats;
    return {
      migrationId: this.o.migrationId,
      vm: this.o.vm,
      from: this.host.agent,
      to: this.o.target,
      outcome: out.outcome,
      ...(out.reason ? { reason: out.reason } : {}),
      totalMs,
      phases: out.phases,
      embots: s.embots,
      events: s.events,
      modules: s.modules,
      modulesShipped: 0,
      dirtyRounds: out.dirtyRounds,
      bytes: s.bytes,
      memoryBytes: s.memoryBytes,
      downtimeMs: s.downtimeMs ?? null,
      forwarded: s.forwarded,
      rounds: s.precopy?.rounds ?? 0,
      paths: s.plan?.paths.length ?? 0,
      estimateMs: s.plan?.estimateMs ?? null,
      thresholdMs: s.plan?.thresholdMs ?? null,
      ...(s.plan ? { plan: s.plan } : {}),
      ...(s.precopy
        ? {
            precopy: {
              copyMs: Math.round(s.precopy.totalMs),
              copyDowntimeMs: Math.round(s.precopy.downtimeMs),
              ...(s.precopy.stopBytes === undefined ? {} : { stopBytes: s.precopy.stopBytes }),
              ...(s.precopy.zeroBytes ? { zeroBytes: s.precopy.zeroBytes } : {}),
              expectedDowntimeMs: Math.round(s.precopy.expectedDowntimeMs),
              // A driver that reports less (qemu) converged if it completed, at the rate of its whole copy.
              converged: s.precopy.converged ?? true,
              throttled: s.precopy.throttled,
              throttleSteps: s.precopy.throttleSteps ?? 0,
              initialDirtyRate: s.precopy.initialDirtyRate ?? 0,
              finalDirtyRate: s.precopy.finalDirtyRate ?? 0,
              resent: s.precopy.resent ?? 0,
              rateBytesPerSec: Math.round(s.precopy.rateBytesPerSec ?? s.precopy.bytes / Math.max(1e-3, s.precopy.totalMs / 1000)),
              perPath: s.precopy.perPath ?? [],
              ...(s.precopy.transport ? { transport: s.precopy.transport } : {}),
              ...(s.precopy.relayHeldMs ? { relayHeldMs: Math.round(s.precopy.relayHeldMs) } : {}),
              ...(s.precopy.diskMirror ? { diskMirror: s.precopy.diskMirror } : {}),
            },
          }
        : {}),
      ...(s.vmSteps ? { vmSteps: { ...s.vmSteps, ...this.afterStop() } } : {}),
      ...(s.udp ? { udp: s.udp } : {}),
      ...(s.imageBuild ? { imageBuild: s.imageBuild } : {}),
    };
  }

  async startMigration(input: SourceInput): Promise<{ readonly permitted: boolean; readonly reason?: string }> {
    const vm = this.host.driver.get(this.o.vm);
    if (!vm) throw new ProtocolError(ErrorCodes.VM_UNKNOWN, `no VM named ${this.o.vm} on ${this.host.agent}`);
    if (!this.host.objects.has(this.vmElement)) throw new ProtocolError(ErrorCodes.ELEMENT_UNKNOWN, `VM ${this.o.vm} has no managed element`);
    this.scope = this.host.objects.subtree(this.vmElement).map((e) => e.id);
    this.wasRunning = vm.state === 'running';
    const modules = this.moduleClosure(this.host.runtime.modulesOf(this.scope));
    this.stats.modules = modules;
    this.host.journal.notes(input.migrationId, 'source', { wasRunning: this.wasRunning, scope: this.scope });
    // The VM's image is built at the target first (issue 14): a failure ends the migration here,
    // before any link is dialled or anything held, so the VM keeps running as it was.
    // A fan-out's children each build at their own destination, concurrently: a build that fails
    // drops that destination only, as any failure of one child does.
    this.stats.imageBuild = await this.host.prepareTarget?.(this.o.vm, this.o.target);
    const elements = this.o.fanOut ? this.o.fanOut.shared.elementsForStart() : this.host.objects.serialize(this.vmElement);
    const early = this.o.openPath({ name: PRIMARY_PATH, url: this.o.targetUrl });
    // Until migrateVm awaits it, a failure to dial is nobody's error yet: it surfaces there, as PATH_SETUP_FAILED.
    early.catch(() => undefined);
    this.earlyPrimary = early;
    const reply = await this.request({ type: 'StartMigration', migrationId: input.migrationId, vm: this.o.vm, elements, resources: { memory: vm.memory, vcpus: vm.vcpus }, modules });
    this.stats.bytes += elements.byteLength;
    if (reply.type !== 'MigrationPermitted') {
      // Denied: no later step runs (no roll-back either), so both links end here.
      this.closeEarlyPrimary();
      void this.conn?.close().catch(() => {});
    } else {
      this.prepareEarly(input.migrationId);
    }
    return reply.type === 'MigrationPermitted' ? { permitted: true } : { permitted: false, reason: reply.reason };
  }

  /**
   * The number of streams the incoming VM is readied for, if the planner cannot choose another:
   * with no extra paths for this target (or at most one path allowed) the plan is the primary alone.
   */
  private channelsKnownAtPermit(): number | undefined {
    const dp = this.o.dataplane;
    return (dp.paths[this.o.target] ?? []).length === 0 || dp.maxPaths <= 1 ? 1 : undefined;
  }

  /** PrepareIncoming's `prewarm` for a pre-warm's child, on a link that has it (protocol 4). */
  private prewarmPrepare(): { readonly prewarm?: true } {
    return this.o.fanOut?.shared.prewarm === true && this.conn?.supports('prewarmPrepare') === true ? { prewarm: true } : {};
  }

  /** Sends PrepareIncoming now when its channel count is already known; its reply waits for migrateVm. */
  private prepareEarly(migrationId: string): void {
    const channels = this.channelsKnownAtPermit();
    const spec = this.host.driver.spec(this.o.vm);
    if (channels === undefined || !spec || !this.conn) return;
    const reply = this.conn.request({ type: 'PrepareIncoming', migrationId, vm: this.o.vm, spec: { ...spec }, channels, ...this.prewarmPrepare() }, { timeoutMs: this.o.stepTimeoutMs }) as Promise<ReplyOf<'PrepareIncoming'>>;
    // A roll-back before migrateVm leaves it unread: the target's discard (the Abort) throws the incoming VM away.
    reply.catch(() => undefined);
    this.earlyPrepare = { channels, reply };
  }

  /** The embots' modules and, recursively, their dependencies, each after what it depends on, as `name@version#hash`. */
  private moduleClosure(names: readonly string[]): string[] {
    const out: string[] = [];
    const seen = new Set<string>();
    const visit = (name: string): void => {
      if (seen.has(name)) return;
      seen.add(name);
      const m = this.host.runtime.module(name);
      const ref = this.host.modules.refOf(name);
      if (!m || !ref) throw new ProtocolError(ErrorCodes.PLUGIN_LOAD_FAILED, `module ${name} of the VM's embots is not loaded here; cannot announce it`);
      for (const dep of Object.keys(m.manifest.dependencies)) visit(dep);
      out.push(ref);
    };
    names.forEach(visit);
    return out;
  }

  async holdEvents(): Promise<void> {
    // A fan-out child: the coordinator held the events and detached the embots once for all.
    if (this.o.fanOut) return;
    this.host.sensors.hold(this.scope);
    this.held = true;
    // Freeze the embots here: every event they were given is committed, their timers stop; their
    // state (with absolute deadlines) is what travels.
    await this.host.runtime.detach(this.scope, { keepState: true });
    this.detached = true;
  }

  async sendManagementState(input: SourceInput): Promise<void> {
    // A fan-out's children share one serialization (fan-out-shared.ts), which also resets what they count as changed.
    const { elements, embots: embotBytes, embotCount } = this.o.fanOut
      ? this.o.fanOut.shared.managementStateFor(this.o.migrationId, () => {
          const e = this.host.runtime.exportEmbots(this.scope);
          return { embots: pack(e), count: e.length };
        })
      : this.packManagementState();
    this.stats.embots = embotCount;
    const replied = this.request({ type: 'ManagementState', migrationId: input.migrationId, elements, embots: embotBytes });
    // The request is on the wire: while the target stages it, the held events are serialized
    // for the next step (events held after this go in the dirty rounds, as after any shipment).
    // Should serializing throw, the request's own failure must not surface as an unhandled one.
    replied.catch(() => undefined);
    // A pre-warm holds nothing until the command: no events to stage yet (the dirty rounds ship them).
    if (!this.o.fanOut || this.o.fanOut.shared.eventsHeld) {
      this.shipment = this.host.sensors.serializeHeldSince(this.scope, this.cursor);
      this.cursor = this.shipment.cursor;
    } else {
      this.shipment = { bytes: this.host.sensors.serializeHeld([]), cursor: {}, count: 0 };
    }
    const reply = await replied;
    this.stats.bytes += elements.byteLength + embotBytes.byteLength;
    if (reply.type !== 'ManagementStateSuccess') throw stepFailed('ManagementState', reply);
  }

  /** The VM's embots and elements for ManagementState; what changes from now on goes in the dirty rounds. */
  private packManagementState(): { readonly elements: Uint8Array; readonly embots: Uint8Array; readonly embotCount: number } {
    const embots = this.host.runtime.exportEmbots(this.scope);
    const elements = this.host.objects.serialize(this.vmElement);
    this.host.objects.collectDirty(this.vmElement);
    return { elements, embots: pack(embots), embotCount: embots.length };
  }

  async sendEventState(input: SourceInput): Promise<void> {
    const shipment = this.shipment ?? this.host.sensors.serializeHeldSince(this.scope, this.cursor);
    this.shipment = undefined;
    const { bytes, cursor, count } = shipment;
    this.cursor = cursor;
    const reply = await this.request({ type: 'ManagementEventState', migrationId: input.migrationId, holdQueues: bytes });
    this.stats.events += count;
    this.stats.bytes += bytes.byteLength;
    if (reply.type !== 'ManagementEventStateSuccess') throw stepFailed('ManagementEventState', reply);
  }

  /**
   * The VM crosses through the hypervisor contract: the planner adds data paths while the
   * estimate is over the threshold (seed 000); the target readies an incoming VM of the same spec
   * (PrepareIncoming) and says where its memory goes; the driver's migrateOut moves it (the sim:
   * pre-copy rounds on the data paths until the remainder fits the downtime limit, then the VM
   * stops and the rest follows; qemu: its own stream with the paths' count as multifd channels).
   * The control link then says the memory is complete.
   */
  async migrateVm(input: SourceInput): Promise<MigrateVmResult> {
    const host = this.host;
    const dp = this.o.dataplane;
    const t0 = performance.now();
    const vm = host.driver.get(this.o.vm);
    const spec = host.driver.spec(this.o.vm);
    if (!vm || !spec) throw new ProtocolError(ErrorCodes.VM_UNKNOWN, `VM ${this.o.vm} is gone from ${host.agent}`);
    const vmStats = await host.driver.stats(this.o.vm);
    // A driver with a stream of its own (qemu) knows its rate better than a probe of our data path does.
    const model = host.driver.capabilities.migrationModel;
    let switchoverMs = 0;
    const channels = new Map<string, PeerConnection>();
    const setUp = async (p: PathCandidate): Promise<{ setupMs: number }> => {
      const started = performance.now();
      const early = p.name === PRIMARY_PATH && p.url === this.o.targetUrl && !p.localAddress ? this.earlyPrimary : undefined;
      this.earlyPrimary = undefined;
      channels.set(p.name, await (early ?? this.o.openPath(p)));
      return { setupMs: performance.now() - started };
    };
    const probe = async (p: PathCandidate): Promise<PathProbe> => {
      const { setupMs } = await setUp(p);
      const conn = channels.get(p.name)!;
      const bandwidthBytesPerSec = p.capBytesPerSec ?? (await measurePath(conn, input.migrationId, p.name, dp.probeBytes, vmStats.pageSize));
      return { setupMs, bandwidthBytesPerSec };
    };
    const release = async (p: PathCandidate): Promise<void> => {
      await channels.get(p.name)?.close().catch(() => {});
      channels.delete(p.name);
    };
    const threshold = resolveThreshold({
      ...(this.o.thresholdMs === undefined ? {} : { migration: this.o.thresholdMs }),
      ...(dp.vmThresholds[this.o.vm] === undefined ? {} : { vm: dp.vmThresholds[this.o.vm] }),
      ...(vmSla(host, this.vmElement) ? { sla: vmSla(host, this.vmElement) } : {}),
      default: dp.thresholdMs,
    });
    const primaryCap = dp.primaryCapBytesPerSecOf?.[this.o.target] ?? dp.primaryCapBytesPerSec;
    try {
      const plan = await planPaths({
        vm: { memoryBytes: vm.memory, pageSize: vmStats.pageSize, dirtyRateBytesPerSec: vmStats.dirtyRate ?? 0, cpuLoad: vmStats.load },
        thresholdMs: threshold.ms,
        addPathThresholdMs: dp.addPathThresholdMs,
        maxPaths: dp.maxPaths,
        downtimeLimitMs: dp.downtimeLimitMs,
        maxRounds: dp.maxRounds,
        autoConverge: dp.autoConverge,
        primary: { name: PRIMARY_PATH, url: this.o.targetUrl, ...(primaryCap ? { capBytesPerSec: primaryCap } : {}) },
        candidates: dp.paths[this.o.target] ?? [],
        probe,
        setUp,
        assumedMinBandwidthBytesPerSec: ASSUMED_MIN_BANDWIDTH_BYTES_PER_SEC,
        ...(model === undefined ? {} : { driverHints: (channels: number) => model.estimateHints(this.o.vm, { channels }) }),
        targetCpu: async (n) => {
          const r = await this.request({ type: 'PathOffer', migrationId: input.migrationId, paths: n });
          return { canReassemble: r.canReassemble, cpuFree: r.cpuFree, ...(r.reason ? { reason: r.reason } : {}) };
        },
        release,
      });
      this.stats.plan = { estimateMs: Math.round(plan.estimate.totalMs), thresholdMs: plan.thresholdMs, thresholdFrom: threshold.from, paths: plan.paths.map((p) => p.name), decisions: plan.decisions.map((d) => d.reason) };
      const paths: MigrationPath[] = plan.paths.map((p) => ({ name: p.name, conn: channels.get(p.name)!, ...(p.capBytesPerSec ? { capBytesPerSec: p.capBytesPerSec } : {}) }));
      const t1 = performance.now();
      const early = this.earlyPrepare;
      this.earlyPrepare = undefined;
      if (early && early.channels !== paths.length) {
        // channelsKnownAtPermit said the plan could not differ; an incoming VM cannot be re-readied.
        throw new ProtocolError(ErrorCodes.REQUEST_FAILED, `the incoming VM was readied for ${early.channels} channel(s) at the permit, the plan has ${paths.length}`);
      }
      const ready = await (early?.reply ?? this.request({ type: 'PrepareIncoming', migrationId: input.migrationId, vm: this.o.vm, spec: { ...spec }, channels: paths.length, ...this.prewarmPrepare() }));
      if (ready.type !== 'IncomingReady') throw stepFailed('PrepareIncoming', ready);
      const t2 = performance.now();
      // Capped paths stand for NICs of given speeds: a driver with a stream of its own (qemu) gets their sum as its cap.
      const caps = paths.map((p) => p.capBytesPerSec);
      const maxBandwidth = caps.every((c) => c !== undefined) ? caps.reduce<number>((a, c) => a + c!, 0) : undefined;
      const migrateOut: FanOutMove = this.o.fanOut?.move ?? ((name, opts) => host.driver.migrateOut(name, opts));
      // A copy that ends without a result (terminated, cancelled, failed) still sent this much: its summary says so.
      let copiedBytes = 0;
      let copyRounds = 0;
      let copyPhase: { readonly phase: string; readonly since: number } = { phase: '', since: 0 };
      // A driver whose memory does not ride our data paths (qemu: its own stream) has nothing for
      // VmMemory to check at the target but the incoming VM (the commit waits for the stream): it
      // goes at the switch, and the final DirtyObjects round right after it (the VM is paused
      // there, the embots frozen since holding), while the driver finishes its copy, instead of
      // two or more round trips after it. Events held after that round are forwarded at finishing.
      // A fan-out child too: the coordinator held the events and froze the embots before any switch
      // (a pre-warm's at its command, before the hold lifts), and each child sends its own round.
      const memoryAtSwitch = host.driver.capabilities.incomingPages === undefined;
      let earlyMemory: Promise<ReplyOf<'VmMemory'>> | undefined;
      let finalRound: Promise<DirtyRoundResult | undefined> | undefined;
      const memoryDone = (rounds: number): Promise<ReplyOf<'VmMemory'>> =>
        this.request({ type: 'VmMemory', migrationId: input.migrationId, vm: this.o.vm, round: rounds, seq: 0, last: true, pages: new Uint8Array(0) }, this.o.vmTimeoutMs);
      const move = migrateOut(this.o.vm, {
        // A driver that mirrors image disks (qemu) gets the target's export; no other is ever asked to.
        endpoint: { uri: ready.endpoint, ...(ready.disks !== undefined && host.driver.capabilities.diskMirror !== undefined ? { disks: ready.disks } : {}) },
        targetName: this.o.target,
        channels: paths.length,
        downtimeLimitMs: dp.downtimeLimitMs,
        autoConverge: dp.autoConverge,
        ...(maxBandwidth === undefined ? {} : { maxBandwidth }),
        // Inside the step's own timeout, so a copy that does not converge ends with the driver's coded reason.
        timeBudgetMs: Math.max(1000, this.o.vmTimeoutMs - Math.min(5000, this.o.vmTimeoutMs / 10)),
        signal: this.vmMoveAbort.signal,
        dataPaths: { migrationId: input.migrationId, paths, maxRounds: dp.maxRounds, requestTimeoutMs: this.o.stepTimeoutMs },
        beforeSwitchover: async () => {
          const entered = performance.now();
          try {
            await this.enterSwitchover(input.migrationId);
            if (memoryAtSwitch) {
              const memory = memoryDone(copyRounds);
              earlyMemory = memory;
              // The target takes one request at a time: the round follows the memory's ack.
              finalRound = memory.then((r) => {
                this.stats.marks.memoryAck = performance.now();
                return r.type === 'VmMemoryAck' ? this.sendDirtyObjects({ ...input, round: 0, final: true }) : undefined;
              });
              // Read once the copy ended; a copy that fails rolls back (Abort) without reading them.
              memory.catch(() => undefined);
              finalRound.catch(() => undefined);
            }
          } finally {
            switchoverMs += performance.now() - entered;
          }
        },
        onProgress: (p) => {
          // What counts if the copy ends early (a fan-out's loser, a failure): the bytes sent, as a completed copy's result counts them.
          copiedBytes = Math.max(copiedBytes, p.sentBytes ?? p.transferredBytes);
          copyRounds = p.rounds;
          if (p.phase !== copyPhase.phase) copyPhase = { phase: p.phase, since: Date.now() };
          this.o.onProgress({
            copyPhase: p.phase,
            copyPhaseSince: copyPhase.since,
            bytes: this.stats.bytes + p.transferredBytes,
            memoryBytes: p.transferredBytes,
            memoryTotal: vm.memory,
            round: Math.max(0, p.rounds - 1),
            remainingBytes: p.remainingBytes,
            rateBytesPerSec: p.rateBytesPerSec,
            dirtyRateBytesPerSec: p.dirtyRateBytesPerSec,
            expectedDowntimeMs: p.expectedDowntimeMs,
          });
        },
      });
      this.vmMove = move;
      const result = await move.catch((e: unknown) => {
        this.stats.memoryBytes += copiedBytes;
        this.stats.bytes += copiedBytes;
        throw e;
      });
      this.stats.marks.copyEnd = performance.now();
      this.stats.memoryBytes += result.bytes;
      this.stats.bytes += result.bytes;
      this.stats.precopy = result;
      const t3 = performance.now();
      const reply = await (earlyMemory ?? memoryDone(result.rounds));
      if (reply.type !== 'VmMemoryAck') throw stepFailed('VmMemory', reply);
      this.stats.marks.memoryAck ??= performance.now();
      // The stream's own time, end to end (the target has the VM), our hand-over at the switch left out:
      // a driver that calibrates its estimate on its stream (qemu multifd ends early on its own clock) takes it.
      try {
        model?.recordEndToEnd(this.o.vm, performance.now() - t2 - switchoverMs);
      } catch (e) {
        host.logger.warn(`could not record the migration time of ${this.o.vm} for the estimate`, { error: describeError(e) });
      }
      // Sent at the switch: its result (or the target's refusal, which rolls back) is the machine's.
      const final = await finalRound;
      const round = (x: number): number => Math.round(x * 10) / 10;
      this.stats.vmSteps = { planMs: round(t1 - t0), prepareMs: round(t2 - t1), moveMs: round(t3 - t2), ackMs: round(performance.now() - t3) };
      return final === undefined ? {} : { finalRound: final };
    } finally {
      // Added paths are removed afterwards (and the primary data path with them). Not awaited: the
      // close handshake (a round trip, the peer's socket teardown) has nothing the next step needs.
      for (const c of channels.values()) void c.close().catch(() => {});
    }
  }

  /**
   * The offline phase starts (the driver's beforeSwitchover): the VM's sensor is muted, the stop
   * is journaled (a restart after a crash from here on runs the VM again unless the target
   * committed), its UDP relay buffers. The driver stops or pauses the VM itself.
   */
  private enterSwitchover(migrationId: string): void {
    const host = this.host;
    const shared = this.o.fanOut?.shared;
    if (shared) {
      shared.enterSwitchover();
      this.stats.stoppedAt = shared.stoppedAt;
      this.stats.marks.stop = shared.stoppedPerf;
      return;
    }
    this.unmute ??= host.sensors.mute(this.vmElement, 'vm');
    const state = host.driver.get(this.o.vm)?.state;
    if (state === 'running' || state === 'paused') {
      this.vmStopped = true;
      host.journal.notes(migrationId, 'source', { vmStopped: true });
    }
    this.stats.stoppedAt = Date.now();
    this.stats.marks.stop = performance.now();
    this.udpPaused = host.udp.pauseForMigration(this.o.vm);
  }

  async sendDirtyObjects(input: SourceInput & { readonly round: number; readonly final: boolean; readonly boot?: boolean }): Promise<DirtyRoundResult> {
    const changed = this.o.fanOut ? this.o.fanOut.shared.collectDirtyFor(this.o.migrationId) : this.host.objects.collectDirty(this.vmElement);
    const deltas = pack(changed);
    // A pre-warm's embots ran here until the command: the first round after it ships them as frozen then.
    const embots = this.o.fanOut?.shared.takeEmbotsResend(this.o.migrationId, () => pack(this.host.runtime.exportEmbots(this.scope)));
    const { bytes, cursor, count } = this.host.sensors.serializeHeldSince(this.scope, this.cursor);
    this.cursor = cursor;
    if (input.final) this.stats.marks.finalRoundOut = performance.now();
    // A destination of protocol 1 knows no `boot` field: it boots with BootIncoming after the round, as the machine asks when no BootReady came.
    const boot = input.final && input.boot === true && this.conn?.supports('bootWithFinalRound') === true;
    const reply = await this.request({ type: 'DirtyObjects', migrationId: input.migrationId, round: input.round, deltas, events: bytes, ...(embots ? { embots } : {}), ...(boot ? { boot } : {}) });
    if (boot && reply.type === 'MigrationStateFailed' && bootRefused(reply)) {
      // The round was applied and the boot refused: the coordinator counts it as bootFailed, as a BootIncoming refusal.
      throw new ProtocolError(ErrorCodes.REQUEST_FAILED, targetRefusal('boot', reply, 'bootIncoming'), { details: { reply: reply.type, bootRefused: true } });
    }
    // MigrationStateSuccess to a round that asked to boot: applied, not booted (the machine asks with BootIncoming).
    if (reply.type !== 'MigrationStateSuccess' && !(boot && reply.type === 'BootReady')) throw stepFailed('DirtyObjects', reply);
    if (input.final) this.stats.marks.finalRound = performance.now();
    this.stats.dirtyRounds++;
    this.stats.events += count;
    this.stats.bytes += deltas.byteLength + bytes.byteLength + (embots?.byteLength ?? 0);
    return { changedElements: changed.length, events: count, ...(reply.type === 'BootReady' ? { booted: true } : {}) };
  }

  async completeMigration(input: SourceInput): Promise<void> {
    const sent = this.stats.memoryBytes > 0 && this.conn?.supports('completeMemoryBytes') === true ? { memoryBytes: this.stats.memoryBytes } : {};
    const reply = await this.request({ type: 'MigrationComplete', migrationId: input.migrationId, ...sent });
    if (reply.type !== 'MigrationCompleteAck') throw stepFailed('MigrationComplete', reply);
    this.stats.marks.complete = performance.now();
    const stoppedAt = this.stats.stoppedAt ?? this.o.fanOut?.shared.stoppedAt;
    if (stoppedAt !== undefined) this.stats.downtimeMs = Date.now() - stoppedAt;
  }

  /**
   * A fan-out child after its final round: the destination takes its VM to the last reversible
   * point (sim: every page in and checked, built, not running) and says how long that took.
   * A refusal rejects: the coordinator counts it as bootFailed.
   */
  async bootIncoming(input: SourceInput): Promise<{ readonly bootMs: number }> {
    const reply = await this.request({ type: 'BootIncoming', migrationId: input.migrationId });
    if (reply.type !== 'BootReady') throw stepFailed('boot', reply, 'bootIncoming');
    return { bootMs: reply.bootMs };
  }

  /**
   * The target owns the VM now. Events held since the last round, then new events for its
   * elements, go to it for the grace period (see forwarding.ts: its own connection, re-opened when
   * the link drops); everything of the VM goes from here in the transaction that journals that
   * forwarding. No network step comes before that transaction can fail it: a crash before it leaves
   * the migration in 'finishing' for recovery, a crash after it leaves the forwarding journaled.
   */
  async finishSource(input: SourceInput): Promise<void> {
    const host = this.host;
    const migrationId = input.migrationId;
    const rest = host.sensors.serializeHeldSince(this.scope, this.cursor);
    const rec = { migrationId, vm: this.o.vm, peer: this.o.target, elementIds: this.scope, until: Date.now() + this.o.forwardGraceMs };
    // Sent even when it holds nothing: the new owner waits for this hand-over (forwarding-hand-over.ts),
    // on the migration's link, which the forwarding keeps (a dial would add to the new owner's wait).
    const linkTaken = this.o.forwarding.start(rec, rest.bytes, this.conn);
    try {
      await this.handOverUdp(migrationId);
    } catch (e) {
      // The VM's management moved regardless; its UDP clients lose what was buffered, and are told why.
      host.logger.warn(`migration ${migrationId}: UDP hand-over to ${this.o.target} failed`, { error: describeError(e) });
    }
    host.store.transaction(() => {
      // The rows of a large hold queue are deleted on the next turn: the switch does not wait for them.
      host.sensors.drop(this.scope, { deleteLater: true });
      host.runtime.forget(this.scope);
      if (host.objects.has(this.vmElement)) host.objects.deregister(this.vmElement, { withDependents: true });
      // The sim removes before its first await, so inside this transaction; qemu's process work follows.
      if (host.driver.get(this.o.vm)) void host.driver.remove(this.o.vm).catch((e: unknown) => host.logger.warn(`could not remove moved VM ${this.o.vm}`, { error: describeError(e) }));
      this.o.forwarding.record(rec, rest.bytes);
    });
    this.unmute?.();
    this.unmute = undefined;
    this.o.fanOut?.shared.unmute();
    if (!linkTaken) void this.conn?.close().catch(() => {});
  }

  /**
   * The VM's UDP service: what its guest served and the packets buffered while it was offline go
   * to the target's relay, delivered before any new packet; then this relay re-points there, so
   * clients keep their address.
   */
  private async handOverUdp(migrationId: string): Promise<void> {
    const host = this.host;
    await (this.udpPaused ?? this.o.fanOut?.shared.udpPaused);
    const h = host.udp.handOver(this.o.vm);
    if (!h) return;
    const before = host.udp.stats(this.o.vm);
    const reply = await this.request({ type: 'UdpHandover', migrationId, vm: this.o.vm, served: h.served, packets: h.packets });
    host.udp.repoint(this.o.vm, { host: reply.host, port: reply.port }, this.o.forwardGraceMs);
    this.stats.udp = { handedOver: before?.handedOver ?? 0, dropped: before?.dropped ?? 0, maxBufferedLatencyMs: before?.maxBufferedLatencyMs ?? 0 };
  }

  async rollBack(input: SourceInput & { readonly reason: string }): Promise<void> {
    const host = this.host;
    try {
      if (this.conn?.isOpen) this.conn.notify({ type: 'Abort', migrationId: input.migrationId, reason: this.terminatedWith ?? input.reason });
    } catch (e) {
      host.logger.warn('could not tell the target about the abort', { error: describeError(e) });
    }
    this.closeEarlyPrimary();
    // A migrateOut still running (a step timeout, a cancel) is cancelled and settles first: the VM runs here again.
    this.vmMoveAbort.abort();
    await this.vmMove?.catch(() => undefined);
    if (this.o.fanOut) {
      // The VM, its embots and its events are the coordinator's to take back, once every child ended.
      void this.conn?.close().catch(() => {});
      return;
    }
    try {
      // 'migrated': the driver's stream completed (qemu's VM waits in postmigrate) but the target did not commit: take it back.
      const state = host.driver.get(this.o.vm)?.state;
      if (this.vmStopped && this.wasRunning && (state === 'stopped' || state === 'migrated')) await host.driver.start(this.o.vm);
      await this.udpPaused;
      host.udp.resumeAfterAbort(this.o.vm);
    } finally {
      this.unmute?.();
      this.unmute = undefined;
    }
    // Resume the embots from the state they were frozen in, then give them the held events.
    if (this.detached) await attachAll(host, this.scope);
    if (this.held) host.sensors.release(this.scope);
    void this.conn?.close().catch(() => {});
  }

  /**
   * The agent stops with this migration under way: its journal keeps the phase, and the restart's
   * recovery settles it with exactly one owner, as after a crash. Meanwhile nothing of it may keep
   * the process alive: the driver's copy is cancelled (its data paths close when it settles; qemu:
   * migrate_cancel, which recovery would do after a restart anyway) and the link to the target closed.
   */
  halt(): void {
    this.vmMoveAbort.abort();
    this.closeEarlyPrimary();
    void this.conn?.close().catch(() => {});
  }

  /** Closes the primary data path dialled early if migrateVm never took it. */
  private closeEarlyPrimary(): void {
    const early = this.earlyPrimary;
    this.earlyPrimary = undefined;
    void early?.then((c) => c.close()).catch(() => {});
  }

  async resolveOutcome(input: SourceInput): Promise<'committed' | 'notCommitted'> {
    // The link that failed MigrationComplete is not asked again: a fresh one is.
    void this.conn?.close().catch(() => {});
    this.conn = undefined;
    this.conn = await this.o.connect();
    return (await askCommitted(this.conn, input.migrationId, this.o.stepTimeoutMs)) ? 'committed' : 'notCommitted';
  }
}

/**
 * Whether the target committed migration `id`. A target with no record of the id
 * (`EMBOT_ERR_MIGRATION_UNKNOWN`: it never journaled it, or lost its journal) cannot have
 * committed it; a status query also makes sure a target that did not commit never will.
 */
export async function askCommitted(conn: PeerConnection, migrationId: string, timeoutMs?: number): Promise<boolean> {
  try {
    return (await conn.request({ type: 'MigrationStatusQuery', migrationId }, timeoutMs === undefined ? {} : { timeoutMs })).committed;
  } catch (e) {
    if (isEmbotError(e, ErrorCodes.MIGRATION_UNKNOWN)) return false;
    throw e;
  }
}

/** Resumes the embots of every element of a VM's tree. */
export async function attachAll(host: MobilityHost, scope: readonly string[]): Promise<void> {
  for (const id of scope) {
    const el = host.objects.get(id);
    if (el) await host.attach(el);
  }
}

/** What a link without each feature changes, as the source says once per migration on such a link. */
const WITHOUT_FEATURE: { readonly [F in ProtocolFeature]: string } = {
  zeroPages: 'zero pages go as data',
  bootWithFinalRound: 'a racing destination boots by BootIncoming',
  failedStep: "a refused boot is read from the target's wording",
  prewarmPrepare: "a pre-warm's target readies its VM as for a cold copy (qemu: guest RAM touched first during the copy, maybe during the stop)",
  completeMemoryBytes: "a qemu target's record shows no memory bytes",
};

/**
 * The target refused the boot its final round asked for: its failed step says so (protocol 3);
 * a target of an older build only words it (target-machine.ts recordFailure: `bootIncoming failed: …`).
 */
function bootRefused(reply: MigrationStateFailed): boolean {
  return reply.failedStep !== undefined ? reply.failedStep === 'bootIncoming' : reply.reason.startsWith('bootIncoming ');
}

/** `namedStep`: the source machine's step this failure rolls back as, which the reason then names (target-refusal.ts). */
function stepFailed(what: string, reply: TargetReply, namedStep?: string): ProtocolError {
  return new ProtocolError(ErrorCodes.REQUEST_FAILED, targetRefusal(what, reply, namedStep), { details: { reply: reply.type } });
}
