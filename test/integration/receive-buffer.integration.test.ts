import { createHash, randomBytes } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import WebSocket, { WebSocketServer } from 'ws';
import { PeerServer, connectPeer, type PeerConnection } from '../../core/wire/index.ts';
import { READ_BUFFER_BYTES, REUSED_MAX_BYTES, REUSED_MIN_BYTES, reuseReceiveBuffer } from '../../core/wire/receive-buffer.ts';
import { allPages, batchChecksum, encodeIndexes } from '../../effectors/hypervisor/sim/dataplane/page-batch.ts';

const SECRET = Buffer.from('receive-buffer-cluster-secret-01');
const MiB = 1024 * 1024;
const sha = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');

/**
 * The data-path receive buffer end to end: a PeerServer whose link, once it carried a PageBatch,
 * assembles large messages into one reused buffer (core/wire/receive-buffer.ts).
 */
describe('reused receive buffer on a peer link', () => {
  let server: PeerServer | undefined;
  let conn: PeerConnection | undefined;

  afterEach(async () => {
    conn?.terminate();
    await server?.close();
  });

  it('hands page batches over in one reused buffer, and other large frames in bytes of their own', async () => {
    server = await PeerServer.listen({ agent: 'target', secret: SECRET, listen: '127.0.0.1:0' });
    const pageBuffers: ArrayBufferLike[] = [];
    const checked: boolean[] = [];
    server.handle('PageBatch', (frame) => {
      // Read synchronously, as PageReceiver.apply does.
      checked.push(batchChecksum(frame.indexes, frame.pages) === frame.checksum);
      pageBuffers.push(frame.pages.buffer);
      return { type: 'PageBatchAck', migrationId: frame.migrationId, ok: true };
    });
    const expected = new Map<string, string>();
    server.handle('ManagementState', async (frame) => {
      // Read after page batches have gone through the link's reused buffer.
      await sleep(50);
      const ok = sha(frame.elements) === expected.get(frame.migrationId) && sha(frame.embots) === expected.get(`${frame.migrationId}/embots`);
      return ok ? { type: 'ManagementStateSuccess', migrationId: frame.migrationId } : { type: 'ManagementStateFailed', migrationId: frame.migrationId, reason: 'bytes changed under the handler' };
    });
    conn = await connectPeer({ url: server.url, agent: 'source', expectedPeer: 'target', secret: SECRET });
    const c = conn;

    const indexes = encodeIndexes(allPages(256));
    const batch = (i: number): Promise<unknown> => {
      const pages = randomBytes(MiB);
      return c.request({ type: 'PageBatch', migrationId: 'm1', path: 'p0', round: 1, final: false, pageSize: 4096, indexes, pages, checksum: batchChecksum(indexes, pages) });
    };
    await batch(0); // the link becomes a data path
    const elements = randomBytes(2 * MiB);
    const embots = randomBytes(300 * 1024);
    expected.set('m1', sha(elements));
    expected.set('m1/embots', sha(embots));
    const state = c.request({ type: 'ManagementState', migrationId: 'm1', elements, embots });
    const acks = await Promise.all(Array.from({ length: 8 }, (_, i) => batch(i + 1)));

    expect(acks.every((a) => (a as { ok: boolean }).ok)).toBe(true);
    expect(checked).toEqual(Array.from({ length: 9 }, () => true));
    // The first batch arrived before the link reused anything; the eight later ones share the link's
    // two reused buffers (its read buffer, which may hold a whole batch when the process's bulk
    // buffers hand it one a little over 1 MiB, and its assembly buffer), none a buffer of its own.
    const [first, ...later] = pageBuffers;
    expect(later).toHaveLength(8);
    expect(later).not.toContain(first);
    expect(new Set(later).size).toBeLessThanOrEqual(2);
    expect(await state).toEqual({ type: 'ManagementStateSuccess', replyTo: expect.any(Number), migrationId: 'm1' });
  });

  it('closes a data link that sends a bad frame or one over the limit, and serves the next link', async () => {
    server = await PeerServer.listen({ agent: 'target', secret: SECRET, listen: '127.0.0.1:0', maxFrameBytes: 4 * MiB });
    let batches = 0;
    server.handle('PageBatch', (frame) => {
      batches++;
      return { type: 'PageBatchAck', migrationId: frame.migrationId, ok: batchChecksum(frame.indexes, frame.pages) === frame.checksum };
    });
    const indexes = encodeIndexes(allPages(256));
    const batch = (c: PeerConnection): Promise<unknown> => {
      const pages = randomBytes(MiB);
      return c.request({ type: 'PageBatch', migrationId: 'm1', path: 'p0', round: 1, final: false, pageSize: 4096, indexes, pages, checksum: batchChecksum(indexes, pages) });
    };
    const socketOf = (c: PeerConnection): import('node:net').Socket => (c as unknown as { ws: { _socket: import('node:net').Socket } }).ws._socket;
    const bad = [
      // An unknown opcode (0x3), masked as from a client, in the middle of a stream of batches.
      Buffer.from([0x83, 0x80, 0, 0, 0, 0]),
      // A binary frame that announces 5 MiB, over the 4 MiB limit (masked, as from a client).
      Buffer.concat([Buffer.from([0x82, 0xff]), Buffer.from([0, 0, 0, 0, 0, 0x50, 0, 0]), Buffer.alloc(4), Buffer.alloc(64 * 1024)]),
    ];
    const accepted: PeerConnection[] = [];
    server.on('connection', (sc: PeerConnection) => accepted.push(sc));
    for (const bytes of bad) {
      const c = await connectPeer({ url: server.url, agent: 'source', expectedPeer: 'target', secret: SECRET });
      conn = c;
      expect(await batch(c)).toMatchObject({ ok: true }); // the link now reads through the reused buffers
      await batch(c);
      socketOf(c).write(bytes);
      const info = await c.closed;
      expect(info.code).toBe(bytes === bad[0] ? 1002 : 1009);
      // The target read the link on to its end, as ws does after a bad frame, rather than stop
      // reading and leave the close to a timer.
      const serverSide = accepted.at(-1)!;
      await serverSide.closed;
      expect(socketOf(serverSide).readableEnded).toBe(true);
    }
    // Nothing of the bad links stuck: a new one carries batches as before.
    const c = await connectPeer({ url: server.url, agent: 'source', expectedPeer: 'target', secret: SECRET });
    conn = c;
    const acks = await Promise.all(Array.from({ length: 4 }, () => batch(c)));
    expect(acks.every((a) => (a as { ok: boolean }).ok)).toBe(true);
    expect(batches).toBe(2 * bad.length + 4);
  });
});

/** A ws server and client on loopback; the server's end reads through the reused buffers. */
async function wsPair(maxPayload = 64 * MiB): Promise<{ server: WebSocketServer; accepted: WebSocket; client: WebSocket; close(): Promise<void> }> {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0, perMessageDeflate: false, maxPayload });
  await new Promise<void>((r) => wss.once('listening', () => r()));
  const acceptedP = new Promise<WebSocket>((r) => wss.once('connection', r));
  const client = new WebSocket(`ws://127.0.0.1:${(wss.address() as AddressInfo).port}`, { perMessageDeflate: false, maxPayload });
  await new Promise<void>((r, j) => (client.once('open', () => r()), client.once('error', j)));
  const accepted = await acceptedP;
  return {
    server: wss,
    accepted,
    client,
    close: async () => {
      client.terminate();
      await new Promise<void>((r) => wss.close(() => r()));
    },
  };
}

/** Waits until `cond` holds, polling the event loop. */
async function until(cond: () => boolean, what: string, ms = 20_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

describe('socket reads into one reused buffer', () => {
  it('delivers a mix of sizes, fragments, masks and pings byte-exact and in order', async () => {
    const pair = await wsPair();
    try {
      const reuse = reuseReceiveBuffer(pair.accepted)!;
      expect(reuse.readsIntoReusedBuffer).toBe(true);
      const got: string[] = [];
      const views: Buffer[] = [];
      pair.accepted.on('message', (data: Buffer) => {
        got.push(sha(data)); // synchronously, as a page batch handler reads
        views.push(data);
      });
      const pongs: string[] = [];
      pair.client.on('pong', (d: Buffer) => pongs.push(d.toString('hex')));
      // Sizes around every boundary: small, the reuse threshold, a read, the largest reused, beyond.
      const sizes = [10, 1000, REUSED_MIN_BYTES - 1, REUSED_MIN_BYTES, 200 * 1024, READ_BUFFER_BYTES - 20, READ_BUFFER_BYTES, READ_BUFFER_BYTES + 5, 3 * MiB + 1, REUSED_MAX_BYTES, REUSED_MAX_BYTES + 1];
      const want: string[] = [];
      const pings: string[] = [];
      let seed = 0;
      for (let round = 0; round < 3; round++) {
        for (const size of sizes) {
          const body = randomBytes(size);
          want.push(sha(body));
          if (seed++ % 4 === 3) {
            // A fragmented message: three frames, with a ping between two of them.
            const a = Math.floor(size / 3);
            pair.client.send(body.subarray(0, a), { fin: false });
            const ping = randomBytes(1 + (seed % 100));
            pings.push(ping.toString('hex'));
            pair.client.ping(ping);
            pair.client.send(body.subarray(a, 2 * a), { fin: false });
            pair.client.send(body.subarray(2 * a), { fin: true });
          } else {
            pair.client.send(body);
          }
        }
        // Let some reads come back short, with a frame cut anywhere.
        await sleep(round * 20);
      }
      await until(() => got.length === want.length && pongs.length === pings.length, 'every message and pong');
      expect(got).toEqual(want);
      expect(pongs).toEqual(pings);
      // Reused: later reads overwrote earlier views of the read or assembly buffer.
      expect(views.some((v) => reuse.holds(v))).toBe(true);
    } finally {
      await pair.close();
    }
  });

  it('pauses and resumes reading as ws asks, losing nothing', async () => {
    const pair = await wsPair();
    try {
      reuseReceiveBuffer(pair.accepted);
      const got: string[] = [];
      pair.accepted.on('message', (data: Buffer) => got.push(sha(data)));
      const want: string[] = [];
      const send = (n: number): void => {
        for (let i = 0; i < n; i++) {
          const body = randomBytes(300 * 1024 + i);
          want.push(sha(body));
          pair.client.send(body);
        }
      };
      send(10);
      await until(() => got.length === 10, 'the first ten');
      pair.accepted.pause();
      send(20);
      await sleep(100);
      const whilePaused = got.length;
      pair.accepted.resume();
      await until(() => got.length === want.length, 'all thirty');
      expect(whilePaused).toBe(10);
      expect(got).toEqual(want);
    } finally {
      await pair.close();
    }
  });

  it('takes over a socket mid-stream, after the first message, with more already in flight', async () => {
    const pair = await wsPair();
    try {
      const got: string[] = [];
      let reuse: ReturnType<typeof reuseReceiveBuffer>;
      pair.accepted.on('message', (data: Buffer) => {
        reuse ??= reuseReceiveBuffer(pair.accepted); // as PeerConnection does on its first page batch
        got.push(sha(data));
      });
      const want: string[] = [];
      for (let i = 0; i < 40; i++) {
        const body = randomBytes(i % 2 === 0 ? MiB : 777);
        want.push(sha(body));
        pair.client.send(body);
      }
      await until(() => got.length === want.length, 'forty messages');
      expect(got).toEqual(want);
      expect(reuse!.readsIntoReusedBuffer).toBe(true);
    } finally {
      await pair.close();
    }
  });

  it('leaves a socket alone that is not in the state it expects', async () => {
    const pair = await wsPair();
    try {
      const socket = (pair.accepted as unknown as { _socket: { on(e: string, f: () => void): void } })._socket;
      socket.on('data', () => undefined); // someone else reads 'data' events, which user-buffer reads would starve
      const reuse = reuseReceiveBuffer(pair.accepted)!;
      expect(reuse.readsIntoReusedBuffer).toBe(false);
      const got: string[] = [];
      pair.accepted.on('message', (data: Buffer) => got.push(sha(data)));
      const body = randomBytes(2 * MiB);
      pair.client.send(body);
      await until(() => got.length === 1, 'the message');
      expect(got).toEqual([sha(body)]);
    } finally {
      await pair.close();
    }
  });
});
