import { afterEach, describe, expect, it } from 'vitest';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { AgentProcess, REPO, makeSandbox, waitFor } from '../harness/agent-process.ts';

/** The plugin-authoring example in README.md must work as printed. */
function readmeBlock(after: string): string {
  const readme = readFileSync(join(REPO, 'README.md'), 'utf8');
  const at = readme.indexOf(after);
  if (at < 0) throw new Error(`README has no "${after}"`);
  const m = /```\w*\n([\s\S]*?)```/.exec(readme.slice(at));
  if (!m) throw new Error(`no code block after "${after}"`);
  return m[1]!;
}

const agents: AgentProcess[] = [];
afterEach(async () => {
  for (const a of agents.splice(0)) await a.kill().catch(() => {});
});

describe('README', () => {
  it('the plugin example loads and does what the README says', async () => {
    const box = makeSandbox();
    const dir = join(box.pluginsDir, 'restart-counter');
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, 'manifest.json'), readmeBlock('`plugins/restart-counter/manifest.json`:'));
    writeFileSync(join(dir, 'index.ts'), readmeBlock('`plugins/restart-counter/index.ts`:'));
    const a = await AgentProcess.start({ name: 'r', dataDir: box.dataDir('r'), pluginsDir: box.pluginsDir });
    agents.push(a);
    expect((await a.client.listPlugins()).find((p) => p.name === 'restart-counter')?.status).toBe('loaded');
    await a.client.createVm({ name: 'web-1', memory: 1 << 20 });
    await a.client.vmAction('web-1', 'start');
    await waitFor(async () => (await a.client.listEmbots()).find((e) => e.id === 'restart-counter/counter/vm:web-1'), 10_000, 'embot');
    for (let i = 1; i <= 2; i++) {
      await a.client.vmAction('web-1', 'crash');
      await waitFor(async () => (await a.client.listVms())[0]?.state === 'running', 5000, `restart after crash ${i}`);
    }
    await a.client.vmAction('web-1', 'crash');
    const alert = await waitFor(async () => (await a.client.listEvents({ limit: 100 })).find((e) => e.type === 'ALERT'), 5000, 'ALERT');
    expect(alert.payload).toMatchObject({ severity: 'warning', crashes: 3 });
    expect((await a.client.listEmbots()).find((e) => e.id === 'restart-counter/counter/vm:web-1')?.policies[0]?.state).toBe('alerted');
  });
});
