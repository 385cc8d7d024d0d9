import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { createActor, fromPromise } from 'xstate';
import type { DirtyRoundResult, SourceInput, SourcePhase, SourceSteps } from '../../core/mobility/mobility-contract.ts';
import { createSourceMachine, phaseTimes, type SourceOutput } from '../../core/mobility/source-machine.ts';
import { TransitionCoverage } from '../harness/coverage.ts';

const STEP_MS = 1_000;
const VM_MS = 5_000;
/** How long every fake step takes, so phase times are known exactly. */
const WORK_MS = 10;
const INPUT: SourceInput = { migrationId: 'm-1', vm: 'web-1', target: 'b', maxDirtyRounds: 3, timeouts: { stepMs: STEP_MS, vmMs: VM_MS } };

type Step = keyof SourceSteps;
/** What a fake step does on one call; a plain value is what it resolves with. */
type Behaviour = 'ok' | 'reject' | 'hang' | { readonly value: unknown };

interface Script {
  readonly input?: Partial<SourceInput>;
  /** Per step, per call (the last entry repeats). */
  readonly steps?: Partial<Record<Step, readonly Behaviour[]>>;
}

const coverage = new TransitionCoverage(createSourceMachine());

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** A source actor over fake steps that record their calls, the journal and progress reports. */
function start(script: Script = {}) {
  const input: SourceInput = { ...INPUT, ...script.input };
  const calls: { step: Step; input: Record<string, unknown> }[] = [];
  const journal: SourcePhase[] = [];
  const progress: SourcePhase[] = [];
  const counts = new Map<Step, number>();
  const defaults: Partial<Record<Step, unknown>> = {
    startMigration: { permitted: true },
    sendDirtyObjects: { changedElements: 0, events: 0 },
    resolveOutcome: 'committed',
  };

  const fake = (step: Step) =>
    fromPromise(async ({ input: stepInput }: { input: unknown }) => {
      const n = counts.get(step) ?? 0;
      counts.set(step, n + 1);
      calls.push({ step, input: stepInput as Record<string, unknown> });
      const plan = script.steps?.[step] ?? [];
      const b: Behaviour = plan[Math.min(n, plan.length - 1)] ?? 'ok';
      if (b === 'hang') return new Promise<never>(() => {});
      await sleep(WORK_MS);
      if (b === 'reject') throw new Error(`${step} exploded`);
      return (b === 'ok' ? defaults[step] : b.value) as never;
    });

  const steps: Step[] = [
    'startMigration',
    'holdEvents',
    'sendManagementState',
    'sendEventState',
    'migrateVm',
    'sendDirtyObjects',
    'completeMigration',
    'resolveOutcome',
    'finishSource',
    'rollBack',
  ];
  const machine = createSourceMachine().provide({
    actors: Object.fromEntries(steps.map((s) => [s, fake(s)])) as never,
    actions: {
      journalPhase: (_, params) => void journal.push(params.phase),
      reportProgress: (_, params) => void progress.push(params.phase),
    },
  });
  const actor = createActor(machine, { input, inspect: coverage.inspect });
  actor.start();

  const state = () => actor.getSnapshot().value;
  const output = () => actor.getSnapshot().output as SourceOutput | undefined;
  /** Step calls as `step`, dirty rounds as `dirty#<round>` / `dirty#<round>F`. */
  const sequence = () =>
    calls.map((c) => (c.step === 'sendDirtyObjects' ? `dirty#${String(c.input.round)}${c.input.final ? 'F' : ''}` : c.step));
  const advanceUntil = async (pred: () => boolean) => {
    for (let i = 0; i < 10_000 && !pred(); i++) await vi.advanceTimersByTimeAsync(1);
    expect(pred(), `stuck in ${JSON.stringify(state())}`).toBe(true);
  };
  const finish = async () => {
    await advanceUntil(() => actor.getSnapshot().status === 'done');
    return output()!;
  };
  return { actor, calls, journal, progress, state, output, sequence, advanceUntil, finish, input };
}

const HAPPY_PREFIX = ['startMigration', 'holdEvents', 'sendManagementState', 'sendEventState', 'migrateVm'];
const HAPPY_JOURNAL: SourcePhase[] = ['requesting', 'holding', 'sendingState', 'sendingEvents', 'migratingVm', 'syncingDirty', 'completing', 'finishing', 'completed'];
const changed = (n: number): Behaviour => ({ value: { changedElements: n, events: n } satisfies DirtyRoundResult });
const quiet: Behaviour = { value: { changedElements: 0, events: 0 } satisfies DirtyRoundResult };

beforeEach(() => {
  vi.useFakeTimers();
  vi.setSystemTime(1_000_000);
});
afterEach(() => vi.useRealTimers());

describe('source machine: happy paths', () => {
  it.each([
    ['no dirty round allowed: only the final round', { maxDirtyRounds: 0 }, [], ['dirty#0F']],
    ['one round that changed nothing, then the final round', { maxDirtyRounds: 3 }, [quiet], ['dirty#0', 'dirty#1F']],
    ['one round that changed things, bounded by maxDirtyRounds = 1', { maxDirtyRounds: 1 }, [changed(4)], ['dirty#0', 'dirty#1F']],
    ['three rounds until nothing changed', { maxDirtyRounds: 5 }, [changed(3), changed(1), quiet], ['dirty#0', 'dirty#1', 'dirty#2', 'dirty#3F']],
    ['three rounds bounded by maxDirtyRounds = 3', { maxDirtyRounds: 3 }, [changed(9), changed(9), changed(9)], ['dirty#0', 'dirty#1', 'dirty#2', 'dirty#3F']],
  ] as const)('%s', async (_name, inputPatch, dirty, rounds) => {
    const h = start({ input: inputPatch, steps: { sendDirtyObjects: [...dirty, quiet] } });
    const out = await h.finish();
    expect(h.sequence()).toEqual([...HAPPY_PREFIX, ...rounds, 'completeMigration', 'finishSource']);
    expect(h.journal).toEqual(HAPPY_JOURNAL);
    expect(h.progress).toEqual(HAPPY_JOURNAL);
    expect(h.state()).toBe('completed');
    expect(out.outcome).toBe('completed');
    expect(out.reason).toBeUndefined();
    expect(out.errors).toEqual([]);
    expect(out.dirtyRounds).toBe(rounds.length);
    expect(out.rounds.map((r) => [r.round, r.final])).toEqual(rounds.map((r, i) => [i, r.endsWith('F')]));
    // every step got the machine's input (the dirty rounds their round number on top)
    for (const c of h.calls) expect(c.input).toMatchObject({ ...h.input });
  });

  it('a final round sent at the switch (migrateVm says so) is the only one: syncingDirty is skipped, however many rounds are allowed', async () => {
    const final = { changedElements: 2, events: 5 } satisfies DirtyRoundResult;
    const h = start({ input: { maxDirtyRounds: 5 }, steps: { migrateVm: [{ value: { finalRound: final } }], sendDirtyObjects: [changed(3)] } });
    const out = await h.finish();
    expect(h.sequence()).toEqual([...HAPPY_PREFIX, 'completeMigration', 'finishSource']);
    expect(h.journal).toEqual(HAPPY_JOURNAL.filter((p) => p !== 'syncingDirty'));
    expect(out).toMatchObject({ outcome: 'completed', errors: [], dirtyRounds: 1, rounds: [{ round: 0, final: true, ...final }] });
  });

  it('a migrateVm result without a final round leaves the rounds to syncingDirty', async () => {
    const h = start({ input: { maxDirtyRounds: 0 }, steps: { migrateVm: [{ value: {} }] } });
    const out = await h.finish();
    expect(h.sequence()).toEqual([...HAPPY_PREFIX, 'dirty#0F', 'completeMigration', 'finishSource']);
    expect(out.dirtyRounds).toBe(1);
  });

  it('times each phase from the entry marks and reports them in order', async () => {
    const h = start({ input: { maxDirtyRounds: 2 }, steps: { sendDirtyObjects: [changed(1), quiet] } });
    const out = await h.finish();
    expect(out.phases).toEqual([
      { phase: 'requesting', ms: WORK_MS },
      { phase: 'holding', ms: WORK_MS },
      { phase: 'sendingState', ms: WORK_MS },
      { phase: 'sendingEvents', ms: WORK_MS },
      { phase: 'migratingVm', ms: WORK_MS },
      { phase: 'syncingDirty', ms: 3 * WORK_MS },
      { phase: 'completing', ms: WORK_MS },
      { phase: 'finishing', ms: WORK_MS },
    ]);
    expect(out.rounds).toEqual([
      { round: 0, final: false, changedElements: 1, events: 1 },
      { round: 1, final: false, changedElements: 0, events: 0 },
      { round: 2, final: true, changedElements: 0, events: 0 },
    ]);
  });

  it('sums the time of a phase entered twice (completing, then resolving journaled as completing)', () => {
    expect(
      phaseTimes(
        [
          { phase: 'completing', at: 0 },
          { phase: 'completing', at: 5 },
          { phase: 'finishing', at: 12 },
          { phase: 'completed', at: 20 },
        ],
        ['completed'],
      ),
    ).toEqual([
      { phase: 'completing', ms: 12 },
      { phase: 'finishing', ms: 8 },
    ]);
  });

  it('ends denied without holding anything or rolling back when the target denies', async () => {
    const h = start({ steps: { startMigration: [{ value: { permitted: false, reason: 'not enough memory' } }] } });
    const out = await h.finish();
    expect(h.sequence()).toEqual(['startMigration']);
    expect(h.journal).toEqual(['requesting', 'denied']);
    expect(out).toMatchObject({ outcome: 'denied', reason: 'denied by target: not enough memory', dirtyRounds: 0 });
  });

  it('rejects with a clear error when a step was not provided', async () => {
    const actor = createActor(createSourceMachine(), { input: INPUT, inspect: coverage.inspect }).start();
    await vi.advanceTimersByTimeAsync(0);
    // the placeholder startMigration rejects → roll back, whose placeholder rejects too → aborted with both recorded
    expect(actor.getSnapshot().status).toBe('done');
    expect(actor.getSnapshot().output).toMatchObject({
      outcome: 'aborted',
      reason: 'startMigration failed: mobility source step startMigration not provided',
      errors: ['rollBack failed: mobility source step rollBack not provided'],
    });
  });

  it('runs on the steps and hooks passed with its input, one machine per form for every migration (no provide)', async () => {
    const run = async (migrationId: string, fanOut: boolean) => {
      const seen: string[] = [];
      const journal: string[] = [];
      const ok = async (): Promise<void> => {};
      const steps: SourceInput['steps'] = {
        startMigration: async (i) => (seen.push(`start ${i.migrationId}`), { permitted: true }),
        holdEvents: ok,
        sendManagementState: ok,
        sendEventState: ok,
        migrateVm: async () => (seen.push('migrateVm'), {}),
        sendDirtyObjects: async (i) => (seen.push(`dirty ${i.final ? 'final' : i.round}`), { changedElements: 0, events: 0 }),
        completeMigration: async () => void seen.push('complete'),
        resolveOutcome: async () => 'committed',
        finishSource: async () => void seen.push('finish'),
        rollBack: async () => void seen.push('rollBack'),
        bootIncoming: async () => (seen.push('boot'), { bootMs: 1 }),
        awaitDecision: async () => (seen.push('decision'), { commit: true }),
      };
      const machine = createSourceMachine({ fanOut });
      expect(createSourceMachine({ fanOut })).toBe(machine);
      const actor = createActor(machine, {
        input: { ...INPUT, migrationId, steps, hooks: { journalPhase: (p) => void journal.push(p), reportProgress: () => {}, bootSkipped: () => false } },
        ...(fanOut ? {} : { inspect: coverage.inspect }),
      }).start();
      await vi.advanceTimersByTimeAsync(0);
      return { output: actor.getSnapshot().output, seen, journal };
    };
    const single = await run('m-a', false);
    expect(single.output).toMatchObject({ outcome: 'completed' });
    expect(single.seen).toEqual(['start m-a', 'migrateVm', 'dirty 0', 'dirty final', 'complete', 'finish']);
    expect(single.journal).toEqual(['requesting', 'holding', 'sendingState', 'sendingEvents', 'migratingVm', 'syncingDirty', 'completing', 'finishing', 'completed']);
    const child = await run('m-b', true);
    expect(child.output).toMatchObject({ outcome: 'completed' });
    expect(child.seen).toEqual(['start m-b', 'migrateVm', 'dirty 0', 'dirty final', 'boot', 'decision', 'complete', 'finish']);
  });
});

/** Each step that rolls back on failure, with the script that makes it fail on the given behaviour. */
const ROLLBACK_STEPS: readonly { name: string; step: Step; state: unknown; before: readonly string[]; plan: (b: Behaviour) => Script }[] = [
  { name: 'startMigration', step: 'startMigration', state: 'requesting', before: [], plan: (b) => ({ steps: { startMigration: [b] } }) },
  { name: 'holdEvents', step: 'holdEvents', state: 'holding', before: HAPPY_PREFIX.slice(0, 1), plan: (b) => ({ steps: { holdEvents: [b] } }) },
  {
    name: 'sendManagementState',
    step: 'sendManagementState',
    state: 'sendingState',
    before: HAPPY_PREFIX.slice(0, 2),
    plan: (b) => ({ steps: { sendManagementState: [b] } }),
  },
  { name: 'sendEventState', step: 'sendEventState', state: 'sendingEvents', before: HAPPY_PREFIX.slice(0, 3), plan: (b) => ({ steps: { sendEventState: [b] } }) },
  { name: 'migrateVm', step: 'migrateVm', state: { migratingVm: 'copying' }, before: HAPPY_PREFIX.slice(0, 4), plan: (b) => ({ steps: { migrateVm: [b] } }) },
  {
    name: 'sendDirtyObjects (a round)',
    step: 'sendDirtyObjects',
    state: { syncingDirty: 'round' },
    before: [...HAPPY_PREFIX, 'dirty#0'],
    plan: (b) => ({ steps: { sendDirtyObjects: [changed(1), b] } }),
  },
  {
    name: 'sendDirtyObjects (the final round)',
    step: 'sendDirtyObjects',
    state: { syncingDirty: 'finalRound' },
    before: [...HAPPY_PREFIX, 'dirty#0'],
    plan: (b) => ({ steps: { sendDirtyObjects: [quiet, b] } }),
  },
];

describe('source machine: a pre-warm child\'s copy waits for its command untimed (copyUntimed)', () => {
  it('while copyUntimed holds, migrateVm outlasts vmMs many times, the copy not restarted; once it does not, the next vmMs rolls back', async () => {
    let untimed = true;
    const h = start({ steps: { migrateVm: ['hang'] }, input: { hooks: { journalPhase: () => {}, reportProgress: () => {}, copyUntimed: () => untimed } } });
    await h.advanceUntil(() => h.calls.length === HAPPY_PREFIX.length);
    await vi.advanceTimersByTimeAsync(VM_MS * 3 + 1);
    expect(h.state()).toEqual({ migratingVm: 'copying' });
    expect(h.calls.filter((c) => c.step === 'migrateVm')).toHaveLength(1);
    expect(h.journal.filter((p) => p === 'migratingVm')).toHaveLength(1);
    // The command came (or came vmMs ago): the copy is timed again from the next re-arm.
    untimed = false;
    await vi.advanceTimersByTimeAsync(VM_MS);
    expect(h.state()).toBe('rollingBack');
    expect(await h.finish()).toMatchObject({ outcome: 'aborted', reason: `migrateVm timed out after ${VM_MS} ms` });
  });

  it('CANCEL while it waits still rolls back at once', async () => {
    const h = start({ steps: { migrateVm: ['hang'] }, input: { hooks: { journalPhase: () => {}, reportProgress: () => {}, copyUntimed: () => true } } });
    await h.advanceUntil(() => h.calls.length === HAPPY_PREFIX.length);
    await vi.advanceTimersByTimeAsync(VM_MS * 2);
    h.actor.send({ type: 'CANCEL', reason: 'prewarm --cancel' });
    expect(h.state()).toBe('rollingBack');
    expect(await h.finish()).toMatchObject({ outcome: 'aborted' });
  });
});

describe('source machine: a fault at each step before completing rolls back', () => {
  it.each(ROLLBACK_STEPS)('$name rejects → rollingBack with the step in the reason → aborted', async ({ step, before, plan }) => {
    const h = start(plan('reject'));
    const out = await h.finish();
    const failedCall = h.sequence().length - 2;
    expect(h.sequence().slice(0, failedCall)).toEqual(before);
    expect(h.sequence().at(-1)).toBe('rollBack');
    expect(h.calls.at(-2)?.step).toBe(step);
    const reason = `${step} failed: ${step} exploded`;
    expect(h.calls.at(-1)?.input).toMatchObject({ ...h.input, reason });
    expect(h.journal.slice(-2)).toEqual(['rollingBack', 'aborted']);
    expect(h.journal).not.toContain('completing');
    expect(h.state()).toBe('aborted');
    expect(out).toMatchObject({ outcome: 'aborted', reason, errors: [] });
  });

  it.each(ROLLBACK_STEPS)('$name hangs → times out after its limit → rollingBack → aborted', async ({ step, state, before, plan }) => {
    const h = start(plan('hang'));
    await h.advanceUntil(() => h.calls.length === before.length + 1);
    expect(h.state()).toEqual(state);
    // startMigration may build the VM's image at the target (issue 14): the VM timeout bounds it too.
    const limit = step === 'migrateVm' || step === 'startMigration' ? VM_MS : STEP_MS;
    await vi.advanceTimersByTimeAsync(limit - 1);
    expect(h.state()).toEqual(state);
    if (limit === VM_MS) expect(limit).toBeGreaterThan(STEP_MS); // stepMs alone did not end it
    await vi.advanceTimersByTimeAsync(1);
    expect(h.state()).toBe('rollingBack');
    const out = await h.finish();
    const reason = `${step} timed out after ${limit} ms`;
    expect(h.calls.at(-1)).toMatchObject({ step: 'rollBack', input: { reason } });
    expect(out).toMatchObject({ outcome: 'aborted', reason });
  });

  it.each(ROLLBACK_STEPS)('CANCEL during $name → rollingBack with the operator reason → aborted', async ({ step, state, before, plan }) => {
    const h = start(plan('hang'));
    await h.advanceUntil(() => h.calls.length === before.length + 1);
    expect(h.state()).toEqual(state);
    h.actor.send({ type: 'CANCEL', reason: 'operator changed their mind' });
    expect(h.state()).toBe('rollingBack');
    const out = await h.finish();
    const reason = `cancelled during ${step}: operator changed their mind`;
    expect(h.calls.at(-1)).toMatchObject({ step: 'rollBack', input: { reason } });
    expect(out).toMatchObject({ outcome: 'aborted', reason });
    expect(h.journal.slice(-2)).toEqual(['rollingBack', 'aborted']);
  });

  it.each([
    ['rejects', 'reject', 'rollBack failed: rollBack exploded'],
    ['hangs', 'hang', `rollBack timed out after ${STEP_MS} ms`],
  ] as const)('rollBack that %s still ends aborted, the error recorded next to the reason', async (_n, b, error) => {
    const h = start({ steps: { migrateVm: ['reject'], rollBack: [b] } });
    const out = await h.finish();
    expect(h.journal.slice(-2)).toEqual(['rollingBack', 'aborted']);
    expect(out).toMatchObject({ outcome: 'aborted', reason: 'migrateVm failed: migrateVm exploded', errors: [error] });
  });
});

describe('source machine: completing, resolving and finishing never roll back blindly', () => {
  const TAIL = [...HAPPY_PREFIX, 'dirty#0', 'dirty#1F', 'completeMigration'];

  it.each([
    ['rejects', 'reject', 'completeMigration failed: completeMigration exploded'],
    ['times out', 'hang', `completeMigration timed out after ${STEP_MS} ms`],
  ] as const)('completeMigration %s, the target says committed → finishing → completed', async (_n, b, error) => {
    const h = start({ steps: { completeMigration: [b], resolveOutcome: [{ value: 'committed' }] } });
    const out = await h.finish();
    expect(h.sequence()).toEqual([...TAIL, 'resolveOutcome', 'finishSource']);
    expect(h.journal).toEqual([...HAPPY_JOURNAL.slice(0, 7), 'completing', 'finishing', 'completed']);
    expect(out).toMatchObject({ outcome: 'completed', errors: [error] });
    expect(out.reason).toBeUndefined();
  });

  it('completeMigration fails and the target did not commit → rollingBack with that reason → aborted', async () => {
    const h = start({ steps: { completeMigration: ['reject'], resolveOutcome: [{ value: 'notCommitted' }] } });
    const out = await h.finish();
    expect(h.sequence()).toEqual([...TAIL, 'resolveOutcome', 'rollBack']);
    const reason = 'target did not commit after completeMigration failed: completeMigration exploded';
    expect(h.calls.at(-1)?.input).toMatchObject({ reason });
    expect(out).toMatchObject({ outcome: 'aborted', reason });
    expect(h.journal.slice(-4)).toEqual(['completing', 'completing', 'rollingBack', 'aborted']);
  });

  it('keeps asking while the target cannot be reached (error, then a hung question), then follows the answer', async () => {
    const h = start({ steps: { completeMigration: ['reject'], resolveOutcome: ['reject', 'hang', { value: 'notCommitted' }] } });
    await h.advanceUntil(() => h.calls.at(-1)?.step === 'resolveOutcome');
    // first answer: an error after WORK_MS; the machine waits resolveRetry (= stepMs) before asking again
    await vi.advanceTimersByTimeAsync(WORK_MS);
    expect(h.state()).toEqual({ resolving: 'waiting' });
    await vi.advanceTimersByTimeAsync(STEP_MS - 1);
    expect(h.calls.filter((c) => c.step === 'resolveOutcome')).toHaveLength(1);
    await vi.advanceTimersByTimeAsync(1);
    expect(h.calls.filter((c) => c.step === 'resolveOutcome')).toHaveLength(2);
    // second question hangs: it times out after stepMs, then another retry delay
    await vi.advanceTimersByTimeAsync(STEP_MS);
    expect(h.state()).toEqual({ resolving: 'waiting' });
    expect(h.state()).not.toBe('rollingBack');
    await vi.advanceTimersByTimeAsync(STEP_MS);
    expect(h.calls.filter((c) => c.step === 'resolveOutcome')).toHaveLength(3);
    const out = await h.finish();
    expect(h.actor.getSnapshot().context.resolveAttempts).toBe(3);
    expect(out.outcome).toBe('aborted');
    expect(out.errors).toEqual([
      'completeMigration failed: completeMigration exploded',
      'resolveOutcome failed: resolveOutcome exploded',
      `resolveOutcome timed out after ${STEP_MS} ms`,
    ]);
    expect(out.reason).toBe('target did not commit after completeMigration failed: completeMigration exploded');
  });

  it('never gives up on resolving by itself (no roll back without an answer)', async () => {
    const h = start({ steps: { completeMigration: ['reject'], resolveOutcome: ['reject'] } });
    await h.advanceUntil(() => h.calls.at(-1)?.step === 'resolveOutcome');
    await vi.advanceTimersByTimeAsync(20 * STEP_MS);
    expect(h.state()).toHaveProperty('resolving');
    expect(h.calls.some((c) => c.step === 'rollBack')).toBe(false);
    h.actor.send({ type: 'CANCEL', reason: 'too late' });
    expect(h.state()).toHaveProperty('resolving');
    h.actor.stop();
  });

  it.each([
    ['completing', 'completeMigration'],
    ['finishing', 'finishSource'],
  ] as const)('ignores CANCEL in %s', async (state, step) => {
    const h = start({ steps: { [step]: ['hang'] } });
    await h.advanceUntil(() => h.state() === state);
    h.actor.send({ type: 'CANCEL', reason: 'too late' });
    expect(h.state()).toBe(state);
    h.actor.stop();
  });

  it('ignores CANCEL while rolling back', async () => {
    const h = start({ steps: { migrateVm: ['reject'], rollBack: ['hang'] } });
    await h.advanceUntil(() => h.state() === 'rollingBack');
    h.actor.send({ type: 'CANCEL', reason: 'again' });
    expect(h.state()).toBe('rollingBack');
    expect(h.actor.getSnapshot().context.reason).toBe('migrateVm failed: migrateVm exploded');
    h.actor.stop();
  });

  it.each([
    ['rejects', 'reject', 'finishSource failed: finishSource exploded'],
    ['hangs', 'hang', `finishSource timed out after ${STEP_MS} ms`],
  ] as const)('finishSource that %s still ends completed (the target owns the VM), the error recorded', async (_n, b, error) => {
    const h = start({ steps: { finishSource: [b] } });
    const out = await h.finish();
    expect(h.sequence().filter((s) => s === 'rollBack')).toEqual([]);
    expect(out).toMatchObject({ outcome: 'completed', errors: [error] });
  });
});

// Runs last in this file: it checks what the scenarios above exercised.
describe('source machine: coverage', () => {
  it('reached every state and took every transition in the tests above', () => {
    expect(coverage.missingStates()).toEqual([]);
    expect(coverage.missingTransitions()).toEqual([]);
    expect(coverage.taken.size).toBeGreaterThan(40);
  });
});
