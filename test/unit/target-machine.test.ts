import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { createActor, fromPromise, type StateValue } from 'xstate';
import type { StepReply, TargetInput, TargetPhase, TargetSteps } from '../../core/mobility/mobility-contract.ts';
import { createTargetMachine, TARGET_REQUEST_TYPES, type TargetOutput, type TargetRequestType } from '../../core/mobility/target-machine.ts';
import type { BootIncoming, DirtyObjects, ManagementEventState, ManagementState, MigrationComplete, StartMigration, VmMemory } from '../../core/wire/frames.ts';
import { TransitionCoverage } from '../harness/coverage.ts';

const STEP_MS = 1_000;
const VM_MS = 5_000;
const WORK_MS = 10;
const MID = 'm-1';

type Step = keyof TargetSteps;
type Behaviour = 'ok' | 'reject' | 'rejectInstantiation' | 'hang' | { readonly value: unknown };
type Reply = Parameters<StepReply>[0];

const START: StartMigration = {
  type: 'StartMigration',
  reqId: 1,
  migrationId: MID,
  vm: 'web-1',
  elements: new Uint8Array([1]),
  resources: { memory: 1 << 20, vcpus: 1 },
  modules: ['vm-watchdog@1.0.0#abc'],
};

let reqId = 10;
function frameFor(type: TargetRequestType, opts: { seq?: number; last?: boolean; round?: number; boot?: boolean } = {}) {
  const base = { reqId: reqId++, migrationId: MID };
  switch (type) {
    case 'MANAGEMENT_STATE':
      return { ...base, type: 'ManagementState', elements: new Uint8Array([1]), embots: new Uint8Array([2]) } satisfies ManagementState;
    case 'MANAGEMENT_EVENT_STATE':
      return { ...base, type: 'ManagementEventState', holdQueues: new Uint8Array([3]) } satisfies ManagementEventState;
    case 'VM_MEMORY':
      return { ...base, type: 'VmMemory', vm: 'web-1', round: 0, seq: opts.seq ?? 0, last: opts.last ?? false, pages: new Uint8Array(8) } satisfies VmMemory;
    case 'DIRTY_OBJECTS':
      return { ...base, type: 'DirtyObjects', round: opts.round ?? 0, deltas: new Uint8Array([4]), events: new Uint8Array([5]), ...(opts.boot ? { boot: true } : {}) } satisfies DirtyObjects;
    case 'MIGRATION_COMPLETE':
      return { ...base, type: 'MigrationComplete' } satisfies MigrationComplete;
    case 'BOOT_INCOMING':
      return { ...base, type: 'BootIncoming' } satisfies BootIncoming;
  }
}

const coverage = new TransitionCoverage(createTargetMachine());
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

class InstantiationFailure extends Error {
  readonly instantiation = true;
}

/** A target actor over fake steps; records step calls, replies, the StartMigration answer and the journal. */
function start(steps: Partial<Record<Step, readonly Behaviour[]>> = {}) {
  const calls: { step: Step; input: Record<string, unknown> }[] = [];
  const replies: { to: TargetRequestType; reply: Reply }[] = [];
  const starts: { permitted: boolean; reason?: string }[] = [];
  const journal: TargetPhase[] = [];
  const progress: TargetPhase[] = [];
  const counts = new Map<Step, number>();
  let probes = 0;
  const defaults: Partial<Record<Step, unknown>> = { evaluate: { permitted: true } };

  const fake = (step: Step) =>
    fromPromise(async ({ input }: { input: unknown }) => {
      const n = counts.get(step) ?? 0;
      counts.set(step, n + 1);
      calls.push({ step, input: input as Record<string, unknown> });
      const plan = steps[step] ?? [];
      const b: Behaviour = plan[Math.min(n, plan.length - 1)] ?? 'ok';
      if (b === 'hang') return new Promise<never>(() => {});
      await sleep(WORK_MS);
      if (b === 'reject') throw new Error(`${step} exploded`);
      if (b === 'rejectInstantiation') throw new InstantiationFailure(`${step}: module hash mismatch`);
      return (b === 'ok' ? defaults[step] : b.value) as never;
    });

  const names: Step[] = ['evaluate', 'stageState', 'stageEvents', 'receiveMemory', 'applyDirty', 'bootIncoming', 'commit', 'discard'];
  const machine = createTargetMachine().provide({
    actors: Object.fromEntries(names.map((s) => [s, fake(s)])) as never,
    actions: {
      journalPhase: (_, params) => void journal.push(params.phase),
      reportProgress: (_, params) => void progress.push(params.phase),
      probeSource: () => void probes++,
    },
  });
  const input: TargetInput = {
    migrationId: MID,
    vm: 'web-1',
    source: 'a',
    timeouts: { stepMs: STEP_MS, vmMs: VM_MS },
    start: START,
    replyStart: (r) => void starts.push(r),
  };
  const actor = createActor(machine, { input, inspect: coverage.inspect });
  actor.start();

  const send = (type: TargetRequestType, opts?: { seq?: number; last?: boolean; round?: number; boot?: boolean }) => {
    const frame = frameFor(type, opts);
    actor.send({ type, frame, reply: (reply: Reply) => void replies.push({ to: type, reply }) } as never);
    return frame;
  };
  const state = () => actor.getSnapshot().value;
  const output = () => actor.getSnapshot().output as TargetOutput | undefined;
  const settle = () => vi.advanceTimersByTimeAsync(WORK_MS);
  const finish = async () => {
    for (let i = 0; i < 1_000 && actor.getSnapshot().status !== 'done'; i++) await settle();
    expect(actor.getSnapshot().status, `stuck in ${JSON.stringify(state())}`).toBe('done');
    return output()!;
  };
  const sequence = () => calls.map((c) => c.step);
  return { actor, calls, replies, starts, journal, progress, send, state, output, settle, finish, sequence, probes: () => probes };
}
type Harness = ReturnType<typeof start>;

/** The happy path of one destination among several (BootIncoming before the commit), one move at a time, to reach any state on it. */
const MOVES: readonly ((h: Harness) => unknown)[] = [
  (h) => h.settle(),
  (h) => h.send('MANAGEMENT_STATE'),
  (h) => h.settle(),
  (h) => h.send('MANAGEMENT_EVENT_STATE'),
  (h) => h.settle(),
  (h) => h.send('VM_MEMORY', { seq: 0 }),
  (h) => h.settle(),
  (h) => h.send('VM_MEMORY', { seq: 1, last: true }),
  (h) => h.settle(),
  (h) => h.send('DIRTY_OBJECTS', { round: 0 }),
  (h) => h.settle(),
  (h) => h.send('BOOT_INCOMING'),
  (h) => h.settle(),
  (h) => h.send('MIGRATION_COMPLETE'),
  (h) => h.settle(),
];

async function reach(h: Harness, target: StateValue) {
  for (const move of MOVES) {
    if (JSON.stringify(h.state()) === JSON.stringify(target)) return;
    await move(h);
  }
  expect(h.state()).toEqual(target);
}

/** Waiting states, what they expect and how long they wait. */
const WAITING: readonly { label: string; value: StateValue; expects: readonly TargetRequestType[]; limit: number; before: readonly Step[] }[] = [
  { label: 'permitted', value: 'permitted', expects: ['MANAGEMENT_STATE'], limit: STEP_MS, before: ['evaluate'] },
  { label: 'stateStaged', value: 'stateStaged', expects: ['MANAGEMENT_EVENT_STATE'], limit: STEP_MS, before: ['evaluate', 'stageState'] },
  { label: 'eventsStaged', value: 'eventsStaged', expects: ['VM_MEMORY'], limit: VM_MS, before: ['evaluate', 'stageState', 'stageEvents'] },
  {
    label: 'receivingMemory',
    value: { receivingMemory: 'waiting' },
    expects: ['VM_MEMORY'],
    limit: VM_MS,
    before: ['evaluate', 'stageState', 'stageEvents', 'receiveMemory'],
  },
  {
    label: 'vmReceived',
    value: 'vmReceived',
    expects: ['DIRTY_OBJECTS', 'MIGRATION_COMPLETE'],
    limit: STEP_MS,
    before: ['evaluate', 'stageState', 'stageEvents', 'receiveMemory', 'receiveMemory'],
  },
  {
    label: 'syncing',
    value: 'syncing',
    expects: ['DIRTY_OBJECTS', 'MIGRATION_COMPLETE', 'BOOT_INCOMING'],
    limit: STEP_MS,
    before: ['evaluate', 'stageState', 'stageEvents', 'receiveMemory', 'receiveMemory', 'applyDirty'],
  },
  {
    label: 'booted',
    value: 'booted',
    expects: ['MIGRATION_COMPLETE'],
    limit: STEP_MS,
    before: ['evaluate', 'stageState', 'stageEvents', 'receiveMemory', 'receiveMemory', 'applyDirty', 'bootIncoming'],
  },
];

/** States where a step runs (reached with that step hanging), and the request it serves. */
const BUSY: readonly { label: string; value: StateValue; step: Step; serves: TargetRequestType }[] = [
  { label: 'stagingState', value: 'stagingState', step: 'stageState', serves: 'MANAGEMENT_STATE' },
  { label: 'stagingEvents', value: 'stagingEvents', step: 'stageEvents', serves: 'MANAGEMENT_EVENT_STATE' },
  { label: 'receivingMemory', value: { receivingMemory: 'applying' }, step: 'receiveMemory', serves: 'VM_MEMORY' },
  { label: 'applyingDirty', value: 'applyingDirty', step: 'applyDirty', serves: 'DIRTY_OBJECTS' },
  { label: 'booting', value: 'booting', step: 'bootIncoming', serves: 'BOOT_INCOMING' },
];

const ok: Reply = { ok: true };

beforeEach(() => {
  vi.useFakeTimers();
  vi.setSystemTime(1_000_000);
});
afterEach(() => vi.useRealTimers());

describe('target machine: happy paths', () => {
  it.each([0, 2])('stages state and events, receives three memory frames, applies %i dirty rounds, commits', async (rounds) => {
    const h = start();
    await h.settle();
    expect(h.starts).toEqual([{ permitted: true }]);
    const sent = [h.send('MANAGEMENT_STATE')];
    await h.settle();
    sent.push(h.send('MANAGEMENT_EVENT_STATE'));
    await h.settle();
    for (const [seq, last] of [
      [0, false],
      [1, false],
      [2, true],
    ] as const) {
      sent.push(h.send('VM_MEMORY', { seq, last }));
      await h.settle();
      expect(h.state()).toEqual(last ? 'vmReceived' : { receivingMemory: 'waiting' });
    }
    for (let round = 0; round < rounds; round++) {
      sent.push(h.send('DIRTY_OBJECTS', { round }));
      await h.settle();
      expect(h.state()).toBe('syncing');
    }
    h.send('MIGRATION_COMPLETE');
    const out = await h.finish();

    expect(h.sequence()).toEqual(['evaluate', 'stageState', 'stageEvents', 'receiveMemory', 'receiveMemory', 'receiveMemory', ...Array(rounds).fill('applyDirty'), 'commit']);
    // each step got the frame of its own request
    h.calls.slice(1, -1).forEach((c, i) => expect(c.input.frame).toBe(sent[i]));
    expect(h.calls[0]?.input).toMatchObject({ migrationId: MID, source: 'a', start: START });
    expect(h.replies).toEqual([
      { to: 'MANAGEMENT_STATE', reply: ok },
      { to: 'MANAGEMENT_EVENT_STATE', reply: ok },
      { to: 'VM_MEMORY', reply: ok },
      { to: 'VM_MEMORY', reply: ok },
      { to: 'VM_MEMORY', reply: ok },
      ...Array(rounds).fill({ to: 'DIRTY_OBJECTS', reply: ok }),
      { to: 'MIGRATION_COMPLETE', reply: ok },
    ]);
    const phases: TargetPhase[] = [
      'evaluating',
      'permitted',
      'stateStaged',
      'eventsStaged',
      'vmReceived',
      ...(rounds > 0 ? (['syncing'] as const) : []),
      ...Array<TargetPhase>(Math.max(0, rounds - 1)).fill('syncing'),
      'committing',
      'committed',
    ];
    expect(h.journal).toEqual(phases);
    expect(h.progress).toEqual(phases);
    expect(out).toEqual({ outcome: 'completed', errors: [], memoryFrames: 3, dirtyRounds: rounds });
  });

  it('one destination among several: boots after the final round, waits booted, commits on MigrationComplete', async () => {
    const h = start();
    await reach(h, 'booted');
    expect(h.replies.at(-1)).toEqual({ to: 'BOOT_INCOMING', reply: ok });
    expect(h.sequence()).not.toContain('commit');
    h.send('MIGRATION_COMPLETE');
    const out = await h.finish();
    expect(h.sequence().slice(-2)).toEqual(['bootIncoming', 'commit']);
    expect(h.journal.slice(-4)).toEqual(['syncing', 'booted', 'committing', 'committed']);
    expect(out).toMatchObject({ outcome: 'completed', errors: [] });
  });

  it('one destination among several, the final round asking to boot: applied, then booted, answered once booted; MigrationComplete commits', async () => {
    const h = start();
    await reach(h, 'syncing');
    const dirtyReplies = h.replies.length;
    h.send('DIRTY_OBJECTS', { round: 1, boot: true });
    await h.settle();
    // Applied, booting now: the round is not answered before the boot is done.
    expect(h.sequence().slice(-2)).toEqual(['applyDirty', 'bootIncoming']);
    expect(h.replies).toHaveLength(dirtyReplies);
    await h.settle();
    expect(h.state()).toBe('booted');
    expect(h.replies.at(-1)).toEqual({ to: 'DIRTY_OBJECTS', reply: ok });
    expect(h.calls.at(-1)!.input['frame']).toMatchObject({ type: 'DirtyObjects', boot: true });
    h.send('MIGRATION_COMPLETE');
    const out = await h.finish();
    expect(h.journal.slice(-4)).toEqual(['syncing', 'booted', 'committing', 'committed']);
    expect(out).toMatchObject({ outcome: 'completed', dirtyRounds: 2 });
  });

  it('the final round asking to boot, and the boot fails: that round is answered with the failure (bootIncoming failed), everything discarded', async () => {
    const h = start({ bootIncoming: ['reject'] });
    await reach(h, 'syncing');
    h.send('DIRTY_OBJECTS', { round: 1, boot: true });
    const out = await h.finish();
    expect(h.replies.at(-1)).toEqual({ to: 'DIRTY_OBJECTS', reply: { ok: false, reason: 'bootIncoming failed: bootIncoming exploded', instantiation: false, step: 'bootIncoming' } });
    expect(h.sequence().at(-1)).toBe('discard');
    expect(out).toMatchObject({ outcome: 'aborted', reason: 'bootIncoming failed: bootIncoming exploded' });
  });

  it('one destination among several that lost: Abort while booted discards everything, naming why', async () => {
    const h = start();
    await reach(h, 'booted');
    h.actor.send({ type: 'ABORT', reason: 'terminated: c booted first (migration m-1)' });
    const out = await h.finish();
    expect(h.sequence()).not.toContain('commit');
    expect(h.sequence().at(-1)).toBe('discard');
    expect(out).toMatchObject({ outcome: 'aborted', reason: 'aborted by source in booted: terminated: c booted first (migration m-1)' });
  });

  it('denies with the policy reason and stages nothing', async () => {
    const h = start({ evaluate: [{ value: { permitted: false, reason: 'not enough memory' } }] });
    const out = await h.finish();
    expect(h.starts).toEqual([{ permitted: false, reason: 'not enough memory' }]);
    expect(h.sequence()).toEqual(['evaluate']);
    expect(h.journal).toEqual(['evaluating', 'denied']);
    expect(out).toMatchObject({ outcome: 'denied', reason: 'denied: not enough memory' });
  });

  it('denies with a default reason when the policy gives none', async () => {
    const h = start({ evaluate: [{ value: { permitted: false } }] });
    await h.finish();
    expect(h.starts).toEqual([{ permitted: false, reason: 'denied by migration policy' }]);
  });

  it('rejects with a clear error when a step was not provided, and discards', async () => {
    const starts: unknown[] = [];
    const actor = createActor(createTargetMachine(), {
      input: { migrationId: MID, vm: 'web-1', source: 'a', timeouts: { stepMs: STEP_MS, vmMs: VM_MS }, start: START, replyStart: (r) => void starts.push(r) },
      inspect: coverage.inspect,
    }).start();
    await vi.advanceTimersByTimeAsync(0);
    expect(actor.getSnapshot().output).toMatchObject({
      outcome: 'aborted',
      reason: 'evaluate failed: mobility target step evaluate not provided',
      errors: ['discard failed: mobility target step discard not provided'],
    });
    expect(starts).toEqual([{ permitted: false, reason: 'evaluate failed: mobility target step evaluate not provided' }]);
  });

  it('runs on the steps and phase hooks passed with its input, one machine for every migration (no provide)', async () => {
    const machine = createTargetMachine();
    expect(createTargetMachine()).toBe(machine);
    const run = async (migrationId: string) => {
      const seen: string[] = [];
      const steps: TargetSteps = {
        evaluate: async (input) => (seen.push(`evaluate ${input.migrationId}`), { permitted: true }),
        stageState: async () => void seen.push('stageState'),
        stageEvents: async () => void seen.push('stageEvents'),
        receiveMemory: async () => void seen.push('receiveMemory'),
        applyDirty: async () => void seen.push('applyDirty'),
        bootIncoming: async () => void seen.push('bootIncoming'),
        commit: async (input) => void seen.push(`commit ${input.migrationId}`),
        discard: async () => void seen.push('discard'),
      };
      const journal: string[] = [];
      const replies: Reply[] = [];
      const actor = createActor(machine, {
        input: { migrationId, vm: 'web-1', source: 'a', timeouts: { stepMs: STEP_MS, vmMs: VM_MS }, start: START, replyStart: () => {}, steps, hooks: { journalPhase: (p) => void journal.push(p), reportProgress: () => {} } },
        inspect: coverage.inspect,
      }).start();
      const send = async (type: TargetRequestType, opts: { last?: boolean } = {}) => {
        actor.send({ type, frame: frameFor(type, opts), reply: (r: Reply) => void replies.push(r) } as never);
        await vi.advanceTimersByTimeAsync(0);
      };
      await vi.advanceTimersByTimeAsync(0);
      await send('MANAGEMENT_STATE');
      await send('MANAGEMENT_EVENT_STATE');
      await send('VM_MEMORY', { last: true });
      await send('MIGRATION_COMPLETE');
      return { output: actor.getSnapshot().output, seen, journal, replies };
    };
    const [one, two] = [await run('m-a'), await run('m-b')];
    for (const [r, id] of [[one, 'm-a'], [two, 'm-b']] as const) {
      expect(r.output).toMatchObject({ outcome: 'completed' });
      expect(r.seen).toEqual([`evaluate ${id}`, 'stageState', 'stageEvents', 'receiveMemory', `commit ${id}`]);
      expect(r.journal[0]).toBe('evaluating');
      expect(r.journal.at(-1)).toBe('committed');
      expect(r.replies.every((x) => x.ok)).toBe(true);
    }
  });

  it('keeps working when a reply callback throws (the closed link arrives as ABORT)', async () => {
    const h = start();
    await h.settle();
    h.actor.send({
      type: 'MANAGEMENT_STATE',
      frame: frameFor('MANAGEMENT_STATE') as ManagementState,
      reply: () => {
        throw new Error('socket closed');
      },
    });
    await h.settle();
    expect(h.state()).toBe('stateStaged');
    h.actor.send({ type: 'ABORT', reason: 'link closed' });
    const out = await h.finish();
    expect(out).toMatchObject({ outcome: 'aborted', reason: 'aborted by source in stateStaged: link closed' });
  });
});

describe('target machine: a fault at each step replies with the failure and discards', () => {
  it('evaluate rejects → StartMigration answered with a denial naming evaluate → discard → aborted', async () => {
    const h = start({ evaluate: ['reject'] });
    const out = await h.finish();
    const reason = 'evaluate failed: evaluate exploded';
    expect(h.starts).toEqual([{ permitted: false, reason }]);
    expect(h.sequence()).toEqual(['evaluate', 'discard']);
    expect(h.calls.at(-1)?.input).toMatchObject({ reason });
    expect(h.journal).toEqual(['evaluating', 'discarding', 'aborted']);
    expect(out).toMatchObject({ outcome: 'aborted', reason });
  });

  const FAULTS: readonly { name: string; steps: Partial<Record<Step, readonly Behaviour[]>>; step: Step; at: TargetRequestType; moves: number; instantiation: boolean }[] = [
    { name: 'stageState', steps: { stageState: ['reject'] }, step: 'stageState', at: 'MANAGEMENT_STATE', moves: 3, instantiation: false },
    { name: 'stageState (instantiation)', steps: { stageState: ['rejectInstantiation'] }, step: 'stageState', at: 'MANAGEMENT_STATE', moves: 3, instantiation: true },
    { name: 'stageEvents', steps: { stageEvents: ['reject'] }, step: 'stageEvents', at: 'MANAGEMENT_EVENT_STATE', moves: 5, instantiation: false },
    {
      name: 'stageEvents (instantiation)',
      steps: { stageEvents: ['rejectInstantiation'] },
      step: 'stageEvents',
      at: 'MANAGEMENT_EVENT_STATE',
      moves: 5,
      instantiation: true,
    },
    { name: 'receiveMemory (first frame)', steps: { receiveMemory: ['reject'] }, step: 'receiveMemory', at: 'VM_MEMORY', moves: 7, instantiation: false },
    { name: 'receiveMemory (last frame)', steps: { receiveMemory: ['ok', 'reject'] }, step: 'receiveMemory', at: 'VM_MEMORY', moves: 9, instantiation: false },
    { name: 'applyDirty', steps: { applyDirty: ['reject'] }, step: 'applyDirty', at: 'DIRTY_OBJECTS', moves: 11, instantiation: false },
    { name: 'bootIncoming', steps: { bootIncoming: ['reject'] }, step: 'bootIncoming', at: 'BOOT_INCOMING', moves: 13, instantiation: false },
    { name: 'commit', steps: { commit: ['reject'] }, step: 'commit', at: 'MIGRATION_COMPLETE', moves: 15, instantiation: false },
  ];

  it.each(FAULTS)('$name rejects → the request is answered with the failure → discard → aborted', async ({ steps, step, at, moves, instantiation }) => {
    const h = start(steps);
    for (const move of MOVES.slice(0, moves)) await move(h);
    const out = await h.finish();
    const reason = instantiation ? `${step} failed: ${step}: module hash mismatch` : `${step} failed: ${step} exploded`;
    // The failed step goes with the reply (MigrationStateFailed.failedStep); a timeout, an abort or a refusal names none (below).
    expect(h.replies.at(-1)).toEqual({ to: at, reply: { ok: false, reason, instantiation, step } });
    expect(h.replies.slice(0, -1).every((r) => r.reply.ok)).toBe(true);
    expect(h.sequence().slice(-2)).toEqual([step, 'discard']);
    expect(h.calls.at(-1)?.input).toMatchObject({ reason });
    expect(h.journal.slice(-2)).toEqual(['discarding', 'aborted']);
    expect(h.journal).not.toContain('committed');
    expect(out).toMatchObject({ outcome: 'aborted', reason, errors: [] });
  });

  it.each([
    ['rejects', 'reject', 'discard failed: discard exploded'],
    ['hangs', 'hang', `discard timed out after ${STEP_MS} ms`],
  ] as const)('discard that %s still ends aborted, the error recorded', async (_n, b, error) => {
    const h = start({ stageState: ['reject'], discard: [b] });
    await h.settle();
    h.send('MANAGEMENT_STATE');
    const out = await h.finish();
    expect(h.sequence()).toEqual(['evaluate', 'stageState', 'discard']);
    expect(out).toMatchObject({ outcome: 'aborted', reason: 'stageState failed: stageState exploded', errors: [error] });
  });
});

describe('target machine: timeouts while waiting', () => {
  it('evaluate hangs → times out after stepMs → StartMigration denied → discard', async () => {
    const h = start({ evaluate: ['hang'] });
    await vi.advanceTimersByTimeAsync(STEP_MS - 1);
    expect(h.state()).toBe('evaluating');
    await vi.advanceTimersByTimeAsync(1);
    expect(h.state()).toBe('discarding');
    const out = await h.finish();
    const reason = `timed out after ${STEP_MS} ms waiting in evaluating`;
    expect(h.starts).toEqual([{ permitted: false, reason }]);
    expect(out).toMatchObject({ outcome: 'aborted', reason });
  });

  it.each(WAITING)('$label waits $limit ms for the next request, then discards', async ({ label, value, limit, before }) => {
    const h = start();
    await reach(h, value);
    expect(h.sequence()).toEqual(before);
    await vi.advanceTimersByTimeAsync(limit - 1);
    expect(h.state()).toEqual(value);
    await vi.advanceTimersByTimeAsync(1);
    expect(h.state()).toBe('discarding');
    const out = await h.finish();
    const reason = `timed out after ${limit} ms waiting in ${label}`;
    expect(h.calls.at(-1)).toMatchObject({ step: 'discard', input: { reason } });
    expect(out).toMatchObject({ outcome: 'aborted', reason });
  });
});

describe('target machine: a pre-warm\'s copy (PREWARMING)', () => {
  const memoryWaits = WAITING.filter((w) => w.limit === VM_MS);

  it.each(memoryWaits)('in $label waits past vmMs for its memory (told before the state or in it), then goes on to commit', async ({ value }) => {
    for (const early of [true, false]) {
      const h = start();
      if (early) h.actor.send({ type: 'PREWARMING' });
      await reach(h, value);
      if (!early) h.actor.send({ type: 'PREWARMING' });
      await vi.advanceTimersByTimeAsync(VM_MS * 3 + 1);
      expect(h.state(), `early ${early}`).toEqual(value);
      // Each vmMs it asks the service whether the source is still there.
      expect(h.probes()).toBe(3);
      // The memory comes at the command; then as any migration.
      if (h.state() === 'eventsStaged') {
        h.send('VM_MEMORY', { seq: 0 });
        await h.settle();
      }
      h.send('VM_MEMORY', { seq: 1, last: true });
      await h.settle();
      h.send('MIGRATION_COMPLETE');
      expect(await h.finish()).toMatchObject({ outcome: 'completed' });
      expect(h.sequence()).not.toContain('discard');
    }
  });

  it.each(memoryWaits)('in $label still discards on ABORT (the source\'s link closed)', async ({ label, value }) => {
    const h = start();
    h.actor.send({ type: 'PREWARMING' });
    await reach(h, value);
    await vi.advanceTimersByTimeAsync(VM_MS * 2);
    h.actor.send({ type: 'ABORT', reason: 'the source disconnected' });
    const out = await h.finish();
    expect(out).toMatchObject({ outcome: 'aborted', reason: `aborted by source in ${label}: the source disconnected` });
  });

  it('does not change the waits for anything else: after the memory, the next request is timed as usual', async () => {
    const h = start();
    h.actor.send({ type: 'PREWARMING' });
    await reach(h, 'vmReceived');
    await vi.advanceTimersByTimeAsync(STEP_MS);
    expect(h.state()).toBe('discarding');
    expect(await h.finish()).toMatchObject({ outcome: 'aborted', reason: `timed out after ${STEP_MS} ms waiting in vmReceived` });
  });
});

describe('target machine: ABORT', () => {
  it('in evaluating → StartMigration answered with a denial → discard', async () => {
    const h = start({ evaluate: ['hang'] });
    h.actor.send({ type: 'ABORT', reason: 'source gave up' });
    const out = await h.finish();
    const reason = 'aborted by source in evaluating: source gave up';
    expect(h.starts).toEqual([{ permitted: false, reason }]);
    expect(h.calls.at(-1)).toMatchObject({ step: 'discard', input: { reason } });
    expect(out).toMatchObject({ outcome: 'aborted', reason });
  });

  it.each(WAITING)('in $label → discard → aborted', async ({ label, value }) => {
    const h = start();
    await reach(h, value);
    const replies = h.replies.length;
    h.actor.send({ type: 'ABORT', reason: 'link closed' });
    expect(h.state()).toBe('discarding');
    const out = await h.finish();
    const reason = `aborted by source in ${label}: link closed`;
    expect(h.calls.at(-1)).toMatchObject({ step: 'discard', input: { reason } });
    expect(h.replies).toHaveLength(replies);
    expect(out).toMatchObject({ outcome: 'aborted', reason });
  });

  it.each(BUSY)('in $label (step running) → its request answered with the failure → discard', async ({ label, value, step, serves }) => {
    const h = start({ [step]: ['hang'] });
    await reach(h, value);
    h.actor.send({ type: 'ABORT', reason: 'link closed' });
    const out = await h.finish();
    const reason = `aborted by source in ${label}: link closed`;
    expect(h.replies.at(-1)).toEqual({ to: serves, reply: { ok: false, reason, instantiation: false } });
    expect(h.calls.at(-1)).toMatchObject({ step: 'discard', input: { reason } });
    expect(out).toMatchObject({ outcome: 'aborted', reason });
  });

  it('is ignored in committing: the commit decides', async () => {
    const h = start({ commit: [{ value: undefined }] });
    await reach(h, 'committing');
    h.actor.send({ type: 'ABORT', reason: 'too late' });
    expect(h.state()).toBe('committing');
    const out = await h.finish();
    expect(h.sequence()).not.toContain('discard');
    expect(h.replies.at(-1)).toEqual({ to: 'MIGRATION_COMPLETE', reply: ok });
    expect(out).toMatchObject({ outcome: 'completed' });
  });

  it('is ignored in discarding', async () => {
    const h = start({ discard: ['hang'] });
    await h.settle();
    h.actor.send({ type: 'ABORT', reason: 'first' });
    h.actor.send({ type: 'ABORT', reason: 'second' });
    expect(h.state()).toBe('discarding');
    expect(h.actor.getSnapshot().context.reason).toBe('aborted by source in permitted: first');
    expect(h.sequence().filter((s) => s === 'discard')).toHaveLength(1);
    h.actor.stop();
  });
});

describe('target machine: requests out of order are refused', () => {
  const waitingCases = WAITING.flatMap((w) => TARGET_REQUEST_TYPES.filter((t) => !w.expects.includes(t)).map((type) => ({ ...w, type })));

  it.each(waitingCases)('$type in $label → refused → discard → aborted', async ({ label, value, type }) => {
    const h = start();
    await reach(h, value);
    h.send(type);
    const reason = `unexpected ${type} in ${label}`;
    expect(h.replies.at(-1)).toEqual({ to: type, reply: { ok: false, reason } });
    expect(h.state()).toBe('discarding');
    const out = await h.finish();
    expect(h.calls.at(-1)).toMatchObject({ step: 'discard', input: { reason } });
    expect(out).toMatchObject({ outcome: 'aborted', reason });
  });

  it.each(TARGET_REQUEST_TYPES)('%s in evaluating → refused, StartMigration denied → discard', async (type) => {
    const h = start({ evaluate: ['hang'] });
    h.send(type);
    const reason = `unexpected ${type} in evaluating`;
    expect(h.replies).toEqual([{ to: type, reply: { ok: false, reason } }]);
    expect(h.starts).toEqual([{ permitted: false, reason }]);
    const out = await h.finish();
    expect(out).toMatchObject({ outcome: 'aborted', reason });
  });

  const busyCases = BUSY.flatMap((b) => TARGET_REQUEST_TYPES.map((type) => ({ ...b, type })));
  it.each(busyCases)('$type while $label runs → refused, the running request failed too → discard', async ({ label, value, step, serves, type }) => {
    const h = start({ [step]: ['hang'] });
    await reach(h, value);
    h.send(type);
    const reason = `unexpected ${type} in ${label}`;
    expect(h.replies.slice(-2)).toEqual([
      { to: type, reply: { ok: false, reason } },
      { to: serves, reply: { ok: false, reason, instantiation: false } },
    ]);
    const out = await h.finish();
    expect(h.calls.at(-1)).toMatchObject({ step: 'discard', input: { reason } });
    expect(out).toMatchObject({ outcome: 'aborted', reason });
  });

  it.each(TARGET_REQUEST_TYPES)('%s while committing → refused, the commit goes on', async (type) => {
    const h = start();
    await reach(h, 'committing');
    h.send(type);
    expect(h.replies.at(-1)).toEqual({ to: type, reply: { ok: false, reason: `unexpected ${type} in committing` } });
    expect(h.state()).toBe('committing');
    const out = await h.finish();
    expect(h.replies.at(-1)).toEqual({ to: 'MIGRATION_COMPLETE', reply: ok });
    expect(out).toEqual({ outcome: 'completed', errors: [`unexpected ${type} in committing`], memoryFrames: 2, dirtyRounds: 1 });
  });

  it.each(TARGET_REQUEST_TYPES)('%s while discarding → refused, the discard goes on', async (type) => {
    const h = start({ stageState: ['reject'] });
    await reach(h, 'stagingState');
    await h.settle();
    expect(h.state()).toBe('discarding');
    h.send(type);
    expect(h.replies.at(-1)).toEqual({ to: type, reply: { ok: false, reason: `unexpected ${type} in discarding` } });
    const out = await h.finish();
    expect(out).toMatchObject({ outcome: 'aborted', reason: 'stageState failed: stageState exploded', errors: [`unexpected ${type} in discarding`] });
  });
});

// Runs last in this file: it checks what the scenarios above exercised.
describe('target machine: coverage', () => {
  it('reached every state and took every transition in the tests above', () => {
    expect(coverage.missingStates()).toEqual([]);
    expect(coverage.missingTransitions()).toEqual([]);
    expect(coverage.taken.size).toBeGreaterThan(80);
  });
});
