import { afterEach, describe, expect, it } from 'vitest';
import { Cluster } from '../harness/cluster.ts';
import { sleep, waitFor, type AgentProcess } from '../harness/agent-process.ts';
import { ErrorCodes } from '../../core/errors.ts';
import { counterOf, tickProducer, type SequencedPoster } from '../harness/counter-stream.ts';
import type { MigrationInfo } from '../../core/mobility/migration-record.ts';
import type { PrewarmInfo } from '../../core/mobility/prewarm.ts';
import { cliHere } from '../harness/cli-in-process.ts';
import { expectClean, expectStreamExact } from '../harness/migration-checks.ts';

/**
 * Pre-warm (issue 13 point 3) with real agents on loopback and the sim driver: `embot prewarm app
 * --to b,c` keeps both destinations current while the VM runs and its events are processed at
 * the source; `embot migrate app --to b` switches with only what was dirtied since left to send;
 * `--cancel` leaves nothing behind anywhere. Every acknowledged event is processed exactly once,
 * in order, across it all.
 */

let cluster: Cluster | undefined;
afterEach(async () => {
  await cluster?.stop();
  cluster = undefined;
});

const MiB = 1 << 20;
const VM_BYTES = 16 * MiB;

async function startCluster(): Promise<Cluster> {
  return Cluster.start(['a', 'b', 'c'], {
    plugins: [{ from: 'fixture', name: 'counter' }],
    config: () => ({
      mobility: { stepTimeoutMs: 5000, vmTimeoutMs: 60_000, forwardGraceMs: 5000, trust: { mode: 'any-authenticated-peer' } },
    }),
  });
}

async function vmWithCounter(a: AgentProcess): Promise<void> {
  // A guest that writes: the pre-warm has dirtied pages to re-send after its complete copy.
  await a.client.createVm({ name: 'app', memory: VM_BYTES, dirtyRate: MiB });
  await a.client.vmAction('app', 'start');
  await waitFor(async () => counterOf(await a.client.listEmbots(), 'app'), 10_000, 'counter embot on a');
}

/** The cluster, VM `app` with its counter embot at a, and ticks flowing to a (ten acknowledged). */
async function clusterWithEvents(): Promise<{ c: Cluster; a: AgentProcess; ticks: SequencedPoster }> {
  cluster = await startCluster();
  const c = cluster;
  const a = c.agent('a');
  await vmWithCounter(a);
  const ticks = tickProducer(() => a, 'app');
  await waitFor(() => ticks.acked >= 10, 10_000, 'events before the pre-warm');
  return { c, a, ticks };
}

/** The pre-warm state `embot migrations --json` shows on the source. */
async function warmth(a: AgentProcess, id: string): Promise<PrewarmInfo | undefined> {
  const m = (await a.client.listMigrations()).find((x) => x.id === id) as (MigrationInfo & { prewarm?: PrewarmInfo }) | undefined;
  return m?.prewarm;
}

async function untilWarm(a: AgentProcess, id: string, names: readonly string[]): Promise<PrewarmInfo> {
  let seen: unknown;
  return waitFor(async () => {
    const w = await warmth(a, id);
    seen = w ?? (await a.client.listMigrations());
    if (process.env['DEBUG_PREWARM']) console.log(JSON.stringify(seen));
    const ok = w && names.every((n) => w.destinations.some((d) => d.name === n && d.exitConditionMet && d.rounds > 3 && d.copiedBytes > VM_BYTES));
    return ok ? w : undefined;
  }, 30_000, `${names.join(', ')} warm (exit condition met, rounds re-sent after a complete copy)`).catch((e: unknown) => {
    throw new Error(`${String(e)}; last seen: ${JSON.stringify(seen)}`);
  });
}

describe('pre-warm', () => {
  it('warms b and c while the events are processed at a; migrate --to b switches with little left to send; c is terminated and clean', async () => {
    const { c, a, ticks } = await clusterWithEvents();

    const started = await cliHere(['prewarm', 'app', '--to', 'b,c', '--json', '--agent', a.url]);
    expect(started.code, started.stderr).toBe(0);
    const { id } = JSON.parse(started.stdout) as { id: string };
    await untilWarm(a, id, ['b', 'c']);
    // The hold starts at the command, not at the pre-warm: the embot at a keeps counting meanwhile.
    const before = counterOf(await a.client.listEmbots(), 'app')!.count;
    await waitFor(async () => (counterOf(await a.client.listEmbots(), 'app')!.count > before + 5 ? true : undefined), 10_000, 'events processed at a during the pre-warm');
    expect((await a.client.listVms()).find((v) => v.name === 'app')?.state).toBe('running');
    const human = await cliHere(['migrations', '--agent', a.url]);
    expect(human.stdout).toMatch(/PRE-WARM[\s\S]*b\s+warming[\s\S]*met/);
    // While held, each destination's readings are what the exit condition judges: the VM's dirty
    // rate (1 MiB/s; it once read 0, measured per held round only) and what it dirtied since last sent.
    let remainingSeen = 0;
    for (let i = 0; i < 6; i++) {
      for (const d of (await warmth(a, id))!.destinations) {
        expect(d.dirtyRateBytesPerSec, `${d.name} dirty rate while held`).toBeGreaterThan(MiB / 2);
        expect(d.dirtyRateBytesPerSec, `${d.name} dirty rate while held`).toBeLessThan(MiB * 2);
        expect(d.remainingBytes).toBeLessThan(VM_BYTES / 4);
        if (d.remainingBytes > 0) remainingSeen++;
      }
      await sleep(100);
    }
    expect(remainingSeen, 'readings with pages dirtied since last sent').toBeGreaterThan(0);

    const atCommand = (await warmth(a, id))!;
    const copiedB = atCommand.destinations.find((d) => d.name === 'b')!.copiedBytes;
    const copiedC = atCommand.destinations.find((d) => d.name === 'c')!.copiedBytes;
    const commandAt = Date.now();
    const { id: same } = await a.client.migrate('app', 'b');
    expect(same).toBe(id);
    const info = await a.client.waitMigration(id, { timeoutMs: 90_000 });
    await ticks.stop();

    expect(info.outcome, info.reason).toBe('completed');
    const s = info.summary!;
    expect(s.winner).toBe('b');
    // The summary says when the command came, so the switch shows apart from the warm time (totalMs counts both).
    expect(s.commandedMs).toBeGreaterThanOrEqual(commandAt - 1000 - info.startedAt);
    expect(s.commandedMs).toBeLessThanOrEqual(s.totalMs);
    const by = Object.fromEntries(s.destinations!.map((d) => [d.name, d]));
    expect(by['c']).toMatchObject({ outcome: 'terminated', reason: `terminated: not named by the migrate command (migration ${id})` });
    // c was dropped in two steps: its copy stopped at the command, its child told (the Abort, c's discard) only once
    // b's child had ended, so that tear-down was not inside b's downtime.
    const children = await a.client.listMigrations();
    const childB = children.find((m) => m.id === `${id}~b`)!;
    const childC = children.find((m) => m.id === `${id}~c`)!;
    expect(childB.outcome).toBe('completed');
    expect(childC.outcome).toBe('aborted');
    expect(childC.updatedAt).toBeGreaterThanOrEqual(childB.updatedAt);
    // Named alone, b had nothing to race and was chosen at the command (the winner journaled then): after its
    // final round no BootIncoming and no verdict to wait for, straight to the commit.
    const phasesB = by['b']!.phases.map((p) => p.phase);
    expect(phasesB).not.toContain('booting');
    expect(phasesB).not.toContain('awaitingDecision');
    expect(phasesB).toContain('completing');
    // What c received while warming counts (it once showed only the management bytes of its last try).
    expect(by['c']!.bytes).toBeGreaterThanOrEqual(copiedC);
    expect(by['c']!.bytes).toBeGreaterThan(VM_BYTES);
    // The structure of a warm switch: after the command only what was dirtied since went, not a copy of the VM.
    const memoryAfterCommand = s.memoryBytes - copiedB;
    expect(memoryAfterCommand).toBeLessThan(VM_BYTES / 4);
    // Where the downtime went, step by step after the stop (bench/fan-out.bench.ts prints them): the command and the
    // lift before it, the copy's end, the final round and the commit after, in that order; the stop round sent little.
    const m = s.vmSteps?.afterStop;
    expect(m?.command).toBeLessThanOrEqual(m?.lift ?? Number.NaN);
    expect(m?.lift).toBeLessThanOrEqual(0);
    expect(m?.copyEnd).toBeGreaterThanOrEqual(0);
    expect(m?.finalRound).toBeGreaterThanOrEqual(m?.copyEnd ?? Number.NaN);
    expect(m?.complete).toBeGreaterThanOrEqual(m?.finalRound ?? Number.NaN);
    expect(Math.abs((m?.complete ?? Number.NaN) - (s.downtimeMs ?? Number.NaN))).toBeLessThanOrEqual(2);
    expect(s.precopy?.stopBytes).toBeLessThan(VM_BYTES / 4);

    expect((await c.agent('b').client.listVms()).find((v) => v.name === 'app')?.state).toBe('running');
    await expectClean(a);
    await expectClean(c.agent('c'));
    await expectStreamExact(c.agent('b'), ticks.acked);

    // The same VM cold, b → a: a whole copy after its command.
    const cold = await c.agent('b').client.migrate('app', 'a');
    const coldInfo = await c.agent('b').client.waitMigration(cold.id, { timeoutMs: 90_000 });
    expect(coldInfo.outcome).toBe('completed');
    expect(coldInfo.summary!.memoryBytes).toBeGreaterThanOrEqual(VM_BYTES);
    expect(memoryAfterCommand * 4).toBeLessThan(coldInfo.summary!.memoryBytes);
  }, 180_000);

  it('bad input is refused with codes while it runs; --cancel leaves nothing behind on any host and the VM runs on at a', async () => {
    cluster = await startCluster();
    const c = cluster;
    const a = c.agent('a');
    await vmWithCounter(a);
    await a.client.createVm({ name: 'other', memory: 4 * MiB });
    const ticks = tickProducer(() => a, 'app');
    await waitFor(() => ticks.acked >= 10, 10_000, 'events before the pre-warm');

    const unknown = await cliHere(['prewarm', 'nope', '--to', 'b', '--agent', a.url]);
    expect(unknown.code).toBe(1);
    expect(unknown.stderr).toContain(ErrorCodes.VM_UNKNOWN);
    const self = await cliHere(['prewarm', 'app', '--to', 'a,b', '--agent', a.url]);
    expect(self.code).toBe(2);
    expect(self.stderr).toContain(ErrorCodes.DESTINATIONS_INVALID);
    const noTo = await cliHere(['prewarm', 'app', '--agent', a.url]);
    expect(noTo.code).toBe(2);
    const noPrewarm = await cliHere(['migrate', 'other', '--agent', a.url]);
    expect(noPrewarm.code).toBe(2);
    expect(noPrewarm.stderr).toContain(ErrorCodes.DESTINATIONS_INVALID);

    const { id } = await a.client.prewarm('app', ['b', 'c']);
    const twice = await cliHere(['prewarm', 'app', '--to', 'b', '--agent', a.url]);
    expect(twice.code).toBe(1);
    expect(twice.stderr).toContain(ErrorCodes.VM_BAD_STATE);
    await untilWarm(a, id, ['b', 'c']);
    // A destination this pre-warm does not warm: refused, and the pre-warm goes on.
    await expect(a.client.migrate('app', ['b', 'zz'])).rejects.toMatchObject({ code: ErrorCodes.DESTINATIONS_INVALID });
    // Settings of a migration that starts now are refused, not ignored: the pre-warm's set is fixed.
    const withRetries = await cliHere(['migrate', 'app', '--to', 'b', '--retries', '1', '--fallback', 'c', '--agent', a.url]);
    expect(withRetries.code).toBe(2);
    expect(withRetries.stderr).toMatch(/takes no --retries, --fallback .*\[EMBOT_ERR_DESTINATIONS_INVALID\]/);
    await expect(a.client.migrate('app', 'b', { thresholdMs: 1000 })).rejects.toMatchObject({ code: ErrorCodes.DESTINATIONS_INVALID, details: { problem: 'prewarmCommand' } });
    expect((await warmth(a, id))?.commandedAt).toBeNull();

    const cancelled = await cliHere(['prewarm', 'app', '--cancel', '--json', '--agent', a.url]);
    expect(cancelled.code, cancelled.stderr).toBe(0);
    expect(JSON.parse(cancelled.stdout)).toEqual({ id, cancelled: true });
    const info = await a.client.waitMigration(id, { timeoutMs: 60_000 });
    await ticks.stop();
    expect(info.outcome).toBe('aborted');
    expect(info.summary!.winner).toBeNull();
    const again = await cliHere(['prewarm', 'app', '--cancel', '--agent', a.url]);
    expect(again.code).toBe(1);
    expect(again.stderr).toContain(ErrorCodes.VM_BAD_STATE);

    for (const n of ['b', 'c']) await expectClean(c.agent(n));
    expect((await a.client.listVms()).find((v) => v.name === 'app')?.state).toBe('running');
    expect((await a.client.listMigrations()).filter((m) => m.outcome === null)).toEqual([]);
    await expectStreamExact(a, ticks.acked);
  }, 180_000);

  it('the source SIGKILLed during a pre-warm: after its restart the pre-warm is cancelled, b and c discard, the VM and its embot run on at a', async () => {
    const { c, a, ticks } = await clusterWithEvents();
    const { id } = await a.client.prewarm('app', ['b', 'c']);
    await untilWarm(a, id, ['b', 'c']);
    // Stopped first, so no event is left half-acknowledged by the kill.
    await ticks.stop();
    await c.kill('a');
    await c.startAgent('a');
    const a2 = c.agent('a');
    await c.untilMigrationsSettled(60_000);
    const row = (await a2.client.listMigrations()).find((m) => m.id === id)!;
    expect(row.outcome).toBe('aborted');
    for (const n of ['b', 'c']) await expectClean(c.agent(n));
    expect((await a2.client.listVms()).find((v) => v.name === 'app')?.state).toBe('running');
    await expectStreamExact(a2, ticks.acked);
  }, 180_000);

  it('the source SIGKILLed right after the command journaled its named winner, before the stop: after the restart b is asked and discards, c too; the VM and its embot run on at a', async () => {
    cluster = await startCluster();
    const c = cluster;
    // Restarted to die right after `migrate --to b` claimed b as the winner (EMBOT_FAULT_KILL_AT: the kill is real, only its moment is chosen).
    await c.kill('a');
    await c.startAgent('a', { EMBOT_FAULT_KILL_AT: 'source:winnerNamed' });
    const a = c.agent('a');
    await vmWithCounter(a);
    const ticks = tickProducer(() => a, 'app');
    await waitFor(() => ticks.acked >= 10, 10_000, 'events before the pre-warm');
    const { id } = await a.client.prewarm('app', ['b', 'c']);
    await untilWarm(a, id, ['b', 'c']);
    // Stopped first, so no event is left half-acknowledged by the kill.
    await ticks.stop();
    // The agent may die before it answers.
    await a.client.migrate('app', 'b').catch(() => undefined);
    await waitFor(() => a.child.exitCode !== null || a.child.signalCode !== null, 15_000, 'a to die at source:winnerNamed');
    c.agents.delete('a');
    await c.startAgent('a');
    const a2 = c.agent('a');
    await c.untilMigrationsSettled(60_000);
    const rows = await a2.client.listMigrations();
    expect(rows.find((m) => m.id === id)?.outcome).toBe('aborted');
    // b was the journaled winner: asked after the restart, it had not committed (it discarded when asked).
    expect(rows.find((m) => m.id === `${id}~b`)?.outcome).toBe('aborted');
    for (const n of ['b', 'c']) await expectClean(c.agent(n));
    expect((await a2.client.listVms()).find((v) => v.name === 'app')?.state).toBe('running');
    await expectStreamExact(a2, ticks.acked);
  }, 180_000);
});
