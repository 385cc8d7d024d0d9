import { crc32 } from 'node:zlib';
import { Packr } from 'msgpackr';
import { afterEach, describe, expect, it } from 'vitest';
import { ErrorCodes, ProtocolError } from '../../core/errors.ts';
import { thrownCode } from '../harness/expect-code.ts';
import { PeerServer, connectPeer, decodeFrame, encodeFrame, type PageBatch, type PeerConnection } from '../../core/wire/index.ts';
import { PageGatherer, decodeIndexes, encodeIndexes, gatherPages } from '../../effectors/hypervisor/sim/dataplane/page-batch.ts';

/** A decoder that knows nothing of the frame codec: the PageBatch encoding must be plain msgpack. */
const reference = new Packr({ useRecords: false, mapsAsObjects: true, int64AsType: 'number' });
const SECRET = Buffer.from('page-batch-codec-secret-0123456789');

function batch(over: Partial<PageBatch> = {}): PageBatch {
  return {
    type: 'PageBatch',
    reqId: 1,
    migrationId: 'mig-1',
    path: 'p0',
    round: 0,
    final: false,
    pageSize: 4096,
    indexes: Uint8Array.of(1, 0, 0, 0),
    pages: new Uint8Array(4096).fill(7),
    checksum: 0,
    ...over,
  };
}

/** Field values with bin fields as plain arrays, so toEqual compares contents. */
function plain(v: unknown): Record<string, unknown> {
  return Object.fromEntries(Object.entries(v as Record<string, unknown>).map(([k, x]) => [k, x instanceof Uint8Array ? Array.from(x) : x]));
}

const codeOf = (fn: () => unknown): string | undefined => thrownCode(fn, ProtocolError);

describe('PageBatch encoding', () => {
  const ints = [0, 127, 128, 255, 256, 65535, 65536, 0xffffffff, 0x100000000, Number.MAX_SAFE_INTEGER];
  it.each(ints)('writes integer %d in a width every msgpack decoder reads back', (n) => {
    const frame = batch({ reqId: n, round: n, pageSize: n, checksum: n, pages: new Uint8Array(0), indexes: new Uint8Array(0) });
    const wire = encodeFrame(frame);
    expect(plain(reference.unpack(wire))).toEqual(plain(frame));
    expect(plain(decodeFrame(wire))).toEqual(plain(frame));
  });

  it.each([
    ['short strings', 'm', 'p'],
    ['31/32-byte strings (fixstr edge)', 'a'.repeat(31), 'b'.repeat(32)],
    ['128-char id, multi-byte path (str16)', 'c'.repeat(128), 'é'.repeat(128)],
    ['astral characters', 'm-1', '😀-path'],
  ])('writes %s as UTF-8', (_name, migrationId, path) => {
    const frame = batch({ migrationId, path });
    const decoded = decodeFrame(encodeFrame(frame));
    expect(decoded).toMatchObject({ migrationId, path });
  });

  it.each([0, 255, 256, 65535, 65536, 300_000])('writes a bin of %d bytes and the optional CPU state', (n) => {
    const pages = Uint8Array.from({ length: n }, (_, i) => (i * 31) & 0xff);
    const withCpu = batch({ pages, final: true, cpu: Uint8Array.of(9, 8, 7) });
    expect(plain(reference.unpack(encodeFrame(withCpu)))).toEqual(plain(withCpu));
    const without = batch({ pages });
    const decoded = reference.unpack(encodeFrame(without)) as Record<string, unknown>;
    expect('cpu' in decoded).toBe(false);
    expect(plain(decoded)).toEqual(plain(without));
  });

  it('writes into the buffer the allocator gives, exactly the encoded size', () => {
    const pool = Buffer.alloc(64 * 1024, 0xee);
    let asked = 0;
    const wire = encodeFrame(batch(), undefined, (n) => {
      asked = n;
      return pool;
    });
    expect(wire.buffer).toBe(pool.buffer);
    expect(wire.byteLength).toBe(asked);
    expect(pool[asked]).toBe(0xee);
    expect(plain(decodeFrame(wire))).toEqual(plain(batch()));
  });

  it('validates before it allocates, and refuses a frame over the limit', () => {
    let calls = 0;
    const count = (n: number): Uint8Array => (calls++, new Uint8Array(n));
    const bad = { ...batch(), pages: 'not binary' } as unknown as PageBatch;
    expect(codeOf(() => encodeFrame(bad, undefined, count))).toBe(ErrorCodes.FRAME_MALFORMED);
    const extra = { ...batch(), sneaky: 1 } as unknown as PageBatch;
    expect(codeOf(() => encodeFrame(extra, undefined, count))).toBe(ErrorCodes.FRAME_MALFORMED);
    expect(codeOf(() => encodeFrame(batch({ pages: new Uint8Array(5000) }), 4096, count))).toBe(ErrorCodes.FRAME_TOO_LARGE);
    expect(calls).toBe(0);
  });

  it('refuses an allocator that returns too small a buffer', () => {
    expect(codeOf(() => encodeFrame(batch(), undefined, () => new Uint8Array(10)))).toBe(ErrorCodes.FRAME_TOO_LARGE);
  });
});

describe('page gathering and index decoding with reused buffers', () => {
  const PAGE = 16;
  const memory = Uint8Array.from({ length: 5 * PAGE + 3 }, (_, i) => i & 0xff);

  it('gathers like gatherPages, a run as a view and scattered pages into its reused buffer', () => {
    const g = new PageGatherer();
    const run = g.pages(memory, PAGE, Uint32Array.of(1, 2));
    expect(run.buffer).toBe(memory.buffer);
    const a = g.pages(memory, PAGE, Uint32Array.of(3, 1));
    expect(Array.from(a)).toEqual(Array.from(gatherPages(memory, PAGE, Uint32Array.of(3, 1))));
    const b = g.pages(memory, PAGE, Uint32Array.of(0, 5));
    expect(Array.from(b)).toEqual(Array.from(gatherPages(memory, PAGE, Uint32Array.of(0, 5))));
    expect(b.byteLength).toBe(PAGE + 3);
    expect(b.buffer).toBe(a.buffer);
    expect(g.pages(memory, PAGE, new Uint32Array(0)).byteLength).toBe(0);
  });

  it('decodes unaligned indexes into the scratch when it is large enough, else into a new array', () => {
    const wire = encodeIndexes(Uint32Array.of(4, 0xfffffffe, 9));
    const shifted = new Uint8Array(wire.byteLength + 1);
    shifted.set(wire, 1);
    const scratch = new Uint32Array(8);
    const viaScratch = decodeIndexes(shifted.subarray(1), scratch);
    expect(Array.from(viaScratch)).toEqual([4, 0xfffffffe, 9]);
    expect(viaScratch.buffer).toBe(scratch.buffer);
    const small = new Uint32Array(2);
    const fresh = decodeIndexes(shifted.subarray(1), small);
    expect(Array.from(fresh)).toEqual([4, 0xfffffffe, 9]);
    expect(fresh.buffer).not.toBe(small.buffer);
  });
});

describe('PageBatch send buffers on a real link', () => {
  let server: PeerServer | undefined;
  let conn: PeerConnection | undefined;
  afterEach(async () => {
    await conn?.close();
    await server?.close();
    conn = server = undefined;
  });

  it('never reuses a send buffer the socket still holds: many batches in flight arrive intact', async () => {
    server = await PeerServer.listen({ agent: 'target', secret: SECRET, listen: '127.0.0.1:0' });
    const seen: string[] = [];
    server.handle('PageBatch', (f) => {
      const intact = f.pages.every((b) => b === f.round % 251) && crc32(f.pages, crc32(f.indexes)) === f.checksum;
      seen.push(`${f.round}:${intact ? 'ok' : 'corrupt'}`);
      return { type: 'PageBatchAck', migrationId: f.migrationId, ok: intact };
    });
    conn = await connectPeer({ url: server.url, agent: 'source', expectedPeer: 'target', secret: SECRET });
    const indexes = encodeIndexes(Uint32Array.of(0));
    // Far more than the pool keeps, all sent before the first can be written out; each reuses memory freed by an earlier one.
    const replies = await Promise.all(
      Array.from({ length: 64 }, (_, i) => {
        const pages = new Uint8Array(200 * 1024 + i * 1000).fill(i % 251);
        return conn!.request(batch({ round: i, indexes, pages, checksum: crc32(pages, crc32(indexes)) }));
      }),
    );
    expect(replies.every((r) => r.ok)).toBe(true);
    expect(seen).toEqual(Array.from({ length: 64 }, (_, i) => `${i}:ok`));
    // A second wave reuses the buffers the first one freed.
    const again = await Promise.all(
      Array.from({ length: 16 }, (_, i) => {
        const pages = new Uint8Array(256 * 1024).fill((100 + i) % 251);
        return conn!.request(batch({ round: 100 + i, indexes, pages, checksum: crc32(pages, crc32(indexes)) }));
      }),
    );
    expect(again.every((r) => r.ok)).toBe(true);
  });
});
