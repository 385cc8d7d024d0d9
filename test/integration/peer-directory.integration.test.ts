/**
 * EtcdPeerDirectory in-process against a real etcd (test/harness/etcd-server.ts): records, leases,
 * the watch, bad records and outages. The agent-level cases (child processes, a migration) are in
 * etcd-directory.integration.test.ts.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { Etcd3 } from 'etcd3';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startAgent } from '../../core/agent.ts';
import { loadConfig } from '../../core/config/config.ts';
import { ErrorCodes } from '../../core/errors.ts';
import { createLogger, type Logger } from '../../core/logger.ts';
import { createPeerDirectory } from '../../core/peers/create-peer-directory.ts';
import { EtcdPeerDirectory, type EtcdPeerDirectoryOptions } from '../../core/peers/etcd-peer-directory.ts';
import type { PeerChange } from '../../core/peers/peer-directory.ts';
import { parsePeers } from '../../core/wire/peers.ts';
import { waitFor } from '../harness/agent-process.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { makeTlsFixture } from '../harness/cluster-tls.ts';
import { etcdServer, requireEtcd, type EtcdServer } from '../harness/etcd-server.ts';

const run = requireEtcd();
const cleanups = cleanupsAfterEach();

interface Captured {
  readonly log: Logger;
  readonly lines: () => readonly Record<string, unknown>[];
}

function capture(name: string): Captured {
  let text = '';
  const log = createLogger({ level: 'debug', format: 'json', name, stream: { write: (s: string) => (text += s) } });
  return { log, lines: () => text.split('\n').filter((l) => l !== '').map((l) => JSON.parse(l) as Record<string, unknown>) };
}

const open: EtcdPeerDirectory[] = [];
const clients: Etcd3[] = [];
afterEach(async () => {
  await Promise.all(open.splice(0).map((d) => d.close()));
  for (const c of clients.splice(0)) c.close();
});

/** A real etcd, and directories a and b (peer ports 7401, 7402) once each lists the other. */
async function twoSeeingEachOther(): Promise<{ etcd: EtcdServer; a: ReturnType<typeof directory>; b: ReturnType<typeof directory> }> {
  const etcd = await etcdServer(cleanups);
  await etcd.start();
  const a = directory(etcd, 'a');
  const b = directory(etcd, 'b');
  a.start({ url: peerUrl(7401) });
  b.start({ url: peerUrl(7402) });
  await waitFor(() => a.has('b') && b.has('a'), 10_000, 'a and b to see each other');
  return { etcd, a, b };
}

function directory(etcd: EtcdServer, self: string, extra: Partial<EtcdPeerDirectoryOptions> = {}): EtcdPeerDirectory & { readonly logged: Captured } {
  const logged = capture(self);
  const d = new EtcdPeerDirectory({ self, endpoints: [etcd.url], prefix: '/embot', ttlSeconds: 2, tls: false, staticPeers: new Map(), version: '0.0.0-test', startedAt: Date.now(), log: logged.log, retry: { minMs: 100, maxMs: 500 }, ...extra });
  open.push(d);
  return Object.assign(d, { logged });
}

function etcdClient(etcd: EtcdServer): Etcd3 {
  const c = new Etcd3({ hosts: etcd.url });
  clients.push(c);
  return c;
}

const peerUrl = (port: number): string => `ws://127.0.0.1:${port}/`;

describe.runIf(run)('EtcdPeerDirectory on a real etcd', () => {
  it('two agents find each other; its own record is no peer; each arrival is a change event; a record is the documented JSON on a lease', async () => {
    const etcd = await etcdServer(cleanups);
    await etcd.start();
    const a = directory(etcd, 'a');
    const b = directory(etcd, 'b');
    const changes: PeerChange[] = [];
    a.on('change', (c) => changes.push(c));
    a.start({ url: peerUrl(7401) });
    b.start({ url: peerUrl(7402) });
    // Listed first, then watched: `connected` comes once the watch is up, a moment after the peers.
    await waitFor(() => a.get('b') === peerUrl(7402) && b.get('a') === peerUrl(7401) && a.status().state === 'connected', 10_000, 'a and b to see each other');
    expect([...a.keys()]).toEqual(['b']);
    expect(a.status()).toMatchObject({ kind: 'etcd', state: 'connected', peers: [{ name: 'b', url: peerUrl(7402), source: 'etcd' }] });
    expect(changes).toEqual([{ name: 'b', url: peerUrl(7402), source: 'etcd' }]);
    const kv = await etcdClient(etcd).get('/embot/agents/a').exec();
    const record = JSON.parse(kv.kvs[0]!.value.toString()) as Record<string, unknown>;
    expect(record).toEqual({ name: 'a', url: peerUrl(7401), version: '0.0.0-test', startedAt: expect.any(Number) });
    expect(Number(kv.kvs[0]!.lease)).toBeGreaterThan(0);
  });

  it('close() revokes the lease: the other side sees the agent leave at once, not a TTL later', async () => {
    const etcd = await etcdServer(cleanups);
    await etcd.start();
    const a = directory(etcd, 'a', { ttlSeconds: 30 });
    const b = directory(etcd, 'b', { ttlSeconds: 30 });
    a.start({ url: peerUrl(7401) });
    b.start({ url: peerUrl(7402) });
    await waitFor(() => a.has('b'), 10_000, 'a to see b');
    const left = new Promise<PeerChange>((r) => a.on('change', (c) => c.url === undefined && r(c)));
    await b.close();
    // With a 30 s TTL, only the revoke can make b leave within the 10 s this waits.
    await expect(Promise.race([left, new Promise((_, reject) => setTimeout(() => reject(new Error('b still listed 10 s after its close')), 10_000))])).resolves.toEqual({ name: 'b', url: undefined, source: 'etcd' });
    expect(a.has('b')).toBe(false);
    expect(b.status().state).toBe('closed');
    // Arrivals and departures are in the log, for the operator.
    expect(a.logged.lines().map((l) => l['msg'])).toEqual(expect.arrayContaining([`directory: peer b joined (${peerUrl(7402)})`, 'directory: peer b left']));
  });

  it('a static peer from config wins over an etcd record of the same name, logged once', async () => {
    const etcd = await etcdServer(cleanups);
    await etcd.start();
    const a = directory(etcd, 'a', { staticPeers: parsePeers('b=ws://127.0.0.1:9999') });
    const b = directory(etcd, 'b');
    b.start({ url: peerUrl(7402) });
    await waitFor(() => b.status().state === 'connected', 10_000, 'b registered');
    a.start({ url: peerUrl(7401) });
    await waitFor(() => a.status().state === 'connected', 10_000, 'a connected');
    // b re-written: still the config's URL, and no second log line.
    await etcdClient(etcd).put('/embot/agents/b').value(JSON.stringify({ name: 'b', url: 'ws://127.0.0.1:7502', version: 'x', startedAt: 1 })).exec();
    await waitFor(() => a.logged.lines().filter((l) => String(l['msg']).includes('its etcd record')).length >= 1, 5000, 'the shadow log line');
    await new Promise((r) => setTimeout(r, 300));
    expect(a.get('b')).toBe('ws://127.0.0.1:9999/');
    expect(a.status().peers).toEqual([{ name: 'b', url: 'ws://127.0.0.1:9999/', source: 'config' }]);
    expect(a.logged.lines().filter((l) => String(l['msg']).includes('its etcd record'))).toHaveLength(1);
  });

  it('bad input: garbage JSON, a wrong name and a bad URL in etcd are ignored with EMBOT_ERR_DIRECTORY_RECORD_INVALID; good peers stay and new ones still arrive', async () => {
    const { etcd, a } = await twoSeeingEachOther();
    const c = etcdClient(etcd);
    await c.put('/embot/agents/x').value('{garbage').exec();
    await c.put('/embot/agents/y').value(JSON.stringify({ name: 'z', url: 'ws://127.0.0.1:7403', version: '1', startedAt: 1 })).exec();
    await c.put('/embot/agents/w').value(JSON.stringify({ name: 'w', url: 'http://127.0.0.1:7404', version: '1', startedAt: 1 })).exec();
    // Well formed, but plain ws:// off loopback, which this agent (no TLS) may not dial: etcd is no way around the transport rule.
    await c.put('/embot/agents/v').value(JSON.stringify({ name: 'v', url: 'ws://10.0.0.5:7401', version: '1', startedAt: 1 })).exec();
    // A bad write over a good record does not take the peer away.
    await c.put('/embot/agents/b').value('not json either').exec();
    await c.put('/embot/agents/d').value(JSON.stringify({ name: 'd', url: 'ws://127.0.0.1:7405', version: '1', startedAt: 1 })).exec();
    await waitFor(() => a.has('d'), 10_000, 'a to see d after the bad records');
    const warned = a.logged.lines().filter((l) => l['code'] === ErrorCodes.DIRECTORY_RECORD_INVALID).map((l) => l['key']);
    expect(warned).toEqual(['/embot/agents/x', '/embot/agents/y', '/embot/agents/w', '/embot/agents/v', '/embot/agents/b']);
    expect([...a.keys()].sort()).toEqual(['b', 'd']);
    expect(a.get('b')).toBe(peerUrl(7402));
    expect(a.status().state).toBe('connected');
  });

  it('etcd down at start: static peers only, state unavailable with a coded warning; once etcd is up the others are found', async () => {
    const etcd = await etcdServer(cleanups);
    const a = directory(etcd, 'a', { staticPeers: parsePeers('s=ws://127.0.0.1:7409') });
    a.start({ url: peerUrl(7401) });
    await waitFor(() => a.status().state === 'unavailable', 10_000, 'a to give up its first try');
    expect(a.status()).toMatchObject({ state: 'unavailable', peers: [{ name: 's', source: 'config' }], lastError: { code: ErrorCodes.DIRECTORY_UNAVAILABLE } });
    expect([...a.keys()]).toEqual(['s']);
    expect(a.logged.lines().filter((l) => l['code'] === ErrorCodes.DIRECTORY_UNAVAILABLE)).toHaveLength(1);
    await etcd.start();
    const b = directory(etcd, 'b');
    b.start({ url: peerUrl(7402) });
    await waitFor(() => a.has('b') && b.has('a') && a.status().state === 'connected', 15_000, 'a and b to find each other once etcd is up');
    expect(a.status()).toMatchObject({ state: 'connected' });
    expect(a.status().lastError).toBeUndefined();
  });

  it('an agent with a topology: an etcd peer is a peer (status.directory) but no --to auto candidate (status.destinations), which the topology could not place', async () => {
    const etcd = await etcdServer(cleanups);
    await etcd.start();
    const root = mkdtempSync(join(tmpdir(), 'embot-directory-topology-'));
    cleanups.push(() => rmSync(root, { recursive: true, force: true }));
    const flags = {
      name: 'a',
      dataDir: join(root, 'data'),
      pluginsDir: join(root, 'plugins'),
      logLevel: 'error' as const,
      control: { port: 0 },
      peer: { peers: { b: 'ws://127.0.0.1:7402' } },
      directory: { kind: 'etcd' as const, endpoints: [etcd.url], ttlSeconds: 2 },
      topology: { nodes: ['tor'], links: [['a', 'tor'], ['b', 'tor']] as [string, string][] },
      sensors: { host: { intervalMs: 600_000 }, vm: { intervalMs: 600_000 } },
    };
    const agent = await startAgent(loadConfig({ env: {}, flags }), createLogger({ level: 'error', name: 'a' }));
    cleanups.push(() => agent.stop());
    await etcdClient(etcd).put('/embot/agents/c').value(JSON.stringify({ name: 'c', url: 'ws://127.0.0.1:7403', version: '1', startedAt: 1 })).exec();
    await waitFor(() => agent.control.status().directory?.peers.some((p) => p.name === 'c'), 10_000, 'the agent to list c');
    const status = agent.control.status();
    expect(status.directory?.peers.map((p) => [p.name, p.source])).toEqual([['b', 'config'], ['c', 'etcd']]);
    expect(status.destinations?.peers).toEqual(['b']);
  });

  it('an agent without a peer endpoint (no secret, no TLS) reads the directory but publishes nothing: nobody could dial it', async () => {
    const etcd = await etcdServer(cleanups);
    await etcd.start();
    const b = directory(etcd, 'b');
    b.start({ url: peerUrl(7402) });
    const root = mkdtempSync(join(tmpdir(), 'embot-directory-reader-'));
    cleanups.push(() => rmSync(root, { recursive: true, force: true }));
    const flags = { name: 'a', dataDir: join(root, 'data'), pluginsDir: join(root, 'plugins'), logLevel: 'error' as const, control: { port: 0 }, directory: { kind: 'etcd' as const, endpoints: [etcd.url] }, sensors: { host: { intervalMs: 600_000 }, vm: { intervalMs: 600_000 } } };
    const agent = await startAgent(loadConfig({ env: {}, flags }), createLogger({ level: 'error', name: 'a' }));
    cleanups.push(() => agent.stop());
    await waitFor(() => agent.control.status().directory?.state === 'connected' && agent.control.status().directory?.peers.some((p) => p.name === 'b'), 10_000, 'a to list b');
    expect((await etcdClient(etcd).getAll().prefix('/embot/agents/').keys()).sort()).toEqual(['/embot/agents/b']);
  });

  it('two agents with one name: the second does not overwrite the first (state conflict, EMBOT_ERR_DIRECTORY_NAME_TAKEN logged once) and claims the name once the first leaves', async () => {
    const etcd = await etcdServer(cleanups);
    await etcd.start();
    const first = directory(etcd, 'a', { ttlSeconds: 30 });
    first.start({ url: peerUrl(7401) });
    await waitFor(() => first.status().state === 'connected', 10_000, 'the first a registered');
    const second = directory(etcd, 'a', { ttlSeconds: 30 });
    second.start({ url: peerUrl(7411) });
    const c = directory(etcd, 'c');
    c.start({ url: peerUrl(7403) });
    await waitFor(() => second.status().state === 'conflict' && c.has('a') && second.has('c'), 10_000, 'the second a in conflict, reading its peers');
    expect(second.status().lastError).toMatchObject({ code: ErrorCodes.DIRECTORY_NAME_TAKEN, message: expect.stringContaining(peerUrl(7401)) });
    const record = async (): Promise<Record<string, unknown>> => JSON.parse((await etcdClient(etcd).get('/embot/agents/a').string()) ?? 'null') as Record<string, unknown>;
    expect(await record()).toMatchObject({ url: peerUrl(7401) });
    expect(c.get('a')).toBe(peerUrl(7401));
    expect(first.status().state).toBe('connected');
    // The holder writing its record again (a re-put, as after an outage) logs nothing new.
    await etcdClient(etcd).put('/embot/agents/a').value((await etcdClient(etcd).get('/embot/agents/a').string())!).lease((await etcdClient(etcd).get('/embot/agents/a').exec()).kvs[0]!.lease).exec();
    await new Promise((r) => setTimeout(r, 300));
    expect(second.logged.lines().filter((l) => l['code'] === ErrorCodes.DIRECTORY_NAME_TAKEN)).toHaveLength(1);
    // The first leaves (its lease revoked, its record deleted): the second claims the name, the others follow it.
    await first.close();
    await waitFor(() => second.status().state === 'connected' && c.get('a') === peerUrl(7411), 10_000, 'the second a registered once the first left');
    expect(second.status().lastError).toBeUndefined();
    expect(await record()).toMatchObject({ name: 'a', url: peerUrl(7411) });
  });

  it('two agents started with one name at the same moment: exactly one registers, the other is in conflict', async () => {
    const etcd = await etcdServer(cleanups);
    await etcd.start();
    const twins = [directory(etcd, 'a'), directory(etcd, 'a')];
    twins[0]!.start({ url: peerUrl(7401) });
    twins[1]!.start({ url: peerUrl(7411) });
    await waitFor(() => twins.every((d) => d.status().state === 'connected' || d.status().state === 'conflict'), 10_000, 'both to settle');
    const states = twins.map((d) => d.status().state).sort();
    expect(states).toEqual(['conflict', 'connected']);
    const winner = twins.find((d) => d.status().state === 'connected')!;
    const url = winner === twins[0] ? peerUrl(7401) : peerUrl(7411);
    expect(JSON.parse((await etcdClient(etcd).get('/embot/agents/a').string())!)).toMatchObject({ url });
  });

  it('a record of its own name from before (same URL, another lease: a restart inside the TTL), or one that is not a record, is replaced: the agent registers on its own lease', async () => {
    const etcd = await etcdServer(cleanups);
    await etcd.start();
    const e = etcdClient(etcd);
    // The previous life of a: same endpoint, a lease that would keep it 60 s more.
    const before = e.lease(60);
    await before.put('/embot/agents/a').value(JSON.stringify({ name: 'a', url: peerUrl(7401), version: '0.0.0-old', startedAt: 1 }));
    const a = directory(etcd, 'a');
    a.start({ url: peerUrl(7401) });
    await waitFor(() => a.status().state === 'connected', 10_000, 'a registered over its old record');
    const kv = (await e.get('/embot/agents/a').exec()).kvs[0]!;
    expect(kv.lease).not.toBe(await before.grant());
    expect(JSON.parse(kv.value.toString())).toMatchObject({ version: '0.0.0-test' });
    // The old lease expiring (revoked here) does not take the new record with it.
    await before.revoke();
    await new Promise((r) => setTimeout(r, 300));
    expect(JSON.parse((await e.get('/embot/agents/a').string())!)).toMatchObject({ version: '0.0.0-test' });
    // Garbage under b's name is no agent: b registers over it.
    await e.put('/embot/agents/b').value('{not a record').exec();
    const b = directory(etcd, 'b');
    b.start({ url: peerUrl(7402) });
    await waitFor(() => b.status().state === 'connected' && a.get('b') === peerUrl(7402), 10_000, 'b registered over the garbage');
    // Its own record deleted by hand: written again.
    await e.delete().key('/embot/agents/b').exec();
    await waitFor(async () => (await e.get('/embot/agents/b').string()) !== null, 10_000, 'b to write its record again');
    expect(b.status().state).toBe('connected');
  });

  it('etcd over TLS with client certificates (--client-cert-auth, the cluster CA): agents with directory.tls register and find each other; without a client certificate, or trusting another CA, the state is unavailable with the reason, and nothing is published', async () => {
    const root = mkdtempSync(join(tmpdir(), 'embot-directory-tls-'));
    cleanups.push(() => rmSync(root, { recursive: true, force: true }));
    const tls = await makeTlsFixture(join(root, 'ca'), ['etcd', 'a', 'b']);
    const other = await makeTlsFixture(join(root, 'other-ca'), []);
    const etcd = await etcdServer(cleanups, { tls: { cert: tls.files('etcd').cert, key: tls.files('etcd').key, ca: tls.files('etcd').ca, clientCa: tls.files('etcd').ca } });
    await etcd.start();
    expect(etcd.url).toMatch(/^https:\/\/127\.0\.0\.1:\d+$/);
    const viaConfig = (self: string, directory: Record<string, unknown>) => {
      const logged = capture(self);
      const config = loadConfig({ env: {}, flags: { name: self, dataDir: join(root, `data-${self}`), directory: { kind: 'etcd', endpoints: [etcd.url], ttlSeconds: 2, ...directory } } as NonNullable<Parameters<typeof loadConfig>[0]>['flags'] });
      const d = createPeerDirectory(config, { version: '0.0.0-test', startedAt: Date.now() }, logged.log);
      open.push(d as EtcdPeerDirectory);
      return Object.assign(d, { logged });
    };
    const a = viaConfig('a', { tls: tls.files('a') });
    const b = viaConfig('b', { tls: tls.files('b') });
    a.start!({ url: peerUrl(7401) });
    b.start!({ url: peerUrl(7402) });
    await waitFor(() => a.get('b') === peerUrl(7402) && b.get('a') === peerUrl(7401) && a.status().state === 'connected', 15_000, 'a and b to find each other over TLS');
    // No client certificate: etcd turns the handshake away.
    const anonymous = viaConfig('c', { tls: { ca: tls.files('c').ca } });
    anonymous.start!({ url: peerUrl(7403) });
    // etcd's certificate from a CA this agent does not trust.
    const distrustful = viaConfig('d', { tls: { ca: other.files('x').ca, cert: tls.files('a').cert, key: tls.files('a').key } });
    distrustful.start!({ url: peerUrl(7404) });
    await waitFor(() => anonymous.status().state === 'unavailable' && distrustful.status().state === 'unavailable', 15_000, 'both to give up');
    expect(anonymous.status().lastError).toMatchObject({ code: ErrorCodes.DIRECTORY_UNAVAILABLE, message: expect.stringContaining(etcd.url) });
    expect(distrustful.status().lastError).toMatchObject({ code: ErrorCodes.DIRECTORY_UNAVAILABLE });
    await new Promise((r) => setTimeout(r, 500));
    expect([...a.keys()]).toEqual(['b']);
  });

  it('etcd with user/password authentication (directory.auth, the password from a file): the right password registers; a wrong one is unavailable with etcd’s reason and retried, nothing published', async () => {
    const etcd = await etcdServer(cleanups);
    await etcd.start();
    const root = mkdtempSync(join(tmpdir(), 'embot-directory-auth-'));
    cleanups.push(() => rmSync(root, { recursive: true, force: true }));
    const admin = etcdClient(etcd);
    await admin.role('root').create();
    await admin.user('root').create('root-password');
    await admin.user('root').addRole('root');
    // An agents' user allowed the fleet's folder only.
    const role = await admin.role('embot').create();
    await role.grant({ permission: 'Readwrite', range: admin.range({ prefix: '/embot/' }) });
    await admin.user('embot').create('agent-password');
    await admin.user('embot').addRole('embot');
    await admin.auth.authEnable();
    writeFileSync(join(root, 'good'), 'agent-password\n');
    writeFileSync(join(root, 'bad'), 'guess\n');
    const viaConfig = (self: string, passwordFile: string) => {
      const logged = capture(self);
      const config = loadConfig({ env: {}, flags: { name: self, dataDir: join(root, `data-${self}`), directory: { kind: 'etcd', endpoints: [etcd.url], ttlSeconds: 2, auth: { username: 'embot', passwordFile } } } as NonNullable<Parameters<typeof loadConfig>[0]>['flags'] });
      const d = createPeerDirectory(config, { version: '0.0.0-test', startedAt: Date.now() }, logged.log);
      open.push(d as EtcdPeerDirectory);
      return Object.assign(d, { logged });
    };
    const a = viaConfig('a', join(root, 'good'));
    const b = viaConfig('b', join(root, 'good'));
    const intruder = viaConfig('x', join(root, 'bad'));
    a.start!({ url: peerUrl(7401) });
    b.start!({ url: peerUrl(7402) });
    intruder.start!({ url: peerUrl(7409) });
    await waitFor(() => a.get('b') === peerUrl(7402) && b.get('a') === peerUrl(7401) && intruder.status().state === 'unavailable', 15_000, 'a and b to find each other, x to be turned away');
    expect(intruder.status().lastError?.message).toMatch(/authentication failed/);
    const asRoot = new Etcd3({ hosts: etcd.url, auth: { username: 'root', password: 'root-password' } });
    clients.push(asRoot);
    expect((await asRoot.getAll().prefix('/embot/agents/').keys()).sort()).toEqual(['/embot/agents/a', '/embot/agents/b']);
  });

  it('etcd killed while running: known peers stay, state unavailable; back up, the directory reconnects and still lists them', async () => {
    const { etcd, a, b } = await twoSeeingEachOther();
    await etcd.kill();
    await waitFor(() => a.status().state === 'unavailable', 15_000, 'a to notice etcd is gone');
    expect(a.get('b')).toBe(peerUrl(7402));
    // Longer than 2 TTLs: the lease is given up and re-made on reconnect.
    await new Promise((r) => setTimeout(r, 4500));
    expect(a.get('b')).toBe(peerUrl(7402));
    await etcd.start();
    await waitFor(() => a.status().state === 'connected' && b.status().state === 'connected', 20_000, 'both to reconnect');
    expect(a.get('b')).toBe(peerUrl(7402));
    expect(b.get('a')).toBe(peerUrl(7401));
  });
});
