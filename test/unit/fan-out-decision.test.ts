import { describe, expect, it } from 'vitest';
import { ErrorCodes, ProtocolError } from '../../core/errors.ts';
import { decide, recoverFanOut, startFanOut, type FanOutEffect, type FanOutInput, type FanOutState } from '../../core/mobility/fan-out-decision.ts';
import { expectThrownCode } from '../harness/expect-code.ts';
import { prng } from '../harness/prng.ts';

function run(state: FanOutState, inputs: readonly FanOutInput[]): { state: FanOutState; effects: FanOutEffect[] } {
  const effects: FanOutEffect[] = [];
  let s = state;
  for (const i of inputs) {
    const step = decide(s, i);
    s = step.state;
    effects.push(...step.effects);
  }
  return { state: s, effects };
}

describe('fan-out decision: first to boot wins', () => {
  it('the first BootReady wins: journaled before anyone is told, losers terminated with the reason, then the commit', () => {
    const { state, effects } = run(startFanOut('m-1', ['b', 'c', 'd']), [
      { type: 'denied', dest: 'b', reason: 'not enough memory on b' },
      { type: 'bootReady', dest: 'd', atMs: 120 },
      // Crossed its termination on the wire: changes nothing.
      { type: 'bootReady', dest: 'c', atMs: 130 },
      { type: 'winnerCommitted' },
    ]);
    expect(effects).toEqual([
      { type: 'journalWinner', dest: 'd' },
      { type: 'terminate', dest: 'c', reason: 'terminated: d booted first (migration m-1)' },
      { type: 'commit', dest: 'd' },
      { type: 'finishSource', winner: 'd' },
    ]);
    expect(state.phase).toBe('completed');
    expect(state.winner).toBe('d');
    expect(state.destinations).toEqual([
      { name: 'b', status: 'denied', reason: 'not enough memory on b' },
      { name: 'c', status: 'terminated', reason: 'terminated: d booted first (migration m-1)' },
      { name: 'd', status: 'won', bootReadyMs: 120 },
    ]);
  });

  it('none boots: the source takes its VM back once every destination has ended, saying why for each', () => {
    const { state, effects } = run(startFanOut('m-2', ['b', 'c']), [
      { type: 'bootFailed', dest: 'c', reason: 'checksum mismatch' },
      { type: 'failed', dest: 'b', reason: 'migrateVm timed out after 500 ms' },
    ]);
    expect(effects).toEqual([{ type: 'takeBack', reason: 'no destination booted: b: failed (migrateVm timed out after 500 ms); c: bootFailed (checksum mismatch)' }]);
    expect(state.phase).toBe('takingBack');
    expect(state.winner).toBeUndefined();
  });

  it('a winner that surely did not commit: the VM comes back; the others were already terminated', () => {
    const { state, effects } = run(startFanOut('m-3', ['b', 'c']), [
      { type: 'bootReady', dest: 'b', atMs: 10 },
      { type: 'failed', dest: 'b', reason: 'link closed' },
      { type: 'winnerNotCommitted', reason: 'EMBOT_ERR_MIGRATION_UNKNOWN' },
      // Nothing after the decision moves it again.
      { type: 'bootReady', dest: 'c', atMs: 30 },
      { type: 'winnerCommitted' },
    ]);
    expect(effects.map((e) => e.type)).toEqual(['journalWinner', 'terminate', 'commit', 'takeBack']);
    expect(effects.at(-1)).toEqual({ type: 'takeBack', reason: 'winner b did not commit: EMBOT_ERR_MIGRATION_UNKNOWN' });
    expect(state.destinations.find((d) => d.name === 'b')?.status).toBe('failed');
  });

  it('a pre-warm command naming one destination decides at the command: journaled first, the others terminated, then its verdict; its later ready changes nothing', () => {
    const { state, effects } = run(startFanOut('m-7', ['b', 'c', 'd']), [
      { type: 'failed', dest: 'd', reason: 'link closed' },
      { type: 'named', dest: 'b' },
      // c's ready crossed its termination; b's own ready comes after its final round.
      { type: 'bootReady', dest: 'c', atMs: 40 },
      { type: 'bootReady', dest: 'b', atMs: 50 },
      { type: 'winnerCommitted' },
    ]);
    expect(effects).toEqual([
      { type: 'journalWinner', dest: 'b' },
      { type: 'terminate', dest: 'c', reason: 'terminated: not named by the migrate command (migration m-7)' },
      { type: 'commit', dest: 'b' },
      { type: 'finishSource', winner: 'b' },
    ]);
    expect(state.phase).toBe('completed');
    expect(state.destinations).toEqual([
      { name: 'b', status: 'won' },
      { name: 'c', status: 'terminated', reason: 'terminated: not named by the migrate command (migration m-7)' },
      { name: 'd', status: 'failed', reason: 'link closed' },
    ]);
  });

  it('a named winner whose copy then fails never committed: the VM comes back; a second naming changes nothing', () => {
    const { state, effects } = run(startFanOut('m-8', ['b', 'c']), [
      { type: 'named', dest: 'c' },
      { type: 'named', dest: 'b' },
      { type: 'failed', dest: 'c', reason: 'migrateVm failed: every data path failed' },
      { type: 'winnerNotCommitted', reason: 'aborted' },
    ]);
    expect(effects.map((e) => `${e.type}${'dest' in e ? ` ${e.dest}` : ''}`)).toEqual(['journalWinner c', 'terminate b', 'commit c', 'takeBack']);
    expect(state.phase).toBe('takingBack');
    expectThrownCode(() => decide(startFanOut('m-9', ['b']), { type: 'named', dest: 'x' }), ErrorCodes.MIGRATION_MISMATCH, ProtocolError);
  });

  it('a report about a destination not in the fan-out is a coded error', () => {
    expectThrownCode(() => decide(startFanOut('m-4', ['b']), { type: 'bootReady', dest: 'x', atMs: 1 }), ErrorCodes.MIGRATION_MISMATCH, ProtocolError);
  });
});

describe('fan-out decision: a restarted source', () => {
  it('with no winner journaled terminates everyone and takes the VM back', () => {
    const { state, effects } = recoverFanOut('m-5', ['b', 'c'], undefined);
    expect(effects.map((e) => `${e.type}${'dest' in e ? ` ${e.dest}` : ''}`)).toEqual(['terminate b', 'terminate c', 'takeBack']);
    expect(state.phase).toBe('takingBack');
  });

  it('with a winner journaled terminates the others and asks the winner, then goes on as before', () => {
    const rec = recoverFanOut('m-6', ['b', 'c', 'd'], 'c');
    expect(rec.effects).toEqual([
      { type: 'terminate', dest: 'b', reason: 'terminated: c booted first (migration m-6)' },
      { type: 'terminate', dest: 'd', reason: 'terminated: c booted first (migration m-6)' },
      { type: 'resolveWinner', dest: 'c' },
    ]);
    expect(decide(rec.state, { type: 'winnerCommitted' }).effects).toEqual([{ type: 'finishSource', winner: 'c' }]);
    expect(decide(rec.state, { type: 'bootReady', dest: 'b', atMs: 5 }).effects).toEqual([]);
    expectThrownCode(() => recoverFanOut('m-6', ['b', 'c'], 'z'), ErrorCodes.MIGRATION_MISMATCH, ProtocolError);
  });
});

describe('fan-out decision: any order of reports', () => {
  /**
   * Every destination reports once (boot ready, boot failed, denied or failed), in a seeded random
   * order, with duplicates and the winner's commit answer at a random point after the decision.
   */
  it('at most one winner, journaled before any terminate or commit; exactly one end; no loser is committed', () => {
    for (let seed = 1; seed <= 500; seed++) {
      const rnd = prng(seed);
      const names = ['b', 'c', 'd', 'e'].slice(0, 1 + Math.floor(rnd() * 4));
      const kinds = ['bootReady', 'bootFailed', 'denied', 'failed'] as const;
      const reports: FanOutInput[] = names.flatMap((dest) => {
        const kind = kinds[Math.floor(rnd() * kinds.length)]!;
        const one: FanOutInput = kind === 'bootReady' ? { type: kind, dest, atMs: Math.floor(rnd() * 100) } : { type: kind, dest, reason: `${kind} at ${dest}` };
        return rnd() < 0.3 ? [one, one] : [one];
      });
      for (let i = reports.length - 1; i > 0; i--) {
        const j = Math.floor(rnd() * (i + 1));
        [reports[i], reports[j]] = [reports[j]!, reports[i]!];
      }
      let state = startFanOut(`m-${seed}`, names);
      const effects: FanOutEffect[] = [];
      for (const r of reports) {
        const step = decide(state, r);
        state = step.state;
        effects.push(...step.effects);
        if (step.effects.some((e) => e.type === 'commit')) {
          // The winner's answer, now or after the remaining reports.
          const answer: FanOutInput = rnd() < 0.8 ? { type: 'winnerCommitted' } : { type: 'winnerNotCommitted', reason: 'gone' };
          if (rnd() < 0.5) reports.push(answer);
          else {
            const s2 = decide(state, answer);
            state = s2.state;
            effects.push(...s2.effects);
          }
        }
      }
      const ctx = `seed ${seed}: ${JSON.stringify(reports)} -> ${JSON.stringify(effects)}`;
      const journaled = effects.filter((e) => e.type === 'journalWinner');
      expect(journaled.length, ctx).toBeLessThanOrEqual(1);
      const firstReady = reports.find((r) => r.type === 'bootReady');
      expect(journaled[0]?.dest, ctx).toBe(firstReady?.dest);
      const commits = effects.filter((e) => e.type === 'commit');
      expect(commits.map((c) => c.dest), ctx).toEqual(journaled.map((j) => j.dest));
      const firstTold = effects.findIndex((e) => e.type === 'terminate' || e.type === 'commit');
      if (firstTold >= 0) expect(effects.findIndex((e) => e.type === 'journalWinner'), ctx).toBeLessThan(firstTold);
      const terminated = effects.flatMap((e) => (e.type === 'terminate' ? [e.dest] : []));
      expect(new Set(terminated).size, ctx).toBe(terminated.length);
      if (journaled[0]) expect(terminated, ctx).not.toContain(journaled[0].dest);
      const ends = effects.filter((e) => e.type === 'finishSource' || e.type === 'takeBack');
      expect(ends.length, ctx).toBe(1);
      expect(state.phase, ctx).toBe(ends[0]!.type === 'finishSource' ? 'completed' : 'takingBack');
      // After the end every destination is settled, and only the winner with 'won'.
      for (const d of state.destinations) expect(d.status === 'copying' || (d.status === 'ready' && state.phase !== 'committing'), `${ctx}: ${d.name} ${d.status}`).toBe(false);
      expect(state.destinations.filter((d) => d.status === 'won').length, ctx).toBe(state.phase === 'completed' ? 1 : 0);
    }
  });
});
