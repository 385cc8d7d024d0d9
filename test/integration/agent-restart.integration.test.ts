import { afterEach, describe, expect, it } from 'vitest';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { AgentProcess, makeSandbox, sleep, waitFor } from '../harness/agent-process.ts';
import type { EmbotInfo } from '../../core/control/control-api.ts';

interface CounterContext {
  count: number;
  lastSeq: number;
  outOfOrder: number;
  fired: number;
}

const agents: AgentProcess[] = [];
afterEach(async () => {
  for (const a of agents.splice(0)) await a.kill().catch(() => {});
});

async function start(opts: Parameters<typeof AgentProcess.start>[0]): Promise<AgentProcess> {
  const a = await AgentProcess.start(opts);
  agents.push(a);
  return a;
}

function counterOf(embots: readonly EmbotInfo[], vm: string): { state: unknown; ctx: CounterContext } | undefined {
  const e = embots.find((x) => x.id === `counter/counter/vm:${vm}`);
  const p = e?.policies[0];
  return p?.context ? { state: p.state, ctx: p.context as CounterContext } : undefined;
}

describe('agent restart after SIGKILL', () => {
  it('restores every embot and processes every acknowledged event exactly once, in order', async () => {
    const box = makeSandbox([{ from: 'fixture', name: 'counter' }, { from: 'shipped', name: 'vm-watchdog' }]);
    const opts = { name: 'a', dataDir: box.dataDir('a'), pluginsDir: box.pluginsDir };
    const a1 = await start(opts);
    await a1.client.createVm({ name: 'web-1', memory: 1 << 20 });
    await a1.client.vmAction('web-1', 'start');
    await waitFor(async () => counterOf(await a1.client.listEmbots(), 'web-1'), 10_000, 'counter embot');

    // A producer emitting sequence-numbered events; every acknowledged one must be processed once.
    let acked = 0;
    let stop = false;
    const producer = (async () => {
      for (let seq = 0; !stop; seq++) {
        try {
          await a1.client.emitEvent({ elementId: 'vm:web-1', type: 'TICK', payload: { seq } });
          acked = seq + 1;
        } catch {
          return; // the agent died: this one was never acknowledged
        }
      }
    })();
    await waitFor(() => acked >= 300, 20_000, '300 acknowledged events');
    const before = (await a1.client.listEmbots()).map((e) => e.id).sort();
    await a1.kill();
    stop = true;
    await producer;
    agents.splice(agents.indexOf(a1), 1);

    const a2 = await start(opts);
    expect((await a2.client.listEmbots()).map((e) => e.id).sort()).toEqual(before);
    const final = await waitFor(async () => {
      const c = counterOf(await a2.client.listEmbots(), 'web-1');
      return c && c.ctx.count >= acked ? c : undefined;
    }, 15_000, `all ${acked} acknowledged events processed`);
    // The one event in flight when the agent died may or may not have been journaled.
    expect(final.ctx.count === acked || final.ctx.count === acked + 1).toBe(true);
    expect(final.ctx.lastSeq).toBe(final.ctx.count - 1);
    expect(final.ctx.outOfOrder).toBe(0);
    // And nothing more arrives later (no duplicates re-delivered).
    await sleep(500);
    expect(counterOf(await a2.client.listEmbots(), 'web-1')!.ctx.count).toBe(final.ctx.count);
    const status = await a2.client.status();
    expect(status.counts.deadLetters).toBe(0);
    expect(status.counts.vms).toBe(1);
  }, 60_000);

  it('fires a delayed transition pending at the crash at its original deadline after restart', async () => {
    const box = makeSandbox([{ from: 'fixture', name: 'counter' }]);
    // Long enough that a restart on a loaded machine still finds the delay pending (at load 15 on
    // two cores a kill + restart took over 5 s).
    const delayMs = 12_000;
    const cfgArgs = ['--config', writeConfig(box.root, { modules: { counter: { delayMs } } })];
    const opts = { name: 'b', dataDir: box.dataDir('b'), pluginsDir: box.pluginsDir, extraArgs: cfgArgs };
    const a1 = await start(opts);
    await a1.client.createVm({ name: 'db-1', memory: 1 << 20 });
    await waitFor(async () => counterOf(await a1.client.listEmbots(), 'db-1'), 10_000, 'counter embot');
    const armedAt = Date.now();
    await a1.client.emitEvent({ elementId: 'vm:db-1', type: 'ARM', payload: null });
    await waitFor(async () => counterOf(await a1.client.listEmbots(), 'db-1')?.state === 'armed', 5000, 'armed');
    await a1.kill();
    agents.splice(agents.indexOf(a1), 1);

    const a2 = await start(opts);
    const restartedAt = Date.now();
    expect(counterOf(await a2.client.listEmbots(), 'db-1')?.state).toBe('armed');
    expect(restartedAt - armedAt).toBeLessThan(delayMs);
    const fired = await waitFor(async () => (await a2.client.listEvents({ limit: 200 })).find((e) => e.type === 'COUNTER_FIRED'), delayMs + 5000, 'COUNTER_FIRED');
    expect(fired.ts - armedAt).toBeGreaterThanOrEqual(delayMs - 100);
    expect(fired.ts - armedAt).toBeLessThan(delayMs + 3000);
    expect(counterOf(await a2.client.listEmbots(), 'db-1')?.ctx.fired).toBe(1);
  });
});

function writeConfig(dir: string, config: unknown): string {
  const file = join(dir, 'embot.json');
  writeFileSync(file, JSON.stringify(config));
  return file;
}
