/**
 * The target side of a migration as an xstate machine: which request it expects in each phase,
 * how it answers, how long it waits, and what an out-of-order request or an abort does. The work
 * of each step lives in the mobility service, which passes its `TargetSteps` and phase hooks with
 * the machine's input (so one machine serves every migration); tests may `machine.provide` the
 * named actors and the `journalPhase` / `reportProgress` actions instead.
 */
import { assign, fromPromise, setup } from 'xstate';
import { EmbotError, ErrorCodes, describeError } from '../errors.ts';
import type { BootIncoming, DirtyObjects, ManagementEventState, ManagementState, MigrationComplete, VmMemory } from '../wire/frames.ts';
import type { MigrationOutcome, StepReply, TargetEvent, TargetInput, TargetPhase, TargetSteps } from './mobility-contract.ts';

/** A request event: it carries the frame and the callback that answers it. */
export type TargetRequest = Extract<TargetEvent, { readonly reply: StepReply }>;
export type TargetRequestType = TargetRequest['type'];

export const TARGET_REQUEST_TYPES: readonly TargetRequestType[] = ['MANAGEMENT_STATE', 'MANAGEMENT_EVENT_STATE', 'VM_MEMORY', 'DIRTY_OBJECTS', 'MIGRATION_COMPLETE', 'BOOT_INCOMING'];

export interface TargetContext {
  readonly input: TargetInput;
  /** The request whose step runs now (answered when the step settles). */
  readonly pending: TargetRequest | undefined;
  readonly memoryFrames: number;
  readonly dirtyRounds: number;
  /** Why the migration was denied or discarded. */
  readonly reason: string | undefined;
  /** The step whose failure is `reason` (undefined when a timeout, an abort or a refusal is): the source is told it (MigrationStateFailed.failedStep). */
  readonly failedStep: StepName | 'evaluate' | undefined;
  /** Failures that did not decide the outcome (a discard that failed, a refused request...). */
  readonly errors: readonly string[];
  readonly outcome: MigrationOutcome | undefined;
  /** A pre-warm's copy (PREWARMING): the wait for its memory is not timed. */
  readonly prewarm: boolean;
}

export interface TargetOutput {
  readonly outcome: MigrationOutcome;
  readonly reason?: string;
  readonly errors: readonly string[];
  readonly memoryFrames: number;
  readonly dirtyRounds: number;
}

type PhaseParams = { readonly phase: TargetPhase };
type StepName = keyof TargetSteps;
type WaitDelay = 'stepTimeout' | 'vmTimeout';

function notProvided(step: StepName): never {
  throw new EmbotError(ErrorCodes.SERVICE_UNKNOWN, `mobility target step ${step} not provided`);
}

/** The steps the service passed with the input (TargetInput.steps), or a clear error. */
function stepsOf(input: TargetInput, step: StepName): TargetSteps {
  return input.steps ?? notProvided(step);
}

function outputOf<T>(event: unknown): T {
  return (event as { readonly output: T }).output;
}

function errorOf(event: unknown): unknown {
  return (event as { readonly error?: unknown }).error;
}

interface FrameOf {
  readonly MANAGEMENT_STATE: ManagementState;
  readonly MANAGEMENT_EVENT_STATE: ManagementEventState;
  readonly VM_MEMORY: VmMemory;
  readonly DIRTY_OBJECTS: DirtyObjects;
  readonly MIGRATION_COMPLETE: MigrationComplete;
  readonly BOOT_INCOMING: BootIncoming;
}

/** The frame of the pending request, checked against the type the step serves. */
function pendingFrame<T extends TargetRequestType>(context: TargetContext, type: T): FrameOf[T] {
  const pending = context.pending;
  if (pending?.type !== type) throw new EmbotError(ErrorCodes.REQUEST_FAILED, `target machine: no pending ${type} (have ${pending?.type ?? 'none'})`);
  return pending.frame as FrameOf[T];
}

/** The request a boot answers: BootIncoming, or a fan-out child's final DirtyObjects that asked to boot. */
function bootFrame(context: TargetContext): BootIncoming | DirtyObjects {
  return context.pending?.type === 'DIRTY_OBJECTS' ? pendingFrame(context, 'DIRTY_OBJECTS') : pendingFrame(context, 'BOOT_INCOMING');
}

/** A reply callback that throws means the link is gone; that arrives as ABORT, so it is not fatal here. */
function safeReply(reply: StepReply | undefined, r: Parameters<StepReply>[0]): void {
  try {
    reply?.(r);
  } catch {
    /* the closed link surfaces as ABORT */
  }
}

function enter(phase: TargetPhase) {
  return [
    { type: 'journalPhase', params: { phase } },
    { type: 'reportProgress', params: { phase } },
  ] as const;
}

/** Transitions refusing every request the state does not expect: failure reply, then discard. */
function refuseOthers(state: string, expected: readonly TargetRequestType[]) {
  const refuse = { target: '#target.discarding', actions: { type: 'refuse', params: { state } } } as const;
  const pick = (t: TargetRequestType) => (expected.includes(t) ? undefined : refuse);
  return {
    MANAGEMENT_STATE: pick('MANAGEMENT_STATE'),
    MANAGEMENT_EVENT_STATE: pick('MANAGEMENT_EVENT_STATE'),
    VM_MEMORY: pick('VM_MEMORY'),
    DIRTY_OBJECTS: pick('DIRTY_OBJECTS'),
    MIGRATION_COMPLETE: pick('MIGRATION_COMPLETE'),
    BOOT_INCOMING: pick('BOOT_INCOMING'),
  };
}

/**
 * A state waiting for the source's next request: ABORT, a timeout or an unexpected request
 * discards. `self` (a wait for the VM's memory): a pre-warm's copy waits there for the source's
 * command, so its timeout only re-arms (the source's link going down still discards).
 */
function waiting(state: string, delay: WaitDelay, expected: readonly TargetRequestType[], self?: `#target.${string}`) {
  const timedOut = { target: '#target.discarding', actions: { type: 'recordTimeout', params: { state, delay } } } as const;
  return {
    after: { [delay]: self === undefined ? timedOut : [{ guard: 'prewarming', target: self, reenter: true, actions: 'probeSource' }, timedOut] } as Partial<
      Record<WaitDelay, typeof timedOut | readonly [{ readonly guard: 'prewarming'; readonly target: `#target.${string}`; readonly reenter: true; readonly actions: 'probeSource' }, typeof timedOut]>
    >,
    on: {
      ...refuseOthers(state, expected),
      ABORT: { target: '#target.discarding', actions: { type: 'recordAbort', params: { state } } },
    },
  } as const;
}

/** While a step runs: ABORT or any request discards, and the pending request is answered with the failure. */
function busy(state: string) {
  const refuse = { target: '#target.discarding', actions: [{ type: 'refuse', params: { state } }, 'failPending'] } as const;
  return {
    MANAGEMENT_STATE: refuse,
    MANAGEMENT_EVENT_STATE: refuse,
    VM_MEMORY: refuse,
    DIRTY_OBJECTS: refuse,
    MIGRATION_COMPLETE: refuse,
    BOOT_INCOMING: refuse,
    ABORT: { target: '#target.discarding', actions: [{ type: 'recordAbort', params: { state } }, 'failPending'] },
  } as const;
}

/** A step's failure: record it, answer the pending request with it, discard. */
function failStep(step: StepName) {
  return { target: '#target.discarding', actions: [{ type: 'recordFailure', params: { step } }, 'failPending'] } as const;
}

const targetSetup = setup({
  types: {
    input: {} as TargetInput,
    context: {} as TargetContext,
    events: {} as TargetEvent,
    output: {} as TargetOutput,
  },
  actors: {
    evaluate: fromPromise<Awaited<ReturnType<TargetSteps['evaluate']>>, TargetInput>(async ({ input }) => stepsOf(input, 'evaluate').evaluate(input)),
    stageState: fromPromise<void, TargetInput & { readonly frame: ManagementState }>(async ({ input }) => stepsOf(input, 'stageState').stageState(input)),
    stageEvents: fromPromise<void, TargetInput & { readonly frame: ManagementEventState }>(async ({ input }) => stepsOf(input, 'stageEvents').stageEvents(input)),
    receiveMemory: fromPromise<void, TargetInput & { readonly frame: VmMemory }>(async ({ input }) => stepsOf(input, 'receiveMemory').receiveMemory(input)),
    applyDirty: fromPromise<void, TargetInput & { readonly frame: DirtyObjects }>(async ({ input }) => stepsOf(input, 'applyDirty').applyDirty(input)),
    bootIncoming: fromPromise<void, TargetInput & { readonly frame: BootIncoming | DirtyObjects }>(async ({ input }) => stepsOf(input, 'bootIncoming').bootIncoming(input)),
    commit: fromPromise<void, TargetInput>(async ({ input }) => stepsOf(input, 'commit').commit(input)),
    discard: fromPromise<void, TargetInput & { readonly reason: string }>(async ({ input }) => stepsOf(input, 'discard').discard(input)),
  },
  actions: {
    /** The service's hook (TargetInput.hooks, or provided): write the phase to the `migrations` journal. */
    journalPhase: ({ context }, params: PhaseParams) => context.input.hooks?.journalPhase(params.phase),
    /** The service's hook (TargetInput.hooks, or provided): tell watchers where the migration is. */
    reportProgress: ({ context }, params: PhaseParams) => context.input.hooks?.reportProgress(params.phase),
    setOutcome: assign((_, params: { readonly outcome: MigrationOutcome }) => ({ outcome: params.outcome })),
    /** Remember the request whose step is about to run. */
    takeRequest: assign(({ event }) => ({ pending: event as TargetRequest })),
    markPrewarm: assign({ prewarm: true }),
    /** The service's hook: ping the source, ABORT if it does not answer. */
    probeSource: ({ context }) => context.input.hooks?.probeSource?.(),
    /** Answer StartMigration with the policy's verdict. */
    replyVerdict: ({ context, event }) => {
      const verdict = outputOf<{ permitted: boolean; reason?: string }>(event);
      context.input.replyStart(verdict.permitted ? { permitted: true } : { permitted: false, reason: verdict.reason ?? 'denied by migration policy' });
    },
    recordDenied: assign(({ event }) => ({ reason: `denied: ${outputOf<{ reason?: string }>(event).reason ?? 'denied by migration policy'}`, failedStep: undefined })),
    /** Answer StartMigration with a denial when evaluating ends abnormally (the reason is already recorded). */
    denyStart: ({ context }) => {
      try {
        context.input.replyStart({ permitted: false, reason: context.reason ?? 'aborted' });
      } catch {
        /* the closed link surfaces as ABORT */
      }
    },
    replyOk: ({ context }) => safeReply(context.pending?.reply, { ok: true }),
    /** Answer the pending request with the recorded reason; `instantiation` when the step's error says so. */
    failPending: ({ context, event }) => {
      const err = errorOf(event) as { readonly instantiation?: unknown } | undefined;
      const instantiation = typeof err === 'object' && err !== null && err.instantiation === true;
      safeReply(context.pending?.reply, { ok: false, reason: context.reason ?? 'failed', instantiation, ...(context.failedStep === undefined ? {} : { step: context.failedStep }) });
    },
    recordFailure: assign(({ event }, params: { readonly step: StepName | 'evaluate' }) => ({ reason: `${params.step} failed: ${describeError(errorOf(event))}`, failedStep: params.step })),
    recordTimeout: assign(({ context }, params: { readonly state: string; readonly delay: WaitDelay }) => ({
      failedStep: undefined,
      reason: `timed out after ${params.delay === 'vmTimeout' ? context.input.timeouts.vmMs : context.input.timeouts.stepMs} ms waiting in ${params.state}`,
    })),
    recordAbort: assign(({ event }, params: { readonly state: string }) => ({
      failedStep: undefined,
      reason: `aborted by source in ${params.state}: ${(event as Extract<TargetEvent, { type: 'ABORT' }>).reason}`,
    })),
    /** Answer an unexpected request with a failure; becomes the reason unless one is already set. */
    refuse: assign(({ context, event }, params: { readonly state: string; readonly keepReason?: boolean }) => {
      const why = `unexpected ${event.type} in ${params.state}`;
      if ('reply' in event) safeReply(event.reply, { ok: false, reason: why });
      return params.keepReason ? { errors: [...context.errors, why] } : { reason: why, failedStep: undefined };
    }),
    recordError: assign(({ context, event }, params: { readonly step: StepName; readonly timedOut?: boolean }) => ({
      errors: [...context.errors, params.timedOut ? `${params.step} timed out after ${context.input.timeouts.stepMs} ms` : `${params.step} failed: ${describeError(errorOf(event))}`],
    })),
    countMemoryFrame: assign(({ context }) => ({ memoryFrames: context.memoryFrames + 1 })),
    countDirtyRound: assign(({ context }) => ({ dirtyRounds: context.dirtyRounds + 1 })),
  },
  guards: {
    permitted: ({ event }) => outputOf<{ permitted: boolean }>(event).permitted,
    lastMemoryFrame: ({ context }) => context.pending?.type === 'VM_MEMORY' && context.pending.frame.last,
    /** A fan-out child's final round that asks this destination to boot once it is applied. */
    bootWithRound: ({ context }) => context.pending?.type === 'DIRTY_OBJECTS' && context.pending.frame.boot === true,
    prewarming: ({ context }) => context.prewarm,
  },
  delays: {
    stepTimeout: ({ context }) => context.input.timeouts.stepMs,
    vmTimeout: ({ context }) => context.input.timeouts.vmMs,
  },
});

/**
 * The target-side migration machine. Waiting states are the journaled phases (`TargetPhase`);
 * while a step runs (stagingState, stagingEvents, receivingMemory.applying, applyingDirty) the
 * journal keeps the phase before it.
 *
 * - evaluating → permitted → stagingState → stateStaged → stagingEvents → eventsStaged →
 *   receivingMemory (one `receiveMemory` per VmMemory frame, until the `last` one) → vmReceived →
 *   (applyingDirty → syncing)* → committing → committed.
 * - Several destinations (issue 13): syncing → booting (BootIncoming) → booted → committing on
 *   MigrationComplete (this destination won); Abort, a timeout or another request discards. A
 *   final DirtyObjects with `boot` goes applyingDirty → booting itself, answered once booted.
 * - Each request is answered when its step settles: ok, or the failure (`instantiation` when the
 *   step's error has `instantiation: true`), then discarding → aborted.
 * - A waiting state times out after `stepMs` (`vmMs` while the VM travels) → discarding; a
 *   pre-warm's (PREWARMING, any time) wait for its memory re-arms, asking the service to probe
 *   the source (an unanswered probe comes back as ABORT). ABORT
 *   anywhere but committing (and the final states) → discarding. A request the state does not
 *   expect, or any request while a step runs, is refused with `unexpected <TYPE> in <state>` →
 *   discarding (and a running step's request is answered with that failure too). In committing
 *   the commit decides: requests are refused, ABORT is ignored. In discarding requests are refused.
 * - A running step is not awaited when the machine leaves its state: the service's promise actor
 *   gets an aborted `signal`, and `discard` must cope with a step still settling.
 *
 * @example
 * ```ts
 * const machine = createTargetMachine().provide({ actors: { evaluate: fromPromise(async ({ input }) => policy.check(input)), ... } });
 * const actor = createActor(machine, { input: { ...ids, start: frame, replyStart: (r) => conn.reply(frame, r) } }).start();
 * conn.on('ManagementState', (frame, reply) => actor.send({ type: 'MANAGEMENT_STATE', frame, reply }));
 * ```
 */
export function createTargetMachine(): TargetMachine {
  // Built once: xstate walks the whole config to build one (~4 ms of CPU), which every incoming
  // migration paid before answering StartMigration. A machine is immutable; provide() copies it.
  built ??= buildTargetMachine();
  return built;
}

let built: ReturnType<typeof buildTargetMachine> | undefined;

function buildTargetMachine() {
  return targetSetup.createMachine({
    id: 'target',
    initial: 'evaluating',
    context: ({ input }) => ({ input, pending: undefined, memoryFrames: 0, dirtyRounds: 0, reason: undefined, failedStep: undefined, errors: [], outcome: undefined, prewarm: false }),
    // Whenever it comes (PrepareIncoming may be answered before or after the staging steps).
    on: { PREWARMING: { actions: 'markPrewarm' } },
    output: ({ context }) => ({
      outcome: context.outcome ?? 'aborted',
      ...(context.reason === undefined ? {} : { reason: context.reason }),
      errors: context.errors,
      memoryFrames: context.memoryFrames,
      dirtyRounds: context.dirtyRounds,
    }),
    states: {
      evaluating: {
        entry: enter('evaluating'),
        invoke: {
          src: 'evaluate',
          input: ({ context }) => context.input,
          onDone: [
            { guard: 'permitted', target: 'permitted', actions: 'replyVerdict' },
            { target: 'denied', actions: ['recordDenied', 'replyVerdict'] },
          ],
          onError: { target: 'discarding', actions: [{ type: 'recordFailure', params: { step: 'evaluate' } }, 'denyStart'] },
        },
        after: { stepTimeout: { target: 'discarding', actions: [{ type: 'recordTimeout', params: { state: 'evaluating', delay: 'stepTimeout' } }, 'denyStart'] } },
        on: {
          ...Object.fromEntries(
            TARGET_REQUEST_TYPES.map((t) => [t, { target: '#target.discarding', actions: [{ type: 'refuse', params: { state: 'evaluating' } }, 'denyStart'] }] as const),
          ),
          ABORT: { target: 'discarding', actions: [{ type: 'recordAbort', params: { state: 'evaluating' } }, 'denyStart'] },
        },
      },
      permitted: {
        entry: enter('permitted'),
        ...waiting('permitted', 'stepTimeout', ['MANAGEMENT_STATE']),
        on: { ...waiting('permitted', 'stepTimeout', ['MANAGEMENT_STATE']).on, MANAGEMENT_STATE: { target: 'stagingState', actions: 'takeRequest' } },
      },
      stagingState: {
        invoke: {
          src: 'stageState',
          input: ({ context }) => ({ ...context.input, frame: pendingFrame(context, 'MANAGEMENT_STATE') }),
          onDone: { target: 'stateStaged', actions: 'replyOk' },
          onError: failStep('stageState'),
        },
        on: busy('stagingState'),
      },
      stateStaged: {
        entry: enter('stateStaged'),
        ...waiting('stateStaged', 'stepTimeout', ['MANAGEMENT_EVENT_STATE']),
        on: { ...waiting('stateStaged', 'stepTimeout', ['MANAGEMENT_EVENT_STATE']).on, MANAGEMENT_EVENT_STATE: { target: 'stagingEvents', actions: 'takeRequest' } },
      },
      stagingEvents: {
        invoke: {
          src: 'stageEvents',
          input: ({ context }) => ({ ...context.input, frame: pendingFrame(context, 'MANAGEMENT_EVENT_STATE') }),
          onDone: { target: 'eventsStaged', actions: 'replyOk' },
          onError: failStep('stageEvents'),
        },
        on: busy('stagingEvents'),
      },
      eventsStaged: {
        entry: enter('eventsStaged'),
        ...waiting('eventsStaged', 'vmTimeout', ['VM_MEMORY'], '#target.eventsStaged'),
        on: { ...waiting('eventsStaged', 'vmTimeout', ['VM_MEMORY']).on, VM_MEMORY: { target: 'receivingMemory', actions: 'takeRequest' } },
      },
      receivingMemory: {
        initial: 'applying',
        states: {
          applying: {
            invoke: {
              src: 'receiveMemory',
              input: ({ context }) => ({ ...context.input, frame: pendingFrame(context, 'VM_MEMORY') }),
              onDone: [
                { guard: 'lastMemoryFrame', target: '#target.vmReceived', actions: ['countMemoryFrame', 'replyOk'] },
                { target: 'waiting', actions: ['countMemoryFrame', 'replyOk'] },
              ],
              onError: failStep('receiveMemory'),
            },
            on: busy('receivingMemory'),
          },
          waiting: {
            ...waiting('receivingMemory', 'vmTimeout', ['VM_MEMORY'], '#target.receivingMemory.waiting'),
            on: { ...waiting('receivingMemory', 'vmTimeout', ['VM_MEMORY']).on, VM_MEMORY: { target: 'applying', actions: 'takeRequest' } },
          },
        },
      },
      vmReceived: {
        entry: enter('vmReceived'),
        ...waiting('vmReceived', 'stepTimeout', ['DIRTY_OBJECTS', 'MIGRATION_COMPLETE']),
        on: {
          ...waiting('vmReceived', 'stepTimeout', ['DIRTY_OBJECTS', 'MIGRATION_COMPLETE']).on,
          DIRTY_OBJECTS: { target: 'applyingDirty', actions: 'takeRequest' },
          MIGRATION_COMPLETE: { target: 'committing', actions: 'takeRequest' },
        },
      },
      applyingDirty: {
        invoke: {
          src: 'applyDirty',
          input: ({ context }) => ({ ...context.input, frame: pendingFrame(context, 'DIRTY_OBJECTS') }),
          onDone: [
            // Answered once booted (BootReady), from booting.
            { guard: 'bootWithRound', target: 'booting', actions: 'countDirtyRound' },
            { target: 'syncing', actions: ['countDirtyRound', 'replyOk'] },
          ],
          onError: failStep('applyDirty'),
        },
        on: busy('applyingDirty'),
      },
      syncing: {
        entry: enter('syncing'),
        ...waiting('syncing', 'stepTimeout', ['DIRTY_OBJECTS', 'MIGRATION_COMPLETE', 'BOOT_INCOMING']),
        on: {
          ...waiting('syncing', 'stepTimeout', ['DIRTY_OBJECTS', 'MIGRATION_COMPLETE', 'BOOT_INCOMING']).on,
          DIRTY_OBJECTS: { target: 'applyingDirty', actions: 'takeRequest' },
          MIGRATION_COMPLETE: { target: 'committing', actions: 'takeRequest' },
          BOOT_INCOMING: { target: 'booting', actions: 'takeRequest' },
        },
      },
      // Several destinations (issue 13): only once the final round is in (BootIncoming, or the final round itself asked).
      booting: {
        invoke: {
          src: 'bootIncoming',
          input: ({ context }) => ({ ...context.input, frame: bootFrame(context) }),
          onDone: { target: 'booted', actions: 'replyOk' },
          onError: failStep('bootIncoming'),
        },
        on: busy('booting'),
      },
      // Booted, not running: the source's MigrationComplete (this destination won) or its Abort (another did).
      booted: {
        entry: enter('booted'),
        ...waiting('booted', 'stepTimeout', ['MIGRATION_COMPLETE']),
        on: { ...waiting('booted', 'stepTimeout', ['MIGRATION_COMPLETE']).on, MIGRATION_COMPLETE: { target: 'committing', actions: 'takeRequest' } },
      },
      committing: {
        entry: enter('committing'),
        invoke: {
          src: 'commit',
          input: ({ context }) => context.input,
          onDone: { target: 'committed', actions: 'replyOk' },
          onError: failStep('commit'),
        },
        // The commit decides: an abort now could leave the VM owned by nobody.
        on: Object.fromEntries(TARGET_REQUEST_TYPES.map((t) => [t, { actions: { type: 'refuse', params: { state: 'committing', keepReason: true } } }] as const)),
      },
      discarding: {
        entry: enter('discarding'),
        invoke: {
          src: 'discard',
          input: ({ context }) => ({ ...context.input, reason: context.reason ?? 'unknown' }),
          onDone: 'aborted',
          onError: { target: 'aborted', actions: { type: 'recordError', params: { step: 'discard' } } },
        },
        after: { stepTimeout: { target: 'aborted', actions: { type: 'recordError', params: { step: 'discard', timedOut: true } } } },
        on: Object.fromEntries(TARGET_REQUEST_TYPES.map((t) => [t, { actions: { type: 'refuse', params: { state: 'discarding', keepReason: true } } }] as const)),
      },
      committed: { type: 'final', entry: [...enter('committed'), { type: 'setOutcome', params: { outcome: 'completed' } }] },
      aborted: { type: 'final', entry: [...enter('aborted'), { type: 'setOutcome', params: { outcome: 'aborted' } }] },
      denied: { type: 'final', entry: [...enter('denied'), { type: 'setOutcome', params: { outcome: 'denied' } }] },
    },
  });
}

/** The machine's type, for `ActorRefFrom` / `SnapshotFrom` in the service. */
export type TargetMachine = ReturnType<typeof buildTargetMachine>;
