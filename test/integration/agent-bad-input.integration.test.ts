import { afterEach, describe, expect, it } from 'vitest';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { AgentProcess, runCli, makeSandbox } from '../harness/agent-process.ts';
import { ErrorCodes } from '../../core/errors.ts';

const agents: AgentProcess[] = [];
afterEach(async () => {
  for (const a of agents.splice(0)) await a.kill().catch(() => {});
});


describe('bad input from outside', () => {
  it('refuses a malformed config file with a clear message and exit code 2', async () => {
    const box = makeSandbox();
    const file = join(box.root, 'bad.yaml');
    writeFileSync(file, 'control:\n  port: "not a port"\nnoSuchKey: 1\n');
    const r = await runCli(['agent', '--config', file, '--data', box.dataDir('x'), '--plugins', box.pluginsDir]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain(ErrorCodes.CONFIG_INVALID);
    expect(r.stderr).toMatch(/control\.port/);
    expect(r.stderr).toMatch(/noSuchKey/);
  });

  it('refuses a corrupt store file without touching it', async () => {
    const box = makeSandbox();
    const dataDir = box.dataDir('c');
    mkdirSync(dataDir, { recursive: true });
    writeFileSync(join(dataDir, 'embot.sqlite'), Buffer.alloc(8192, 0x5a));
    const r = await runCli(['agent', '--name', 'c', '--data', dataDir, '--plugins', box.pluginsDir, '--control', '127.0.0.1:0']);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(ErrorCodes.STORE_CORRUPT);
    expect(r.stderr).toMatch(/move it away or restore a backup/);
  });

  it('rejects unknown verbs and bad flags with exit code 2', async () => {
    expect((await runCli(['frobnicate'])).code).toBe(2);
    expect((await runCli(['vm', 'create'])).code).toBe(2);
    const bad = await runCli(['events', 'emit', '--element', 'vm:x', '--type', 'T', '--payload', '{nope']);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/payload/i);
  });

  it('answers invalid events with a coded error, loses nothing already acknowledged, and keeps running', async () => {
    const box = makeSandbox([{ from: 'fixture', name: 'counter' }]);
    const a = await AgentProcess.start({ name: 'e', dataDir: box.dataDir('e'), pluginsDir: box.pluginsDir });
    agents.push(a);
    await a.client.createVm({ name: 'vm1', memory: 1 << 20 });
    await a.client.emitEvent({ elementId: 'vm:vm1', type: 'TICK', payload: { seq: 0 } });
    for (const bad of [
      { elementId: 'vm:vm1', type: 'lower-case' },
      { elementId: '', type: 'TICK' },
      { elementId: 'vm:vm1', type: 'TICK', ts: 'yesterday' },
    ]) {
      await expect(a.client.emitEvent(bad as never)).rejects.toMatchObject({ code: expect.stringMatching(/EMBOT_ERR_(EVENT_INVALID|CONTROL_BAD_REQUEST)/) });
    }
    const raw = await fetch(`${a.url}/v1/events`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"elementId":' });
    expect(raw.status).toBe(400);
    expect(((await raw.json()) as { error: { code: string } }).error.code).toBe(ErrorCodes.CONTROL_BAD_REQUEST);
    const cli = await runCli(['events', 'emit', '--element', 'vm:vm1', '--type', 'bad type'], { EMBOT_AGENT: a.url });
    expect(cli.code).toBe(1);
    expect(cli.stderr).toContain('EMBOT_ERR_EVENT_INVALID');

    await a.client.emitEvent({ elementId: 'vm:vm1', type: 'TICK', payload: { seq: 1 } });
    const status = await a.client.status();
    expect(status.name).toBe('e');
    const { waitFor } = await import('../harness/agent-process.ts');
    await waitFor(async () => ((await a.client.listEmbots())[0]?.policies[0]?.context as { count: number } | undefined)?.count === 2, 5000, 'both good events processed');
  });
});
