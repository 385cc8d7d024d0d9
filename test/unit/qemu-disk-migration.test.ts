/**
 * The qemu driver's image disks (disk-migration.ts, issue 14) without a VM running: the overlay a
 * create or a migration target makes (real qemu-img), the devices a migration mirrors, and the bad
 * inputs of a spec that comes from a peer (an image name that is a path, an image this host lacks).
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { EffectorError, ErrorCodes } from '../../core/errors.ts';
import { exportFromWire, exportToWire, mirroredDevices, testHookWrite, withOverlays, withoutImageDisks } from '../../effectors/hypervisor/qemu/disk-migration.ts';
import { createDriver } from '../../effectors/hypervisor/create-driver.ts';
import { QemuDriver } from '../../effectors/hypervisor/qemu/qemu-driver.ts';
import type { QmpClient } from '../../effectors/hypervisor/qemu/qmp-client.ts';
import { validateQemuSpec, type QemuVmSpec } from '../../effectors/hypervisor/qemu/vm-spec.ts';
import { rejection, thrownCode } from '../harness/expect-code.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';

const cleanups = cleanupsAfterEach();
function tempDir(prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), `embot-${prefix}`));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

const MiB = 1024 * 1024;
const hasQemuImg = ((): boolean => {
  try {
    execFileSync('qemu-img', ['--version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
})();

const spec = (disks: QemuVmSpec['disks']): QemuVmSpec => ({ name: 'd1', memory: 64 * MiB, vcpus: 1, ...(disks === undefined ? {} : { disks }) });

describe('qemu image disks: spec and devices', () => {
  it('mirrors only the image disks, named as QEMU names virtio drives in command-line order', () => {
    const s = spec([
      { path: '/shared/a.raw', format: 'raw' },
      { path: '/x/disk1.qcow2', format: 'qcow2', image: 'web.img' },
    ]);
    expect(mirroredDevices(s)).toEqual(['virtio1']);
    expect(mirroredDevices(spec(undefined))).toEqual([]);
    // A spare never opens a VM's overlay; a shared disk stays in its shape.
    expect(withoutImageDisks(s).disks).toEqual([{ path: '/shared/a.raw', format: 'raw' }]);
    expect(withoutImageDisks(spec(undefined))).toEqual(spec(undefined));
  });

  it('vm create --image NAME on qemu: the request names the image, the spec keeps its name on the disk (a path alone is a plain disk)', () => {
    const { specFor } = createDriver({ kind: 'qemu', qemu: { root: tempDir('specfor-') }, defaults: { memory: 64 * MiB, vcpus: 1 } });
    expect((specFor({ name: 'd1', image: '/srv/images/web.img', imageName: 'web.img' }) as QemuVmSpec).disks).toEqual([{ path: '/srv/images/web.img', format: 'raw', image: 'web.img' }]);
    expect((specFor({ name: 'd1', image: '/shared/web.img' }) as QemuVmSpec).disks).toEqual([{ path: '/shared/web.img', format: 'raw' }]);
  });

  it('carries the export over the wire and dials it with the source’s own TLS creds', () => {
    const e = { host: '127.0.0.1', port: 4000, disks: [{ device: 'virtio0', exportName: 'embot-mirror-virtio0' }], tlsCreds: 'target-creds' };
    const wire = exportToWire(e);
    expect(wire).toEqual({ host: '127.0.0.1', port: 4000, exports: [{ device: 'virtio0', exportName: 'embot-mirror-virtio0' }] });
    expect(exportFromWire(wire, 'source-creds')).toEqual({ host: '127.0.0.1', port: 4000, disks: wire.exports, tlsCreds: 'source-creds' });
    expect(exportFromWire(wire, '')).not.toHaveProperty('tlsCreds');
  });

  it.each([
    ['a path', '../../etc/passwd'],
    ['an absolute path', '/srv/images/web.img'],
    ['empty', ''],
    ['a number', 7],
  ])('bad input: a disk image that is %s is VM_SPEC_INVALID', (_name, image) => {
    const input = { ...spec(undefined), disks: [{ path: '/x/d.qcow2', format: 'qcow2', image }] };
    expect(thrownCode(() => validateQemuSpec(input), EffectorError)).toBe(ErrorCodes.VM_SPEC_INVALID);
  });

  it('the test hook does nothing unless its variable is set (no QMP call at all)', async () => {
    expect(process.env['EMBOT_TEST_HOOK_MIRROR_WRITES']).toBeUndefined();
    const qmp = { executeRaw: () => Promise.reject(new Error('must not be called')) } as unknown as QmpClient;
    await expect(testHookWrite(qmp, 'virtio0', 'atSwitch')).resolves.toBeUndefined();
  });
});

describe.skipIf(!hasQemuImg)('qemu image disks: overlays (real qemu-img)', () => {
  it('makes each image disk a qcow2 overlay in the state dir on this host’s file of the image; other disks untouched', () => {
    const root = tempDir('disk-overlay-');
    const base = join(root, 'web.img');
    writeFileSync(base, Buffer.alloc(MiB, 1));
    const stateDir = join(root, 'vm');
    const s = withOverlays(spec([{ path: '/source/host/disk0.qcow2', format: 'qcow2', image: 'web.img' }]), stateDir, (n) => (n === 'web.img' ? base : undefined));
    expect(s.disks).toEqual([{ path: join(stateDir, 'disk0.qcow2'), format: 'qcow2', image: 'web.img' }]);
    const info = JSON.parse(execFileSync('qemu-img', ['info', '--output', 'json', join(stateDir, 'disk0.qcow2')], { encoding: 'utf8' })) as Record<string, unknown>;
    expect(info).toMatchObject({ format: 'qcow2', 'backing-filename': base, 'virtual-size': MiB });
    const plain = spec([{ path: '/shared/a.raw', format: 'raw' }]);
    expect(withOverlays(plain, join(root, 'other'), () => undefined)).toBe(plain);
    expect(existsSync(join(root, 'other'))).toBe(false);
  });

  it('bad input: an image this host lacks is VM_IMAGE, naming it, and leaves no state dir', () => {
    const root = tempDir('disk-overlay-');
    const stateDir = join(root, 'vm');
    const e = (() => {
      try {
        withOverlays(spec([{ path: '/x/disk0.qcow2', format: 'qcow2', image: 'gone.img' }]), stateDir, () => undefined);
      } catch (err) {
        return err as EffectorError;
      }
      return undefined;
    })();
    expect(e?.code).toBe(ErrorCodes.VM_IMAGE);
    expect(e?.message).toContain('gone.img');
    expect(existsSync(stateDir)).toBe(false);
  });

  it('bad input: a migration target without the image refuses prepareIncoming with VM_IMAGE and holds no VM; create the same', async () => {
    const root = tempDir('disk-overlay-');
    mkdirSync(join(root, 'vms'));
    const d = new QemuDriver({ root: join(root, 'vms'), accel: 'tcg', imagePath: () => undefined });
    try {
      const incoming = spec([{ path: '/source/d1/disk0.qcow2', format: 'qcow2', image: 'web.img' }]);
      expect(await rejection(d.prepareIncoming(incoming))).toMatchObject({ code: ErrorCodes.VM_IMAGE });
      expect(d.list()).toEqual([]);
      expect(existsSync(join(root, 'vms', 'd1'))).toBe(false);
      const base = join(root, 'web.img');
      writeFileSync(base, Buffer.alloc(MiB));
      expect(await rejection(d.create(spec([{ path: base, format: 'raw', image: 'web.img' }])))).toMatchObject({ code: ErrorCodes.VM_IMAGE });
      expect(d.list()).toEqual([]);
      expect(d.capabilities.diskMirror).toEqual({ sync: 'top' });
    } finally {
      await d.close();
    }
  });
});
