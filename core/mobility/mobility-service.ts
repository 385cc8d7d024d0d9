import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'eventemitter3';
import { unpack } from 'msgpackr';
import { createActor, type AnyActorRef } from 'xstate';
import { ConfigError, ErrorCodes, ProtocolError, describeError } from '../errors.ts';
import type { EmbotEvent } from '../events.ts';
import { PeerServer } from '../wire/peer-server.ts';
import { connectNamedPeer, connectPeer } from '../wire/peer-client.ts';
import type { PeerConnection } from '../wire/peer-connection.ts';
import type { PeerTls } from '../wire/peer-tls.ts';
import type { HandlerTable } from '../wire/peer-connection.ts';
import type { StartMigration } from '../wire/frames.ts';
import { createSourceMachine, type SourceOutput } from './source-machine.ts';
import { createTargetMachine } from './target-machine.ts';
import type { SourceInput, StepReply, TargetEvent, TargetInput } from './mobility-contract.ts';
import type { MobilityHost } from './mobility-host.ts';
import { SourceSide, askCommitted, attachAll, type DataplaneConfig } from './source-side.ts';
import { TargetSide } from './target-side.ts';
import { TargetDiscards } from './target-discards.ts';
import { resolveDestinations, type Destinations } from './destinations.ts';
import { childId, runFanOut, type ChildHandle, type ChildHooks, type FanOutPlan } from './fan-out.ts';
import { recoverFanOut } from './fan-out-decision.ts';
import { movedAway } from './moved-away.ts';
import { FanOutJournal } from './fan-out-journal.ts';
import { PrewarmControl, type PrewarmInfo } from './prewarm.ts';
import { summaryOf, type MigrationInfo, type MigrationProgress, type MigrationSummary } from './migration-record.ts';
import type { MigrationRow } from './migration-journal.ts';
import { faultPoint, forwardBackOffFault } from './fault-points.ts';
import { Forwarding } from './forwarding.ts';
import { HandOverWaits } from './forwarding-hand-over.ts';
import { withLogContext } from '../logger.ts';
import type { PeerChange, PeerDirectory } from '../peers/peer-directory.ts';
import { WarmConnections, takeOrDial } from './warm-connections.ts';
import { checkFrame, guardHandlers, stateName, type GuardVerdict, type GuardedFrame, type MigrationLookup } from './frame-guard.ts';

export interface MobilityServiceOptions {
  readonly host: MobilityHost;
  /** Cluster secret; without one (and without `tls`) the peer port stays closed and `migrate` refuses. */
  readonly secret: Uint8Array | undefined;
  /** Mutual TLS with the cluster CA: every listener is wss:// and every link presents this agent's certificate. */
  readonly tls?: PeerTls | undefined;
  /** The newest wire protocol version this agent speaks on its links (config `peer.protocol`; default the latest). */
  readonly protocol?: number;
  readonly listen: string;
  /** Who the peers are (static from config, or live from etcd): read at each use, and followed by the warm links. */
  readonly peers: PeerDirectory;
  readonly stepTimeoutMs: number;
  readonly vmTimeoutMs: number;
  readonly maxDirtyRounds: number;
  readonly forwardGraceMs: number;
  readonly dataplane: DataplaneConfig;
  /** What one peer may make this agent hold as a target (defaults: DEFAULT_TARGET_LIMITS). */
  readonly targetLimits?: Partial<TargetLimits>;
  /** Keep pre-dialled, authenticated idle links to each peer for the next migration (config `mobility.warmConnections`, default on). */
  readonly warmConnections?: boolean;
  /** A pre-warm's command switches once this share of the named destinations meets the exit condition (config `mobility.prewarmExitShare`, default 1). */
  readonly prewarmExitShare?: number;
}

/** Bounds on what peers can make this agent stage as the target of their migrations. */
export interface TargetLimits {
  /** Incoming migrations in progress from one peer. */
  readonly perPeer: number;
  /** Incoming migrations in progress from all peers together. */
  readonly total: number;
}

export const DEFAULT_TARGET_LIMITS: TargetLimits = { perPeer: 4, total: 16 };

export interface MobilityEvents {
  progress: (m: MigrationInfo) => void;
  finished: (s: MigrationSummary) => void;
}

/** What `migrate` takes besides the VM and its destinations. */
export interface MigrateOptions {
  readonly thresholdMs?: number;
  /** Several destinations: tries of the same set after the first, while none boots (0..MAX_RETRIES). */
  readonly retries?: number;
  /** Several destinations: tried once after the retries when none of the set booted. */
  readonly fallback?: readonly string[];
}

/** Most `retries` a migration may ask for. */
export const MAX_RETRIES = 5;

interface FanOutLive {
  readonly id: string;
  readonly vm: string;
  /** Why it was cancelled, once it was: no further attempt starts. */
  cancelled: string | undefined;
  readonly children: Set<ChildHandle>;
  done: Promise<MigrationSummary>;
  /** A pre-warm (prewarm.ts) waiting for, or switching on, its migrate command. */
  readonly prewarm?: PrewarmControl;
}

interface LiveMigration {
  readonly id: string;
  readonly role: 'source' | 'target';
  readonly vm: string;
  readonly peer: string;
  readonly startedAt: number;
  phase: string;
  progress: MigrationProgress;
  readonly actor: AnyActorRef;
  readonly done: Promise<MigrationSummary>;
  /** The agent stops: let go of what this migration holds open (its links, the driver's copy), its journal row left for recover(). */
  readonly halt?: () => void;
  committed?: boolean;
  /**
   * The journal row as last read, for progress events: a target reports progress per page batch,
   * and a read of the row per batch was a visible part of its CPU. Read again after a phase is
   * journaled (journalPhase) or reported; other writes show at the next one.
   */
  row?: MigrationRow | undefined;
}

/**
 * Moves VMs and their management between agents (DESIGN.md "Mobility protocol"): the source and
 * target sides are xstate machines (source-machine.ts, target-machine.ts) whose steps are done by
 * SourceSide / TargetSide; each side journals its phase so a restarted agent resolves what it
 * was doing with exactly one owner for the VM.
 *
 * @example
 * ```ts
 * const { id } = mobility.migrate('web-1', 'b');
 * const summary = await mobility.wait(id);
 * ```
 */
export class MobilityService extends EventEmitter<MobilityEvents> {
  private server: PeerServer | undefined;
  private readonly dataServers: PeerServer[] = [];
  /** Page receivers of incoming migrations, by migration id (data paths carry only the id). */
  private readonly receivers = new Map<string, TargetSide>();
  /** Incoming migrations' discards still running: an admission they may change waits for them (target-discards.ts). */
  private readonly discards = new TargetDiscards();
  private readonly live = new Map<string, LiveMigration>();
  /** Migrations to several destinations in progress, by their own id (their children are in `live`). */
  private readonly fanOutLive = new Map<string, FanOutLive>();
  /** Destinations and the write-once winner of each fan-out attempt (table `fan_outs`). */
  readonly fanOuts: FanOutJournal;
  private readonly targetConns = new Map<string, PeerConnection>();
  /** Committed incoming migrations whose UDP service was adopted, with when: one hand-over each. */
  private readonly udpAdopted = new Map<string, number>();
  private closed = false;
  /** Idle pre-dialled links per peer (warm-connections.ts); undefined when off or before start. */
  private warm: WarmConnections | undefined;
  /** Stops following the directory's peer changes (close). */
  private unfollowPeers: (() => void) | undefined;
  /** The guard's view of our migrations (see frame-guard.ts). */
  private readonly lookup: MigrationLookup = {
    live: (role, id) => {
      const m = this.live.get(key(role, id));
      const snap = m?.actor.getSnapshot() as { status: string; value: unknown } | undefined;
      return m && snap?.status === 'active' ? { vm: m.vm, peer: m.peer, state: stateName(snap.value) } : undefined;
    },
    journaled: (role, id) => this.host.journal.get(id, role),
  };

  /** Late events of VMs that moved away go to their new owner (journaled, resumed after a restart). */
  readonly forwarding: Forwarding;
  /** Incoming migrations committed here whose source has not handed over the events it held yet. */
  readonly handOvers: HandOverWaits;

  constructor(private readonly o: MobilityServiceOptions) {
    super();
    this.fanOuts = new FanOutJournal(o.host.store);
    this.forwarding = new Forwarding({
      host: o.host,
      connect: (peer) => connectNamedPeer(this.o.peers, peer, { ...this.auth, requestTimeoutMs: this.o.stepTimeoutMs }),
      ...forwardBackOffFault(),
    });
    this.handOvers = new HandOverWaits({ host: o.host, waitMs: o.forwardGraceMs + o.stepTimeoutMs, leaving: (vm) => this.leaving(vm) });
  }

  /** A migration of `vm` away from this agent is under way (single or to several destinations). */
  private leaving(vm: string): boolean {
    for (const m of this.live.values()) if (m.role === 'source' && m.vm === vm && m.actor.getSnapshot().status === 'active') return true;
    for (const f of this.fanOutLive.values()) if (f.vm === vm) return true;
    return false;
  }

  /** The listening peer server, for the agent's peer endpoint (core/wire/peer-services.ts); undefined before start. */
  get peerServer(): PeerServer | undefined {
    return this.server;
  }

  get peerUrl(): string | undefined {
    return this.server?.url;
  }

  /** A secret or a certificate: without either, this agent has no peer endpoint. */
  private get peersEnabled(): boolean {
    return this.o.secret !== undefined || this.o.tls !== undefined;
  }

  /** Who this agent is on every link it opens or accepts (peer listener, data paths, forwarding). */
  private get auth(): { readonly agent: string; readonly secret: Uint8Array | undefined; readonly tls: PeerTls | undefined; readonly protocol?: number } {
    return { agent: this.host.agent, secret: this.o.secret, tls: this.o.tls, ...(this.o.protocol === undefined ? {} : { protocol: this.o.protocol }) };
  }

  peerNames(): readonly string[] {
    return [...this.o.peers.keys()];
  }

  get host(): MobilityHost {
    return this.o.host;
  }

  async start(): Promise<void> {
    if (!this.peersEnabled) return;
    const handlers = this.targetHandlers();
    this.server = await PeerServer.listen({ ...this.auth, listen: this.o.listen, requestTimeoutMs: this.o.stepTimeoutMs, handlers });
    // Data paths may arrive on other local addresses (seed 000: another NIC / address pair).
    for (const listen of this.o.dataplane.listen) {
      this.dataServers.push(await PeerServer.listen({ ...this.auth, listen, requestTimeoutMs: this.o.stepTimeoutMs, handlers }));
    }
    // The config refuses plain ws:// off loopback (core/config/peer-transport.ts); say which case this is.
    this.host.logger.info(
      this.o.tls
        ? `peer links: wss:// with mutual TLS; peers need a certificate from the cluster CA that names them${this.o.secret ? ', and the cluster secret' : ''}`
        : 'peer links: plain ws:// without TLS, allowed because every peer listener and peer URL is on loopback (set peer.tls to leave this host)',
      { url: this.server.url },
    );
    this.server.on('connection', (conn) => {
      conn.on('notification', (frame) => {
        if (frame.type !== 'Abort') return;
        // Only the source of a migration may abort it.
        const v = this.check(frame, conn.remoteAgent);
        // The target's record says "aborted by source in <phase>: <reason>", the reason word for word (a fan-out's loser: "terminated: …").
        if (v.ok) this.abortTarget(frame.migrationId, frame.reason);
        else this.host.logger.warn('ignored an Abort', { code: v.error.code, reason: v.error.message, peer: conn.remoteAgent });
      });
      conn.on('close', () => {
        for (const [id, c] of this.targetConns) if (c === conn) this.abortTarget(id, 'the source disconnected');
      });
    });
    if (this.o.warmConnections !== false) {
      const warm = new WarmConnections({
        peers: [...this.o.peers.keys()],
        // One for the control link and one for the primary data path of the next migration.
        perPeer: 2,
        dial: (peer) => connectNamedPeer(this.o.peers, peer, { ...this.auth, requestTimeoutMs: this.o.stepTimeoutMs }),
        onError: (peer, e) => this.host.logger.debug('warm peer link: dial failed, retrying with back-off', { peer, reason: describeError(e) }),
      });
      this.warm = warm;
      warm.start();
      // A peer that joins is warmed too, one that moves is warmed at its new URL, one that leaves is let go (a static directory never changes).
      const follow = (c: PeerChange): void => {
        warm.removePeer(c.name);
        if (c.url !== undefined) warm.addPeer(c.name);
      };
      const peers = this.o.peers;
      peers.on('change', follow);
      this.unfollowPeers = () => peers.off('change', follow);
    }
    this.server.on('refused', (err, info) => this.host.logger.warn('peer refused', { code: err.code, reason: err.message, remote: info.remoteAddress }));
    this.server.on('protocolError', (err, conn) => this.host.logger.warn('peer broke the protocol', { code: err.code, reason: err.message, peer: conn.remoteAgent }));
  }

  async close(): Promise<void> {
    this.closed = true;
    this.forwarding.close();
    this.handOvers.close();
    this.unfollowPeers?.();
    const warm = this.warm?.close();
    for (const m of this.live.values()) {
      m.actor.stop();
      // A stopped actor no longer drives its steps, but a step under way (a copy) kept its sockets
      // open, and with them the process: SIGTERM during a migration never ended the agent.
      m.halt?.();
    }
    await Promise.all([warm, this.server?.close(), ...this.dataServers.map((d) => d.close())]);
  }

  // ---- source ----

  /**
   * Starts moving `vm` to the peer named `to`; resolves once it started, `wait(id)` gives the summary.
   * A list is checked whole (DESTINATIONS_INVALID); a list of one takes the single path exactly.
   */
  migrate(vm: string, destinations: Destinations | undefined, options: MigrateOptions = {}): { readonly id: string } {
    const warming = this.prewarmOf(vm);
    if (warming) {
      // The pre-warm's set and settings were fixed at its start: options of a migration that starts now would be silently ignored.
      const ignored = ([['retries', '--retries'], ['fallback', '--fallback'], ['thresholdMs', '--threshold']] as const).filter(([k]) => options[k] !== undefined).map(([, flag]) => flag);
      if (ignored.length > 0) {
        throw new ConfigError(
          ErrorCodes.DESTINATIONS_INVALID,
          `VM ${vm} is pre-warming: \`embot migrate ${vm}\` switches to its warmed destinations and takes no ${ignored.join(', ')} (those belong to a migration that starts now: cancel the pre-warm first)`,
          { details: { problem: 'prewarmCommand', names: [] } },
        );
      }
      // The pre-warm's command: its own id; destinations not named are terminated.
      warming.prewarm.command(destinations === undefined ? undefined : typeof destinations === 'string' ? [destinations] : destinations);
      return { id: warming.id };
    }
    if (destinations === undefined) throw new ConfigError(ErrorCodes.DESTINATIONS_INVALID, `VM ${vm} has no pre-warm: name its destination(s)`, { details: { problem: 'empty', names: [] } });
    if (!this.peersEnabled) throw new ConfigError(ErrorCodes.CONFIG_INVALID, 'this agent has no cluster secret (peer.secretFile / --secret-file) and no TLS (peer.tls); it cannot migrate');
    const check = (list: readonly string[]): readonly string[] => resolveDestinations(list, { self: this.host.agent, peers: this.o.peers.keys() });
    if (typeof destinations === 'string' && destinations.includes(',')) {
      // An API caller's "b,c": the CLI splits its --to, the API takes a list.
      throw new ConfigError(ErrorCodes.DESTINATIONS_INVALID, `'${destinations}' is not a peer name: several destinations go as a list (["${destinations.split(',').map((d) => d.trim()).join('", "')}"])`, { details: { problem: 'unknown', names: [destinations] } });
    }
    const names = typeof destinations === 'string' ? [destinations] : check(destinations);
    const fallback = options.fallback === undefined ? [] : check(options.fallback);
    const retries = options.retries ?? 0;
    if (!Number.isInteger(retries) || retries < 0 || retries > MAX_RETRIES) {
      throw new ConfigError(ErrorCodes.DESTINATIONS_INVALID, `retries must be an integer in 0..${MAX_RETRIES}, got ${String(retries)}`, { details: { problem: 'retries', names: [] } });
    }
    const overlap = fallback.filter((f) => names.includes(f));
    if (overlap.length > 0) throw new ConfigError(ErrorCodes.DESTINATIONS_INVALID, `--fallback names ${overlap.length === 1 ? 'a host' : 'hosts'} already in --to: ${overlap.join(', ')}`, { details: { problem: 'duplicate', names: overlap } });
    // `retries` given at all (0 included) asks for the fan-out's semantics, also with one destination.
    const several = names.length > 1 || fallback.length > 0 || options.retries !== undefined;
    if (!several && !this.o.peers.has(names[0]!)) throw new ConfigError(ErrorCodes.PEER_UNKNOWN, `no peer named '${names[0]}'; known: ${[...this.o.peers.keys()].join(', ') || 'none (use --peers)'}`);
    if (several && !this.host.driver.capabilities.fanOut) {
      throw new ConfigError(ErrorCodes.MULTI_DESTINATION_UNSUPPORTED, `several destinations at once (${[...names, ...fallback].join(', ')}), retries and fallback hosts need a driver that copies to several destinations; the ${this.host.driver.name} driver does not yet: give one peer name`, { details: { names: [...names, ...fallback] } });
    }
    if (!this.host.driver.get(vm)) throw new ProtocolError(ErrorCodes.VM_UNKNOWN, `no VM named ${vm} on ${this.host.agent}`);
    // Refused before anything starts: qemu found out only inside the copy, and a fan-out then reported a dropped stream.
    const state = this.host.driver.get(vm)!.state;
    if (state !== 'running' && !(this.host.driver.capabilities.coldMigration?.from.includes(state) ?? false)) {
      throw new ProtocolError(ErrorCodes.VM_BAD_STATE, `VM ${vm} is ${state}: the ${this.host.driver.name} driver migrates only a running VM (start it first)`, { details: { vm, state } });
    }
    if ([...this.live.values()].some((m) => m.vm === vm) || [...this.fanOutLive.values()].some((f) => f.vm === vm)) throw new ProtocolError(ErrorCodes.VM_BAD_STATE, `VM ${vm} is already migrating`);
    const id = `m-${Date.now().toString(36)}-${randomBytes(3).toString('hex')}`;
    if (several) {
      this.migrateMany(id, vm, { destinations: names, retries, fallback }, options);
      return { id };
    }
    this.startSource(id, vm, names[0]!, options);
    return { id };
  }

  /**
   * One source machine: the single-destination migration, or (with `fanOut`) one child of a
   * migration to several, which boots its destination and waits for the coordinator's verdict.
   */
  private startSource(id: string, vm: string, to: string, options: MigrateOptions, fanOut?: ChildHooks): ChildHandle {
    this.host.journal.begin(id, 'source', vm, to, 'requesting');
    const side = new SourceSide({
      host: this.host,
      migrationId: id,
      vm,
      target: to,
      targetUrl: this.o.peers.get(to)!,
      dataplane: this.o.dataplane,
      ...(options.thresholdMs === undefined ? {} : { thresholdMs: options.thresholdMs }),
      openPath: (p) => {
        const dial = (): Promise<PeerConnection> =>
          connectPeer({
            url: p.url,
            ...this.auth,
            expectedPeer: to,
            requestTimeoutMs: this.o.stepTimeoutMs,
            ...(p.localAddress ? { localAddress: p.localAddress } : {}),
          });
        // The primary path goes to the peer's own URL: a pre-dialled link fits it (warm-connections.ts).
        return p.localAddress === undefined && p.url === this.o.peers.get(to) ? takeOrDial(this.warm, to, {}, dial) : dial();
      },
      connect: () => {
        const handlers: HandlerTable = guardHandlers(
          {
            ModuleRequest: (req) => {
              // Only what this migration announced: the target gets no other module of ours.
              if (!side.stats.modules.some((ref) => ref.startsWith(`${req.name}@`) && ref.endsWith(`#${req.hash}`))) {
                throw new ProtocolError(ErrorCodes.MIGRATION_MISMATCH, `module ${req.name}#${req.hash} is not among those migration ${id} announced`);
              }
              const b = this.host.modules.bundleFor(req.name, req.hash);
              if (!b) throw new ProtocolError(ErrorCodes.PLUGIN_LOAD_FAILED, `${this.host.agent} has no module ${req.name}#${req.hash}`);
              return { type: 'ModuleBundle', ...b };
            },
          },
          (frame, conn) => this.check(frame, conn.remoteAgent),
        );
        return takeOrDial(this.warm, to, handlers, () => connectNamedPeer(this.o.peers, to, { ...this.auth, requestTimeoutMs: this.o.stepTimeoutMs, handlers }));
      },
      stepTimeoutMs: this.o.stepTimeoutMs,
      vmTimeoutMs: this.o.vmTimeoutMs,
      forwardGraceMs: this.o.forwardGraceMs,
      forwarding: this.forwarding,
      onProgress: (p) => this.progress(key('source', id), p),
      ...(fanOut ? { fanOut: { shared: fanOut.shared, move: fanOut.move } } : {}),
    });
    // One machine per form for every migration: its steps and hooks come with the input, so no
    // provide() copies the machine per migration and per fan-out child (source-machine.ts).
    const steps: SourceInput['steps'] = {
      startMigration: (i) => side.startMigration(i),
      holdEvents: () => side.holdEvents(),
      sendManagementState: (i) => side.sendManagementState(i),
      sendEventState: (i) => side.sendEventState(i),
      migrateVm: (i) => side.migrateVm(i),
      // A fan-out child still racing asks its destination to boot with the final round: no BootIncoming round trip after it.
      sendDirtyObjects: (i) => side.sendDirtyObjects(fanOut !== undefined && i.final && fanOut.sole() !== true ? { ...i, boot: true } : i),
      completeMigration: (i) => side.completeMigration(i),
      resolveOutcome: (i) => side.resolveOutcome(i),
      finishSource: (i) => side.finishSource(i),
      rollBack: (i) => side.rollBack(i),
      bootIncoming: async (i) => {
        const r = await side.bootIncoming(i);
        fanOut?.bootReady();
        return r;
      },
      awaitDecision: () => (fanOut ? fanOut.awaitDecision() : Promise.reject(new Error('not a fan-out child'))),
    };
    const input: SourceInput = {
      migrationId: id,
      vm,
      target: to,
      maxDirtyRounds: this.o.maxDirtyRounds,
      timeouts: { stepMs: this.o.stepTimeoutMs, vmMs: this.o.vmTimeoutMs },
      steps,
      hooks: {
        journalPhase: (phase) => this.journalPhase('source', id, phase),
        reportProgress: (phase) => this.progress(key('source', id), { phase }),
        readyWithoutBoot: () => fanOut?.bootReady(),
        bootedWithRound: () => fanOut?.bootReady(),
        bootSkipped: () => fanOut?.sole() === true,
        alreadyChosen: () => fanOut?.chosen() === true,
        copyUntimed: () => {
          if (!fanOut?.shared.prewarm) return false;
          const at = fanOut.commandedAt();
          return at === undefined || Date.now() - at < this.o.vmTimeoutMs;
        },
      },
    };
    const machine = createSourceMachine({ fanOut: fanOut !== undefined });
    const startedAt = Date.now();
    const actor = createActor(machine, { input });
    const done = new Promise<MigrationSummary>((resolve) => {
      actor.subscribe({
        complete: () => {
          // Stopped by close(): no output; the journal keeps the phase for recover() after the restart.
          if (actor.getSnapshot().output === undefined) return resolve(failedSummary(id, vm, this.host.agent, to, startedAt, 'the agent stopped'));
          const out = actor.getSnapshot().output as SourceOutput;
          const full = side.summarize(out, Date.now() - startedAt);
          // A terminated fan-out child: the reason it was given, word for word (its destination got the same).
          const summary = side.terminatedWith !== undefined && full.outcome !== 'completed' ? { ...full, reason: side.terminatedWith } : full;
          this.finish('source', id, out.outcome === 'completed' ? 'completed' : out.outcome, summary);
          resolve(summary);
        },
        error: (err) => {
          const summary = failedSummary(id, vm, this.host.agent, to, startedAt, describeError(err));
          this.finish('source', id, 'aborted', summary);
          resolve(summary);
        },
      });
    });
    this.live.set(key('source', id), { id, role: 'source', vm, peer: to, startedAt, phase: 'requesting', progress: emptyProgress('requesting'), actor, done, halt: () => side.halt() });
    // Every line its steps log carries the migration id (core/logger.ts withLogContext).
    withLogContext({ migrationId: id }, () => {
      this.host.logger.info(`migration ${id} of ${vm} to ${to} started (source)`, { vm, peer: to });
      actor.start();
    });
    return {
      terminate: (reason) => {
        side.terminatedWith = reason;
        actor.send({ type: 'CANCEL', reason });
      },
      done,
    };
  }

  /**
   * A migration to several destinations at once (fan-out.ts): its own journal row (`fanOut` in
   * its notes, peer `b,c`), one child row per destination and attempt, and a summary with the
   * winner and every destination's outcome.
   */
  private migrateMany(id: string, vm: string, plan: FanOutPlan, options: MigrateOptions, prewarm?: PrewarmControl): void {
    const host = this.host;
    const startedAt = Date.now();
    const peer = plan.destinations.join(',');
    host.journal.begin(id, 'source', vm, peer, 'racing');
    host.journal.notes(id, 'source', { fanOut: true, wasRunning: host.driver.get(vm)?.state === 'running', ...(prewarm ? { prewarm: true } : {}) });
    const children = new Set<ChildHandle>();
    let journaledPhase = 'racing';
    const entry: FanOutLive = { id, vm, cancelled: undefined, children, done: Promise.resolve(failedSummary(id, vm, host.agent, peer, startedAt, 'not started')), ...(prewarm ? { prewarm } : {}) };
    const run = runFanOut(
      {
        host,
        journal: this.fanOuts,
        id,
        vm,
        cancelled: () => entry.cancelled !== undefined,
        stopping: () => this.closed,
        ...(prewarm ? { prewarm } : {}),
        startChild: (dest, cid, hooks) => {
          const h = this.startSource(cid, vm, dest, options, hooks);
          children.add(h);
          void h.done.finally(() => children.delete(h));
          if (entry.cancelled !== undefined) h.terminate(entry.cancelled);
          return h;
        },
        onState: (s) => {
          // Written when it changes only: each report of a child would otherwise cost a journal write.
          if (this.closed || s.phase === journaledPhase) return;
          journaledPhase = s.phase;
          host.journal.phase(id, 'source', s.phase);
        },
      },
      plan,
    );
    entry.done = run.then(
      (r) => {
        const reason = r.winner === undefined ? (entry.cancelled ?? r.reason ?? 'no destination booted') : undefined;
        const summary: MigrationSummary = {
          ...(r.winnerSummary ?? failedSummary(id, vm, host.agent, peer, startedAt, reason ?? '')),
          migrationId: id,
          to: r.winner ?? peer,
          outcome: r.winner === undefined ? 'aborted' : 'completed',
          ...(reason === undefined ? {} : { reason }),
          totalMs: Date.now() - startedAt,
          winner: r.winner ?? null,
          destinations: r.destinations,
          retries: r.retries,
          ...(entry.prewarm ? { commandedMs: commandedMs(entry.prewarm, startedAt) } : {}),
        };
        this.fanOutLive.delete(id);
        this.finish('source', id, summary.outcome, summary);
        return summary;
      },
      (e: unknown) => {
        const summary: MigrationSummary = { ...failedSummary(id, vm, host.agent, peer, startedAt, describeError(e)), winner: null, destinations: [], retries: 0 };
        this.fanOutLive.delete(id);
        this.finish('source', id, 'aborted', summary);
        return summary;
      },
    );
    this.fanOutLive.set(id, entry);
  }

  /** The pre-warm of `vm` in progress, if any. */
  private prewarmOf(vm: string): (FanOutLive & { readonly prewarm: PrewarmControl }) | undefined {
    for (const f of this.fanOutLive.values()) if (f.vm === vm && f.prewarm) return f as FanOutLive & { readonly prewarm: PrewarmControl };
    return undefined;
  }

  /**
   * Starts a pre-warm of `vm` to `destinations` (README "Several destinations"): the fan-out's
   * copies start now and keep the destinations current without stopping the VM or holding its
   * events, until {@link migrate} names one or more of them (the command) or {@link cancelPrewarm}.
   */
  prewarm(vm: string, destinations: readonly string[], options: MigrateOptions = {}): { readonly id: string } {
    if (!this.peersEnabled) throw new ConfigError(ErrorCodes.CONFIG_INVALID, 'this agent has no cluster secret (peer.secretFile / --secret-file) and no TLS (peer.tls); it cannot migrate');
    const names = resolveDestinations(destinations, { self: this.host.agent, peers: this.o.peers.keys() });
    if (!this.host.driver.capabilities.fanOut?.prewarm) {
      throw new ConfigError(ErrorCodes.MULTI_DESTINATION_UNSUPPORTED, `a pre-warm needs a driver that holds its copies until the command; the ${this.host.driver.name} driver does not yet`, { details: { names: [...names] } });
    }
    if (!this.host.driver.get(vm)) throw new ProtocolError(ErrorCodes.VM_UNKNOWN, `no VM named ${vm} on ${this.host.agent}`);
    // Nothing to keep warm in a VM that does not run (a cold `embot migrate` moves it); refused before anything starts.
    const st = this.host.driver.get(vm)!.state;
    if (st !== 'running') {
      const cold = this.host.driver.capabilities.coldMigration?.from.includes(st) ?? false;
      throw new ProtocolError(ErrorCodes.VM_BAD_STATE, `VM ${vm} is ${st}: only a running VM is pre-warmed (${cold ? `embot migrate ${vm} moves it cold` : 'start it first'})`, { details: { vm, state: st } });
    }
    if (this.prewarmOf(vm)) throw new ProtocolError(ErrorCodes.VM_BAD_STATE, `VM ${vm} is pre-warming already (embot migrate ${vm} switches, embot prewarm ${vm} --cancel stops it)`);
    if ([...this.live.values()].some((m) => m.vm === vm) || [...this.fanOutLive.values()].some((f) => f.vm === vm)) throw new ProtocolError(ErrorCodes.VM_BAD_STATE, `VM ${vm} is already migrating`);
    const id = `m-${Date.now().toString(36)}-${randomBytes(3).toString('hex')}`;
    const control = new PrewarmControl(names, { downtimeLimitMs: this.o.dataplane.downtimeLimitMs, exitShare: this.o.prewarmExitShare ?? 1 });
    this.migrateMany(id, vm, { destinations: names, retries: 0, fallback: [] }, options, control);
    return { id };
  }

  /** Stops the pre-warm of `vm`: every destination discards what it got, the VM runs on here. */
  cancelPrewarm(vm: string): { readonly id: string } {
    const f = this.prewarmOf(vm);
    if (!f) throw new ProtocolError(ErrorCodes.VM_BAD_STATE, `VM ${vm} has no pre-warm to cancel`);
    this.cancel(f.id, 'pre-warm cancelled by operator');
    return { id: f.id };
  }

  /** Resolves with the summary once the migration `id` ends (immediately for a finished one). */
  async wait(id: string): Promise<MigrationSummary | undefined> {
    const f = this.fanOutLive.get(id);
    if (f) return f.done;
    const m = this.live.get(key('source', id)) ?? this.live.get(key('target', id));
    if (m) return m.done;
    const row = this.host.journal.get(id, 'source') ?? this.host.journal.get(id, 'target');
    return this.withForwardCounts(row?.notes.summary as MigrationSummary | undefined);
  }

  cancel(id: string, reason = 'cancelled by operator'): boolean {
    const f = this.fanOutLive.get(id);
    if (f) {
      // No further attempt starts; every running child is terminated.
      f.cancelled ??= reason;
      for (const h of f.children) h.terminate(reason);
      return true;
    }
    const m = this.live.get(key('source', id));
    if (!m) return false;
    m.actor.send({ type: 'CANCEL', reason });
    return true;
  }

  list(limit = 100): MigrationInfo[] {
    return this.host.journal.list(limit).map((row) => this.info(row));
  }

  get(id: string): MigrationInfo | undefined {
    const row = this.host.journal.get(id, 'source') ?? this.host.journal.get(id, 'target');
    return row && this.info(row);
  }

  private info(row: MigrationRow): MigrationInfo {
    const live = this.live.get(key(row.role, row.id));
    const summary = this.withForwardCounts(row.notes.summary as MigrationSummary | undefined);
    const prewarm: PrewarmInfo | undefined = row.role === 'source' ? this.fanOutLive.get(row.id)?.prewarm?.info() : undefined;
    return {
      ...(prewarm ? { prewarm } : {}),
      id: row.id,
      role: row.role,
      vm: row.vm,
      peer: row.peer,
      phase: live?.phase ?? row.phase,
      outcome: row.outcome ?? null,
      ...(row.reason ? { reason: row.reason } : {}),
      startedAt: row.startedAt,
      updatedAt: row.updatedAt,
      ...(live ? { progress: live.progress } : row.role === 'source' && row.outcome === undefined ? this.leadingProgress(row.id) : {}),
      ...(summary ? { summary } : {}),
    };
  }

  /**
   * A running fan-out's progress: its child furthest along (attempts after the first included, ids
   * `<id>.r1~peer`, `<id>.f~peer`), named, so `embot migrate --to b,c` shows a copy under way.
   */
  private leadingProgress(id: string): { readonly progress?: MigrationProgress } {
    if (!this.fanOutLive.has(id)) return {};
    let best: { readonly peer: string; readonly progress: MigrationProgress } | undefined;
    for (const m of this.live.values()) {
      if (m.role !== 'source' || !(m.id.startsWith(`${id}~`) || m.id.startsWith(`${id}.`))) continue;
      if (best === undefined || m.progress.percent > best.progress.percent || (m.progress.percent === best.progress.percent && m.progress.bytes > best.progress.bytes)) best = m;
    }
    return best === undefined ? {} : { progress: { ...best.progress, leading: best.peer } };
  }

  /** A source's summary with what its forwarding has done since (it runs on after the summary was written). */
  private withForwardCounts(summary: MigrationSummary | undefined): MigrationSummary | undefined {
    const counts = summary && summary.from === this.host.agent ? this.forwarding.counts(summary.migrationId) : undefined;
    return counts && summary ? { ...summary, forwarded: counts.forwarded, deadLettered: counts.deadLettered } : summary;
  }

  /**
   * Checks an event posted from outside (control API) for an element that may have moved away:
   * EMBOT_ERR_ELEMENT_MOVED naming the owner after the grace period; inside it, the new owner the
   * event will be forwarded to.
   */
  admitEvent(elementId: string): Promise<{ readonly forwardedTo?: string }> {
    return this.forwarding.admit({ elementId });
  }

  /** The agent re-queued its journaled events (after {@link recover}): forwardings whose grace period ended may let go. */
  eventsRecovered(): void {
    this.forwarding.afterEventsRecovered();
    this.handOvers.afterEventsRecovered();
  }

  // ---- crash recovery ----

  /** Whether VM `vm`, held by the driver after a restart but managed by no element, had left this host (moved-away.ts). */
  movedAway(vm: string): boolean {
    // A source row cut by the restart after its drop: the forwarding was journaled with it (recover() ends the row).
    return movedAway(this.host.journal.movesOf(vm), (id) => this.forwarding.journal.get(id) !== undefined);
  }

  /**
   * Resolves migrations this agent was part of when it stopped, before its elements get their
   * embots and its journaled events are re-queued. Returns the VM elements that must stay frozen
   * (held, no embots) until the target tells whether it committed.
   */
  recover(): { readonly frozen: ReadonlySet<string> } {
    const frozen = new Set<string>();
    const host = this.host;
    // Completed migrations' forwardings first: the journaled events of their elements go to them.
    this.forwarding.restore();
    // Committed incoming ones whose source has not handed over yet: their journaled events wait for it.
    this.handOvers.restore();
    this.recoverFanOuts(frozen);
    for (const row of host.journal.unfinished()) {
      // Migrations to several destinations and their children were settled by recoverFanOuts.
      if (row.role === 'source' && (row.notes.fanOut === true || row.id.includes('~'))) continue;
      const vmElement = `vm:${row.vm}`;
      const scope = row.notes.scope ?? (host.objects.has(vmElement) ? host.objects.subtree(vmElement).map((e) => e.id) : [vmElement]);
      if (row.role === 'target') {
        if (row.phase === 'committed') {
          host.journal.finish(row.id, 'target', 'committed', 'completed', undefined);
          // A VM whose process outlived the agent (qemu) may still wait paused for the commit's last step.
          if (host.driver.get(row.vm)?.state === 'created') void host.driver.commitIncoming(row.vm, { running: row.notes.wasRunning !== false }).catch(() => undefined);
        } else {
          host.journal.finish(row.id, 'target', 'aborted', 'aborted', `agent restarted during ${row.phase}; nothing was committed`);
          // An incoming QEMU outlives its agent: nothing was committed, so it goes (a no-op for a VM the driver does not hold).
          void this.discards.track(row.vm, row.id, host.driver.abortIncoming(row.vm)).catch((e: unknown) => host.logger.warn(`could not throw away the incoming VM ${row.vm}`, { error: describeError(e) }));
        }
        continue;
      }
      if (this.forwarding.journal.get(row.id)) {
        // The drop and the forwarding were committed; only the outcome was not written.
        host.journal.finish(row.id, 'source', 'completed', 'completed', 'the VM had left before the restart');
        continue;
      }
      if (row.phase === 'finishing' || row.phase === 'completing') {
        // 'finishing': the target acknowledged, it owns the VM. 'completing': MigrationComplete may
        // have gone out; only the target knows whether it committed. Either way the VM stays
        // frozen here (held, no embots) until it is settled with the target.
        frozen.add(vmElement);
        host.sensors.hold(scope);
        void this.resolveAfterRestart(row, scope, row.phase === 'finishing');
      } else {
        this.restartStoppedVm(row);
        host.journal.finish(row.id, 'source', 'aborted', 'aborted', `agent restarted during ${row.phase}; the VM stays here`);
        void this.notifyAbort(row);
      }
    }
    return { frozen };
  }

  /**
   * Fan-outs cut by the restart, from their journal alone (recoverFanOut): with no winner journaled
   * nobody was told to commit, so every child is aborted and the VM runs here again; with one, the
   * others are aborted and the winner is asked, as a single migration's target is (the VM stays
   * frozen here until it answers). A fan-out's own row ends when its attempts are settled.
   */
  private recoverFanOuts(frozen: Set<string>): void {
    const host = this.host;
    const settling = new Map<string, Promise<void>[]>();
    for (const f of this.fanOuts.unfinished()) {
      const rows = f.destinations.map((d) => host.journal.get(childId(f.id, d), 'source')).filter((r): r is MigrationRow => r !== undefined);
      const vmElement = `vm:${f.vm}`;
      const scope = rows.find((r) => r.notes.scope)?.notes.scope ?? (host.objects.has(vmElement) ? host.objects.subtree(vmElement).map((e) => e.id) : [vmElement]);
      const stopped = rows.find((r) => r.notes.vmStopped) ?? rows[0];
      const parent = f.id.replace(/\.(r\d+|f)$/, '');
      const list = settling.get(parent) ?? [];
      settling.set(parent, list);
      let step: ReturnType<typeof recoverFanOut>;
      try {
        step = recoverFanOut(f.id, f.destinations, f.winner);
      } catch (e) {
        host.logger.warn(`fan-out ${f.id}: cannot recover it`, { error: describeError(e) });
        this.fanOuts.finish(f.id, 'aborted', describeError(e));
        continue;
      }
      for (const effect of step.effects) {
        if (effect.type === 'terminate') {
          const row = rows.find((r) => r.peer === effect.dest);
          if (row && row.outcome === undefined) {
            host.journal.finish(row.id, 'source', 'aborted', 'aborted', effect.reason);
            void this.notifyAbort(row);
          }
        } else if (effect.type === 'takeBack') {
          if (stopped) this.restartStoppedVm(stopped);
          this.fanOuts.finish(f.id, 'aborted', effect.reason);
        } else if (effect.type === 'resolveWinner') {
          const row = rows.find((r) => r.peer === effect.dest);
          if (!row) {
            this.fanOuts.finish(f.id, 'aborted', `no journal row of the winner ${effect.dest}`);
            continue;
          }
          const settled = (): void => {
            const after = host.journal.get(row.id, 'source');
            this.fanOuts.finish(f.id, after?.outcome === 'completed' ? 'completed' : 'aborted', after?.reason);
          };
          if (row.outcome !== undefined || this.forwarding.journal.get(row.id)) {
            // The winner's own row tells: it ended, or the drop and its forwarding were committed.
            if (row.outcome === undefined) host.journal.finish(row.id, 'source', 'completed', 'completed', 'the VM had left before the restart');
            else if (row.outcome !== 'completed' && stopped) this.restartStoppedVm({ ...stopped, notes: { ...stopped.notes, wasRunning: row.notes.wasRunning ?? stopped.notes.wasRunning } });
            settled();
            continue;
          }
          frozen.add(vmElement);
          host.sensors.hold(scope);
          const winnerRow = { ...row, notes: { ...row.notes, vmStopped: row.notes.vmStopped ?? stopped?.notes.vmStopped } };
          list.push(this.resolveAfterRestart(winnerRow, scope, row.phase === 'finishing').then(settled));
        }
      }
    }
    for (const row of host.journal.unfinished()) {
      if (row.role !== 'source' || row.notes.fanOut !== true) continue;
      void Promise.all(settling.get(row.id) ?? []).then(() => {
        if (this.closed) return;
        const attempts = this.fanOuts.attemptsOf(row.id);
        const won = attempts.find((a) => a.outcome === 'completed' && a.winner !== undefined);
        host.journal.finish(row.id, 'source', won ? 'completed' : 'aborted', won ? 'completed' : 'aborted', won ? `${won.winner} had won (settled after a restart)` : 'the source restarted before a destination owned the VM');
      });
    }
  }

  private restartStoppedVm(row: MigrationRow): void {
    // 'migrated': the driver's stream completed before the crash (qemu's VM waits in postmigrate); the target did not commit.
    const state = this.host.driver.get(row.vm)?.state;
    if (row.notes.vmStopped && row.notes.wasRunning && (state === 'stopped' || state === 'migrated')) {
      void this.host.driver.start(row.vm).catch((e: unknown) => this.host.logger.warn(`could not restart VM ${row.vm} after migration ${row.id}`, { error: describeError(e) }));
    }
  }

  /** The VM and its management leave this agent; `journal` runs in the same transaction (the forwarding's record). */
  private dropMovedVm(vm: string, scope: readonly string[], journal: () => void): void {
    const host = this.host;
    host.store.transaction(() => {
      host.sensors.drop(scope);
      host.runtime.forget(scope);
      if (host.objects.has(`vm:${vm}`)) host.objects.deregister(`vm:${vm}`, { withDependents: true });
      // The sim removes before its first await, so inside this transaction; qemu's process work follows.
      if (host.driver.get(vm)) void host.driver.remove(vm).catch((e: unknown) => host.logger.warn(`could not remove moved VM ${vm}`, { error: describeError(e) }));
      journal();
    });
  }

  private async resolveAfterRestart(row: MigrationRow, scope: readonly string[], knownCommitted: boolean): Promise<void> {
    if (knownCommitted) return this.settleMoved(row, scope);
    for (let attempt = 0; !this.closed; attempt++) {
      try {
        const conn = await connectNamedPeer(this.o.peers, row.peer, { ...this.auth, requestTimeoutMs: this.o.stepTimeoutMs });
        let committed: boolean;
        try {
          committed = await askCommitted(conn, row.id);
        } finally {
          void conn.close().catch(() => {});
        }
        if (this.closed) return;
        if (committed) {
          this.settleMoved(row, scope);
        } else {
          this.restartStoppedVm(row);
          await attachAll(this.host, scope);
          this.host.sensors.release(scope);
          this.host.journal.finish(row.id, 'source', 'aborted', 'aborted', 'target had not committed (settled after a restart)');
        }
        return;
      } catch (e) {
        this.host.logger.warn(`migration ${row.id}: cannot reach ${row.peer} to settle it yet`, { error: describeError(e), attempt });
        await new Promise((r) => setTimeout(r, Math.min(5000, 250 * 2 ** Math.min(attempt, 5))).unref());
      }
    }
  }

  /**
   * The target committed: every event held here goes to it (it de-duplicates by id) before any
   * later one, which is forwarded for a grace period from now; the VM leaves this agent. The
   * forwarding is journaled with the drop and the outcome, so no network step stands between them.
   */
  private settleMoved(row: MigrationRow, scope: readonly string[]): void {
    const rest = this.host.sensors.serializeHeld(scope);
    const rec = { migrationId: row.id, vm: row.vm, peer: row.peer, elementIds: scope, until: Date.now() + this.o.forwardGraceMs };
    this.forwarding.start(rec, rest);
    this.dropMovedVm(row.vm, scope, () => {
      this.forwarding.record(rec, rest);
      this.host.journal.finish(row.id, 'source', 'completed', 'completed', 'target had committed (settled after a restart)');
    });
  }

  private async notifyAbort(row: MigrationRow): Promise<void> {
    if (!this.peersEnabled || !this.o.peers.has(row.peer)) return;
    try {
      const conn = await connectNamedPeer(this.o.peers, row.peer, { ...this.auth, requestTimeoutMs: this.o.stepTimeoutMs });
      conn.notify({ type: 'Abort', migrationId: row.id, reason: 'the source restarted' });
      await conn.close();
    } catch {
      /* the target times out on its own */
    }
  }

  // ---- target ----

  private targetHandlers(): HandlerTable {
    const step = <R>(migrationId: string, make: (reply: StepReply) => TargetEvent, map: (r: Parameters<StepReply>[0]) => R, unknown: R): Promise<R> => {
      const m = this.live.get(key('target', migrationId));
      if (!m || m.actor.getSnapshot().status !== 'active') return Promise.resolve(unknown);
      // The step runs in the migration's log context, not the peer connection's.
      return new Promise<R>((resolve) => withLogContext({ migrationId }, () => m.actor.send(make((r) => resolve(map(r))))));
    };
    const fail = (r: Parameters<StepReply>[0]) => (r.ok ? '' : r.reason);
    // The failed step goes to a source that reads it (protocol 3); an older one reads the reason's wording.
    const stateFailed = (migrationId: string, r: Parameters<StepReply>[0], conn: PeerConnection) =>
      ({ type: 'MigrationStateFailed', migrationId, reason: fail(r), ...(!r.ok && r.step !== undefined && conn.supports('failedStep') ? { failedStep: r.step } : {}) }) as const;
    const handlers: HandlerTable = {
      StartMigration: (frame, conn) => this.startTarget(frame, conn),
      ManagementState: (frame) =>
        step(frame.migrationId, (reply) => ({ type: 'MANAGEMENT_STATE', frame, reply }), (r) =>
          r.ok ? { type: 'ManagementStateSuccess', migrationId: frame.migrationId } as const
            : r.instantiation ? { type: 'ManagedObjectInstantiationError', migrationId: frame.migrationId, reason: fail(r) } as const
            : { type: 'ManagementStateFailed', migrationId: frame.migrationId, reason: fail(r) } as const,
          { type: 'ManagementStateFailed', migrationId: frame.migrationId, reason: 'no such migration in progress' } as const),
      ManagementEventState: (frame) =>
        step(frame.migrationId, (reply) => ({ type: 'MANAGEMENT_EVENT_STATE', frame, reply }), (r) =>
          r.ok ? { type: 'ManagementEventStateSuccess', migrationId: frame.migrationId } as const
            : r.instantiation ? { type: 'ManagedObjectInstantiationError', migrationId: frame.migrationId, reason: fail(r) } as const
            : { type: 'ManagementEventStateFailed', migrationId: frame.migrationId, reason: fail(r) } as const,
          { type: 'ManagementEventStateFailed', migrationId: frame.migrationId, reason: 'no such migration in progress' } as const),
      VmMemory: (frame, conn) =>
        step(frame.migrationId, (reply) => ({ type: 'VM_MEMORY', frame, reply }), (r) =>
          r.ok ? { type: 'VmMemoryAck', migrationId: frame.migrationId, seq: frame.seq } as const : stateFailed(frame.migrationId, r, conn),
          { type: 'MigrationStateFailed', migrationId: frame.migrationId, reason: 'no such migration in progress' } as const),
      DirtyObjects: (frame, conn) => {
        const at = performance.now();
        return step(frame.migrationId, (reply) => ({ type: 'DIRTY_OBJECTS', frame, reply }), (r) =>
          r.ok && frame.boot === true ? { type: 'BootReady', migrationId: frame.migrationId, bootMs: performance.now() - at } as const
            : r.ok ? { type: 'MigrationStateSuccess', migrationId: frame.migrationId, round: frame.round } as const
            : r.instantiation ? { type: 'ManagedObjectInstantiationError', migrationId: frame.migrationId, reason: fail(r) } as const
            : stateFailed(frame.migrationId, r, conn),
          { type: 'MigrationStateFailed', migrationId: frame.migrationId, reason: 'no such migration in progress' } as const);
      },
      MigrationComplete: (frame, conn) => {
        this.receivers.get(frame.migrationId)?.sourceSent(frame.memoryBytes);
        return step(frame.migrationId, (reply) => ({ type: 'MIGRATION_COMPLETE', frame, reply }), (r) =>
          r.ok ? { type: 'MigrationCompleteAck', migrationId: frame.migrationId } as const : stateFailed(frame.migrationId, r, conn),
          { type: 'MigrationStateFailed', migrationId: frame.migrationId, reason: 'no such migration in progress' } as const);
      },
      ForwardedEvents: async (frame) => {
        const events = decodeEvents(frame.events);
        this.assertMoved(frame.migrationId, events);
        // De-duplicated by id, also against batches taken before a restart of either side.
        const ack = await this.forwarding.receive(frame.migrationId, events);
        // Journaled (held while we wait): what the source held is here, so the moved elements' events may flow.
        if (frame.handOver === true) this.handOvers.handedOver(frame.migrationId);
        return ack;
      },
      PageBatch: (frame) => {
        const side = this.receivers.get(frame.migrationId);
        // A probe batch (`<id>.probe`, passed by the guard) is read and refused: the source times it.
        const r = side ? side.receivePages(frame) : { ok: false as const, reason: 'a path probe batch: read, not staged' };
        return { type: 'PageBatchAck', migrationId: frame.migrationId, ok: r.ok, ...(r.ok ? {} : { reason: r.reason }) };
      },
      PrepareIncoming: async (frame) => {
        const side = this.receivers.get(frame.migrationId);
        if (!side) return { type: 'MigrationStateFailed', migrationId: frame.migrationId, reason: 'no such migration in progress' };
        // A pre-warm's copy waits for its command, however long: the machine stops timing the wait for its memory.
        if (frame.prewarm === true) this.live.get(key('target', frame.migrationId))?.actor.send({ type: 'PREWARMING' });
        try {
          const endpoint = await side.prepareIncoming(frame);
          return { type: 'IncomingReady', migrationId: frame.migrationId, endpoint: endpoint.uri, ...(endpoint.disks === undefined ? {} : { disks: endpoint.disks }) };
        } catch (e) {
          return { type: 'MigrationStateFailed', migrationId: frame.migrationId, reason: describeError(e) };
        }
      },
      // Several destinations (issue 13): boot to the last reversible point, then wait for the decision.
      BootIncoming: (frame, conn) => {
        const at = performance.now();
        return step(frame.migrationId, (reply) => ({ type: 'BOOT_INCOMING', frame, reply }), (r) =>
          r.ok ? { type: 'BootReady', migrationId: frame.migrationId, bootMs: performance.now() - at } as const : stateFailed(frame.migrationId, r, conn),
          { type: 'MigrationStateFailed', migrationId: frame.migrationId, reason: 'no such migration in progress' } as const);
      },
      PathOffer: async (frame) => {
        const free = Math.max(0, 1 - (await this.host.hostLoad()));
        const need = frame.paths * this.host.reassemblyCpuPerPath;
        const canReassemble = free >= need;
        return {
          type: 'PathAccept',
          migrationId: frame.migrationId,
          canReassemble,
          cpuFree: free,
          ...(canReassemble ? {} : { reason: `${frame.paths} paths need ${need.toFixed(2)} of the CPU to reassemble, ${free.toFixed(2)} is free on ${this.host.agent}` }),
        };
      },
      UdpHandover: async (frame) => {
        const now = Date.now();
        for (const [id, at] of this.udpAdopted) if (now - at > this.settledForMs) this.udpAdopted.delete(id);
        // One hand-over per migration: each opens sockets, and a repeat would only replace them.
        if (this.udpAdopted.has(frame.migrationId)) throw new ProtocolError(ErrorCodes.MIGRATION_PHASE, `the UDP service of migration ${frame.migrationId} was handed over already`);
        this.udpAdopted.set(frame.migrationId, now);
        try {
          const addr = await this.host.udp.adopt(frame.vm, frame.served, frame.packets);
          return { type: 'UdpHandoverAck', migrationId: frame.migrationId, host: addr.host, port: addr.port };
        } catch (e) {
          this.udpAdopted.delete(frame.migrationId);
          throw e;
        }
      },
      MigrationStatusQuery: (frame) => {
        const row = this.host.journal.get(frame.migrationId, 'target');
        const committed = row?.phase === 'committed' || (row?.outcome === 'completed');
        // Not committed: make sure it never will be, so the answer stays true.
        if (!committed) this.abortTarget(frame.migrationId, 'the source asked for the outcome before the commit');
        return { type: 'MigrationStatus', migrationId: frame.migrationId, committed };
      },
    };
    return guardHandlers(handlers, (frame, conn) => this.check(frame, conn.remoteAgent));
  }

  /** How long after its commit an incoming migration still takes a UdpHandover: the source's grace period, plus a step for a frame in flight when it ends. */
  private get settledForMs(): number {
    return this.o.forwardGraceMs + this.o.stepTimeoutMs;
  }

  /** Checks a peer's frame against the migration it names (frame-guard.ts). */
  private check(frame: GuardedFrame, peer: string): GuardVerdict {
    return checkFrame(frame, { lookup: this.lookup, peer, now: Date.now(), settledForMs: this.settledForMs });
  }

  /** Forwarded events must be for elements the migration moved here, not for anything else this agent manages. */
  private assertMoved(migrationId: string, events: readonly EmbotEvent[]): void {
    const scope = this.host.journal.get(migrationId, 'target')?.notes.scope;
    if (!scope) return;
    const moved = new Set(scope);
    const stray = events.find((e) => !(typeof e === 'object' && e !== null && moved.has(e.elementId)));
    if (stray !== undefined) {
      const what = typeof stray === 'object' && stray !== null ? JSON.stringify(String(stray.elementId)).slice(0, 80) : typeof stray;
      throw new ProtocolError(ErrorCodes.MIGRATION_MISMATCH, `ForwardedEvents for ${what}, which migration ${migrationId} did not move; nothing of the frame was taken`);
    }
  }

  /** Admits one more incoming migration from `peer`, or says which bound it would break. */
  private admitIncoming(peer: string): void {
    const limits = { ...DEFAULT_TARGET_LIMITS, ...this.o.targetLimits };
    let fromPeer = 0;
    let total = 0;
    for (const m of this.live.values()) {
      if (m.role !== 'target') continue;
      total++;
      if (m.peer === peer) fromPeer++;
    }
    if (fromPeer >= limits.perPeer) throw new ProtocolError(ErrorCodes.PEER_LIMIT, `${peer} already has ${fromPeer} migrations in progress to ${this.host.agent} (limit ${limits.perPeer})`);
    if (total >= limits.total) throw new ProtocolError(ErrorCodes.PEER_LIMIT, `${this.host.agent} already receives ${total} migrations (limit ${limits.total})`);
  }

  private startTarget(frame: StartMigration, conn: PeerConnection): Promise<{ type: 'MigrationPermitted'; migrationId: string } | { type: 'MigrationDenied'; migrationId: string; reason: string }> {
    const id = frame.migrationId;
    const source = conn.remoteAgent;
    if (this.live.has(key('target', id)) || this.host.journal.get(id, 'target')) {
      return Promise.resolve({ type: 'MigrationDenied', migrationId: id, reason: 'migration id already used' });
    }
    if (this.closed) return Promise.reject(new ProtocolError(ErrorCodes.AGENT_STOPPED, `${this.host.agent} is stopping`));
    this.admitIncoming(source);
    // Checked before anything is journaled: a frame that cannot be a migration of its VM leaves no trace.
    const root = this.host.objects.deserialize(frame.elements)[0];
    if (root?.id !== `vm:${frame.vm}`) throw new ProtocolError(ErrorCodes.MIGRATION_MISMATCH, `StartMigration of VM ${frame.vm} ships ${root ? `element ${root.id}` : 'no element'} as its root, not vm:${frame.vm}`);
    this.host.journal.begin(id, 'target', frame.vm, source, 'evaluating');
    // The VM comes back while this agent still forwards its events: from now on they are not ours to redirect.
    this.forwarding.reclaim(frame.vm);
    this.targetConns.set(id, conn);
    const side = new TargetSide({
      host: this.host,
      conn,
      stepTimeoutMs: this.o.stepTimeoutMs,
      onProgress: (p) => this.progress(key('target', id), p),
      handOver: this.handOvers,
      discards: this.discards,
      // Memory of the other incoming migrations (this one is not among the receivers yet while it is evaluated).
      reservedMemory: () => {
        let bytes = 0;
        for (const [other, r] of this.receivers) if (other !== id) bytes += r.reservedBytes;
        return bytes;
      },
    });
    this.receivers.set(id, side);
    return new Promise((resolveStart) => {
      const input: TargetInput = {
        migrationId: id,
        vm: frame.vm,
        source,
        timeouts: { stepMs: this.o.stepTimeoutMs, vmMs: this.o.vmTimeoutMs },
        start: frame,
        replyStart: (r) => resolveStart(r.permitted ? { type: 'MigrationPermitted', migrationId: id } : { type: 'MigrationDenied', migrationId: id, reason: r.reason ?? 'denied' }),
        steps: side,
        hooks: {
          journalPhase: (phase) => this.journalPhase('target', id, phase),
          reportProgress: (phase) => this.progress(key('target', id), { phase }),
          probeSource: () => {
            conn.ping({ timeoutMs: this.o.stepTimeoutMs }).catch((e: unknown) => {
              this.live.get(key('target', id))?.actor.send({ type: 'ABORT', reason: `the source did not answer while the pre-warm waited for its command (${describeError(e)})` });
            });
          },
        },
      };
      // One machine for every incoming migration: its steps and hooks come with the input, so no
      // provide() copies the machine per migration (target-machine.ts).
      const machine = createTargetMachine();
      const startedAt = Date.now();
      const actor = createActor(machine, { input });
      const done = new Promise<MigrationSummary>((resolve) => {
        actor.subscribe({
          complete: () => {
            // Stopped by close(): no output; the journal keeps the phase for recover() after the restart.
            if (actor.getSnapshot().output === undefined) return resolve(failedSummary(id, frame.vm, source, this.host.agent, startedAt, 'the agent stopped'));
            const out = actor.getSnapshot().output as { outcome: 'completed' | 'aborted' | 'denied'; reason?: string };
            const s = side.stats;
            const summary = summaryOf({
              migrationId: id, vm: frame.vm, from: source, to: this.host.agent, outcome: out.outcome, ...(out.reason ? { reason: out.reason } : {}),
              totalMs: Date.now() - startedAt, embots: s.embots, events: s.events, modules: frame.modules, modulesShipped: s.modulesShipped, bytes: s.bytes, memoryBytes: s.memoryBytes,
            });
            this.targetConns.delete(id);
            this.receivers.delete(id);
            this.finish('target', id, out.outcome === 'completed' ? 'committed' : out.outcome, summary);
            resolve(summary);
          },
          error: (err) => {
            this.targetConns.delete(id);
            this.receivers.delete(id);
            const summary = failedSummary(id, frame.vm, source, this.host.agent, startedAt, describeError(err));
            this.finish('target', id, 'aborted', summary);
            resolve(summary);
          },
        });
      });
      this.live.set(key('target', id), { id, role: 'target', vm: frame.vm, peer: source, startedAt, phase: 'evaluating', progress: emptyProgress('evaluating'), actor, done });
      withLogContext({ migrationId: id }, () => {
        this.host.logger.info(`migration ${id} of ${frame.vm} from ${source} started (target)`, { vm: frame.vm, peer: source });
        actor.start();
      });
    });
  }

  private abortTarget(id: string, reason: string): void {
    const m = this.live.get(key('target', id));
    if (m && m.actor.getSnapshot().status === 'active') withLogContext({ migrationId: id }, () => m.actor.send({ type: 'ABORT', reason }));
  }

  // ---- journal and progress ----

  private journalPhase(role: 'source' | 'target', id: string, phase: string): void {
    if (this.closed) return;
    // 'committed' is written by the commit transaction itself.
    if (phase === 'committed') return;
    // No id field here: the migration's log context (withLogContext at its start) adds it.
    this.host.logger.debug(`migration ${id} (${role}): ${phase}`);
    this.host.journal.phase(id, role, phase);
    const m = this.live.get(key(role, id));
    if (m) m.row = undefined;
    faultPoint(`${role}:${phase}`);
  }

  private progress(k: string, p: Partial<MigrationProgress>): void {
    const m = this.live.get(k);
    if (!m) return;
    const next = { ...m.progress, ...p };
    const percent = next.phase === 'completed' || next.phase === 'committed' ? 100 : next.memoryTotal > 0 ? Math.min(99, Math.floor((next.memoryBytes / next.memoryTotal) * 100)) : next.percent;
    m.progress = { ...next, percent };
    if (p.phase) m.phase = p.phase;
    if (p.phase !== undefined || m.row === undefined) m.row = this.host.journal.get(m.id, m.role);
    if (m.row) this.emit('progress', this.info(m.row));
  }

  private finish(role: 'source' | 'target', id: string, phase: string, summary: MigrationSummary): void {
    if (this.closed) return;
    this.host.journal.finish(id, role, phase, summary.outcome, summary.reason, summary);
    this.live.delete(key(role, id));
    this.emit('finished', summary);
    this.host.logger.info(`migration ${id} (${role}) of ${summary.vm}: ${summary.outcome}`, { migrationId: id, reason: summary.reason, totalMs: summary.totalMs });
  }
}

function key(role: string, id: string): string {
  return `${role}:${id}`;
}

function emptyProgress(phase: string): MigrationProgress {
  return { phase, bytes: 0, memoryBytes: 0, memoryTotal: 0, percent: 0 };
}

function failedSummary(id: string, vm: string, from: string, to: string, startedAt: number, reason: string): MigrationSummary {
  return summaryOf({ migrationId: id, vm, from, to, outcome: 'aborted', reason, totalMs: Date.now() - startedAt });
}

/** Forwarded events come as a list, or (the remainder of the hold queues) in the hold-queue format. */
function decodeEvents(bytes: Uint8Array): EmbotEvent[] {
  const v = unpack(bytes) as unknown;
  if (Array.isArray(v)) return v as EmbotEvent[];
  const queues = (v as { queues?: unknown } | null)?.queues;
  if (Array.isArray(queues)) return queues.flatMap((q: { events?: unknown }) => (Array.isArray(q?.events) ? (q.events as EmbotEvent[]) : []));
  throw new ProtocolError(ErrorCodes.FRAME_MALFORMED, 'forwarded events must be a list of events');
}

/** A pre-warm's command, ms after its start; null when none came. */
function commandedMs(pw: PrewarmControl, startedAt: number): number | null {
  const at = pw.commandedAt;
  return at === undefined ? null : Math.max(0, at - startedAt);
}
