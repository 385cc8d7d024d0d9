/**
 * A running QEMU VM's disk moved without shared storage (issue 14), on two real QEMUs (TCG) driven
 * by two QemuDrivers on loopback: the VM's disk is a qcow2 overlay on a raw base image that the
 * target already has (as an image build leaves it); the target's incoming QEMU exports its own
 * overlay on that base over NBD, the source mirrors with sync `top` (only the overlay's blocks
 * cross), the disk is written through QMP (qemu-io) before, during and at the switch of the memory
 * migration, and after both QEMUs stopped the two disks read the same, byte for byte.
 */
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { ErrorCodes } from '../../core/errors.ts';
import { exportDisks, startDiskMirror, stopDiskExport } from '../../effectors/hypervisor/qemu/disk-mirror.ts';
import { QemuDriver } from '../../effectors/hypervisor/qemu/qemu-driver.ts';
import { pidAlive } from '../../effectors/hypervisor/qemu/qemu-process.ts';
import type { QemuVmSpec } from '../../effectors/hypervisor/qemu/vm-spec.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { rejection } from '../harness/expect-code.ts';
import { heartbeat, qemuTestFile } from '../harness/qemu-processes.ts';

const MiB = 1024 * 1024;
const BASE = 8 * MiB;
const { run, qemus } = qemuTestFile();
const cleanups = cleanupsAfterEach();

function overlay(file: string, base: string): string {
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', file]);
  return file;
}

/** The disk as the guest sees it (overlay over base), as raw bytes. */
function guestView(file: string, out: string): Buffer {
  execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', file, out]);
  return readFileSync(out);
}

async function qemuIo(d: QemuDriver, vm: string, cmd: string): Promise<void> {
  const out = (await d.qmp(vm)!.executeRaw('human-monitor-command', { 'command-line': `qemu-io virtio0 "${cmd}"` })) as string;
  expect(out).not.toMatch(/error|failed/i);
}

describe.skipIf(!run)('qemu disk mirror over NBD during a live migration (TCG)', () => {
  it("the target's disk is byte-exact with the source's at the switch, writes during the move included; only the overlay's blocks crossed; the VM runs there; no QEMU left", async () => {
    const root = qemus.root();
    const [srcDir, dstDir] = [join(root, 'src-disks'), join(root, 'dst-disks')];
    mkdirSync(srcDir);
    mkdirSync(dstDir);
    // The base image at both hosts (the target's as an image build from its holders leaves it).
    writeFileSync(join(srcDir, 'base.img'), randomBytes(BASE));
    copyFileSync(join(srcDir, 'base.img'), join(dstDir, 'base.img'));
    const srcDisk = overlay(join(srcDir, 'vm.qcow2'), join(srcDir, 'base.img'));
    const dstDisk = overlay(join(dstDir, 'vm.qcow2'), join(dstDir, 'base.img'));
    const make = (name: string): QemuDriver => {
      const d = new QemuDriver({ root: join(root, name), accel: 'tcg' });
      cleanups.push(() => d.close());
      return d;
    };
    const source = make('src');
    const target = make('dst');
    const spec = (disk: string): QemuVmSpec => ({ name: 'disk-1', memory: 64 * MiB, vcpus: 1, testGuest: { delayLoops: 2000 }, disks: [{ path: disk, format: 'qcow2' }] });
    await source.create(spec(srcDisk));
    await source.start('disk-1');
    await heartbeat(source.stateDir('disk-1'), 1);
    // Changed before the move: in the overlay, so the mirror's first copy carries it.
    await qemuIo(source, 'disk-1', 'write -P 0x11 1M 128k');

    const { endpoint } = await target.prepareIncoming(spec(dstDisk));
    const exported = await exportDisks(target.qmp('disk-1')!, { host: '127.0.0.1', devices: ['virtio0'] });
    expect(exported.host).toBe('127.0.0.1');
    const mirror = await startDiskMirror(source.qmp('disk-1')!, exported, { sync: 'top' });
    // After READY: the write reaches both copies.
    await qemuIo(source, 'disk-1', 'write -P 0x5a 0 64k');
    let during = false;
    let reports: Awaited<ReturnType<typeof mirror.finish>> = [];
    await source.migrateOut('disk-1', {
      endpoint,
      onProgress: () => {
        if (during) return;
        during = true;
        void qemuIo(source, 'disk-1', 'write -P 0x77 3M 64k');
      },
      beforeSwitchover: async () => {
        // The VM is paused; one more write, then the job ends with a consistent copy of now.
        await qemuIo(source, 'disk-1', 'write -P 0x33 5M 4k');
        reports = await mirror.finish();
      },
    });
    expect(during).toBe(true);
    await stopDiskExport(target.qmp('disk-1')!, exported.disks);
    expect((await target.commitIncoming('disk-1')).state).toBe('running');
    await heartbeat(target.stateDir('disk-1'), 2);
    // The mirror carried the overlay (the writes), not the 8 MiB base.
    expect(reports).toHaveLength(1);
    expect(reports[0]!.bytes).toBeGreaterThanOrEqual(128 * 1024);
    expect(reports[0]!.bytes).toBeLessThan(BASE / 2);

    const sourcePid = source.pid('disk-1');
    await source.remove('disk-1');
    const targetPid = target.pid('disk-1');
    await target.stop('disk-1').catch(() => undefined);
    await target.remove('disk-1');
    expect(sourcePid === undefined || !pidAlive(sourcePid)).toBe(true);
    expect(targetPid === undefined || !pidAlive(targetPid)).toBe(true);
    expect(qemus.live()).toEqual([]);
    const a = guestView(srcDisk, join(root, 'src.raw'));
    const b = guestView(dstDisk, join(root, 'dst.raw'));
    expect(a.byteLength).toBe(BASE);
    expect(a.subarray(5 * MiB, 5 * MiB + 4096).every((x) => x === 0x33)).toBe(true);
    expect(a.subarray(3 * MiB, 3 * MiB + 65536).every((x) => x === 0x77)).toBe(true);
    expect(Buffer.compare(a, b)).toBe(0);
  }, 300_000);

  it('bad input: exporting a disk the VM does not have, mirroring to an export nobody serves: coded errors, no NBD server, job or node left, the VM still runs', async () => {
    const root = qemus.root();
    const base = join(root, 'base.img');
    writeFileSync(base, Buffer.alloc(MiB));
    const d = new QemuDriver({ root: join(root, 'vms'), accel: 'tcg' });
    cleanups.push(() => d.close());
    await d.create({ name: 'bad-1', memory: 64 * MiB, vcpus: 1, testGuest: { delayLoops: 2000 }, disks: [{ path: overlay(join(root, 'vm.qcow2'), base), format: 'qcow2' }] });
    await d.start('bad-1');
    const qmp = d.qmp('bad-1')!;
    const noDisk = await rejection(exportDisks(qmp, { host: '127.0.0.1', devices: ['virtio7'] }));
    expect(noDisk).toMatchObject({ code: ErrorCodes.QEMU_FAILED });
    expect(String((noDisk as Error).message)).toContain('virtio7');
    // The NBD server was stopped again: QEMU lets a new one start (it refuses a second one).
    await qmp.executeRaw('nbd-server-start', { addr: { type: 'inet', data: { host: '127.0.0.1', port: '0' } } });
    await qmp.executeRaw('nbd-server-stop');
    expect(await rejection(exportDisks(qmp, { host: '127.0.0.1', devices: [] }))).toMatchObject({ code: ErrorCodes.VM_SPEC_INVALID });

    // A mirror to a port nobody listens on: refused, and nothing stays behind on the source.
    const port = await new Promise<number>((resolve) => {
      const srv = createServer().listen(0, '127.0.0.1', () => {
        const p = (srv.address() as { port: number }).port;
        srv.close(() => resolve(p));
      });
    });
    const nowhere = { host: '127.0.0.1', port, disks: [{ device: 'virtio0', exportName: 'embot-mirror-virtio0' }] };
    expect(await rejection(startDiskMirror(qmp, nowhere, { readyTimeoutMs: 30_000 }))).toMatchObject({ code: ErrorCodes.QEMU_FAILED });
    expect((await qmp.executeRaw('query-block-jobs')) as unknown[]).toEqual([]);
    const nodes = (await qmp.executeRaw('query-named-block-nodes')) as { 'node-name': string }[];
    expect(nodes.some((n) => n['node-name'].startsWith('embot-mirror'))).toBe(false);
    expect((await d.stats('bad-1')).state).toBe('running');
    await d.stop('bad-1').catch(() => undefined);
    await d.remove('bad-1');
    expect(qemus.live()).toEqual([]);
  }, 120_000);
});
