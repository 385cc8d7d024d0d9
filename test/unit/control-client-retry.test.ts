/**
 * The control client and a connection dropped under a request: fetch keeps connections alive, and
 * an agent whose event loop was busy past its idle timeout closes one just as the next poll goes
 * out on it (seen as `embot migrate` failing with ECONNRESET while a 1 GiB sim VM was split). A GET
 * is sent again once; a POST never is. Real HTTP server on loopback that drops chosen requests.
 */
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { ControlClient } from '../../core/control/client.ts';
import { ErrorCodes } from '../../core/errors.ts';
import { rejection } from '../harness/expect-code.ts';

let server: Server | undefined;

/** A server that drops the connection of the first `drops` requests without an answer, and answers the rest. */
async function dropping(drops: number): Promise<{ readonly url: string; readonly seen: () => readonly string[] }> {
  const seen: string[] = [];
  server = createServer((req, res) => {
    seen.push(`${req.method} ${req.url}`);
    if (seen.length <= drops) {
      req.socket.destroy();
      return;
    }
    res.writeHead(200, { 'Content-Type': 'application/json' }).end(JSON.stringify({ id: 'm-1', outcome: null }));
  });
  await new Promise<void>((resolve) => server!.listen(0, '127.0.0.1', resolve));
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, seen: () => seen };
}

afterEach(async () => {
  await new Promise<void>((resolve) => (server ? server.close(() => resolve()) : resolve()));
  server = undefined;
});

describe('ControlClient: a connection dropped under a request', () => {
  it('sends a GET again once, and answers with the second reply', async () => {
    const s = await dropping(1);
    const info = await new ControlClient(s.url).getMigration('m-1');
    expect(info.id).toBe('m-1');
    expect(s.seen()).toEqual(['GET /v1/migrations/m-1', 'GET /v1/migrations/m-1']);
  });

  it('gives CONTROL_UNREACHABLE when the GET is dropped twice (one retry only)', async () => {
    const s = await dropping(2);
    const e = await rejection(new ControlClient(s.url).getMigration('m-1'));
    expect(e.code).toBe(ErrorCodes.CONTROL_UNREACHABLE);
    expect(s.seen()).toHaveLength(2);
  });

  it('never sends a POST again: it may have been acted on', async () => {
    const s = await dropping(1);
    const e = await rejection(new ControlClient(s.url).vmAction('web-1', 'start'));
    expect(e.code).toBe(ErrorCodes.CONTROL_UNREACHABLE);
    expect(s.seen()).toEqual(['POST /v1/vms/web-1/start']);
  });
});
