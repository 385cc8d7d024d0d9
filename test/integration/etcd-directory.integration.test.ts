/**
 * The fleet directory on etcd with real agents (child processes) and a real etcd: agents with
 * `--etcd` and no static peers find each other and migrate; a stop, a SIGKILL, bad records and
 * etcd outages. The directory class alone is covered in peer-directory.integration.test.ts.
 */
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { Etcd3 } from 'etcd3';
import { ErrorCodes } from '../../core/errors.ts';
import type { DirectoryStatus } from '../../core/peers/peer-directory.ts';
import { AgentProcess, makeSandbox, runCli, waitFor } from '../harness/agent-process.ts';
import { migrate } from '../harness/cluster.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { etcdServer, requireEtcd, type EtcdServer } from '../harness/etcd-server.ts';
import { establishedTo } from '../harness/tcp-links.ts';

const run = requireEtcd();
const cleanups = cleanupsAfterEach();
const MiB = 1 << 20;

const agents: AgentProcess[] = [];
const clients: Etcd3[] = [];
afterEach(async () => {
  await Promise.all(agents.splice(0).map((a) => a.kill().catch(() => {})));
  for (const c of clients.splice(0)) c.close();
});

interface Fleet {
  start(name: string, options?: { readonly ttlSeconds?: number; readonly peers?: Record<string, string>; readonly dataDir?: string }): Promise<AgentProcess>;
}

/** Agents on one sandbox and one cluster secret, peer port picked by the OS (etcd tells the others), found through `--etcd`. */
function fleet(etcd: EtcdServer): Fleet {
  const box = makeSandbox();
  const secretFile = join(box.root, 'cluster.secret');
  writeFileSync(secretFile, randomBytes(32).toString('base64'));
  return {
    async start(name, options = {}) {
      const config = {
        peer: { listen: '127.0.0.1:0', secretFile, peers: options.peers ?? {} },
        directory: { ttlSeconds: options.ttlSeconds ?? 2 },
        mobility: { stepTimeoutMs: 3000, vmTimeoutMs: 10_000, forwardGraceMs: 5000, trust: { mode: 'any-authenticated-peer' } },
        sensors: { host: { intervalMs: 60_000 }, vm: { intervalMs: 60_000 } },
      };
      const file = join(box.root, `config-${name}.json`);
      writeFileSync(file, JSON.stringify(config));
      // The flag sets kind etcd and the endpoints; the file's ttlSeconds stays (flags merge over the file).
      const a = await AgentProcess.start({ name, dataDir: options.dataDir ?? box.dataDir(name), pluginsDir: box.pluginsDir, extraArgs: ['--config', file, '--etcd', etcd.url] });
      agents.push(a);
      return a;
    },
  };
}

async function directoryOf(a: AgentProcess): Promise<DirectoryStatus> {
  const d = (await a.client.status()).directory;
  if (!d) throw new Error('status has no directory');
  return d;
}

const peerNames = async (a: AgentProcess): Promise<string[]> => (await directoryOf(a)).peers.map((p) => p.name).sort();

/** Lists `name` and watches: the list comes first, `connected` once the watch is up a moment later. */
async function knows(a: AgentProcess, name: string): Promise<boolean> {
  const d = await directoryOf(a);
  return d.state === 'connected' && d.peers.some((p) => p.name === name);
}

/** The agent's JSON log lines carrying `code`. */
function logged(a: AgentProcess, code: string): Record<string, unknown>[] {
  return a.stderr
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>)
    .filter((l) => l['code'] === code);
}

function etcdClient(etcd: EtcdServer): Etcd3 {
  const c = new Etcd3({ hosts: etcd.url });
  clients.push(c);
  return c;
}

describe.runIf(run)('fleet directory on etcd (real agents, real etcd)', () => {
  it('two agents with --etcd and no static peers find each other within the TTL, and a migration a → b completes; embot peers and status show them', async () => {
    const etcd = await etcdServer(cleanups);
    await etcd.start();
    const f = fleet(etcd);
    const [a, b] = await Promise.all([f.start('a'), f.start('b')]);
    await waitFor(async () => (await knows(a, 'b')) && (await knows(b, 'a')), 2000 + 10_000, 'a and b to find each other');
    const status = await a.client.status();
    expect(status.directory).toMatchObject({ kind: 'etcd', state: 'connected', peers: [{ name: 'b', url: expect.stringMatching(/^ws:\/\/127\.0\.0\.1:\d+\/$/), source: 'etcd' }] });
    expect(status.destinations?.peers).toEqual(['b']);
    const cli = await runCli(['peers', '--json', '--agent', a.url]);
    expect(cli.code, cli.stderr).toBe(0);
    expect(JSON.parse(cli.stdout)).toMatchObject({ kind: 'etcd', state: 'connected', peers: [{ name: 'b', source: 'etcd' }] });
    const table = await runCli(['peers', '--agent', a.url]);
    expect(table.stdout).toMatch(/directory: etcd, connected/);
    expect(table.stdout).toMatch(/^b\s+ws:\/\/127\.0\.0\.1:\d+\/\s+etcd$/m);
    expect((await runCli(['status', '--agent', a.url])).stdout).toMatch(/directory:\s+etcd, connected, 1 peer\(s\), 1 from etcd/);

    await a.client.createVm({ name: 'web', memory: 2 * MiB });
    const info = await migrate(a, 'web', 'b');
    expect(info.outcome).toBe('completed');
    expect((await b.client.listVms()).map((v) => v.name)).toEqual(['web']);
  });

  it('b stopped (SIGTERM) leaves a’s peers at once: its lease is revoked (a 30 s TTL could not explain it)', async () => {
    const etcd = await etcdServer(cleanups);
    await etcd.start();
    const f = fleet(etcd);
    const [a, b] = await Promise.all([f.start('a', { ttlSeconds: 30 }), f.start('b', { ttlSeconds: 30 })]);
    await waitFor(() => knows(a, 'b'), 12_000, 'a to see b');
    expect(await b.stop()).toBe(0);
    await waitFor(async () => (await peerNames(a)).length === 0, 10_000, 'b to leave a’s peers after its stop');
    expect((await etcdClient(etcd).get('/embot/agents/b').string()) ?? null).toBeNull();
  });

  it('b SIGKILLed leaves a’s peers after its TTL (2 s): its record outlives it until the lease expires', async () => {
    const etcd = await etcdServer(cleanups);
    await etcd.start();
    const f = fleet(etcd);
    const [a, b] = await Promise.all([f.start('a'), f.start('b')]);
    await waitFor(() => knows(a, 'b'), 12_000, 'a to see b');
    await b.kill();
    // No revoke ran: etcd still holds the record (its lease has at least 2/3 of its TTL left).
    expect(await etcdClient(etcd).get('/embot/agents/b').string()).toContain('"name":"b"');
    await waitFor(async () => (await peerNames(a)).length === 0, 2000 + 10_000, 'b to leave once its lease expired');
    expect((await directoryOf(a)).state).toBe('connected');
  });

  it('a second agent started with a taken name does not overwrite the first (embot status / peers: conflict, EMBOT_ERR_DIRECTORY_NAME_TAKEN) and keeps serving; the first SIGKILLed and restarted inside its TTL on another port takes its record back at once', async () => {
    const etcd = await etcdServer(cleanups);
    await etcd.start();
    const f = fleet(etcd);
    const [a, b] = await Promise.all([f.start('a', { ttlSeconds: 30 }), f.start('b', { ttlSeconds: 30 })]);
    await waitFor(async () => (await knows(a, 'b')) && (await knows(b, 'a')), 12_000, 'a and b to find each other');
    const aAtB = async (): Promise<string | undefined> => (await directoryOf(b)).peers.find((p) => p.name === 'a')?.url;
    const recordOfA = async (): Promise<string | undefined> => (JSON.parse((await etcdClient(etcd).get('/embot/agents/a').string()) ?? '{}') as { url?: string }).url;
    const firstUrl = (await aAtB())!;
    const twin = await f.start('a', { ttlSeconds: 30, dataDir: makeSandbox().dataDir('a-twin') });
    await waitFor(async () => (await directoryOf(twin)).state === 'conflict', 10_000, 'the twin to see the name taken');
    expect((await directoryOf(twin)).lastError).toMatchObject({ code: ErrorCodes.DIRECTORY_NAME_TAKEN, message: expect.stringContaining(`held in etcd by another live agent (${firstUrl}`) });
    // Its log line is read from the child's stderr pipe, which may land after the status answer.
    await waitFor(() => logged(twin, ErrorCodes.DIRECTORY_NAME_TAKEN).length >= 1, 10_000, 'the coded log line');
    expect(logged(twin, ErrorCodes.DIRECTORY_NAME_TAKEN)).toHaveLength(1);
    // Alertable: the state as a metric series.
    const metrics = await (await fetch(`${twin.url}/metrics`)).text();
    expect(metrics).toContain('embot_directory_state{kind="etcd",state="conflict"} 1\n');
    expect(metrics).toContain('embot_directory_state{kind="etcd",state="connected"} 0\n');
    expect(metrics).toContain('embot_directory_peers{source="etcd"} 1\n');
    const peers = await runCli(['peers', '--agent', twin.url]);
    expect(peers.stdout).toMatch(/directory: etcd, conflict — the name a is held in etcd by another live agent .* \[EMBOT_ERR_DIRECTORY_NAME_TAKEN\]/);
    // It still reads the fleet and serves its API; the record and b still name the first a.
    expect(await peerNames(twin)).toEqual(['b']);
    expect(await recordOfA()).toBe(firstUrl);
    expect(await aAtB()).toBe(firstUrl);
    await twin.kill();
    // The first a SIGKILLed (its record stays on a 30 s lease) and restarted on a fresh port: its lease file says the record is its own.
    await a.kill();
    const again = await f.start('a', { ttlSeconds: 30 });
    await waitFor(async () => (await directoryOf(again)).state === 'connected', 10_000, 'the restarted a to register well inside the 30 s TTL');
    const newUrl = await recordOfA();
    expect(newUrl).not.toBe(firstUrl);
    await waitFor(async () => (await aAtB()) === newUrl, 10_000, 'b to follow a to its new port');
    expect(logged(again, ErrorCodes.DIRECTORY_NAME_TAKEN)).toEqual([]);
  });

  it('warm peer links follow the directory: b joining after a started is dialled ahead; b stopped is let go and not dialled again; b back on another port is dialled there', async () => {
    const etcd = await etcdServer(cleanups);
    await etcd.start();
    const f = fleet(etcd);
    const a = await f.start('a');
    await waitFor(async () => (await directoryOf(a)).state === 'connected', 10_000, 'a registered');
    const portOfB = async (): Promise<number | undefined> => {
      const url = (await directoryOf(a)).peers.find((p) => p.name === 'b')?.url;
      return url === undefined ? undefined : Number(new URL(url).port);
    };
    const linksToB = async (): Promise<number> => {
      const port = await portOfB();
      return port === undefined ? 0 : establishedTo(a.child.pid!, port);
    };
    const b = await f.start('b');
    await waitFor(async () => (await linksToB()) > 0, 10_000, 'a to dial b ahead once b joined');
    const firstPort = (await portOfB())!;
    expect(await b.stop()).toBe(0);
    await waitFor(async () => (await portOfB()) === undefined && establishedTo(a.child.pid!, firstPort) === 0, 10_000, 'a to let b go');
    // Longer than the pool's re-dial back-off: a left peer is not dialled again.
    await new Promise((r) => setTimeout(r, 1500));
    expect(establishedTo(a.child.pid!, firstPort)).toBe(0);
    const again = await f.start('b');
    await waitFor(async () => (await linksToB()) > 0, 10_000, 'a to dial b at its new port');
    expect(await portOfB()).not.toBe(firstPort);
    // Its record is written before its watch is up (`connected` then): on a loaded host a sees the one before b says the other.
    await waitFor(async () => (await directoryOf(again)).state === 'connected', 10_000, 'b connected again');
  });

  it('bad input: garbage JSON, a wrong name and a bad URL put in etcd are ignored with EMBOT_ERR_DIRECTORY_RECORD_INVALID in the log; the agent keeps serving and its good peer stays', async () => {
    const etcd = await etcdServer(cleanups);
    await etcd.start();
    const f = fleet(etcd);
    const [a] = await Promise.all([f.start('a'), f.start('b')]);
    await waitFor(() => knows(a, 'b'), 12_000, 'a to see b');
    const c = etcdClient(etcd);
    await c.put('/embot/agents/x').value('{"name": "x", garbage').exec();
    await c.put('/embot/agents/y').value(JSON.stringify({ name: 'not-y', url: 'ws://127.0.0.1:7403', version: '1', startedAt: 1 })).exec();
    await c.put('/embot/agents/z').value(JSON.stringify({ name: 'z', url: 'http://127.0.0.1:7404', version: '1', startedAt: 1 })).exec();
    await waitFor(() => logged(a, 'EMBOT_ERR_DIRECTORY_RECORD_INVALID').length >= 3, 10_000, 'three coded warnings');
    expect(logged(a, 'EMBOT_ERR_DIRECTORY_RECORD_INVALID').map((l) => l['key'])).toEqual(['/embot/agents/x', '/embot/agents/y', '/embot/agents/z']);
    expect(await peerNames(a)).toEqual(['b']);
    expect((await directoryOf(a)).state).toBe('connected');
    expect(a.child.exitCode).toBeNull();
    expect((await a.client.createVm({ name: 'still-serving', memory: MiB })).name).toBe('still-serving');
  });

  it('etcd down at the agent’s start: it runs with its static peers (coded warning, state unavailable) and finds the others once etcd is up', async () => {
    const etcd = await etcdServer(cleanups);
    const f = fleet(etcd);
    const a = await f.start('a', { peers: { s: 'ws://127.0.0.1:9/' } });
    await waitFor(async () => (await directoryOf(a)).state === 'unavailable', 15_000, 'a to report etcd unavailable');
    expect(await directoryOf(a)).toMatchObject({ kind: 'etcd', state: 'unavailable', peers: [{ name: 's', source: 'config' }], lastError: { code: 'EMBOT_ERR_DIRECTORY_UNAVAILABLE' } });
    expect(logged(a, 'EMBOT_ERR_DIRECTORY_UNAVAILABLE').length).toBeGreaterThanOrEqual(1);
    await etcd.start();
    const b = await f.start('b');
    await waitFor(async () => (await knows(a, 'b')) && (await knows(b, 'a')), 20_000, 'a to find b once etcd is up');
    expect(await peerNames(a)).toEqual(['b', 's']);
    expect(await directoryOf(a)).toMatchObject({ state: 'connected' });
    await a.client.createVm({ name: 'late', memory: 2 * MiB });
    expect((await migrate(a, 'late', 'b')).outcome).toBe('completed');
  });

  it('etcd killed while running: peers already known stay usable (a migration a → b completes) and the state says unavailable', async () => {
    const etcd = await etcdServer(cleanups);
    await etcd.start();
    const f = fleet(etcd);
    const [a, b] = await Promise.all([f.start('a'), f.start('b')]);
    await waitFor(async () => (await knows(a, 'b')) && (await knows(b, 'a')), 12_000, 'a and b to find each other');
    await etcd.kill();
    await waitFor(async () => (await directoryOf(a)).state === 'unavailable', 15_000, 'a to notice etcd is gone');
    expect(await peerNames(a)).toEqual(['b']);
    await a.client.createVm({ name: 'orphan', memory: 2 * MiB });
    expect((await migrate(a, 'orphan', 'b')).outcome).toBe('completed');
  });
});
