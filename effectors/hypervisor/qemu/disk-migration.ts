/**
 * The qemu driver's wiring of disk-mirror.ts into its own migrations (issue 14): a disk made from
 * an image of the agent's index (`vm create --image IMG`) is a qcow2 overlay in the VM's state dir
 * on that image, at the source and again at the target (on the image built there), so the mirror's
 * `sync: top` carries only what the VM changed. The driver calls these; the agent knows only the
 * `imagePath` resolver it hands the driver and the endpoint's `disks` it carries in IncomingReady.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { EffectorError, ErrorCodes, describeError } from '../../../core/errors.ts';
import type { MigrationDiskExport } from '../hypervisor-contract.ts';
import type { DiskExport } from './disk-mirror.ts';
import type { QmpClient } from './qmp-client.ts';
import type { QemuDisk, QemuVmSpec } from './vm-spec.ts';

/** The disks a migration must carry: those made from an indexed image (the rest is shared storage). */
export function mirroredDevices(spec: QemuVmSpec): readonly string[] {
  // `-drive if=virtio` without index: QEMU names them virtio0, virtio1… in command-line order.
  return (spec.disks ?? []).flatMap((d, i) => (d.image === undefined ? [] : [`virtio${i}`]));
}

/**
 * The spec with each image disk made a qcow2 overlay (`disk<i>.qcow2` in `stateDir`) on this
 * host's file of that image. At create the base is the source's image, at a migration target the
 * one just built there; the spec's old path (the other host's) is not used.
 */
export function withOverlays(spec: QemuVmSpec, stateDir: string, imagePath: ((name: string) => string | undefined) | undefined): QemuVmSpec {
  if (mirroredDevices(spec).length === 0) return spec;
  // Synchronous (qemu-img takes milliseconds): the driver registers the VM right after, before any
  // await, so a second create or prepare of the same name is refused meanwhile.
  const created = !existsSync(stateDir);
  try {
    return { ...spec, disks: overlays(spec, stateDir, imagePath) };
  } catch (e) {
    if (created) rmSync(stateDir, { recursive: true, force: true });
    throw e;
  }
}

function overlays(spec: QemuVmSpec, stateDir: string, imagePath: ((name: string) => string | undefined) | undefined): QemuDisk[] {
  mkdirSync(stateDir, { recursive: true });
  const disks: QemuDisk[] = [];
  for (const [i, d] of (spec.disks ?? []).entries()) {
    if (d.image === undefined) {
      disks.push(d);
      continue;
    }
    const base = imagePath?.(d.image);
    if (base === undefined) {
      throw new EffectorError(ErrorCodes.VM_IMAGE, `VM ${spec.name}: no image ${d.image} on this host for its disk ${i} (it is built here before a migration; see embot images)`, {
        details: { vm: spec.name, image: d.image },
      });
    }
    const path = join(stateDir, `disk${i}.qcow2`);
    try {
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', path], { stdio: ['ignore', 'ignore', 'pipe'] });
    } catch (e) {
      throw new EffectorError(ErrorCodes.VM_IMAGE, `VM ${spec.name}: overlay on image ${d.image} (${base}) not created: ${describeError(e)}`, { details: { vm: spec.name, image: d.image } });
    }
    disks.push({ path, format: 'qcow2', image: d.image });
  }
  return disks;
}

/** The spec without its image disks: a spare incoming QEMU must not open another VM's overlay. */
export function withoutImageDisks<S extends { readonly disks?: readonly QemuDisk[] }>(spec: S): S {
  if (!(spec.disks ?? []).some((d) => d.image !== undefined)) return spec;
  return { ...spec, disks: (spec.disks ?? []).filter((d) => d.image === undefined) };
}

/** The export as it travels to the source (IncomingReady's `disks`). */
export function exportToWire(e: DiskExport): MigrationDiskExport {
  return { host: e.host, port: e.port, exports: e.disks.map((d) => ({ device: d.device, exportName: d.exportName })) };
}

/** The wire form back into what startDiskMirror dials (the source's own TLS creds, if any). */
export function exportFromWire(w: MigrationDiskExport, tlsCreds: string | undefined): DiskExport {
  return { host: w.host, port: w.port, disks: w.exports, ...(tlsCreds === undefined || tlsCreds === '' ? {} : { tlsCreds }) };
}

/**
 * TEST HOOK (named as such): `EMBOT_TEST_HOOK_MIRROR_WRITES` is a JSON object of qemu-io commands
 * on the first mirrored disk, run by the source's driver at points of the migration that a test
 * cannot reach through the agent's QMP connection: `beforeMirror` (in the overlay before the
 * mirror's first copy), `afterReady` (the mirror is READY),
 * `duringMemory` (first progress report of the memory move), `atSwitch` (VM paused, before the
 * mirror ends). The guest writes through QEMU's block layer exactly as its own I/O would.
 */
export async function testHookWrite(qmp: QmpClient, device: string | undefined, point: 'beforeMirror' | 'afterReady' | 'duringMemory' | 'atSwitch'): Promise<void> {
  const raw = process.env['EMBOT_TEST_HOOK_MIRROR_WRITES'];
  if (raw === undefined || device === undefined) return;
  let cmd: unknown;
  try {
    cmd = (JSON.parse(raw) as Record<string, unknown>)[point];
  } catch {
    return;
  }
  if (typeof cmd !== 'string') return;
  const out = await qmp.executeRaw('human-monitor-command', { 'command-line': `qemu-io ${device} "${cmd}"` });
  if (typeof out === 'string' && /error|failed/i.test(out)) throw new EffectorError(ErrorCodes.QEMU_FAILED, `test hook write at ${point} failed: ${out.trim()}`);
}

/**
 * FAULT INJECTION (named as such): with `EMBOT_FAULT_NBD_EXPORT_REFUSED=1` the target stops its
 * NBD server right after exporting, so the source's connection to the export is refused for real.
 */
export const faultExportRefused = (): boolean => process.env['EMBOT_FAULT_NBD_EXPORT_REFUSED'] === '1';
