/**
 * Frame fuzzer (issue 11): an authenticated peer sends generated frames over the whole frame union
 * to a real in-process agent on 127.0.0.1 — well-formed ones for migrations that do not exist, that
 * belong to another peer or are in another phase, and malformed ones (wrong types, missing and
 * extra fields, oversized values, unknown types, handshake frames after the handshake). Every
 * request must be answered with a coded Error (or, for the few harmless ones, their legit reply),
 * every malformed frame must end its link with a coded Error, and afterwards the agent's state,
 * open file descriptors and timers must be what they were, and the agent must stop cleanly.
 *
 * Size and seed: EMBOT_FUZZ_RUNS (default 200, a few seconds) and EMBOT_FUZZ_SEED (default: random, printed on failure).
 */
import { afterAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { mkdtempSync, mkdirSync, readdirSync, readlinkSync, rmSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pack } from 'msgpackr';
import { startAgent, type RunningAgent } from '../../core/agent.ts';
import { validateConfig } from '../../core/config/config.ts';
import { ErrorCodes } from '../../core/errors.ts';
import { silentLogger } from '../../core/logger.ts';
import { FRAME_KINDS, loadClusterSecret, validateFrame, type Frame, type FrameType } from '../../core/wire/index.ts';
import { encodePackets } from '../../sensors/udp-relay.ts';
import { waitFor } from '../harness/agent-process.ts';
import { RawPeer, type Outcome } from '../harness/raw-peer.ts';
import { startMigration } from '../harness/migration-frames.ts';

const RUNS = Number(process.env['EMBOT_FUZZ_RUNS'] ?? 200);
const SEED = process.env['EMBOT_FUZZ_SEED'] === undefined ? randomBytes(4).readInt32LE(0) : Number(process.env['EMBOT_FUZZ_SEED']);
const KNOWN_CODES: ReadonlySet<string> = new Set(Object.values(ErrorCodes));

/** The one live migration: peer `a` moves VM `incoming` here; it waits in `permitted` for ManagementState. */
const LIVE = 'm-live';
const OWNER = 'a';

const dirs: string[] = [];
afterAll(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------------
// generators

const bin = fc.oneof(
  fc.uint8Array({ maxLength: 48 }),
  fc.constant(new Uint8Array(0)),
  fc.constant(pack({ queues: [{ events: [{ id: 'x', elementId: 'vm:web-1', type: 'T', ts: 1 }] }] })),
  fc.constant(pack([{ id: 'e1', elementId: 'vm:web-1', type: 'TICK', ts: 1, payload: {} }])),
  fc.constant(encodePackets([])),
);
const migrationId = fc.oneof(
  fc.constant(LIVE),
  fc.constant(`${LIVE}.probe`),
  fc.constant('no-such'),
  fc.stringMatching(/^[A-Za-z0-9][A-Za-z0-9_.:-]{0,24}$/),
);
const vm = fc.oneof(fc.constant('incoming'), fc.constant('web-1'), fc.constant('ghost'), fc.stringMatching(/^[A-Za-z0-9][A-Za-z0-9_.-]{0,16}$/));
const nat = fc.nat({ max: 1_000_000 });
const text = fc.string({ maxLength: 40 });
const moduleRef = fc.constant('counter@1.0.0#sha256-abc');

/** A well-formed body for every request type, without reqId; the sender numbers requests. */
const requestBodies: { readonly [K in FrameType]?: fc.Arbitrary<Record<string, unknown>> } = {
  Ping: fc.record({ type: fc.constant('Ping'), ts: fc.double({ noNaN: true, noDefaultInfinity: true }) }),
  StartMigration: fc.record({
    type: fc.constant('StartMigration'),
    migrationId,
    vm,
    elements: bin,
    resources: fc.record({ memory: nat, vcpus: fc.nat({ max: 64 }) }),
    modules: fc.array(moduleRef, { maxLength: 2 }),
  }),
  ManagementState: fc.record({ type: fc.constant('ManagementState'), migrationId, elements: bin, embots: bin }),
  ModuleRequest: fc.record({ type: fc.constant('ModuleRequest'), migrationId, name: fc.constant('counter'), hash: fc.constant('sha256-abc') }),
  ManagementEventState: fc.record({ type: fc.constant('ManagementEventState'), migrationId, holdQueues: bin }),
  VmMemory: fc.record({ type: fc.constant('VmMemory'), migrationId, vm, round: nat, seq: nat, last: fc.boolean(), pages: bin }),
  PageBatch: fc.record(
    {
      type: fc.constant('PageBatch'),
      migrationId,
      path: fc.constant('direct'),
      round: nat,
      final: fc.boolean(),
      pageSize: fc.constantFrom(0, 1, 4096),
      indexes: bin,
      pages: bin,
      checksum: nat,
      cpu: bin,
    },
    { requiredKeys: ['type', 'migrationId', 'path', 'round', 'final', 'pageSize', 'indexes', 'pages', 'checksum'] },
  ),
  DirtyObjects: fc.record({ type: fc.constant('DirtyObjects'), migrationId, round: nat, deltas: bin, events: bin }),
  MigrationComplete: fc.record({ type: fc.constant('MigrationComplete'), migrationId }),
  ForwardedEvents: fc.record({ type: fc.constant('ForwardedEvents'), migrationId, events: bin }),
  MigrationStatusQuery: fc.record({ type: fc.constant('MigrationStatusQuery'), migrationId }),
  BootIncoming: fc.record({ type: fc.constant('BootIncoming'), migrationId }),
  PathOffer: fc.record({ type: fc.constant('PathOffer'), migrationId, paths: fc.nat({ max: 16 }) }),
  PrepareIncoming: fc.record({
    type: fc.constant('PrepareIncoming'),
    migrationId,
    vm,
    spec: fc.record({ name: vm, memory: nat, vcpus: fc.nat({ max: 64 }), dirtyRate: nat }),
    channels: fc.integer({ min: 1, max: 64 }),
  }),
  UdpHandover: fc.record({ type: fc.constant('UdpHandover'), migrationId, vm, served: nat, packets: bin }),
  // Images (issue 14): hash lists of the right and wrong lengths, update bodies that are noise, image names real or not.
  BlockFetch: fc.record({ type: fc.constant('BlockFetch'), hashes: fc.oneof(bin, fc.uint8Array({ minLength: 32, maxLength: 32 }), fc.uint8Array({ minLength: 64, maxLength: 64 })) }),
  IndexUpdate: fc.record({ type: fc.constant('IndexUpdate'), body: bin }),
  IndexQuery: fc.record({ type: fc.constant('IndexQuery'), image: fc.oneof(text, fc.constant('web.img')) }),
  ImageBuild: fc.record({ type: fc.constant('ImageBuild'), image: fc.oneof(text, fc.constant('web.img'), fc.constant('../etc')) }),
  // The dashboard's cluster view (issue 15): a peer's health and load; nothing to vary but the type.
  PeerStatus: fc.record({ type: fc.constant('PeerStatus') }),
};
const REQUEST_TYPES = Object.entries(FRAME_KINDS)
  .filter(([, kind]) => kind === 'request')
  .map(([t]) => t as FrameType);

/** Frames that are not requests but well-formed: no answer is due, and nothing may change. */
const quietFrames = fc.oneof(
  fc.record({ type: fc.constant('Abort'), migrationId, reason: text }),
  fc.record({ type: fc.constant('MigrationPermitted'), replyTo: nat, migrationId }),
  fc.record({ type: fc.constant('PageBatchAck'), replyTo: nat, migrationId, ok: fc.boolean() }),
  fc.record({ type: fc.constant('Pong'), replyTo: nat, ts: nat }),
  fc.record({ type: fc.constant('Error'), replyTo: nat, code: fc.constantFrom(...KNOWN_CODES), message: text }),
  // An unsolicited IncomingReady carrying a disk export (issue 14): nobody dials it.
  fc.record({
    type: fc.constant('IncomingReady'),
    replyTo: nat,
    migrationId,
    endpoint: fc.constant('tcp:127.0.0.1:1'),
    disks: fc.record({
      host: fc.constant('127.0.0.1'),
      port: fc.integer({ min: 1, max: 65535 }),
      exports: fc.array(fc.record({ device: fc.constantFrom('virtio0', 'virtio1'), exportName: fc.constantFrom('embot-mirror-virtio0', 'x') }), { minLength: 1, maxLength: 3 }),
    }),
  }),
);

function validates(body: Record<string, unknown>): boolean {
  try {
    validateFrame({ ...body, ...(body['reqId'] === 0 ? { reqId: 1 } : {}) });
    return true;
  } catch {
    return false;
  }
}

/** Handshake frames are well-formed, but after the handshake they break the protocol. */
const HANDSHAKES: readonly Record<string, unknown>[] = [
  { type: 'Hello', protocol: 1, agent: 'x', nonce: new Uint8Array(32) },
  { type: 'Challenge', agent: 'x', nonce: new Uint8Array(32), proof: new Uint8Array(32) },
  { type: 'Auth', proof: new Uint8Array(32) },
  { type: 'AuthOk' },
];

type Mutation = 'drop' | 'extra' | 'wrongType' | 'oversize' | 'unknownType' | 'handshake' | 'notAMap' | 'garbage';

/** Wrong values for any field: strings where numbers go, maps where bytes go, and so on. */
const wrongValue = fc.oneof(fc.constant(null), fc.constant(-1), fc.constant(1.5), fc.constant('x'), fc.constant(true), fc.constant({}), fc.constant([1, 2]), fc.constant(2 ** 60));
/** Values over the validator's bounds. */
const oversized = fc.constantFrom<unknown>('r'.repeat(64 * 1024 + 1), Number.MAX_VALUE, 2 ** 53 + 2, Array.from({ length: 10_001 }, () => 'a@1#h'), 'p'.repeat(200));

interface Generated {
  readonly kind: 'request' | 'quiet' | 'malformed';
  readonly body: Record<string, unknown> | Uint8Array;
  readonly mutation?: Mutation;
}

const requestFrame: fc.Arbitrary<Generated> = fc.constantFrom(...REQUEST_TYPES).chain((t) => requestBodies[t]!.map((body) => ({ kind: 'request' as const, body })));

const malformedFrame: fc.Arbitrary<Generated> = fc
  .tuple(requestFrame, fc.constantFrom<Mutation>('drop', 'extra', 'wrongType', 'oversize', 'unknownType', 'handshake', 'notAMap', 'garbage'), fc.nat(), wrongValue, oversized)
  .map(([req, mutation, pick, wrong, big]) => {
    // reqId 0 is a placeholder the sender replaces; a mutation of it stays.
    const body: Record<string, unknown> = { ...(req.body as Record<string, unknown>), reqId: 0 };
    const fields = Object.keys(body).filter((k) => k !== 'type');
    const field = fields[pick % fields.length]!;
    switch (mutation) {
      case 'drop':
        delete body[field];
        break;
      case 'extra':
        body['sneaky'] = wrong;
        break;
      case 'wrongType':
        body[field] = wrong;
        break;
      case 'oversize':
        body[field] = big;
        break;
      case 'unknownType':
        body['type'] = 'FormatDisk';
        break;
      case 'handshake':
        return { kind: 'malformed' as const, mutation, body: HANDSHAKES[pick % HANDSHAKES.length]! };
      case 'notAMap':
        return { kind: 'malformed' as const, mutation, body: pack([body['type'], 1, 2]) };
      case 'garbage':
        return { kind: 'malformed' as const, mutation, body: new Uint8Array([0xc1, pick & 0xff, 0x00]) };
    }
    return { kind: 'malformed' as const, mutation, body };
  })
  // A mutation that leaves a valid frame (dropping an optional field, a big but finite number…) is a request like any other.
  .map((g): Generated => (g.body instanceof Uint8Array || FRAME_KINDS[g.body['type'] as FrameType] !== 'request' || !validates(g.body) ? g : { kind: 'request', body: g.body }));

const run = fc.record({
  peer: fc.constantFrom(OWNER, 'mallory'),
  frames: fc.array(fc.oneof({ arbitrary: requestFrame, weight: 5 }, { arbitrary: quietFrames.map((body) => ({ kind: 'quiet' as const, body })), weight: 1 }, { arbitrary: malformedFrame, weight: 2 }), { minLength: 1, maxLength: 8 }),
});

// ---------------------------------------------------------------------------------------------
// what is observed

interface AgentState {
  readonly vms: readonly string[];
  readonly elements: readonly string[];
  readonly embots: number;
  readonly journal: readonly string[];
  readonly events: number;
  readonly migrations: readonly string[];
}

function stateOf(agent: RunningAgent): AgentState {
  const store = agent.services.get('store');
  const rows = store.db.prepare('SELECT id, role, phase, outcome FROM migrations ORDER BY id, role').all() as { id: string; role: string; phase: string; outcome: string | null }[];
  return {
    vms: agent.control.listVms().map((v) => `${v.name}:${v.state}`),
    elements: agent.services
      .get('objects')
      .list()
      .map((e) => `${e.id}@${e.version}`)
      .sort(),
    embots: agent.control.listEmbots().length,
    journal: rows.map((r) => `${r.id}/${r.role}/${r.phase}/${r.outcome ?? '-'}`),
    events: (store.db.prepare('SELECT count(*) AS n FROM events').get() as { n: number }).n,
    migrations: agent.control.listMigrations().map((m) => `${m.id}/${m.role}/${m.phase}/${m.outcome ?? '-'}`),
  };
}

/** Handles of this process by kind (timers, sockets, servers…), and its open file descriptors. */
function resources(): { readonly handles: Readonly<Record<string, number>>; readonly fds: number } {
  const handles: Record<string, number> = {};
  for (const r of process.getActiveResourcesInfo()) handles[r] = (handles[r] ?? 0) + 1;
  // libuv opens one inotify instance per loop on the first watch (the plugin folder's) and keeps it
  // for the life of the loop: it is the process's, not something the agent failed to close.
  const fds = readdirSync('/proc/self/fd').filter((fd) => {
    try {
      return readlinkSync(`/proc/self/fd/${fd}`) !== 'anon_inode:inotify';
    } catch {
      return false; // the directory's own fd, closed once listed
    }
  }).length;
  return { handles, fds };
}

/** True when `now` holds no more of any handle kind, and no more fds, than `base`. */
function within(now: ReturnType<typeof resources>, base: ReturnType<typeof resources>): boolean {
  return now.fds <= base.fds && Object.entries(now.handles).every(([k, n]) => n <= (base.handles[k] ?? 0));
}

function isErrorReply(o: Outcome, reqId: number): boolean {
  return o.kind === 'frame' && o.frame.type === 'Error' && o.frame.replyTo === reqId && KNOWN_CODES.has(o.frame.code);
}

/** What each generated frame may get back; anything else is a finding. */
function judge(g: Generated, o: Outcome, reqId: number): string | undefined {
  const body = g.body as Record<string, unknown>;
  if (g.kind === 'malformed') {
    if (o.kind !== 'closed') return `a malformed frame (${g.mutation}) got ${JSON.stringify(o.frame).slice(0, 200)} instead of a closed link`;
    const code = o.error?.type === 'Error' ? o.error.code : undefined;
    if (code === undefined || !KNOWN_CODES.has(code) || !o.closed.reason.startsWith(code)) return `a malformed frame (${g.mutation}) closed the link without a coded Error: ${o.closed.code} ${o.closed.reason} ${JSON.stringify(o.error)}`;
    return undefined;
  }
  if (o.kind === 'closed') return `${String(body['type'])} closed the link: ${o.closed.code} ${o.closed.reason}`;
  if (isErrorReply(o, reqId)) return undefined;
  const type = o.frame.type;
  if (body['type'] === 'Ping' && type === 'Pong') return undefined;
  // Issue 15: any authenticated peer may ask an agent's health and load; it changes nothing.
  if (body['type'] === 'PeerStatus' && type === 'PeerStatusReply') return undefined;
  // Images (issue 14): a holder answers a block request with what it holds (here: none of them).
  if (body['type'] === 'BlockFetch' && type === 'BlockData' && o.frame.data.byteLength === 0) return undefined;
  // The one id a peer may find taken: the live migration's.
  if (body['type'] === 'StartMigration' && type === 'MigrationDenied' && body['migrationId'] === LIVE) return undefined;
  return `${String(body['type'])} ${JSON.stringify(body['migrationId'] ?? '')} got ${JSON.stringify(o.frame).slice(0, 300)}`;
}

/** Frames the owner of the live migration could legitimately send to move it on: not fuzzed as the owner. */
function movesLiveOn(peer: string, body: Record<string, unknown>): boolean {
  if (peer !== OWNER || body['migrationId'] !== LIVE) return false;
  // PrepareIncoming naming the live migration's VM is taken from the permit on (the early prepare):
  // it readies an incoming VM or answers why not (peer-bounds tests it); naming another VM it is still fuzzed.
  if (body['type'] === 'PrepareIncoming') return body['vm'] === 'incoming';
  return body['type'] === 'ManagementState' || body['type'] === 'MigrationStatusQuery' || body['type'] === 'Abort';
}

// ---------------------------------------------------------------------------------------------

describe('frame fuzzer', () => {
  it(`answers ${RUNS} runs of generated frames with coded errors and changes nothing (seed ${SEED})`, async () => {
    const root = mkdtempSync(join(tmpdir(), 'embot-fuzz-'));
    dirs.push(root);
    const secretFile = join(root, 'cluster.secret');
    writeFileSync(secretFile, randomBytes(32).toString('base64'));
    mkdirSync(join(root, 'plugins'));
    const before = resources();
    const agent = await startAgent(
      validateConfig({
        name: 'b',
        dataDir: join(root, 'data'),
        pluginsDir: join(root, 'plugins'),
        control: { port: 0 },
        peer: { listen: '127.0.0.1:0', secretFile },
        // The live migration waits in `permitted` for as long as the fuzzer runs.
        mobility: { stepTimeoutMs: 600_000, vmTimeoutMs: 600_000, forwardGraceMs: 5000, trust: { mode: 'any-authenticated-peer' } },
        sensors: { host: { intervalMs: 600_000 }, vm: { intervalMs: 600_000 } },
      }),
      silentLogger,
    );
    let stopped = false;
    try {
      const url = agent.peerUrl!;
      const secret = loadClusterSecret(secretFile);
      agent.control.createVm({ name: 'web-1', memory: 1 << 20 });
      const owner = await RawPeer.connect(url, OWNER, secret);
      const permitted = await owner.request(startMigration(1, LIVE, 'incoming'));
      expect(permitted).toMatchObject({ kind: 'frame', frame: { type: 'MigrationPermitted' } });
      const baseline = stateOf(agent);
      expect(baseline.migrations).toEqual([`${LIVE}/target/permitted/-`]);
      // The store checkpoints its WAL on a thread of its own once it went quiet after the setup's
      // writes; that thread stays. Wait for it, so the fuzzer's runs are what the comparison sees.
      await waitFor(() => agent.services.get('store').checkpointStats.checkpoints > 0, 15_000, 'the store checkpointed the setup');
      const settled = resources();

      let nextReq = 1000;
      const property = fc.asyncProperty(run, async ({ peer, frames }) => {
        const conn = await RawPeer.connect(url, peer, secret);
        try {
          for (const g of frames) {
            if (!(g.body instanceof Uint8Array) && movesLiveOn(peer, g.body)) continue;
            const reqId = nextReq++;
            if (g.kind === 'quiet') {
              conn.send(g.body);
              continue;
            }
            const body = g.body instanceof Uint8Array ? g.body : { ...g.body, ...(g.kind === 'request' || g.body['reqId'] === 0 ? { reqId } : {}) };
            const o = await conn.request(body, reqId);
            const finding = judge(g, o, reqId);
            if (finding) throw new Error(finding);
            if (o.kind === 'closed') return;
          }
          // Quiet frames get no answer: a Ping after them shows the link (and the agent) still serve.
          const pong = await conn.request({ type: 'Ping', reqId: nextReq++, ts: 1 });
          if (pong.kind !== 'frame' || pong.frame.type !== 'Pong') throw new Error(`no Pong after the run: ${JSON.stringify(pong).slice(0, 200)}`);
          const now = stateOf(agent);
          expect(now).toEqual(baseline);
        } finally {
          await conn.close();
        }
      });
      try {
        await fc.assert(property, { numRuns: RUNS, seed: SEED });
      } catch (e) {
        console.error(`frame fuzzer failed; replay with EMBOT_FUZZ_SEED=${SEED} EMBOT_FUZZ_RUNS=${RUNS}`);
        throw e;
      }
      expect(stateOf(agent)).toEqual(baseline);
      // Links the fuzzer opened are closed; what the agent opened for them must be gone too.
      await waitFor(() => within(resources(), settled), 15_000, `handles and fds back to ${JSON.stringify(settled)} (now ${JSON.stringify(resources())})`);

      // The migration still works as the protocol says: its source aborts it, it is discarded.
      owner.send({ type: 'Abort', migrationId: LIVE, reason: 'fuzzing done' });
      await waitFor(() => agent.control.getMigration(LIVE)?.outcome === 'aborted', 10_000, 'the live migration aborted by its source');
      await owner.close();
      await agent.stop();
      stopped = true;
      await waitFor(() => within(resources(), before), 15_000, `handles and fds back to before the agent (${JSON.stringify(before)}; now ${JSON.stringify(resources())})`);
    } finally {
      if (!stopped) await agent.stop();
    }
  }, Math.max(120_000, RUNS * 60));
});

// Keeps the frame type import honest: the generators cover every request type.
const covered: readonly Frame['type'][] = REQUEST_TYPES.filter((t) => requestBodies[t] !== undefined);
if (covered.length !== REQUEST_TYPES.length) throw new Error(`frame fuzzer: no generator for ${REQUEST_TYPES.filter((t) => !requestBodies[t]).join(', ')}`);
