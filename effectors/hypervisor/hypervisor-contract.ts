import type { PrewarmHold } from './prewarm-gate.ts';
import type { EventEmitter } from 'eventemitter3';
import type { PageBatch, PeerConnection } from '../../core/wire/index.ts';

/**
 * The hypervisor contract every driver (`sim`, `qemu`) fills, asynchronous throughout. The agent,
 * the control API, the hypervisor effector, the sensors and the mobility statecharts call only
 * this; `create-driver.ts` is the one place a driver is chosen.
 *
 * Shaped like xstate's ActorLogic: one interface with the operations every driver has, and what
 * only some drivers can do declared in {@link HypervisorCapabilities} rather than faked by the
 * others. Callers test for a capability (`driver.capabilities.loadKnob?.setLoad(…)`) and get
 * `undefined` where a driver has none.
 */

export type VmState =
  | 'created'
  | 'running'
  /** Not executing but resumable (QMP `stop`, a migration's switchover, a debugger). */
  | 'paused'
  | 'stopped'
  /** Died without being asked to (a killed QEMU, a guest panic, a sim fault). */
  | 'crashed'
  /** Its memory left in a completed migration out; only `remove` is left to do here. */
  | 'migrated';

export interface VmInfo {
  readonly name: string;
  readonly state: VmState;
  /** RAM in bytes. */
  readonly memory: number;
  readonly vcpus: number;
  /** Milliseconds since the epoch of the last start, while running or paused. */
  readonly startedAt?: number;
  readonly crashes: number;
  /**
   * Arriving in a migration, not committed yet: not started, stopped or removed by hand. A driver
   * whose incoming VM is a process already (qemu's held incoming QEMU) lists it with this set; the
   * sim lists it only once committed.
   */
  readonly incoming?: boolean;
}

export interface VmStats {
  readonly name: string;
  readonly state: VmState;
  /** Bytes of RAM: what a migration has to move at most. */
  readonly memory: number;
  /** 0..1 CPU load of the VM (all its vCPUs). */
  readonly load: number;
  /** Bytes/s the guest writes to distinct pages, as last measured; undefined before any measurement. */
  readonly dirtyRate: number | undefined;
  readonly pageSize: number;
}

export type VmStateChange = {
  readonly name: string;
  readonly from: VmState | null;
  readonly to: VmState;
  /** Why: `start`, `stop`, `kill`, `guest-shutdown`, `guest-panicked`, `process-died`, `migrated`, `reattach`, … */
  readonly reason: string;
};

export interface HypervisorEvents {
  /** A VM changed state, whoever caused it (the driver, the guest, a crash). */
  'vm-state': (e: VmStateChange) => void;
  'vm-removed': (e: { readonly name: string }) => void;
  /** A raw hypervisor event for a VM (a QMP event for qemu), for sensors that want more than states. */
  'vm-event': (e: { readonly name: string; readonly event: string; readonly data: Readonly<Record<string, unknown>> }) => void;
}

/** Where a migration target listens for the VM's memory stream. */
export interface MigrationEndpoint {
  /** `tcp:HOST:PORT` for qemu; the data-plane URL for the sim. */
  readonly uri: string;
  /** The target's NBD export of the VM's image disks (qemu, {@link HypervisorCapabilities.diskMirror}): the source mirrors them there. */
  readonly disks?: MigrationDiskExport;
}

/** Where the source mirrors a VM's disks (qemu's NBD server at the target, one export per disk). */
export interface MigrationDiskExport {
  readonly host: string;
  readonly port: number;
  readonly exports: readonly { readonly device: string; readonly exportName: string }[];
}

/** The driver carries a VM's image disks in its own migrations (no shared storage): the target exports, the source mirrors. */
export interface DiskMirrorCapability {
  readonly sync: 'top';
}

export type MigrationPhase = 'setup' | 'precopy' | 'pre-switchover' | 'stop-and-copy' | 'completed' | 'cancelled' | 'failed';

/** One progress report of a migration out; the same display and `--json` summary for every driver. */
export interface MigrationProgress {
  readonly phase: MigrationPhase;
  /** Dirty-sync rounds so far (1 = the full copy). */
  readonly rounds: number;
  /** The memory brought up to date so far, re-sends included: what a progress bar of the VM's size shows. */
  readonly transferredBytes: number;
  /**
   * Bytes of memory put on the wire, where the driver tells them apart from `transferredBytes` (sim:
   * its zero pages go as indexes, so a fresh VM's transfer is mostly not sent); absent, the same.
   * What a copy that ended early counts as sent, as a completed one counts its result's `bytes`.
   */
  readonly sentBytes?: number;
  readonly remainingBytes: number;
  /** Send rate, bytes/s. */
  readonly rateBytesPerSec: number;
  /** Guest dirty rate during the last round, bytes/s. */
  readonly dirtyRateBytesPerSec: number;
  /** Downtime if the VM stopped now, ms. */
  readonly expectedDowntimeMs: number;
  /** 0..1 CPU throttle applied by auto-converge. */
  readonly throttle: number;
  readonly channels: number;
}

export interface MigrateOutOptions {
  readonly endpoint: MigrationEndpoint;
  /** The target agent's name: a driver whose stream authenticates its peer (qemu over TLS) checks the target's certificate names it. */
  readonly targetName?: string;
  /** Parallel streams (the planner's paths; QEMU multifd channels). Default 1. */
  readonly channels?: number;
  /** Stop-and-copy starts once the expected downtime fits this. */
  readonly downtimeLimitMs?: number;
  /** Bytes/s cap on the memory stream; undefined = no cap. */
  readonly maxBandwidth?: number;
  /** Throttle the guest's vCPUs when rounds do not converge. */
  readonly autoConverge?: boolean;
  /** The migration must reach its switchover within this long, else it is cancelled (MIGRATION_NOT_CONVERGED). */
  readonly timeBudgetMs?: number;
  /** Aborts the migration: the source VM keeps running, the call rejects with MIGRATION_ABORTED. */
  readonly signal?: AbortSignal;
  readonly onProgress?: (p: MigrationProgress) => void;
  /**
   * Called once while the VM is paused at the switch, before its last state moves: the place for
   * the management hand-over's final dirty-object round. A rejection cancels the migration.
   * The sim calls it right before it stops the VM for the stop-and-copy round.
   */
  readonly beforeSwitchover?: () => Promise<void>;
  /**
   * For drivers whose memory travels over the agent's own data paths (the sim): the planner's
   * paths, already open to the target. Drivers with a stream of their own (qemu) ignore it and
   * use `channels` and `endpoint`.
   */
  readonly dataPaths?: DataPaths;
  /**
   * A pre-warm (README "Several destinations"): while held the copy keeps re-sending dirtied pages
   * without stopping the VM; lifted, it converges and switches as usual. The sim honours it; a
   * driver that does not must not be given one (the coordinator checks `fanOut.prewarm`).
   */
  readonly prewarm?: PrewarmHold;
}

/** One data path of the agent: an authenticated peer connection of its own, maybe capped. */
export interface MigrationPath {
  readonly name: string;
  readonly conn: PeerConnection;
  /** Bandwidth cap in bytes/s (a token bucket standing in for a NIC's speed). */
  readonly capBytesPerSec?: number;
}

export interface DataPaths {
  /** Frames on the paths carry it; the target routes them to its incoming VM by it. */
  readonly migrationId: string;
  readonly paths: readonly MigrationPath[];
  /** Pre-copy rounds in all, the final one included. */
  readonly maxRounds?: number;
  /** Timeout of one batch's acknowledgement; a path that times out counts as failed. */
  readonly requestTimeoutMs?: number;
}

/** What a completed migration moved. */
export interface MigrateOutResult {
  readonly bytes: number;
  /** Bytes of memory sent as zero-page indexes only, not in `bytes` (sim: the full round's all-zero pages). */
  readonly zeroBytes?: number;
  readonly rounds: number;
  readonly totalMs: number;
  /** Time the VM did not run, as the hypervisor measured it. */
  readonly downtimeMs: number;
  /** Bytes sent with the VM stopped (sim: the final round's pages; qemu: from pre-switchover to completed, device state included). */
  readonly stopBytes?: number;
  readonly expectedDowntimeMs: number;
  readonly throttled: boolean;
  /** Highest 0..1 throttle auto-converge applied. */
  readonly maxThrottle: number;
  readonly channels: number;
  /**
   * How the memory reached this destination (qemu): QEMU's own stream straight to its incoming QEMU
   * (`direct`: one destination, a fan-out with one left included), or through the source agent's
   * stream relay (`relay`: a fan-out to several). Absent: the driver does not say (the sim).
   */
  readonly transport?: MigrationTransport;
  /** Through the relay: how long in all the stream waited for this destination, its queue over the relay's bound (absent: it kept up). */
  readonly relayHeldMs?: number;
  // What a driver with its own pre-copy (the sim) reports besides; the summary shows them when present.
  /** The expected downtime fitted the limit (false: stopped because of the round limit). */
  readonly converged?: boolean;
  readonly throttleSteps?: number;
  /** Dirty rate before the migration and when the VM stopped, bytes/s. */
  readonly initialDirtyRate?: number;
  readonly finalDirtyRate?: number;
  /** Batches sent again after a refusal or a failed path. */
  readonly resent?: number;
  /** Send rate at the end, bytes/s. */
  readonly rateBytesPerSec?: number;
  readonly perPath?: readonly { readonly name: string; readonly bytes: number; readonly batches: number; readonly failed: boolean }[];
  /** qemu, a VM with image disks ({@link DiskMirrorCapability}): what the disk mirror carried beside the memory. */
  readonly diskMirror?: MigrationDiskMirrorStats;
}

export type MigrationTransport = 'direct' | 'relay';

export interface MigrationDiskMirrorStats {
  readonly disks: number;
  /** Bytes the mirror jobs copied: the overlay's blocks and the writes during the move, never the base image's. */
  readonly bytes: number;
  /** From the first job's start to every job READY (before any memory moved). */
  readonly readyMs: number;
  /** Ending the jobs at the switch, the VM paused (part of the downtime). */
  readonly finishMs: number;
}

/** Optional: the sim's knob for a VM's CPU load. */
export interface LoadKnob {
  setLoad(vm: string, load: number): Promise<void>;
}

/** Optional: a checksum of a VM's whole memory, to compare source and target (sim). */
export interface MemoryChecksum {
  checksum(vm: string): Promise<string>;
}

/** Optional: a UDP service inside the VM that the seed-002 relay can front (sim). */
export interface UdpServiceCapability {
  udpPort(vm: string): number | undefined;
}

/** Optional: raw guest physical memory (qemu: QMP `pmemsave`); for integrity checks. */
export interface MemoryDump {
  /** Bytes [address, address + length) of a VM that is paused or not running. */
  dump(vm: string, address: number, length: number): Promise<Uint8Array>;
}

/** Optional: an injected fault, for watchdog tests and demos (sim: a simulated fault; qemu: kill -9 not asked for by the driver). */
export interface FaultInjection {
  /** The VM ends up `crashed`, exactly as if it had died by itself. */
  crash(vm: string): Promise<VmInfo>;
}

/** The answer to one PageBatch: staged, or refused with the reason (the source re-sends it). */
export type PageApplyResult = { readonly ok: true } | { readonly ok: false; readonly reason: string };

/**
 * Optional: an incoming VM whose memory arrives as PageBatch frames on the agent's data paths
 * (sim). The agent routes each batch of a migration to the VM `prepareIncoming` readied.
 */
export interface IncomingPages {
  apply(vm: string, batch: PageBatch): PageApplyResult;
  /** The final batch of the incoming VM arrived (its memory is complete). */
  complete(vm: string): boolean;
}

/**
 * Optional: what a driver with a memory stream of its own (qemu) knows of it, for the planner's
 * estimate (`withDriverHints` in core/mobility/migration-estimate.ts). Drivers whose memory
 * crosses the agent's data paths (the sim) have none: the path probe measures their stream.
 */
export interface MigrationModel {
  /** Cheap: figures already known (a prior migration's calibration, a past measurement); never moves memory. */
  estimateHints(vm: string, options?: { readonly channels?: number }): Promise<DriverEstimateHints>;
  /**
   * After a completed migration out of `vm`: the caller's time from migrateOut until the target
   * ran the VM, its own hand-over at the switch left out. The driver calibrates on it when its own
   * clock ends early (qemu multifd). False when the driver kept nothing of that migration.
   * @throws EffectorError EFFECTOR_ARGS_INVALID for a time that is not a positive number.
   */
  recordEndToEnd(vm: string, endToEndMs: number): boolean;
}

/** Upper bound of a zero page's relative cost: a fit beyond it is taken as noise, not as a zero page's cost. */
export const MAX_ZERO_PAGE_COST = 10;

/** What a driver knows that makes the migration-time estimate fit its own stream (core/mobility/migration-estimate.ts `withDriverHints`). */
export interface DriverEstimateHints {
  /** Bytes of the VM's memory that are not zero pages, as last measured; undefined = unknown (all). */
  readonly nonZeroBytes?: number;
  /** Bytes/s the driver's own stream carried with the planned channels, as last measured; undefined = not calibrated. */
  readonly copyRateBytesPerSec?: number;
  /** One-time cost of a migration besides its rounds, ms (the estimate's `fixedMs`). */
  readonly fixedMs?: number;
  /** Time to skip a zero page as a share of sending a full page (the estimate's `zeroPageCost`), 0..{@link MAX_ZERO_PAGE_COST}. */
  readonly zeroPageCost?: number;
  /** Where the figures come from (`calibrated from the migration of web-1 at …`), for the plan's decision text. */
  readonly source: string;
}

/**
 * Optional: one VM's memory to several destinations at once (issue 13, README "Several
 * destinations"; the sim): one copy per destination, each with its own dirty log, the VM stopped once.
 */
export interface FanOutMemory {
  begin(vm: string, destinations: readonly string[]): FanOutSession;
  /** Its copies honour `MigrateOutOptions.prewarm` (the sim); absent: a pre-warm is refused. */
  readonly prewarm?: boolean;
}

export interface FanOutSession {
  /**
   * One destination's copy, options as for `migrateOut`. The first destination whose remainder fits
   * the downtime limit stops the VM (after its `beforeSwitchover`); the others finish from the stopped
   * VM at their own pace. A failure or abort of one leaves the VM as it is: whoever owns the
   * decision restarts it.
   */
  migrateOut(destination: string, options: MigrateOutOptions): Promise<MigrateOutResult>;
  /**
   * Optional: `destination`'s child ended (whether or not it called migrateOut). A driver with one
   * stream for the whole set (qemu) waits for every destination before it starts it; one that was
   * denied, refused or failed before its copy will never call, so the stream need not wait for it.
   */
  withdraw?(destination: string): void;
  /** Every copy ended: throttling is undone. */
  close(): void;
}

/**
 * Optional: an incoming VM taken to its last reversible point before its commit (issue 13, README
 * "Several destinations", step 2; qemu). For a driver with a stream of its own: the stream is
 * complete, the VM is held not running (qemu: paused by -S) and its disks are not activated
 * (late-block-activate), so abortIncoming still throws it away and the source can take its VM back.
 * (A driver whose memory rides the data paths, the sim, has `incomingPages.complete` instead.)
 */
export interface IncomingBoot {
  /**
   * Resolves once `vm`'s incoming memory is all in and the VM is held at that point.
   * @throws EffectorError MIGRATION_FAILED when the stream broke or the VM is not held (already runs),
   *   VM_BAD_STATE for a VM that is not incoming, VM_UNKNOWN for none.
   */
  bootIncoming(vm: string, options?: { readonly timeoutMs?: number }): Promise<IncomingBootResult>;
}

export interface IncomingBootResult {
  /** When the incoming stream completed (epoch ms; the driver's own observation). */
  readonly readyAt: number;
  /** How long the call waited for it, ms (0 when it was ready already). */
  readonly waitedMs: number;
}

/**
 * The driver migrates a VM that does not run: its memory as it was left, and it does not run at
 * the target either (the sim). Without it only a running VM migrates (QEMU's migration needs the
 * guest's QEMU running), and a migration of any other is refused before anything starts.
 */
export interface ColdMigration {
  /** States besides `running` a VM may migrate from. */
  readonly from: readonly VmState[];
}

export interface HypervisorCapabilities {
  readonly coldMigration?: ColdMigration;
  readonly fanOut?: FanOutMemory;
  readonly incomingBoot?: IncomingBoot;
  readonly faults?: FaultInjection;
  readonly migrationModel?: MigrationModel;
  readonly incomingPages?: IncomingPages;
  readonly loadKnob?: LoadKnob;
  readonly memoryChecksum?: MemoryChecksum;
  readonly udpService?: UdpServiceCapability;
  readonly memoryDump?: MemoryDump;
  readonly diskMirror?: DiskMirrorCapability;
}

/** How a target readies an incoming VM ({@link HypervisorDriver.prepareIncoming}). */
export interface IncomingOptions {
  readonly channels?: number;
  /** The source agent (a driver whose stream checks its peer admits only its certificate). */
  readonly sourceName?: string;
  readonly prewarm?: boolean;
}

export interface HypervisorDriver<Spec extends { readonly name: string } = { readonly name: string }> {
  readonly name: string;
  readonly capabilities: HypervisorCapabilities;
  readonly events: EventEmitter<HypervisorEvents>;

  // lifecycle
  create(spec: Spec): Promise<VmInfo>;
  start(vm: string): Promise<VmInfo>;
  /** Orderly stop (the guest may be asked first); the VM can be started again. */
  stop(vm: string): Promise<VmInfo>;
  /** Immediate stop (kill -9 of a QEMU); state `stopped`, reason `kill`. */
  kill(vm: string): Promise<VmInfo>;
  /** Forgets a VM that does not run (stopped, crashed, created or migrated), with its state. */
  remove(vm: string): Promise<void>;

  // inspection
  list(): readonly VmInfo[];
  get(vm: string): VmInfo | undefined;
  spec(vm: string): Spec | undefined;
  stats(vm: string): Promise<VmStats>;

  // persistence (ActorLogic naming): the agent stores the first and hands it to the second after a restart.
  getPersistedState(): unknown;
  /** Takes the VMs back, re-attaching to those still running (never a duplicate start). */
  restoreState(state: unknown): Promise<void>;

  // migration, source side
  migrateOut(vm: string, options: MigrateOutOptions): Promise<MigrateOutResult>;
  // migration, target side
  /**
   * Readies a VM of `spec` to receive a migration; `channels` must match the source's. `prewarm`:
   * the copy is a pre-warm's, whose switch waits for a command, so readying may take longer now to
   * keep work off the switch (qemu faults the guest RAM in: its first touch during the stop made
   * the downtime 3-5x; the sim has nothing to do).
   */
  prepareIncoming(spec: Spec, options?: IncomingOptions): Promise<{ readonly endpoint: MigrationEndpoint }>;
  /**
   * After the source finished: waits for the VM to run here and makes it a VM like any other.
   * `running` says whether it ran at the source: a driver whose incoming VM does not start by
   * itself (the sim) starts it then. The sim does all of it before its first await, so a caller
   * inside a store transaction has the VM in the same transaction.
   */
  commitIncoming(vm: string, options?: { readonly timeoutMs?: number; readonly running?: boolean }): Promise<VmInfo>;
  /** Throws away an incoming VM (its process is killed, its state removed). */
  abortIncoming(vm: string): Promise<void>;

  /** Lets go of every VM without stopping it (VMs outlive the agent). */
  close(): Promise<void>;
}
