import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../core/errors.ts';
import { PeerServer, connectPeer, peerEndpoint } from '../../core/wire/index.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { rejection } from '../harness/expect-code.ts';

const SECRET = randomBytes(32);
const cleanups = cleanupsAfterEach();

async function pair() {
  const server = await PeerServer.listen({ agent: 'b', secret: SECRET, listen: '127.0.0.1:0' });
  cleanups.push(() => server.close());
  const conn = await connectPeer({ url: server.url, agent: 'a', secret: SECRET, expectedPeer: 'b' });
  cleanups.push(async () => void (await conn.close()));
  return { server, conn };
}

describe('the peer endpoint as a service features register frames with', () => {
  it('serves a registered request type on every link, and stops once the registration is undone', async () => {
    const { server, conn } = await pair();
    const endpoint = peerEndpoint(server);
    const seen: string[] = [];
    const undo = endpoint.register({ name: 'test', handlers: { IndexQuery: (f, c) => (seen.push(`${c.remoteAgent}:${f.image}`), { type: 'IndexAnswer', body: new Uint8Array([1]) }) } });
    const reply = await conn.request({ type: 'IndexQuery', image: 'x.img' });
    expect(reply.type).toBe('IndexAnswer');
    expect(seen).toEqual(['a:x.img']);
    undo();
    expect((await rejection(conn.request({ type: 'IndexQuery', image: 'x.img' }))).code).toBe(ErrorCodes.REQUEST_FAILED);
  });

  it('refuses a second service for a type already served, and a type that is not a service type', async () => {
    const { server } = await pair();
    const endpoint = peerEndpoint(server);
    endpoint.register({ name: 'one', handlers: { BlockFetch: () => ({ type: 'BlockData', sizes: new Uint8Array(), data: new Uint8Array() }) } });
    expect(() => endpoint.register({ name: 'two', handlers: { BlockFetch: () => ({ type: 'BlockData', sizes: new Uint8Array(), data: new Uint8Array() }) } })).toThrow(
      expect.objectContaining({ code: ErrorCodes.SERVICE_EXISTS, message: expect.stringContaining('already served by one') }),
    );
    expect(() => endpoint.register({ name: 'sneaky', handlers: { StartMigration: () => ({}) } } as never)).toThrow(expect.objectContaining({ code: ErrorCodes.SERVICE_EXISTS }));
  });
});
