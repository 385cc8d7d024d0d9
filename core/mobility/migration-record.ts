import type { MigrationOutcome } from './mobility-contract.ts';
import type { MigrationRole } from './migration-journal.ts';
import type { PrewarmInfo } from './prewarm.ts';

/** Live progress of a migration, for `embot migrate` and `embot migrations`. */
export interface MigrationProgress {
  readonly phase: string;
  /** Bytes sent (source) or received (target) so far: management state, events, memory. */
  readonly bytes: number;
  readonly memoryBytes: number;
  readonly memoryTotal: number;
  /** 0..100, by memory copied; 100 once completed. */
  readonly percent: number;
  /** Pre-copy: current round, dirty bytes left, send and dirty rates, expected downtime. */
  readonly round?: number;
  readonly remainingBytes?: number;
  readonly rateBytesPerSec?: number;
  readonly dirtyRateBytesPerSec?: number;
  readonly expectedDowntimeMs?: number;
  /**
   * Source side: where the driver's copy of the VM's memory is (setup, precopy, pre-switchover: the VM paused
   * for the hand-over, stop-and-copy: the rest going with the VM stopped, completed: the figures are final).
   * In stop-and-copy the figures are those at the stop: QEMU may report nothing more until it completes.
   */
  readonly copyPhase?: string;
  /** When the copy entered `copyPhase`, ms since epoch. */
  readonly copyPhaseSince?: number;
  /**
   * A migration to several destinations: the figures are those of this destination's copy, the one
   * furthest along (the record of the whole has no copy of its own; each child's record has its own).
   */
  readonly leading?: string;
}

/** What the path planner decided (seed 000): the estimate beside the threshold, and why each path was or was not added. */
export interface MigrationPlanSummary {
  readonly estimateMs: number;
  readonly thresholdMs: number;
  readonly thresholdFrom: string;
  readonly paths: readonly string[];
  readonly decisions: readonly string[];
}

/** The steps of the source's migratingVm phase, in ms: the fixed cost of a small migration is here. */
export interface MigrationVmSteps {
  /** Driver stats, path set-up, bandwidth probe (if any) and the planner's decisions. */
  readonly planMs: number;
  /** PrepareIncoming → IncomingReady: the target readies the incoming VM. */
  readonly prepareMs: number;
  /** The driver's migrateOut: pre-copy rounds and the stop-and-copy. */
  readonly moveMs: number;
  /** The control link's VmMemory → VmMemoryAck after the copy. */
  readonly ackMs: number;
  /** Where the downtime went: each step's end, ms after the VM stopped (absent: the VM never stopped). */
  readonly afterStop?: MigrationStopMarks;
}

/**
 * Marks of the offline phase, ms after the stop (0.1 ms), to compare a pre-warmed switch with a
 * cold one step by step (issue 13 point 3). A step that did not happen is absent.
 */
export interface MigrationStopMarks {
  /** A pre-warm's migrate command, before the stop (so negative). */
  readonly command?: number;
  /** A pre-warm's hold lifted (negative: before the stop). */
  readonly lift?: number;
  /** The driver's copy ended (sim: the final batch acknowledged; qemu: QEMU completed). */
  readonly copyEnd?: number;
  /** VmMemory acknowledged by the target. */
  readonly memoryAck?: number;
  /** The final DirtyObjects frame built (its deltas, held events and embots packed), about to go. */
  readonly finalRoundOut?: number;
  /** The final DirtyObjects round acknowledged (its events, the embots a pre-warm froze at its command). */
  readonly finalRound?: number;
  /** A fan-out child's decision arrived (it won). */
  readonly decision?: number;
  /** MigrationCompleteAck: the target committed (the downtime's end). */
  readonly complete?: number;
}

/** Time spent in one phase. */
export interface PhaseTime {
  readonly phase: string;
  readonly ms: number;
}

/** What a finished migration reports. */
export interface MigrationSummary {
  readonly migrationId: string;
  readonly vm: string;
  readonly from: string;
  readonly to: string;
  readonly outcome: MigrationOutcome;
  readonly reason?: string;
  readonly totalMs: number;
  readonly phases: readonly PhaseTime[];
  readonly embots: number;
  readonly events: number;
  readonly modules: readonly string[];
  readonly modulesShipped: number;
  readonly dirtyRounds: number;
  readonly bytes: number;
  readonly memoryBytes: number;
  /** From stopping the VM at the source to the target's acknowledgement (it runs there by then). */
  readonly downtimeMs: number | null;
  /** Events the source handed to the target after the switch (late ones and those held after the last round). */
  readonly forwarded: number;
  /** Events the source still had for the target when the grace period ended: dead letters (source side; see `embot events dead`). */
  readonly deadLettered?: number;
  /** Pre-copy rounds, the final stop-and-copy included (0 for the target's view). */
  readonly rounds: number;
  /** Data paths the memory crossed on. */
  readonly paths: number;
  readonly estimateMs: number | null;
  readonly thresholdMs: number | null;
  readonly plan?: MigrationPlanSummary;
  readonly precopy?: {
    /** The memory move itself, first batch out to the final ack: what `estimateMs` estimates. */
    readonly copyMs: number;
    readonly copyDowntimeMs: number;
    /** Bytes the copy sent with the VM stopped (MigrateOutResult.stopBytes; absent: the driver does not say). */
    readonly stopBytes?: number;
    /** Memory sent as zero-page indexes only, not in `memoryBytes` (MigrateOutResult.zeroBytes; sim). */
    readonly zeroBytes?: number;
    /** What the hypervisor expected the downtime to be when it stopped the VM (qemu: query-migrate's expected-downtime). */
    readonly expectedDowntimeMs?: number;
    readonly converged: boolean;
    readonly throttled: boolean;
    readonly throttleSteps: number;
    readonly initialDirtyRate: number;
    readonly finalDirtyRate: number;
    readonly resent: number;
    readonly rateBytesPerSec: number;
    readonly perPath: readonly { readonly name: string; readonly bytes: number; readonly batches: number; readonly failed: boolean }[];
    /** qemu: QEMU's stream straight to the target (`direct`) or through the source agent's relay (`relay`: a fan-out to several). */
    readonly transport?: 'direct' | 'relay';
    /** qemu, through the relay: how long the stream waited for this destination, its queue over the relay's bound (absent: it kept up). */
    readonly relayHeldMs?: number;
    /** qemu, a VM with image disks: what the disk mirror carried (issue 14). */
    readonly diskMirror?: { readonly disks: number; readonly bytes: number; readonly readyMs: number; readonly finishMs: number };
  };
  /** Where the source's migratingVm phase went, in ms (source side; absent when the phase did not finish). */
  readonly vmSteps?: MigrationVmSteps;
  /** The VM's UDP service: packets buffered while it was offline and handed to the target. */
  readonly udp?: { readonly handedOver: number; readonly dropped: number; readonly maxBufferedLatencyMs: number };
  // Several destinations (issue 13; source side, the fan-out's own record):
  /** The destination that booted first and owns the VM; null when none did. */
  readonly winner?: string | null;
  /** Every destination of every attempt, in order. */
  readonly destinations?: readonly DestinationReport[];
  /** Attempts after the first (`--retries`, then the `--fallback` set). */
  readonly retries?: number;
  /**
   * A pre-warm: ms from its start to the migrate command (null: never commanded, e.g. cancelled).
   * `totalMs` counts the warm time too; the switch took `totalMs − commandedMs`.
   */
  readonly commandedMs?: number | null;
  /** The VM's image built at the target before anything moved (issue 14; source side; absent: the VM has no image). */
  readonly imageBuild?: MigrationImageBuild;
}

/** What building the VM's image at the target fetched, before the migration moved anything. */
export interface MigrationImageBuild {
  readonly image: string;
  readonly host: string;
  /** The target held the image already: nothing was fetched or written. */
  readonly alreadyThere: boolean;
  readonly bytesFetched: number;
  readonly bytesLocal: number;
  /** source (host or `library`) → bytes fetched from it. */
  readonly bySource: Readonly<Record<string, number>>;
  readonly ms: number;
}

/** How one destination of a migration to several ended. */
export type DestinationOutcomeName = 'won' | 'terminated' | 'bootFailed' | 'denied' | 'failed';

/** One destination of one attempt of a migration to several, as the `--json` summary shows it. */
export interface DestinationReport {
  readonly name: string;
  /** The child migration's id (`<attempt id>~<name>`), as `embot migrations` lists it on both sides. */
  readonly migrationId: string;
  readonly outcome: DestinationOutcomeName;
  readonly reason?: string;
  readonly phases: readonly PhaseTime[];
  /** ms from the attempt's start until its BootReady reached the source; null when it never booted. */
  readonly bootReadyMs: number | null;
  readonly bytes: number;
  /** 0 for the first try, then 1, 2… (retries, then the fallback set). */
  readonly attempt: number;
}

/** One migration as listed by the control API. */
export interface MigrationInfo {
  readonly id: string;
  readonly role: MigrationRole;
  readonly vm: string;
  readonly peer: string;
  readonly phase: string;
  readonly outcome: MigrationOutcome | null;
  readonly reason?: string;
  readonly startedAt: number;
  readonly updatedAt: number;
  readonly progress?: MigrationProgress;
  readonly summary?: MigrationSummary;
  /** A pre-warm's per-destination state, on its source row while it runs (README "Several destinations", Pre-warm). */
  readonly prewarm?: PrewarmInfo;
}

/** A summary with nothing moved yet, completed by what a side knows (`base` wins). */
export function summaryOf(base: Pick<MigrationSummary, 'migrationId' | 'vm' | 'from' | 'to' | 'outcome' | 'totalMs'> & Partial<MigrationSummary>): MigrationSummary {
  return {
    phases: [],
    embots: 0,
    events: 0,
    modules: [],
    modulesShipped: 0,
    dirtyRounds: 0,
    bytes: 0,
    memoryBytes: 0,
    downtimeMs: null,
    forwarded: 0,
    rounds: 0,
    paths: 0,
    estimateMs: null,
    thresholdMs: null,
    ...base,
  };
}
