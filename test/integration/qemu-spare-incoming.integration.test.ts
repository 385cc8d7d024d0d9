import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { GUEST_RANGE_START, checkGuestMemory, guestRangeEnd } from '../../effectors/hypervisor/qemu/guest/guest-image.ts';
import { QemuDriver } from '../../effectors/hypervisor/qemu/qemu-driver.ts';
import { pidAlive } from '../../effectors/hypervisor/qemu/qemu-process.ts';
import { shapeKey, type SpareEvent, type SpareShape } from '../../effectors/hypervisor/qemu/spare-incoming.ts';
import type { QemuVmSpec } from '../../effectors/hypervisor/qemu/vm-spec.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { waitFor as waitForValue } from '../harness/agent-process.ts';
import { Cluster } from '../harness/cluster.ts';
import { heartbeat, qemuAgentConfig, qemuTestFile, sparesIn } from '../harness/qemu-processes.ts';

const MiB = 1024 * 1024;
const { run, qemus } = qemuTestFile();
const cleanups = cleanupsAfterEach();

const SHAPE: SpareShape = { memory: 64 * MiB, vcpus: 1 };
const spec = (name: string, memory = 64 * MiB): QemuVmSpec => ({ name, memory, vcpus: 1, testGuest: { delayLoops: 2000 } });

/** A source driver without a spare and a target driver keeping one of {@link SHAPE}, each with its own root. */
async function hosts(): Promise<{ source: QemuDriver; target: QemuDriver; targetRoot: string; spareEvents: SpareEvent[] }> {
  const root = qemus.root();
  const source = new QemuDriver({ root: join(root, 'src'), accel: 'tcg' });
  const targetRoot = join(root, 'dst');
  const target = new QemuDriver({ root: targetRoot, accel: 'tcg', spareIncoming: SHAPE });
  cleanups.push(() => source.close());
  cleanups.push(() => target.close());
  const spareEvents: SpareEvent[] = [];
  target.spare!.onEvent((e) => spareEvents.push(e));
  await Promise.all([source.restoreState(undefined), target.restoreState(undefined)]);
  return { source, target, targetRoot, spareEvents };
}

async function migrate(source: QemuDriver, target: QemuDriver, vm: QemuVmSpec): Promise<void> {
  await source.create(vm);
  await source.start(vm.name);
  await heartbeat(source.stateDir(vm.name), 2);
  const { endpoint } = await target.prepareIncoming(vm);
  await source.migrateOut(vm.name, { endpoint, downtimeLimitMs: 300 });
  expect((await target.commitIncoming(vm.name)).state).toBe('running');
  await source.remove(vm.name);
}

async function waitFor(what: string, ok: () => boolean | Promise<boolean>, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await ok())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe.skipIf(!run)('qemu driver: the spare incoming QEMU (TCG)', () => {
  it('is no VM: kept after restore, not listed, no events, not among the VM QEMUs; killed by close', async () => {
    const root = qemus.root();
    const d = new QemuDriver({ root, accel: 'tcg', spareIncoming: SHAPE });
    cleanups.push(() => d.close());
    const seen: string[] = [];
    d.events.on('vm-state', (e) => seen.push(`state ${e.name}`));
    d.events.on('vm-event', (e) => seen.push(`event ${e.name} ${e.event}`));
    await d.restoreState(undefined);
    const pid = await d.spare!.pid();
    expect(pid).toBeGreaterThan(0);
    expect(d.list()).toEqual([]);
    expect(seen).toEqual([]);
    expect(qemus.spares()).toEqual([pid]);
    expect(qemus.live()).toEqual([]);
    await d.close();
    expect(pidAlive(pid!)).toBe(false);
    expect(qemus.spares()).toEqual([]);
    expect(readdirSync(root).filter((e) => e.startsWith('.spare-'))).toEqual([]);
  });

  it('is adopted by an incoming VM of its shape (same pid, memory intact, heartbeat at the target), refilled after the commit, and its VM is re-attached by a restarted driver', async () => {
    const { source, target, targetRoot, spareEvents } = await hosts();
    const sparePid = await target.spare!.pid();
    expect(sparePid).toBeGreaterThan(0);
    await migrate(source, target, spec('sp-1'));
    expect(target.pid('sp-1')).toBe(sparePid);
    expect(spareEvents.filter((e) => e.kind === 'adopted')).toEqual([{ kind: 'adopted', pid: sparePid, vm: 'sp-1' }]);
    // The VM's dir is its own (the spare's dir moved there), with the guest's console in it.
    await heartbeat(target.stateDir('sp-1'), 2);
    await target.pause('sp-1');
    const dump = await target.capabilities.memoryDump!.dump('sp-1', GUEST_RANGE_START, guestRangeEnd(64 * MiB) - GUEST_RANGE_START);
    expect(checkGuestMemory(dump)).toMatchObject({ ok: true });
    await target.resume('sp-1');
    // Refilled in the background with the shape just received, as a new QEMU.
    await waitFor('a new spare', async () => ((await target.spare!.pid()) ?? sparePid) !== sparePid);
    expect(qemus.spares()).toHaveLength(1);
    expect(qemus.live()).toEqual([sparePid]);

    // A restarted driver finds the adopted QEMU through its renamed dir (qemu.origin): same pid,
    // never a second QEMU. The old driver's close killed its spare (an agent stop).
    const oldSpare = (await target.spare!.pid())!;
    await target.close();
    expect(pidAlive(oldSpare)).toBe(false);
    expect(pidAlive(sparePid!)).toBe(true);
    const again = new QemuDriver({ root: targetRoot, accel: 'tcg', spareIncoming: SHAPE });
    cleanups.push(() => again.close());
    await again.restoreState(undefined);
    expect(again.get('sp-1')?.state).toBe('running');
    expect(again.pid('sp-1')).toBe(sparePid);
    expect(again.list().map((v) => v.name)).toEqual(['sp-1']);
    await heartbeat(again.stateDir('sp-1'), 1);
    const fresh = await again.spare!.pid();
    expect(fresh).toBeGreaterThan(0);
    expect(qemus.spares()).toEqual([fresh]);
    await again.stop('sp-1');
    expect(pidAlive(sparePid!)).toBe(false);
    expect(existsSync(join(targetRoot, 'sp-1'))).toBe(true);
  });

  it('is not taken by a VM of another shape (a QEMU is started for it); the spare then follows the shape last received', async () => {
    const { source, target, spareEvents } = await hosts();
    const sparePid = await target.spare!.pid();
    await migrate(source, target, spec('big-1', 96 * MiB));
    expect(target.pid('big-1')).not.toBe(sparePid);
    expect(spareEvents.some((e) => e.kind === 'adopted')).toBe(false);
    await waitFor('a spare of the 96 MiB shape', async () => target.spare!.shape !== undefined && shapeKey(target.spare!.shape) === shapeKey({ memory: 96 * MiB, vcpus: 1 }) && (await target.spare!.pid()) !== undefined);
    expect(pidAlive(sparePid!)).toBe(false);
    expect(qemus.spares()).toHaveLength(1);
  });

  it('an aborted incoming migration kills the adopted QEMU and leaves a new spare', async () => {
    const { target } = await hosts();
    const sparePid = await target.spare!.pid();
    await target.prepareIncoming(spec('ab-1'));
    expect(target.pid('ab-1')).toBe(sparePid);
    await target.abortIncoming('ab-1');
    expect(pidAlive(sparePid!)).toBe(false);
    expect(target.get('ab-1')).toBeUndefined();
    await waitFor('a new spare', async () => (await target.spare!.pid()) !== undefined);
    expect(qemus.live()).toEqual([]);
    expect(qemus.spares()).toHaveLength(1);
  });

  it('an agent --driver qemu keeps one spare by default (qemu.spareIncoming), lists no VM for it, and kills it when it stops; spareIncoming: false keeps none', async () => {
    const root = qemus.root();
    const cluster = await Cluster.start(['s', 'n'], { config: (n) => ({ ...qemuAgentConfig(root, n), ...(n === 'n' ? { qemu: { ...qemuAgentConfig(root, n).qemu, spareIncoming: false } } : {}) }) });
    cleanups.push(() => cluster.stop());
    const pid = await waitForValue(() => sparesIn(join(root, 's'))[0], 30_000, "s's spare");
    expect(await cluster.agent('s').client.listVms()).toEqual([]);
    expect(sparesIn(join(root, 'n'))).toEqual([]);
    // SIGTERM: the agent's orderly stop closes its driver.
    expect(await cluster.agent('s').stop()).toBe(0);
    expect(pidAlive(pid)).toBe(false);
    expect(qemus.spares()).toEqual([]);
  }, 60_000);

  it('two incoming VMs of the same shape at once: one takes the spare, the other starts its own QEMU', async () => {
    const { target } = await hosts();
    const sparePid = await target.spare!.pid();
    await Promise.all([target.prepareIncoming(spec('two-1')), target.prepareIncoming(spec('two-2'))]);
    const pids = [target.pid('two-1'), target.pid('two-2')];
    expect(pids.filter((p) => p === sparePid)).toHaveLength(1);
    expect(new Set(pids).size).toBe(2);
    await Promise.all([target.abortIncoming('two-1'), target.abortIncoming('two-2')]);
    expect(qemus.live()).toEqual([]);
  });
});
