/**
 * Peer wire benchmark and the raw limits other benchmarks compare against:
 *   (a) raw loopback WebSocket throughput (ws, binary 64 KiB messages) and raw msgpackr encode+decode;
 *   (b) framed request/response round trips through PeerConnection vs raw ws ping-pong;
 *   (c) bulk framed transfer (ManagementState, 1 MiB payloads) vs raw ws with the same message size.
 * Both ends run in this process, as the agents of the integration tests and the demo do on one machine.
 */
import type { AddressInfo } from 'node:net';
import { pathToFileURL } from 'node:url';
import { Packr } from 'msgpackr';
import WebSocket, { WebSocketServer } from 'ws';
import { decodeFrame, encodeFrame, PeerServer, connectPeer, type Frame, type PeerConnection } from '../core/wire/index.ts';
import { measureRate, renderTable, type BenchRow, type BenchTable } from './table.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
const SECRET = Buffer.from('bench-cluster-secret-0123456789');

/** Both ends of a raw ws link on 127.0.0.1 (no embot code involved). */
async function rawPair(masking: 'zero' | 'random' = 'zero'): Promise<{ server: WebSocketServer; client: WebSocket; serverSide: WebSocket; close: () => Promise<void> }> {
  const server = new WebSocketServer({ host: '127.0.0.1', port: 0, perMessageDeflate: false, maxPayload: 256 * MiB });
  await new Promise<void>((r) => server.once('listening', () => r()));
  const port = (server.address() as AddressInfo).port;
  const accepted = new Promise<WebSocket>((r) => server.once('connection', r));
  const client = new WebSocket(`ws://127.0.0.1:${port}`, {
    perMessageDeflate: false,
    maxPayload: 256 * MiB,
    // Same masking as the peer link (connectPeer's default), so raw and framed are comparable.
    ...(masking === 'zero' ? { generateMask: (m: Buffer) => void m.fill(0) } : {}),
  });
  await new Promise<void>((r, j) => (client.once('open', () => r()), client.once('error', j)));
  const serverSide = await accepted;
  return {
    server,
    client,
    serverSide,
    close: async () => {
      client.terminate();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

/** Sends `total` bytes client → server in `messageBytes` messages, pacing on bufferedAmount; resolves when the server got them all. */
async function pumpRaw(client: WebSocket, serverSide: WebSocket, messageBytes: number, total: number): Promise<number> {
  const msg = Buffer.alloc(messageBytes, 0x5a);
  const count = Math.ceil(total / messageBytes);
  let received = 0;
  const done = new Promise<void>((resolve) => {
    const onMessage = (data: Buffer): void => {
      received += data.byteLength;
      if (received >= count * messageBytes) {
        serverSide.off('message', onMessage);
        resolve();
      }
    };
    serverSide.on('message', onMessage);
  });
  const start = process.hrtime.bigint();
  for (let i = 0; i < count; i++) {
    client.send(msg, { binary: true });
    if (client.bufferedAmount > 8 * MiB) await new Promise<void>((r) => setImmediate(r));
  }
  await done;
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  return (count * messageBytes) / seconds;
}

export interface RawWsOptions {
  /** Default 64 KiB. */
  readonly messageBytes?: number;
  /** Bytes to measure over; default 192 MiB. */
  readonly totalBytes?: number;
  /** Client frame masking; default `zero`, as connectPeer uses. */
  readonly masking?: 'zero' | 'random';
}

/**
 * Raw loopback WebSocket throughput in bytes/s (ws, binary messages, client → server), the limit
 * bulk transfers on the peer link are compared with.
 *
 * @example
 * ```ts
 * const limit = await measureRawWsThroughput(); // bytes/s
 * ```
 */
export async function measureRawWsThroughput(options: RawWsOptions = {}): Promise<number> {
  const messageBytes = options.messageBytes ?? 64 * KiB;
  const total = options.totalBytes ?? 192 * MiB;
  const pair = await rawPair(options.masking);
  try {
    await pumpRaw(pair.client, pair.serverSide, messageBytes, Math.min(total, 16 * MiB)); // warm-up
    return await pumpRaw(pair.client, pair.serverSide, messageBytes, total);
  } finally {
    await pair.close();
  }
}

/** A StartMigration as the mobility service sends it: ids, resources, a few modules, 4 KiB of elements. */
export function representativeFrame(reqId = 1): Frame {
  return {
    type: 'StartMigration',
    reqId,
    migrationId: 'mig-01HZX3V8K6Q2',
    vm: 'vm-web-01',
    elements: new Uint8Array(4 * KiB).fill(7),
    resources: { memory: 2 * 1024 * MiB, vcpus: 2 },
    modules: ['watchdog@1.2.0#sha256-9f2c1e', 'host-load@0.3.1#sha256-77ab01', 'core-vm@1.0.0#sha256-0c0ffe'],
  };
}

/**
 * Raw msgpackr pack + unpack of a representative frame, frames/s (no validation): the limit of
 * the frame codec.
 */
export function measureRawMsgpackrRate(minMs = 400): number {
  const packr = new Packr({ useRecords: false, mapsAsObjects: true });
  const frame = representativeFrame();
  return measureRate(100, () => {
    for (let i = 0; i < 100; i++) packr.unpack(packr.pack(frame));
  }, minMs);
}

function measureCodecRate(minMs = 400): number {
  const frame = representativeFrame();
  return measureRate(100, () => {
    for (let i = 0; i < 100; i++) decodeFrame(encodeFrame(frame));
  }, minMs);
}

/** Sequential raw ws echo round trips per second (tiny binary message). */
async function measureRawRoundTrips(durationMs = 700): Promise<number> {
  const pair = await rawPair();
  try {
    pair.serverSide.on('message', (data: Buffer) => pair.serverSide.send(data, { binary: true }));
    const msg = Buffer.alloc(16, 1);
    const once = (): Promise<void> => new Promise((r) => (pair.client.once('message', () => r()), pair.client.send(msg, { binary: true })));
    for (let i = 0; i < 200; i++) await once();
    let n = 0;
    const start = performance.now();
    while (performance.now() - start < durationMs) {
      await once();
      n++;
    }
    return n / ((performance.now() - start) / 1000);
  } finally {
    await pair.close();
  }
}

async function peerPair(): Promise<{ server: PeerServer; conn: PeerConnection; close: () => Promise<void> }> {
  const server = await PeerServer.listen({ agent: 'target', secret: SECRET, listen: '127.0.0.1:0', maxFrameBytes: 256 * MiB });
  server.handle('ManagementState', (req) => ({ type: 'ManagementStateSuccess', migrationId: req.migrationId }));
  const conn = await connectPeer({ url: server.url, agent: 'source', expectedPeer: 'target', secret: SECRET, maxFrameBytes: 256 * MiB });
  return {
    server,
    conn,
    close: async () => {
      await conn.close();
      await server.close();
    },
  };
}

/** Sequential Ping → Pong through PeerConnection, round trips per second. */
async function measureFramedRoundTrips(durationMs = 700): Promise<number> {
  const { conn, close } = await peerPair();
  try {
    for (let i = 0; i < 200; i++) await conn.request({ type: 'Ping', ts: i });
    let n = 0;
    const start = performance.now();
    while (performance.now() - start < durationMs) {
      await conn.request({ type: 'Ping', ts: n });
      n++;
    }
    return n / ((performance.now() - start) / 1000);
  } finally {
    await close();
  }
}

/** ManagementState requests with 1 MiB of elements, up to `window` in flight; bytes of payload per second. */
async function measureFramedBulk(total = 192 * MiB, payloadBytes = MiB, window = 8): Promise<number> {
  const { conn, close } = await peerPair();
  const elements = new Uint8Array(payloadBytes).fill(0x5a);
  const embots = new Uint8Array(0);
  const run = async (bytes: number): Promise<number> => {
    const count = Math.ceil(bytes / payloadBytes);
    let sent = 0;
    const start = process.hrtime.bigint();
    const worker = async (): Promise<void> => {
      while (sent < count) {
        sent++;
        await conn.request({ type: 'ManagementState', migrationId: 'bench', elements, embots }, { timeoutMs: 30_000 });
      }
    };
    await Promise.all(Array.from({ length: window }, worker));
    return (count * payloadBytes) / (Number(process.hrtime.bigint() - start) / 1e9);
  };
  try {
    await run(16 * MiB);
    return await run(total);
  } finally {
    await close();
  }
}

const mb = (bytesPerSecond: number): number => bytesPerSecond / 1e6;

function rateRow(name: string, value: number, unit: string, limitName: string, limit: number, target?: { text: string; min: number }): BenchRow {
  const ratio = value / limit;
  return { name, value, unit, limitName, limit, ratio, ...(target ? { target: target.text, met: ratio >= target.min } : {}) };
}

/**
 * Runs every measurement and returns the table.
 *
 * @example
 * ```ts
 * console.log(renderTable(await run()));
 * ```
 */
export async function run(): Promise<BenchTable> {
  const raw64k = await measureRawWsThroughput();
  const raw1m = await measureRawWsThroughput({ messageBytes: MiB });
  const rawRandomMask = await measureRawWsThroughput({ masking: 'random', totalBytes: 64 * MiB });
  const rawMsgpackr = measureRawMsgpackrRate();
  const codec = measureCodecRate();
  const rawRtt = await measureRawRoundTrips();
  const framedRtt = await measureFramedRoundTrips();
  const bulk = await measureFramedBulk();
  const rows: BenchRow[] = [
    rateRow('raw ws loopback throughput, 64 KiB binary messages (LIMIT)', mb(raw64k), 'MB/s', 'itself', mb(raw64k)),
    rateRow('raw msgpackr pack+unpack, StartMigration w/ 4 KiB (LIMIT)', rawMsgpackr, 'frames/s', 'itself', rawMsgpackr),
    rateRow('frame codec encode+decode with validation', codec, 'frames/s', 'raw msgpackr', rawMsgpackr, { text: '>= 0.5 of raw', min: 0.5 }),
    rateRow('PeerConnection Ping→Pong round trips (sequential)', framedRtt, 'rt/s', 'raw ws ping-pong', rawRtt, { text: '>= 0.5 of raw', min: 0.5 }),
    rateRow('bulk ManagementState, 1 MiB payloads, 8 in flight', mb(bulk), 'MB/s', 'raw ws, 1 MiB messages', mb(raw1m), { text: '>= 0.5 of raw', min: 0.5 }),
    rateRow('bulk ManagementState vs the 64 KiB limit', mb(bulk), 'MB/s', 'raw ws, 64 KiB messages', mb(raw64k)),
    rateRow('raw ws with RFC random masking (JS, no bufferutil)', mb(rawRandomMask), 'MB/s', 'raw ws, zero mask', mb(raw64k)),
  ];
  return {
    title: 'peer wire (ws + msgpackr, loopback, both ends in one process)',
    rows,
    notes: [
      'ratios are value / limit (higher is better); limits are measured in the same run',
      'raw ws = client → server, binary, no permessage-deflate, paced on bufferedAmount, zero mask key as connectPeer uses (see ConnectPeerOptions.masking)',
      'bulk counts payload bytes only; each frame is validated on send and on arrival and acknowledged by a reply',
    ],
  };
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  console.log(renderTable(await run()));
}
