import { randomFillSync } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { BULK_BUFFER_STEP, BulkBuffers, bulkBuffers } from '../../core/wire/bulk-buffers.ts';
import { batchChecksum, encodeIndexes } from '../../effectors/hypervisor/sim/dataplane/page-batch.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { pageDestination } from '../harness/sim-page-rig.ts';

/**
 * The data plane's large buffers are shared by the process's links (bulk-buffers.ts): a link that
 * closes leaves its receive buffers to the next one, so a migration on fresh links allocates none.
 */

const MiB = 1024 * 1024;
const SECRET = Buffer.from('bulk-buffers-test-secret-0123456789');
const cleanups = cleanupsAfterEach();

describe('BulkBuffers', () => {
  it('reuses a given buffer for a size within two steps of it, and keeps at most its bound', () => {
    const pool = new BulkBuffers(2);
    const a = pool.take(MiB + 40);
    expect(a.byteLength).toBe(MiB + BULK_BUFFER_STEP);
    pool.give(a);
    pool.give(a);
    expect(pool.size).toBe(1);
    // Far smaller: a fresh one, so a small frame does not pin a big buffer.
    expect(pool.take(MiB / 2)).not.toBe(a);
    expect(pool.take(MiB)).toBe(a);
    pool.give(Buffer.allocUnsafeSlow(MiB));
    pool.give(Buffer.allocUnsafeSlow(MiB));
    pool.give(Buffer.allocUnsafeSlow(MiB));
    expect(pool.size).toBe(2);
  });

  it('a closed data link leaves its receive buffers to the next link, and the next link’s pages arrive intact', async () => {
    const send = async (): Promise<{ close: () => Promise<void>; same: boolean }> => {
      const dest = await pageDestination(cleanups, SECRET, 'b', 2 * MiB);
      const pages = randomFillSync(new Uint8Array(MiB));
      const indexes = encodeIndexes(Uint32Array.from({ length: MiB / 4096 }, (_, i) => i));
      // Two batches: the first installs the reused buffers (receive-buffer.ts), the second uses them.
      for (const round of [0, 1]) {
        const ack = await dest.conn.request({ type: 'PageBatch', migrationId: 'm~b', path: 'direct', round, final: round === 1, pageSize: 4096, indexes, pages, checksum: batchChecksum(indexes, pages) });
        expect(ack).toMatchObject({ type: 'PageBatchAck', ok: true });
      }
      return { close: async () => void (await dest.conn.close()), same: Buffer.compare(dest.receiver.memory.subarray(0, MiB), pages) === 0 };
    };
    const first = await send();
    expect(first.same).toBe(true);
    const before = bulkBuffers.size;
    await first.close();
    // The receiving side's assembly buffer (and its read buffer, where the socket reads into one) comes back once its end of the link closed.
    await expect.poll(() => bulkBuffers.size, { timeout: 5000 }).toBeGreaterThan(before);
    const pooled = bulkBuffers.size;
    const second = await send();
    // The second link took from the pool instead of allocating.
    expect(bulkBuffers.size).toBeLessThan(pooled);
    expect(second.same).toBe(true);
    await second.close();
  });
});
