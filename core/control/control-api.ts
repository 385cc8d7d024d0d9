import type { EmbotEvent, EmbotEventInput } from '../events.ts';
import type { VmInfo as DriverVmInfo } from '../../effectors/index.ts';
import type { MigrationInfo, MigrationProgress, MigrationSummary, PhaseTime } from '../mobility/migration-record.ts';
import type { Destinations } from '../mobility/destinations.ts';
import type { BuildJob, ImagesReport, PlacementPolicy, PlacementReport } from '../../images/index.ts';

export type { Destinations };

export type { EmbotEvent, EmbotEventInput, MigrationInfo, MigrationProgress, MigrationSummary, PhaseTime };

/**
 * The `201` answer to `POST /v1/events`: the event as journaled. `duplicate`: its id was taken before (README "Events:
 * idempotent posts"), nothing was taken now and `ts` is the first copy's. `forwardedTo`: the element moved away; the
 * event goes on to that agent.
 */
export interface EmittedEvent extends EmbotEvent {
  readonly duplicate?: true;
  readonly forwardedTo?: string;
}

/** A VM as the control API shows it: what every driver tells, and the sim's spec fields when it runs the sim. */
export interface VmInfo extends DriverVmInfo {
  /** bytes/s (sim) */
  readonly dirtyRate?: number;
  /** The VM's UDP service port (sim). */
  readonly udpPort?: number;
}

/** What `GET /v1/status` returns. */
export interface AgentStatus {
  readonly name: string;
  /** embot package version. */
  readonly version: string;
  readonly pid: number;
  /** ms since epoch. */
  readonly startedAt: number;
  readonly uptimeMs: number;
  readonly driver: string;
  readonly safe: boolean;
  readonly dataDir: string;
  readonly pluginsDir: string;
  readonly control: { readonly host: string; readonly port: number };
  readonly counts: {
    readonly vms: number;
    readonly elements: number;
    readonly embots: number;
    readonly quarantinedEmbots: number;
    readonly modules: number;
    readonly modulesWithErrors: number;
    readonly queuedEvents: number;
    readonly heldEvents: number;
    /** Events waiting for an embot's module to load (safe mode, a module not in the plugins folder). */
    readonly parkedEvents: number;
    readonly deadLetters: number;
  };
  /** Configured peer names, in config order, and the `topology` if any (README "Where destinations are"); absent on a control double. */
  readonly destinations?: {
    readonly peers: readonly string[];
    readonly topology?: { readonly nodes: readonly string[]; readonly links: readonly (readonly [string, string])[] };
  };
  /** Where the peers come from (README "Fleet directory (etcd)"): kind, connection state, each peer with its source; absent on a control double. */
  readonly directory?: DirectoryStatus;
}

import type { DirectoryStatus } from '../peers/peer-directory.ts';

// Embots are described by the runtime that runs them; the API shows them as they are.
import type { DeadLetter, EmbotInfo } from '../../embots/index.ts';
export type { DeadLetter, EmbotInfo, EmbotStatus, PolicyView as PolicyInfo } from '../../embots/index.ts';

export type PluginStatus = 'loaded' | 'error' | 'disabled' | 'quarantined' | 'unloaded';

export interface PluginInfo {
  readonly name: string;
  readonly version: string;
  readonly hash: string;
  readonly status: PluginStatus;
  readonly error?: string;
  readonly restarts: number;
  readonly embotTypes: readonly string[];
  readonly dir: string;
}

/** Body of `POST /v1/vms`; omitted fields take the driver's defaults. */
export interface CreateVmRequest {
  readonly name: string;
  /** bytes */
  readonly memory?: number;
  /** bytes per second */
  readonly dirtyRate?: number;
  readonly vcpus?: number;
  /** sim only */
  readonly udpPort?: number;
  /** qemu: a disk image (raw or qcow2), attached as the VM's disk. */
  readonly image?: string;
  /** qemu: a raw image to boot from (default: the embot test guest). */
  readonly boot?: string;
}

export interface VmChecksum {
  readonly name: string;
  readonly state: string;
  readonly memory: number;
  readonly sha256: string;
}

/** `POST /v1/vms/:name/<action>`. `kill`: immediate stop (kill -9 of a QEMU), state `stopped`, reason `kill`. */
export type VmAction = 'start' | 'stop' | 'crash' | 'kill';
export const VM_ACTIONS: readonly VmAction[] = ['start', 'stop', 'crash', 'kill'];

/** `DELETE /v1/vms/:name[?force=1]`: what `removeVm` takes. */
export interface RemoveVmOptions {
  /** A running (or paused) VM is killed first; without it such a VM is refused (VM_BAD_STATE). */
  readonly force?: boolean;
}

/** What `DELETE /v1/vms/:name` answers (200). */
export interface RemovedVm {
  readonly name: string;
  readonly removed: true;
  /** The state it had when asked. */
  readonly was: DriverVmInfo['state'];
  /** `--force` killed it first. */
  readonly killed: boolean;
  /** Embots of the VM and its dependents that were ended (their snapshots deleted). */
  readonly embots: number;
  /** Its events still queued or held that were discarded. */
  readonly events: number;
}

/** Body of `POST /v1/vms/:name/load`: the CPU load (0..1) the sim VM reports while running. */
export interface SetVmLoadRequest {
  readonly load: number;
}

/** Body of `POST /v1/migrations`: move VM `vm` and its management to the peer named `to`. */
export interface StartMigrationRequest {
  readonly vm: string;
  /**
   * Peer name as configured on the agent (`--peers b=ws://…`), or several (first to boot wins,
   * issue 13; refused with MULTI_DESTINATION_UNSUPPORTED until the fan-out runs).
   */
  readonly to?: Destinations;
  readonly thresholdMs?: number;
  /** Several destinations: tries of the same set after the first while none boots (0..5). */
  readonly retries?: number;
  /** Several destinations: hosts tried once after the retries when none of the set booted. */
  readonly fallback?: readonly string[];
}

/** What `migrate` takes besides the VM and its destinations (the request body's other fields). */
export type MigrateOptions = Omit<StartMigrationRequest, 'vm' | 'to'>;

/** What `POST /v1/migrations` answers (202): the migration runs on; follow it by id. */
export interface StartMigrationResponse {
  readonly id: string;
}

/** Error body of every failed control request. */
export interface ControlErrorBody {
  readonly error: { readonly code: string; readonly message: string; readonly details?: Readonly<Record<string, unknown>> };
}

/**
 * What the agent exposes to the control API (and so to the CLI). Methods throw `EmbotError`s
 * with stable codes; the server maps them to HTTP statuses.
 */
export interface AgentControl {
  status(): AgentStatus;
  listVms(): readonly VmInfo[];
  createVm(spec: CreateVmRequest): Promise<VmInfo>;
  /** `crash` needs the driver's `faults` capability (else `DRIVER_UNSUPPORTED`). */
  vmAction(name: string, action: VmAction): Promise<VmInfo>;
  /**
   * Forgets VM `name` with its driver state (qemu: its process, overlay and QMP socket dir), ends
   * its embots (snapshots deleted) and discards its queued and held events; nothing else is
   * touched. Throws `VM_UNKNOWN`; `VM_BAD_STATE` (HTTP 409) for a running or paused VM without
   * `force` (the message names `vm stop` / `vm kill`) and for a VM in a migration or pre-warm
   * (either side; `details.problem` says which). Absent on a control double without it.
   */
  removeVm?(name: string, options?: RemoveVmOptions): Promise<RemovedVm>;
  /**
   * Sets the CPU load (0..1) VM `name` reports while running (the driver's `loadKnob`, the sim's);
   * the host sensor's `HOST_LOAD` readings follow it. Throws `VM_UNKNOWN`, `VM_SPEC_INVALID` or
   * `DRIVER_UNSUPPORTED` (HTTP 501) on a driver without the capability.
   */
  setVmLoad(name: string, load: number): Promise<VmInfo>;
  /**
   * sha256 of the VM's memory (to check a migration moved it byte-exact; stop the VM first for a
   * stable value). Needs the driver's `memoryChecksum` capability, else `DRIVER_UNSUPPORTED`.
   */
  vmChecksum(name: string): Promise<VmChecksum>;
  listEmbots(): readonly EmbotInfo[];
  listPlugins(): readonly PluginInfo[];
  /** Resolves once the event is journaled. */
  emitEvent(input: EmbotEventInput): Promise<EmittedEvent>;
  /** Recent processed events, newest last. */
  listEvents(opts: { readonly limit: number }): readonly EmbotEvent[];
  /** The newest dead letters (events an embot could not take, with why), newest last. */
  listDeadLetters(opts: { readonly limit: number }): readonly DeadLetter[];
  /**
   * Starts moving VM `vm` and its management to peer `to`; returns at once with the migration id.
   * Throws `PEER_UNKNOWN`, `VM_UNKNOWN`, `VM_BAD_STATE` (already migrating) or `CONFIG_INVALID`
   * (no cluster secret). A list `to` is checked whole first (`DESTINATIONS_INVALID`); a list of
   * one is the single path; more (or retries, or a fallback) run the fan-out, first to boot wins, or
   * throw `MULTI_DESTINATION_UNSUPPORTED` with a driver that lacks the fanOut capability.
   */
  migrate(vm: string, to: Destinations | undefined, options?: MigrateOptions): { readonly id: string };
  /**
   * Starts a pre-warm of `vm` to `to` (README "Several destinations"): copies until `migrate(vm,
   * [to])` (the command, the pre-warm's id) or `cancelPrewarm(vm)`. Absent on a control double without it.
   */
  prewarm?(vm: string, to: readonly string[], options?: MigrateOptions): { readonly id: string };
  /** Cancels the pre-warm of `vm` (VM_BAD_STATE if there is none); every destination discards. */
  cancelPrewarm?(vm: string): { readonly id: string };
  /** Running and past migrations this agent took part in (as source or target). */
  listMigrations(): readonly MigrationInfo[];
  getMigration(id: string): MigrationInfo | undefined;
  /** Resolves once migration `id` has ended (at once for a finished one); undefined for an unknown id. */
  waitMigration(id: string): Promise<MigrationSummary | undefined>;
  /** Images and placement (issue 14); absent on a control double without them. */
  readonly images?: ImagesControl;
}

/** Images and placement as the control API reaches them (images/image-service.ts ImageService). */
export interface ImagesControl {
  report(): ImagesReport;
  /** Throws `IMAGE_INVALID` for a bad name; the build itself runs on and is polled with getBuild. */
  startBuild(image: string, on: string): { readonly id: string };
  getBuild(id: string): BuildJob | undefined;
  /** Ranks `candidates` (default: the index group's members but this agent); throws `IMAGE_UNKNOWN`, `PLACEMENT_INPUT_INVALID`. */
  place(image: string, candidates: readonly string[] | undefined, policy: PlacementPolicy): Promise<PlacementReport>;
  /** The image VM `vm` was created with. */
  vmImage(vm: string): string | undefined;
}

/** Largest accepted request body. */
export const MAX_BODY_BYTES = 1024 * 1024;
export const DEFAULT_EVENTS_LIMIT = 50;
export const MAX_EVENTS_LIMIT = 10_000;
/** How long `GET /v1/migrations/:id?wait=1` waits when no `timeoutMs` is given. */
export const DEFAULT_MIGRATION_WAIT_MS = 10 * 60_000;
/** Longest accepted `timeoutMs` of a migration wait. */
export const MAX_MIGRATION_WAIT_MS = 60 * 60_000;
