/**
 * The receiving end of the TLS data-plane benchmark (bench/dataplane-tls.bench.ts), in a child
 * process with its own event loop, as a target agent is. It hosts, all with the cluster CA's
 * mutual TLS (certificates made by the parent into a temp folder):
 *   - a TLS PeerServer with a PageReceiver as its PageBatch handler (the data path under test),
 *     and a plain ws PeerServer with its own receiver, for the cost of TLS in the same run;
 *   - raw TLS servers (TLS 1.3, the limit; TLS 1.2, for the version choice) that only count bytes;
 *   - raw wss servers (ws over https) that only count, one reading through the data path's
 *     reused buffers (core/wire/receive-buffer.ts).
 * Driven by the parent over the IPC channel.
 */
import { createHash } from 'node:crypto';
import { createServer as createHttpsServer } from 'node:https';
import type { AddressInfo } from 'node:net';
import { createServer as createTlsServer, type TLSSocket } from 'node:tls';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { failure, forkTarget } from './child-target.ts';
import { WebSocketServer } from 'ws';
import { PeerServer } from '../core/wire/index.ts';
import { loadPeerTls, serverTlsOptions, type PeerTlsFiles } from '../core/wire/peer-tls.ts';
import { reuseReceiveBuffer } from '../core/wire/receive-buffer.ts';
import { PageReceiver, pageBatchHandler } from '../effectors/hypervisor/sim/dataplane/index.ts';

const THIS_FILE = fileURLToPath(import.meta.url);
export const TLS_BENCH_SECRET = Buffer.from('bench-tls-cluster-secret-0123456');

export type RawKind = 'tls13' | 'tls12' | 'wss' | 'wssReused';

type ToTarget =
  | { readonly type: 'prepare'; readonly memoryBytes: number; readonly pageSize: number }
  | { readonly type: 'raw-expect'; readonly bytes: number }
  | { readonly type: 'digest'; readonly which: 'tls' | 'plain' }
  | { readonly type: 'cpu' }
  | { readonly type: 'exit' };

type FromTarget =
  | { readonly type: 'ready'; readonly tlsPeerUrl: string; readonly plainPeerUrl: string; readonly raw: Readonly<Record<RawKind, string>> }
  | { readonly type: 'prepared' }
  | { readonly type: 'raw-armed' }
  | { readonly type: 'digest'; readonly sha256: string; readonly finalReceived: boolean }
  | { readonly type: 'cpu'; readonly ms: number }
  | { readonly type: 'failed'; readonly error: string };

async function serve(files: PeerTlsFiles): Promise<void> {
  const send = (m: FromTarget): void => void process.send?.(m);
  process.on('disconnect', () => process.exit(0));
  try {
    const tls = loadPeerTls(files, 'target');
    const tlsPeer = await PeerServer.listen({ agent: 'target', tls, secret: TLS_BENCH_SECRET, listen: '127.0.0.1:0' });
    const plainPeer = await PeerServer.listen({ agent: 'target', secret: TLS_BENCH_SECRET, listen: '127.0.0.1:0' });
    let expect = 0;
    let received = 0;
    const count = (n: number, answer: () => void): void => {
      received += n;
      if (expect > 0 && received >= expect) {
        expect = 0;
        answer();
      }
    };
    const closers: (() => void)[] = [];
    const rawTls = async (version: 'TLSv1.3' | 'TLSv1.2'): Promise<string> => {
      const server = createTlsServer({ ...serverTlsOptions(tls, 5000), minVersion: version, maxVersion: version }, (socket: TLSSocket) => {
        socket.on('data', (d: Buffer) => count(d.byteLength, () => socket.write(Buffer.alloc(1))));
        socket.on('error', () => {});
      });
      await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
      closers.push(() => server.close());
      return `127.0.0.1:${(server.address() as AddressInfo).port}`;
    };
    const rawWss = async (reuse: boolean): Promise<string> => {
      const https = createHttpsServer(serverTlsOptions(tls, 5000));
      const wss = new WebSocketServer({ server: https, perMessageDeflate: false, maxPayload: 256 * 1024 * 1024 });
      wss.on('connection', (ws) => {
        if (reuse && reuseReceiveBuffer(ws)?.readsIntoReusedBuffer !== true) send({ type: 'failed', error: 'the reused receive buffers could not be installed on a TLS socket' });
        ws.on('message', (data: Buffer) => count(data.byteLength, () => ws.send(Buffer.alloc(1), { binary: true })));
      });
      await new Promise<void>((r) => https.listen(0, '127.0.0.1', () => r()));
      closers.push(() => {
        wss.close();
        https.closeAllConnections();
        https.close();
      });
      return `wss://127.0.0.1:${(https.address() as AddressInfo).port}/`;
    };
    const raw: Record<RawKind, string> = { tls13: await rawTls('TLSv1.3'), tls12: await rawTls('TLSv1.2'), wss: await rawWss(false), wssReused: await rawWss(true) };
    const receivers: { tls?: PageReceiver; plain?: PageReceiver } = {};
    const unhandle: (() => void)[] = [];
    process.on('message', (m: ToTarget) => {
      try {
        if (m.type === 'exit') {
          for (const c of closers) c();
          void Promise.all([tlsPeer.close(), plainPeer.close()]).finally(() => process.exit(0));
        } else if (m.type === 'prepare') {
          for (const u of unhandle.splice(0)) u();
          delete receivers.tls;
          delete receivers.plain;
          for (const [which, server] of [['tls', tlsPeer], ['plain', plainPeer]] as const) {
            const memory = new Uint8Array(m.memoryBytes);
            // Touched beforehand (a target VM's memory exists before the migration), and unlike the source's.
            memory.fill(1);
            const receiver = new PageReceiver({ memoryBytes: m.memoryBytes, pageSize: m.pageSize, memory });
            receivers[which] = receiver;
            unhandle.push(server.handle('PageBatch', pageBatchHandler(receiver)));
          }
          send({ type: 'prepared' });
        } else if (m.type === 'raw-expect') {
          received = 0;
          expect = m.bytes;
          send({ type: 'raw-armed' });
        } else if (m.type === 'cpu') {
          const cpu = process.cpuUsage();
          send({ type: 'cpu', ms: (cpu.user + cpu.system) / 1000 });
        } else if (m.type === 'digest') {
          const receiver = receivers[m.which];
          if (receiver === undefined) throw new Error('digest before prepare');
          send({ type: 'digest', sha256: createHash('sha256').update(receiver.memory).digest('hex'), finalReceived: receiver.finalReceived });
        }
      } catch (e) {
        send(failure(e));
      }
    });
    send({ type: 'ready', tlsPeerUrl: tlsPeer.url, plainPeerUrl: plainPeer.url, raw });
  } catch (e) {
    send(failure(e));
  }
}

export interface TlsTarget {
  readonly tlsPeerUrl: string;
  readonly plainPeerUrl: string;
  /** `host:port` of the raw TLS servers, `wss://…` of the raw wss ones. */
  readonly raw: Readonly<Record<RawKind, string>>;
  /** Fresh receivers (filled with 1s) behind both PeerServers. */
  prepare(memoryBytes: number, pageSize: number): Promise<void>;
  /** Arms the raw servers: one byte goes back once `bytes` more have arrived. */
  rawExpect(bytes: number): Promise<void>;
  cpuMs(): Promise<number>;
  digest(which: 'tls' | 'plain'): Promise<{ readonly sha256: string; readonly finalReceived: boolean }>;
  close(): Promise<void>;
}

/** Forks this file under tsx with the target's certificate files and waits until every server listens. */
export async function startTlsTarget(files: PeerTlsFiles): Promise<TlsTarget> {
  const target = forkTarget<ToTarget, FromTarget>(THIS_FILE, [JSON.stringify(files)], 'tls bench');
  const ask = target.ask;
  const ready = await target.next();
  if (ready.type !== 'ready') throw new Error(`tls bench: unexpected first message ${ready.type}`);
  return {
    tlsPeerUrl: ready.tlsPeerUrl,
    plainPeerUrl: ready.plainPeerUrl,
    raw: ready.raw,
    prepare: async (memoryBytes, pageSize) => void (await ask({ type: 'prepare', memoryBytes, pageSize }, 'prepared')),
    rawExpect: async (bytes) => void (await ask({ type: 'raw-expect', bytes }, 'raw-armed')),
    cpuMs: async () => (await ask({ type: 'cpu' }, 'cpu')).ms,
    digest: async (which) => {
      const { sha256, finalReceived } = await ask({ type: 'digest', which }, 'digest');
      return { sha256, finalReceived };
    },
    close: () => target.close({ type: 'exit' }),
  };
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href && process.send !== undefined) {
  await serve(JSON.parse(process.argv[2] ?? '{}') as PeerTlsFiles);
}
