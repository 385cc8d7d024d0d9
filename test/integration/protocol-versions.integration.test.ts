/**
 * Wire protocol versions across a rolling upgrade (core/wire/frames.ts PROTOCOL_VERSION,
 * MIN_PROTOCOL_VERSION; config `peer.protocol`). A link runs at the client's version when the
 * server speaks it; a client turned away by a server of an older version dials again at that
 * server's newest. An agent pinned at protocol 1 (`peer.protocol: 1`) stands in for one built
 * before protocol 2: it refuses the fields protocol 2 added (PageBatch.zeros, DirtyObjects.boot)
 * as an old build does, so a newer agent must not send them to it, and migrations both ways and a
 * fan-out with one such destination complete as they did before. One pinned at 2 stands in for a
 * build before protocol 3 (MigrationStateFailed.failedStep), one pinned at 3 for a build before 4
(PrepareIncoming.prewarm).
 */
import { once } from 'node:events';
import { createHash, randomBytes } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../core/errors.ts';
import { speaksUpTo } from '../../core/wire/handshake.ts';
import { PROTOCOL_VERSION, type ProtocolFeature } from '../../core/wire/frames.ts';
import { connectPeer } from '../../core/wire/peer-client.ts';
import type { PeerConnection } from '../../core/wire/peer-connection.ts';
import { PeerServer } from '../../core/wire/peer-server.ts';
import { ProtocolError } from '../../core/errors.ts';
import { sleep, waitFor, type AgentProcess } from '../harness/agent-process.ts';
import { Cluster } from '../harness/cluster.ts';
import { counterOf, tickProducer } from '../harness/counter-stream.ts';
import { expectClean, expectStreamExact } from '../harness/migration-checks.ts';
import { RawPeer } from '../harness/raw-peer.ts';

const SECRET = randomBytes(32);
const MiB = 1 << 20;
const servers: PeerServer[] = [];
const conns: PeerConnection[] = [];
let cluster: Cluster | undefined;
afterEach(async () => {
  for (const c of conns.splice(0)) await c.close().catch(() => {});
  for (const s of servers.splice(0)) await s.close();
  await cluster?.stop();
  cluster = undefined;
});

function nextConnection(server: PeerServer): Promise<PeerConnection> {
  return new Promise((resolve) => server.once('connection', resolve));
}

async function serve(protocol?: number): Promise<{ server: PeerServer; url: string; accepted: Promise<PeerConnection> }> {
  const server = await PeerServer.listen({ agent: 'b', secret: SECRET, listen: '127.0.0.1:0', ...(protocol === undefined ? {} : { protocol }) });
  servers.push(server);
  const accepted = nextConnection(server);
  return { server, url: `ws://127.0.0.1:${server.address.port}/`, accepted };
}

describe('the link settles on a version both ends speak', () => {
  it('a client of protocol 4 and a server of protocol 1: dialled again at 1, both ends say 1, no protocol-2 field is spoken', async () => {
    const { url, accepted } = await serve(1);
    const conn = await connectPeer({ url, agent: 'a', expectedPeer: 'b', secret: SECRET });
    conns.push(conn);
    expect(PROTOCOL_VERSION).toBe(4);
    expect(conn.protocol).toBe(1);
    expect((await accepted).protocol).toBe(1);
    expect(conn.supports('zeroPages')).toBe(false);
    expect(conn.supports('bootWithFinalRound')).toBe(false);
    expect(conn.supports('failedStep')).toBe(false);
    expect(conn.supports('prewarmPrepare')).toBe(false);
  });

  it('a client pinned at 1, 2 or 3 and a server of protocol 4: the link runs at the client\'s; two agents of 4 run at 4', async () => {
    const { url, server } = await serve();
    // Each version with the features it has (true) and the first it lacks (false); undefined: the newest.
    const versions: readonly [number | undefined, Readonly<Partial<Record<ProtocolFeature, boolean>>>][] = [
      [1, { zeroPages: false }],
      [2, { bootWithFinalRound: true, failedStep: false }],
      [3, { failedStep: true, prewarmPrepare: false, completeMemoryBytes: false }],
      [undefined, { zeroPages: true, failedStep: true, prewarmPrepare: true, completeMemoryBytes: true }],
    ];
    for (const [protocol, features] of versions) {
      const atServer = nextConnection(server);
      const conn = await connectPeer({ url, agent: 'a', expectedPeer: 'b', secret: SECRET, ...(protocol === undefined ? {} : { protocol }) });
      conns.push(conn);
      expect(conn.protocol).toBe(protocol ?? 4);
      expect((await atServer).protocol).toBe(protocol ?? 4);
      for (const [f, has] of Object.entries(features)) expect(conn.supports(f as ProtocolFeature), `${protocol ?? 'newest'}: ${f}`).toBe(has);
    }
  });

  it('a Hello of a version the server does not speak (0, 5): PROTOCOL_UNSUPPORTED naming the versions it speaks; the server serves the next client', async () => {
    const { url } = await serve();
    for (const bad of [0, 5]) {
      const raw = new RawPeer(url);
      await once(raw.ws, 'open');
      raw.send({ type: 'Hello', protocol: bad, agent: 'a', nonce: new Uint8Array(32) });
      const reply = await raw.next();
      expect(reply, String(bad)).toMatchObject({ type: 'Error', code: ErrorCodes.PROTOCOL_UNSUPPORTED });
      expect((reply as { message: string }).message).toContain(`protocol version ${bad} is not supported (this agent speaks 1 to 4)`);
      await raw.closed;
    }
    const conn = await connectPeer({ url, agent: 'a', expectedPeer: 'b', secret: SECRET });
    conns.push(conn);
    expect(conn.protocol).toBe(4);
  });

  // A request carrying a field newer than the link, sent raw past the sender's own check: the receiver refuses it.
  it.each([
    [1, 'PageBatch.zeros', { type: 'PageBatch', migrationId: 'm1', path: 'p0', round: 0, final: false, pageSize: 4096, indexes: new Uint8Array(0), pages: new Uint8Array(0), checksum: 0, zeros: new Uint8Array(4) }, 'PageBatch.zeros is protocol 2; this link runs protocol 1'],
    [3, 'PrepareIncoming.prewarm', { type: 'PrepareIncoming', migrationId: 'm1', vm: 'vm1', spec: { name: 'vm1' }, channels: 1, prewarm: true }, 'PrepareIncoming.prewarm is protocol 4; this link runs protocol 3'],
  ] as const)('on a link of protocol %i, a newer field (%s) is refused as malformed, as an older build refuses an unknown field', async (protocol, _field, frame, message) => {
    const { url, accepted } = await serve();
    const conn = await connectPeer({ url, agent: 'a', expectedPeer: 'b', secret: SECRET, protocol });
    conns.push(conn);
    const server = await accepted;
    const refused = new Promise<{ code: string; message: string }>((resolve) => server.once('protocolError', (e) => resolve({ code: e.code, message: e.message })));
    await expect(conn.request(frame)).rejects.toMatchObject({ code: ErrorCodes.CONNECTION_CLOSED });
    expect(await refused).toEqual({ code: ErrorCodes.FRAME_MALFORMED, message });
  });

  it('on a link of protocol 2, a protocol-3 field in a reply (MigrationStateFailed.failedStep) is refused as malformed by the requester, as a build before 3 refuses it', async () => {
    const { url, accepted } = await serve();
    const conn = await connectPeer({ url, agent: 'a', expectedPeer: 'b', secret: SECRET, protocol: 2 });
    conns.push(conn);
    const server = await accepted;
    server.handle('BootIncoming', (frame) => ({ type: 'MigrationStateFailed', migrationId: frame.migrationId, reason: 'bootIncoming failed: no', failedStep: 'bootIncoming' }));
    const refused = new Promise<{ code: string; message: string }>((resolve) => conn.once('protocolError', (e) => resolve({ code: e.code, message: e.message })));
    await expect(conn.request({ type: 'BootIncoming', migrationId: 'm1' })).rejects.toMatchObject({ code: ErrorCodes.CONNECTION_CLOSED });
    expect(await refused).toEqual({ code: ErrorCodes.FRAME_MALFORMED, message: 'MigrationStateFailed.failedStep is protocol 3; this link runs protocol 2' });
  });

  it('reads the refusal of an agent built before protocol 2 (its own wording, coded PEER_UNAUTHENTICATED), and of one that speaks a range', () => {
    const old = new ProtocolError(ErrorCodes.PEER_UNAUTHENTICATED, 'ws://127.0.0.1:7402/ refused the connection: protocol version 2 is not supported (this agent speaks 1)');
    expect(speaksUpTo(old)).toBe(1);
    expect(speaksUpTo(new ProtocolError(ErrorCodes.PROTOCOL_UNSUPPORTED, 'ws://x refused the connection: protocol version 2 is not supported (this agent speaks 3 to 4)'))).toBe(4);
    expect(speaksUpTo(new ProtocolError(ErrorCodes.PEER_UNAUTHENTICATED, 'authentication of b failed: its proof does not match the cluster secret'))).toBeUndefined();
  });
});

describe('agents of protocol 1 and 2 in one cluster (sim)', () => {
  async function vmWithData(a: AgentProcess, name: string): Promise<string> {
    await a.client.createVm({ name, memory: 8 * MiB, dirtyRate: 4 * MiB });
    await a.client.vmAction(name, 'start');
    await sleep(300); // some pages written, most still zero
    await a.client.vmAction(name, 'stop');
    return (await a.client.vmChecksum(name)).sha256;
  }

  it('a (3) → b (1) and back: both complete byte-exact, every page sent as data (no zero-page indexes on a protocol-1 link)', async () => {
    // Zero start memory, so the full round has zero pages to name (sim.startMemory).
    cluster = await Cluster.start(['a', 'b'], { config: (n) => ({ sim: { startMemory: 'zero' }, ...(n === 'b' ? { peer: { protocol: 1 } } : {}) }) });
    const [a, b] = [cluster.agent('a'), cluster.agent('b')];
    const sum = await vmWithData(a, 'v');
    expect(sum).not.toBe(createHash('sha256').update(new Uint8Array(8 * MiB)).digest('hex'));

    const { id } = await a.client.migrate('v', 'b');
    const there = await a.client.waitMigration(id, { timeoutMs: 60_000 });
    expect(there.outcome, there.reason).toBe('completed');
    expect(there.summary!.precopy?.zeroBytes ?? 0).toBe(0);
    expect((await b.client.vmChecksum('v')).sha256).toBe(sum);
    // The operator is told the link runs the older protocol, and what that changes.
    expect(a.stderr).toContain('the link to b runs wire protocol 1');

    const back = await b.client.waitMigration((await b.client.migrate('v', 'a')).id, { timeoutMs: 60_000 });
    expect(back.outcome, back.reason).toBe('completed');
    // b speaks 1: its sender has no zero-page indexes at all, so the way back sends data too.
    expect(back.summary!.precopy?.zeroBytes ?? 0).toBe(0);
    expect((await a.client.vmChecksum('v')).sha256).toBe(sum);
  });

  it('a fan-out to b (1) and c (2), c failing to boot: b wins through BootIncoming, c was asked with its final round and its refusal read from its wording (no failedStep on a protocol-2 link); one owner, c clean, the event stream exact', async () => {
    cluster = await Cluster.start(['a', 'b', 'c'], {
      plugins: [{ from: 'fixture', name: 'counter' }],
      env: (n): Record<string, string> => (n === 'c' ? { EMBOT_FAULT_BOOT_FAIL: '1' } : {}),
      config: (n) => ({
        mobility: { stepTimeoutMs: 3000, vmTimeoutMs: 20_000, forwardGraceMs: 5000, trust: { mode: 'any-authenticated-peer' } },
        ...(n === 'b' ? { peer: { protocol: 1 } } : n === 'c' ? { peer: { protocol: 2 } } : {}),
        // b's copy is slowed, so c reaches its final round (and refuses the boot asked with it) first.
        ...(n === 'a' ? { dataplane: { primaryCapBytesPerSecOf: { b: 8 * MiB } } } : {}),
      }),
    });
    const c = cluster;
    const a = c.agent('a');
    await a.client.createVm({ name: 'app', memory: 4 * MiB });
    await a.client.vmAction('app', 'start');
    await waitFor(async () => counterOf(await a.client.listEmbots(), 'app'), 10_000, 'counter embot on a');
    const ticks = tickProducer(() => a, 'app');
    await waitFor(() => ticks.acked >= 20, 10_000, 'events before the move');
    const { id } = await a.client.migrate('app', ['b', 'c']);
    const info = await a.client.waitMigration(id, { timeoutMs: 90_000 });
    await ticks.stop();
    expect(info.outcome, info.reason).toBe('completed');
    const s = info.summary!;
    expect(s.winner).toBe('b');
    const by = Object.fromEntries(s.destinations!.map((d) => [d.name, d]));
    // b (protocol 1) booted on BootIncoming after its final round; c (protocol 2) was asked with its final round and refused there.
    expect(by['b']!.phases.map((p) => p.phase)).toContain('booting');
    expect(by['c']!.outcome).toBe('bootFailed');
    expect(by['c']!.phases.map((p) => p.phase)).not.toContain('booting');
    const owners: string[] = [];
    for (const n of c.names) if ((await c.agent(n).client.listVms()).some((v) => v.name === 'app')) owners.push(n);
    expect(owners).toEqual(['b']);
    await expectClean(c.agent('c'));
    await expectStreamExact(c.agent('b'), ticks.acked);
    expect(a.stderr).toContain("the link to c runs wire protocol 2 (its build is older): a refused boot is read from the target's wording");
  });
});
