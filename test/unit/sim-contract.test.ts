import { randomFillSync } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { ErrorCodes, isEmbotError } from '../../core/errors.ts';
import { PeerServer, connectPeer, type PeerConnection } from '../../core/wire/index.ts';
import { SimDriver, type HypervisorDriver, type MigrateOutOptions, type DriverMigrationProgress, type VmStateChange } from '../../effectors/index.ts';

/**
 * The sim through the hypervisor contract alone, as mobility uses it: declared capabilities, an
 * async lifecycle, and a migration from one SimDriver to another over a real authenticated data
 * path (a WebSocket on loopback), prepared, committed and aborted at the target.
 */

const SECRET = Buffer.from('sim-contract-test-secret-0123456');
const MiB = 1024 * 1024;

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function codeOf(p: Promise<unknown> | (() => unknown)): Promise<string | undefined> {
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (e) {
    expect(isEmbotError(e)).toBe(true);
    return (e as { code: string }).code;
  }
  return undefined;
}

interface Pair {
  readonly source: SimDriver;
  readonly target: SimDriver;
  readonly conn: PeerConnection;
  readonly changes: VmStateChange[];
  options(over?: Partial<MigrateOutOptions>): MigrateOutOptions;
}

/** Two sim drivers, the target's incoming pages reached through its PeerServer, the way MobilityService routes them. */
async function pair(memory = 4 * MiB, dirtyRate = 2 * MiB): Promise<Pair> {
  const source = new SimDriver({ tickMs: 10 });
  const target = new SimDriver({ tickMs: 10 });
  const server = await PeerServer.listen({ agent: 'target', secret: SECRET, listen: '127.0.0.1:0' });
  server.handle('PageBatch', (frame) => {
    const r = target.capabilities.incomingPages!.apply('vm1', frame);
    return r.ok ? { type: 'PageBatchAck', migrationId: frame.migrationId, ok: true } : { type: 'PageBatchAck', migrationId: frame.migrationId, ok: false, reason: r.reason };
  });
  const conn = await connectPeer({ url: server.url, agent: 'source', expectedPeer: 'target', secret: SECRET });
  cleanups.push(async () => {
    await source.close();
    await target.close();
    await conn.close().catch(() => {});
    await server.close();
  });
  await source.create({ name: 'vm1', memory, dirtyRate });
  randomFillSync(source.pages('vm1').memory);
  await source.start('vm1');
  const changes: VmStateChange[] = [];
  source.events.on('vm-state', (e) => changes.push(e));
  return {
    source,
    target,
    conn,
    changes,
    options: (over = {}) => ({
      endpoint: { uri: 'sim:data-paths' },
      downtimeLimitMs: 50,
      dataPaths: { migrationId: 'mig-1', paths: [{ name: 'p0', conn, capBytesPerSec: 64 * MiB }], requestTimeoutMs: 5_000 },
      ...over,
    }),
  };
}

describe('SimDriver through the hypervisor contract', () => {
  it('declares what only it can do as capabilities, and nothing it cannot', async () => {
    const d: HypervisorDriver = new SimDriver();
    cleanups.push(() => d.close());
    const c = d.capabilities;
    expect(Object.keys(c).sort()).toEqual(['coldMigration', 'fanOut', 'faults', 'incomingPages', 'loadKnob', 'memoryChecksum', 'udpService']);
    expect(c.memoryDump).toBeUndefined();
    await d.create({ name: 'web', memory: MiB, udpPort: 9123 } as { name: string });
    expect(c.udpService!.udpPort('web')).toBe(9123);
    expect(c.udpService!.udpPort('ghost')).toBeUndefined();
    await d.start('web');
    await c.loadKnob!.setLoad('web', 0.25);
    expect((await d.stats('web')).load).toBe(0.25);
    expect(await codeOf(c.loadKnob!.setLoad('web', 2))).toBe(ErrorCodes.VM_SPEC_INVALID);
    expect(await c.memoryChecksum!.checksum('web')).toMatch(/^[0-9a-f]{64}$/);
    expect(await codeOf(c.memoryChecksum!.checksum('ghost'))).toBe(ErrorCodes.VM_UNKNOWN);
    expect(await c.faults!.crash('web')).toMatchObject({ state: 'crashed', crashes: 1 });
  });

  it('runs the lifecycle asynchronously: create, start, kill (stopped, reason kill), remove; refusals reject with codes', async () => {
    const d = new SimDriver();
    cleanups.push(() => d.close());
    const seen: VmStateChange[] = [];
    d.events.on('vm-state', (e) => seen.push(e));
    const created = d.create({ name: 'a', memory: MiB });
    expect(created).toBeInstanceOf(Promise);
    expect(await created).toMatchObject({ name: 'a', state: 'created' });
    expect(d.spec('a')).toEqual({ name: 'a', memory: MiB, dirtyRate: 4 * MiB, vcpus: 1 });
    expect(await d.start('a')).toMatchObject({ state: 'running' });
    expect(await codeOf(d.remove('a'))).toBe(ErrorCodes.VM_BAD_STATE);
    expect(await d.kill('a')).toMatchObject({ state: 'stopped', crashes: 0 });
    expect(seen.at(-1)).toEqual({ name: 'a', from: 'running', to: 'stopped', reason: 'kill' });
    expect(await codeOf(d.kill('a'))).toBe(ErrorCodes.VM_BAD_STATE);
    await d.remove('a');
    expect(d.list()).toEqual([]);
    expect(await codeOf(d.start('a'))).toBe(ErrorCodes.VM_UNKNOWN);
    expect(await codeOf(d.create({ name: 'Bad Name' }))).toBe(ErrorCodes.VM_SPEC_INVALID);
    // No persisted state is "no VMs yet" for qemu; the sim refuses it as it refuses any bad state.
    expect(await codeOf(d.restoreState(undefined))).toBe(ErrorCodes.VM_SPEC_INVALID);
  });

  it('migrates a dirtying VM over a real data path: prepare, migrateOut, commit; the memory arrives byte-exact', async () => {
    const p = await pair();
    const { endpoint } = await p.target.prepareIncoming(p.source.spec('vm1')!, { channels: 1 });
    expect(endpoint.uri).toBe('sim:data-paths');
    // The incoming VM is not a VM yet: not listed, its name taken.
    expect(p.target.get('vm1')).toBeUndefined();
    expect(await codeOf(p.target.create({ name: 'vm1' }))).toBe(ErrorCodes.VM_EXISTS);
    expect(await codeOf(p.target.prepareIncoming({ name: 'vm1' }))).toBe(ErrorCodes.VM_EXISTS);
    expect(p.target.capabilities.incomingPages!.complete('vm1')).toBe(false);

    const progress: DriverMigrationProgress[] = [];
    let stateAtSwitchover: string | undefined;
    const result = await p.source.migrateOut(
      'vm1',
      p.options({
        onProgress: (x) => progress.push(x),
        beforeSwitchover: async () => {
          stateAtSwitchover = p.source.get('vm1')?.state;
        },
      }),
    );
    // beforeSwitchover came once, right before the driver stopped the VM for the last round.
    expect(stateAtSwitchover).toBe('running');
    expect(p.changes).toEqual([{ name: 'vm1', from: 'running', to: 'stopped', reason: 'migrate' }]);
    expect(result.rounds).toBeGreaterThanOrEqual(2);
    expect(result.bytes).toBeGreaterThanOrEqual(4 * MiB);
    expect(result.channels).toBe(1);
    expect(result.converged).toBe(true);
    expect(result.perPath?.map((x) => x.name)).toEqual(['p0']);
    expect(progress.length).toBeGreaterThan(0);
    expect(progress.at(-1)).toMatchObject({ phase: 'completed', remainingBytes: 0, channels: 1 });
    // What went on the wire, apart from the memory brought up to date (which counts zero pages too).
    expect(progress.at(-1)).toMatchObject({ sentBytes: result.bytes, transferredBytes: result.bytes + (result.zeroBytes ?? 0) });
    expect(p.target.capabilities.incomingPages!.complete('vm1')).toBe(true);

    const info = await p.target.commitIncoming('vm1', { running: false });
    expect(info).toMatchObject({ name: 'vm1', state: 'created', memory: 4 * MiB });
    expect(p.target.spec('vm1')).toEqual(p.source.spec('vm1'));
    expect(await p.target.capabilities.memoryChecksum!.checksum('vm1')).toBe(await p.source.capabilities.memoryChecksum!.checksum('vm1'));
    expect(await p.target.start('vm1')).toMatchObject({ state: 'running' });
  });

  it('commits a VM that ran at the source as running, in the call itself (before its first await)', async () => {
    const p = await pair(MiB, 0);
    p.source.pages('vm1').memory.fill(0); // as if never written
    await p.target.prepareIncoming(p.source.spec('vm1')!);
    const progress: DriverMigrationProgress[] = [];
    await p.source.migrateOut('vm1', p.options({ onProgress: (x) => progress.push(x) }));
    // All zero pages: brought up to date in full, none of it sent as bytes
    // (what a fan-out's loser counts as sent when it is terminated; it counted the zero pages before).
    expect(progress.at(-1)).toMatchObject({ transferredBytes: MiB, sentBytes: 0 });
    const seen: VmStateChange[] = [];
    p.target.events.on('vm-state', (e) => seen.push(e));
    const committing = p.target.commitIncoming('vm1', { running: true });
    // Synchronously there: a caller inside a store transaction has the VM (and its persisted state) in it.
    expect(p.target.get('vm1')?.state).toBe('running');
    expect(seen.map((e) => e.to)).toEqual(['created', 'running']);
    expect(await committing).toMatchObject({ state: 'running' });
  });

  it('abortIncoming throws the incoming VM away: its pages are refused, nothing commits, the name is free again', async () => {
    const p = await pair(MiB, 0);
    await p.target.prepareIncoming(p.source.spec('vm1')!);
    await p.target.abortIncoming('vm1');
    await p.target.abortIncoming('vm1'); // idempotent
    expect(p.target.capabilities.incomingPages!.apply('vm1', { type: 'PageBatch', reqId: 1, migrationId: 'mig-1', path: 'p0', round: 0, final: false, pageSize: 4096, indexes: new Uint8Array(0), pages: new Uint8Array(0), checksum: 0 })).toEqual({
      ok: false,
      reason: 'no incoming VM vm1 on this agent',
    });
    expect(await codeOf(() => p.target.commitIncoming('vm1'))).toBe(ErrorCodes.VM_UNKNOWN);
    expect(p.target.list()).toEqual([]);
    expect(await p.target.create({ name: 'vm1', memory: MiB })).toMatchObject({ state: 'created' });
  });

  it('refuses to commit before the final batch arrived (MIGRATION_FAILED), and leaves the incoming VM to abort', async () => {
    const p = await pair(MiB, 0);
    await p.target.prepareIncoming(p.source.spec('vm1')!);
    expect(await codeOf(() => p.target.commitIncoming('vm1', { running: true }))).toBe(ErrorCodes.MIGRATION_FAILED);
    expect(p.target.get('vm1')).toBeUndefined();
    await p.target.abortIncoming('vm1');
  });

  it('migrateOut without data paths is refused (EFFECTOR_ARGS_INVALID) and the VM keeps running', async () => {
    const p = await pair(MiB, 0);
    expect(await codeOf(p.source.migrateOut('vm1', { endpoint: { uri: 'tcp:127.0.0.1:1' } }))).toBe(ErrorCodes.EFFECTOR_ARGS_INVALID);
    expect(await codeOf(p.source.migrateOut('ghost', p.options()))).toBe(ErrorCodes.VM_UNKNOWN);
    expect(p.source.get('vm1')?.state).toBe('running');
  });

  it('a rejecting beforeSwitchover cancels the migration before the stop: the VM never stops', async () => {
    const p = await pair(MiB, 0);
    await p.target.prepareIncoming(p.source.spec('vm1')!);
    const refused = p.source.migrateOut('vm1', p.options({ beforeSwitchover: () => Promise.reject(new Error('hand-over refused')) }));
    await expect(refused).rejects.toThrow('hand-over refused');
    expect(p.changes).toEqual([]);
    expect(p.source.get('vm1')?.state).toBe('running');
  });

  it('a failure after the stop runs the VM again before migrateOut rejects', async () => {
    const p = await pair(MiB, 0);
    await p.target.prepareIncoming(p.source.spec('vm1')!);
    // The target throws its incoming VM away at the switch: every batch of the last round is refused.
    const failed = p.source.migrateOut('vm1', p.options({ beforeSwitchover: () => p.target.abortIncoming('vm1') }));
    expect(await codeOf(failed)).toBe(ErrorCodes.PAGE_BATCH_REJECTED);
    expect(p.changes.map((e) => [e.to, e.reason])).toEqual([
      ['stopped', 'migrate'],
      ['running', 'migration-aborted'],
    ]);
    expect(p.source.get('vm1')?.state).toBe('running');
  });

  it('an abort signal stops the migration and leaves the VM running', async () => {
    const p = await pair(8 * MiB, 8 * MiB);
    await p.target.prepareIncoming(p.source.spec('vm1')!);
    const ac = new AbortController();
    const aborted = p.source.migrateOut('vm1', p.options({ signal: ac.signal, onProgress: () => ac.abort(new Error('operator abort')) }));
    expect(await codeOf(aborted)).toBe(ErrorCodes.MIGRATION_ABORTED);
    expect(p.source.get('vm1')?.state).toBe('running');
  });
});
