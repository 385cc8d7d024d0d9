/**
 * Zero pages in the full round: sent as indexes only (PageBatch.zeros), written as zeros at the
 * target whatever its memory held, covered by the checksum, refused when malformed.
 */
import { randomFillSync } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { decodeFrame, encodeFrame, type PageBatch } from '../../core/wire/index.ts';
import { PageReceiver, batchChecksum, encodeIndexes, gatherPages, preCopy, type PreCopyProgress } from '../../effectors/hypervisor/sim/dataplane/index.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { pageDestination } from '../harness/sim-page-rig.ts';
import { MAX_ZEROS_PER_BATCH, splitZeroPages } from '../../effectors/hypervisor/sim/dataplane/zero-pages.ts';
import { SimDriver } from '../../effectors/hypervisor/sim/sim-driver.ts';

const PAGE = 4096;
const cleanups = cleanupsAfterEach();
const MiB = 1024 * 1024;

/** Memory of `pages` pages (the last `tail` bytes short) whose listed pages hold random bytes, the rest zero. */
function memoryWith(pages: number, nonZero: readonly number[], tail = 0): Uint8Array {
  const m = new Uint8Array(pages * PAGE - tail);
  for (const p of nonZero) randomFillSync(m, p * PAGE, Math.min(PAGE, m.byteLength - p * PAGE));
  for (const p of nonZero) m[p * PAGE] = 1; // never all zero by chance
  return m;
}

function zeroBatch(memory: Uint8Array, indexes: number[], zeros: number[], extra: Partial<PageBatch> = {}): PageBatch {
  const ix = encodeIndexes(Uint32Array.from(indexes));
  const z = encodeIndexes(Uint32Array.from(zeros));
  const pages = gatherPages(memory, PAGE, Uint32Array.from(indexes));
  return { type: 'PageBatch', reqId: 1, migrationId: 'm', path: 'p0', round: 0, final: false, pageSize: PAGE, indexes: ix, pages, zeros: z, checksum: batchChecksum(ix, pages, z), ...extra };
}

describe('splitZeroPages', () => {
  it('names every page once, in order: the all-zero ones as zeros, a page with one non-zero byte as a page to send', async () => {
    const m = memoryWith(40, [0, 3, 17, 39], 100);
    m[25 * PAGE + PAGE - 1] = 7; // the last byte of page 25 only
    const batches = await splitZeroPages(m, PAGE, 40, 2);
    const sent = batches.flatMap((b) => Array.from(b.indexes));
    const zeros = batches.flatMap((b) => Array.from(b.zeros));
    expect(sent).toEqual([0, 3, 17, 25, 39]);
    expect([...sent, ...zeros].sort((a, b) => a - b)).toEqual(Array.from({ length: 40 }, (_, i) => i));
    expect(batches.every((b) => b.indexes.length <= 2)).toBe(true);
    // Each batch's zeros lie before its last page to send (or end the memory): the split keeps page order.
    for (let i = 1; i < batches.length; i++) expect(batches[i]!.zeros[0] ?? batches[i]!.indexes[0]!).toBeGreaterThan(batches[i - 1]!.indexes.at(-1) ?? -1);
  });

  it('cuts a long run of zero pages at MAX_ZEROS_PER_BATCH and sends nothing of an all-zero memory', async () => {
    const pages = MAX_ZEROS_PER_BATCH + 5;
    const batches = await splitZeroPages(new Uint8Array(pages * PAGE), PAGE, pages, 256);
    expect(batches.map((b) => [b.indexes.length, b.zeros.length])).toEqual([[0, MAX_ZEROS_PER_BATCH], [0, 5]]);
  });

  it('gives the event loop a turn after every slice of memory, and splits the same as in one go', async () => {
    // A large VM's memory looked at in one go blocked its agent for seconds (see SCAN_SLICE_BYTES).
    const pages = 64;
    const m = memoryWith(pages, [2, 17, 40, 63], 9);
    const turns: number[] = [];
    let looked = 0;
    const tick = (): void => {
      turns.push(looked);
      if (looked === 0) setImmediate(tick);
    };
    setImmediate(tick);
    const sliced = await splitZeroPages(m, PAGE, pages, 4, 16 * PAGE).finally(() => (looked = 1));
    // The immediate queued before the split ran while it was still going: it yielded.
    expect(turns[0]).toBe(0);
    const whole = await splitZeroPages(m, PAGE, pages, 4, pages * PAGE);
    expect(sliced).toEqual(whole);
    expect(sliced.flatMap((b) => Array.from(b.indexes))).toEqual([2, 17, 40, 63]);
  });
});

describe('PageReceiver and zero pages', () => {
  const source = memoryWith(8, [1, 5]);

  it('writes zeros over whatever a given memory held, and the pages to send as usual', () => {
    const memory = new Uint8Array(source.byteLength).fill(0xee);
    const r = new PageReceiver({ memoryBytes: source.byteLength, pageSize: PAGE, memory });
    expect(r.apply(zeroBatch(source, [1, 5], [0, 2, 3, 4, 6, 7]))).toEqual({ ok: true });
    expect(Buffer.compare(r.memory, source)).toBe(0);
  });

  it('writes zeros into its own buffer too unless told it is untouched (a caller may have filled it, as the benches do)', () => {
    const r = new PageReceiver({ memoryBytes: source.byteLength, pageSize: PAGE });
    r.memory.fill(0xee);
    expect(r.apply(zeroBatch(source, [1, 5], [0, 2, 3, 4, 6, 7]))).toEqual({ ok: true });
    expect(Buffer.compare(r.memory, source)).toBe(0);
  });

  it('leaves a page a newer round wrote alone', () => {
    const r = new PageReceiver({ memoryBytes: source.byteLength, pageSize: PAGE });
    const newer = new Uint8Array(source);
    newer.fill(0xaa, 2 * PAGE, 3 * PAGE);
    expect(r.apply(zeroBatch(newer, [2], [], { round: 1 })).ok).toBe(true);
    expect(r.apply(zeroBatch(source, [1, 5], [0, 2, 3, 4, 6, 7], { round: 0 })).ok).toBe(true);
    expect(r.memory[2 * PAGE]).toBe(0xaa);
  });

  it.each<[string, (b: PageBatch) => PageBatch, RegExp]>([
    ['a zeros field that is not whole Uint32s', (b) => { const z = Uint8Array.of(1, 0, 0); return { ...b, zeros: z, checksum: batchChecksum(b.indexes, b.pages, z) }; }, /zeros field/],
    ['a zero page out of range', (b) => { const z = encodeIndexes(Uint32Array.of(0, 8)); return { ...b, zeros: z, checksum: batchChecksum(b.indexes, b.pages, z) }; }, /zero page index 8 out of range/],
    ['zeros not covered by the checksum', (b) => ({ ...b, zeros: encodeIndexes(Uint32Array.of(0, 2, 3)) }), /checksum/],
  ])('refuses %s and writes nothing', (_name, bad, reason) => {
    const memory = new Uint8Array(source.byteLength).fill(0xee);
    const r = new PageReceiver({ memoryBytes: source.byteLength, pageSize: PAGE, memory });
    const result = r.apply(bad(zeroBatch(source, [1], [0, 2])));
    expect(result.ok).toBe(false);
    if (!result.ok) expect(result.reason).toMatch(reason);
    expect(memory.every((b) => b === 0xee)).toBe(true);
  });

  it('a PageBatch with zeros survives the wire codec', () => {
    const frame = zeroBatch(source, [1, 5], [0, 2, 3]);
    const back = decodeFrame(encodeFrame(frame)) as PageBatch;
    expect(Array.from(back.zeros!)).toEqual(Array.from(frame.zeros!));
    expect(back.checksum).toBe(frame.checksum);
  });
});

describe('preCopy of a mostly-zero VM over a real peer link', () => {
  it.each([
    ['a target memory that held other bytes', false],
    ['a fresh (zero) target memory', true],
  ])('sends only the written pages in full and the target ends byte-exact: %s', async (_name, fresh) => {
    const memory = 4 * MiB;
    const target = fresh ? new Uint8Array(memory) : new Uint8Array(memory).fill(0x5a);
    const { conn, receiver } = await pageDestination(cleanups, Buffer.from('zero-pages-test-secret-0123456789'), 'target', memory, { memory: target, memoryIsZero: fresh });
    const driver = new SimDriver({ tickMs: 10 });
    cleanups.push(() => driver.close());
    driver.create({ name: 'vm1', memory, dirtyRate: 0 });
    const src = driver.pages('vm1');
    for (let p = 0; p < src.pageCount; p += 16) src.memory[p * PAGE + 9] = 3; // 1 page in 16 written
    driver.start('vm1');
    const progress: PreCopyProgress[] = [];
    const result = await preCopy({ migrationId: 'm~target', vm: 'vm1', driver, paths: [{ name: 'p0', conn }], stopVm: () => driver.stop('vm1'), cpuState: () => Uint8Array.of(1), onProgress: (p) => progress.push(p) });
    expect(receiver.finalReceived).toBe(true);
    expect(Buffer.compare(receiver.memory, driver.pages('vm1').memory)).toBe(0);
    // The written sixteenth in full (plus any re-sends of an idle VM: none), the zero pages as indexes.
    expect(result.bytes).toBe(memory / 16);
    expect(result.zeroBytes).toBe((memory * 15) / 16);
    // Progress counts the zero pages apart: together they are the whole VM (a progress bar of its size ends full).
    expect(progress.at(-1)).toMatchObject({ phase: 'done', sentBytes: memory / 16, zeroBytes: (memory * 15) / 16 });
  });
});
