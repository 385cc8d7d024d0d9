import { afterEach, describe, expect, it } from 'vitest';
import { PeerServer, connectPeer, type PeerConnection } from '../../core/wire/index.ts';
import { measurePath } from '../../core/mobility/source-side.ts';
import { DEFAULT_BATCH_BYTES } from '../../effectors/hypervisor/sim/dataplane/index.ts';

const SECRET = Buffer.from('path-probe-cluster-secret-012345');
const MiB = 1024 * 1024;

/** The bandwidth probe of an uncapped data path (core/mobility/source-side.ts) against a real PeerServer. */
describe('path bandwidth probe', () => {
  let server: PeerServer | undefined;
  let conn: PeerConnection | undefined;

  afterEach(async () => {
    conn?.terminate();
    await server?.close();
  });

  it('sends one untimed batch, then the probe bytes with several batches in flight, and returns a rate', async () => {
    server = await PeerServer.listen({ agent: 'target', secret: SECRET, listen: '127.0.0.1:0' });
    const seen: string[] = [];
    server.handle('PageBatch', (frame) => {
      seen.push(frame.migrationId);
      // As a target answers batches of a migration it does not stage.
      return { type: 'PageBatchAck', migrationId: frame.migrationId, ok: false, reason: 'no such migration' };
    });
    conn = await connectPeer({ url: server.url, agent: 'source', expectedPeer: 'target', secret: SECRET });
    const rate = await measurePath(conn, 'm1', 'p0', 6 * MiB, 4096);
    expect(seen).toHaveLength(1 + (6 * MiB) / DEFAULT_BATCH_BYTES);
    expect(new Set(seen)).toEqual(new Set(['m1.probe']));
    expect(Number.isFinite(rate) && rate > 0).toBe(true);
  });

  it('rejects when the path closes under it, and leaves no failure unhandled', async () => {
    server = await PeerServer.listen({ agent: 'target', secret: SECRET, listen: '127.0.0.1:0' });
    let batches = 0;
    server.handle('PageBatch', (frame, link) => {
      // The link drops after the warm-up batch and the first timed one: the rest are in flight.
      if (++batches === 2) link.terminate();
      return { type: 'PageBatchAck', migrationId: frame.migrationId, ok: false, reason: 'no such migration' };
    });
    conn = await connectPeer({ url: server.url, agent: 'source', expectedPeer: 'target', secret: SECRET });
    await expect(measurePath(conn, 'm2', 'p0', 16 * MiB, 4096)).rejects.toMatchObject({ code: 'EMBOT_ERR_CONNECTION_CLOSED' });
  });
});
