import type { BootIncoming, DirtyObjects, ManagementEventState, ManagementState, MigrationComplete, StartMigration, VmMemory } from '../wire/frames.ts';

/**
 * The contract between the migration state machines (source-machine.ts, target-machine.ts: the
 * shape of the protocol) and the mobility service (the work each step does). The machines invoke
 * the steps as promise actors by these names; the service provides them with `machine.provide`,
 * and unit tests provide fakes that fail at chosen steps.
 */

/** Phases journaled in SQLite (table `migrations`) as each side enters them. */
export type SourcePhase =
  | 'requesting'
  | 'holding'
  | 'sendingState'
  | 'sendingEvents'
  | 'migratingVm'
  | 'syncingDirty'
  /** Several destinations (fan-out child): BootIncoming sent, waiting for BootReady. */
  | 'booting'
  /** Several destinations (fan-out child): booted, waiting for the coordinator's decision. */
  | 'awaitingDecision'
  | 'completing'
  | 'finishing'
  | 'completed'
  | 'rollingBack'
  | 'aborted'
  | 'denied';

export type TargetPhase = 'evaluating' | 'permitted' | 'stateStaged' | 'eventsStaged' | 'vmReceived' | 'syncing' | 'booted' | 'committing' | 'committed' | 'discarding' | 'aborted' | 'denied';

export type MigrationOutcome = 'completed' | 'aborted' | 'denied';

export interface MigrationTimeouts {
  /** Longest wait for any single reply (source) or for the next request (target). */
  readonly stepMs: number;
  /** Longest wait for the VM memory transfer. */
  readonly vmMs: number;
}

export interface SourceInput {
  readonly migrationId: string;
  readonly vm: string;
  /** Peer name of the target. */
  readonly target: string;
  /** Dirty-object rounds before the final frozen round. */
  readonly maxDirtyRounds: number;
  readonly timeouts: MigrationTimeouts;
  /**
   * This migration's steps (a fan-out child's two more too), where the service passes them with
   * the input rather than with `machine.provide` (which copies the whole machine, ~2 ms of CPU per
   * migration and per fan-out child): one machine per form then serves every migration. Steps
   * given with `provide` take precedence.
   */
  readonly steps?: SourceSteps & Partial<FanOutChildSteps>;
  /** Likewise the machine's actions and guards that are the service's. */
  readonly hooks?: SourceHooks;
}

/** The source machine's actions and guards that the service implements (see source-machine.ts). */
export interface SourceHooks extends PhaseHooks {
  /** Fan-out child: the coordinator's word that this child is its only candidate and ready. */
  readyWithoutBoot?(): void;
  /** Fan-out child: its destination booted with the final round (BootReady in answer to it). */
  bootedWithRound?(): void;
  /** Fan-out child: no other destination can win any more. */
  bootSkipped?(): boolean;
  /** Fan-out child: the coordinator has already chosen this child. */
  alreadyChosen?(): boolean;
  /**
   * Fan-out child of a pre-warm: its copy waits for the migrate command, or the command came less
   * than `vmMs` ago. The copy's time limit then re-arms rather than rolling back, so a pre-warm
   * waits for its command however long, and its copy after the command still gets `vmMs` (at
   * most twice that).
   */
  copyUntimed?(): boolean;
}

/** The fan-out coordinator's word to one child that booted: commit it, or terminate it and why. */
export type FanOutVerdict = { readonly commit: true } | { readonly commit: false; readonly reason: string };

/** The two steps a fan-out child has besides {@link SourceSteps} (README "Several destinations"). */
export interface FanOutChildSteps {
  /** BootIncoming to the destination; resolves with its BootReady's boot time, rejects on its refusal (bootFailed). */
  bootIncoming(input: SourceInput): Promise<{ readonly bootMs: number }>;
  /** Resolves once the coordinator decided about this child (it may have decided before the child asks). */
  awaitDecision(input: SourceInput): Promise<FanOutVerdict>;
}

/** Result of one dirty-objects round: did anything change since the previous round? */
export interface DirtyRoundResult {
  readonly changedElements: number;
  readonly events: number;
  /** The round asked the destination to boot (a fan-out child's final round) and it did. */
  readonly booted?: boolean;
}

/** What migrateVm did besides moving the VM. */
export interface MigrateVmResult {
  /** The final DirtyObjects round, sent at the switch. */
  readonly finalRound?: DirtyRoundResult;
}

/**
 * Steps of the source side, each an xstate `fromPromise` actor. Every step rejects on a timeout,
 * a transport error or a failure reply; the machine then rolls back.
 */
export interface SourceSteps {
  /** StartMigration → resolves `{ permitted: true }` or `{ permitted: false, reason }` (MigrationDenied). */
  startMigration(input: SourceInput): Promise<{ readonly permitted: boolean; readonly reason?: string }>;
  /** Hold the VM element's and its dependents' events (synchronous; from here nothing reaches local embots). */
  holdEvents(input: SourceInput): Promise<void>;
  /** ManagementState (elements + embots with policy snapshots); answers the target's ModuleRequests meanwhile. */
  sendManagementState(input: SourceInput): Promise<void>;
  /** ManagementEventState (the hold queues so far). */
  sendEventState(input: SourceInput): Promise<void>;
  /**
   * Stop-and-copy (or pre-copy) of the VM through the hypervisor driver. Resolves with `finalRound`
   * when the final DirtyObjects round already went at the switch (the VM paused there, everything
   * frozen, while the driver finished its copy): the machine then sends no other round.
   */
  migrateVm(input: SourceInput): Promise<MigrateVmResult>;
  /**
   * One DirtyObjects round (`final`: the last one, sent with everything frozen). `boot` (the service
   * sets it on a racing fan-out child's final round): the destination boots once it applied it and
   * answers BootReady (the result says `booted`); its refusal to boot rejects with an error whose
   * `details.bootRefused` is true.
   */
  sendDirtyObjects(input: SourceInput & { readonly round: number; readonly final: boolean; readonly boot?: boolean }): Promise<DirtyRoundResult>;
  /** MigrationComplete → MigrationCompleteAck. */
  completeMigration(input: SourceInput): Promise<void>;
  /**
   * After `completeMigration` failed or timed out (MigrationComplete may have reached the target):
   * ask the target whether it committed. Rejects when it cannot tell (the machine retries).
   */
  resolveOutcome(input: SourceInput): Promise<'committed' | 'notCommitted'>;
  /** After the ack: drop elements, embots, events and the VM here; start forwarding for the grace period. */
  finishSource(input: SourceInput): Promise<void>;
  /** Abort path: tell the target (best effort), release the hold queues into dispatch, resume the VM. */
  rollBack(input: SourceInput & { readonly reason: string }): Promise<void>;
}

/** Events the source machine accepts from outside (operator cancel). */
export type SourceEvent = { readonly type: 'CANCEL'; readonly reason: string };

export interface TargetInput {
  readonly migrationId: string;
  readonly vm: string;
  /** Peer name of the source. */
  readonly source: string;
  readonly timeouts: MigrationTimeouts;
  /** The StartMigration frame that created this side. */
  readonly start: StartMigration;
  /** Answers the StartMigration request (permitted, or denied with a reason). */
  readonly replyStart: (r: { readonly permitted: boolean; readonly reason?: string }) => void;
  /**
   * This migration's steps, where the service passes them with the input rather than with
   * `machine.provide` (which copies the whole machine, ~2 ms of CPU per incoming migration): one
   * machine then serves every migration. Steps given with `provide` take precedence.
   */
  readonly steps?: TargetSteps;
  /** Likewise the `journalPhase` / `reportProgress` actions. */
  readonly hooks?: TargetHooks;
}

/** The target machine's actions that the service implements (see target-machine.ts). */
export interface TargetHooks extends PhaseHooks {
  /**
   * A pre-warm's copy has waited another `vmMs` for its memory: is the source still there? One that
   * does not answer is aborted (ABORT), so a host that vanished without closing the link (no FIN)
   * does not hold the incoming VM for ever.
   */
  probeSource?(): void;
}

/** What a side's machine tells its service as it enters a journaled phase. */
export interface PhaseHooks {
  journalPhase(phase: string): void;
  reportProgress(phase: string): void;
}

/**
 * How the target answers one request: `ok`, or a failure reply. `instantiation: true` selects
 * `ManagedObjectInstantiationError` (an element, embot or module could not be created here)
 * instead of the step's own failure frame.
 */
/** A target step's answer; a failure names the step (`step`) when a step failed rather than a timeout, an abort or a refusal. */
export type StepReply = (r: { readonly ok: true } | { readonly ok: false; readonly reason: string; readonly instantiation?: boolean; readonly step?: string }) => void;

/**
 * Events the target machine receives: one per request frame from the source, each with the
 * callback that sends its reply, plus ABORT (an Abort frame, or the link closing). A request that
 * arrives out of order is answered with a failure and the migration is discarded.
 */
export type TargetEvent =
  | { readonly type: 'MANAGEMENT_STATE'; readonly frame: ManagementState; readonly reply: StepReply }
  | { readonly type: 'MANAGEMENT_EVENT_STATE'; readonly frame: ManagementEventState; readonly reply: StepReply }
  | { readonly type: 'VM_MEMORY'; readonly frame: VmMemory; readonly reply: StepReply }
  | { readonly type: 'DIRTY_OBJECTS'; readonly frame: DirtyObjects; readonly reply: StepReply }
  | { readonly type: 'MIGRATION_COMPLETE'; readonly frame: MigrationComplete; readonly reply: StepReply }
  /** Several destinations (issue 13): boot to the last reversible point, then wait for MigrationComplete or Abort. */
  | { readonly type: 'BOOT_INCOMING'; readonly frame: BootIncoming; readonly reply: StepReply }
  | { readonly type: 'ABORT'; readonly reason: string }
  /**
   * PrepareIncoming said `prewarm`: the VM's copy waits for the source's command, however long it
   * takes, so waiting for its memory no longer times out (the source's link still bounds it: a
   * closed link discards).
   */
  | { readonly type: 'PREWARMING' };

/** Steps of the target side, each a `fromPromise` actor; a rejection means "reply with failure and discard". */
export interface TargetSteps {
  /** Migration policy: source allowed? enough memory and CPU? Resolves permitted or the reason to deny. */
  evaluate(input: TargetInput): Promise<{ readonly permitted: boolean; readonly reason?: string }>;
  /**
   * Stage elements and embots (fetching missing modules from the source, checking hash and trust);
   * nothing runs yet. Rejects with an error whose `instantiation` is true for a module/element that
   * cannot be created here.
   */
  stageState(input: TargetInput & { readonly frame: ManagementState }): Promise<void>;
  /** Insert the shipped hold queues into local hold queues. */
  stageEvents(input: TargetInput & { readonly frame: ManagementEventState }): Promise<void>;
  /** Accept one VmMemory frame. */
  receiveMemory(input: TargetInput & { readonly frame: VmMemory }): Promise<void>;
  /** Apply a DirtyObjects round: element deltas and events since the last round. */
  applyDirty(input: TargetInput & { readonly frame: DirtyObjects }): Promise<void>;
  /**
   * Several destinations (issue 13): take the incoming VM to its last reversible point (booted, not
   * running, nothing of it visible outside); the first destination to report it wins. Rejects when
   * it cannot (the destination then discards and counts as failed to boot).
   */
  bootIncoming(input: TargetInput & { readonly frame: BootIncoming | DirtyObjects }): Promise<void>;
  /** Make it ours in one transaction (elements, embots with snapshots, VM; journal 'committed'), then release the queues and start the embots. */
  commit(input: TargetInput): Promise<void>;
  /** Throw away everything staged for this migration. */
  discard(input: TargetInput & { readonly reason: string }): Promise<void>;
}
