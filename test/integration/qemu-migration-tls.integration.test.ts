import { join } from 'node:path';
import { rejection } from '../harness/expect-code.ts';
import { rmSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../core/errors.ts';
import { GUEST_RANGE_START, checkGuestMemory, guestRangeEnd } from '../../effectors/hypervisor/qemu/guest/guest-image.ts';
import type { QemuTlsFiles } from '../../effectors/hypervisor/qemu/migration-tls.ts';
import { QemuDriver } from '../../effectors/hypervisor/qemu/qemu-driver.ts';
import { pidAlive } from '../../effectors/hypervisor/qemu/qemu-process.ts';
import type { QemuVmSpec } from '../../effectors/hypervisor/qemu/vm-spec.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { makeTlsFixture, type TlsFixture } from '../harness/cluster-tls.ts';
import { heartbeat, qemuTestFile } from '../harness/qemu-processes.ts';

const MiB = 1024 * 1024;
const { run, qemus } = qemuTestFile();
const cleanups = cleanupsAfterEach();

const spec = (name: string): QemuVmSpec => ({ name, memory: 64 * MiB, vcpus: 1, testGuest: { delayLoops: 2000 } });

/** A cluster CA (and a second, foreign one) in a temp folder removed after the test. */
async function cas(): Promise<{ ours: TlsFixture; foreign: TlsFixture }> {
  const root = qemus.root();
  const ours = await makeTlsFixture(join(root, 'ca'), ['a', 'b']);
  const foreign = await makeTlsFixture(join(root, 'other-ca'), ['b']);
  cleanups.push(() => rmSync(join(root, 'ca'), { recursive: true, force: true }));
  return { ours, foreign };
}

function driver(name: string, tls: QemuTlsFiles | undefined): QemuDriver {
  const d = new QemuDriver({ root: join(qemus.root(), name), accel: 'tcg', ...(tls ? { tls } : {}) });
  cleanups.push(() => d.close());
  return d;
}

/** Source VM still running here and its guest still writing; the target's incoming QEMU gone once aborted. */
async function failedCleanly(source: QemuDriver, target: QemuDriver, vm: string, targetPid: number): Promise<void> {
  expect(source.get(vm)?.state).toBe('running');
  await heartbeat(source.stateDir(vm), 2);
  await target.abortIncoming(vm);
  expect(pidAlive(targetPid)).toBe(false);
  expect(target.get(vm)).toBeUndefined();
  expect(qemus.live()).toEqual([source.pid(vm)]);
}

describe.skipIf(!run)("qemu migration stream over TLS with the cluster's certificates (TCG)", () => {
  it('moves a running guest when both sides have certificates of the cluster CA naming them; no key copy stays behind', async () => {
    const { ours } = await cas();
    const source = driver('a', ours.files('a'));
    const target = driver('b', ours.files('b'));
    await source.create(spec('tls-1'));
    await source.start('tls-1');
    await heartbeat(source.stateDir('tls-1'), 2);
    const { endpoint } = await target.prepareIncoming(spec('tls-1'), { sourceName: 'a' });
    const result = await source.migrateOut('tls-1', { endpoint, targetName: 'b' });
    expect(result.bytes).toBeGreaterThan(1 * MiB);
    expect((await target.commitIncoming('tls-1')).state).toBe('running');
    await heartbeat(target.stateDir('tls-1'), 2);
    await target.pause('tls-1');
    const end = guestRangeEnd(64 * MiB);
    expect(checkGuestMemory(await target.capabilities.memoryDump!.dump('tls-1', GUEST_RANGE_START, end - GUEST_RANGE_START))).toMatchObject({ ok: true });
    await source.remove('tls-1');
    // The copies QEMU read its credentials from are deleted once loaded.
    const { readdirSync } = await import('node:fs');
    expect(readdirSync(target.stateDir('tls-1')).filter((f) => f.startsWith('tls-'))).toEqual([]);
  });

  it('the stream really is TLS: a plain source cannot migrate into a TLS target', async () => {
    const { ours } = await cas();
    const source = driver('a', undefined);
    const target = driver('b', ours.files('b'));
    await source.create(spec('tls-2'));
    await source.start('tls-2');
    await heartbeat(source.stateDir('tls-2'), 1);
    const { endpoint } = await target.prepareIncoming(spec('tls-2'), { sourceName: 'a' });
    const targetPid = target.pid('tls-2')!;
    const e = await rejection(source.migrateOut('tls-2', { endpoint, timeBudgetMs: 20_000 }));
    expect([ErrorCodes.MIGRATION_FAILED, ErrorCodes.MIGRATION_NOT_CONVERGED]).toContain(e.code);
    await failedCleanly(source, target, 'tls-2', targetPid);
  });

  it('a target whose certificate comes from another CA: MIGRATION_FAILED, the source keeps running, the target QEMU gone', async () => {
    const { ours, foreign } = await cas();
    const source = driver('a', ours.files('a'));
    const target = driver('b', foreign.files('b'));
    await source.create(spec('tls-3'));
    await source.start('tls-3');
    await heartbeat(source.stateDir('tls-3'), 1);
    const { endpoint } = await target.prepareIncoming(spec('tls-3'), { sourceName: 'a' });
    const targetPid = target.pid('tls-3')!;
    const e = await rejection(source.migrateOut('tls-3', { endpoint, targetName: 'b' }));
    expect(e.code).toBe(ErrorCodes.MIGRATION_FAILED);
    await failedCleanly(source, target, 'tls-3', targetPid);
  });

  it('a target certificate that does not name the target agent is refused (tls-hostname)', async () => {
    const { ours } = await cas();
    const source = driver('a', ours.files('a'));
    const target = driver('b', ours.files('b'));
    await source.create(spec('tls-4'));
    await source.start('tls-4');
    await heartbeat(source.stateDir('tls-4'), 1);
    const { endpoint } = await target.prepareIncoming(spec('tls-4'), { sourceName: 'a' });
    const targetPid = target.pid('tls-4')!;
    const e = await rejection(source.migrateOut('tls-4', { endpoint, targetName: 'c' }));
    expect(e.code).toBe(ErrorCodes.MIGRATION_FAILED);
    await failedCleanly(source, target, 'tls-4', targetPid);
  });

  it('a source whose certificate does not name the agent the target expects is refused (tls-authz)', async () => {
    const { ours } = await cas();
    const source = driver('a', ours.files('a'));
    const target = driver('b', ours.files('b'));
    await source.create(spec('tls-5'));
    await source.start('tls-5');
    await heartbeat(source.stateDir('tls-5'), 1);
    const { endpoint } = await target.prepareIncoming(spec('tls-5'), { sourceName: 'c' });
    const targetPid = target.pid('tls-5')!;
    const e = await rejection(source.migrateOut('tls-5', { endpoint, targetName: 'b', timeBudgetMs: 20_000 }));
    expect([ErrorCodes.MIGRATION_FAILED, ErrorCodes.MIGRATION_NOT_CONVERGED]).toContain(e.code);
    await failedCleanly(source, target, 'tls-5', targetPid);
  });

  it('TLS without the target name is a coded argument error before anything moves', async () => {
    const { ours } = await cas();
    const source = driver('a', ours.files('a'));
    await source.create(spec('tls-6'));
    await source.start('tls-6');
    const e = await rejection(source.migrateOut('tls-6', { endpoint: { uri: 'tcp:127.0.0.1:1' } }));
    expect(e.code).toBe(ErrorCodes.EFFECTOR_ARGS_INVALID);
    expect(source.get('tls-6')?.state).toBe('running');
  });
});
