import { createHash, randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { PeerServer, connectPeer, type PeerConnection } from '../../core/wire/index.ts';
import { allPages, batchChecksum, encodeIndexes } from '../../effectors/dataplane/page-batch.ts';

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
    const pageBuffers = new Set<ArrayBufferLike>();
    const checked: boolean[] = [];
    server.handle('PageBatch', (frame) => {
      // Read synchronously, as PageReceiver.apply does.
      checked.push(batchChecksum(frame.indexes, frame.pages) === frame.checksum);
      pageBuffers.add(frame.pages.buffer);
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
    // The first batch arrived before the link reused anything; all later ones share one buffer.
    expect(pageBuffers.size).toBe(2);
    expect(await state).toEqual({ type: 'ManagementStateSuccess', replyTo: expect.any(Number), migrationId: 'm1' });
  });
});
