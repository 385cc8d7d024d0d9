import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { loadConfig } from '../../core/config/config.ts';
import { ErrorCodes, isEmbotError } from '../../core/errors.ts';
import { WarmConnections, takeOrDial } from '../../core/mobility/warm-connections.ts';
import { PeerServer, connectPeer } from '../../core/wire/index.ts';
import type { PeerConnection } from '../../core/wire/peer-connection.ts';
import { waitFor, REPO } from '../harness/agent-process.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';

const SECRET = randomBytes(32);
const cleanups = cleanupsAfterEach();

/** A real peer endpoint 'b' that counts the authenticated links it accepted and still holds. */
async function target(listen = '127.0.0.1:0') {
  const server = await PeerServer.listen({ agent: 'b', secret: SECRET, listen });
  const accepted: PeerConnection[] = [];
  server.on('connection', (c) => accepted.push(c));
  cleanups.push(() => server.close());
  return { server, accepted, open: () => accepted.filter((c) => c.isOpen).length };
}

function pool(url: () => string, dials: { n: number }, perPeer = 2): WarmConnections {
  const p = new WarmConnections({
    peers: ['b'],
    perPeer,
    backoffMs: 20,
    maxBackoffMs: 200,
    dial: () => {
      dials.n++;
      return connectPeer({ url: url(), agent: 'a', secret: SECRET, expectedPeer: 'b' });
    },
  });
  cleanups.push(() => p.close());
  return p;
}

describe('warm peer connections (issue 12: no dial on the migration path)', () => {
  it('hands out pre-dialled links without a new handshake at the target, each once, and refills the slots once the links taken to that peer have all closed', async () => {
    const b = await target();
    const dials = { n: 0 };
    const p = pool(() => b.server.url, dials);
    p.start();
    await waitFor(() => p.idle('b') === 2, 5000, 'two idle links');
    expect(b.accepted).toHaveLength(2);

    const fallback = { n: 0 };
    const dialFresh = () => (fallback.n++, connectPeer({ url: b.server.url, agent: 'a', secret: SECRET, expectedPeer: 'b' }));
    const seen: string[] = [];
    const control = await takeOrDial(p, 'b', { IndexQuery: (f) => (seen.push(f.image), { type: 'IndexAnswer', body: new Uint8Array([7]) }) }, dialFresh);
    const data = await takeOrDial(p, 'b', {}, dialFresh);
    expect(control).not.toBe(data);
    // Taken, not shared: the target accepted no link for them, and the caller dialled none.
    expect(b.accepted).toHaveLength(2);
    expect(fallback.n).toBe(0);
    expect(p.idle('b')).toBe(0);
    expect(p.counts.taken).toBe(2);
    // The taker's handlers are in place: the target's request on the link reaches them.
    const atTarget = b.accepted.find((c) => c.isOpen)!;
    const links = b.accepted.filter((c) => c.isOpen);
    const replies = await Promise.allSettled(links.map((c) => c.request({ type: 'IndexQuery', image: 'x.img' }, { timeoutMs: 2000 })));
    expect(atTarget).toBeDefined();
    expect(seen).toEqual(['x.img']);
    expect(replies.filter((r) => r.status === 'fulfilled' && r.value.type === 'IndexAnswer')).toHaveLength(1);

    // A third take with nothing idle and no dial in flight: the caller dials, as without the pool.
    const third = await takeOrDial(p, 'b', {}, dialFresh);
    expect(fallback.n).toBe(1);
    await third.close();

    // The data path closes first (mid-migration): no dial while the control link is still in use.
    await data.close();
    await new Promise((r) => setTimeout(r, 150));
    expect(dials.n).toBe(2);
    // The migration ends: both slots are refilled in the background.
    await control.close();
    await waitFor(() => p.idle('b') === 2, 5000, 'slots refilled');
    expect(dials.n).toBe(4);
  });

  it('follows the directory: a peer removed has its idle links closed and is dialled no more, even a dial in flight; added (again), it is warmed', async () => {
    const b = await target();
    const dials = { n: 0 };
    const p = pool(() => b.server.url, dials);
    p.start();
    await waitFor(() => p.idle('b') === 2, 5000, 'two idle links');
    p.removePeer('b');
    await waitFor(() => b.open() === 0, 5000, 'the target sees both idle links closed');
    expect(p.idle('b')).toBe(0);
    expect(p.take('b')).toBeUndefined();
    await new Promise((r) => setTimeout(r, 300));
    expect(dials.n).toBe(2);

    // Added while nothing is kept: warmed. Removed with its dials in flight: they land and are closed.
    p.addPeer('b');
    p.addPeer('b');
    expect(dials.n).toBe(4);
    p.removePeer('b');
    await new Promise((r) => setTimeout(r, 300));
    expect(b.accepted.length).toBe(4);
    await waitFor(() => b.open() === 0, 5000, 'the landed dials closed');
    expect(p.idle('b')).toBe(0);
    p.addPeer('b');
    await waitFor(() => p.idle('b') === 2, 5000, 'warmed again');
    expect(dials.n).toBe(6);
  });

  it('re-dials an idle link the target dropped, and a stopped pool closes its links and dials no more', async () => {
    const b = await target();
    const dials = { n: 0 };
    const p = pool(() => b.server.url, dials, 1);
    p.start();
    await waitFor(() => p.idle('b') === 1, 5000, 'one idle link');
    b.accepted[0]!.terminate();
    await waitFor(() => p.counts.dropped === 1 && p.idle('b') === 1, 5000, 'the dropped link replaced');
    expect(b.accepted).toHaveLength(2);
    expect(b.open()).toBe(1);

    await p.close();
    await waitFor(() => b.open() === 0, 5000, 'the target sees the idle link closed');
    expect(p.take('b')).toBeUndefined();
    await new Promise((r) => setTimeout(r, 300));
    expect(dials.n).toBe(2);
  });

  it('a target that restarted: the stale link is gone, the migration dials (or takes the re-dialled link) and gets an open one', async () => {
    const first = await target();
    const url = first.server.url;
    const dials = { n: 0 };
    const p = pool(() => url, dials, 1);
    p.start();
    await waitFor(() => p.idle('b') === 1, 5000, 'one idle link');
    await first.server.close();
    const restarted = await target(url.replace(/^ws:\/\//, '').replace(/\/$/, ''));
    const conn = await takeOrDial(p, 'b', {}, () => connectPeer({ url, agent: 'a', secret: SECRET, expectedPeer: 'b' }));
    cleanups.push(async () => void (await conn.close()));
    expect(conn.isOpen).toBe(true);
    expect(await conn.ping()).toBeGreaterThanOrEqual(0);
    expect(restarted.accepted.length).toBeGreaterThanOrEqual(1);
  });

  it('a dial in flight that fails is not the migration\'s failure: it dials itself; failed dials back off', async () => {
    const b = await target();
    const dials = { n: 0 };
    let reachable = false;
    // Nothing listens at :1 on loopback: the pool's dials fail until `reachable`.
    const p = pool(() => (reachable ? b.server.url : 'ws://127.0.0.1:1/'), dials, 1);
    p.start();
    const fresh = { n: 0 };
    const conn = await takeOrDial(p, 'b', {}, () => (fresh.n++, connectPeer({ url: b.server.url, agent: 'a', secret: SECRET, expectedPeer: 'b' })));
    cleanups.push(async () => void (await conn.close()));
    expect(fresh.n).toBe(1);
    expect(conn.isOpen).toBe(true);
    await waitFor(() => p.counts.failed >= 3, 5000, 'three failed dials');
    // Back-off: 20, 40, 80 ms… not a dial per tick.
    expect(dials.n).toBeLessThan(12);
    reachable = true;
    await waitFor(() => p.idle('b') === 1, 5000, 'the link once the target is reachable');
  });

  it('idle links do not keep the process alive (a real child process exits with its pool still open)', async () => {
    const b = await target();
    const script = `
      import { WarmConnections } from './core/mobility/warm-connections.ts';
      import { connectPeer } from './core/wire/index.ts';
      const p = new WarmConnections({ peers: ['b'], perPeer: 2, dial: () => connectPeer({ url: ${JSON.stringify(b.server.url)}, agent: 'a', secret: Buffer.from(${JSON.stringify(SECRET.toString('base64'))}, 'base64'), expectedPeer: 'b' }) });
      p.start();
      const t = setInterval(() => { if (p.idle('b') === 2) { clearInterval(t); console.log('ready'); } }, 10);
    `;
    const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { cwd: REPO, stdio: ['ignore', 'pipe', 'pipe'] });
    cleanups.push(() => void child.kill('SIGKILL'));
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (out += d));
    const code = await new Promise<number | null>((resolve) => child.on('exit', resolve));
    expect(out).toContain('ready');
    expect(code).toBe(0);
    expect(b.accepted).toHaveLength(2);
  });
});

describe('mobility.warmConnections (config)', () => {
  it('is on by default, can be turned off, and a value that is not a boolean is CONFIG_INVALID naming the key', () => {
    expect(loadConfig({ env: {} }).mobility.warmConnections).toBe(true);
    expect(loadConfig({ env: {}, flags: { mobility: { warmConnections: false } } }).mobility.warmConnections).toBe(false);
    let error: unknown;
    try {
      loadConfig({ env: {}, flags: { mobility: { warmConnections: 'yes' as unknown as boolean } } });
    } catch (e) {
      error = e;
    }
    expect(isEmbotError(error) && error.code).toBe(ErrorCodes.CONFIG_INVALID);
    expect(String((error as Error).message)).toContain('warmConnections');
  });
});
