import { afterEach, describe, expect, it } from 'vitest';
import { readFileSync, readdirSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import { ErrorCodes } from '../../core/errors.ts';
import { VmUdpServices } from '../../sensors/index.ts';
import { silentLogger } from '../../core/logger.ts';
import { encodePackets } from '../../sensors/udp-relay.ts';
import { PeerServer, connectPeer, loadClusterSecret, type PeerConnection } from '../../core/wire/index.ts';
import { Cluster } from '../harness/cluster.ts';
import { waitFor } from '../harness/agent-process.ts';
import { RawPeer, type Outcome } from '../harness/raw-peer.ts';
import { startMigration } from '../harness/migration-frames.ts';

/** UDP sockets process `pid` holds: its socket fds whose inode the kernel lists as UDP. */
function udpSockets(pid: number): number {
  const udp = new Set<string>();
  for (const table of ['udp', 'udp6']) {
    let text = '';
    try {
      text = readFileSync(`/proc/${pid}/net/${table}`, 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n').slice(1)) {
      const cols = line.trim().split(/\s+/);
      if (cols.length > 9) udp.add(cols[9]!);
    }
  }
  let n = 0;
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    let target = '';
    try {
      target = readlinkSync(`/proc/${pid}/fd/${fd}`);
    } catch {
      continue; // closed while we looked
    }
    const m = /^socket:\[(\d+)\]$/.exec(target);
    if (m && udp.has(m[1]!)) n++;
  }
  return n;
}

function errorCode(o: Outcome): string | undefined {
  return o.kind === 'frame' && o.frame.type === 'Error' ? o.frame.code : undefined;
}

function reasonOf(o: Outcome): string {
  return o.kind === 'frame' ? String((o.frame as { readonly reason?: unknown }).reason ?? '') : '';
}

function replyType(o: Outcome): string {
  return o.kind === 'frame' ? o.frame.type : `closed ${o.closed.code}`;
}

let cluster: Cluster | undefined;
const peers: RawPeer[] = [];
const conns: PeerConnection[] = [];
const servers: PeerServer[] = [];
afterEach(async () => {
  for (const p of peers.splice(0)) await p.close().catch(() => {});
  for (const c of conns.splice(0)) await c.close().catch(() => {});
  for (const s of servers.splice(0)) await s.close().catch(() => {});
  await cluster?.stop();
  cluster = undefined;
});

/** One agent `b` as a child process, with its peer URL and the cluster secret a hostile peer also holds. */
async function agentB(extra: Record<string, unknown> = {}): Promise<{ url: string; secret: Uint8Array; pid: number; c: Cluster }> {
  // Long step timeouts: migrations a test opens wait where they are until it moves them on.
  const c = await Cluster.start(['b'], { config: () => ({ mobility: { stepTimeoutMs: 60_000, vmTimeoutMs: 60_000, forwardGraceMs: 5000, trust: { mode: 'any-authenticated-peer' } }, ...extra }) });
  cluster = c;
  const config = JSON.parse(readFileSync(join(c.root, 'config-b.json'), 'utf8')) as { peer: { listen: string } };
  return { url: `ws://${config.peer.listen}`, secret: loadClusterSecret(c.secretFile), pid: c.agent('b').child.pid!, c };
}

async function exitsAfterSigterm(c: Cluster): Promise<number | null> {
  const agent = c.agent('b');
  const exited = agent.stop();
  // "Promptly": the orderly stop waits at most 2 s for peers to close; 15 s means it hangs.
  const verdict = await Promise.race([exited, new Promise<'still running'>((r) => setTimeout(() => r('still running'), 15_000).unref())]);
  if (verdict !== 0) console.error(`agent b after SIGTERM: ${String(verdict)}\n${agent.stdout.slice(-3000)}\n${agent.stderr.slice(-3000)}`);
  return verdict === 'still running' ? -1 : verdict;
}

describe('resources a peer can make the agent open', () => {
  it('defect 3: UdpHandover for no migration gets a coded error and opens no socket; SIGTERM then stops the agent', async () => {
    const { url, secret, pid, c } = await agentB();
    const before = udpSockets(pid);
    const mallory = await RawPeer.connect(url, 'mallory', secret);
    peers.push(mallory);
    const packets = encodePackets([]);
    // The reproduction: the same ghost three times, then distinct names (the unbounded leak).
    for (let i = 1; i <= 3; i++) {
      const o = await mallory.request({ type: 'UdpHandover', reqId: i, migrationId: 'no-such', vm: 'ghost', served: 0, packets });
      expect(errorCode(o)).toBe(ErrorCodes.MIGRATION_UNKNOWN);
    }
    for (let i = 0; i < 20; i++) {
      const o = await mallory.request({ type: 'UdpHandover', reqId: 100 + i, migrationId: `no-such-${i}`, vm: `ghost-${i}`, served: i, packets });
      expect(errorCode(o)).toBe(ErrorCodes.MIGRATION_UNKNOWN);
    }
    expect(udpSockets(pid)).toBe(before);
    // The agent still serves the link and its operator.
    expect(replyType(await mallory.request({ type: 'Ping', reqId: 999, ts: 1 }))).toBe('Pong');
    expect((await c.agent('b').client.status()).name).toBe('b');
    // SIGTERM with links open, one of them stuck before its Hello, and a migration staged.
    for (let i = 0; i < 5; i++) peers.push(await RawPeer.connect(url, `idle-${i}`, secret));
    const stuck = new RawPeer(url);
    peers.push(stuck);
    expect(replyType(await mallory.request(startMigration(1000, 'm-staged', 'staged')))).toBe('MigrationPermitted');
    expect(await exitsAfterSigterm(c)).toBe(0);
  });

  it('bounds the incoming migrations one peer holds, and releases them on abort and on disconnect', async () => {
    const { url, secret, c } = await agentB();
    const client = c.agent('b').client;
    const mallory = await RawPeer.connect(url, 'mallory', secret);
    peers.push(mallory);
    const verdicts: string[] = [];
    for (let i = 0; i < 5; i++) {
      const o = await mallory.request(startMigration(i + 1, `m-${i}`, `v${i}`));
      verdicts.push(errorCode(o) ?? replyType(o));
    }
    expect(verdicts).toEqual(['MigrationPermitted', 'MigrationPermitted', 'MigrationPermitted', 'MigrationPermitted', ErrorCodes.PEER_LIMIT]);
    // The refused one left no trace.
    expect((await client.listMigrations()).map((m) => m.id).sort()).toEqual(['m-0', 'm-1', 'm-2', 'm-3']);
    // Another peer has a share of its own.
    const eve = await RawPeer.connect(url, 'eve', secret);
    peers.push(eve);
    expect(replyType(await eve.request(startMigration(1, 'e-0', 'w0')))).toBe('MigrationPermitted');
    // eve cannot abort mallory's migrations; mallory can.
    eve.send({ type: 'Abort', migrationId: 'm-0', reason: 'not yours' });
    expect(replyType(await eve.request({ type: 'Ping', reqId: 2, ts: 1 }))).toBe('Pong');
    expect((await client.getMigration('m-0'))?.outcome ?? null).toBeNull();
    mallory.send({ type: 'Abort', migrationId: 'm-0', reason: 'changed my mind' });
    await waitFor(async () => (await client.getMigration('m-0'))?.outcome === 'aborted', 10_000, 'm-0 aborted');
    expect(replyType(await mallory.request(startMigration(10, 'm-5', 'v5')))).toBe('MigrationPermitted');
    // The link goes: everything mallory staged goes with it, and its VM names are free again.
    await mallory.close();
    await waitFor(async () => (await client.listMigrations()).filter((m) => m.id.startsWith('m-')).every((m) => m.outcome === 'aborted'), 10_000, "mallory's migrations aborted");
    const again = await RawPeer.connect(url, 'mallory', secret);
    peers.push(again);
    expect(replyType(await again.request(startMigration(1, 'm-6', 'v1')))).toBe('MigrationPermitted');
    expect(await exitsAfterSigterm(c)).toBe(0);
  });

  it('counts the memory promised to migrations still arriving, until they are aborted or fail', async () => {
    const { url, secret, c } = await agentB({ sim: { hostMemory: 8 << 20 } });
    const client = c.agent('b').client;
    const mallory = await RawPeer.connect(url, 'mallory', secret);
    peers.push(mallory);
    expect(replyType(await mallory.request(startMigration(1, 'm-0', 'v0', 5 << 20)))).toBe('MigrationPermitted');
    const second = await mallory.request(startMigration(2, 'm-1', 'v1', 5 << 20));
    expect(second).toMatchObject({ kind: 'frame', frame: { type: 'MigrationDenied', reason: expect.stringContaining('not enough memory') } });
    mallory.send({ type: 'Abort', migrationId: 'm-0', reason: 'make room' });
    await waitFor(async () => (await client.getMigration('m-0'))?.outcome === 'aborted', 10_000, 'm-0 aborted');
    expect(replyType(await mallory.request(startMigration(3, 'm-2', 'v2', 5 << 20)))).toBe('MigrationPermitted');
    // A step that fails (state that does not decode) discards the migration, and its memory with it.
    const bad = await mallory.request({ type: 'ManagementState', reqId: 4, migrationId: 'm-2', elements: new Uint8Array([1, 2, 3]), embots: new Uint8Array(0) });
    expect(replyType(bad)).toMatch(/ManagedObjectInstantiationError|ManagementStateFailed/);
    await waitFor(async () => (await client.getMigration('m-2'))?.outcome === 'aborted', 10_000, 'm-2 discarded');
    expect(replyType(await mallory.request(startMigration(5, 'm-3', 'v2', 5 << 20)))).toBe('MigrationPermitted');
    expect(await exitsAfterSigterm(c)).toBe(0);
  });

  it('refuses frames for a migration of another peer, another VM or another phase, and changes nothing', async () => {
    const { url, secret, c } = await agentB();
    const client = c.agent('b').client;
    const a = await RawPeer.connect(url, 'a', secret);
    const mallory = await RawPeer.connect(url, 'mallory', secret);
    peers.push(a, mallory);
    expect(replyType(await a.request(startMigration(1, 'm-a', 'web')))).toBe('MigrationPermitted');
    const bin = new Uint8Array(8);
    // Another peer, naming a live migration of a: as if it did not exist.
    expect(errorCode(await mallory.request({ type: 'ManagementState', reqId: 1, migrationId: 'm-a', elements: bin, embots: bin }))).toBe(ErrorCodes.MIGRATION_UNKNOWN);
    expect(errorCode(await mallory.request({ type: 'MigrationStatusQuery', reqId: 2, migrationId: 'm-a' }))).toBe(ErrorCodes.MIGRATION_UNKNOWN);
    // The source itself, out of order (the target waits for ManagementState).
    expect(errorCode(await a.request({ type: 'DirtyObjects', reqId: 2, migrationId: 'm-a', round: 0, deltas: bin, events: bin }))).toBe(ErrorCodes.MIGRATION_PHASE);
    expect(errorCode(await a.request({ type: 'MigrationComplete', reqId: 3, migrationId: 'm-a' }))).toBe(ErrorCodes.MIGRATION_PHASE);
    expect(errorCode(await a.request({ type: 'UdpHandover', reqId: 4, migrationId: 'm-a', vm: 'web', served: 0, packets: encodePackets([]) }))).toBe(ErrorCodes.MIGRATION_PHASE);
    expect(errorCode(await a.request({ type: 'VmMemory', reqId: 5, migrationId: 'm-a', vm: 'other', round: 0, seq: 0, last: true, pages: bin }))).toBe(ErrorCodes.MIGRATION_MISMATCH);
    // BootIncoming (several destinations) belongs after the final round only, and to the migration's source.
    expect(errorCode(await a.request({ type: 'BootIncoming', reqId: 7, migrationId: 'm-a' }))).toBe(ErrorCodes.MIGRATION_PHASE);
    expect(errorCode(await mallory.request({ type: 'BootIncoming', reqId: 3, migrationId: 'm-a' }))).toBe(ErrorCodes.MIGRATION_UNKNOWN);
    expect(errorCode(await mallory.request({ type: 'BootIncoming', reqId: 4, migrationId: 'no-such' }))).toBe(ErrorCodes.MIGRATION_UNKNOWN);
    // A StartMigration whose elements are not the VM it names opens nothing.
    const wrong = { ...startMigration(6, 'm-x', 'web2'), vm: 'web3' };
    expect(errorCode(await a.request(wrong))).toBe(ErrorCodes.MIGRATION_MISMATCH);
    // Still waiting where it was, none of it journaled.
    const m = await client.getMigration('m-a');
    expect(m).toMatchObject({ phase: 'permitted', outcome: null });
    expect((await client.listMigrations()).map((x) => x.id)).toEqual(['m-a']);
    expect(await exitsAfterSigterm(c)).toBe(0);
  });

  it('takes PrepareIncoming right after the permit (early prepare), once; an Abort before the memory moves throws the incoming VM away', async () => {
    const { url, secret, c } = await agentB();
    const client = c.agent('b').client;
    const a = await RawPeer.connect(url, 'a', secret);
    peers.push(a);
    const prepare = (reqId: number, migrationId: string, spec: Record<string, unknown>): Record<string, unknown> & { reqId: number } =>
      ({ type: 'PrepareIncoming', reqId, migrationId, vm: 'web', spec, channels: 1 });
    expect(replyType(await a.request(startMigration(1, 'm-early', 'web')))).toBe('MigrationPermitted');
    // Bad input first: a spec for another VM, or more memory than was permitted, readies nothing.
    const otherVm = await a.request(prepare(2, 'm-early', { name: 'ghost', memory: 1 << 20 }));
    expect(replyType(otherVm)).toBe('MigrationStateFailed');
    expect(reasonOf(otherVm)).toMatch(/names VM ghost/);
    expect(replyType(await a.request(prepare(3, 'm-early', { name: 'web', memory: 2 << 20 })))).toBe('MigrationStateFailed');
    // Before ManagementState, in 'permitted': readied.
    expect(replyType(await a.request(prepare(4, 'm-early', { name: 'web', memory: 1 << 20 })))).toBe('IncomingReady');
    // Once per migration.
    const again = await a.request(prepare(5, 'm-early', { name: 'web', memory: 1 << 20 }));
    expect(reasonOf(again)).toMatch(/already prepared/);
    expect(await client.getMigration('m-early')).toMatchObject({ phase: 'permitted', outcome: null });
    a.send({ type: 'Abort', migrationId: 'm-early', reason: 'test: the source rolls back before the memory moves' });
    await waitFor(async () => (await client.getMigration('m-early'))?.outcome === 'aborted', 10_000, 'm-early aborted at b');
    // The incoming VM is gone: a new migration of the same VM is permitted and can ready it again
    // (a leftover one would be refused with VM_EXISTS in the reason).
    expect(replyType(await a.request(startMigration(6, 'm-early-2', 'web')))).toBe('MigrationPermitted');
    const ready = await a.request(prepare(7, 'm-early-2', { name: 'web', memory: 1 << 20 }));
    expect(ready.kind === 'frame' ? ready.frame : ready).toMatchObject({ type: 'IncomingReady' });
    expect(await exitsAfterSigterm(c)).toBe(0);
  });

  it('closes what an adopted UDP service replaces, and every socket on close', async () => {
    const udp = new VmUdpServices(silentLogger);
    const before = udpSockets(process.pid);
    try {
      await udp.adopt('web', 0, encodePackets([]));
      const one = udpSockets(process.pid) - before;
      expect(one).toBeGreaterThan(0);
      await udp.adopt('web', 5, encodePackets([]));
      await udp.adopt('web', 9, encodePackets([]));
      expect(udpSockets(process.pid) - before).toBe(one);
      await udp.adopt('db', 0, encodePackets([]));
      expect(udpSockets(process.pid) - before).toBe(2 * one);
      await expect(udp.adopt('bad', 0, new Uint8Array([1, 2, 3]))).rejects.toMatchObject({ code: ErrorCodes.UDP_PACKETS_DECODE });
      expect(udpSockets(process.pid) - before).toBe(2 * one);
    } finally {
      await udp.close();
    }
    expect(udpSockets(process.pid)).toBe(before);
    expect(udp.openCount).toBe(0);
    await expect(udp.adopt('late', 0, encodePackets([]))).rejects.toMatchObject({ code: ErrorCodes.AGENT_STOPPED });
    expect(udpSockets(process.pid)).toBe(before);
  });

  it('caps the links one peer holds; other peers still get in', async () => {
    const secret = Buffer.from('peer-bounds-cluster-secret-0001');
    const server = await PeerServer.listen({ agent: 'b', secret, listen: '127.0.0.1:0', maxConnectionsPerPeer: 2 });
    servers.push(server);
    const open = async (agent: string): Promise<PeerConnection> => {
      const conn = await connectPeer({ url: server.url, agent, secret });
      conns.push(conn);
      return conn;
    };
    const first = await open('a');
    await open('a');
    const third = await open('a').then(
      async (conn) => (await conn.closed).error?.code,
      (e: { code?: string }) => e.code,
    );
    expect(third).toBe(ErrorCodes.PEER_LIMIT);
    expect(server.connections.filter((x) => x.remoteAgent === 'a')).toHaveLength(2);
    expect((await open('c')).isOpen).toBe(true);
    await first.close();
    await waitFor(() => server.connections.filter((x) => x.remoteAgent === 'a').length === 1, 5000, 'the closed link gone');
    expect(await (await open('a')).ping()).toBeGreaterThanOrEqual(0);
  });
});
