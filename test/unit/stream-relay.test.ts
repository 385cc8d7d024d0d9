import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createServer as createTlsServer } from 'node:tls';
import { describe, expect, it } from 'vitest';
import { EffectorError, ErrorCodes } from '../../core/errors.ts';
import { loopbackPeerUid } from '../../effectors/hypervisor/qemu/loopback-peer.ts';
import { parseTcpUri, StreamRelay, type RelayDestination, type RelaySourceTransport } from '../../effectors/hypervisor/qemu/stream-relay.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { makeTlsFixture } from '../harness/cluster-tls.ts';
import { expectThrownCode } from '../harness/expect-code.ts';

const cleanups = cleanupsAfterEach();

/** A destination standing for an incoming QEMU: hashes what it reads; `mode` makes it slow or break. */
interface Sink {
  readonly uri: string;
  readonly received: Promise<{ readonly bytes: number; readonly sha: string }>;
  readonly sockets: Socket[];
}

type SinkMode = 'read' | 'stall' | 'jerky' | { readonly closeAfter: number } | { readonly talkBack: true } | { readonly startAfterMs: number };

function handle(s: Socket, mode: SinkMode, done: (r: { bytes: number; sha: string }) => void): void {
  const hash = createHash('sha256');
  let bytes = 0;
  if (mode === 'stall') {
    // Never reads: the kernel's buffers fill, then the relay's queue for it.
    s.pause();
    return;
  }
  if (typeof mode === 'object' && 'talkBack' in mode) s.write('not a one-way stream');
  if (typeof mode === 'object' && 'startAfterMs' in mode) {
    // An incoming QEMU slow to come up: it reads nothing at first, then everything.
    s.pause();
    setTimeout(() => s.resume(), mode.startAfterMs);
  }
  let sincePause = 0;
  s.on('data', (c: Buffer) => {
    bytes += c.length;
    hash.update(c);
    if (mode === 'jerky' && (sincePause += c.length) > 256 * 1024) {
      // Stops reading now and then: the relay's writes to it queue, holding the chunks they were given.
      sincePause = 0;
      s.pause();
      setTimeout(() => s.resume(), 2);
    }
    if (typeof mode === 'object' && 'closeAfter' in mode && bytes >= mode.closeAfter) s.destroy();
  });
  s.on('error', () => {});
  s.on('close', () => done({ bytes, sha: hash.digest('hex') }));
}

async function listenOn(server: Server, sockets: readonly Socket[]): Promise<string> {
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const a = server.address();
  if (a === null || typeof a === 'string') throw new Error('no port');
  // Its accepted connections go first: close() waits for them (a stalled reader's would never end).
  cleanups.push(() => new Promise<void>((r) => server.close(() => r())));
  cleanups.push(() => sockets.forEach((s) => s.destroy()));
  return `tcp:127.0.0.1:${a.port}`;
}

async function sink(mode: SinkMode = 'read'): Promise<Sink> {
  const sockets: Socket[] = [];
  let done: (r: { bytes: number; sha: string }) => void = () => {};
  const received = new Promise<{ bytes: number; sha: string }>((r) => (done = r));
  const server = createServer((s) => {
    sockets.push(s);
    handle(s, mode, done);
  });
  return { uri: await listenOn(server, sockets), received, sockets };
}

function drainOrClose(s: Socket): Promise<void> {
  return new Promise<void>((resolve) => {
    const done = (): void => {
      s.off('drain', done);
      s.off('close', done);
      resolve();
    };
    s.on('drain', done);
    s.on('close', done);
  });
}

/** Connects to the relay's source socket as QEMU's `migrate` does: `tcp:127.0.0.1:PORT` or `unix:PATH`. */
function connectSource(relay: StreamRelay): Socket {
  const uri = relay.uri;
  return uri.startsWith('unix:') ? createConnection(uri.slice('unix:'.length)) : createConnection(parseTcpUri(uri));
}

/** Writes `data` into the relay's socket as QEMU's `migrate` would, honouring back-pressure; resolves once all is written and ended. */
async function feed(relay: StreamRelay, data: Buffer): Promise<Socket> {
  const s = connectSource(relay);
  s.on('error', () => {});
  cleanups.push(() => void s.destroy());
  await new Promise<void>((r) => s.once('connect', r));
  const chunk = 64 * 1024;
  for (let off = 0; off < data.length; off += chunk) {
    if (s.destroyed) break;
    if (!s.write(data.subarray(off, off + chunk))) await drainOrClose(s);
  }
  s.end();
  return s;
}

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

/** A relay to `destinations`; `options` as StreamRelayOptions, an undefined one left to the relay's default. */
async function open(
  destinations: readonly RelayDestination[],
  options: { readonly bufferLimitBytes?: number; readonly slabBytes?: number | undefined; readonly source?: RelaySourceTransport | undefined; readonly stallBudgetMs?: number } = {},
): Promise<StreamRelay> {
  const given = Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined));
  const relay = await StreamRelay.open({ destinations, ...given });
  cleanups.push(() => relay.close());
  return relay;
}

/** A relay to a misbehaving sink `name` and a well-behaved one `ok`, fed `size` random bytes. */
async function badBesideOk(name: string, mode: SinkMode, size: number): Promise<{ relay: StreamRelay; bad: Sink; ok: Sink; data: Buffer }> {
  const [bad, ok] = await Promise.all([sink(mode), sink()]);
  const relay = await open([
    { name, uri: bad.uri },
    { name: 'ok', uri: ok.uri },
  ]);
  const data = randomBytes(size);
  await feed(relay, data);
  return { relay, bad, ok, data };
}

describe('stream relay: one stream to several destinations over real sockets', () => {
  it.each([
    ['loopback TCP (the default on Linux)', undefined, /^tcp:127\.0\.0\.1:\d+$/],
    ['a unix socket', 'unix', /^unix:.*relay-[^/]+\/s$/],
  ] as const)('gives every destination the whole stream byte for byte, QEMU writing into %s', async (_what, source, uri) => {
    const [b, c, d] = await Promise.all([sink(), sink(), sink()]);
    const relay = await open([
      { name: 'b', uri: b.uri },
      { name: 'c', uri: c.uri },
      { name: 'd', uri: d.uri },
    ], { source });
    expect(relay.uri).toMatch(uri);
    expect(relay.transport).toBe(source ?? 'tcp');
    const data = randomBytes(8 * 1024 * 1024);
    await feed(relay, data);
    const results = await Promise.all(['b', 'c', 'd'].map((n) => relay.result(n)));
    expect(results.map((r) => r.outcome)).toEqual(['delivered', 'delivered', 'delivered']);
    expect(results.map((r) => r.bytes)).toEqual([data.length, data.length, data.length]);
    for (const s of [b, c, d]) expect(await s.received).toEqual({ bytes: data.length, sha: sha(data) });
  });

  it.each([
    ['default slabs', undefined],
    ['small slabs, replaced every few reads', 512 * 1024],
    ["Node's own 64 KiB reads", 0],
  ] as const)('reads the source into %s and every destination, one reading jerkily, gets the stream byte for byte', async (_what, slabBytes) => {
    const [b, c] = await Promise.all([sink('jerky'), sink()]);
    const relay = await open([
      { name: 'b', uri: b.uri },
      { name: 'c', uri: c.uri },
    ], { slabBytes });
    const data = randomBytes(16 * 1024 * 1024);
    await feed(relay, data);
    const results = await Promise.all(['b', 'c'].map((n) => relay.result(n)));
    expect(results.map((r) => `${r.outcome}:${r.bytes}`)).toEqual([`delivered:${data.length}`, `delivered:${data.length}`]);
    // Chunks still queued for the jerky reader share slabs the source goes on reading into, and reads go
    // back into a chunk's bytes once every socket took it whole (relay.slabReuses, ~19 times here):
    // a slab part reused too early would corrupt them (with reuse forced on, six tests of this file fail).
    expect(results[0]!.maxQueuedBytes).toBeGreaterThan(0);
    for (const x of [b, c]) expect(await x.received).toEqual({ bytes: data.length, sha: sha(data) });
    // Node 20's user-buffer reads are in use (a Node whose socket internals changed falls back to 'data', which this pins).
    expect(relay.slabReads).toBe(slabBytes !== 0);
  });

  it.each([
    ['at once (stall budget 0)', 0],
    ['once the stream has waited its stall budget for it (300 ms)', 300],
  ])('reads at the fastest destination\'s pace and drops one that stays behind its bound as tooSlow %s', async (_what, stallBudgetMs) => {
    const [fast, slow] = await Promise.all([sink(), sink('stall')]);
    const bound = 256 * 1024;
    const relay = await open(
      [
        { name: 'fast', uri: fast.uri },
        { name: 'slow', uri: slow.uri },
      ],
      { bufferLimitBytes: bound, stallBudgetMs },
    );
    // Far more than the kernel's loopback buffers plus the bound: the stalled reader must overflow it.
    const data = randomBytes(48 * 1024 * 1024);
    const started = Date.now();
    await feed(relay, data);
    const s = await relay.result('slow');
    expect(s.outcome).toBe('tooSlow');
    expect(s.reason).toMatch(/over the relay's bound of 262144/);
    if (stallBudgetMs > 0) {
      expect(s.reason).toMatch(/after the stream waited \d+ ms for it \(its budget 300 ms\)/);
      expect(s.heldMs).toBeGreaterThanOrEqual(stallBudgetMs - 20);
      expect(Date.now() - started).toBeGreaterThanOrEqual(stallBudgetMs - 20);
    } else expect(s.heldMs).toBe(0);
    // Dropped once its queue passed the bound, not before; held there (the source waited) rather than growing on.
    expect(s.maxQueuedBytes).toBeGreaterThan(bound);
    expect(s.maxQueuedBytes).toBeLessThanOrEqual(bound + 256 * 1024);
    expect(s.bytes).toBeLessThan(data.length);
    const f = await relay.result('fast');
    expect(f.outcome).toBe('delivered');
    // The fast one never queued up to the bound: the source was read at its pace, not the slow one's.
    expect(f.maxQueuedBytes).toBeLessThanOrEqual(bound);
    expect(f.heldMs).toBe(0);
    expect(await fast.received).toEqual({ bytes: data.length, sha: sha(data) });
  });

  it('waits for a destination that starts reading late instead of dropping it: both get the whole stream, the late one says how long it held it', async () => {
    const [fast, late] = await Promise.all([sink(), sink({ startAfterMs: 1500 })]);
    const bound = 256 * 1024;
    const relay = await open(
      [
        { name: 'fast', uri: fast.uri },
        { name: 'late', uri: late.uri },
      ],
      { bufferLimitBytes: bound, stallBudgetMs: 3000 },
    );
    const data = randomBytes(16 * 1024 * 1024);
    await feed(relay, data);
    const [f, l] = await Promise.all([relay.result('fast'), relay.result('late')]);
    expect(l).toMatchObject({ outcome: 'delivered', bytes: data.length });
    // It held the stream while it did not read (up to 1.5 s, less the time the kernel's buffers and the bound took to fill,
    // which a loaded host stretches), and not for its whole budget.
    expect(l.heldMs).toBeGreaterThan(0);
    expect(l.heldMs).toBeLessThan(3000);
    expect(l.maxQueuedBytes).toBeLessThanOrEqual(bound + 256 * 1024);
    expect(f.outcome).toBe('delivered');
    for (const x of [fast, late]) expect(await x.received).toEqual({ bytes: data.length, sha: sha(data) });
  });

  it('drops a destination whose connection breaks mid-stream as failed and goes on to the others', async () => {
    const { relay, bad: broken, ok, data } = await badBesideOk('broken', { closeAfter: 1024 * 1024 }, 16 * 1024 * 1024);
    const r = await relay.result('broken');
    expect(r.outcome).toBe('failed');
    expect((await broken.received).bytes).toBeLessThan(data.length);
    expect((await relay.result('ok')).outcome).toBe('delivered');
    expect(await ok.received).toEqual({ bytes: data.length, sha: sha(data) });
  });

  it('counts a destination that closes right after the last byte (before the source\'s own close reaches the relay) as delivered', async () => {
    const data = randomBytes(4 * 1024 * 1024);
    // As an incoming QEMU does once it has read the stream's last section.
    const [eager, ok] = await Promise.all([sink({ closeAfter: data.length }), sink()]);
    const relay = await open([
      { name: 'eager', uri: eager.uri },
      { name: 'ok', uri: ok.uri },
    ]);
    const source = connectSource(relay);
    cleanups.push(() => void source.destroy());
    await new Promise<void>((r) => source.once('connect', r));
    source.write(data);
    expect(await eager.received).toEqual({ bytes: data.length, sha: sha(data) });
    // Its close is in before the source ends.
    await new Promise((r) => setTimeout(r, 100));
    source.end();
    expect((await relay.result('eager')).outcome).toBe('delivered');
    expect((await relay.result('ok')).outcome).toBe('delivered');
  });

  it('cuts the source stream when every destination is gone, so the sending QEMU fails instead of writing into nothing', async () => {
    const only = await sink({ closeAfter: 64 * 1024 });
    const relay = await open([{ name: 'only', uri: only.uri }]);
    let allDropped = false;
    relay.onAllDropped = () => (allDropped = true);
    const source = await feed(relay, randomBytes(32 * 1024 * 1024));
    expect((await relay.result('only')).outcome).toBe('failed');
    await new Promise<void>((r) => (source.destroyed ? r() : source.once('close', () => r())));
    expect(allDropped).toBe(true);
  });

  it('wraps each destination in its own TLS session: the destination checks the source agent\'s certificate, the relay that the destination names its agent', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'relay-tls-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const fx = await makeTlsFixture(dir, ['a', 'b', 'c', 'mallory']);
    const read = (f: string): Buffer => readFileSync(f);
    const tlsSink = async (name: string): Promise<Sink & { readonly peers: string[] }> => {
      const f = fx.files(name);
      const sockets: Socket[] = [];
      const peers: string[] = [];
      let done: (r: { bytes: number; sha: string }) => void = () => {};
      const received = new Promise<{ bytes: number; sha: string }>((r) => (done = r));
      const server = createTlsServer({ ca: read(f.ca), cert: read(f.cert), key: read(f.key), requestCert: true, rejectUnauthorized: true }, (s) => {
        sockets.push(s);
        peers.push(String(s.getPeerCertificate().subject.CN));
        handle(s, 'read', done);
      });
      server.on('tlsClientError', () => {});
      return { uri: await listenOn(server, sockets), received, sockets, peers };
    };
    const [b, c, impostor] = await Promise.all([tlsSink('b'), tlsSink('c'), tlsSink('mallory')]);
    const a = fx.files('a');
    const tls = { ca: read(a.ca), cert: read(a.cert), key: read(a.key) };
    const relay = await open([
      { name: 'b', uri: b.uri, tls: { ...tls, serverName: 'b' } },
      { name: 'c', uri: c.uri, tls: { ...tls, serverName: 'c' } },
      // Listens where 'x' was said to be, with a certificate of the cluster that names someone else.
      { name: 'x', uri: impostor.uri, tls: { ...tls, serverName: 'x' } },
    ]);
    const data = randomBytes(4 * 1024 * 1024);
    await feed(relay, data);
    expect((await relay.result('b')).outcome).toBe('delivered');
    expect((await relay.result('c')).outcome).toBe('delivered');
    const x = await relay.result('x');
    expect(x.outcome).toBe('failed');
    expect(x.reason).toMatch(/x/);
    expect(await b.received).toEqual({ bytes: data.length, sha: sha(data) });
    expect(await c.received).toEqual({ bytes: data.length, sha: sha(data) });
    expect([...b.peers, ...c.peers]).toEqual(['a', 'a']);
  });
});

describe('stream relay: bad input', () => {
  it('refuses a destination URI that is not tcp:HOST:PORT, with a coded error', () => {
    for (const bad of ['', 'tcp:127.0.0.1', 'tcp:127.0.0.1:0', 'tcp:127.0.0.1:70000', 'unix:/tmp/x', 'exec:cat', 'tcp:127.0.0.1:80;rm', 42 as unknown as string]) {
      expectThrownCode(() => parseTcpUri(bad), ErrorCodes.EFFECTOR_ARGS_INVALID, EffectorError);
    }
    expect(parseTcpUri('tcp:127.0.0.1:4444')).toEqual({ host: '127.0.0.1', port: 4444 });
  });

  it('refuses no destinations, a name twice, a bound that is not a positive integer, a slab too small or not whole, an unknown source transport and a stall budget that is negative or not whole', async () => {
    const b = await sink();
    for (const o of [
      { destinations: [] },
      { destinations: [{ name: 'b', uri: b.uri }, { name: 'b', uri: b.uri }] },
      { destinations: [{ name: 'b', uri: b.uri }], bufferLimitBytes: 0 },
      { destinations: [{ name: 'b', uri: b.uri }], bufferLimitBytes: 1.5 },
      { destinations: [{ name: 'b', uri: b.uri }], slabBytes: 1000 },
      { destinations: [{ name: 'b', uri: b.uri }], slabBytes: -1 },
      { destinations: [{ name: 'b', uri: b.uri }], slabBytes: 1.5 * 1024 * 1024 + 0.5 },
      { destinations: [{ name: 'b', uri: b.uri }], source: 'fifo' as RelaySourceTransport },
      { destinations: [{ name: 'b', uri: b.uri }], stallBudgetMs: -1 },
      { destinations: [{ name: 'b', uri: b.uri }], stallBudgetMs: 0.5 },
    ]) {
      await expect(StreamRelay.open(o)).rejects.toMatchObject({ code: ErrorCodes.EFFECTOR_ARGS_INVALID });
    }
    await expect((await open([{ name: 'b', uri: b.uri }])).result('nobody')).rejects.toMatchObject({ code: ErrorCodes.EFFECTOR_ARGS_INVALID });
  });

  it('shuts out a second writer on its socket: the first stream reaches the destination unmixed', async () => {
    const b = await sink();
    const relay = await open([{ name: 'b', uri: b.uri }]);
    const data = randomBytes(2 * 1024 * 1024);
    const first = connectSource(relay);
    cleanups.push(() => void first.destroy());
    await new Promise<void>((r) => first.once('connect', r));
    first.write(data.subarray(0, 1024));
    await new Promise((r) => setTimeout(r, 50));
    const intruder = connectSource(relay);
    intruder.on('error', () => {});
    cleanups.push(() => void intruder.destroy());
    intruder.write('garbage from someone else');
    await new Promise<void>((r) => intruder.once('close', () => r()));
    first.end(data.subarray(1024));
    expect((await relay.result('b')).outcome).toBe('delivered');
    expect(await b.received).toEqual({ bytes: data.length, sha: sha(data) });
  });

  it.skipIf(process.getuid?.() !== 0)("closes unread a connection to its loopback port from another local user, and takes the stream of this user's QEMU after it", async () => {
    const b = await sink();
    const relay = await open([{ name: 'b', uri: b.uri }]);
    const { port } = parseTcpUri(relay.uri);
    // A real process of another user (nobody) connects first and writes: none of it may reach b.
    const script = `const s = require('node:net').createConnection(${port}, '127.0.0.1', () => s.write('injected by another user'));
      s.on('error', () => {}); s.on('close', () => { process.stdout.write('closed'); process.exit(0); }); setTimeout(() => process.exit(3), 20000);`;
    const other = spawn(process.execPath, ['-e', script], { uid: 65534, gid: 65534, cwd: '/', stdio: ['ignore', 'pipe', 'inherit'] });
    cleanups.push(() => void other.kill('SIGKILL'));
    let out = '';
    other.stdout.on('data', (c: Buffer) => (out += c.toString()));
    const code = await new Promise<number | null>((r) => other.once('exit', r));
    expect({ code, out }).toEqual({ code: 0, out: 'closed' });
    expect(relay.refusedSources).toBe(1);
    const data = randomBytes(2 * 1024 * 1024);
    await feed(relay, data);
    expect((await relay.result('b')).outcome).toBe('delivered');
    expect(await b.received).toEqual({ bytes: data.length, sha: sha(data) });
  });

  it('reads the owner of a loopback connection from /proc/net/tcp text, skipping malformed and closed lines', () => {
    const header = '  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode';
    const line = (local: string, remote: string, st: string, uid: string): string => `   0: ${local} ${remote} ${st} 00000000:00000000 00:00000000 00000000 ${uid}        0 4711 1 0000000000000000 20 4 30 10 -1`;
    // 0xA1B2 = 41394 (the connecting side's port), 0x1F90 = 8080 (ours).
    const table = [
      header,
      line('0100007F:A1B2', '0100007F:1F90', '06', '0'), // an earlier connection's TIME_WAIT on the same ports: no owner
      line('0100007F:A1B2', '0100007F:1F90', '01', 'x'), // malformed uid
      line('0100007F:A1B2', '0100007F', '01', '7'), // no port
      'garbage',
      '',
      line('0100007F:1F90', '0100007F:A1B2', '01', '0'), // our own accepted side
      line('0100007F:A1B2', '0100007F:1F90', '01', '1000'),
    ].join('\n');
    expect(loopbackPeerUid(table, 0xa1b2, 0x1f90)).toBe(1000);
    expect(loopbackPeerUid(table, 0xa1b3, 0x1f90)).toBeUndefined();
    expect(loopbackPeerUid('', 0xa1b2, 0x1f90)).toBeUndefined();
    expect(loopbackPeerUid([header, line('0100007F:A1B2', '0100007F:1F90', '06', '0')].join('\n'), 0xa1b2, 0x1f90)).toBeUndefined();
  });

  it('drops a destination that sends bytes back on the one-way stream, and keeps the others', async () => {
    const { relay, ok, data } = await badBesideOk('talker', { talkBack: true }, 4 * 1024 * 1024);
    const t = await relay.result('talker');
    expect(t.outcome).toBe('failed');
    expect(t.reason).toMatch(/sent bytes on a one-way stream/);
    expect(await ok.received).toEqual({ bytes: data.length, sha: sha(data) });
  });
});
