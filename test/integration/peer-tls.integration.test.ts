/**
 * Peer links and data paths over mutual TLS between real agents (child processes on loopback):
 * a migration with an extra data path, and the peers that must be refused — a certificate from
 * another CA, a valid certificate for another name, a plain ws:// client — after each of which
 * the agent still serves. Certificates are made into the cluster's temp folder, deleted with it.
 */
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createSecureContext, type SecureContext } from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { ErrorCodes, type EmbotError } from '../../core/errors.ts';
import { connectPeer } from '../../core/wire/index.ts';
import { loadPeerTls } from '../../core/wire/peer-tls.ts';
import { AgentProcess, makeSandbox, waitFor } from '../harness/agent-process.ts';
import { Cluster, freePort, migrate } from '../harness/cluster.ts';
import { makeTlsFixture } from '../harness/cluster-tls.ts';

const MiB = 1024 * 1024;

async function refusal(p: Promise<{ close(): Promise<unknown> }>): Promise<EmbotError | undefined> {
  try {
    await (await p).close();
    return undefined;
  } catch (e) {
    return e as EmbotError;
  }
}

/** JSON log lines of an agent that carry `code`. */
function logged(agent: AgentProcess, code: string): boolean {
  return agent.stderr.split('\n').some((line) => line.includes('peer refused') && line.includes(code));
}

describe('two agents over mutual TLS', () => {
  let cluster: Cluster;
  let p2: number;

  beforeAll(async () => {
    p2 = await freePort();
    const cap = 8 * MiB;
    cluster = await Cluster.start(['a', 'b'], {
      tls: {},
      config: (n) =>
        n === 'a'
          ? { dataplane: { primaryCapBytesPerSec: cap, maxPaths: 2, paths: { b: [{ name: 'p2', url: `wss://127.0.0.2:${p2}`, localAddress: '127.0.0.12', capBytesPerSec: cap }] } } }
          : { dataplane: { listen: [`127.0.0.2:${p2}`] } },
    });
  }, 60_000);
  afterAll(async () => {
    await cluster?.stop();
  });

  it('listens on wss:// and says so at start', () => {
    const b = cluster.agent('b');
    expect(b.stdout).toMatch(/ready: control http:\/\/127\.0\.0\.1:\d+, peer wss:\/\/127\.0\.0\.1:\d+\//);
    expect(b.stderr).toContain('peer links: wss:// with mutual TLS');
  });

  it('migrates a sim VM byte-exact, with a second data path over TLS', async () => {
    const a = cluster.agent('a');
    await a.client.createVm({ name: 'tls-vm', memory: 8 * MiB, dirtyRate: 4 * MiB });
    await a.client.vmAction('tls-vm', 'start');
    await waitFor(async () => (await a.client.listVms()).some((v) => v.name === 'tls-vm' && v.state === 'running'), 5000, 'the VM running');
    await a.client.vmAction('tls-vm', 'stop');
    const before = await a.client.vmChecksum('tls-vm');
    // One 8 MiB/s path needs ~1 s for 8 MiB; a 600 ms threshold makes the planner add p2 (wss://127.0.0.2).
    const info = await migrate(a, 'tls-vm', 'b', { thresholdMs: 600 });
    expect(info.outcome, info.reason).toBe('completed');
    expect(info.summary!.paths).toBe(2);
    expect(info.summary!.plan?.paths).toEqual(['direct', 'p2']);
    expect((await cluster.agent('b').client.vmChecksum('tls-vm')).sha256).toBe(before.sha256);
  });

  it('refuses a peer whose certificate another CA signed, even with the cluster secret, and keeps serving', async () => {
    const b = cluster.agent('b');
    const intruder = await makeTlsFixture(join(cluster.root, 'intruder-ca'), ['a']);
    const own = loadPeerTls(intruder.files('a'), 'a');
    // The intruder trusts the cluster CA (public), so only its own certificate is wrong.
    const tls = { ...own, ...loadPeerTlsWithAnchor(intruder.files('a'), cluster.tls!.files('a').ca) };
    const secret = readFileSync(cluster.secretFile);
    const err = await refusal(connectPeer({ url: `wss://127.0.0.1:${cluster.port('b')}/`, agent: 'a', expectedPeer: 'b', tls, secret }));
    expect(err?.code).toBe(ErrorCodes.PEER_CERT_UNTRUSTED);
    await waitFor(() => logged(b, ErrorCodes.PEER_CERT_UNTRUSTED), 5000, 'b to log the refusal');
    expect((await b.client.status()).name).toBe('b');
  });

  it('refuses a valid certificate of another agent used to claim a name, and keeps serving', async () => {
    const b = cluster.agent('b');
    // A certificate the cluster CA issued to c, presented by someone claiming to be a.
    const files = await cluster.tls!.issue('c');
    const tls = loadPeerTls(files, 'c');
    const secret = readFileSync(cluster.secretFile);
    const err = await refusal(connectPeer({ url: `wss://127.0.0.1:${cluster.port('b')}/`, agent: 'a', expectedPeer: 'b', tls, secret }));
    expect(err?.code).toBe(ErrorCodes.PEER_CERT_NAME_MISMATCH);
    await waitFor(() => logged(b, ErrorCodes.PEER_CERT_NAME_MISMATCH), 5000, 'b to log the refusal');
    expect((await b.client.status()).name).toBe('b');
  });

  it('a plain ws:// client to the TLS listener fails, and the agent keeps serving', async () => {
    const b = cluster.agent('b');
    const ws = new WebSocket(`ws://127.0.0.1:${cluster.port('b')}/`, { handshakeTimeout: 3000 });
    const outcome = await new Promise<string>((resolve) => {
      ws.on('open', () => resolve('open'));
      ws.on('error', (e) => resolve(`error: ${e.message}`));
    });
    ws.terminate();
    expect(outcome).toMatch(/^error/);
    await waitFor(() => logged(b, ErrorCodes.PEER_TLS_FAILED), 5000, 'b to log the refusal');
    expect((await b.client.status()).name).toBe('b');
    // And it still migrates: the VM goes back to a over TLS.
    expect((await migrate(b, 'tls-vm', 'a')).outcome).toBe('completed');
  });
});

describe('mutual TLS without a cluster secret', () => {
  let cluster: Cluster | undefined;
  afterAll(async () => {
    await cluster?.stop();
  });

  it('certificates alone authenticate the agents: a migration completes', async () => {
    cluster = await Cluster.start(['a', 'b'], { tls: { secret: false } });
    const a = cluster.agent('a');
    expect(a.stderr).toContain('peer links: wss:// with mutual TLS; peers need a certificate from the cluster CA that names them"');
    await a.client.createVm({ name: 'solo', memory: 4 * MiB });
    await a.client.vmAction('solo', 'start');
    const info = await migrate(a, 'solo', 'b');
    expect(info.outcome, info.reason).toBe('completed');
    expect((await cluster.agent('b').client.listVms()).map((v) => `${v.name}:${v.state}`)).toEqual(['solo:running']);
  }, 60_000);
});

/** The intruder's certificate and key with the cluster CA as trust anchor (loadPeerTls refuses that mix by design). */
function loadPeerTlsWithAnchor(files: { ca: string; cert: string; key: string }, clusterCa: string): { ca: Buffer; clientContext: SecureContext } {
  const ca = readFileSync(clusterCa);
  const cert = readFileSync(files.cert);
  const key = readFileSync(files.key);
  return { ca, clientContext: createSecureContext({ ca, cert, key, minVersion: 'TLSv1.3' }) };
}

describe('plain ws:// only on loopback', () => {
  it('an agent without TLS refuses to start on a non-loopback peer listener (exit 2, CONFIG_INVALID)', async () => {
    const box = makeSandbox();
    const secret = join(box.root, 'cluster.secret');
    writeFileSync(secret, 'a-cluster-secret-for-this-test-only');
    const started = AgentProcess.start({ name: 'open', dataDir: box.dataDir('open'), pluginsDir: box.pluginsDir, extraArgs: ['--peer-listen', `0.0.0.0:${await freePort()}`, '--secret-file', secret] });
    await expect(started).rejects.toThrow(/exited with 2[\s\S]*peer\.listen: 0\.0\.0\.0:\d+ is not a loopback address[\s\S]*EMBOT_ERR_CONFIG_INVALID/);
  });

  it('an agent whose certificate names another agent refuses to start (exit 2), before opening its store', async () => {
    const box = makeSandbox();
    const fixture = await makeTlsFixture(join(box.root, 'tls'), ['b']);
    const f = fixture.files('b');
    const started = AgentProcess.start({
      name: 'a',
      dataDir: box.dataDir('a'),
      pluginsDir: box.pluginsDir,
      extraArgs: ['--peer-listen', `127.0.0.1:${await freePort()}`, '--tls-ca', f.ca, '--tls-cert', f.cert, '--tls-key', f.key],
    });
    await expect(started).rejects.toThrow(/exited with 2[\s\S]*is issued to CN=b[\s\S]*not to this agent a[\s\S]*EMBOT_ERR_CONFIG_INVALID/);
    expect(existsSync(join(box.dataDir('a'), 'embot.sqlite'))).toBe(false);
  });

  it('on loopback it starts, and says the links are plain ws://', async () => {
    const box = makeSandbox();
    const secret = join(box.root, 'cluster.secret');
    writeFileSync(secret, 'a-cluster-secret-for-this-test-only');
    const agent = await AgentProcess.start({ name: 'local', dataDir: box.dataDir('local'), pluginsDir: box.pluginsDir, extraArgs: ['--peer-listen', `127.0.0.1:${await freePort()}`, '--secret-file', secret] });
    try {
      expect(agent.stderr).toContain('peer links: plain ws:// without TLS, allowed because every peer listener and peer URL is on loopback');
    } finally {
      expect(await agent.stop()).toBe(0);
    }
  });
});
