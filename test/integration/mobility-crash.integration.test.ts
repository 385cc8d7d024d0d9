import { afterEach, describe, expect, it } from 'vitest';
import type { CounterContext } from '../harness/counter-stream.ts';
import { Cluster } from '../harness/cluster.ts';
import { sleep, waitFor } from '../harness/agent-process.ts';
import type { EmbotInfo } from '../../core/control/control-api.ts';

/**
 * SIGKILL the source or the target right after it journals each phase (test-only fault point
 * EMBOT_FAULT_KILL_AT; the kill is real), restart it, and check that exactly one agent owns the
 * VM and its embots and that every acknowledged event was processed exactly once, in order.
 */

let cluster: Cluster | undefined;
afterEach(async () => {
  await cluster?.stop();
  cluster = undefined;
});

const counterOf = (embots: readonly EmbotInfo[]) => embots.find((e) => e.id === 'counter/counter/vm:app')?.policies[0]?.context as CounterContext | undefined;

/** What a failed order check shows: each place the counter saw a seq not above the one before, with the seqs around it. */
function orderReport(ctx: CounterContext & { seen?: readonly string[] }): string {
  const seen = (ctx.seen ?? []).map(Number);
  const places: string[] = [];
  for (let i = 1; i < seen.length; i++) if (seen[i]! <= seen[i - 1]!) places.push(`at ${i}: ... ${seen.slice(Math.max(0, i - 8), i + 8).join(' ')} ...`);
  return `count ${ctx.count}, lastSeq ${ctx.lastSeq}, outOfOrder ${ctx.outOfOrder}; seqs seen out of order ${places.length ? places.join('; ') : 'none in the last 1000'}`;
}


const SOURCE_PHASES = ['holding', 'sendingState', 'sendingEvents', 'migratingVm', 'syncingDirty', 'completing', 'finishing'];
const TARGET_PHASES = ['permitted', 'stateStaged', 'eventsStaged', 'vmReceived', 'syncing', 'committing', 'committed'];
/** Who must own the VM after each crash: the target once it has committed (and acknowledged), else the source. */
const owner = (point: string) => (point === 'source:finishing' || point === 'target:committed' ? 'b' : 'a');
const CASES = [...SOURCE_PHASES.map((p) => ['a', `source:${p}`, owner(`source:${p}`)] as const), ...TARGET_PHASES.map((p) => ['b', `target:${p}`, owner(`target:${p}`)] as const)];

/** Agents a and b with the counter plugin, `victim` restarted to die at `point`, and a running VM `app` at a with its counter embot. */
async function faultyCluster(victim: string, point: string): Promise<Cluster> {
  const c = await Cluster.start(['a', 'b'], { plugins: [{ from: 'fixture', name: 'counter' }] });
  cluster = c; // stopped after the test also when the set-up below fails
  await c.kill(victim);
  await c.startAgent(victim, { EMBOT_FAULT_KILL_AT: point });
  const a = c.agent('a');
  await a.client.createVm({ name: 'app', memory: 1 << 20 });
  await a.client.vmAction('app', 'start');
  await waitFor(async () => counterOf(await a.client.listEmbots()), 10_000, 'counter embot');
  return c;
}

describe('crash safety of migrations', () => {
  it.each(CASES)('agent %s killed at %s: %s alone owns the VM, no event lost or repeated', async (victim, point, expectedOwner) => {
    cluster = await faultyCluster(victim, point);
    const a = cluster.agent('a');

    // Sequence-numbered events to a, before and during the migration, until a dies (if it does).
    let acked = 0;
    let running = true;
    const producer = (async () => {
      while (running) {
        try {
          await a.client.emitEvent({ elementId: 'vm:app', type: 'TICK', payload: { seq: acked } });
          acked++;
        } catch {
          return;
        }
      }
    })();
    await waitFor(() => acked >= 20, 10_000, 'events before the move');
    await a.client.migrate('app', 'b');
    const victimProcess = cluster.agent(victim);
    await waitFor(() => victimProcess.child.exitCode !== null || victimProcess.child.signalCode !== null, 15_000, `${victim} to die at ${point}`);
    if (victim === 'b') await waitFor(() => acked >= 40, 10_000, 'events while the target is down');
    running = false;
    await producer;
    cluster.agents.delete(victim);
    await cluster.startAgent(victim);
    const A = cluster.agent('a');
    const B = cluster.agent('b');

    // Both sides settle: no migration left without an outcome.
    await waitFor(async () => {
      const all = [...(await A.client.listMigrations()), ...(await B.client.listMigrations())];
      return all.length > 0 && all.every((m) => m.outcome !== null);
    }, 20_000, 'the migration settled on both sides');

    const [vmsA, vmsB] = [await A.client.listVms(), await B.client.listVms()];
    const owners = [vmsA.some((v) => v.name === 'app') && 'a', vmsB.some((v) => v.name === 'app') && 'b'].filter(Boolean);
    expect(owners).toEqual([expectedOwner]);
    const owner = owners[0] === 'a' ? A : B;
    const other = owners[0] === 'a' ? B : A;
    expect((await other.client.listEmbots()).filter((e) => e.elementIds.includes('vm:app'))).toEqual([]);
    expect((await owner.client.listEmbots()).filter((e) => e.id === 'counter/counter/vm:app')).toHaveLength(1);

    // A few more events at the owner, then every acknowledged one must have been processed once, in order.
    for (let i = 0; i < 5; i++) await owner.client.emitEvent({ elementId: 'vm:app', type: 'TICK', payload: { seq: acked++ } });
    const c = await waitFor(async () => {
      const x = counterOf(await owner.client.listEmbots());
      return x && x.count >= acked ? x : undefined;
    }, 15_000, `all ${acked} events processed at the owner`);
    await sleep(300);
    const settled = counterOf(await owner.client.listEmbots())!;
    // An event whose acknowledgement the dying agent never sent may or may not have been journaled.
    expect(settled.count - acked, orderReport(settled)).toBeGreaterThanOrEqual(0);
    expect(settled.count - acked, orderReport(settled)).toBeLessThanOrEqual(1);
    expect(settled.lastSeq, orderReport(settled)).toBe(settled.count - 1);
    expect(c.outOfOrder, orderReport(c)).toBe(0);
    expect(settled.outOfOrder, orderReport(settled)).toBe(0);
    // Two agents started, one killed and restarted, and every wait above: more than the default 30 s on a loaded machine.
  }, 120_000);

  it('target killed at its commit: events posted to it once it is back wait for the events the source held meanwhile', async () => {
    // The source learns of the commit only when it asks again (a step later) and then hands over what
    // it held while b was down; a producer that turned to b at once must not overtake those.
    cluster = await faultyCluster('b', 'target:committed');
    const a = cluster.agent('a');
    let acked = 0;
    let running = true;
    const producer = (async () => {
      while (running) {
        await a.client.emitEvent({ elementId: 'vm:app', type: 'TICK', payload: { seq: acked } });
        acked++;
      }
    })();
    await waitFor(() => acked >= 20, 10_000, 'events before the move');
    await a.client.migrate('app', 'b');
    const dying = cluster.agent('b');
    await waitFor(() => dying.child.exitCode !== null || dying.child.signalCode !== null, 15_000, 'b to die at target:committed');
    // Held at a while b is down: a's rest grows.
    const atDeath = acked;
    await waitFor(() => acked >= atDeath + 5, 10_000, 'events while the target is down');
    running = false;
    await producer;
    cluster.agents.delete('b');
    await cluster.startAgent('b');
    const B = cluster.agent('b');
    // a asks b again only a step (3 s) after its last try: these posts nearly always reach b before a
    // settles and hands over (without the hand-over wait this case failed 2 of 2 runs, outOfOrder 1).
    for (let i = 0; i < 5; i++) await B.client.emitEvent({ elementId: 'vm:app', type: 'TICK', payload: { seq: acked++ } });
    const c = await waitFor(async () => {
      const x = counterOf(await B.client.listEmbots());
      return x && x.count >= acked ? x : undefined;
    }, 20_000, `all ${acked} events processed at b`);
    await sleep(300);
    const settled = counterOf(await B.client.listEmbots())!;
    expect(settled.count, orderReport(settled)).toBe(acked);
    expect(settled.lastSeq, orderReport(settled)).toBe(acked - 1);
    expect(c.outOfOrder, orderReport(c)).toBe(0);
    expect(settled.outOfOrder, orderReport(settled)).toBe(0);
  }, 120_000);
});
