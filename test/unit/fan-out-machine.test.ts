import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { createActor, fromPromise } from 'xstate';
import type { FanOutVerdict, SourceInput, SourcePhase } from '../../core/mobility/mobility-contract.ts';
import { createSourceMachine, type SourceOutput } from '../../core/mobility/source-machine.ts';
import { TransitionCoverage, allTransitions } from '../harness/coverage.ts';

/**
 * The source machine's fan-out form (a child of a migration to several destinations): its final
 * round asks its destination to boot (or, when that round went at the switch or the destination
 * answered without booting, BootIncoming does: `booting`) and it waits for the coordinator (`awaitingDecision`);
 * chosen it completes, terminated or failing it rolls back with the reason. Every transition of the
 * two states (read from the machine with @xstate/graph's node walk) is taken by the scenarios.
 */

const STEP_MS = 1_000;
const INPUT: SourceInput = { migrationId: 'm-1~b', vm: 'web-1', target: 'b', maxDirtyRounds: 1, timeouts: { stepMs: STEP_MS, vmMs: 5_000 } };
const coverage = new TransitionCoverage(createSourceMachine({ fanOut: true }));
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

type Behaviour = 'ok' | 'reject' | 'hang' | { readonly value: unknown };

/** `sole`: the coordinator says no other destination can win (bootSkipped); `atSwitch`: migrateVm sent the final round at the switch. */
/** `chosen`: the coordinator chose it already (a pre-warm's command named it alone); `changing`: every dirty round changed something. */
/** `boot` is how the destination boots, with the final round or (`roundIgnoresBoot`: it answers that round without booting) with BootIncoming. */
function start(
  boot: Behaviour,
  decision: Behaviour,
  o: { readonly sole?: boolean; readonly atSwitch?: boolean; readonly changing?: boolean; readonly chosen?: boolean; readonly roundIgnoresBoot?: boolean; readonly finalRoundFails?: boolean } = {},
) {
  const journal: SourcePhase[] = [];
  const calls: string[] = [];
  let rollBackReason: string | undefined;
  const step = (name: string, b: Behaviour, value: unknown) =>
    fromPromise(async () => {
      calls.push(name);
      if (b === 'hang') return new Promise<never>(() => {});
      await sleep(10);
      if (b === 'reject') throw new Error(`${name} exploded`);
      return (b === 'ok' ? value : b.value) as never;
    });
  const ok = (name: string, value: unknown = undefined) => step(name, 'ok', value);
  const machine = createSourceMachine({ fanOut: true }).provide({
    actors: {
      startMigration: ok('startMigration', { permitted: true }),
      holdEvents: ok('holdEvents'),
      sendManagementState: ok('sendManagementState'),
      sendEventState: ok('sendEventState'),
      migrateVm: ok('migrateVm', o.atSwitch ? { finalRound: { changedElements: 1, events: 2 } } : {}),
      // As the service's step: a racing child's final round asks to boot.
      sendDirtyObjects: fromPromise(async ({ input }: { input: { readonly final: boolean } }) => {
        calls.push('sendDirtyObjects');
        const round = { changedElements: o.changing ? 1 : 0, events: 0 };
        if (input.final && o.finalRoundFails === true) {
          await sleep(10);
          throw new Error('link lost');
        }
        if (!input.final || o.sole === true || o.roundIgnoresBoot === true) {
          await sleep(10);
          return round;
        }
        calls.push('bootWithRound');
        if (boot === 'hang') return new Promise<never>(() => {});
        await sleep(10);
        if (boot === 'reject') throw Object.assign(new Error('boot refused by the target: MigrationStateFailed: bootIncoming failed: injected'), { details: { bootRefused: true } });
        return { ...round, booted: true };
      }),
      completeMigration: ok('completeMigration'),
      resolveOutcome: ok('resolveOutcome', 'committed'),
      finishSource: ok('finishSource'),
      rollBack: fromPromise(async ({ input }: { input: { reason: string } }) => {
        calls.push('rollBack');
        rollBackReason = input.reason;
      }),
      bootIncoming: step('bootIncoming', boot, { bootMs: 3 }),
      awaitDecision: step('awaitDecision', decision, { commit: true } satisfies FanOutVerdict),
    } as never,
    actions: {
      journalPhase: (_, params) => void journal.push(params.phase),
      readyWithoutBoot: () => void calls.push('readyWithoutBoot'),
      readyBooted: () => void calls.push('readyBooted'),
    },
    guards: { bootSkipped: () => o.sole === true, alreadyChosen: () => o.chosen === true },
  });
  const actor = createActor(machine, { input: INPUT, inspect: coverage.inspect }).start();
  const until = async (pred: () => boolean) => {
    for (let i = 0; i < 20_000 && !pred(); i++) await vi.advanceTimersByTimeAsync(1);
    expect(pred(), `stuck in ${JSON.stringify(actor.getSnapshot().value)}`).toBe(true);
  };
  const finish = async () => {
    await until(() => actor.getSnapshot().status === 'done');
    return actor.getSnapshot().output as SourceOutput;
  };
  return { actor, journal, calls, until, finish, rollBackReason: () => rollBackReason };
}

beforeEach(() => {
  vi.useFakeTimers();
  vi.setSystemTime(1_000_000);
});
afterEach(() => vi.useRealTimers());

describe('source machine, fan-out child', () => {
  it('chosen: boots with the final round (no BootIncoming), then completes as a single migration does', async () => {
    const m = start('ok', 'ok');
    const out = await m.finish();
    expect(out.outcome).toBe('completed');
    expect(m.journal).toEqual(['requesting', 'holding', 'sendingState', 'sendingEvents', 'migratingVm', 'syncingDirty', 'awaitingDecision', 'completing', 'finishing', 'completed']);
    // Only the final round asks to boot; MigrationComplete only after the boot and the verdict.
    expect(m.calls.filter((c) => c === 'bootWithRound')).toHaveLength(1);
    expect(m.calls.slice(-5)).toEqual(['bootWithRound', 'readyBooted', 'awaitDecision', 'completeMigration', 'finishSource']);
    expect(m.calls).not.toContain('bootIncoming');
    expect(out.rounds.at(-1)).toMatchObject({ final: true, booted: true });
  });

  it('a destination that answers the final round without booting is booted with BootIncoming', async () => {
    const m = start('ok', 'ok', { roundIgnoresBoot: true });
    const out = await m.finish();
    expect(out.outcome).toBe('completed');
    expect(m.journal).toEqual(['requesting', 'holding', 'sendingState', 'sendingEvents', 'migratingVm', 'syncingDirty', 'booting', 'awaitingDecision', 'completing', 'finishing', 'completed']);
    expect(m.calls.slice(-4)).toEqual(['bootIncoming', 'awaitDecision', 'completeMigration', 'finishSource']);
  });

  it('racing: rounds while they change something, up to maxDirtyRounds, then the final one; the sole child sends the final alone all the same', async () => {
    const raced = await start('ok', 'ok', { changing: true }).finish();
    expect(raced.rounds.map((r) => r.final)).toEqual([false, true]);
    const sole = await start('ok', 'ok', { changing: true, sole: true }).finish();
    expect(sole.rounds.map((r) => r.final)).toEqual([true]);
  });

  it('nothing left to race (bootSkipped): the final round alone, no BootIncoming; the coordinator hears it is ready, then its verdict commits', async () => {
    const m = start('reject', 'ok', { sole: true });
    const out = await m.finish();
    expect(out.outcome).toBe('completed');
    expect(m.journal).toEqual(['requesting', 'holding', 'sendingState', 'sendingEvents', 'migratingVm', 'syncingDirty', 'awaitingDecision', 'completing', 'finishing', 'completed']);
    // maxDirtyRounds allows a round before the final one; with the VM stopped and the embots frozen it would ship nothing more.
    expect(out.rounds).toEqual([{ changedElements: 0, events: 0, round: 0, final: true }]);
    expect(m.calls.filter((c) => c === 'sendDirtyObjects')).toHaveLength(1);
    expect(m.calls).not.toContain('bootIncoming');
    // Ready is reported before the verdict is awaited: the coordinator journals the winner, then answers.
    expect(m.calls.slice(-4)).toEqual(['readyWithoutBoot', 'awaitDecision', 'completeMigration', 'finishSource']);
  });

  it('the final round sent at the switch (qemu): booting next, or straight to the verdict when nothing is left to race', async () => {
    const raced = start('ok', 'ok', { atSwitch: true });
    const a = await raced.finish();
    expect(a.outcome).toBe('completed');
    expect(raced.journal).toEqual(['requesting', 'holding', 'sendingState', 'sendingEvents', 'migratingVm', 'booting', 'awaitingDecision', 'completing', 'finishing', 'completed']);
    expect(a.rounds).toEqual([{ changedElements: 1, events: 2, round: 0, final: true }]);
    expect(raced.calls).not.toContain('sendDirtyObjects');

    const sole = start('reject', 'ok', { atSwitch: true, sole: true });
    const b = await sole.finish();
    expect(b.outcome).toBe('completed');
    expect(sole.journal).toEqual(['requesting', 'holding', 'sendingState', 'sendingEvents', 'migratingVm', 'awaitingDecision', 'completing', 'finishing', 'completed']);
    expect(b.rounds).toEqual([{ changedElements: 1, events: 2, round: 0, final: true }]);
    expect(sole.calls).not.toContain('bootIncoming');
    expect(sole.calls).not.toContain('sendDirtyObjects');
    expect(sole.calls.slice(-4)).toEqual(['readyWithoutBoot', 'awaitDecision', 'completeMigration', 'finishSource']);
  });

  it('chosen at the command (named alone): from the final round straight to completing, no BootIncoming and no verdict to wait for', async () => {
    for (const atSwitch of [false, true]) {
      const m = start('reject', 'reject', { sole: true, chosen: true, atSwitch });
      const out = await m.finish();
      expect(out.outcome).toBe('completed');
      expect(m.journal).toEqual(['requesting', 'holding', 'sendingState', 'sendingEvents', 'migratingVm', ...(atSwitch ? [] : ['syncingDirty']), 'completing', 'finishing', 'completed']);
      expect(out.rounds.map((r) => r.final)).toEqual([true]);
      expect(m.calls).not.toContain('bootIncoming');
      expect(m.calls).not.toContain('awaitDecision');
      // The coordinator still hears it is ready (its report changes nothing there), before MigrationComplete.
      expect(m.calls.slice(-3)).toEqual(['readyWithoutBoot', 'completeMigration', 'finishSource']);
    }
  });

  it('chosen but racing (not bootSkipped): boots and asks for the verdict as any racing child does', async () => {
    const m = start('ok', 'ok', { chosen: true });
    await m.finish();
    expect(m.calls).toContain('bootWithRound');
    expect(m.calls).toContain('awaitDecision');
  });

  it('nothing left to race but the verdict is a termination (the pre-warm cancelled meanwhile): rolls back, no MigrationComplete', async () => {
    const reason = 'terminated: the migrate command failed (boom)';
    const m = start('ok', { value: { commit: false, reason } satisfies FanOutVerdict }, { sole: true, atSwitch: true });
    const out = await m.finish();
    expect(out).toMatchObject({ outcome: 'aborted', reason });
    expect(m.calls).not.toContain('completeMigration');
    expect(m.calls).not.toContain('bootIncoming');
  });

  it('terminated: rolls back with the verdict reason word for word, never sends MigrationComplete', async () => {
    const reason = 'terminated: c booted first (migration m-1)';
    const m = start('ok', { value: { commit: false, reason } satisfies FanOutVerdict });
    const out = await m.finish();
    expect(out).toMatchObject({ outcome: 'aborted', reason });
    expect(m.rollBackReason()).toBe(reason);
    expect(m.calls).not.toContain('completeMigration');
    expect(m.journal.slice(-3)).toEqual(['awaitingDecision', 'rollingBack', 'aborted']);
  });

  it('its destination refuses to boot, with the final round or with BootIncoming: rolls back as bootIncoming failed (the coordinator counts it bootFailed)', async () => {
    for (const roundIgnoresBoot of [false, true]) {
      const m = start('reject', 'ok', { roundIgnoresBoot });
      const out = await m.finish();
      expect(out.outcome).toBe('aborted');
      expect(out.reason).toMatch(/^bootIncoming failed: /);
      expect(m.calls).not.toContain('awaitDecision');
    }
  });

  it('any other failure of the final round stays a sendDirtyObjects failure (the coordinator counts it failed, not bootFailed)', async () => {
    const m = start('ok', 'ok', { finalRoundFails: true });
    const out = await m.finish();
    expect(out.outcome).toBe('aborted');
    expect(out.reason).toMatch(/^sendDirtyObjects failed: link lost/);
    expect(m.calls).not.toContain('awaitDecision');
  });

  it('no BootReady within the step timeout: rolls back, timed out in the step that asked (the final round, or BootIncoming)', async () => {
    const m = start('hang', 'ok');
    const out = await m.finish();
    expect(out.reason).toBe(`sendDirtyObjects timed out after ${STEP_MS} ms`);
    const legacy = await start('hang', 'ok', { roundIgnoresBoot: true }).finish();
    expect(legacy.reason).toBe(`bootIncoming timed out after ${STEP_MS} ms`);
  });

  it('CANCEL (the coordinator terminating it) while booting (with the round or with BootIncoming) or while waiting rolls back', async () => {
    for (const [boot, at, roundIgnoresBoot] of [['hang', { syncingDirty: 'finalRound' }, false], ['hang', 'booting', true], ['ok', 'awaitingDecision', false]] as const) {
      const m = start(boot, 'hang', { roundIgnoresBoot });
      await m.until(() => JSON.stringify(m.actor.getSnapshot().value) === JSON.stringify(at));
      m.actor.send({ type: 'CANCEL', reason: 'terminated: d booted first (migration m-1)' });
      const out = await m.finish();
      expect(out.outcome).toBe('aborted');
      expect(out.reason).toContain('terminated: d booted first');
    }
  });

  it('a verdict that fails rolls back', async () => {
    const out = await start('ok', 'reject').finish();
    expect(out.reason).toMatch(/^awaitDecision failed: /);
  });

  it('the single-destination machine has neither state: its final round still leads to completing', () => {
    const single = createSourceMachine();
    const ids = [...allTransitions(single)].map((k) => k.split('|')[0]);
    expect(ids.some((id) => id === 'source.booting' || id === 'source.awaitingDecision')).toBe(false);
    const fan = [...allTransitions(createSourceMachine({ fanOut: true }))];
    expect(fan.filter((k) => k.startsWith('source.booting|') || k.startsWith('source.awaitingDecision|')).length).toBeGreaterThanOrEqual(6);
  });
});

describe('source machine, fan-out child: coverage', () => {
  it('took every transition out of booting and awaitingDecision, and every way after the final round', () => {
    const ours = [...allTransitions(createSourceMachine({ fanOut: true }))].filter(
      (k) =>
        k.startsWith('source.booting|') ||
        k.startsWith('source.awaitingDecision|') ||
        ((k.startsWith('source.migratingVm|') || k.startsWith('source.syncingDirty.finalRound|')) && k.includes('|xstate.done.actor.')) ||
        k.startsWith('source.syncingDirty.checking|'),
    );
    expect(ours.filter((k) => !coverage.taken.has(k))).toEqual([]);
    expect(coverage.visited.has('source.booting')).toBe(true);
    expect(coverage.visited.has('source.awaitingDecision')).toBe(true);
  });
});
