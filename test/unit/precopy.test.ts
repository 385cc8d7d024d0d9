import { randomFillSync } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { afterEach, describe, expect, it } from 'vitest';
import { ErrorCodes, isEmbotError } from '../../core/errors.ts';
import { PeerServer, connectPeer, type PageBatch, type PeerConnection } from '../../core/wire/index.ts';
import {
  PageReceiver,
  batchChecksum,
  decodeIndexes,
  encodeIndexes,
  gatherPages,
  pageBatchHandler,
  preCopy,
  type PreCopyOptions,
  type PreCopyProgress,
} from '../../effectors/hypervisor/sim/dataplane/index.ts';
import { SimDriver } from '../../effectors/hypervisor/sim/sim-driver.ts';

const SECRET = Buffer.from('precopy-test-secret-0123456789');
const MiB = 1024 * 1024;
const PAGE = 4096;

/** A batch as the sender builds it, from `memory`. */
function batchOf(memory: Uint8Array, indexes: number[], extra: Partial<PageBatch> = {}): PageBatch {
  const ix = encodeIndexes(Uint32Array.from(indexes));
  const pages = gatherPages(memory, PAGE, Uint32Array.from(indexes));
  return { type: 'PageBatch', reqId: 1, migrationId: 'mig-1', path: 'p0', round: 0, final: false, pageSize: PAGE, indexes: ix, pages, checksum: batchChecksum(ix, pages), ...extra };
}

function expectCode(p: Promise<unknown>, code: string): Promise<void> {
  return p.then(
    () => expect.unreachable('should have rejected'),
    (e: unknown) => {
      expect(isEmbotError(e)).toBe(true);
      expect((e as { code: string }).code).toBe(code);
    },
  );
}

describe('page batch layout', () => {
  it('round-trips indexes, also from an unaligned view', () => {
    const ix = Uint32Array.from([0, 1, 7, 0xfffffffe]);
    const wire = encodeIndexes(ix);
    expect(Array.from(decodeIndexes(wire))).toEqual(Array.from(ix));
    const shifted = new Uint8Array(wire.byteLength + 1);
    shifted.set(wire, 1);
    expect(Array.from(decodeIndexes(shifted.subarray(1)))).toEqual(Array.from(ix));
    // Little-endian on the wire, whatever the host.
    expect(Array.from(wire.subarray(12))).toEqual([0xfe, 0xff, 0xff, 0xff]);
  });

  it('gathers a run as a view and scattered pages as a copy, the short last page included', () => {
    const memory = new Uint8Array(3 * PAGE + 100);
    randomFillSync(memory);
    const run = gatherPages(memory, PAGE, Uint32Array.from([1, 2]));
    expect(run.buffer).toBe(memory.buffer);
    expect(run.byteLength).toBe(2 * PAGE);
    const scattered = gatherPages(memory, PAGE, Uint32Array.from([0, 3]));
    expect(scattered.byteLength).toBe(PAGE + 100);
    expect(Buffer.compare(scattered.subarray(PAGE), memory.subarray(3 * PAGE))).toBe(0);
  });

  it('checksums indexes then pages with zlib crc32', () => {
    const a = Uint8Array.of(1, 2, 3);
    const b = Uint8Array.of(4, 5);
    expect(batchChecksum(a, b)).toBe(crc32(Uint8Array.of(1, 2, 3, 4, 5)));
  });
});

describe('PageReceiver', () => {
  const source = new Uint8Array(4 * PAGE + 10);
  randomFillSync(source);
  const receiver = (): PageReceiver => new PageReceiver({ memoryBytes: source.byteLength, pageSize: PAGE, migrationId: 'mig-1' });

  it('writes the pages of a good batch, the short last page too', () => {
    const r = receiver();
    expect(r.apply(batchOf(source, [0, 2, 4]))).toEqual({ ok: true });
    expect(Buffer.compare(r.memory.subarray(0, PAGE), source.subarray(0, PAGE))).toBe(0);
    expect(Buffer.compare(r.memory.subarray(2 * PAGE, 3 * PAGE), source.subarray(2 * PAGE, 3 * PAGE))).toBe(0);
    expect(Buffer.compare(r.memory.subarray(4 * PAGE), source.subarray(4 * PAGE))).toBe(0);
    expect(r.memory.subarray(PAGE, 2 * PAGE).every((b) => b === 0)).toBe(true);
    expect(r.stats).toEqual({ batches: 1, bytes: 2 * PAGE + 10, rejected: 0 });
    expect(r.finalReceived).toBe(false);
  });

  it('records the final batch and a copy of its CPU state', () => {
    const r = receiver();
    const cpu = Uint8Array.of(9, 8, 7);
    expect(r.apply(batchOf(source, [], { final: true, cpu }))).toEqual({ ok: true });
    cpu[0] = 0;
    expect(r.finalReceived).toBe(true);
    expect(Array.from(r.cpuState!)).toEqual([9, 8, 7]);
  });

  it('does not let a batch of an older round overwrite a newer page', () => {
    const r = receiver();
    const newer = new Uint8Array(source);
    newer.fill(0xaa, 0, PAGE);
    expect(r.apply(batchOf(newer, [0, 1], { round: 3 })).ok).toBe(true);
    expect(r.apply(batchOf(source, [0, 1, 2], { round: 2 })).ok).toBe(true);
    expect(r.memory[0]).toBe(0xaa);
    expect(Buffer.compare(r.memory.subarray(2 * PAGE, 3 * PAGE), source.subarray(2 * PAGE, 3 * PAGE))).toBe(0);
  });

  const good = batchOf(source, [1, 2]);
  it.each<[string, PageBatch, RegExp]>([
    ['a flipped page byte', { ...good, pages: (() => { const p = new Uint8Array(good.pages); p[100] ^= 1; return p; })() }, /checksum/],
    ['a wrong checksum', { ...good, checksum: (good.checksum + 1) >>> 0 }, /checksum/],
    ['another migration', { ...good, migrationId: 'mig-2' }, /migration/],
    ['another page size', { ...good, pageSize: 8192 }, /page size/],
    ['a partial index', (() => { const ix = Uint8Array.of(1, 0, 0, 0, 2, 0); return { ...good, indexes: ix, checksum: batchChecksum(ix, good.pages) }; })(), /whole number/],
    ['an index out of range', batchOf(source, [5]), /out of range/],
    ['too few page bytes', (() => { const pages = good.pages.subarray(1); return { ...good, pages, checksum: batchChecksum(good.indexes, pages) }; })(), /bytes/],
    ['CPU state on a batch that is not final', { ...good, cpu: Uint8Array.of(1) }, /CPU/],
  ])('refuses %s and writes nothing', (_name, frame, reason) => {
    const r = receiver();
    const before = new Uint8Array(r.memory);
    const result = r.apply(frame);
    expect(result.ok).toBe(false);
    if (!result.ok) expect(result.reason).toMatch(reason);
    expect(Buffer.compare(r.memory, before)).toBe(0);
    expect(r.stats).toEqual({ batches: 0, bytes: 0, rejected: 1 });
    // The same receiver still takes good batches.
    expect(r.apply(good).ok).toBe(true);
  });

  it.each([
    [{ memoryBytes: 0, pageSize: PAGE }],
    [{ memoryBytes: 100, pageSize: 0 }],
    [{ memoryBytes: 1.5, pageSize: PAGE }],
    [{ memoryBytes: 100, pageSize: PAGE, memory: new Uint8Array(99) }],
  ])('refuses constructor options %j', (o) => {
    expect(() => new PageReceiver(o)).toThrow(expect.objectContaining({ code: ErrorCodes.EFFECTOR_ARGS_INVALID }));
  });

  it('answers PageBatchAck through pageBatchHandler', () => {
    const r = receiver();
    const handler = pageBatchHandler(r);
    expect(handler(good, undefined as unknown as PeerConnection)).toEqual({ type: 'PageBatchAck', migrationId: 'mig-1', ok: true });
    expect(handler({ ...good, checksum: 0 }, undefined as unknown as PeerConnection)).toEqual({ type: 'PageBatchAck', migrationId: 'mig-1', ok: false, reason: 'bad checksum' });
  });
});

// -----------------------------------------------------------------------------------------------
// preCopy over a real peer link on 127.0.0.1, one path capped so the send rate is known.

/** The path's cap: the send rate every dirty rate below is chosen relative to. */
const CAP = 32 * MiB;

interface Rig {
  readonly driver: SimDriver;
  readonly receiver: PageReceiver;
  readonly conn: PeerConnection;
  readonly opts: (over?: Partial<PreCopyOptions>) => PreCopyOptions;
  readonly progress: PreCopyProgress[];
  stops: number;
}

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function rig(memory: number, dirtyRate: number): Promise<Rig> {
  const server = await PeerServer.listen({ agent: 'target', secret: SECRET, listen: '127.0.0.1:0' });
  const driver = new SimDriver({ tickMs: 10 });
  driver.create({ name: 'vm1', memory, dirtyRate });
  randomFillSync(driver.pages('vm1').memory);
  const receiver = new PageReceiver({ memoryBytes: memory, pageSize: driver.pageSize, migrationId: 'mig-1' });
  server.handle('PageBatch', pageBatchHandler(receiver));
  const conn = await connectPeer({ url: server.url, agent: 'source', expectedPeer: 'target', secret: SECRET });
  cleanups.push(async () => {
    driver.close();
    await conn.close();
    await server.close();
  });
  driver.start('vm1');
  const progress: PreCopyProgress[] = [];
  const r: Rig = {
    driver,
    receiver,
    conn,
    progress,
    stops: 0,
    opts: (over = {}) => ({
      migrationId: 'mig-1',
      vm: 'vm1',
      driver,
      paths: [{ name: 'p0', conn, capBytesPerSec: CAP }],
      downtimeLimitMs: 30,
      stopVm: () => {
        r.stops++;
        driver.stop('vm1');
      },
      cpuState: () => Uint8Array.of(1, 2, 3),
      onProgress: (p) => progress.push(p),
      ...over,
    }),
  };
  return r;
}

function expectSameMemory(driver: SimDriver, receiver: PageReceiver): void {
  const src = driver.pages('vm1');
  for (let i = 0; i < src.pageCount; i++) {
    const dst = receiver.memory.subarray(i * src.pageSize, Math.min((i + 1) * src.pageSize, receiver.memory.byteLength));
    if (crc32(src.page(i)) !== crc32(dst)) expect.fail(`page ${i} differs at the target`);
  }
}

describe('preCopy convergence', () => {
  it('converges within the limit when the dirty rate is below the send rate, without throttling', async () => {
    const r = await rig(8 * MiB, CAP / 4);
    const result = await preCopy(r.opts());
    expect(result.converged).toBe(true);
    expect(result.throttled).toBe(false);
    expect(result.throttleSteps).toBe(0);
    expect(result.rounds).toBeGreaterThanOrEqual(2);
    expect(result.rounds).toBeLessThan(30);
    expect(result.expectedDowntimeMs).toBeLessThanOrEqual(30);
    expect(r.stops).toBe(1);
    expect(r.driver.get('vm1')?.state).toBe('stopped');
    expect(r.receiver.finalReceived).toBe(true);
    expect(Array.from(r.receiver.cpuState!)).toEqual([1, 2, 3]);
    expectSameMemory(r.driver, r.receiver);
    // Progress: rounds in order, then stop-and-copy, then done.
    const phases = r.progress.map((p) => p.phase);
    expect(phases.at(-1)).toBe('done');
    expect(phases.at(-2)).toBe('stop-and-copy');
    const rounds = r.progress.filter((p) => p.phase === 'precopy').map((p) => p.round);
    expect([...rounds].sort((a, b) => a - b)).toEqual(rounds);
    expect(r.progress.every((p) => p.throttle === 0 && p.paths.length === 1)).toBe(true);
  });

  it('converges above the send rate only with auto-converge, and says so', async () => {
    const r = await rig(4 * MiB, 2 * CAP);
    const result = await preCopy(r.opts());
    expect(result.converged).toBe(true);
    expect(result.throttled).toBe(true);
    expect(result.throttleSteps).toBeGreaterThanOrEqual(1);
    expect(result.initialDirtyRate).toBe(2 * CAP);
    expect(result.finalDirtyRate).toBeLessThan(2 * CAP);
    expect(result.finalDirtyRate).toBeCloseTo(2 * CAP * (1 - Math.min(0.99, 0.2 * result.throttleSteps)), 0);
    expect(Math.max(...r.progress.map((p) => p.throttle))).toBeGreaterThan(0);
    // The VM leaves with its own spec: the throttle was for the migration only.
    expect(r.driver.counters('vm1').dirtyRate).toBe(2 * CAP);
    expectSameMemory(r.driver, r.receiver);
  });

  it('without auto-converge, a dirty rate above the send rate ends by maxRounds', async () => {
    const r = await rig(4 * MiB, 2 * CAP);
    const result = await preCopy(r.opts({ autoConverge: false, maxRounds: 5 }));
    expect(result.converged).toBe(false);
    expect(result.rounds).toBe(5);
    expect(result.throttled).toBe(false);
    expect(result.finalDirtyRate).toBe(2 * CAP);
    expect(result.expectedDowntimeMs).toBeGreaterThan(30);
    expect(r.stops).toBe(1);
    expectSameMemory(r.driver, r.receiver);
  });

  it('with maxRounds 1 stops at once and copies everything in one round', async () => {
    const r = await rig(1 * MiB, CAP);
    const result = await preCopy(r.opts({ maxRounds: 1 }));
    expect(result.rounds).toBe(1);
    expect(result.bytes).toBe(1 * MiB);
    // The one round goes with the VM stopped: all of it.
    expect(result.stopBytes).toBe(1 * MiB);
    expectSameMemory(r.driver, r.receiver);
  });
});

describe('preCopy bad input', () => {
  it.each<[string, Partial<PreCopyOptions>]>([
    ['a zero downtime limit', { downtimeLimitMs: 0 }],
    ['a NaN downtime limit', { downtimeLimitMs: Number.NaN }],
    ['zero rounds', { maxRounds: 0 }],
    ['fractional rounds', { maxRounds: 2.5 }],
    ['a zero batch size', { batchBytes: 0 }],
    ['a missing stopVm', { stopVm: undefined as unknown as () => void }],
    ['batches larger than the link takes', { batchBytes: 128 * MiB }],
  ])('refuses %s before sending anything', async (_name, over) => {
    const r = await rig(1 * MiB, 0);
    await expectCode(preCopy(r.opts(over)), ErrorCodes.EFFECTOR_ARGS_INVALID);
    expect(r.receiver.stats.batches).toBe(0);
    expect(r.driver.get('vm1')?.state).toBe('running');
  });

  it('refuses an empty path list and duplicate path names', async () => {
    const r = await rig(1 * MiB, 0);
    await expectCode(preCopy(r.opts({ paths: [] })), ErrorCodes.DATAPLANE_NO_PATH);
    await expectCode(preCopy(r.opts({ paths: [{ name: 'a', conn: r.conn }, { name: 'a', conn: r.conn }] })), ErrorCodes.EFFECTOR_ARGS_INVALID);
    expect(r.stops).toBe(0);
  });

  it('refuses an unknown VM', async () => {
    const r = await rig(1 * MiB, 0);
    await expectCode(preCopy(r.opts({ vm: 'nope' })), ErrorCodes.VM_UNKNOWN);
  });

  it('refuses at once with a signal that is already aborted', async () => {
    const r = await rig(1 * MiB, 0);
    await expectCode(preCopy(r.opts({ signal: AbortSignal.abort(new Error('operator')) })), ErrorCodes.MIGRATION_ABORTED);
    expect(r.receiver.stats.batches).toBe(0);
    expect(r.stops).toBe(0);
  });
});
