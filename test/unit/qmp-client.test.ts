import { mkdtempSync, rmSync } from 'node:fs';
import { rejection } from '../harness/expect-code.ts';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ErrorCodes, type EmbotError } from '../../core/errors.ts';
import { QmpClient, type QmpEvent } from '../../effectors/hypervisor/qemu/qmp-client.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';

/**
 * A FAKE QMP peer on a real unix socket, named as such: real QEMU never sends garbage, a reply to
 * no request or a line without end, so those faults are scripted here. The client against real
 * QEMU is in test/integration/qemu-qmp.integration.test.ts.
 */
const cleanups = cleanupsAfterEach();

const GREETING = `${JSON.stringify({ QMP: { version: { qemu: { major: 7, minor: 2, micro: 0 }, package: 'fake' }, capabilities: [] } })}\r\n`;

type Script = (socket: net.Socket, command: { execute: string; id?: string; arguments?: unknown }) => void;

/** A unix socket server that greets (unless told not to) and answers each command through `script`. */
async function fakePeer(script: Script, options: { readonly greeting?: string } = {}): Promise<string> {
  const dir = mkdtempSync(join(tmpdir(), 'embot-qmp-'));
  const path = join(dir, 'qmp.sock');
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => {});
    socket.write(options.greeting ?? GREETING);
    let buffer = '';
    socket.setEncoding('utf8').on('data', (d: string) => {
      buffer += d;
      let i: number;
      while ((i = buffer.indexOf('\n')) >= 0) {
        const line = buffer.slice(0, i);
        buffer = buffer.slice(i + 1);
        const command = JSON.parse(line) as { execute: string; id?: string };
        if (command.execute === 'qmp_capabilities') socket.write(`${JSON.stringify({ return: {}, id: command.id })}\r\n`);
        else script(socket, command);
      }
    });
  });
  await new Promise<void>((r) => server.listen(path, r));
  cleanups.push(async () => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((r) => server.close(() => r()));
    rmSync(dir, { recursive: true, force: true });
  });
  return path;
}

async function connect(path: string, options: Parameters<typeof QmpClient.connect>[1] = {}): Promise<QmpClient> {
  const client = await QmpClient.connect(path, { connectTimeoutMs: 2000, commandTimeoutMs: 2000, ...options });
  cleanups.push(() => client.close());
  return client;
}

const reply = (socket: net.Socket, value: unknown): void => void socket.write(`${JSON.stringify(value)}\r\n`);

describe('QmpClient against a scripted peer', () => {
  it('matches replies to commands by id, also out of order, and emits events', async () => {
    const held: { socket: net.Socket; id: string }[] = [];
    const path = await fakePeer((socket, c) => {
      held.push({ socket, id: c.id! });
      if (held.length === 2) {
        reply(socket, { event: 'STOP', data: {}, timestamp: { seconds: 1, microseconds: 2 } });
        // Second command answered first.
        reply(socket, { return: { status: 'paused', running: false }, id: held[1]!.id });
        reply(socket, { return: { status: 'running', running: true }, id: held[0]!.id });
      }
    });
    const client = await connect(path);
    const events: QmpEvent[] = [];
    client.events.on('event', (e) => events.push(e));
    const [a, b] = await Promise.all([client.execute('query-status'), client.execute('query-status')]);
    expect(a.status).toBe('running');
    expect(b.status).toBe('paused');
    expect(events.map((e) => e.event)).toEqual(['STOP']);
    expect(client.greeting.version.qemu.major).toBe(7);
  });

  it('turns a QMP error reply into QMP_COMMAND with its class and desc, and stays usable', async () => {
    const path = await fakePeer((socket, c) => {
      if (c.execute === 'nope') reply(socket, { error: { class: 'CommandNotFound', desc: 'The command nope has not been found' }, id: c.id });
      else reply(socket, { return: { status: 'running', running: true }, id: c.id });
    });
    const client = await connect(path);
    const e = await rejection(client.executeRaw('nope'));
    expect(e.code).toBe(ErrorCodes.QMP_COMMAND);
    expect(e.details).toMatchObject({ class: 'CommandNotFound', command: 'nope' });
    expect((await client.execute('query-status')).running).toBe(true);
  });

  it('times out a command with no reply (QMP_TIMEOUT) and keeps the connection', async () => {
    const path = await fakePeer((socket, c) => {
      if (c.execute !== 'query-migrate') reply(socket, { return: { status: 'running', running: true }, id: c.id });
    });
    const client = await connect(path);
    const e = await rejection(client.execute('query-migrate', undefined, { timeoutMs: 100 }));
    expect(e.code).toBe(ErrorCodes.QMP_TIMEOUT);
    expect(client.closed).toBe(false);
    expect((await client.execute('query-status')).status).toBe('running');
  });

  const garbage: readonly { readonly name: string; readonly answer: (socket: net.Socket, id: string) => void }[] = [
    { name: 'a line that is not JSON', answer: (s) => void s.write('this is not QMP\r\n') },
    { name: 'binary noise', answer: (s) => void s.write(Buffer.from([0xff, 0x00, 0x13, 0x37, 0x0a])) },
    { name: 'a JSON array', answer: (s) => void s.write('[1,2,3]\n') },
    { name: 'a reply to no request', answer: (s) => reply(s, { return: {}, id: 'not-ours' }) },
    { name: 'a reply with neither return nor error', answer: (s, id) => reply(s, { id }) },
    { name: 'a line without end beyond the limit', answer: (s) => void s.write('x'.repeat(70_000)) },
    { name: 'a close under the command', answer: (s) => void s.destroy() },
  ];

  for (const g of garbage) {
    it(`ends the connection with QMP_PROTOCOL on ${g.name}, failing the pending command, without throwing`, async () => {
      const path = await fakePeer((socket, c) => g.answer(socket, c.id!));
      const client = await connect(path, { maxLineBytes: 64 * 1024 });
      const closed = new Promise<EmbotError | undefined>((r) => client.events.once('close', r));
      const e = await rejection(client.execute('query-status'));
      expect(e.code).toBe(ErrorCodes.QMP_PROTOCOL);
      expect((await closed)?.code).toBe(ErrorCodes.QMP_PROTOCOL);
      expect(client.closed).toBe(true);
      // Later commands fail fast with the same code instead of hanging.
      expect((await rejection(client.execute('query-status'))).code).toBe(ErrorCodes.QMP_PROTOCOL);
    });
  }

  it('refuses a peer whose first message is not a QMP greeting (QMP_PROTOCOL)', async () => {
    const path = await fakePeer(() => {}, { greeting: '{"hello": "world"}\n' });
    const e = await rejection(QmpClient.connect(path, { connectTimeoutMs: 2000 }));
    expect(e.code).toBe(ErrorCodes.QMP_PROTOCOL);
  });

  it('refuses a peer that says nothing (QMP_TIMEOUT) and one that answers garbage at once (QMP_PROTOCOL)', async () => {
    const silent = await fakePeer(() => {}, { greeting: '' });
    expect((await rejection(QmpClient.connect(silent, { connectTimeoutMs: 200 }))).code).toBe(ErrorCodes.QMP_TIMEOUT);
    const noisy = await fakePeer(() => {}, { greeting: '\u0000\u0001garbage\n' });
    expect((await rejection(QmpClient.connect(noisy, { connectTimeoutMs: 2000 }))).code).toBe(ErrorCodes.QMP_PROTOCOL);
  });

  it('reports a socket path with nobody listening as QMP_PROTOCOL', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'embot-qmp-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    expect((await rejection(QmpClient.connect(join(dir, 'none.sock'), { connectTimeoutMs: 1000 }))).code).toBe(ErrorCodes.QMP_PROTOCOL);
  });
});
