import { randomBytes } from 'node:crypto';
import { createRequire } from 'node:module';
import type { Writable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { REUSED_MAX_BYTES, REUSED_MIN_BYTES, reuseReceiveBuffer } from '../../core/wire/receive-buffer.ts';

/** ws's Receiver, which @types/ws does not declare: a Writable fed socket chunks, emitting messages. */
interface ReceiverOptions {
  readonly isServer?: boolean;
  readonly maxPayload?: number;
  readonly allowSynchronousEvents?: boolean;
  readonly binaryType?: string;
}
type Receiver = Writable;
const Receiver = (createRequire(import.meta.url)('ws') as { Receiver: new (options?: ReceiverOptions) => Receiver }).Receiver;

const KiB = 1024;
const MiB = 1024 * KiB;

/** One WebSocket frame as RFC 6455 lays it out; with a mask key the payload is masked. */
function wsFrame(payload: Uint8Array, o: { fin?: boolean; opcode?: number; mask?: Uint8Array } = {}): Buffer {
  const { fin = true, opcode = 2, mask } = o;
  const len = payload.byteLength;
  const maskBit = mask ? 0x80 : 0;
  const head = len < 126 ? Buffer.from([0, maskBit | len]) : len < 65536 ? Buffer.alloc(4) : Buffer.alloc(10);
  head[0] = (fin ? 0x80 : 0) | opcode;
  if (len >= 126 && len < 65536) {
    head[1] = maskBit | 126;
    head.writeUInt16BE(len, 2);
  } else if (len >= 65536) {
    head[1] = maskBit | 127;
    head.writeBigUInt64BE(BigInt(len), 2);
  }
  const body = Buffer.from(payload);
  if (mask) for (let i = 0; i < body.length; i++) body[i]! ^= mask[i & 3]!;
  return Buffer.concat(mask ? [head, mask, body] : [head, body]);
}

/** A real ws Receiver behind an object shaped like the WebSocket that owns it. */
function receiver(options: ReceiverOptions = {}): { ws: WebSocket; receiver: Receiver; messages: Buffer[]; views: Buffer[] } {
  const r = new Receiver({ isServer: false, ...options });
  const messages: Buffer[] = [];
  const views: Buffer[] = [];
  r.on('message', (data: Buffer) => {
    // What a synchronous consumer saw at delivery time, and the view it was handed.
    messages.push(Buffer.from(data));
    views.push(data);
  });
  r.on('error', (e: Error) => {
    throw e;
  });
  return { ws: { _receiver: r } as unknown as WebSocket, receiver: r, messages, views };
}

/** Feeds bytes as a socket delivers them: fresh chunks of `chunk` bytes. */
function feed(r: Receiver, bytes: Buffer, chunk = 64 * KiB): void {
  for (let at = 0; at < bytes.length; at += chunk) r.write(Buffer.from(bytes.subarray(at, Math.min(bytes.length, at + chunk))));
}

describe('reuseReceiveBuffer', () => {
  it('assembles every large message into the same buffer, byte-exact', () => {
    const { ws, receiver: r, messages, views } = receiver();
    const reuse = reuseReceiveBuffer(ws);
    expect(reuse).toBeDefined();
    const payloads = [randomBytes(MiB), randomBytes(MiB), randomBytes(MiB - 3), randomBytes(300 * KiB)];
    feed(r, Buffer.concat(payloads.map((p) => wsFrame(p))), 64 * KiB + 7);
    expect(messages.map((m) => m.equals(payloads[messages.indexOf(m)]!))).toEqual([true, true, true, true]);
    expect(views.every((v) => reuse!.holds(v))).toBe(true);
    expect(new Set(views.map((v) => v.buffer)).size).toBe(1);
    // The buffer was reused: the first view now shows the last message's bytes.
    expect(views[0]!.subarray(0, 300 * KiB).equals(payloads[3]!)).toBe(true);
  });

  it('leaves small messages, single-read messages and huge messages to ws', () => {
    const { ws, receiver: r, messages, views } = receiver({ maxPayload: 64 * MiB });
    const reuse = reuseReceiveBuffer(ws)!;
    const small = randomBytes(REUSED_MIN_BYTES - 100);
    const huge = randomBytes(REUSED_MAX_BYTES + 1);
    feed(r, Buffer.concat([wsFrame(small), wsFrame(huge)]), 16 * KiB);
    const oneRead = randomBytes(200 * KiB);
    r.write(wsFrame(oneRead)); // the whole frame in one chunk: ws hands a view of it
    expect(messages[0]!.equals(small)).toBe(true);
    expect(messages[1]!.equals(huge)).toBe(true);
    expect(messages[2]!.equals(oneRead)).toBe(true);
    expect(views.map((v) => reuse.holds(v))).toEqual([false, false, false]);
  });

  it('keeps the fragments of an unfinished message out of the reused buffer', () => {
    const { ws, receiver: r, messages, views } = receiver();
    const reuse = reuseReceiveBuffer(ws)!;
    const whole = randomBytes(3 * MiB);
    const next = randomBytes(MiB);
    feed(
      r,
      Buffer.concat([
        wsFrame(whole.subarray(0, MiB), { fin: false }),
        wsFrame(whole.subarray(MiB, 2 * MiB), { fin: false, opcode: 0 }),
        wsFrame(whole.subarray(2 * MiB), { opcode: 0 }),
        wsFrame(next),
      ]),
    );
    expect(messages).toHaveLength(2);
    expect(messages[0]!.equals(whole)).toBe(true);
    // The fragmented message is ws's own buffer, still intact after the next message reused ours.
    expect(reuse.holds(views[0]!)).toBe(false);
    expect(views[0]!.equals(whole)).toBe(true);
    expect(messages[1]!.equals(next)).toBe(true);
    expect(reuse.holds(views[1]!)).toBe(true);
  });

  it('unmasks masked frames in the reused buffer', () => {
    const { ws, receiver: r, messages, views } = receiver({ isServer: true });
    const reuse = reuseReceiveBuffer(ws)!;
    const payloads = [randomBytes(MiB), randomBytes(MiB)];
    feed(r, Buffer.concat(payloads.map((p) => wsFrame(p, { mask: randomBytes(4) }))));
    expect(messages[0]!.equals(payloads[0]!)).toBe(true);
    expect(messages[1]!.equals(payloads[1]!)).toBe(true);
    expect(reuse.holds(views[1]!)).toBe(true);
  });

  it('interleaves control frames and keeps the byte count ws checks', () => {
    const { ws, receiver: r, messages } = receiver();
    reuseReceiveBuffer(ws);
    const pings: Buffer[] = [];
    r.on('ping', (d: Buffer) => pings.push(Buffer.from(d)));
    const a = randomBytes(MiB);
    const b = randomBytes(100 * KiB);
    feed(r, Buffer.concat([wsFrame(a), wsFrame(Buffer.from('hi'), { opcode: 0x9 }), wsFrame(b)]), 5000);
    expect(messages.map((m) => m.length)).toEqual([a.length, b.length]);
    expect(messages[1]!.equals(b)).toBe(true);
    expect(pings.map((p) => p.toString())).toEqual(['hi']);
    expect((r as unknown as { _bufferedBytes: number })._bufferedBytes).toBe(0);
  });

  it('installs nothing where ws is not the shape it was written for', () => {
    expect(reuseReceiveBuffer({} as WebSocket)).toBeUndefined();
    expect(reuseReceiveBuffer(receiver({ allowSynchronousEvents: false }).ws)).toBeUndefined();
    expect(reuseReceiveBuffer(receiver({ binaryType: 'arraybuffer' }).ws)).toBeUndefined();
    const twice = receiver();
    expect(reuseReceiveBuffer(twice.ws)).toBeDefined();
    expect(reuseReceiveBuffer(twice.ws)).toBeUndefined();
    const renamed = receiver();
    delete (renamed.receiver as unknown as { _buffers?: unknown })._buffers;
    expect(reuseReceiveBuffer(renamed.ws)).toBeUndefined();
  });

  it('finds the receiver and the socket of a real ws connection (the ws and Node versions in use)', async () => {
    const { WebSocketServer } = await import('ws');
    const server = new WebSocketServer({ host: '127.0.0.1', port: 0 });
    await new Promise<void>((r) => server.once('listening', () => r()));
    const accepted = new Promise<WebSocket>((r) => server.once('connection', r));
    const client = new WebSocket(`ws://127.0.0.1:${(server.address() as { port: number }).port}`);
    await new Promise<void>((r, j) => (client.once('open', () => r()), client.once('error', j)));
    try {
      const reuse = reuseReceiveBuffer(await accepted);
      expect(reuse).toBeDefined();
      const clientReuse = reuseReceiveBuffer(client);
      expect(clientReuse).toBeDefined();
      // And the socket of the Node version in use takes user-buffer reads, on both ends.
      expect(reuse!.readsIntoReusedBuffer).toBe(true);
      expect(clientReuse!.readsIntoReusedBuffer).toBe(true);
    } finally {
      client.terminate();
      await new Promise<void>((r) => server.close(() => r()));
    }
  });
});
