import dgram from 'node:dgram';
import { afterEach, describe, expect, it } from 'vitest';
import { ErrorCodes, isEmbotError } from '../../core/errors.ts';
import { SimUdpService, parseSeq, type ServedRequest } from '../../effectors/hypervisor/sim/sim-udp-service.ts';
import { MAX_UDP_PAYLOAD, UdpRelay, decodePackets, encodePackets, type BufferedPacket, type UdpAddress, type UdpDrop } from '../../sensors/udp-relay.ts';

const closers: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of closers.splice(0).reverse()) await c();
});

async function until(cond: () => boolean, what: string, timeoutMs = 3000): Promise<void> {
  const start = Date.now();
  while (!cond()) {
    if (Date.now() - start > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

async function relay(opts: Parameters<typeof UdpRelay.start>[0] = {}): Promise<UdpRelay> {
  const r = await UdpRelay.start(opts);
  closers.push(() => r.close());
  return r;
}

async function service(opts: Parameters<typeof SimUdpService.start>[0] = {}): Promise<{ svc: SimUdpService; log: ServedRequest[] }> {
  const log: ServedRequest[] = [];
  const svc = await SimUdpService.start({ ...opts, onServe: (r) => log.push(r) });
  closers.push(() => svc.close());
  return { svc, log };
}

/** A UDP client on 127.0.0.1 that records the replies it gets. */
async function client(): Promise<{ sock: dgram.Socket; addr: UdpAddress; replies: Buffer[]; send: (to: UdpAddress, data: string | Uint8Array) => void }> {
  const sock = dgram.createSocket('udp4');
  await new Promise<void>((r) => sock.bind({ address: '127.0.0.1', port: 0 }, () => r()));
  closers.push(() => new Promise<void>((r) => sock.close(() => r())));
  const replies: Buffer[] = [];
  sock.on('message', (m) => replies.push(m));
  return { sock, addr: { host: '127.0.0.1', port: sock.address().port }, replies, send: (to, data) => sock.send(data, to.port, to.host) };
}

const seqOf = (p: BufferedPacket): number => parseSeq(p.data)!;
const req = (seq: number): string => `{"seq":${seq}}`;

function expectCode(fn: () => unknown, code: string): void {
  try {
    fn();
  } catch (e) {
    expect(isEmbotError(e)).toBe(true);
    expect((e as { code: string }).code).toBe(code);
    return;
  }
  throw new Error(`expected an error with code ${code}`);
}

function packet(over: Partial<BufferedPacket> = {}): BufferedPacket {
  return { client: { host: '127.0.0.1', port: 40000 }, data: new Uint8Array([1, 2, 3]), arrivedAt: 1_700_000_000_123.25, origin: 0xdeadbeef, number: 7, ...over };
}

describe('encodePackets / decodePackets', () => {
  it('round-trips packets in order with addresses, timestamps, numbers past 2^32 and empty payloads', () => {
    const packets = [
      packet(),
      packet({ via: { host: '127.0.0.2', port: 5001 }, number: 2 ** 40 + 5, data: new Uint8Array(0) }),
      packet({ client: { host: '10.1.2.3', port: 65535 }, data: new Uint8Array(MAX_UDP_PAYLOAD).fill(9) }),
    ];
    const back = decodePackets(encodePackets(packets));
    expect(back).toHaveLength(3);
    back.forEach((p, i) => {
      expect(p.client).toEqual(packets[i].client);
      expect(p.via).toEqual(packets[i].via);
      expect(p.arrivedAt).toBe(packets[i].arrivedAt);
      expect(p.origin).toBe(packets[i].origin);
      expect(p.number).toBe(packets[i].number);
      expect(Buffer.from(p.data).equals(Buffer.from(packets[i].data))).toBe(true);
    });
    expect(decodePackets(encodePackets([]))).toEqual([]);
  });

  it('copies payloads out of the input, so the caller may reuse its buffer', () => {
    const bytes = encodePackets([packet()]);
    const [p] = decodePackets(bytes);
    bytes.fill(0);
    expect([...p.data]).toEqual([1, 2, 3]);
  });

  const good = (): Uint8Array => encodePackets([packet(), packet({ number: 8 })]);
  const bad: [string, () => Uint8Array][] = [
    ['empty input', () => new Uint8Array(0)],
    ['wrong magic', () => Object.assign(good(), { 0: 0x00 })],
    ['unknown version', () => Object.assign(good(), { 4: 2 })],
    ['truncated packet', () => good().subarray(0, good().length - 2)],
    ['trailing bytes', () => new Uint8Array([...good(), 0])],
    [
      'count larger than the packets present',
      () => {
        const b = good();
        new DataView(b.buffer, b.byteOffset).setUint32(5, 3);
        return b;
      },
    ],
    [
      'client host that is not an IPv4 address',
      () => encodePackets([packet({ client: { host: 'evil.example', port: 1 } })]),
    ],
    ['client port 0', () => encodePackets([packet({ client: { host: '127.0.0.1', port: 0 } })])],
    ['negative arrival time', () => encodePackets([packet({ arrivedAt: -1 })])],
    ['NaN arrival time', () => encodePackets([packet({ arrivedAt: Number.NaN })])],
    ['payload over the UDP maximum', () => encodePackets([packet({ data: new Uint8Array(MAX_UDP_PAYLOAD + 1) })])],
    ['random bytes', () => new Uint8Array(Array.from({ length: 64 }, (_, i) => (i * 37 + 11) & 0xff))],
  ];
  for (const [name, make] of bad) {
    it(`rejects ${name} with EMBOT_ERR_UDP_PACKETS_DECODE`, () => {
      expectCode(() => decodePackets(make()), ErrorCodes.UDP_PACKETS_DECODE);
    });
  }

  it('rejects a non-byte-array input with a code, not a TypeError', () => {
    expectCode(() => decodePackets('EUPK' as unknown as Uint8Array), ErrorCodes.UDP_PACKETS_DECODE);
  });
});

describe('UdpRelay buffer bounds', () => {
  it('keeps the oldest packets up to the packet limit and counts and reports every drop', async () => {
    const r = await relay({ paused: true, bufferLimit: { packets: 5 } });
    const drops: UdpDrop[] = [];
    r.on('drop', (d) => drops.push(d));
    const c = await client();
    for (let i = 0; i < 8; i++) c.send(r.address, req(i));
    await until(() => r.stats().received === 8, '8 packets at the relay');
    const s = r.stats();
    expect(s.mode).toBe('buffering');
    expect(s.bufferedNow).toBe(5);
    expect(s.dropped).toBe(3);
    expect(s.droppedBy['buffer-full']).toBe(3);
    expect(drops).toHaveLength(3);
    expect(drops.every((d) => d.reason === 'buffer-full' && d.client.port === c.addr.port && d.bytes === req(5).length)).toBe(true);
    const handed = r.handOver();
    expect(handed.map(seqOf)).toEqual([0, 1, 2, 3, 4]);
    expect(handed.map((p) => p.number)).toEqual([0, 1, 2, 3, 4]);
    expect(handed.every((p) => p.client.port === c.addr.port && p.origin === r.id)).toBe(true);
    expect(handed.every((p) => p.via?.port === r.peerAddress.port)).toBe(true);
    for (let i = 1; i < handed.length; i++) expect(handed[i].arrivedAt).toBeGreaterThanOrEqual(handed[i - 1].arrivedAt);
    expect(r.stats()).toMatchObject({ bufferedNow: 0, bufferedBytesNow: 0, handedOver: 5 });
  });

  it('enforces the byte limit', async () => {
    const r = await relay({ paused: true, bufferLimit: { bytes: 100 } });
    const c = await client();
    const payload = Buffer.alloc(40, 0x61);
    for (let i = 0; i < 4; i++) c.send(r.address, payload);
    await until(() => r.stats().received === 4, '4 packets at the relay');
    expect(r.stats()).toMatchObject({ bufferedNow: 2, bufferedBytesNow: 80, dropped: 2, droppedBytes: 80 });
  });

  it('counts packets still buffered at close as dropped (closed), never silently', async () => {
    const r = await UdpRelay.start({ paused: true });
    const c = await client();
    for (let i = 0; i < 3; i++) c.send(r.address, req(i));
    await until(() => r.stats().bufferedNow === 3, '3 buffered');
    const drops: UdpDrop[] = [];
    r.on('drop', (d) => drops.push(d));
    await r.close();
    expect(r.stats()).toMatchObject({ mode: 'closed', dropped: 3, bufferedNow: 0 });
    expect(r.stats().droppedBy.closed).toBe(3);
    expect(drops).toHaveLength(3);
  });

  it('drops (counted) for too many clients and for a missing backend', async () => {
    const r = await relay({ maxClients: 1 });
    const a = await client();
    const b = await client();
    a.send(r.address, req(1));
    await until(() => r.stats().received === 1, 'first packet');
    b.send(r.address, req(2));
    await until(() => r.stats().received === 2, 'second packet');
    expect(r.stats().droppedBy['too-many-clients']).toBe(1);
    expect(r.stats().droppedBy['no-backend']).toBe(1); // client a: admitted, but nowhere to go
    expect(r.stats().dropped).toBe(2);
  });
});

describe('UdpRelay ordering', () => {
  it('forwards to the service and relays replies to the right client from the relay address', async () => {
    const { svc } = await service();
    const r = await relay({ backend: svc.address });
    const a = await client();
    const b = await client();
    a.send(r.address, req(1));
    b.send(r.address, req(2));
    await until(() => a.replies.length === 1 && b.replies.length === 1, 'a reply each');
    expect(JSON.parse(a.replies[0].toString())).toMatchObject({ seq: 1 });
    expect(JSON.parse(b.replies[0].toString())).toMatchObject({ seq: 2 });
    expect(r.stats()).toMatchObject({ forwarded: 2, replies: 2, clients: 2, dropped: 0 });
  });

  it('drains the buffer in arrival order on resume, ahead of packets that arrive while draining', async () => {
    const { svc, log } = await service();
    const r = await relay({ backend: svc.address, drainBatch: 4 });
    const c = await client();
    r.pause();
    for (let i = 0; i < 200; i++) c.send(r.address, req(i));
    await until(() => r.stats().bufferedNow === 200, '200 buffered');
    r.resume();
    for (let i = 200; i < 260; i++) c.send(r.address, req(i));
    await until(() => log.length === 260, '260 served');
    expect(log.map((x) => x.seq)).toEqual(Array.from({ length: 260 }, (_, i) => i));
    const s = r.stats();
    expect(s.delivered).toBeGreaterThanOrEqual(200);
    expect(s.maxBufferedLatencyMs).toBeGreaterThan(0);
    expect(s).toMatchObject({ dropped: 0, duplicates: 0, reordered: 0, gaps: 0, mode: 'forwarding' });
  });

  it('deliverFirst puts a hand-over ahead of packets that reached the paused target before it', async () => {
    const { svc, log } = await service();
    const target = await relay({ backend: svc.address, paused: true });
    const c = await client();
    c.send(target.address, req(100));
    await until(() => target.stats().bufferedNow === 1, 'early arrival held');
    const batch = [0, 1, 2].map((i) => packet({ client: c.addr, data: Buffer.from(req(i)), number: i, origin: 42 }));
    target.deliverFirst(decodePackets(encodePackets(batch)));
    c.send(target.address, req(101));
    await until(() => log.length === 5, '5 served');
    expect(log.map((x) => x.seq)).toEqual([0, 1, 2, 100, 101]);
    expect(target.stats()).toMatchObject({ handedIn: 3, mode: 'forwarding' });
  });

  it('deliverFirst with resume: false waits for resume()', async () => {
    const { svc, log } = await service();
    const target = await relay({ backend: svc.address, paused: true });
    const c = await client();
    target.deliverFirst([packet({ client: c.addr, data: Buffer.from(req(0)), number: 0 })], { resume: false });
    await new Promise((r) => setTimeout(r, 30));
    expect(log).toHaveLength(0);
    target.resume();
    await until(() => log.length === 1, 'served after resume');
  });

  it('delivers a repeated hand-over once and counts the duplicates; a late packet is delivered and counted', async () => {
    const { svc, log } = await service();
    const target = await relay({ backend: svc.address });
    const c = await client();
    const batch = [0, 1, 2, 3].map((i) => packet({ client: c.addr, data: Buffer.from(req(i)), number: i, origin: 7 }));
    target.deliverFirst(batch);
    target.deliverFirst(batch);
    target.deliverFirst([packet({ client: c.addr, data: Buffer.from(req(6)), number: 6, origin: 7 })]);
    target.deliverFirst([packet({ client: c.addr, data: Buffer.from(req(5)), number: 5, origin: 7 })]);
    await until(() => log.length === 6, '6 served');
    await target.whenDrained();
    expect(log.map((x) => x.seq)).toEqual([0, 1, 2, 3, 6, 5]);
    expect(target.stats()).toMatchObject({ duplicates: 4, reordered: 1, gaps: 1 }); // 4 is still missing
  });

  it('gives a hand-over back to the source on abort: everything reaches the same service in order', async () => {
    const { svc, log } = await service();
    const r = await relay({ backend: svc.address });
    const c = await client();
    for (let i = 0; i < 5; i++) c.send(r.address, req(i));
    await until(() => log.length === 5, 'first 5 served');
    r.pause();
    await svc.halt();
    for (let i = 5; i < 20; i++) c.send(r.address, req(i));
    await until(() => r.stats().bufferedNow === 15, '15 buffered');
    const handed = decodePackets(encodePackets(r.handOver()));
    for (let i = 20; i < 25; i++) c.send(r.address, req(i));
    await until(() => r.stats().bufferedNow === 5, '5 more buffered after the hand-over');
    // migration aborted: the VM resumes at the source, the hand-over comes back first
    svc.resume();
    r.deliverFirst(handed);
    await until(() => log.length === 25, '25 served');
    expect(log.map((x) => x.seq)).toEqual(Array.from({ length: 25 }, (_, i) => i));
    await until(() => c.replies.length === 25, 'a reply for each, straight from the relay');
    expect(svc.stats().droppedWhileHalted).toBe(0);
    expect(r.stats()).toMatchObject({ duplicates: 0, dropped: 0 });
  });
});

describe('UdpRelay re-pointing', () => {
  it('relays through the target and back, so the client hears from the one address it sends to', async () => {
    const { svc: svcA } = await service();
    const { svc: svcB } = await service();
    const a = await relay({ backend: svcA.address });
    const b = await relay({ backend: svcB.address });
    const c = await client();
    const from: number[] = [];
    c.sock.on('message', (_m, rinfo) => from.push(rinfo.port));
    a.repoint(b.peerAddress);
    c.send(a.address, req(1));
    await until(() => c.replies.length === 1, 'reply through the target');
    expect(JSON.parse(c.replies[0].toString())).toEqual({ seq: 1, served: 1 });
    expect(from).toEqual([a.address.port]);
    expect(svcA.served).toBe(0);
    expect(a.stats().mode).toBe('repointed');
  });

  it('ignores malformed peer datagrams and replies from relays it was not pointed to', async () => {
    const { svc } = await service();
    const a = await relay({ backend: svc.address });
    const c = await client();
    c.send(a.peerAddress, Buffer.from('hello'));
    c.send(a.peerAddress, Buffer.from([0xeb, 0x55, 1, 9, ...new Array(20).fill(0)])); // unknown kind
    c.send(a.peerAddress, Buffer.from([0xeb, 0x55, 1, 2, ...new Array(15).fill(0), 9, ...Buffer.from('127.0.0.1')])); // reply kind, port 0
    await until(() => a.stats().malformed === 3, '3 malformed');
    // a well-formed reply envelope from a stranger is not routed to the client
    c.send(a.address, req(1));
    await until(() => c.replies.length === 1, 'normal reply');
    const env = Buffer.concat([Buffer.from([0xeb, 0x55, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), Buffer.from([c.addr.port >> 8, c.addr.port & 0xff, 9]), Buffer.from('127.0.0.1'), Buffer.from('spoof')]);
    c.send(a.peerAddress, env);
    await until(() => a.stats().unroutable === 1, 'stranger reply refused');
    c.send(a.address, req(2));
    await until(() => c.replies.length === 2, 'still serving');
    expect(c.replies.map((m) => m.toString())).not.toContain('spoof');
  });
});

describe('UdpRelay API misuse', () => {
  it('refuses handOver unless paused, and every operation once closed', async () => {
    const r = await UdpRelay.start();
    expectCode(() => r.handOver(), ErrorCodes.UDP_RELAY_BAD_STATE);
    await r.close();
    for (const op of [() => r.pause(), () => r.resume(), () => r.handOver(), () => r.repoint({ host: '127.0.0.1', port: 9 }), () => r.deliverFirst([])]) {
      expectCode(op, ErrorCodes.UDP_RELAY_BAD_STATE);
    }
    await r.whenDrained();
  });

  it('validates addresses and options', async () => {
    const r = await relay();
    expectCode(() => r.setBackend({ host: 'localhost', port: 80 }), ErrorCodes.EFFECTOR_ARGS_INVALID);
    expectCode(() => r.repoint({ host: '127.0.0.1', port: 0 }), ErrorCodes.EFFECTOR_ARGS_INVALID);
    await expect(UdpRelay.start({ bufferLimit: { packets: 0 } })).rejects.toMatchObject({ code: ErrorCodes.EFFECTOR_ARGS_INVALID });
    await expect(UdpRelay.start({ port: r.address.port })).rejects.toMatchObject({ code: ErrorCodes.EFFECTOR_FAILED });
  });
});

describe('SimUdpService', () => {
  it('answers {seq} with {seq, served} and continues a carried-over counter', async () => {
    const { svc } = await service({ served: 41 });
    const c = await client();
    c.send(svc.address, req(7));
    await until(() => c.replies.length === 1, 'reply');
    expect(JSON.parse(c.replies[0].toString())).toEqual({ seq: 7, served: 42 });
  });

  it('answers a bad request with an error code, serves on, and does not count it', async () => {
    const { svc } = await service();
    const c = await client();
    for (const bad of ['not json', '[1]', '{"seq":-1}', '{"seq":1.5}', '{"seq":"1"}', '{}', 'null']) c.send(svc.address, bad);
    c.send(svc.address, req(1));
    await until(() => c.replies.length === 8, '8 replies');
    const replies = c.replies.map((m) => JSON.parse(m.toString()) as Record<string, unknown>);
    expect(replies.slice(0, 7).every((r) => r.error === ErrorCodes.UDP_REQUEST_INVALID)).toBe(true);
    expect(replies[7]).toEqual({ seq: 1, served: 1 });
    expect(svc.stats()).toMatchObject({ rejected: 7, served: 1 });
  });

  it('halt serves what was already queued, then drops (counted) until resume', async () => {
    const { svc, log } = await service();
    const c = await client();
    for (let i = 0; i < 50; i++) c.send(svc.address, req(i));
    await svc.halt();
    expect(log).toHaveLength(50); // queued before the halt: served, as by a VM finishing its receive queue
    expect(svc.state).toBe('halted');
    c.send(svc.address, req(50));
    await until(() => svc.stats().droppedWhileHalted === 1, 'dropped while halted');
    svc.resume();
    c.send(svc.address, req(51));
    await until(() => log.length === 51, 'served after resume');
    expect(log[50].seq).toBe(51);
  });

  it('rejects an invalid carried-over counter and operations after close', async () => {
    await expect(SimUdpService.start({ served: -1 })).rejects.toMatchObject({ code: ErrorCodes.EFFECTOR_ARGS_INVALID });
    const svc = await SimUdpService.start();
    await svc.close();
    await expect(svc.halt()).rejects.toMatchObject({ code: ErrorCodes.VM_BAD_STATE });
    expectCode(() => svc.resume(), ErrorCodes.VM_BAD_STATE);
  });
});
