/**
 * The source side of a migration as an xstate machine: the order of the protocol steps, their
 * timeouts, and where each failure leads. The work of each step lives in the mobility service,
 * which provides the named actors (`SourceSteps`) and the `journalPhase` / `reportProgress`
 * actions with `machine.provide`.
 */
import { and, assign, fromPromise, setup } from 'xstate';
import { EmbotError, ErrorCodes, describeError } from '../errors.ts';
import type { DirtyRoundResult, FanOutChildSteps, FanOutVerdict, MigrateVmResult, MigrationOutcome, SourceEvent, SourceInput, SourcePhase, SourceSteps } from './mobility-contract.ts';

/** One DirtyObjects round as the source saw it. */
export interface DirtyRoundStat extends DirtyRoundResult {
  readonly round: number;
  readonly final: boolean;
}

/** When a phase was entered (ms since the epoch). */
export interface PhaseMark {
  readonly phase: SourcePhase;
  readonly at: number;
}

/** Time spent in a phase, summed over every entry; final phases are left out. */
export interface PhaseTime<P extends string = SourcePhase> {
  readonly phase: P;
  readonly ms: number;
}

export interface SourceContext {
  readonly input: SourceInput;
  /** Non-final dirty rounds sent so far; also the number of the next round. */
  readonly round: number;
  readonly rounds: readonly DirtyRoundStat[];
  /** Why the migration was denied or aborted. */
  readonly reason: string | undefined;
  /** Failures that did not decide the outcome (a rollBack that failed, a completion resolved later...). */
  readonly errors: readonly string[];
  readonly marks: readonly PhaseMark[];
  /** Questions asked by `resolveOutcome`, counting retries. */
  readonly resolveAttempts: number;
  readonly outcome: MigrationOutcome | undefined;
}

export interface SourceOutput {
  readonly outcome: MigrationOutcome;
  readonly reason?: string;
  readonly errors: readonly string[];
  readonly phases: readonly PhaseTime[];
  /** DirtyObjects rounds sent, the final frozen round included. */
  readonly dirtyRounds: number;
  readonly rounds: readonly DirtyRoundStat[];
}

type PhaseParams = { readonly phase: SourcePhase };
type StepName = keyof SourceSteps | 'bootIncoming' | 'awaitDecision';

function notProvided(step: StepName): never {
  throw new EmbotError(ErrorCodes.SERVICE_UNKNOWN, `mobility source step ${step} not provided`);
}

/** Step `step` of the steps the service passed with the input (SourceInput.steps), bound, or a clear error. */
function stepOf<S extends StepName>(input: SourceInput, step: S): (SourceSteps & FanOutChildSteps)[S] {
  const steps = input.steps as Partial<SourceSteps & FanOutChildSteps> | undefined;
  const fn = steps?.[step] as ((...args: never[]) => unknown) | undefined;
  return fn ? (fn.bind(steps) as (SourceSteps & FanOutChildSteps)[S]) : notProvided(step);
}

/** Output of the invoke whose done event this is (setup types actions against the external events only). */
function outputOf<T>(event: unknown): T {
  return (event as { readonly output: T }).output;
}

function errorOf(event: unknown): unknown {
  return (event as { readonly error?: unknown }).error;
}

/** Phase times from the entry marks; `end` closes the last non-final phase. */
export function phaseTimes<P extends string>(marks: readonly { readonly phase: P; readonly at: number }[], finals: readonly P[]): PhaseTime<P>[] {
  const sums = new Map<P, number>();
  marks.forEach((m, i) => {
    if (finals.includes(m.phase)) return;
    const next = marks[i + 1];
    sums.set(m.phase, (sums.get(m.phase) ?? 0) + (next ? next.at - m.at : 0));
  });
  return [...sums].map(([phase, ms]) => ({ phase, ms }));
}

const FINAL_PHASES: readonly SourcePhase[] = ['completed', 'aborted', 'denied'];

/** Entry actions of a phase: mark the time, journal it, report it. */
function enter(phase: SourcePhase) {
  return [
    { type: 'markPhase', params: { phase } },
    { type: 'journalPhase', params: { phase } },
    { type: 'reportProgress', params: { phase } },
  ] as const;
}

/** Failure of a step before MigrationComplete: roll back. */
function rollBackOn(step: StepName, delay: 'stepTimeout' | 'vmTimeout') {
  return {
    after: { [delay]: { target: '#source.rollingBack', actions: { type: 'recordTimeout', params: { step, delay } } } },
    on: { CANCEL: { target: '#source.rollingBack', actions: { type: 'recordCancel', params: { step } } } },
  } as const;
}

/** The `onError` of a step's invoke: its failure rolls the migration back. */
function rollBackOnError(step: StepName) {
  return { target: '#source.rollingBack', actions: { type: 'recordFailure', params: { step } } } as const;
}

const sourceSetup = setup({
  types: {
    input: {} as SourceInput,
    context: {} as SourceContext,
    events: {} as SourceEvent,
    output: {} as SourceOutput,
  },
  actors: {
    startMigration: fromPromise<Awaited<ReturnType<SourceSteps['startMigration']>>, SourceInput>(async ({ input }) => stepOf(input, 'startMigration')(input)),
    holdEvents: fromPromise<void, SourceInput>(async ({ input }) => stepOf(input, 'holdEvents')(input)),
    sendManagementState: fromPromise<void, SourceInput>(async ({ input }) => stepOf(input, 'sendManagementState')(input)),
    sendEventState: fromPromise<void, SourceInput>(async ({ input }) => stepOf(input, 'sendEventState')(input)),
    migrateVm: fromPromise<MigrateVmResult, SourceInput>(async ({ input }) => stepOf(input, 'migrateVm')(input)),
    sendDirtyObjects: fromPromise<DirtyRoundResult, Parameters<SourceSteps['sendDirtyObjects']>[0]>(async ({ input }) => stepOf(input, 'sendDirtyObjects')(input)),
    completeMigration: fromPromise<void, SourceInput>(async ({ input }) => stepOf(input, 'completeMigration')(input)),
    resolveOutcome: fromPromise<'committed' | 'notCommitted', SourceInput>(async ({ input }) => stepOf(input, 'resolveOutcome')(input)),
    finishSource: fromPromise<void, SourceInput>(async ({ input }) => stepOf(input, 'finishSource')(input)),
    rollBack: fromPromise<void, Parameters<SourceSteps['rollBack']>[0]>(async ({ input }) => stepOf(input, 'rollBack')(input)),
    bootIncoming: fromPromise<{ readonly bootMs: number }, SourceInput>(async ({ input }) => stepOf(input, 'bootIncoming')(input)),
    awaitDecision: fromPromise<FanOutVerdict, SourceInput>(async ({ input }) => stepOf(input, 'awaitDecision')(input)),
  },
  actions: {
    /** The service's hook (SourceInput.hooks, or provided): write the phase to the `migrations` journal. */
    journalPhase: ({ context }, params: PhaseParams) => context.input.hooks?.journalPhase(params.phase),
    /** The service's hook (SourceInput.hooks, or provided): tell watchers (CLI, events) where the migration is. */
    reportProgress: ({ context }, params: PhaseParams) => context.input.hooks?.reportProgress(params.phase),
    /**
     * Provided by the service (fan-out child, `bootSkipped`): tell the coordinator this child is its
     * only candidate and ready, as a BootReady would, without asking the destination to boot.
     */
    readyWithoutBoot: ({ context }) => context.input.hooks?.readyWithoutBoot?.(),
    /** Provided by the service (fan-out child): its destination booted with the final round; the decision runs now. */
    readyBooted: ({ context }) => context.input.hooks?.bootedWithRound?.(),
    markPhase: assign(({ context }, params: PhaseParams) => ({ marks: [...context.marks, { phase: params.phase, at: Date.now() }] })),
    setOutcome: assign((_, params: { readonly outcome: MigrationOutcome }) => ({ outcome: params.outcome })),
    recordDenied: assign(({ event }) => ({ reason: `denied by target: ${outputOf<{ reason?: string }>(event).reason ?? 'no reason given'}` })),
    recordFailure: assign(({ event }, params: { readonly step: StepName }) => ({ reason: `${params.step} failed: ${describeError(errorOf(event))}` })),
    recordTimeout: assign(({ context }, params: { readonly step: StepName; readonly delay: 'stepTimeout' | 'vmTimeout' }) => ({
      reason: `${params.step} timed out after ${params.delay === 'vmTimeout' ? context.input.timeouts.vmMs : context.input.timeouts.stepMs} ms`,
    })),
    recordCancel: assign(({ event }, params: { readonly step: StepName }) => ({
      reason: `cancelled during ${params.step}: ${(event as SourceEvent).reason}`,
    })),
    /** A non-deciding failure: kept in `errors`, the outcome comes from what follows. */
    recordError: assign(({ context, event }, params: { readonly step: StepName; readonly timedOut?: boolean }) => ({
      errors: [
        ...context.errors,
        params.timedOut ? `${params.step} timed out after ${context.input.timeouts.stepMs} ms` : `${params.step} failed: ${describeError(errorOf(event))}`,
      ],
    })),
    /** migrateVm sent the final round at the switch: it is the only one. */
    recordFinalAtSwitch: assign(({ context, event }) => ({
      rounds: [...context.rounds, { ...outputOf<MigrateVmResult>(event).finalRound!, round: context.round, final: true }],
    })),
    recordRound: assign(({ context, event }, params: { readonly final: boolean }) => ({
      round: params.final ? context.round : context.round + 1,
      rounds: [...context.rounds, { ...outputOf<DirtyRoundResult>(event), round: context.round, final: params.final }],
    })),
    countResolveAttempt: assign(({ context }) => ({ resolveAttempts: context.resolveAttempts + 1 })),
    /** A fan-out child the coordinator did not choose: the verdict's reason is the Abort's. */
    recordTerminated: assign(({ event }) => {
      const v = outputOf<FanOutVerdict>(event);
      return { reason: v.commit ? 'terminated' : v.reason };
    }),
    recordNotCommitted: assign(({ context }) => ({
      reason: `target did not commit after ${context.errors.find((e) => e.startsWith('completeMigration')) ?? 'completeMigration failed'}`,
    })),
  },
  guards: {
    permitted: ({ event }) => outputOf<{ permitted: boolean }>(event).permitted,
    finalRoundAtSwitch: ({ event }) => outputOf<MigrateVmResult | undefined>(event)?.finalRound !== undefined,
    moreRoundsAllowed: ({ context }) => context.round < context.input.maxDirtyRounds,
    roundChanged: ({ event }) => {
      const r = outputOf<DirtyRoundResult>(event);
      return r.changedElements > 0 || r.events > 0;
    },
    targetCommitted: ({ event }) => outputOf<'committed' | 'notCommitted'>(event) === 'committed',
    chosen: ({ event }) => outputOf<FanOutVerdict>(event).commit,
    /** The final round asked the destination to boot and it did (BootReady in answer). */
    bootedWithRound: ({ event }) => outputOf<DirtyRoundResult>(event).booted === true,
    /** The final round was applied and the boot refused (the step's error says so): bootFailed, as a BootIncoming refusal. */
    bootRefused: ({ event }) => {
      const e = errorOf(event) as { readonly details?: { readonly bootRefused?: unknown } } | undefined;
      return typeof e === 'object' && e !== null && e.details?.bootRefused === true;
    },
    /**
     * Provided by the service (fan-out child): no other destination can win any more (a pre-warm's
     * command named this one alone), so BootIncoming would decide nothing: the child goes straight
     * to the coordinator's verdict (the winner journaled) and commits as a single migration does.
     */
    bootSkipped: ({ context }) => context.input.hooks?.bootSkipped?.() === true,
    /**
     * Provided by the service (fan-out child): the coordinator has already chosen this child (a
     * pre-warm's command named it alone, the winner journaled then): with `bootSkipped` it goes from
     * its final round straight to completing, nothing left to decide after the stop.
     */
    alreadyChosen: ({ context }) => context.input.hooks?.alreadyChosen?.() === true,
    /** Provided by the service (a pre-warm's child): its copy waits for the command, untimed (SourceHooks.copyUntimed). */
    copyUntimed: ({ context }) => context.input.hooks?.copyUntimed?.() === true,
  },
  delays: {
    stepTimeout: ({ context }) => context.input.timeouts.stepMs,
    vmTimeout: ({ context }) => context.input.timeouts.vmMs,
    /** Pause between two `resolveOutcome` questions; the service may provide its own. */
    resolveRetry: ({ context }) => context.input.timeouts.stepMs,
  },
});

/**
 * The source-side migration machine. States are the journaled phases (`SourcePhase`), plus
 * `resolving` (journaled as 'completing') for a MigrationComplete whose fate is unknown.
 *
 * - requesting → holding → sendingState → sendingEvents → migratingVm → syncingDirty →
 *   completing → finishing → completed.
 * - syncingDirty sends rounds while the last one changed something and `round < maxDirtyRounds`,
 *   then always one `final: true` round (sent with everything frozen). A fan-out child's final
 *   round asks its destination to boot as well: BootReady in answer goes to awaitingDecision, a
 *   refused boot rolls back as bootIncoming; `booting` (BootIncoming alone) remains for a final
 *   round that went at the switch. A fan-out child with nothing
 *   left to race (`bootSkipped`) sends the final round alone. A migrateVm that already
 *   sent the final round at the switch (qemu: the VM paused at pre-switchover) skips syncingDirty:
 *   nothing at the source changes between rounds once the VM and its embots are frozen.
 * - A step failure, a step timeout (`stepMs`, `vmMs` for migrateVm: re-armed while a pre-warm's
 *   copy waits for its command, `copyUntimed`) or CANCEL before completing →
 *   rollingBack → aborted. A rollBack that fails still ends in aborted, with the error in `errors`.
 * - completing failing → resolving: `resolveOutcome` asks the target; committed → finishing,
 *   notCommitted → rollingBack, unknown → ask again after `resolveRetry`, forever (an agent restart
 *   resolves it from the journal): rolling back blindly could leave two owners.
 * - finishSource failing still ends in completed (the target owns the VM), with the error recorded.
 *
 * @example
 * ```ts
 * const machine = createSourceMachine().provide({
 *   actors: { startMigration: fromPromise(async ({ input }) => peer.request(...)), ... },
 *   actions: { journalPhase: (_, { phase }) => journal.write(input.migrationId, phase) },
 * });
 * const actor = createActor(machine, { input }).start();
 * actor.subscribe({ complete: () => console.log(actor.getSnapshot().output) });
 * ```
 */
export function createSourceMachine(options: SourceMachineOptions = {}): SourceMachine {
  const fanOut = options.fanOut === true;
  // Built once per form: xstate walks the whole config to build one (~4 ms of CPU here), and the
  // source paid it before each migration's first request, once per destination of a fan-out.
  // A machine is immutable; each migration's provide() makes its own copy.
  let m = built.get(fanOut);
  if (m === undefined) {
    m = buildSourceMachine(fanOut);
    built.set(fanOut, m);
  }
  return m;
}

const built = new Map<boolean, ReturnType<typeof buildSourceMachine>>();

function buildSourceMachine(fanOut: boolean) {
  const afterFinalRound = fanOut ? '#source.booting' : '#source.completing';
  // A fan-out child with nothing left to race (bootSkipped) is ready once its final round is in.
  const skipBoot = { target: '#source.awaitingDecision', actions: 'readyWithoutBoot' } as const;
  // Chosen before its final round (the command named it alone): no verdict to wait for either.
  const chosen = { target: '#source.completing', actions: 'readyWithoutBoot' } as const;
  return sourceSetup.createMachine({
    id: 'source',
    initial: 'requesting',
    context: ({ input }) => ({
      input,
      round: 0,
      rounds: [],
      reason: undefined,
      errors: [],
      marks: [],
      resolveAttempts: 0,
      outcome: undefined,
    }),
    output: ({ context }) => ({
      outcome: context.outcome ?? 'aborted',
      ...(context.reason === undefined ? {} : { reason: context.reason }),
      errors: context.errors,
      phases: phaseTimes(context.marks, FINAL_PHASES),
      dirtyRounds: context.rounds.length,
      rounds: context.rounds,
    }),
    states: {
      requesting: {
        entry: enter('requesting'),
        invoke: {
          src: 'startMigration',
          input: ({ context }) => context.input,
          onDone: [{ guard: 'permitted', target: 'holding' }, { target: 'denied', actions: 'recordDenied' }],
          onError: rollBackOnError('startMigration'),
        },
        // The VM's image may be built at the target in this step (issue 14), which takes longer than
        // one request: the VM timeout bounds it; StartMigration's own request keeps the step timeout.
        ...rollBackOn('startMigration', 'vmTimeout'),
      },
      holding: {
        entry: enter('holding'),
        invoke: { src: 'holdEvents', input: ({ context }) => context.input, onDone: 'sendingState', onError: rollBackOnError('holdEvents') },
        ...rollBackOn('holdEvents', 'stepTimeout'),
      },
      sendingState: {
        entry: enter('sendingState'),
        invoke: {
          src: 'sendManagementState',
          input: ({ context }) => context.input,
          onDone: 'sendingEvents',
          onError: rollBackOnError('sendManagementState'),
        },
        ...rollBackOn('sendManagementState', 'stepTimeout'),
      },
      sendingEvents: {
        entry: enter('sendingEvents'),
        invoke: { src: 'sendEventState', input: ({ context }) => context.input, onDone: 'migratingVm', onError: rollBackOnError('sendEventState') },
        ...rollBackOn('sendEventState', 'stepTimeout'),
      },
      migratingVm: {
        entry: enter('migratingVm'),
        invoke: {
          src: 'migrateVm',
          input: ({ context }) => context.input,
          onDone: [
            ...(fanOut
              ? ([
                  { guard: and(['finalRoundAtSwitch', 'bootSkipped', 'alreadyChosen']), target: chosen.target, actions: ['recordFinalAtSwitch', chosen.actions] },
                  { guard: and(['finalRoundAtSwitch', 'bootSkipped']), target: skipBoot.target, actions: ['recordFinalAtSwitch', skipBoot.actions] },
                ] as const)
              : []),
            { guard: 'finalRoundAtSwitch', target: afterFinalRound, actions: 'recordFinalAtSwitch' },
            { target: 'syncingDirty' },
          ],
          onError: rollBackOnError('migrateVm'),
        },
        on: rollBackOn('migrateVm', 'vmTimeout').on,
        // The copy's time limit is a child's, so that a pre-warm's wait for its command re-arms it
        // without restarting the copy (the invoke is migratingVm's).
        initial: 'copying',
        states: {
          copying: {
            after: {
              vmTimeout: [
                { guard: 'copyUntimed', target: 'copying', reenter: true },
                { target: '#source.rollingBack', actions: { type: 'recordTimeout', params: { step: 'migrateVm', delay: 'vmTimeout' } } },
              ],
            },
          },
        },
      },
      syncingDirty: {
        entry: enter('syncingDirty'),
        initial: 'checking',
        on: rollBackOn('sendDirtyObjects', 'stepTimeout').on,
        states: {
          checking: {
            always: [
              // A fan-out child with nothing left to race (a pre-warm's named destination): the VM is stopped and
              // the embots frozen, so a round before the final one ships nothing the final one would not, and
              // only adds a round trip to the downtime.
              ...(fanOut ? ([{ guard: 'bootSkipped', target: 'finalRound' }] as const) : []),
              { guard: 'moreRoundsAllowed', target: 'round' },
              { target: 'finalRound' },
            ],
          },
          round: {
            invoke: {
              src: 'sendDirtyObjects',
              input: ({ context }) => ({ ...context.input, round: context.round, final: false }),
              onDone: [
                { guard: 'roundChanged', target: 'checking', actions: { type: 'recordRound', params: { final: false } } },
                { target: 'finalRound', actions: { type: 'recordRound', params: { final: false } } },
              ],
              onError: rollBackOnError('sendDirtyObjects'),
            },
            after: rollBackOn('sendDirtyObjects', 'stepTimeout').after,
          },
          finalRound: {
            invoke: {
              src: 'sendDirtyObjects',
              // A fan-out child still racing has the service ask its destination to boot with this round (output `booted`).
              input: ({ context }) => ({ ...context.input, round: context.round, final: true }),
              onDone: [
                ...(fanOut
                  ? ([
                      { guard: and(['bootSkipped', 'alreadyChosen']), target: chosen.target, actions: [{ type: 'recordRound', params: { final: true } }, chosen.actions] },
                      { guard: 'bootSkipped', target: skipBoot.target, actions: [{ type: 'recordRound', params: { final: true } }, skipBoot.actions] },
                      { guard: 'bootedWithRound', target: '#source.awaitingDecision', actions: [{ type: 'recordRound', params: { final: true } }, 'readyBooted'] },
                    ] as const)
                  : []),
                { target: afterFinalRound, actions: { type: 'recordRound', params: { final: true } } },
              ],
              onError: [...(fanOut ? ([{ guard: 'bootRefused', ...rollBackOnError('bootIncoming') }] as const) : []), rollBackOnError('sendDirtyObjects')],
            },
            after: rollBackOn('sendDirtyObjects', 'stepTimeout').after,
          },
        },
      },
      ...(fanOut ? fanOutStates() : {}),
      completing: {
        entry: enter('completing'),
        invoke: {
          src: 'completeMigration',
          input: ({ context }) => context.input,
          onDone: 'finishing',
          // MigrationComplete may have reached the target: only the target can tell.
          onError: { target: 'resolving', actions: { type: 'recordError', params: { step: 'completeMigration' } } },
        },
        after: { stepTimeout: { target: 'resolving', actions: { type: 'recordError', params: { step: 'completeMigration', timedOut: true } } } },
      },
      resolving: {
        entry: enter('completing'),
        initial: 'asking',
        states: {
          asking: {
            entry: 'countResolveAttempt',
            invoke: {
              src: 'resolveOutcome',
              input: ({ context }) => context.input,
              onDone: [{ guard: 'targetCommitted', target: '#source.finishing' }, { target: '#source.rollingBack', actions: 'recordNotCommitted' }],
              onError: { target: 'waiting', actions: { type: 'recordError', params: { step: 'resolveOutcome' } } },
            },
            after: { stepTimeout: { target: 'waiting', actions: { type: 'recordError', params: { step: 'resolveOutcome', timedOut: true } } } },
          },
          waiting: {
            after: { resolveRetry: 'asking' },
          },
        },
      },
      finishing: {
        entry: enter('finishing'),
        invoke: {
          src: 'finishSource',
          input: ({ context }) => context.input,
          onDone: 'completed',
          onError: { target: 'completed', actions: { type: 'recordError', params: { step: 'finishSource' } } },
        },
        after: { stepTimeout: { target: 'completed', actions: { type: 'recordError', params: { step: 'finishSource', timedOut: true } } } },
      },
      rollingBack: {
        entry: enter('rollingBack'),
        invoke: {
          src: 'rollBack',
          input: ({ context }) => ({ ...context.input, reason: context.reason ?? 'unknown' }),
          onDone: 'aborted',
          onError: { target: 'aborted', actions: { type: 'recordError', params: { step: 'rollBack' } } },
        },
        after: { stepTimeout: { target: 'aborted', actions: { type: 'recordError', params: { step: 'rollBack', timedOut: true } } } },
      },
      completed: { type: 'final', entry: [...enter('completed'), { type: 'setOutcome', params: { outcome: 'completed' } }] },
      aborted: { type: 'final', entry: [...enter('aborted'), { type: 'setOutcome', params: { outcome: 'aborted' } }] },
      denied: { type: 'final', entry: [...enter('denied'), { type: 'setOutcome', params: { outcome: 'denied' } }] },
    },
  });
}

export interface SourceMachineOptions {
  /**
   * A child of a migration to several destinations (core/mobility/fan-out.ts): after its final
   * round it sends BootIncoming (`booting`) and waits for the coordinator (`awaitingDecision`)
   * instead of completing; chosen, it completes as a single migration does, else it rolls back
   * with the coordinator's reason. With `bootSkipped` (nothing left to race) it skips `booting`,
   * and with `alreadyChosen` as well (chosen at a pre-warm's command) `awaitingDecision` too.
   * Without it the machine is the single-destination one, unchanged.
   */
  readonly fanOut?: boolean;
}

/**
 * The two states of a fan-out child. A boot refusal or timeout rolls back (the coordinator counts
 * it as bootFailed); CANCEL (the coordinator terminating it) rolls back in either state.
 */
function fanOutStates() {
  return {
    booting: {
      entry: enter('booting'),
      invoke: { src: 'bootIncoming', input: ({ context }: { context: SourceContext }) => context.input, onDone: 'awaitingDecision', onError: rollBackOnError('bootIncoming') },
      ...rollBackOn('bootIncoming', 'stepTimeout'),
    },
    awaitingDecision: {
      entry: enter('awaitingDecision'),
      invoke: {
        src: 'awaitDecision',
        input: ({ context }: { context: SourceContext }) => context.input,
        onDone: [{ guard: 'chosen', target: 'completing' }, { target: 'rollingBack', actions: 'recordTerminated' }],
        onError: rollBackOnError('awaitDecision'),
      },
      on: rollBackOn('awaitDecision', 'stepTimeout').on,
    },
  } as const;
}

/** The machine's type, for `ActorRefFrom` / `SnapshotFrom` in the service. */
export type SourceMachine = ReturnType<typeof buildSourceMachine>;
