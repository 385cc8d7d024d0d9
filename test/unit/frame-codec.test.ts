import { Packr } from 'msgpackr';
import { describe, expect, it } from 'vitest';
import { ErrorCodes, ProtocolError } from '../../core/errors.ts';
import { thrownCode } from '../harness/expect-code.ts';
import { FRAME_KINDS, REPLY_TYPES, decodeFrame, encodeFrame, validateFrame, type Frame, type FrameType } from '../../core/wire/index.ts';

/** Encodes anything, bypassing validation, to play a misbehaving peer. */
const raw = new Packr({ useRecords: false });
const rawPack = (v: unknown): Uint8Array => raw.pack(v);

const bytes = (n: number, fill = 7): Uint8Array => new Uint8Array(n).fill(fill);
const nonce = (): Uint8Array => bytes(32, 3);

/** One well-formed sample of every frame type. */
const SAMPLES: Frame[] = [
  { type: 'Hello', protocol: 1, agent: 'a', nonce: nonce() },
  { type: 'Challenge', agent: 'b', nonce: nonce(), proof: nonce() },
  { type: 'Auth', proof: nonce() },
  { type: 'AuthOk' },
  {
    type: 'StartMigration',
    reqId: 1,
    migrationId: 'm-1',
    vm: 'vm1',
    elements: bytes(10),
    resources: { memory: 1 << 30, vcpus: 2 },
    modules: ['watchdog@1.0.0#sha256-abc', 'host-load@0.2.1#deadbeef'],
  },
  { type: 'ManagementState', reqId: 2, migrationId: 'm-1', elements: bytes(3), embots: bytes(5) },
  { type: 'ModuleRequest', reqId: 3, migrationId: 'm-1', name: 'watchdog', hash: 'sha256-abc' },
  { type: 'ManagementEventState', reqId: 4, migrationId: 'm-1', holdQueues: bytes(100) },
  { type: 'VmMemory', reqId: 5, migrationId: 'm-1', vm: 'vm1', round: 0, seq: 3, last: true, pages: bytes(4096) },
  {
    type: 'PageBatch',
    reqId: 11,
    migrationId: 'm-1',
    path: 'p0',
    round: 2,
    final: true,
    pageSize: 4096,
    indexes: bytes(8, 0),
    pages: bytes(8192),
    checksum: 0xdeadbeef,
    cpu: bytes(64),
    zeros: bytes(12, 0),
  },
  { type: 'DirtyObjects', reqId: 6, migrationId: 'm-1', round: 2, deltas: bytes(1), events: bytes(0), boot: true },
  { type: 'MigrationComplete', reqId: 7, migrationId: 'm-1', memoryBytes: 67108864 },
  { type: 'ForwardedEvents', reqId: 8, migrationId: 'm-1', events: bytes(9), handOver: true },
  { type: 'MigrationStatusQuery', reqId: 10, migrationId: 'm-1' },
  { type: 'BootIncoming', reqId: 14, migrationId: 'm-1' },
  { type: 'PathOffer', reqId: 11, migrationId: 'm-1', paths: 3 },
  { type: 'PrepareIncoming', reqId: 13, migrationId: 'm-1', vm: 'vm1', spec: { name: 'vm1', memory: 67108864, vcpus: 1, dirtyRate: 0 }, channels: 2, prewarm: true },
  { type: 'UdpHandover', reqId: 12, migrationId: 'm-1', vm: 'vm1', served: 42, packets: bytes(10) },
  { type: 'BlockFetch', reqId: 13, hashes: bytes(64) },
  { type: 'IndexUpdate', reqId: 14, body: bytes(20) },
  { type: 'IndexQuery', reqId: 15, image: 'web.img' },
  { type: 'PeerStatus', reqId: 16 },
  { type: 'ImageBuild', reqId: 16, image: 'web.img' },
  { type: 'Ping', reqId: 9, ts: 1700000000000.5 },
  { type: 'MigrationPermitted', replyTo: 1, migrationId: 'm-1' },
  { type: 'MigrationDenied', replyTo: 1, migrationId: 'm-1', reason: 'not enough memory' },
  { type: 'ManagementStateSuccess', replyTo: 2, migrationId: 'm-1' },
  { type: 'ManagementStateFailed', replyTo: 2, migrationId: 'm-1', reason: 'x' },
  { type: 'ManagedObjectInstantiationError', replyTo: 2, migrationId: 'm-1', reason: 'bad hash', object: 'watchdog@1.0.0#x' },
  { type: 'ModuleBundle', replyTo: 3, name: 'watchdog', version: '1.0.0', hash: 'sha256-abc', code: bytes(64) },
  { type: 'ManagementEventStateSuccess', replyTo: 4, migrationId: 'm-1' },
  { type: 'ManagementEventStateFailed', replyTo: 4, migrationId: 'm-1', reason: 'y' },
  { type: 'VmMemoryAck', replyTo: 5, migrationId: 'm-1', seq: 3 },
  { type: 'PageBatchAck', replyTo: 11, migrationId: 'm-1', ok: false, reason: 'bad checksum' },
  { type: 'MigrationStateSuccess', replyTo: 6, migrationId: 'm-1', round: 2 },
  { type: 'MigrationStateFailed', replyTo: 6, migrationId: 'm-1', reason: 'z', failedStep: 'bootIncoming' },
  { type: 'MigrationCompleteAck', replyTo: 7, migrationId: 'm-1' },
  { type: 'ForwardedEventsAck', replyTo: 8, migrationId: 'm-1', accepted: 5, duplicates: 4 },
  { type: 'MigrationStatus', replyTo: 10, migrationId: 'm-1', committed: true },
  { type: 'BootReady', replyTo: 14, migrationId: 'm-1', bootMs: 12.5 },
  { type: 'PathAccept', replyTo: 11, migrationId: 'm-1', canReassemble: true, cpuFree: 0.5 },
  { type: 'IncomingReady', replyTo: 13, migrationId: 'm-1', endpoint: 'tcp:127.0.0.1:45000' },
  { type: 'IncomingReady', replyTo: 13, migrationId: 'm-1', endpoint: 'tcp:127.0.0.1:45000', disks: { host: '127.0.0.1', port: 45001, exports: [{ device: 'virtio0', exportName: 'embot-mirror-virtio0' }] } },
  { type: 'UdpHandoverAck', replyTo: 12, migrationId: 'm-1', host: '127.0.0.1', port: 40000 },
  { type: 'Pong', replyTo: 9, ts: 1 },
  { type: 'BlockData', replyTo: 13, sizes: bytes(8), data: bytes(100) },
  { type: 'IndexUpdateAck', replyTo: 14, seq: 3 },
  { type: 'IndexAnswer', replyTo: 15, body: bytes(30) },
  { type: 'PeerStatusReply', replyTo: 16, name: 'b', uptimeMs: 61_000, load: 0.42, vms: 2, embots: 3, quarantined: 1, modulesWithErrors: 0, deadLetters: 4 },
  { type: 'ImageBuilt', replyTo: 16, summary: bytes(30) },
  { type: 'Abort', migrationId: 'm-1', reason: 'operator abort' },
  { type: 'Error', replyTo: 3, code: ErrorCodes.REQUEST_FAILED, message: 'no handler' },
  { type: 'Error', code: ErrorCodes.FRAME_MALFORMED, message: 'bad frame' },
];

/** Buffers (what msgpackr decodes bin into) as plain Uint8Arrays, so toEqual compares contents. */
function plain(frame: Frame): Record<string, unknown> {
  return Object.fromEntries(Object.entries(frame).map(([k, v]) => [k, v instanceof Uint8Array ? new Uint8Array(v) : v]));
}

const codeOf = (fn: () => unknown): string | undefined => thrownCode(fn, ProtocolError);

/** A value of a different msgpack type than `v`. */
function wrongKind(v: unknown): unknown {
  if (typeof v === 'string') return 12345;
  if (typeof v === 'number') return 'not-a-number';
  if (typeof v === 'boolean') return 1;
  return 'not-binary-or-map';
}

describe('frame codec: well-formed frames', () => {
  it('has a sample of every frame type', () => {
    const covered = new Set(SAMPLES.map((s) => s.type));
    expect([...covered].sort()).toEqual(Object.keys(FRAME_KINDS).sort());
  });

  it.each(SAMPLES.map((s) => [s.type, s] as const))('round-trips %s unchanged', (_type, frame) => {
    const decoded = decodeFrame(encodeFrame(frame));
    expect(plain(decoded)).toEqual(plain(frame));
    for (const [k, v] of Object.entries(frame)) if (v instanceof Uint8Array) expect((decoded as unknown as Record<string, unknown>)[k]).toBeInstanceOf(Uint8Array);
  });

  it('decodes binary fields as Uint8Array views of the received bytes (no copy)', () => {
    const payload = bytes(1 << 20, 9);
    const wire = encodeFrame({ type: 'ManagementState', reqId: 1, migrationId: 'm', elements: payload, embots: bytes(4) });
    const decoded = decodeFrame(wire);
    if (decoded.type !== 'ManagementState') throw new Error('wrong type');
    expect(decoded.elements).toBeInstanceOf(Uint8Array);
    expect(decoded.elements.byteLength).toBe(1 << 20);
    expect(decoded.elements.buffer).toBe(wire.buffer);
    expect(decoded.elements[12345]).toBe(9);
  });

  it('maps every request to its allowed reply types', () => {
    for (const [req, replies] of Object.entries(REPLY_TYPES)) {
      expect(FRAME_KINDS[req as FrameType]).toBe('request');
      for (const r of replies) expect(FRAME_KINDS[r]).toBe('reply');
    }
  });

  it('treats an optional field set to undefined as absent', () => {
    const f = decodeFrame(rawPack({ type: 'Error', replyTo: undefined, code: ErrorCodes.FRAME_MALFORMED, message: 'm' }));
    expect(f.type).toBe('Error');
  });
});

describe('frame codec: bad input', () => {
  it.each([
    ['empty', new Uint8Array(0)],
    ['reserved byte 0xc1', Uint8Array.of(0xc1)],
    ['truncated map', Uint8Array.of(0x82, 0xa4)],
    ['truncated bin', Uint8Array.of(0xc4, 0x10, 1, 2)],
    ['random garbage', Uint8Array.from({ length: 64 }, (_, i) => (i * 73 + 11) & 0xff)],
    ['an array', rawPack([1, 2, 3])],
    ['a number', rawPack(42)],
    ['a string', rawPack('Hello')],
    ['nil', rawPack(null)],
    ['a map without type', rawPack({ reqId: 1 })],
    ['a numeric type', rawPack({ type: 7 })],
  ])('refuses %s as FRAME_MALFORMED', (_name, input) => {
    expect(codeOf(() => decodeFrame(input))).toBe(ErrorCodes.FRAME_MALFORMED);
  });

  it('refuses trailing bytes after a valid frame', () => {
    const good = encodeFrame({ type: 'AuthOk' });
    const withTail = new Uint8Array(good.byteLength + 1);
    withTail.set(good);
    expect(codeOf(() => decodeFrame(withTail))).toBe(ErrorCodes.FRAME_MALFORMED);
  });

  it.each(['Bogus', 'toString', '__proto__', 'constructor', 'hello', ''])('refuses unknown type %j as FRAME_UNKNOWN_TYPE', (type) => {
    expect(codeOf(() => decodeFrame(rawPack({ type, reqId: 1 })))).toBe(ErrorCodes.FRAME_UNKNOWN_TYPE);
  });

  const fieldCases = SAMPLES.flatMap((s) =>
    Object.entries(s)
      .filter(([k]) => k !== 'type')
      .map(([k, v]) => [`${s.type}.${k}`, s, k, v] as const),
  );

  it.each(fieldCases)('refuses %s of the wrong type', (_name, sample, key, value) => {
    expect(codeOf(() => decodeFrame(rawPack({ ...sample, [key]: wrongKind(value) })))).toBe(ErrorCodes.FRAME_MALFORMED);
  });

  const optionalFields = new Set(['ManagedObjectInstantiationError.object', 'PageBatch.cpu', 'PageBatch.zeros', 'DirtyObjects.boot', 'PageBatchAck.reason', 'IncomingReady.disks', 'ForwardedEvents.handOver', 'MigrationStateFailed.failedStep', 'PrepareIncoming.prewarm', 'MigrationComplete.memoryBytes']);
  it.each(fieldCases.filter(([name]) => !optionalFields.has(name) && !name.startsWith('Error.replyTo')))(
    'refuses %s missing',
    (_name, sample, key) => {
      const copy: Record<string, unknown> = { ...sample };
      delete copy[key];
      expect(codeOf(() => decodeFrame(rawPack(copy)))).toBe(ErrorCodes.FRAME_MALFORMED);
    },
  );

  it.each(SAMPLES.map((s) => [s.type, s] as const))('refuses %s with an unknown field', (_type, sample) => {
    expect(codeOf(() => decodeFrame(rawPack({ ...sample, sneaky: 1 })))).toBe(ErrorCodes.FRAME_MALFORMED);
  });

  const start = SAMPLES.find((s) => s.type === 'StartMigration')!;
  const prepare = SAMPLES.find((s) => s.type === 'PrepareIncoming')!;
  const peerStatus = SAMPLES.find((s) => s.type === 'PeerStatusReply')!;
  it.each([
    ['negative reqId', { ...start, reqId: -1 }],
    ['fractional reqId', { ...start, reqId: 1.5 }],
    ['unsafe reqId', { ...start, reqId: 2 ** 60 }],
    ['NaN ts', { type: 'Ping', reqId: 1, ts: Number.NaN }],
    ['empty migrationId', { ...start, migrationId: '' }],
    ['migrationId with spaces', { ...start, migrationId: 'a b' }],
    ['vm with a newline', { ...start, vm: 'vm\n1' }],
    ['module ref without hash', { ...start, modules: ['watchdog@1.0.0'] }],
    ['module ref not a string', { ...start, modules: [1] }],
    ['resources with an extra key', { ...start, resources: { memory: 1, vcpus: 1, gpu: 1 } }],
    ['resources with negative memory', { ...start, resources: { memory: -1, vcpus: 1 } }],
    ['resources as an array', { ...start, resources: [1, 2] }],
    ['short nonce', { type: 'Hello', protocol: 1, agent: 'a', nonce: bytes(31) }],
    ['agent name with a slash', { type: 'Hello', protocol: 1, agent: 'a/b', nonce: nonce() }],
    ['unknown error code', { type: 'Error', code: 'EMBOT_ERR_NOPE', message: 'm' }],
    ['overlong reason', { type: 'Abort', migrationId: 'm', reason: 'x'.repeat(70_000) }],
    ['binary as an array of numbers', { type: 'Auth', proof: Array.from(nonce()) }],
    ['PrepareIncoming with 0 channels', { ...prepare, channels: 0 }],
    ['PrepareIncoming with 65 channels', { ...prepare, channels: 65 }],
    ['PrepareIncoming with fractional channels', { ...prepare, channels: 1.5 }],
    ['PrepareIncoming with prewarm as a string', { ...prepare, prewarm: 'yes' }],
    ['MigrationComplete with negative memoryBytes', { type: 'MigrationComplete', reqId: 7, migrationId: 'm-1', memoryBytes: -1 }],
    ['MigrationComplete with fractional memoryBytes', { type: 'MigrationComplete', reqId: 7, migrationId: 'm-1', memoryBytes: 1.5 }],
    ['PrepareIncoming with prewarm as a number', { ...prepare, prewarm: 1 }],
    ['PrepareIncoming with a spec without name', { ...prepare, spec: { memory: 1 } }],
    ['PrepareIncoming with an empty spec name', { ...prepare, spec: { name: '' } }],
    ['PrepareIncoming with a spec that is an array', { ...prepare, spec: ['vm1'] }],
    ['PrepareIncoming with a spec of 65 fields', { ...prepare, spec: { name: 'vm1', ...Object.fromEntries(Array.from({ length: 64 }, (_, i) => [`f${i}`, i])) } }],
    ['PeerStatus with a field', { type: 'PeerStatus', reqId: 1, name: 'b' }],
    ['PeerStatusReply with a negative load', { ...peerStatus, load: -0.1 }],
    ['PeerStatusReply with a NaN load', { ...peerStatus, load: Number.NaN }],
    ['PeerStatusReply with fractional embots', { ...peerStatus, embots: 1.5 }],
    ['PeerStatusReply with a negative dead-letter count', { ...peerStatus, deadLetters: -1 }],
    ['PeerStatusReply with a bad agent name', { ...peerStatus, name: 'a/b' }],
    ['PeerStatusReply without uptime', { ...peerStatus, uptimeMs: undefined }],
    ['PeerStatusReply with load as a string', { ...peerStatus, load: '0.5' }],
    ['MigrationStateFailed with a step name that is a sentence', { type: 'MigrationStateFailed', replyTo: 6, migrationId: 'm-1', reason: 'z', failedStep: 'boot incoming' }],
    ['MigrationStateFailed with an empty step name', { type: 'MigrationStateFailed', replyTo: 6, migrationId: 'm-1', reason: 'z', failedStep: '' }],
    ['MigrationStateFailed with an overlong step name', { type: 'MigrationStateFailed', replyTo: 6, migrationId: 'm-1', reason: 'z', failedStep: 'x'.repeat(65) }],
  ])('refuses %s as FRAME_MALFORMED', (_name, value) => {
    expect(codeOf(() => decodeFrame(rawPack(value)))).toBe(ErrorCodes.FRAME_MALFORMED);
  });

  it('refuses an oversize frame before decoding it', () => {
    // Garbage that would be FRAME_MALFORMED if it were decoded at all.
    const garbage = new Uint8Array(1025).fill(0xc1);
    expect(codeOf(() => decodeFrame(garbage, 1024))).toBe(ErrorCodes.FRAME_TOO_LARGE);
    const ok = encodeFrame({ type: 'ForwardedEvents', reqId: 1, migrationId: 'm', events: bytes(900) });
    expect(decodeFrame(ok, 1024).type).toBe('ForwardedEvents');
  });

  it('refuses to encode a frame larger than the limit', () => {
    const frame: Frame = { type: 'ForwardedEvents', reqId: 1, migrationId: 'm', events: bytes(2048) };
    expect(codeOf(() => encodeFrame(frame, 1024))).toBe(ErrorCodes.FRAME_TOO_LARGE);
  });

  it('refuses to encode a malformed frame', () => {
    const bad = { type: 'Ping', reqId: 'one', ts: 1 } as unknown as Frame;
    expect(codeOf(() => encodeFrame(bad))).toBe(ErrorCodes.FRAME_MALFORMED);
    const unknown = { type: 'Nope' } as unknown as Frame;
    expect(codeOf(() => encodeFrame(unknown))).toBe(ErrorCodes.FRAME_UNKNOWN_TYPE);
  });

  // IncomingReady.disks is where the source's QEMU dials (issue 14): only plain hosts, ports and names pass.
  it.each([
    ['not a map', 'nbd://x'],
    ['no exports', { host: '127.0.0.1', port: 1, exports: [] }],
    ['port 0', { host: '127.0.0.1', port: 0, exports: [{ device: 'virtio0', exportName: 'e' }] }],
    ['port above 65535', { host: '127.0.0.1', port: 70000, exports: [{ device: 'virtio0', exportName: 'e' }] }],
    ['a host with a path', { host: '127.0.0.1/x', port: 1, exports: [{ device: 'virtio0', exportName: 'e' }] }],
    ['an export name with a quote', { host: '127.0.0.1', port: 1, exports: [{ device: 'virtio0', exportName: 'e"x' }] }],
    ['an export without a device', { host: '127.0.0.1', port: 1, exports: [{ exportName: 'e' }] }],
  ])('refuses IncomingReady.disks that is %s as FRAME_MALFORMED, naming the field', (_name, disks) => {
    const frame = { type: 'IncomingReady', replyTo: 1, migrationId: 'm-1', endpoint: 'tcp:127.0.0.1:1', disks };
    expect(codeOf(() => validateFrame(frame))).toBe(ErrorCodes.FRAME_MALFORMED);
    expect(codeOf(() => decodeFrame(rawPack(frame)))).toBe(ErrorCodes.FRAME_MALFORMED);
    expect(() => validateFrame(frame)).toThrow('IncomingReady.disks');
  });

  it('names the offending field in the error', () => {
    try {
      validateFrame({ type: 'ManagementState', reqId: 1, migrationId: 'm', elements: 'oops', embots: bytes(1) });
      expect.unreachable();
    } catch (e) {
      expect((e as ProtocolError).message).toContain('ManagementState.elements');
      expect((e as ProtocolError).details).toMatchObject({ type: 'ManagementState', field: 'elements' });
    }
  });

  it('refuses non-plain objects passed for validation', () => {
    class Fake {
      type = 'AuthOk';
    }
    expect(codeOf(() => validateFrame(new Fake()))).toBe(ErrorCodes.FRAME_MALFORMED);
    expect(codeOf(() => validateFrame(new Map([['type', 'AuthOk']])))).toBe(ErrorCodes.FRAME_MALFORMED);
  });
});
