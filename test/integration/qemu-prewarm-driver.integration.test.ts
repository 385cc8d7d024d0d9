/**
 * A pre-warm's hold with the qemu driver (issue 13 point 4, qemu-prewarm.ts): one source driver,
 * two target drivers, the one QEMU stream through the relay, held by QEMU's own parameters until
 * the gate lifts. Real QEMU (TCG), the dirty guest.
 */
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../core/errors.ts';
import type { MigrationProgress } from '../../effectors/hypervisor/hypervisor-contract.ts';
import { PrewarmGate } from '../../effectors/hypervisor/prewarm-gate.ts';
import { GUEST_RANGE_START, checkGuestMemory, guestRangeEnd } from '../../effectors/hypervisor/qemu/guest/guest-image.ts';
import { QemuDriver } from '../../effectors/hypervisor/qemu/qemu-driver.ts';
import type { QemuVmSpec } from '../../effectors/hypervisor/qemu/vm-spec.ts';
import { waitFor } from '../harness/agent-process.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { rejection } from '../harness/expect-code.ts';
import { heartbeat, qemuProcesses, requireQemu, serialBytes } from '../harness/qemu-processes.ts';

const MiB = 1024 * 1024;
const run = requireQemu();
const qemus = qemuProcesses();
const cleanups = cleanupsAfterEach();
afterEach(() => qemus.killAll());

function drivers(): { a: QemuDriver; b: QemuDriver; c: QemuDriver } {
  const root = qemus.root();
  const make = (n: string): QemuDriver => {
    const d = new QemuDriver({ root: join(root, n), accel: 'tcg' });
    cleanups.push(() => d.close());
    return d;
  };
  return { a: make('a'), b: make('b'), c: make('c') };
}

async function warmFromRunningA(spec: QemuVmSpec, beats = 2) {
  const { a, b, c } = drivers();
  await a.create(spec);
  await a.start(spec.name);
  if (beats > 0) await heartbeat(a.stateDir(spec.name), beats);
  const [eb, ec] = await Promise.all([b.prepareIncoming(spec), c.prepareIncoming(spec)]);
  const session = a.capabilities.fanOut!.begin(spec.name, ['b', 'c']);
  return { a, b, c, eb, ec, session };
}

describe.skipIf(!run)('qemu pre-warm: the one stream held by a downtime limit it cannot meet (TCG)', () => {
  it('held: the copy goes past the full copy and keeps re-sending while the guest runs at a; lifted: both destinations complete, the committed one runs intact', async () => {
    const spec: QemuVmSpec = { name: 'pw', memory: 64 * MiB, vcpus: 1, testGuest: { delayLoops: 2000 } };
    expect(qemuFanOutPrewarm()).toBe(true);
    const { a, b, c, eb, ec, session } = await warmFromRunningA(spec);
    const gate = new PrewarmGate();
    let last: MigrationProgress | undefined;
    let switches = 0;
    const opts = (endpoint: { uri: string }) => ({
      endpoint,
      downtimeLimitMs: 500,
      autoConverge: true,
      prewarm: gate,
      beforeSwitchover: async () => void switches++,
      onProgress: (p: MigrationProgress) => void (last = p),
    });
    let settled = false;
    const both = Promise.all([session.migrateOut('b', opts(eb.endpoint)), session.migrateOut('c', opts(ec.endpoint))]).finally(() => (settled = true));
    both.catch(() => undefined);
    // Past the full copy (64 MiB sent) and several syncs later, still held: the VM runs here.
    await waitFor(() => (last !== undefined && last.transferredBytes > 64 * MiB && last.rounds >= 5 ? true : undefined), 120_000, 'held rounds past the full copy');
    const sentAtWarm = last!.transferredBytes;
    const beat = serialBytes(a.stateDir('pw'));
    await new Promise((r) => setTimeout(r, 3000));
    expect(settled).toBe(false);
    expect(switches).toBe(0);
    expect(a.get('pw')?.state).toBe('running');
    expect(serialBytes(a.stateDir('pw'))).toBeGreaterThan(beat);
    // Dirtied pages keep going out while held; the rate reported is the full copy's, above the dirty rate.
    expect(last!.transferredBytes).toBeGreaterThan(sentAtWarm);
    expect(last!.phase).toBe('precopy');
    expect(last!.rateBytesPerSec).toBeGreaterThan(0);
    const t0 = Date.now();
    gate.lift();
    const [rb, rc] = await both;
    const liftToDone = Date.now() - t0;
    session.close();
    expect(switches).toBe(2);
    expect(rb.bytes).toBe(rc.bytes);
    expect(liftToDone).toBeLessThan(60_000);
    await Promise.all([b.capabilities.incomingBoot!.bootIncoming('pw', { timeoutMs: 30_000 }), c.capabilities.incomingBoot!.bootIncoming('pw', { timeoutMs: 30_000 })]);
    await b.abortIncoming('pw');
    await c.commitIncoming('pw', { running: true, timeoutMs: 30_000 });
    await heartbeat(c.stateDir('pw'), 2);
    expect(b.pid('pw')).toBeUndefined();
    await c.pause('pw');
    const end = guestRangeEnd(64 * MiB);
    const check = checkGuestMemory(await c.capabilities.memoryDump!.dump('pw', GUEST_RANGE_START, end - GUEST_RANGE_START));
    expect(check, JSON.stringify(check)).toMatchObject({ ok: true });
  }, 300_000);

  it('a guest that writes nothing cannot be held: the copy is cancelled before the command (holdLost), the VM runs on at a', async () => {
    // Two passes, then read-only: nothing dirtied between syncs, QEMU completes whatever the limit.
    const spec: QemuVmSpec = { name: 'quiet', memory: 64 * MiB, vcpus: 1, testGuest: { passes: 2 } };
    const { a, b, eb, ec, session } = await warmFromRunningA(spec, 0);
    await waitFor(() => (serialBytes(a.stateDir('quiet')) >= 2 ? true : undefined), 30_000, 'two passes of the quiet guest');
    const gate = new PrewarmGate();
    const opts = (endpoint: { uri: string }) => ({ endpoint, downtimeLimitMs: 500, prewarm: gate });
    const [eB, eC] = await Promise.all([rejection(session.migrateOut('b', opts(eb.endpoint))), rejection(session.migrateOut('c', opts(ec.endpoint)))]);
    session.close();
    expect(eB.code).toBe(ErrorCodes.MIGRATION_FAILED);
    expect(eC.code).toBe(ErrorCodes.MIGRATION_FAILED);
    expect([eB.details, eC.details].some((d) => (d as { reason?: string } | undefined)?.reason === 'holdLost')).toBe(true);
    await waitFor(() => (a.get('quiet')?.state === 'running' ? true : undefined), 10_000, 'the VM running at a again');
    await b.abortIncoming('quiet').catch(() => undefined);
  }, 300_000);
});

function qemuFanOutPrewarm(): boolean | undefined {
  const d = new QemuDriver({ root: join(qemus.root(), 'cap'), accel: 'tcg' });
  cleanups.push(() => d.close());
  return d.capabilities.fanOut?.prewarm;
}
