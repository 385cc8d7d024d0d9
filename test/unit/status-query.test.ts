import { afterEach, describe, expect, it } from 'vitest';
import { ErrorCodes, ProtocolError, isEmbotError } from '../../core/errors.ts';
import { PeerServer, connectPeer, type PeerConnection } from '../../core/wire/index.ts';
import { askCommitted } from '../../core/mobility/source-side.ts';

const SECRET = Buffer.from('status-query-test-secret-0123456789');
const closers: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  while (closers.length > 0) await closers.pop()!().catch(() => {});
});

/** A real target end whose MigrationStatusQuery handler is `answer`. */
async function link(answer: (id: string) => boolean): Promise<PeerConnection> {
  const server = await PeerServer.listen({
    agent: 'b',
    secret: SECRET,
    listen: '127.0.0.1:0',
    handlers: {
      MigrationStatusQuery: (frame) => {
        if (frame.migrationId === 'no-such') throw new ProtocolError(ErrorCodes.MIGRATION_UNKNOWN, 'no migration no-such with a');
        if (frame.migrationId === 'broken') throw new ProtocolError(ErrorCodes.STORE_CORRUPT, 'journal unreadable');
        return { type: 'MigrationStatus', migrationId: frame.migrationId, committed: answer(frame.migrationId) };
      },
    },
  });
  closers.push(() => server.close());
  const conn = await connectPeer({ url: server.url, agent: 'a', secret: SECRET });
  closers.push(() => conn.close());
  return conn;
}

describe('asking a target whether it committed', () => {
  it("takes the target's answer", async () => {
    const conn = await link((id) => id === 'm-1');
    expect(await askCommitted(conn, 'm-1')).toBe(true);
    expect(await askCommitted(conn, 'm-2')).toBe(false);
  });

  it('reads a target with no record of the migration as not committed, so a restarted source takes its VM back instead of waiting forever', async () => {
    const conn = await link(() => true);
    expect(await askCommitted(conn, 'no-such')).toBe(false);
  });

  it('lets any other error through: the source asks again later', async () => {
    const conn = await link(() => true);
    const err = await askCommitted(conn, 'broken').catch((e: unknown) => e);
    expect(isEmbotError(err, ErrorCodes.STORE_CORRUPT)).toBe(true);
  });
});
