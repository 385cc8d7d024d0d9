/**
 * The pre-copy data plane end to end on loopback: real PeerServer and connectPeer links (each
 * data path from its own 127.0.0.x), real sim VMs that keep writing, a PageReceiver at the target.
 */
import { randomFillSync } from 'node:crypto';
import { crc32 } from 'node:zlib';
import type { AddressInfo } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { WebSocketServer } from 'ws';
import { ErrorCodes, isEmbotError } from '../../core/errors.ts';
import { PeerServer, connectPeer, type AnyRequestBody, type PeerConnection, type RequestHandler, type RequestOptions } from '../../core/wire/index.ts';
import { PageReceiver, pageBatchHandler, preCopy, type DataPath, type PreCopyOptions } from '../../effectors/hypervisor/sim/dataplane/index.ts';
import { SimDriver } from '../../effectors/hypervisor/sim/sim-driver.ts';

const SECRET = Buffer.from('dataplane-test-secret-0123456789');
const MiB = 1024 * 1024;
const MIGRATION = 'mig-dp-1';

interface Rig {
  readonly driver: SimDriver;
  readonly receiver: PageReceiver;
  readonly server: PeerServer;
  readonly paths: DataPath[];
  /** Called after the receiver handled each batch (to cut links or abort at a chosen point). */
  afterBatch: () => void;
  stops: number;
  readonly opts: (over?: Partial<PreCopyOptions>) => PreCopyOptions;
}

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function rig(memory: number, dirtyRate: number, caps: readonly (number | undefined)[]): Promise<Rig> {
  const server = await PeerServer.listen({ agent: 'target', secret: SECRET, listen: '127.0.0.1:0' });
  const driver = new SimDriver({ tickMs: 10 });
  driver.create({ name: 'vm1', memory, dirtyRate });
  randomFillSync(driver.pages('vm1').memory);
  const receiver = new PageReceiver({ memoryBytes: memory, pageSize: driver.pageSize, migrationId: MIGRATION });
  const serve = pageBatchHandler(receiver);
  const conns: PeerConnection[] = [];
  cleanups.push(async () => {
    driver.close();
    for (const c of conns) await c.close();
    await server.close();
  });
  for (let i = 0; i < caps.length; i++) {
    conns.push(await connectPeer({ url: server.url, agent: 'source', expectedPeer: 'target', secret: SECRET, localAddress: `127.0.0.${2 + i}` }));
  }
  const r: Rig = {
    driver,
    receiver,
    server,
    paths: conns.map((conn, i) => {
      const cap = caps[i];
      return cap === undefined ? { name: `p${i}`, conn } : { name: `p${i}`, conn, capBytesPerSec: cap };
    }),
    afterBatch: () => {},
    stops: 0,
    opts: (over = {}) => ({
      migrationId: MIGRATION,
      vm: 'vm1',
      driver,
      paths: r.paths,
      downtimeLimitMs: 50,
      stopVm: () => {
        r.stops++;
        driver.stop('vm1');
      },
      cpuState: () => Uint8Array.of(7, 7, 7),
      requestTimeoutMs: 5_000,
      // Small batches, so that these few-MiB VMs make dozens of them to stripe, corrupt and lose.
      batchBytes: 256 * 1024,
      ...over,
    }),
  };
  const handler: RequestHandler<'PageBatch'> = (frame, conn) => {
    const reply = serve(frame, conn);
    r.afterBatch();
    return reply;
  };
  server.handle('PageBatch', handler);
  driver.start('vm1');
  return r;
}

/** crc of every page at the source (frozen: the VM is stopped) equals the target's. */
function expectSameMemory(r: Rig): void {
  expect(r.driver.get('vm1')?.state).toBe('stopped');
  const src = r.driver.pages('vm1');
  let differing = 0;
  for (let i = 0; i < src.pageCount; i++) {
    const dst = r.receiver.memory.subarray(i * src.pageSize, Math.min((i + 1) * src.pageSize, r.receiver.memory.byteLength));
    if (crc32(src.page(i)) !== crc32(dst)) differing++;
  }
  expect(differing).toBe(0);
  expect(r.receiver.finalReceived).toBe(true);
  expect(Array.from(r.receiver.cpuState ?? [])).toEqual([7, 7, 7]);
}

async function codeOf(p: Promise<unknown>): Promise<string | undefined> {
  try {
    await p;
  } catch (e) {
    return isEmbotError(e) ? e.code : `not an EmbotError: ${String(e)}`;
  }
  return undefined;
}

/**
 * Test-only FAKE: a real bit flip cannot be caused on loopback, so this wraps a real connection
 * and flips one byte in the pages of the PageBatch requests `corrupt(n)` picks (n counts the
 * PageBatches sent through it), after the sender computed their checksum.
 */
function fakeCorruptingConnection(real: PeerConnection, corrupt: (n: number) => boolean): PeerConnection {
  let n = 0;
  const request = (body: AnyRequestBody, options?: RequestOptions): Promise<unknown> => {
    if (body.type === 'PageBatch' && body.pages.byteLength > 0 && corrupt(n++)) {
      const pages = new Uint8Array(body.pages);
      pages[pages.byteLength >> 1] ^= 0x10;
      return real.request({ ...body, pages }, options);
    }
    return real.request(body, options);
  };
  return new Proxy(real, {
    get(target, prop) {
      if (prop === 'request') return request;
      const v: unknown = Reflect.get(target, prop, target);
      return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
    },
  });
}

describe('data plane: memory and paths', () => {
  it('delivers a running VM byte-exact over 3 uncapped paths', async () => {
    const r = await rig(8 * MiB, 8 * MiB, [undefined, undefined, undefined]);
    const result = await preCopy(r.opts());
    expectSameMemory(r);
    expect(result.rounds).toBeGreaterThanOrEqual(2);
    expect(result.perPath.reduce((s, p) => s + p.bytes, 0)).toBe(result.bytes);
    expect(result.bytes).toBeGreaterThanOrEqual(8 * MiB);
    expect(r.receiver.stats.bytes).toBe(result.bytes);
    expect(result.resent).toBe(0);
    expect(result.downtimeMs).toBeGreaterThan(0);
  });

  it('stripes over 3 capped paths from distinct local addresses, more on the faster ones', async () => {
    const r = await rig(6 * MiB, 0, [8 * MiB, 16 * MiB, 32 * MiB]);
    const result = await preCopy(r.opts());
    expectSameMemory(r);
    const [slow, mid, fast] = result.perPath;
    expect(result.perPath.every((p) => p.batches > 0 && !p.failed)).toBe(true);
    expect(fast!.bytes).toBeGreaterThan(slow!.bytes);
    expect(mid!.bytes).toBeGreaterThan(slow!.bytes);
    expect(r.server.connections).toHaveLength(3);
  });

  it('continues on the other paths when a path socket is closed mid-migration', async () => {
    const r = await rig(8 * MiB, 4 * MiB, [16 * MiB, 16 * MiB, 16 * MiB]);
    r.afterBatch = () => {
      if (r.receiver.stats.batches === 6) setImmediate(() => r.paths[1]!.conn.terminate());
    };
    const result = await preCopy(r.opts());
    expectSameMemory(r);
    expect(result.perPath.map((p) => p.failed)).toEqual([false, true, false]);
    expect(result.perPath[0]!.bytes + result.perPath[2]!.bytes).toBeGreaterThan(result.perPath[1]!.bytes);
  });

  it('rejects with DATAPLANE_NO_PATH when every path fails, and leaves the VM running', async () => {
    const r = await rig(8 * MiB, 4 * MiB, [16 * MiB, 16 * MiB]);
    r.afterBatch = () => {
      if (r.receiver.stats.batches === 3) setImmediate(() => r.paths.forEach((p) => p.conn.terminate()));
    };
    expect(await codeOf(preCopy(r.opts()))).toBe(ErrorCodes.DATAPLANE_NO_PATH);
    expect(r.stops).toBe(0);
    expect(r.driver.get('vm1')?.state).toBe('running');
    expect(r.receiver.finalReceived).toBe(false);
  });

  it('stops on abort, leaves the VM running and its dirty rate as it was', async () => {
    const r = await rig(4 * MiB, 64 * MiB, [16 * MiB]);
    const ctl = new AbortController();
    r.afterBatch = () => {
      if (r.receiver.stats.batches === 20) ctl.abort(new Error('operator cancelled'));
    };
    const p = preCopy(r.opts({ signal: ctl.signal, downtimeLimitMs: 1 }));
    expect(await codeOf(p)).toBe(ErrorCodes.MIGRATION_ABORTED);
    await expect(p).rejects.toThrow(/operator cancelled/);
    expect(r.stops).toBe(0);
    expect(r.driver.get('vm1')?.state).toBe('running');
    expect(r.driver.counters('vm1').dirtyRate).toBe(64 * MiB);
  });
});

describe('connectPeer localAddress', () => {
  it('leaves from the given loopback address', async () => {
    const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
    await new Promise<void>((resolve) => wss.once('listening', () => resolve()));
    cleanups.push(() => new Promise<void>((resolve) => wss.close(() => resolve())));
    const seen: (string | undefined)[] = [];
    wss.on('connection', (ws, req) => {
      seen.push(req.socket.remoteAddress);
      ws.terminate();
    });
    const port = (wss.address() as AddressInfo).port;
    // This server never answers the handshake: only the source address matters here.
    await connectPeer({ url: `ws://127.0.0.1:${port}/`, agent: 'source', secret: SECRET, localAddress: '127.0.0.3', handshakeTimeoutMs: 500 }).catch(() => undefined);
    expect(seen).toEqual(['127.0.0.3']);
  });
});

describe('data plane: bad page batches', () => {
  it('a batch corrupted on the way is refused by the receiver and re-sent', async () => {
    const r = await rig(4 * MiB, 2 * MiB, [undefined, undefined]);
    r.paths[0] = { ...r.paths[0]!, conn: fakeCorruptingConnection(r.paths[0]!.conn, (n) => n === 3) };
    const result = await preCopy(r.opts());
    expectSameMemory(r);
    expect(r.receiver.stats.rejected).toBe(1);
    expect(result.resent).toBe(1);
    expect(result.perPath.every((p) => !p.failed)).toBe(true);
  });

  it('gives up with PAGE_BATCH_REJECTED when the target refuses a batch 4 times', async () => {
    const r = await rig(2 * MiB, 0, [undefined]);
    r.paths[0] = { ...r.paths[0]!, conn: fakeCorruptingConnection(r.paths[0]!.conn, () => true) };
    const err = await preCopy(r.opts()).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(isEmbotError(err, ErrorCodes.PAGE_BATCH_REJECTED)).toBe(true);
    expect(String((err as Error).message)).toMatch(/bad checksum/);
    expect(r.stops).toBe(0);
    expect(r.receiver.stats.batches).toBe(0);
    expect(r.receiver.stats.rejected).toBeGreaterThanOrEqual(4);
  });

  it('a target without a PageBatch handler fails the batch, not the path, and the migration says why', async () => {
    const r = await rig(1 * MiB, 0, [undefined]);
    r.server.handle('PageBatch', () => {
      throw new Error('no receiver for this migration');
    });
    const err = await preCopy(r.opts()).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(isEmbotError(err, ErrorCodes.PAGE_BATCH_REJECTED)).toBe(true);
    expect(String((err as Error).message)).toMatch(/no receiver for this migration/);
    expect(r.paths[0]!.conn.isOpen).toBe(true);
  });
});
