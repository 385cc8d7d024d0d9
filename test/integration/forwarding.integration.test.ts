import { afterEach, describe, expect, it } from 'vitest';
import { counterOf } from '../harness/counter-stream.ts';
import { Cluster, migrate } from '../harness/cluster.ts';
import { waitFor, type AgentProcess } from '../harness/agent-process.ts';
import { ControlError, ErrorCodes } from '../../core/errors.ts';

/**
 * Forwarding after a completed migration (issue 11, defects 1 and 2), with real agents: the new
 * owner and the source are killed with SIGKILL and restarted on their data folders.
 */

let cluster: Cluster | undefined;
afterEach(async () => {
  await cluster?.stop();
  cluster = undefined;
});


/** Two agents with the counter fixture; `graceMs` is the source's forwarding grace period. */
async function twoAgents(graceMs: number): Promise<Cluster> {
  cluster = await Cluster.start(['a', 'b'], {
    plugins: [{ from: 'fixture', name: 'counter' }],
    config: () => ({ mobility: { stepTimeoutMs: 3000, vmTimeoutMs: 10_000, forwardGraceMs: graceMs, trust: { mode: 'any-authenticated-peer' } } }),
  });
  return cluster;
}

/** The VM `app` on a with its counter embot, `n` TICKs (seq 0..n-1) processed there, then moved to b. */
async function movedApp(c: Cluster, n: number): Promise<string> {
  const a = c.agent('a');
  await a.client.createVm({ name: 'app', memory: 1 << 20 });
  await a.client.vmAction('app', 'start');
  await waitFor(async () => counterOf(await a.client.listEmbots(), 'app'), 10_000, 'counter embot at a');
  for (let seq = 0; seq < n; seq++) await a.client.emitEvent({ elementId: 'vm:app', type: 'TICK', payload: { seq } });
  const m = await migrate(a, 'app', 'b');
  expect(m.outcome, `migration ${m.outcome}: ${m.reason ?? m.summary?.reason ?? ''}`).toBe('completed');
  return m.id;
}

/** Posts TICKs `from..to-1` to `agent`; each must be acknowledged as forwarded to b. */
async function postForwarded(agent: AgentProcess, from: number, to: number): Promise<void> {
  for (let seq = from; seq < to; seq++) {
    const ack = (await agent.client.emitEvent({ elementId: 'vm:app', type: 'TICK', payload: { seq } })) as { forwardedTo?: string };
    expect(ack.forwardedTo).toBe('b');
  }
}

/** Every TICK 0..n-1 processed exactly once, in order, at b. */
async function expectAllAtB(c: Cluster, n: number): Promise<void> {
  const ctx = await waitFor(async () => {
    const x = counterOf(await c.agent('b').client.listEmbots(), 'app');
    return x && x.count >= n ? x : undefined;
  }, 20_000, `${n} events processed at b`);
  expect(ctx).toMatchObject({ count: n, lastSeq: n - 1, outOfOrder: 0 });
}

async function codeOf(p: Promise<unknown>): Promise<ControlError> {
  const e = await p.then(
    () => undefined,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(ControlError);
  return e as ControlError;
}

describe('forwarding after a migration', () => {
  it('heals when the link to the new owner drops: events acknowledged while b is down reach b once it is back', async () => {
    const c = await twoAgents(60_000);
    await movedApp(c, 5);
    await c.kill('b');
    await postForwarded(c.agent('a'), 5, 10);
    await c.startAgent('b');
    await expectAllAtB(c, 10);
    // The link stays usable: later events follow on it.
    await postForwarded(c.agent('a'), 10, 12);
    await expectAllAtB(c, 12);
  });

  it('a source restarted in the grace period forwards what it journaled before the crash and what is posted after it', async () => {
    const c = await twoAgents(60_000);
    const id = await movedApp(c, 5);
    // b down: these are journaled at a and cannot be forwarded yet.
    await c.kill('b');
    await postForwarded(c.agent('a'), 5, 10);
    await c.kill('a');
    await c.startAgent('a');
    await postForwarded(c.agent('a'), 10, 15);
    await c.startAgent('b');
    await expectAllAtB(c, 15);
    // The VM is b's alone; a's summary counts what it forwarded.
    expect((await c.agent('a').client.listVms()).map((v) => v.name)).not.toContain('app');
    expect((await c.agent('b').client.listVms()).map((v) => v.name)).toContain('app');
    const summary = await waitFor(async () => {
      const s = (await c.agent('a').client.getMigration(id)).summary;
      return s && s.forwarded >= 10 ? s : undefined;
    }, 10_000, 'the forwarded count in the summary');
    expect(summary.deadLettered).toBe(0);
  });

  it('refuses an event for a moved element after the grace period, naming the new owner, also after a restart', async () => {
    const c = await twoAgents(1000);
    const id = await movedApp(c, 3);
    // The source says when the grace period is over (posting to find out would post events).
    const a = c.agent('a');
    await waitFor(() => a.stderr.includes(`grace period of migration ${id} over`), 15_000, 'the end of the grace period');
    const refusal = await codeOf(a.client.emitEvent({ elementId: 'vm:app', type: 'TICK', payload: { seq: 3 } }));
    expect(refusal.code).toBe(ErrorCodes.ELEMENT_MOVED);
    expect(refusal.details).toMatchObject({ owner: 'b', migrationId: id, status: 410 });
    expect(refusal.message).toContain('b');
    // The refused event was not kept anywhere: posted to the owner it is the 4th, not a duplicate.
    await c.agent('b').client.emitEvent({ elementId: 'vm:app', type: 'TICK', payload: { seq: 3 } });
    await expectAllAtB(c, 4);

    await c.kill('a');
    await c.startAgent('a');
    const again = await codeOf(c.agent('a').client.emitEvent({ elementId: 'disk:app.0', type: 'TICK', payload: {} }));
    expect(again.code).toBe(ErrorCodes.ELEMENT_MOVED);
    expect(again.details).toMatchObject({ owner: 'b', migrationId: id });
    // a still runs and takes events for what it does own.
    await c.agent('a').client.emitEvent({ elementId: 'host:a', type: 'PING' });
    expect((await c.agent('a').client.status()).name).toBe('a');
  });

  it('a VM that comes back inside the grace period is managed here again: its events are not forwarded away', async () => {
    const c = await twoAgents(60_000);
    await movedApp(c, 3);
    await postForwarded(c.agent('a'), 3, 5);
    await expectAllAtB(c, 5);
    const back = await migrate(c.agent('b'), 'app', 'a');
    expect(back.outcome).toBe('completed');
    for (let seq = 5; seq < 8; seq++) {
      const ack = (await c.agent('a').client.emitEvent({ elementId: 'vm:app', type: 'TICK', payload: { seq } })) as { forwardedTo?: string };
      expect(ack.forwardedTo).toBeUndefined();
    }
    const ctx = await waitFor(async () => {
      const x = counterOf(await c.agent('a').client.listEmbots(), 'app');
      return x && x.count >= 8 ? x : undefined;
    }, 20_000, 'all 8 events processed at a');
    expect(ctx).toMatchObject({ count: 8, lastSeq: 7, outOfOrder: 0 });
    // ...also after a restart of a (the old forwarding is not resumed).
    await c.kill('a');
    await c.startAgent('a');
    await c.agent('a').client.emitEvent({ elementId: 'vm:app', type: 'TICK', payload: { seq: 8 } });
    const after = await waitFor(async () => {
      const x = counterOf(await c.agent('a').client.listEmbots(), 'app');
      return x && x.count >= 9 ? x : undefined;
    }, 20_000, 'the 9th event processed at a');
    expect(after).toMatchObject({ count: 9, lastSeq: 8, outOfOrder: 0 });
  });

  it('turns events still waiting for an unreachable owner into counted dead letters when the grace period ends', async () => {
    const c = await twoAgents(4000);
    const id = await movedApp(c, 2);
    await c.kill('b');
    await postForwarded(c.agent('a'), 2, 5);
    const letters = await waitFor(async () => {
      const l = (await c.agent('a').client.listDeadLetters()).filter((d) => d.event.elementId === 'vm:app');
      return l.length >= 3 ? l : undefined;
    }, 20_000, 'dead letters at a');
    expect(letters.map((d) => (d.event.payload as { seq: number }).seq).sort()).toEqual([2, 3, 4]);
    for (const d of letters) {
      expect(d.embotId).toBe(`forward:${id}`);
      expect(d.reason).toContain('grace period');
      expect(d.reason).toContain('b');
    }
    const summary = (await c.agent('a').client.getMigration(id)).summary!;
    expect(summary.deadLettered).toBe(3);
    expect((await c.agent('a').client.status()).counts.deadLetters).toBeGreaterThanOrEqual(3);
    // Nothing else is sent later: b, back, has only the events from before the move.
    await c.startAgent('b');
    await c.agent('b').client.emitEvent({ elementId: 'vm:app', type: 'TICK', payload: { seq: 2 } });
    await expectAllAtB(c, 3);
  });
});
