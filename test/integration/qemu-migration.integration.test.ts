import { join } from 'node:path';
import { rejection } from '../harness/expect-code.ts';
import { describe, expect, it } from 'vitest';
import { EffectorError, ErrorCodes } from '../../core/errors.ts';
import type { MigrationProgress, VmStateChange } from '../../effectors/hypervisor/hypervisor-contract.ts';
import { GUEST_RANGE_START, checkGuestMemory, guestRangeEnd, writeGuestImage } from '../../effectors/hypervisor/qemu/guest/guest-image.ts';
import { QemuDriver, type QemuDriverOptions } from '../../effectors/hypervisor/qemu/qemu-driver.ts';
import { pidAlive } from '../../effectors/hypervisor/qemu/qemu-process.ts';
import type { QemuVmSpec } from '../../effectors/hypervisor/qemu/vm-spec.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { heartbeat, qemuTestFile, serialBytes } from '../harness/qemu-processes.ts';

const MiB = 1024 * 1024;
const { run, qemus } = qemuTestFile();
const cleanups = cleanupsAfterEach();

/** Two drivers on loopback, as a source host and a target host with roots of their own. */
function hosts(options: Partial<QemuDriverOptions> = {}): { source: QemuDriver; target: QemuDriver } {
  const root = qemus.root();
  const make = (name: string): QemuDriver => {
    const d = new QemuDriver({ root: join(root, name), accel: 'tcg', ...options });
    cleanups.push(() => d.close());
    return d;
  };
  return { source: make('src'), target: make('dst') };
}

const spec = (name: string, delayLoops: number, memory = 64 * MiB): QemuVmSpec => ({ name, memory, vcpus: 1, testGuest: { delayLoops } });

async function checkIntegrity(d: QemuDriver, vm: string, memory = 64 * MiB): Promise<void> {
  await d.pause(vm);
  const end = guestRangeEnd(memory);
  const dump = await d.capabilities.memoryDump!.dump(vm, GUEST_RANGE_START, end - GUEST_RANGE_START);
  const check = checkGuestMemory(dump);
  expect(check, JSON.stringify(check)).toMatchObject({ ok: true });
  await d.resume(vm);
}

describe.skipIf(!run)('qemu live migration between two drivers on loopback (TCG)', () => {
  it('moves a running guest: the target runs and heartbeats, memory intact, source QEMU gone; beforeSwitchover ran while paused', async () => {
    const { source, target } = hosts();
    const vm = spec('mig-1', 2000);
    await source.create(vm);
    await source.start('mig-1');
    await heartbeat(source.stateDir('mig-1'), 2);
    const sourcePid = source.pid('mig-1')!;
    const { endpoint } = await target.prepareIncoming(vm);
    expect(endpoint.uri).toMatch(/^tcp:127\.0\.0\.1:\d+$/);
    const targetPid = target.pid('mig-1')!;
    const sourceStates: VmStateChange[] = [];
    source.events.on('vm-state', (e) => sourceStates.push(e));
    const progress: MigrationProgress[] = [];
    let atSwitch: { source: string | undefined; target: string | undefined } | undefined;
    const result = await source.migrateOut('mig-1', {
      endpoint,
      downtimeLimitMs: 300,
      onProgress: (p) => progress.push(p),
      beforeSwitchover: async () => {
        atSwitch = { source: source.get('mig-1')?.state, target: target.get('mig-1')?.state };
        // The VM stays paused for as long as the hand-over needs: no heartbeat meanwhile.
        const before = serialBytes(source.stateDir('mig-1'));
        await new Promise((r) => setTimeout(r, 200));
        expect(serialBytes(source.stateDir('mig-1'))).toBe(before);
      },
    });
    expect(atSwitch).toEqual({ source: 'paused', target: 'created' });
    expect(result.bytes).toBeGreaterThan(1 * MiB);
    expect(result.rounds).toBeGreaterThanOrEqual(1);
    expect(result.channels).toBe(1);
    // The 200 ms the hand-over held the switch are part of the downtime.
    expect(result.downtimeMs).toBeGreaterThanOrEqual(200);
    expect(progress.some((p) => p.phase === 'precopy' || p.phase === 'pre-switchover')).toBe(true);
    expect(source.get('mig-1')?.state).toBe('migrated');
    expect(sourceStates.map((e) => e.to)).toEqual(['paused', 'migrated']);

    expect((await target.commitIncoming('mig-1')).state).toBe('running');
    expect(target.pid('mig-1')).toBe(targetPid);
    expect((await target.stats('mig-1')).state).toBe('running');
    await heartbeat(target.stateDir('mig-1'), 2);
    await checkIntegrity(target, 'mig-1');
    await heartbeat(target.stateDir('mig-1'), 1);

    await source.remove('mig-1');
    expect(pidAlive(sourcePid)).toBe(false);
    expect(qemus.live()).toEqual([targetPid]);
    // The target's VM is an ordinary VM now: it survives its driver and is re-attached.
    const targetRoot = join(target.stateDir('mig-1'), '..');
    await target.close();
    const again = new QemuDriver({ root: targetRoot, accel: 'tcg' });
    cleanups.push(() => again.close());
    await again.restoreState(undefined);
    expect(again.get('mig-1')?.state).toBe('running');
    expect(again.pid('mig-1')).toBe(targetPid);
  });

  it('moves a guest over 4 multifd channels', async () => {
    const { source, target } = hosts();
    const vm = spec('multi-1', 2000);
    await source.create(vm);
    await source.start('multi-1');
    await heartbeat(source.stateDir('multi-1'), 2);
    const { endpoint } = await target.prepareIncoming(vm, { channels: 4 });
    const result = await source.migrateOut('multi-1', { endpoint, channels: 4 });
    expect(result.channels).toBe(4);
    await target.commitIncoming('multi-1');
    await heartbeat(target.stateDir('multi-1'), 2);
    await checkIntegrity(target, 'multi-1');
    await source.remove('multi-1');
  });

  it('abort mid-migration: MIGRATION_ABORTED, the source keeps running, the target QEMU is gone', async () => {
    const { source, target } = hosts();
    const vm = spec('abort-1', 2000);
    await source.create(vm);
    await source.start('abort-1');
    await heartbeat(source.stateDir('abort-1'), 2);
    const { endpoint } = await target.prepareIncoming(vm);
    const targetPid = target.pid('abort-1')!;
    const controller = new AbortController();
    let switched = false;
    const e = await rejection(
      source.migrateOut('abort-1', {
        endpoint,
        // 4 MiB/s: the copy of a 64 MiB guest is far from done when the abort comes.
        maxBandwidth: 4 * MiB,
        signal: controller.signal,
        onProgress: (p) => {
          if (p.transferredBytes > 1 * MiB) controller.abort();
        },
        beforeSwitchover: async () => void (switched = true),
      }),
    );
    expect(e.code).toBe(ErrorCodes.MIGRATION_ABORTED);
    expect(switched).toBe(false);
    expect(source.get('abort-1')?.state).toBe('running');
    await heartbeat(source.stateDir('abort-1'), 2);
    await target.abortIncoming('abort-1');
    expect(pidAlive(targetPid)).toBe(false);
    expect(target.get('abort-1')).toBeUndefined();
    await checkIntegrity(source, 'abort-1');
    // The same VM can still go afterwards.
    const next = await target.prepareIncoming(vm);
    await source.migrateOut('abort-1', { endpoint: next.endpoint });
    await target.commitIncoming('abort-1');
    await heartbeat(target.stateDir('abort-1'), 1);
  });

  it('a failing hand-over at the switch cancels the migration; the source resumes', async () => {
    const { source, target } = hosts();
    const vm = spec('handover-1', 2000);
    await source.create(vm);
    await source.start('handover-1');
    await heartbeat(source.stateDir('handover-1'), 2);
    const { endpoint } = await target.prepareIncoming(vm);
    const e = await rejection(
      source.migrateOut('handover-1', {
        endpoint,
        beforeSwitchover: async () => {
          throw new EffectorError(ErrorCodes.REQUEST_FAILED, 'target refused the management state');
        },
      }),
    );
    expect(e.code).toBe(ErrorCodes.REQUEST_FAILED);
    expect(source.get('handover-1')?.state).toBe('running');
    await heartbeat(source.stateDir('handover-1'), 2);
    await target.abortIncoming('handover-1');
  });

  it('killing the target QEMU mid-migration fails the migration (MIGRATION_FAILED); the source keeps running', async () => {
    const { source, target } = hosts();
    const vm = spec('tkill-1', 2000);
    await source.create(vm);
    await source.start('tkill-1');
    await heartbeat(source.stateDir('tkill-1'), 2);
    const { endpoint } = await target.prepareIncoming(vm);
    const targetPid = target.pid('tkill-1')!;
    let killed = false;
    const e = await rejection(
      source.migrateOut('tkill-1', {
        endpoint,
        maxBandwidth: 4 * MiB,
        onProgress: (p) => {
          if (!killed && p.transferredBytes > 1 * MiB) {
            killed = true;
            process.kill(targetPid, 'SIGKILL');
          }
        },
      }),
    );
    expect(e.code).toBe(ErrorCodes.MIGRATION_FAILED);
    expect(source.get('tkill-1')?.state).toBe('running');
    await heartbeat(source.stateDir('tkill-1'), 2);
    await target.abortIncoming('tkill-1');
    expect(qemus.live()).toEqual([source.pid('tkill-1')]);
  });

  it('killing the source QEMU mid-migration fails the migration (MIGRATION_FAILED), the VM reads crashed, and abortIncoming leaves no QEMU', async () => {
    const { source, target } = hosts();
    const vm = spec('skill-1', 2000);
    await source.create(vm);
    await source.start('skill-1');
    await heartbeat(source.stateDir('skill-1'), 2);
    const { endpoint } = await target.prepareIncoming(vm);
    const sourcePid = source.pid('skill-1')!;
    const crashed = new Promise<VmStateChange>((resolve) => source.events.on('vm-state', (e) => e.to === 'crashed' && resolve(e)));
    let killed = false;
    const e = await rejection(
      source.migrateOut('skill-1', {
        endpoint,
        maxBandwidth: 4 * MiB,
        onProgress: (p) => {
          if (!killed && p.transferredBytes > 1 * MiB) {
            killed = true;
            process.kill(sourcePid, 'SIGKILL');
          }
        },
      }),
    );
    expect(e.code, e.message).toBe(ErrorCodes.MIGRATION_FAILED);
    expect(await crashed).toMatchObject({ name: 'skill-1', reason: 'process-died' });
    expect((await rejection(target.commitIncoming('skill-1', { timeoutMs: 500 }))).code).toBe(ErrorCodes.MIGRATION_FAILED);
    await target.abortIncoming('skill-1');
    expect(qemus.live()).toEqual([]);
  });

  it('the incoming VM stays paused once its memory is in until commitIncoming; a source taken back after that runs in its same QEMU', async () => {
    const { source, target } = hosts();
    // One boot image for both ends, as shared storage is: the source must still be able to lock it when it takes the VM back.
    const image = join(qemus.root(), 'shared-boot.img');
    writeGuestImage(image, { delayLoops: 2000 });
    const vm: QemuVmSpec = { name: 'held-1', memory: 64 * MiB, vcpus: 1, bootImage: image };
    await source.create(vm);
    await source.start('held-1');
    await heartbeat(source.stateDir('held-1'), 2);
    const sourcePid = source.pid('held-1')!;
    const { endpoint } = await target.prepareIncoming(vm);
    await source.migrateOut('held-1', { endpoint });
    expect(source.get('held-1')?.state).toBe('migrated');
    // QEMU's stream is complete, yet the guest runs nowhere: the target holds it paused (-S) until the commit.
    const before = serialBytes(target.stateDir('held-1'));
    await new Promise((r) => setTimeout(r, 500));
    expect(serialBytes(target.stateDir('held-1'))).toBe(before);
    expect(target.get('held-1')?.state).toBe('created');
    // The management hand-over failed after all: the source takes its VM back while the target's QEMU still holds the image open, then that goes.
    expect((await source.start('held-1')).state).toBe('running');
    await target.abortIncoming('held-1');
    expect(source.pid('held-1')).toBe(sourcePid);
    await heartbeat(source.stateDir('held-1'), 2);
    await checkIntegrity(source, 'held-1');
    expect(qemus.live()).toEqual([sourcePid]);
    // And it can still go, this time to the end.
    const next = await target.prepareIncoming(vm);
    await source.migrateOut('held-1', { endpoint: next.endpoint });
    expect((await target.commitIncoming('held-1')).state).toBe('running');
    await heartbeat(target.stateDir('held-1'), 2);
    await source.remove('held-1');
  });

  it('bootIncoming (issue 13): waits for the stream, answers when it completed, the VM held paused and reversible (abort: the source takes it back); bad calls are coded errors', async () => {
    const { source, target } = hosts();
    const image = join(qemus.root(), 'boot-inc.img');
    writeGuestImage(image, { delayLoops: 2000 });
    const vm: QemuVmSpec = { name: 'bi-1', memory: 64 * MiB, vcpus: 1, bootImage: image };
    await source.create(vm);
    await source.start('bi-1');
    await heartbeat(source.stateDir('bi-1'), 2);
    const sourcePid = source.pid('bi-1')!;
    const boot = target.capabilities.incomingBoot!;
    expect((await rejection(boot.bootIncoming('nope'))).code).toBe(ErrorCodes.VM_UNKNOWN);
    const { endpoint } = await target.prepareIncoming(vm);
    // Asked before the memory moves: it waits for the stream (MIGRATION event).
    const t0 = Date.now();
    const booted = boot.bootIncoming('bi-1', { timeoutMs: 60_000 });
    await source.migrateOut('bi-1', { endpoint });
    const r = await booted;
    expect(r.readyAt).toBeGreaterThanOrEqual(t0);
    expect(r.readyAt).toBeLessThanOrEqual(Date.now());
    expect(r.waitedMs).toBeGreaterThan(0);
    // Held: the guest runs nowhere, the VM is still incoming; asked again, it answers at once with the same time.
    const before = serialBytes(target.stateDir('bi-1'));
    const again = await boot.bootIncoming('bi-1');
    expect(again.readyAt).toBe(r.readyAt);
    await new Promise((resolve) => setTimeout(resolve, 300));
    expect(serialBytes(target.stateDir('bi-1'))).toBe(before);
    expect(target.get('bi-1')?.state).toBe('created');
    // Reversible: the target throws it away, the source takes its VM back in its same QEMU.
    await target.abortIncoming('bi-1');
    expect((await source.start('bi-1')).state).toBe('running');
    expect(source.pid('bi-1')).toBe(sourcePid);
    await heartbeat(source.stateDir('bi-1'), 2);
    expect((await rejection(boot.bootIncoming('bi-1'))).code).toBe(ErrorCodes.VM_UNKNOWN);
    expect((await rejection(source.capabilities.incomingBoot!.bootIncoming('bi-1'))).code).toBe(ErrorCodes.VM_BAD_STATE);
    // A stream that breaks: the incoming QEMU killed under the wait.
    await target.prepareIncoming(vm);
    const waiting = boot.bootIncoming('bi-1', { timeoutMs: 30_000 });
    process.kill(target.pid('bi-1')!, 'SIGKILL');
    expect((await rejection(waiting)).code).toBe(ErrorCodes.MIGRATION_FAILED);
    await target.abortIncoming('bi-1');
    expect(qemus.live()).toEqual([sourcePid]);
  });

  it('an incoming VM whose memory is in survives a restart of its driver: re-attached as incoming (created), the commit then runs it', async () => {
    const { source, target } = hosts();
    const vm = spec('held-2', 2000);
    await source.create(vm);
    await source.start('held-2');
    await heartbeat(source.stateDir('held-2'), 2);
    const { endpoint } = await target.prepareIncoming(vm);
    const targetPid = target.pid('held-2')!;
    await source.migrateOut('held-2', { endpoint });
    const targetRoot = join(target.stateDir('held-2'), '..');
    await target.close();
    const again = new QemuDriver({ root: targetRoot, accel: 'tcg' });
    cleanups.push(() => again.close());
    await again.restoreState(undefined);
    expect(again.get('held-2')?.state).toBe('created');
    expect(again.pid('held-2')).toBe(targetPid);
    expect((await again.commitIncoming('held-2')).state).toBe('running');
    await heartbeat(again.stateDir('held-2'), 2);
    await source.remove('held-2');
    expect(qemus.live()).toEqual([targetPid]);
  });

  describe('convergence of a fast-dirtying guest under a tight downtime limit', () => {
    // delayLoops 2000: a pass over 60 MiB takes tens of ms under TCG, so every page is dirty again
    // in every round at 64 MiB/s; only throttling the vCPU lets the rounds shrink.
    const shape = { maxBandwidth: 64 * MiB, downtimeLimitMs: 50 } as const;

    it('auto-converge off: no convergence within its budget, cancelled cleanly, the source runs, the target is gone', async () => {
      const { source, target } = hosts();
      const vm = spec('noconv-1', 2000);
      await source.create(vm);
      await source.start('noconv-1');
      // Migrating before the guest runs (SeaBIOS still booting) would move static memory.
      await heartbeat(source.stateDir('noconv-1'), 2);
      const { endpoint } = await target.prepareIncoming(vm);
      const targetPid = target.pid('noconv-1')!;
      const e = await rejection(source.migrateOut('noconv-1', { endpoint, ...shape, autoConverge: false, timeBudgetMs: 6000 }));
      expect(e.code).toBe(ErrorCodes.MIGRATION_NOT_CONVERGED);
      expect(e.details).toMatchObject({ vm: 'noconv-1' });
      expect(source.get('noconv-1')?.state).toBe('running');
      await heartbeat(source.stateDir('noconv-1'), 2);
      await target.abortIncoming('noconv-1');
      expect(pidAlive(targetPid)).toBe(false);
    });

    it('auto-converge on: completes and reports that it throttled', async () => {
      const { source, target } = hosts({ cpuThrottle: { initial: 60, increment: 20 } });
      const vm = spec('conv-1', 2000);
      await source.create(vm);
      await source.start('conv-1');
      await heartbeat(source.stateDir('conv-1'), 2);
    await heartbeat(source.stateDir('conv-1'), 2);
      const { endpoint } = await target.prepareIncoming(vm);
      const progress: MigrationProgress[] = [];
      const result = await source.migrateOut('conv-1', { endpoint, ...shape, autoConverge: true, timeBudgetMs: 90_000, onProgress: (p) => progress.push(p) });
      expect(result.throttled).toBe(true);
      expect(result.maxThrottle).toBeGreaterThanOrEqual(0.6);
      expect(progress.some((p) => p.throttle > 0)).toBe(true);
      await target.commitIncoming('conv-1');
      await heartbeat(target.stateDir('conv-1'), 1);
      await checkIntegrity(target, 'conv-1');
      await source.remove('conv-1');
    }, 120_000);
  });
});
