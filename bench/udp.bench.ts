/**
 * UDP relay benchmark (issue 4, seed 002), all on 127.0.0.1 in this process:
 *   (a) echo throughput through the relay vs a raw UDP echo loop measured in the same run (same client,
 *       same number of requests in flight, same payloads; the relay adds one hop each way);
 *   (b) a live migration of the VM's UDP service under a steady 20,000 packets/s stream: packets lost,
 *       reordered and duplicated (by what the services served and the client got), and the latency the
 *       offline phase adds to buffered packets, beside the length of that offline phase.
 *
 * @example
 * ```sh
 * npx tsx bench/udp.bench.ts            # alone, markdown table
 * npx tsx bench/udp.bench.ts --quick    # smaller N
 * npm run bench -- --only udp           # once bench/run.ts lists it
 * ```
 */
import dgram from 'node:dgram';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { SimUdpService, type ServedRequest } from '../effectors/hypervisor/sim/sim-udp-service.ts';
import { UdpRelay, decodePackets, encodePackets, type UdpAddress } from '../sensors/udp-relay.ts';
import { renderTable, type BenchRow, type BenchTable } from './table.ts';

const IN_FLIGHT = 64;
const WINDOW = 4096;
const RATE = 20_000;
const OFFLINE_MS = 50;
const PAYLOAD = Buffer.from('{"seq":0,"pad":"0123456789abcdef0123456789abcdef"}');

type Closer = () => Promise<void>;

async function udpSocket(closers: Closer[]): Promise<dgram.Socket> {
  const s = dgram.createSocket({ type: 'udp4', recvBufferSize: 4 * 1024 * 1024 });
  await new Promise<void>((r) => s.bind({ address: '127.0.0.1', port: 0 }, () => r()));
  closers.push(() => new Promise<void>((r) => s.close(() => r())));
  return s;
}

const addressOf = (s: dgram.Socket): UdpAddress => ({ host: '127.0.0.1', port: s.address().port });

/** A plain echo socket: the limit's server, and the relay's backend in (a). */
async function rawEcho(closers: Closer[]): Promise<UdpAddress> {
  const s = await udpSocket(closers);
  s.on('message', (m, r) => s.send(m, r.port, r.address));
  return addressOf(s);
}

/** Closed-loop echo client: keeps IN_FLIGHT requests outstanding until `count` replies; packets/s. */
async function echoRate(to: UdpAddress, count: number, closers: Closer[]): Promise<number> {
  const s = await udpSocket(closers);
  let sent = 0;
  let got = 0;
  const start = process.hrtime.bigint();
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`echo stalled at ${got}/${count} replies (a datagram was lost)`)), 30_000);
    s.on('message', () => {
      got++;
      if (sent < count) {
        s.send(PAYLOAD, to.port, to.host);
        sent++;
      }
      if (got === count) {
        clearTimeout(timer);
        resolve();
      }
    });
    for (; sent < Math.min(IN_FLIGHT, count); sent++) s.send(PAYLOAD, to.port, to.host);
  });
  return count / (Number(process.hrtime.bigint() - start) / 1e9);
}

export interface UdpMigrationResult {
  readonly sent: number;
  readonly lost: number;
  readonly reordered: number;
  readonly duplicated: number;
  readonly handedOver: number;
  /** Pause → repoint, ms: how long the VM's UDP service was offline. */
  readonly offlineMs: number;
  /** Largest arrival-to-delivery time over buffered packets, at the relays. */
  readonly maxRelayLatencyMs: number;
  /** Client view: max RTT − median RTT. */
  readonly maxClientAddedMs: number;
  readonly medianRttMs: number;
  readonly relayDropped: number;
}

/** N sequence-numbered packets at RATE/s through relay A → service A, migrating to B halfway. */
export async function runUdpMigration(count: number): Promise<UdpMigrationResult> {
  const closers: Closer[] = [];
  try {
    const log: ServedRequest[] = [];
    const service = async (served: number): Promise<SimUdpService> => {
      const svc = await SimUdpService.start({ served, onServe: (r) => log.push(r) });
      closers.push(() => svc.close());
      return svc;
    };
    const relay = async (opts: Parameters<typeof UdpRelay.start>[0]): Promise<UdpRelay> => {
      const r = await UdpRelay.start(opts);
      closers.push(() => r.close());
      return r;
    };
    const svcA = await service(0);
    const relayA = await relay({ backend: svcA.address });
    let relayB: UdpRelay | undefined;
    let offlineMs = 0;
    let handedOver = 0;
    const migrate = async (): Promise<void> => {
      const t0 = performance.now();
      relayA.pause();
      await svcA.halt();
      await new Promise((r) => setTimeout(r, OFFLINE_MS)); // stop-and-copy
      const svcB = await service(svcA.served);
      relayB = await relay({ backend: svcB.address, paused: true });
      const handed = relayA.handOver();
      handedOver = handed.length;
      relayB.deliverFirst(decodePackets(encodePackets(handed)));
      relayA.repoint(relayB.peerAddress);
      offlineMs = performance.now() - t0;
    };

    const client = await udpSocket(closers);
    const to = relayA.address;
    const sentAt = new Float64Array(count);
    const rtt = new Float64Array(count).fill(-1);
    let replies = 0;
    let clientDup = 0;
    let clientReorder = 0;
    let highest = -1;
    let lastReply = performance.now();
    client.on('message', (m) => {
      lastReply = performance.now();
      const seq = (JSON.parse(m.toString()) as { seq: number }).seq;
      if (rtt[seq] >= 0) return void clientDup++;
      rtt[seq] = lastReply - sentAt[seq];
      replies++;
      if (seq < highest) clientReorder++;
      else highest = seq;
    });
    let migration: Promise<void> | undefined;
    let sent = 0;
    const start = performance.now();
    await new Promise<void>((resolve) => {
      const turn = (): void => {
        const due = Math.min(count, Math.floor(((performance.now() - start) / 1000) * RATE));
        let burst = 0;
        // The window keeps kernel socket buffers from overflowing if the process is starved.
        while (sent < due && sent - replies < WINDOW && burst++ < 256) {
          sentAt[sent] = performance.now();
          client.send(`{"seq":${sent}}`, to.port, to.host);
          sent++;
        }
        if (!migration && sent >= count / 2) migration = migrate();
        if (replies >= count || performance.now() - lastReply > 3000) resolve();
        else setImmediate(turn);
      };
      turn();
    });
    await migration;

    const seen = new Uint8Array(count);
    let served = 0;
    let reordered = 0;
    let duplicated = 0;
    let top = -1;
    for (const r of log) {
      if (seen[r.seq]) duplicated++;
      else served++;
      seen[r.seq] = 1;
      if (r.seq < top) reordered++;
      top = Math.max(top, r.seq);
    }
    const rtts = Array.from(rtt).filter((x) => x >= 0).sort((a, b) => a - b);
    const median = rtts[Math.floor(rtts.length / 2)] ?? 0;
    const a = relayA.stats();
    const b = relayB?.stats();
    return {
      sent: count,
      // A packet counts as lost if the service never served it or its reply never reached the client.
      lost: count - Math.min(served, replies),
      reordered: Math.max(reordered, clientReorder),
      duplicated: Math.max(duplicated, clientDup),
      handedOver,
      offlineMs,
      maxRelayLatencyMs: Math.max(a.maxBufferedLatencyMs, b?.maxBufferedLatencyMs ?? 0),
      maxClientAddedMs: (rtts[rtts.length - 1] ?? 0) - median,
      medianRttMs: median,
      relayDropped: a.dropped + (b?.dropped ?? 0),
    };
  } finally {
    for (const c of closers.reverse()) await c();
  }
}

export async function run(opts: { quick?: boolean } = {}): Promise<BenchTable> {
  const echoN = opts.quick ? 20_000 : 200_000;
  const migrateN = opts.quick ? 20_000 : 100_000;
  const rows: BenchRow[] = [];

  const closers: Closer[] = [];
  let raw: number;
  let relayed: number;
  try {
    const echo = await rawEcho(closers);
    const relay = await UdpRelay.start({ backend: echo });
    closers.push(() => relay.close());
    await echoRate(echo, 2000, closers); // warm-up
    await echoRate(relay.address, 2000, closers);
    raw = await echoRate(echo, echoN, closers);
    relayed = await echoRate(relay.address, echoN, closers);
  } finally {
    for (const c of closers.reverse()) await c();
  }
  rows.push({
    name: `echo through the relay (${IN_FLIGHT} in flight, ${PAYLOAD.length} B)`,
    value: relayed,
    unit: 'pkt/s',
    limitName: 'raw UDP echo loop',
    limit: raw,
    ratio: relayed / raw,
  });

  const m = await runUdpMigration(migrateN);
  const label = `${migrateN.toLocaleString('en-US')} pkts at ${RATE.toLocaleString('en-US')}/s through a migration`;
  const countRow = (what: string, value: number): BenchRow => ({
    name: `${what} (${label})`,
    value,
    unit: 'pkts',
    limitName: 'sent',
    limit: m.sent,
    ratio: (m.sent - value) / m.sent,
    target: '0',
    met: value === 0,
  });
  rows.push(countRow('packets lost', m.lost), countRow('packets reordered', m.reordered), countRow('packets duplicated', m.duplicated));
  rows.push({
    name: `max added latency of buffered packets, at the relays (${m.handedOver} handed over)`,
    value: m.maxRelayLatencyMs,
    unit: 'ms',
    limitName: 'offline phase (pause → repoint)',
    limit: m.offlineMs,
    ratio: m.offlineMs / m.maxRelayLatencyMs,
  });
  rows.push({
    name: 'max added latency seen by the client (max RTT − median RTT)',
    value: m.maxClientAddedMs,
    unit: 'ms',
    limitName: 'offline phase (pause → repoint)',
    limit: m.offlineMs,
    ratio: m.offlineMs / m.maxClientAddedMs,
  });
  return {
    title: 'UDP relay: throughput, and UDP through a live migration (seed 002)',
    rows,
    notes: [
      'Ratios: throughput = relay / raw (higher is better); counts = delivered fraction; latency = offline phase / added latency (1 means the buffered packets waited only for the offline phase).',
      'The relay is a second hop each way (8 socket operations per round trip instead of 4), so ~0.5 of the raw echo loop is its ceiling in one process.',
      `The offline phase includes a ${OFFLINE_MS} ms stand-in for stop-and-copy. Client RTT median ${m.medianRttMs.toFixed(2)} ms; packets dropped by the relays: ${m.relayDropped}.`,
      `The client paces at ${RATE.toLocaleString('en-US')}/s with at most ${WINDOW} unanswered, so a starved process cannot overflow kernel socket buffers.`,
    ],
  };
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) {
  const table = await run({ quick: process.argv.includes('--quick') });
  process.stdout.write(`${renderTable(table)}\n`);
  process.exit(0);
}
