/**
 * The data path over mutual TLS (issue 11): pre-copy of an idle sim VM over one wss:// path to a
 * target in a child process, against raw TLS socket throughput and raw wss throughput between the
 * same two processes in the same run; beside it the same pre-copy over plain ws (the cost of TLS)
 * and raw TLS 1.2 against 1.3 (the cost of requiring 1.3). Certificates come from a cluster CA
 * made into a temp folder, deleted at the end.
 *
 * @example
 * ```sh
 * npx tsx bench/dataplane-tls.bench.ts          # markdown table
 * npm run bench -- --only dataplane-tls --quick
 * ```
 */
import { createHash, randomFillSync } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect as tlsConnect, type ConnectionOptions, type TLSSocket } from 'node:tls';
import { pathToFileURL } from 'node:url';
import WebSocket from 'ws';
import { CA_CERT_FILE, createClusterCa, issueAgentCertificate } from '../core/wire/cluster-ca.ts';
import { connectPeer } from '../core/wire/index.ts';
import { MIN_TLS_VERSION, clientTlsOptions, loadPeerTls, type PeerTls, type PeerTlsFiles } from '../core/wire/peer-tls.ts';
import { DEFAULT_BATCH_BYTES, preCopy } from '../effectors/hypervisor/sim/dataplane/index.ts';
import { SimDriver } from '../effectors/hypervisor/sim/sim-driver.ts';
import { renderTable, type BenchRow, type BenchTable } from './table.ts';
import { TLS_BENCH_SECRET, startTlsTarget, type RawKind, type TlsTarget } from './dataplane-tls-target.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const MESSAGE_BYTES = 64 * KiB;

export interface TlsBenchOptions {
  readonly quick?: boolean;
}

interface Run {
  readonly bytesPerSec: number;
  /** CPU of both processes over the timed transfer, µs per MiB moved. */
  readonly cpuPerMiB: number;
  readonly cipher?: string;
}

const NONE: Run = { bytesPerSec: 0, cpuPerMiB: Infinity };
const best = (a: Run, b: Run): Run => (b.bytesPerSec > a.bytesPerSec ? b : a);

async function timed(target: TlsTarget, bytes: number, body: () => Promise<void>): Promise<Run> {
  const child0 = await target.cpuMs();
  const cpu0 = process.cpuUsage();
  const start = process.hrtime.bigint();
  await body();
  const ms = Number(process.hrtime.bigint() - start) / 1e6;
  const cpu = process.cpuUsage(cpu0);
  const cpuMs = (cpu.user + cpu.system) / 1000 + ((await target.cpuMs()) - child0);
  return { bytesPerSec: (bytes * 1000) / ms, cpuPerMiB: ((cpuMs * 1000) / bytes) * MiB };
}

/** Raw TLS socket → the child's counting server, 64 KiB writes paced on the queued bytes; the clock stops at the child's one-byte answer. */
export async function rawTls(target: TlsTarget, tls: PeerTls, kind: 'tls13' | 'tls12', total: number): Promise<Run> {
  const [host, port] = target.raw[kind].split(':') as [string, string];
  const version = kind === 'tls13' ? 'TLSv1.3' : 'TLSv1.2';
  // The agents' secure context pins TLS 1.3; the 1.2 row gets the same files without it.
  const options: ConnectionOptions = kind === 'tls13' ? clientTlsOptions(tls) : { ca: tls.ca, cert: tls.cert, key: tls.key, checkServerIdentity: () => undefined, minVersion: version, maxVersion: version };
  const socket: TLSSocket = tlsConnect({ ...options, host, port: Number(port) });
  await new Promise<void>((r, j) => (socket.once('secureConnect', () => r()), socket.once('error', j)));
  const chunk = Buffer.alloc(MESSAGE_BYTES, 0x5a);
  const pump = async (bytes: number): Promise<Run> => {
    const count = Math.ceil(bytes / MESSAGE_BYTES);
    await target.rawExpect(count * MESSAGE_BYTES);
    const done = new Promise<void>((r) => socket.once('data', () => r()));
    const run = await timed(target, count * MESSAGE_BYTES, async () => {
      // Paced on the queued bytes as ws paces the wss rows, not on every write's highWaterMark answer.
      for (let i = 0; i < count; i++) {
        socket.write(chunk);
        if (socket.writableLength > 8 * MiB) await new Promise<void>((r) => socket.once('drain', () => r()));
      }
      await done;
    });
    return { ...run, cipher: `${socket.getProtocol() ?? '?'} ${socket.getCipher().name}` };
  };
  try {
    await pump(Math.min(total, 16 * MiB));
    return await pump(total);
  } finally {
    socket.destroy();
  }
}

/** Raw ws client over TLS → the child's counting wss server, 64 KiB messages paced on bufferedAmount. */
export async function rawWss(target: TlsTarget, tls: PeerTls, kind: 'wss' | 'wssReused', total: number): Promise<Run> {
  const client = new WebSocket(target.raw[kind], { perMessageDeflate: false, maxPayload: MiB, generateMask: (m: Buffer) => void m.fill(0), ...clientTlsOptions(tls) });
  await new Promise<void>((r, j) => (client.once('open', () => r()), client.once('error', j)));
  const msg = Buffer.alloc(MESSAGE_BYTES, 0x5a);
  const pump = async (bytes: number): Promise<Run> => {
    const count = Math.ceil(bytes / MESSAGE_BYTES);
    await target.rawExpect(count * MESSAGE_BYTES);
    const done = new Promise<void>((r) => client.once('message', () => r()));
    return timed(target, count * MESSAGE_BYTES, async () => {
      for (let i = 0; i < count; i++) {
        client.send(msg, { binary: true });
        if (client.bufferedAmount > 8 * MiB) await new Promise<void>((r) => setImmediate(r));
      }
      await done;
    });
  };
  try {
    await pump(Math.min(total, 16 * MiB));
    return await pump(total);
  } finally {
    client.terminate();
  }
}

/** Pre-copy of an idle sim VM (random content) over one path to the child's TLS or plain PeerServer; verified byte-exact there. */
export async function precopy(target: TlsTarget, tls: PeerTls, which: 'tls' | 'plain', memory: number, migrationId: string): Promise<Run> {
  const driver = new SimDriver({ maxMemory: Math.max(memory, GiB), startMemory: 'random' });
  await driver.create({ name: 'vm', memory, dirtyRate: 0 });
  const source = driver.pages('vm').memory;
  randomFillSync(source);
  await target.prepare(memory, driver.pageSize);
  const conn = await connectPeer({
    url: which === 'tls' ? target.tlsPeerUrl : target.plainPeerUrl,
    agent: 'source',
    expectedPeer: 'target',
    secret: TLS_BENCH_SECRET,
    ...(which === 'tls' ? { tls } : {}),
    localAddress: '127.0.0.2',
    requestTimeoutMs: 60_000,
  });
  try {
    await driver.start('vm');
    let bytes = 0;
    const run = await timed(target, memory, async () => {
      const r = await preCopy({ migrationId, vm: 'vm', driver, paths: [{ name: 'p0', conn }], downtimeLimitMs: 300, stopVm: () => driver.stop('vm'), cpuState: () => new Uint8Array(4 * KiB).fill(3) });
      bytes = r.bytes;
    });
    const got = await target.digest(which);
    const want = createHash('sha256').update(source).digest('hex');
    if (!got.finalReceived || got.sha256 !== want) throw new Error(`tls bench: memory differs at the target over ${which} (sha256 ${got.sha256} vs ${want})`);
    return { ...run, bytesPerSec: (run.bytesPerSec * bytes) / memory };
  } finally {
    await driver.close();
    await conn.close();
  }
}

/** A cluster CA and two agent certificates in a fresh temp folder. */
export async function makeCerts(dir: string): Promise<{ source: PeerTlsFiles; target: PeerTlsFiles }> {
  mkdirSync(dir, { recursive: true });
  const ca = await createClusterCa();
  writeFileSync(join(dir, CA_CERT_FILE), ca.certPem);
  const files = async (name: string): Promise<PeerTlsFiles> => {
    const pair = await issueAgentCertificate(ca, { name, ips: ['127.0.0.1'] });
    const f = { ca: join(dir, CA_CERT_FILE), cert: join(dir, `${name}.crt`), key: join(dir, `${name}.key`) };
    writeFileSync(f.cert, pair.certPem);
    writeFileSync(f.key, pair.keyPem, { mode: 0o600 });
    return f;
  };
  return { source: await files('source'), target: await files('target') };
}

const mb = (bytesPerSecond: number): number => bytesPerSecond / 1e6;

function rateRow(name: string, value: Run, limitName: string, limit: Run): BenchRow {
  return { name, value: mb(value.bytesPerSec), unit: 'MB/s', limitName, limit: mb(limit.bytesPerSec), ratio: value.bytesPerSec / limit.bytesPerSec };
}

function cpuRow(name: string, value: Run, limitName: string, limit: Run): BenchRow {
  return { name, value: value.cpuPerMiB, unit: 'µs/MiB', limitName, limit: limit.cpuPerMiB, ratio: limit.cpuPerMiB / value.cpuPerMiB };
}

/**
 * Runs every measurement (best of alternating runs: the machine is shared) and returns the table.
 *
 * @example
 * ```ts
 * console.log(renderTable(await run({ quick: true })));
 * ```
 */
export async function run(opts: TlsBenchOptions = {}): Promise<BenchTable> {
  const quick = opts.quick === true;
  const memory = (quick ? 64 : 256) * MiB;
  const rawTotal = 256 * MiB;
  const tries = quick ? 1 : 3;
  const dir = mkdtempSync(join(tmpdir(), 'embot-bench-tls-'));
  try {
    const certs = await makeCerts(dir);
    const tls = loadPeerTls(certs.source, 'source');
    const target = await startTlsTarget(certs.target);
    const r: Record<RawKind | 'precopyTls' | 'precopyPlain', Run> = { tls13: NONE, tls12: NONE, wss: NONE, wssReused: NONE, precopyTls: NONE, precopyPlain: NONE };
    try {
      await precopy(target, tls, 'tls', 32 * MiB, 'bench-tls-warmup'); // JIT and first allocations, both processes
      for (let i = 0; i < tries; i++) {
        r.tls13 = best(r.tls13, await rawTls(target, tls, 'tls13', rawTotal));
        r.tls12 = best(r.tls12, await rawTls(target, tls, 'tls12', rawTotal));
        r.wss = best(r.wss, await rawWss(target, tls, 'wss', rawTotal));
        r.wssReused = best(r.wssReused, await rawWss(target, tls, 'wssReused', rawTotal));
        r.precopyTls = best(r.precopyTls, await precopy(target, tls, 'tls', memory, `bench-tls-${i}`));
        r.precopyPlain = best(r.precopyPlain, await precopy(target, tls, 'plain', memory, `bench-plain-${i}`));
      }
    } finally {
      await target.close();
    }
    const rows: BenchRow[] = [
      rateRow(`cross-process: raw TLS socket throughput, ${MESSAGE_BYTES / KiB} KiB writes, mutual TLS 1.3 (LIMIT)`, r.tls13, 'itself', r.tls13),
      rateRow('cross-process: raw TLS socket throughput, same, TLS 1.2', r.tls12, 'raw TLS 1.3', r.tls13),
      rateRow(`cross-process: raw wss throughput, ${MESSAGE_BYTES / KiB} KiB messages`, r.wss, 'raw TLS 1.3', r.tls13),
      rateRow(`cross-process: raw wss throughput, ${MESSAGE_BYTES / KiB} KiB messages, read through the data path's reused buffer`, r.wssReused, 'raw wss', r.wss),
      rateRow(`cross-process: pre-copy over TLS (wss data path), 1 path, ${memory / MiB} MiB idle VM (${DEFAULT_BATCH_BYTES / MiB} MiB batches)`, r.precopyTls, 'raw TLS 1.3', r.tls13),
      rateRow('cross-process: pre-copy over TLS, same, vs raw wss', r.precopyTls, 'raw wss', r.wss),
      rateRow('cross-process: pre-copy over TLS vs the same pre-copy over plain ws (loopback only)', r.precopyTls, 'pre-copy plain ws', r.precopyPlain),
      cpuRow('cross-process: CPU per MiB moved, both ends, raw TLS 1.3', r.tls13, 'itself', r.tls13),
      cpuRow('cross-process: CPU per MiB moved, both ends, raw TLS 1.2', r.tls12, 'raw TLS 1.3', r.tls13),
      cpuRow('cross-process: CPU per MiB moved, both ends, raw wss', r.wss, 'raw TLS 1.3', r.tls13),
      cpuRow("cross-process: CPU per MiB moved, both ends, raw wss read through the data path's reused buffer", r.wssReused, 'raw wss', r.wss),
      cpuRow('cross-process: CPU per MiB moved, both ends, pre-copy over TLS', r.precopyTls, 'raw TLS 1.3', r.tls13),
      cpuRow('cross-process: CPU per MiB moved, both ends, pre-copy over TLS vs over plain ws', r.precopyTls, 'pre-copy plain ws', r.precopyPlain),
    ];
    const notes = [
      'ratios are value / limit for rates and limit / value for CPU per MiB (higher is better); every limit is measured in the same run between the same two processes (the receiving end is a child process, bench/dataplane-tls-target.ts)',
      `negotiated: ${r.tls13.cipher ?? '?'} (the agents' setting, minVersion ${MIN_TLS_VERSION}); ${r.tls12.cipher ?? '?'} for the 1.2 row. Certificates: ECDSA P-256 from a cluster CA made for the run (embot ca)`,
      `pre-copy memory is verified byte-exact (sha256 in the child) after each run; throughput counts page bytes of an idle ${memory / MiB} MiB VM filled with random bytes; raw rows move ${rawTotal / MiB} MiB after a 16 MiB warm-up`,
      "a TLS socket hands decrypted bytes over one record (at most 16 KiB) per read, so the data path's reused read buffer saves the allocation per read and the assembly copy there, not the number of reads as on plain TCP: it shows in the CPU per MiB rows rather than in throughput, which the shared machine moves more than that",
      `best of ${tries} alternating runs of each (the machine is shared by several processes; figures move by tens of percent between runs)`,
    ];
    if (quick) notes.push(`quick mode: ${memory / MiB} MiB VM, one run of each`);
    return { title: 'data path over mutual TLS (pre-copy over wss:// vs raw TLS and raw wss, loopback, receiver in a child process)', rows, notes };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  console.log(renderTable(await run({ quick: process.argv.includes('--quick') })));
}
