/**
 * UDP during the offline phase of a migration (issue 4, seed 002), over real UDP sockets on
 * 127.0.0.1: clients → relay A → service A; mid-stream the VM migrates exactly as the agent does it
 * (A.pause, service halt, stop-and-copy, target service + relay, hand-over bytes, deliverFirst,
 * repoint) and the counter service carries on at the target.
 *
 * The client paces at a steady rate and keeps at most WINDOW requests unanswered. The window is what
 * keeps the kernel's socket buffers from overflowing when this shared 2-core machine starves the
 * process (a catch-up burst would otherwise be dropped by the kernel, which is not the relay's loss);
 * it is far above what one offline phase buffers, so the relay still sees the full stream.
 */
import dgram from 'node:dgram';
import { afterEach, describe, expect, it } from 'vitest';
import { SimUdpService, type ServedRequest } from '../../effectors/hypervisor/sim/sim-udp-service.ts';
import { UdpRelay, decodePackets, encodePackets, type UdpAddress } from '../../sensors/udp-relay.ts';

const WINDOW = 4096;
const OFFLINE_MS = 50;
const RATE = 20_000;

const closers: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of closers.splice(0).reverse()) await c();
});

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function startService(served: number, log: ServedRequest[]): Promise<SimUdpService> {
  const svc = await SimUdpService.start({ served, onServe: (r) => log.push(r) });
  closers.push(() => svc.close());
  return svc;
}

async function startRelay(opts: Parameters<typeof UdpRelay.start>[0]): Promise<UdpRelay> {
  const r = await UdpRelay.start(opts);
  closers.push(() => r.close());
  return r;
}

interface ClientResult {
  readonly port: number;
  /** served counter in the reply for each seq; -1 = no reply. */
  readonly served: Int32Array;
  readonly rttMs: Float64Array;
  readonly replies: number;
  readonly duplicates: number;
  readonly reordered: number;
  readonly foreignSources: number;
}

/**
 * Sends seq base..base+count-1 to `to` at `rate`/s (steady, at most WINDOW unanswered, at most 256 per
 * turn), calls `at(sent)` after each turn, and resolves when every reply came or nothing arrived for `quietMs`.
 */
async function pacedClient(to: UdpAddress, count: number, rate: number, at?: (sent: number) => void, base = 0, quietMs = 3000): Promise<ClientResult> {
  const sock = dgram.createSocket({ type: 'udp4', recvBufferSize: 4 * 1024 * 1024 });
  await new Promise<void>((r) => sock.bind({ address: '127.0.0.1', port: 0 }, () => r()));
  closers.push(() => new Promise<void>((r) => sock.close(() => r())));
  const served = new Int32Array(count).fill(-1);
  const sentAt = new Float64Array(count);
  const rttMs = new Float64Array(count).fill(-1);
  let replies = 0;
  let duplicates = 0;
  let reordered = 0;
  let foreignSources = 0;
  let highest = -1;
  let lastReplyAt = performance.now();
  sock.on('message', (m, rinfo) => {
    lastReplyAt = performance.now();
    if (rinfo.port !== to.port) foreignSources++;
    const reply = JSON.parse(m.toString()) as { seq: number; served: number };
    const seq = reply.seq - base;
    const n = reply.served;
    if (served[seq] !== -1) {
      duplicates++;
      return;
    }
    served[seq] = n;
    rttMs[seq] = lastReplyAt - sentAt[seq];
    replies++;
    if (seq < highest) reordered++;
    else highest = seq;
  });
  const start = performance.now();
  let sent = 0;
  await new Promise<void>((resolve) => {
    const turn = (): void => {
      const due = Math.min(count, Math.floor(((performance.now() - start) / 1000) * rate));
      let burst = 0;
      while (sent < due && sent - replies < WINDOW && burst++ < 256) {
        sentAt[sent] = performance.now();
        sock.send(`{"seq":${base + sent}}`, to.port, to.host);
        sent++;
      }
      at?.(sent);
      const quiet = performance.now() - lastReplyAt > quietMs;
      if (replies + duplicates >= count || quiet) resolve();
      else setImmediate(turn);
    };
    turn();
  });
  return { port: sock.address().port, served, rttMs, replies, duplicates, reordered, foreignSources };
}

/** One migration of the VM's UDP service, the way the agent drives it. */
async function migrate(source: { relay: UdpRelay; svc: SimUdpService }, log: ServedRequest[]): Promise<{ relay: UdpRelay; svc: SimUdpService; handed: number }> {
  source.relay.pause(); // VM going offline: the relay buffers from here on
  await source.svc.halt(); // the VM is told to halt UDP processing
  await sleep(OFFLINE_MS); // stop-and-copy of the rest of memory and the CPU state
  const svc = await startService(source.svc.served, log); // the counter is VM state: it moves
  const relay = await startRelay({ backend: svc.address, paused: true });
  const handedOver = source.relay.handOver();
  const bytes = encodePackets(handedOver); // shipped in a peer frame by the agent
  relay.deliverFirst(decodePackets(bytes));
  source.relay.repoint(relay.peerAddress);
  return { relay, svc, handed: handedOver.length };
}

/** The seqs base..base+count-1 in `log`: each exactly once, in order. */
function expectExactlyOnceInOrder(log: readonly ServedRequest[], count: number, base = 0): void {
  let lost = 0;
  let reordered = 0;
  let duplicated = 0;
  const seen = new Uint8Array(count);
  let highest = -1;
  for (const { seq: s } of log) {
    const seq = s - base;
    if (seq < 0 || seq >= count) continue;
    if (seen[seq]) duplicated++;
    seen[seq] = 1;
    if (seq < highest) reordered++;
    highest = Math.max(highest, seq);
  }
  for (let i = 0; i < count; i++) if (!seen[i]) lost++;
  expect({ lost, reordered, duplicated }).toEqual({ lost: 0, reordered: 0, duplicated: 0 });
}

describe('UDP relay through a live migration', () => {
  it('100,000 sequence-numbered packets: zero lost, zero reordered, zero duplicated; buffered latency measured', async () => {
    const N = 100_000;
    const log: ServedRequest[] = [];
    const svcA = await startService(0, log);
    const relayA = await startRelay({ backend: svcA.address });
    let target: Promise<{ relay: UdpRelay; svc: SimUdpService; handed: number }> | undefined;
    const result = await pacedClient(relayA.address, N, RATE, (sent) => {
      if (!target && sent >= N / 2) target = migrate({ relay: relayA, svc: svcA }, log);
    });
    expect(target).toBeDefined();
    const { relay: relayB, svc: svcB, handed } = await target!;

    // What the services served: every seq once, in order, and the counter carried on at the target.
    expectExactlyOnceInOrder(log, N);
    expect(log.map((r) => r.served)).toEqual(Array.from({ length: N }, (_, i) => i + 1));
    expect(svcA.served).toBeGreaterThan(0);
    expect(svcB.served).toBe(N);
    expect(svcA.stats().droppedWhileHalted).toBe(0); // nothing reached the halted VM: the relay held it

    // What the client got: one reply per seq, in order, always from the address it sends to.
    expect(result).toMatchObject({ replies: N, duplicates: 0, reordered: 0, foreignSources: 0 });
    for (let i = 0; i < N; i++) if (result.served[i] !== i + 1) throw new Error(`reply for seq ${i} says served ${result.served[i]}`);

    // The relays: the offline phase was really buffered and handed over; nothing dropped, duplicated or missing.
    const a = relayA.stats();
    const b = relayB.stats();
    expect(handed).toBeGreaterThan(0);
    expect(a).toMatchObject({ mode: 'repointed', received: N, dropped: 0, handedOver: handed });
    expect(a.buffered).toBeGreaterThanOrEqual(handed);
    expect(b).toMatchObject({ mode: 'forwarding', handedIn: handed, dropped: 0, duplicates: 0, reordered: 0, gaps: 0, malformed: 0, unroutable: 0 });
    expect(b.delivered).toBeGreaterThanOrEqual(handed);

    // Added latency of buffered packets: the first of them waited out the whole offline phase.
    const relayMax = Math.max(a.maxBufferedLatencyMs, b.maxBufferedLatencyMs);
    expect(relayMax).toBeGreaterThanOrEqual(OFFLINE_MS);
    const rtts = Array.from(result.rttMs).sort((x, y) => x - y);
    const median = rtts[Math.floor(N / 2)];
    expect(rtts[N - 1]).toBeGreaterThanOrEqual(OFFLINE_MS);
    console.info(
      `udp migration: ${handed} packets handed over; max added latency at the relays ${relayMax.toFixed(1)} ms ` +
        `(mean ${b.meanBufferedLatencyMs.toFixed(1)} ms); client RTT median ${median.toFixed(2)} ms, max ${rtts[N - 1].toFixed(1)} ms (added ${(rtts[N - 1] - median).toFixed(1)} ms)`,
    );
  }, 60_000);

  it('chains two migrations (A → B → C) for three clients; replies come back hop by hop to the one address', async () => {
    const PER_CLIENT = 3000;
    const log: ServedRequest[] = [];
    const svcA = await startService(0, log);
    const relayA = await startRelay({ backend: svcA.address });
    let first: Promise<{ relay: UdpRelay; svc: SimUdpService; handed: number }> | undefined;
    let second: Promise<{ relay: UdpRelay; svc: SimUdpService; handed: number }> | undefined;
    const progress = [0, 0, 0];
    const step = (i: number) => (sent: number): void => {
      progress[i] = sent;
      const total = progress[0] + progress[1] + progress[2];
      if (!first && total >= PER_CLIENT) first = migrate({ relay: relayA, svc: svcA }, log);
      if (first && !second && total >= 2 * PER_CLIENT) second = first.then((b) => migrate(b, log));
    };
    const BASE = 1_000_000; // client i sends seqs i·BASE … i·BASE + PER_CLIENT − 1
    const results = await Promise.all([0, 1, 2].map((i) => pacedClient(relayA.address, PER_CLIENT, 4000, step(i), i * BASE)));
    const b = await first!;
    const c = await second!;

    for (const r of results) expect(r).toMatchObject({ replies: PER_CLIENT, duplicates: 0, reordered: 0, foreignSources: 0 });
    expect(log).toHaveLength(3 * PER_CLIENT);
    // Per client (UDP orders nothing across clients): every seq once, in order, over three hosts.
    for (let i = 0; i < 3; i++) expectExactlyOnceInOrder(log, PER_CLIENT, i * BASE);
    expect(log.map((x) => x.served)).toEqual(Array.from({ length: 3 * PER_CLIENT }, (_, i) => i + 1));
    expect(c.svc.served).toBe(3 * PER_CLIENT);
    for (const s of [relayA.stats(), b.relay.stats(), c.relay.stats()]) expect(s).toMatchObject({ dropped: 0, duplicates: 0, gaps: 0, unroutable: 0 });
    expect(b.relay.stats().mode).toBe('repointed');
    expect(c.relay.stats().handedIn).toBe(c.handed);
  }, 60_000);
});
