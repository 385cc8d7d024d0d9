import { afterEach, describe, expect, it } from 'vitest';
import type { MigrationInfo } from '../../core/mobility/migration-record.ts';
import type { PrewarmInfo } from '../../core/mobility/prewarm.ts';
import { sleep, waitFor, type AgentProcess } from '../harness/agent-process.ts';
import { Cluster } from '../harness/cluster.ts';
import { counterOf, tickProducer, type SequencedPoster } from '../harness/counter-stream.ts';
import { expectCleanSoon, expectStreamExact } from '../harness/migration-checks.ts';

/**
 * A pre-warm waits for its command however long it takes (issue 13 point 3: "keeps copying until
 * `embot migrate` arrives"). A destination used to time its wait for the VM's memory like any
 * copy's (`mobility.vmTimeoutMs`, 120 s by default) and discarded a pre-warm held longer. The
 * timeouts here are a few seconds so that a hold of three of them is quick to run; the sim driver.
 * A source that stops answering (SIGSTOPped: its links stay open, as with a host gone without a
 * FIN) is still let go: each destination pings it once per `vmTimeoutMs` while it waits.
 */

let cluster: Cluster | undefined;
afterEach(async () => {
  await cluster?.stop();
  cluster = undefined;
});

const MiB = 1 << 20;
const STEP_MS = 2000;
const VM_MS = 4000;

async function withEvents(): Promise<{ c: Cluster; a: AgentProcess; ticks: SequencedPoster }> {
  cluster = await Cluster.start(['a', 'b', 'c'], {
    plugins: [{ from: 'fixture', name: 'counter' }],
    config: () => ({ mobility: { stepTimeoutMs: STEP_MS, vmTimeoutMs: VM_MS, forwardGraceMs: 5000, trust: { mode: 'any-authenticated-peer' } } }),
  });
  const a = cluster.agent('a');
  await a.client.createVm({ name: 'app', memory: 8 * MiB, dirtyRate: MiB });
  await a.client.vmAction('app', 'start');
  await waitFor(async () => counterOf(await a.client.listEmbots(), 'app'), 10_000, 'counter embot on a');
  const ticks = tickProducer(() => a, 'app');
  await waitFor(() => ticks.acked >= 10, 10_000, 'events before the pre-warm');
  return { c: cluster, a, ticks };
}

async function warmth(a: AgentProcess, id: string): Promise<PrewarmInfo | undefined> {
  const m = (await a.client.listMigrations()).find((x) => x.id === id) as (MigrationInfo & { prewarm?: PrewarmInfo }) | undefined;
  return m?.prewarm;
}

async function untilWarm(a: AgentProcess, id: string): Promise<void> {
  await waitFor(async () => ((await warmth(a, id))?.destinations.every((d) => d.status === 'warming' && d.exitConditionMet) ? true : undefined), 20_000, 'b and c warm');
}

describe('a pre-warm held longer than mobility.vmTimeoutMs', () => {
  it('stays warm at every destination for three times vmTimeoutMs, then switches at the command: one owner, c clean, every event once in order', async () => {
    const { c, a, ticks } = await withEvents();
    const { id } = await a.client.prewarm('app', ['b', 'c']);
    await untilWarm(a, id);
    await sleep(3 * VM_MS);
    const w = await warmth(a, id);
    expect(w?.destinations.map((d) => `${d.name}:${d.status}`)).toEqual(['b:warming', 'c:warming']);
    for (const n of ['b', 'c']) {
      const open = (await c.agent(n).client.listMigrations()).filter((m) => m.outcome === null).map((m) => m.id);
      expect(open, `${n} still holds its copy`).toEqual([`${id}~${n}`]);
    }
    await a.client.migrate('app', 'b');
    const info = await a.client.waitMigration(id, { timeoutMs: 30_000 });
    expect(info.outcome, JSON.stringify(info)).toBe('completed');
    expect(info.summary?.winner).toBe('b');
    await ticks.stop();
    await expectCleanSoon(c.agent('c'));
    await expectStreamExact(c.agent('b'), ticks.acked);
  }, 120_000);

  it('a source that stops answering while warm (SIGSTOP: links open, no FIN) is let go: each destination discards its copy within vmTimeoutMs + stepTimeoutMs of its last answer', async () => {
    const { c, a, ticks } = await withEvents();
    const { id } = await a.client.prewarm('app', ['b', 'c']);
    await untilWarm(a, id);
    await ticks.stop();
    a.child.kill('SIGSTOP');
    try {
      for (const n of ['b', 'c']) {
        const rec = await waitFor(async () => (await c.agent(n).client.listMigrations()).find((m) => m.id === `${id}~${n}` && m.outcome !== null), 3 * (VM_MS + STEP_MS), `${n} lets the silent source go`);
        expect(rec.outcome).toBe('aborted');
        expect(rec.reason).toContain('the source did not answer while the pre-warm waited for its command');
        await expectCleanSoon(c.agent(n));
      }
    } finally {
      a.child.kill('SIGCONT');
    }
    // Back, the source finds its destinations gone: the pre-warm ends, the VM runs here with its embots.
    const info = await a.client.waitMigration(id, { timeoutMs: 60_000 });
    expect(info.outcome).not.toBe('completed');
    expect((await a.client.listVms()).find((v) => v.name === 'app')?.state).toBe('running');
    // Its embot goes on: every acknowledged event processed once, in order (waited for, not read once).
    await expectStreamExact(a, ticks.acked);
  }, 120_000);
});
