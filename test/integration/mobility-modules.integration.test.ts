import { afterEach, describe, expect, it } from 'vitest';
import { existsSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createPrivateKey } from 'node:crypto';
import WebSocket from 'ws';
import { Cluster, migrate } from '../harness/cluster.ts';
import { waitFor } from '../harness/agent-process.ts';
import { encodeSignatureFile, generateSigningKeys, signModule } from '../../core/mobility/trust-policy.ts';
import { hashModuleDir } from '../../core/plugins/content-hash.ts';

let cluster: Cluster | undefined;
/** Public key files the agents are pointed at; written before the cluster (and its folder) exists. */
const keyFiles: string[] = [];
afterEach(async () => {
  await cluster?.stop();
  cluster = undefined;
  for (const f of keyFiles.splice(0)) rmSync(f, { force: true });
});


const mobility = (trust: Record<string, unknown>) => ({ mobility: { stepTimeoutMs: 3000, vmTimeoutMs: 10_000, forwardGraceMs: 5000, trust } });

/** Signs the counter module in agent a's plugins folder; returns the public key file. */
function signCounterAt(c: Cluster, keys = generateSigningKeys()): string {
  const dir = join(c.pluginsDir('a'), 'counter');
  const sig = signModule({ name: 'counter', version: '1.0.0', hash: hashModuleDir(dir) }, createPrivateKey(keys.privatePem));
  writeFileSync(join(dir, 'module.sig'), encodeSignatureFile(sig));
  const pub = join(c.root, `signing-${Math.random().toString(36).slice(2)}.pub`);
  writeFileSync(pub, keys.publicPem);
  return pub;
}

describe('module shipping during a migration', () => {
  it('ships a module the target lacks, checks its hash and signature, and runs the embot there', async () => {
    const keys = generateSigningKeys();
    const pubFile = join(tmpdir(), `embot-pub-${process.pid}-${Date.now()}.pem`);
    keyFiles.push(pubFile);
    writeFileSync(pubFile, keys.publicPem);
    cluster = await Cluster.start(['a', 'b'], {
      pluginsOf: { a: [{ from: 'fixture', name: 'counter' }] },
      config: (n) => (n === 'b' ? mobility({ mode: 'signed', publicKeys: [pubFile] }) : {}),
    });
    signCounterAt(cluster, keys);
    const a = cluster.agent('a');
    const b = cluster.agent('b');
    expect((await b.client.listPlugins()).map((p) => p.name)).not.toContain('counter');
    await a.client.createVm({ name: 'web', memory: 1 << 20 });
    await waitFor(async () => (await a.client.listEmbots()).find((e) => e.id === 'counter/counter/vm:web'), 10_000, 'counter embot at a');
    for (let seq = 0; seq < 10; seq++) await a.client.emitEvent({ elementId: 'vm:web', type: 'TICK', payload: { seq } });

    const info = await migrate(a, 'web', 'b');
    expect(info.outcome).toBe('completed');
    const atB = await b.client.getMigration(info.id);
    expect(atB.summary?.modulesShipped).toBe(1);
    const plugin = (await b.client.listPlugins()).find((p) => p.name === 'counter');
    expect(plugin?.status).toBe('loaded');
    expect(plugin?.hash).toBe(hashModuleDir(join(cluster.pluginsDir('a'), 'counter')));
    await b.client.emitEvent({ elementId: 'vm:web', type: 'TICK', payload: { seq: 10 } });
    await waitFor(async () => ((await b.client.listEmbots()).find((e) => e.id === 'counter/counter/vm:web')?.policies[0]?.context as { count: number } | undefined)?.count === 11, 10_000, 'counting on at b');
  });

  it('refuses an untrusted module with ManagedObjectInstantiationError: nothing left at the target, the source keeps the VM', async () => {
    const other = generateSigningKeys();
    const pubFile = join(tmpdir(), `embot-other-${process.pid}-${Date.now()}.pem`);
    keyFiles.push(pubFile);
    writeFileSync(pubFile, other.publicPem);
    cluster = await Cluster.start(['a', 'b'], {
      pluginsOf: { a: [{ from: 'fixture', name: 'counter' }] },
      config: (n) => (n === 'b' ? mobility({ mode: 'signed', publicKeys: [pubFile] }) : {}),
    });
    signCounterAt(cluster); // signed with a key b does not trust
    const a = cluster.agent('a');
    const b = cluster.agent('b');
    await a.client.createVm({ name: 'web', memory: 1 << 20 });
    await a.client.vmAction('web', 'start');
    await waitFor(async () => (await a.client.listEmbots()).find((e) => e.id === 'counter/counter/vm:web'), 10_000, 'counter embot at a');

    const info = await migrate(a, 'web', 'b');
    expect(info.outcome).toBe('aborted');
    expect(info.summary?.reason ?? info.reason).toMatch(/ManagedObjectInstantiationError.*signature does not verify/);
    expect(await b.client.listVms()).toEqual([]);
    expect((await b.client.listPlugins()).find((p) => p.name === 'counter')).toBeUndefined();
    const cache = join(cluster.dataDir('b'), 'plugin-cache');
    expect(existsSync(cache) ? readdirSync(cache).filter((f) => !f.startsWith('.')) : []).toEqual([]);
    expect((await a.client.listVms()).map((v) => `${v.name}:${v.state}`)).toEqual(['web:running']);
    expect((await a.client.listEmbots()).find((e) => e.id === 'counter/counter/vm:web')?.status).toBe('running');
  });

  it('closes the peer port to a client that does not authenticate, and keeps serving peers', async () => {
    cluster = await Cluster.start(['a', 'b'], { plugins: [{ from: 'fixture', name: 'counter' }] });
    const b = cluster.agent('b');
    const cfg = JSON.parse((await import('node:fs')).readFileSync(join(cluster.root, 'config-b.json'), 'utf8')) as { peer: { listen: string } };
    const ws = new WebSocket(`ws://${cfg.peer.listen}/`);
    const closed = await new Promise<{ code: number; reason: string }>((resolve) => {
      ws.on('open', () => ws.send(Buffer.from('not a frame at all')));
      ws.on('close', (code, reason) => resolve({ code, reason: reason.toString() }));
      ws.on('error', () => {});
    });
    expect(closed.code).toBeGreaterThanOrEqual(1002);
    expect(closed.reason).toMatch(/EMBOT_ERR_/);
    // A real peer still migrates to b afterwards.
    const a = cluster.agent('a');
    await a.client.createVm({ name: 'x', memory: 1 << 20 });
    expect((await migrate(a, 'x', 'b')).outcome).toBe('completed');
    expect((await b.client.status()).name).toBe('b');
  });
});
