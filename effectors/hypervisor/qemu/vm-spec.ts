import { closeSync, openSync, readSync, statSync } from 'node:fs';
import { EffectorError, ErrorCodes } from '../../../core/errors.ts';
import type { GuestSettings } from './guest/guest-image.ts';

const MiB = 1024 * 1024;
const VM_NAME = /^[a-z0-9][a-z0-9-]{0,62}$/;
/** As images/image-manifest.ts names them (no path: the target resolves it in its own index). */
const IMAGE_NAME = /^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$/;

export type DiskFormat = 'raw' | 'qcow2';

export interface QemuDisk {
  readonly path: string;
  readonly format: DiskFormat;
  /**
   * An image of the agent's index (`vm create --image IMG`): the driver makes the disk a qcow2
   * overlay on this host's file of it (disk-migration.ts), and a migration mirrors it to the target.
   */
  readonly image?: string;
}

/** A NIC on QEMU's user-mode network (no host set-up needed); the model must match on both ends of a migration. */
export interface QemuNic {
  readonly model: 'virtio-net-pci' | 'e1000';
  /** 52:54:00:xx:xx:xx style; QEMU picks one when absent. */
  readonly mac?: string;
}

/**
 * The machine shape of a QEMU VM. A migration target starts QEMU with the same spec, so anything
 * that changes the device model lives here and nowhere else.
 */
export interface QemuVmSpec {
  readonly name: string;
  /** RAM in bytes, a whole number of MiB (at least 32 MiB: the test guest needs RAM above 16 MiB). */
  readonly memory: number;
  readonly vcpus: number;
  /** A raw image booted as the first IDE disk. Absent: the embot test guest with {@link testGuest} settings. */
  readonly bootImage?: string;
  /** Settings of the embot test guest (used when {@link bootImage} is absent). */
  readonly testGuest?: GuestSettings;
  /** More disks, on virtio-blk. A migration target must see the same images (shared storage). */
  readonly disks?: readonly QemuDisk[];
  readonly nics?: readonly QemuNic[];
}

const invalid = (message: string, details: Record<string, unknown>): EffectorError => new EffectorError(ErrorCodes.VM_SPEC_INVALID, message, { details });
const isRecord = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

/** Checks the shape of a spec (not the image files: {@link checkImage} does those). */
export function validateQemuSpec(input: unknown): QemuVmSpec {
  if (!isRecord(input)) throw invalid('a QEMU VM spec must be an object', {});
  const { name, memory, vcpus, bootImage, testGuest, disks, nics } = input;
  if (typeof name !== 'string' || !VM_NAME.test(name)) throw invalid(`VM name must match ${VM_NAME}, not ${JSON.stringify(name)}`, { name });
  if (typeof memory !== 'number' || !Number.isInteger(memory) || memory % MiB !== 0 || memory < 32 * MiB || memory > 3 * 1024 * MiB) {
    throw invalid(`VM ${name}: memory must be whole MiB between 32 MiB and 3 GiB, not ${String(memory)}`, { vm: name, memory });
  }
  if (typeof vcpus !== 'number' || !Number.isInteger(vcpus) || vcpus < 1 || vcpus > 64) throw invalid(`VM ${name}: vcpus must be 1..64, not ${String(vcpus)}`, { vm: name, vcpus });
  if (bootImage !== undefined && (typeof bootImage !== 'string' || bootImage.length === 0)) throw invalid(`VM ${name}: bootImage must be a path`, { vm: name });
  if (testGuest !== undefined && !isRecord(testGuest)) throw invalid(`VM ${name}: testGuest must be an object`, { vm: name });
  if (disks !== undefined) {
    if (!Array.isArray(disks)) throw invalid(`VM ${name}: disks must be a list`, { vm: name });
    for (const d of disks) {
      if (!isRecord(d) || typeof d['path'] !== 'string' || (d['format'] !== 'raw' && d['format'] !== 'qcow2')) {
        throw invalid(`VM ${name}: every disk needs a path and a format raw|qcow2`, { vm: name, disk: d });
      }
      if (d['image'] !== undefined && (typeof d['image'] !== 'string' || !IMAGE_NAME.test(d['image']))) {
        throw invalid(`VM ${name}: a disk's image must be an image name (${IMAGE_NAME}), not ${JSON.stringify(d['image'])}`, { vm: name, disk: d });
      }
    }
  }
  if (nics !== undefined) {
    if (!Array.isArray(nics)) throw invalid(`VM ${name}: nics must be a list`, { vm: name });
    for (const n of nics) {
      if (!isRecord(n) || (n['model'] !== 'virtio-net-pci' && n['model'] !== 'e1000') || (n['mac'] !== undefined && !/^([0-9a-f]{2}:){5}[0-9a-f]{2}$/i.test(String(n['mac'])))) {
        throw invalid(`VM ${name}: every NIC needs a model virtio-net-pci|e1000 and an optional MAC aa:bb:cc:dd:ee:ff`, { vm: name, nic: n });
      }
    }
  }
  return input as unknown as QemuVmSpec;
}

const QCOW2_MAGIC = 0x514649fb;

/**
 * Refuses an image QEMU would fail on or, worse, misread: missing, not a file, empty, a raw
 * image that is not whole sectors or carries a qcow2 header (QEMU would expose the header as
 * disk data), a qcow2 image without a valid header.
 */
export function checkImage(path: string, format: DiskFormat, vm: string): void {
  const bad = (why: string): EffectorError => new EffectorError(ErrorCodes.VM_IMAGE, `VM ${vm}: image ${path} ${why}`, { details: { vm, image: path, format } });
  let size: number;
  try {
    const st = statSync(path);
    if (!st.isFile()) throw bad('is not a file');
    size = st.size;
  } catch (e) {
    if (e instanceof EffectorError) throw e;
    throw bad('does not exist or cannot be read');
  }
  if (size === 0) throw bad('is empty');
  const header = Buffer.alloc(8);
  let fd: number;
  try {
    fd = openSync(path, 'r');
  } catch {
    throw bad('cannot be opened for reading');
  }
  try {
    readSync(fd, header, 0, 8, 0);
  } finally {
    closeSync(fd);
  }
  const isQcow2 = header.readUInt32BE(0) === QCOW2_MAGIC;
  if (format === 'raw') {
    if (isQcow2) throw bad('is qcow2, not raw');
    if (size % 512 !== 0) throw bad(`is ${size} bytes: a raw image is whole 512-byte sectors`);
  } else {
    const version = header.readUInt32BE(4);
    if (!isQcow2 || (version !== 2 && version !== 3)) throw bad('has no qcow2 header (magic QFI\\xfb, version 2 or 3)');
  }
}
