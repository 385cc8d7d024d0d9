/**
 * The receiving end of the cross-process data-plane benchmark, run in a child process so that it
 * has its own event loop (and core), as the target agent of a real migration does. It hosts a
 * PeerServer with a PageReceiver as its `PageBatch` handler and, for the limit, a raw ws server
 * that only counts what arrives. Driven by the parent over the IPC channel.
 *
 * @example
 * ```ts
 * const target = await startDataplaneTarget();
 * await target.prepare(256 << 20, 4096);      // a fresh receiver
 * // ... preCopy over connectPeer({ url: target.peerUrl, ... })
 * const { sha256 } = await target.digest();   // of the received memory
 * await target.close();
 * ```
 */
import { createHash } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { failure, forkTarget } from './child-target.ts';
import { WebSocketServer } from 'ws';
import { PeerServer } from '../core/wire/index.ts';
import { reuseReceiveBuffer } from '../core/wire/receive-buffer.ts';
import { PageReceiver, pageBatchHandler, type PageReceiverStats } from '../effectors/hypervisor/sim/dataplane/index.ts';

const THIS_FILE = fileURLToPath(import.meta.url);
export const DATAPLANE_BENCH_SECRET = Buffer.from('bench-cluster-secret-0123456789');

type ToTarget =
  | { readonly type: 'prepare'; readonly memoryBytes: number; readonly pageSize: number }
  | { readonly type: 'raw-expect'; readonly bytes: number }
  | { readonly type: 'digest' }
  | { readonly type: 'cpu' }
  | { readonly type: 'exit' };

export interface TargetDigest {
  readonly sha256: string;
  readonly finalReceived: boolean;
  readonly stats: PageReceiverStats;
  /** CPU time (user + system) the child spent since the receiver was prepared, ms. */
  readonly cpuMs: number;
}

type FromTarget =
  | { readonly type: 'ready'; readonly peerUrl: string; readonly rawUrl: string; readonly rawReusedUrl: string }
  | { readonly type: 'prepared' }
  | { readonly type: 'raw-armed' }
  | ({ readonly type: 'digest' } & TargetDigest)
  | { readonly type: 'cpu'; readonly ms: number }
  | { readonly type: 'failed'; readonly error: string };

/**
 * Raw ws: once `expect` bytes have arrived since the last raw-expect, one byte goes back on the
 * socket. Two raw servers: plain ws (the limit), and one whose connections read through the data
 * path's reused buffers (core/wire/receive-buffer.ts), to show what that part alone is worth.
 */
async function serve(): Promise<void> {
  const send = (m: FromTarget): void => void process.send?.(m);
  process.on('disconnect', () => process.exit(0));
  try {
    const server = await PeerServer.listen({ agent: 'target', secret: DATAPLANE_BENCH_SECRET, listen: '127.0.0.1:0' });
    let expect = 0;
    let received = 0;
    const rawServer = async (reuse: boolean): Promise<WebSocketServer> => {
      const raw = new WebSocketServer({ host: '127.0.0.1', port: 0, perMessageDeflate: false, maxPayload: 256 * 1024 * 1024 });
      await new Promise<void>((r) => raw.once('listening', () => r()));
      raw.on('connection', (ws) => {
        if (reuse && reuseReceiveBuffer(ws)?.readsIntoReusedBuffer !== true) send({ type: 'failed', error: 'the reused receive buffers could not be installed' });
        ws.on('message', (data: Buffer) => {
          received += data.byteLength;
          if (expect > 0 && received >= expect) {
            expect = 0;
            ws.send(Buffer.alloc(1), { binary: true });
          }
        });
      });
      return raw;
    };
    const raw = await rawServer(false);
    const rawReused = await rawServer(true);
    let receiver: PageReceiver | undefined;
    let unhandle: (() => void) | undefined;
    let cpuAtPrepare = process.cpuUsage();
    process.on('message', (m: ToTarget) => {
      try {
        if (m.type === 'exit') {
          void Promise.all([server.close(), new Promise<void>((r) => raw.close(() => r())), new Promise<void>((r) => rawReused.close(() => r()))]).finally(() => process.exit(0));
        } else if (m.type === 'prepare') {
          unhandle?.();
          receiver = undefined; // let the previous image go before the next is allocated
          const memory = new Uint8Array(m.memoryBytes);
          // Touched beforehand, as a target VM's memory is allocated before the migration; and not
          // what the source holds, so that the digest proves the pages arrived.
          memory.fill(1);
          receiver = new PageReceiver({ memoryBytes: m.memoryBytes, pageSize: m.pageSize, memory });
          unhandle = server.handle('PageBatch', pageBatchHandler(receiver));
          cpuAtPrepare = process.cpuUsage();
          send({ type: 'prepared' });
        } else if (m.type === 'raw-expect') {
          received = 0;
          expect = m.bytes;
          send({ type: 'raw-armed' });
        } else if (m.type === 'cpu') {
          const cpu = process.cpuUsage();
          send({ type: 'cpu', ms: (cpu.user + cpu.system) / 1000 });
        } else if (m.type === 'digest') {
          if (receiver === undefined) throw new Error('digest before prepare');
          const cpu = process.cpuUsage(cpuAtPrepare);
          const sha256 = createHash('sha256').update(receiver.memory).digest('hex');
          send({ type: 'digest', sha256, finalReceived: receiver.finalReceived, stats: receiver.stats, cpuMs: (cpu.user + cpu.system) / 1000 });
        }
      } catch (e) {
        send(failure(e));
      }
    });
    const url = (w: WebSocketServer): string => `ws://127.0.0.1:${(w.address() as AddressInfo).port}`;
    send({ type: 'ready', peerUrl: server.url, rawUrl: url(raw), rawReusedUrl: url(rawReused) });
  } catch (e) {
    send(failure(e));
  }
}

export interface DataplaneTarget {
  readonly peerUrl: string;
  readonly rawUrl: string;
  /** The raw server whose connections read through the data path's reused buffers. */
  readonly rawReusedUrl: string;
  /** A fresh receiver of `memoryBytes` (filled with 1s) behind the PeerServer's PageBatch handler. */
  prepare(memoryBytes: number, pageSize: number): Promise<void>;
  /** Arms the raw server: it answers one byte once `bytes` more have arrived. */
  rawExpect(bytes: number): Promise<void>;
  /** CPU time (user + system) the child has used since it started, ms. */
  cpuMs(): Promise<number>;
  /** sha256 of the current receiver's memory, and whether the final batch arrived. */
  digest(): Promise<TargetDigest>;
  close(): Promise<void>;
}

/** Forks this file under tsx and waits until both servers listen. */
export async function startDataplaneTarget(): Promise<DataplaneTarget> {
  const target = forkTarget<ToTarget, FromTarget>(THIS_FILE, [], 'dataplane bench');
  const ask = target.ask;
  const ready = await target.next();
  if (ready.type !== 'ready') throw new Error(`dataplane bench: unexpected first message ${ready.type} from the target`);
  return {
    peerUrl: ready.peerUrl,
    rawUrl: ready.rawUrl,
    rawReusedUrl: ready.rawReusedUrl,
    prepare: async (memoryBytes, pageSize) => void (await ask({ type: 'prepare', memoryBytes, pageSize }, 'prepared')),
    rawExpect: async (bytes) => void (await ask({ type: 'raw-expect', bytes }, 'raw-armed')),
    cpuMs: async () => (await ask({ type: 'cpu' }, 'cpu')).ms,
    digest: async () => {
      const { sha256, finalReceived, stats, cpuMs } = await ask({ type: 'digest' }, 'digest');
      return { sha256, finalReceived, stats, cpuMs };
    },
    close: () => target.close({ type: 'exit' }),
  };
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href && process.send !== undefined) {
  await serve();
}
