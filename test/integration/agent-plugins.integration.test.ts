import { afterEach, describe, expect, it } from 'vitest';
import { cpSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { AgentProcess, FIXTURE_PLUGINS, makeSandbox, waitFor } from '../harness/agent-process.ts';
import { ErrorCodes } from '../../core/errors.ts';

const agents: AgentProcess[] = [];
afterEach(async () => {
  for (const a of agents.splice(0)) await a.kill().catch(() => {});
});

describe('plugins in a running agent', () => {
  it('picks up a module dropped in while running, and hot-reloads it on change keeping policy state', async () => {
    const box = makeSandbox();
    const a = await AgentProcess.start({ name: 'p', dataDir: box.dataDir('p'), pluginsDir: box.pluginsDir });
    agents.push(a);
    await a.client.createVm({ name: 'vm1', memory: 1 << 20 });
    expect(await a.client.listEmbots()).toHaveLength(0);

    cpSync(join(FIXTURE_PLUGINS, 'counter'), join(box.pluginsDir, 'counter'), { recursive: true });
    await waitFor(async () => (await a.client.listPlugins()).find((p) => p.name === 'counter' && p.status === 'loaded'), 10_000, 'counter loaded');
    await waitFor(async () => (await a.client.listEmbots()).find((e) => e.id === 'counter/counter/vm:vm1' && e.status === 'running'), 10_000, 'embot attached to the existing VM');
    for (let seq = 0; seq < 5; seq++) await a.client.emitEvent({ elementId: 'vm:vm1', type: 'TICK', payload: { seq } });
    const count = async () => ((await a.client.listEmbots()).find((e) => e.id === 'counter/counter/vm:vm1')?.policies[0]?.context as { count: number } | undefined)?.count;
    await waitFor(async () => (await count()) === 5, 5000, 'five ticks counted');
    const hashBefore = (await a.client.listPlugins()).find((p) => p.name === 'counter')!.hash;

    // Edit the module: the worker restarts with the new code, the embot keeps its state.
    const entry = join(box.pluginsDir, 'counter', 'index.ts');
    writeFileSync(entry, readFileSync(entry, 'utf8') + '\n// edited\n');
    await waitFor(async () => (await a.client.listPlugins()).find((p) => p.name === 'counter' && p.hash !== hashBefore && p.status === 'loaded'), 10_000, 'counter reloaded');
    await a.client.emitEvent({ elementId: 'vm:vm1', type: 'TICK', payload: { seq: 5 } });
    await waitFor(async () => (await count()) === 6, 5000, 'count continues from 5 after reload');
  });

  it('quarantines broken plugins (syntax error, throwing action, endless loop, event flood) and keeps answering', async () => {
    const box = makeSandbox([{ from: 'fixture', name: 'counter' }]);
    const a = await AgentProcess.start({ name: 'q', dataDir: box.dataDir('q'), pluginsDir: box.pluginsDir });
    agents.push(a);
    await a.client.createVm({ name: 'vm1', memory: 1 << 20 });
    for (const name of ['syntax-error', 'throwing', 'looping', 'flooding', 'bad-manifest']) {
      cpSync(join(FIXTURE_PLUGINS, name), join(box.pluginsDir, name), { recursive: true });
    }
    const plugins = await waitFor(async () => {
      const list = await a.client.listPlugins();
      return ['throwing', 'looping', 'flooding'].every((n) => list.some((p) => p.name === n && p.status === 'loaded')) && list.some((p) => p.name === 'syntax-error' && p.status === 'error') ? list : undefined;
    }, 15_000, 'all plugins seen');
    expect(plugins.find((p) => p.name === 'syntax-error')?.error).toMatch(/cannot compile|failed to load/);

    await a.client.emitEvent({ elementId: 'vm:vm1', type: 'BOOM', payload: null });
    await a.client.emitEvent({ elementId: 'vm:vm1', type: 'ECHO', payload: null });
    await a.client.emitEvent({ elementId: 'vm:vm1', type: 'HANG', payload: null });
    const embots = await waitFor(async () => {
      const list = await a.client.listEmbots();
      const q = (id: string) => list.find((e) => e.id === id)?.status === 'quarantined';
      return q('throwing/thrower/vm:vm1') && q('flooding/flooder/vm:vm1') && q('looping/looper/vm:vm1') ? list : undefined;
    }, 20_000, 'three quarantines');
    expect(embots.find((e) => e.id === 'throwing/thrower/vm:vm1')?.error).toContain('boom from plugin');
    expect(embots.find((e) => e.id === 'flooding/flooder/vm:vm1')?.error).toContain(ErrorCodes.EMBOT_FLOOD);
    expect(embots.find((e) => e.id === 'looping/looper/vm:vm1')?.error).toContain(ErrorCodes.PLUGIN_TIMEOUT);

    // The agent answers and the healthy embot still works.
    const status = await a.client.status();
    expect(status.counts.quarantinedEmbots).toBe(3);
    await a.client.emitEvent({ elementId: 'vm:vm1', type: 'TICK', payload: { seq: 0 } });
    await waitFor(async () => ((await a.client.listEmbots()).find((e) => e.id === 'counter/counter/vm:vm1')?.policies[0]?.context as { count: number } | undefined)?.count === 1, 5000, 'counter still counting');
  });

  it('starts with --safe without loading any plugin', async () => {
    const box = makeSandbox([{ from: 'fixture', name: 'counter' }]);
    const a = await AgentProcess.start({ name: 's', dataDir: box.dataDir('s'), pluginsDir: box.pluginsDir, extraArgs: ['--safe'] });
    agents.push(a);
    const status = await a.client.status();
    expect(status.safe).toBe(true);
    expect(await a.client.listPlugins()).toHaveLength(0);
    await a.client.createVm({ name: 'vm1', memory: 1 << 20 });
    expect(await a.client.listEmbots()).toHaveLength(0);
  });

  it('keeps the events of plugin embots through a --safe run and delivers them when the plugin is back', async () => {
    const box = makeSandbox([{ from: 'fixture', name: 'counter' }]);
    const counted = async (a: AgentProcess): Promise<number | undefined> =>
      ((await a.client.listEmbots()).find((e) => e.id === 'counter/counter/vm:vm1')?.policies[0]?.context as { count?: number } | undefined)?.count;
    const a1 = await AgentProcess.start({ name: 's', dataDir: box.dataDir('s'), pluginsDir: box.pluginsDir });
    agents.push(a1);
    await waitFor(async () => (await a1.client.listPlugins()).some((p) => p.name === 'counter' && p.status === 'loaded'), 10_000, 'counter loaded');
    await a1.client.createVm({ name: 'vm1', memory: 1 << 20 });
    await a1.client.emitEvent({ elementId: 'vm:vm1', type: 'TICK', payload: { seq: 0 } });
    await waitFor(async () => (await counted(a1)) === 1, 5000, 'first tick counted');
    await a1.stop();

    const a2 = await AgentProcess.start({ name: 's', dataDir: box.dataDir('s'), pluginsDir: box.pluginsDir, extraArgs: ['--safe'] });
    agents.push(a2);
    for (const seq of [1, 2, 3]) await a2.client.emitEvent({ elementId: 'vm:vm1', type: 'TICK', payload: { seq } });
    await waitFor(async () => (await a2.client.status()).counts.parkedEvents === 3, 5000, 'three events waiting for the module');
    expect((await a2.client.status()).counts.deadLetters).toBe(0);
    expect((await a2.client.listEmbots()).find((e) => e.id === 'counter/counter/vm:vm1')?.status).toBe('unloaded');
    await a2.stop();

    const a3 = await AgentProcess.start({ name: 's', dataDir: box.dataDir('s'), pluginsDir: box.pluginsDir });
    agents.push(a3);
    await waitFor(async () => (await counted(a3)) === 4, 10_000, 'the parked ticks counted once the plugin is back');
    const status = await a3.client.status();
    expect(status.counts.parkedEvents).toBe(0);
    expect(status.counts.deadLetters).toBe(0);
  });
});
