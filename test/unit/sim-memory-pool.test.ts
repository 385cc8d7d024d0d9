import { randomFillSync } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { ErrorCodes, isEmbotError } from '../../core/errors.ts';
import { batchChecksum, encodeIndexes } from '../../effectors/hypervisor/sim/dataplane/page-batch.ts';
import { MemoryPool } from '../../effectors/hypervisor/sim/memory-pool.ts';
import { SimDriver } from '../../effectors/hypervisor/sim/sim-driver.ts';
import type { PageBatch } from '../../core/wire/index.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { pageDestination, runningSimVm } from '../harness/sim-page-rig.ts';

/**
 * The sim driver keeps the memory of VMs it let go of (removed, discarded incoming) for the next VM
 * of that size (memory-pool.ts): reused memory reads all zero like fresh memory, and memory a
 * pre-copy still reads is not handed out until the copy ends.
 */

const MiB = 1024 * 1024;
const SECRET = Buffer.from('memory-pool-test-secret-0123456789');
const cleanups = cleanupsAfterEach();
const allZero = (m: Uint8Array): boolean => m.every((b) => b === 0);

describe('MemoryPool', () => {
  it('hands back zeroed memory of the size asked, reusing what it was given', () => {
    const pool = new MemoryPool();
    const m = pool.take(MiB);
    expect(m.byteLength).toBe(MiB);
    m.fill(7);
    pool.give(m);
    expect(pool.bytes).toBe(MiB);
    // Another size does not take it.
    expect(pool.take(2 * MiB)).not.toBe(m);
    const again = pool.take(MiB);
    expect(again).toBe(m);
    expect(allZero(again)).toBe(true);
    expect(pool.bytes).toBe(0);
    expect(pool.counts).toEqual({ reused: 1, allocated: 2, kept: 1 });
  });

  it('keeps at most its bound (the oldest go first), no buffer twice, no views, nothing over the size limit', () => {
    const pool = new MemoryPool({ maxFreeBytes: 2 * MiB, maxBufferBytes: MiB });
    const [a, b, c] = [pool.take(MiB), pool.take(MiB), pool.take(MiB)];
    pool.give(a);
    pool.give(a);
    pool.give(b);
    pool.give(c);
    expect(pool.bytes).toBe(2 * MiB);
    const back = new Set([pool.take(MiB), pool.take(MiB)]);
    expect(back.has(b) && back.has(c)).toBe(true);
    pool.give(new Uint8Array(2 * MiB));
    pool.give(new Uint8Array(2 * MiB).subarray(0, MiB));
    pool.give(new Uint8Array(0));
    expect(pool.bytes).toBe(0);
  });

  it('zeroes a given-back buffer soon after, before any take asks (off the next migration’s path), and prefers a zeroed one', async () => {
    const pool = new MemoryPool();
    const [a, b] = [pool.take(MiB), pool.take(MiB)];
    a.fill(7);
    pool.give(a);
    expect(allZero(a)).toBe(false);
    await new Promise((r) => setTimeout(r, 100));
    expect(allZero(a)).toBe(true);
    b.fill(9);
    pool.give(b);
    // b (just given, not zeroed yet) is the newer one, but a is ready: a goes first, b is zeroed on its take.
    expect(pool.take(MiB)).toBe(a);
    const next = pool.take(MiB);
    expect(next).toBe(b);
    expect(allZero(next)).toBe(true);
  });
});

describe('SimDriver memory reuse', () => {
  it('a removed VM’s memory goes to the next VM of its size, all zero; a disabled pool keeps nothing', async () => {
    const driver = new SimDriver();
    cleanups.push(() => driver.close());
    await driver.create({ name: 'v1', memory: MiB });
    const first = driver.pages('v1').memory;
    randomFillSync(first);
    await driver.remove('v1');
    expect(driver.memoryPoolCounts.freeBytes).toBe(MiB);
    await driver.create({ name: 'v2', memory: MiB });
    const second = driver.pages('v2').memory;
    expect(second.buffer).toBe(first.buffer);
    // No byte of v1 survives into v2.
    expect(allZero(second)).toBe(true);
    expect(driver.memoryPoolCounts).toMatchObject({ reused: 1, freeBytes: 0 });

    const off = new SimDriver({ memoryPoolBytes: 0 });
    cleanups.push(() => off.close());
    await off.create({ name: 'v1', memory: MiB });
    const kept = off.pages('v1').memory;
    await off.remove('v1');
    await off.create({ name: 'v2', memory: MiB });
    expect(off.pages('v2').memory.buffer).not.toBe(kept.buffer);
    expect(off.memoryPoolCounts.freeBytes).toBe(0);
  });

  it("startMemory 'random' gives a created VM no zero page (a used guest's RAM); the default leaves it zero; a bad value is refused", async () => {
    const used = new SimDriver({ startMemory: 'random' });
    cleanups.push(() => used.close());
    await used.create({ name: 'v1', memory: MiB + 100 });
    const { memory, pageSize, pageCount } = used.pages('v1');
    for (let p = 0; p < pageCount; p++) expect(allZero(memory.subarray(p * pageSize, Math.min((p + 1) * pageSize, memory.byteLength))), `page ${p}`).toBe(false);
    const fresh = new SimDriver();
    cleanups.push(() => fresh.close());
    await fresh.create({ name: 'v1', memory: MiB });
    expect(allZero(fresh.pages('v1').memory)).toBe(true);
    expect(() => new SimDriver({ startMemory: 'full' as 'zero' })).toThrow(expect.objectContaining({ code: ErrorCodes.VM_SPEC_INVALID }));
  });

  it('a discarded incoming VM’s memory is reused, zeroed, by the next incoming VM', async () => {
    const driver = new SimDriver();
    cleanups.push(() => driver.close());
    const pages = driver.capabilities.incomingPages!;
    const batch = (vm: string): PageBatch => {
      const data = randomFillSync(new Uint8Array(MiB));
      const indexes = encodeIndexes(Uint32Array.from({ length: MiB / 4096 }, (_, i) => i));
      return { type: 'PageBatch', reqId: 1, migrationId: vm, path: 'direct', round: 0, pageSize: 4096, indexes, pages: data, checksum: batchChecksum(indexes, data), final: true } as PageBatch;
    };
    await driver.prepareIncoming({ name: 'in1', memory: MiB });
    expect(pages.apply('in1', batch('in1')).ok).toBe(true);
    await driver.abortIncoming('in1');
    expect(pages.apply('in1', batch('in1'))).toMatchObject({ ok: false });
    expect(driver.memoryPoolCounts.freeBytes).toBe(MiB);
    await driver.prepareIncoming({ name: 'in2', memory: MiB });
    expect(driver.memoryPoolCounts).toMatchObject({ reused: 1, freeBytes: 0 });
    // Nothing of in1's pages is left in in2's memory: commit with no batch applied is refused, so
    // read it through a batch that writes nothing (an empty final batch) and the commit.
    const empty = { ...batch('in2'), indexes: new Uint8Array(0), pages: new Uint8Array(0) };
    expect(pages.apply('in2', { ...empty, checksum: batchChecksum(empty.indexes, empty.pages) }).ok).toBe(true);
    await driver.commitIncoming('in2');
    expect(allZero(driver.pages('in2').memory)).toBe(true);
  });

  it('memory a pre-copy still reads is not reused until the copy ends', async () => {
    const { driver } = await runningSimVm(cleanups, 2 * MiB, 0);
    const dest = await pageDestination(cleanups, SECRET, 'b', 2 * MiB);
    const source = driver.pages('vm1').memory;
    const copying = driver.migrateOut('vm1', {
      endpoint: { uri: 'sim:data-paths' },
      downtimeLimitMs: 50,
      // Removed while the copy still runs (as a fan-out's loser may be, after the winner's commit).
      beforeSwitchover: async () => {
        await driver.stop('vm1').catch(() => undefined);
        await driver.remove('vm1');
        expect(driver.memoryPoolCounts.freeBytes).toBe(0);
      },
      dataPaths: { migrationId: 'm~b', paths: [{ name: 'direct', conn: dest.conn }], maxRounds: 3 },
    });
    const result = await copying.then(
      () => 'completed',
      (e: unknown) => (isEmbotError(e) ? e.code : String(e)),
    );
    expect(['completed', ErrorCodes.VM_UNKNOWN]).toContain(result);
    expect(driver.memoryPoolCounts.freeBytes).toBe(2 * MiB);
    await driver.create({ name: 'vm2', memory: 2 * MiB });
    expect(driver.pages('vm2').memory.buffer).toBe(source.buffer);
    expect(allZero(driver.pages('vm2').memory)).toBe(true);
  });
});
