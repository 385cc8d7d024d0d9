import { expect } from 'vitest';
import { sleep, waitFor, type AgentProcess } from './agent-process.ts';
import { counterOf } from './counter-stream.ts';

/** Checks after a migration of VM `app` with the `counter` fixture embot. */

/** `agent` holds nothing of VM `app`: no VM, no embots, no migration left open. */
export async function expectClean(agent: AgentProcess): Promise<void> {
  expect((await agent.client.listVms()).filter((v) => v.name === 'app')).toEqual([]);
  expect((await agent.client.listEmbots()).filter((e) => e.elementIds.includes('vm:app'))).toEqual([]);
  // No migration left open, so nothing staged or held for it.
  expect((await agent.client.listMigrations()).filter((m) => m.outcome === null)).toEqual([]);
}

/**
 * {@link expectClean} once `agent` has acted on what it was told: a loser's or an aborted
 * destination's roll-back runs after the source's migration has ended, so right after it the
 * destination may still hold the incoming VM for a moment. Fails if it is not clean in time.
 */
export async function expectCleanSoon(agent: AgentProcess, timeoutMs = 30_000): Promise<void> {
  await waitFor(() => expectClean(agent).then(() => true, () => undefined), timeoutMs, `nothing of app left at ${agent.opts.name}`);
  await expectClean(agent);
}

/**
 * More events at the owner (sequence numbers going on from `acked`), then: every acknowledged one
 * processed exactly once, in order.
 */
export async function expectStreamExact(owner: AgentProcess, acked: number): Promise<void> {
  let sent = acked;
  for (let i = 0; i < 5; i++) await owner.client.emitEvent({ elementId: 'vm:app', type: 'TICK', payload: { seq: sent++ } });
  await waitFor(async () => {
    const x = counterOf(await owner.client.listEmbots(), 'app');
    return x && x.count >= sent ? x : undefined;
  }, 15_000, `all ${sent} events processed at the owner`);
  await sleep(300);
  const settled = counterOf(await owner.client.listEmbots(), 'app')!;
  expect(settled.count).toBe(sent);
  expect(settled.lastSeq).toBe(sent - 1);
  expect(settled.outOfOrder).toBe(0);
}
