import { extname } from 'node:path';
import { EffectorError, ErrorCodes } from '../../core/errors.ts';
import type { HypervisorDriver } from './hypervisor-contract.ts';
import { QemuDriver, type QemuDriverOptions, type QemuVmSpec } from './qemu/index.ts';
import { SimDriver, type SimDriverOptions, type VmSpec as SimVmSpec } from './sim/sim-driver.ts';

/** Which driver an agent runs, with its settings (from the config's `driver`, `sim:` and `qemu:`). */
export type DriverChoice =
  | { readonly kind: 'sim'; readonly sim: SimDriverOptions }
  | {
      readonly kind: 'qemu';
      readonly qemu: QemuDriverOptions;
      /** Shape of a VM created without those fields. */
      readonly defaults: { readonly memory: number; readonly vcpus: number; readonly bootImage?: string };
    };

/** A VM as `embot vm create` asks for it; each driver takes what it can do and refuses the rest. */
export interface VmCreateRequest {
  readonly name: string;
  readonly memory?: number;
  readonly vcpus?: number;
  /** sim: bytes/s the VM dirties. */
  readonly dirtyRate?: number;
  /** sim: port of the VM's UDP service. */
  readonly udpPort?: number;
  /** qemu: a disk image (`.qcow2` is qcow2, anything else raw). */
  readonly image?: string;
  /** qemu: `image` is this indexed image's file: the disk becomes a qcow2 overlay on it, mirrored in migrations. */
  readonly imageName?: string;
  /** qemu: a raw image to boot (default: the embot test guest). */
  readonly boot?: string;
}

export interface DriverHandle {
  readonly driver: HypervisorDriver;
  /** The driver's own spec for a create request; refuses (VM_SPEC_INVALID) fields it has no use for. */
  specFor(request: VmCreateRequest): { readonly name: string };
}

/**
 * The one place a driver is chosen: the agent (the composition root) calls it and from then on
 * sees only the contract.
 *
 * @example
 * ```ts
 * const { driver, specFor } = createDriver({ kind: 'sim', sim: { pageSize: 4096 } });
 * await driver.create(specFor({ name: 'web-1', memory: 64 * 2 ** 20 }));
 * ```
 */
export function createDriver(choice: DriverChoice): DriverHandle {
  switch (choice.kind) {
    case 'sim':
      return { driver: new SimDriver(choice.sim), specFor: simSpec };
    case 'qemu': {
      const defaults = choice.defaults;
      return { driver: new QemuDriver(choice.qemu), specFor: (r) => qemuSpec(r, defaults) };
    }
  }
}

function refuse(driver: string, vm: string, fields: readonly string[], why: string): never {
  throw new EffectorError(ErrorCodes.VM_SPEC_INVALID, `the ${driver} driver cannot create VM ${vm} with ${fields.join(', ')}: ${why}`, {
    details: { vm, driver, fields },
  });
}

function simSpec(r: VmCreateRequest): Partial<SimVmSpec> & { readonly name: string } {
  const extra = (['image', 'boot'] as const).filter((k) => r[k] !== undefined);
  if (extra.length) refuse('sim', r.name, extra, 'a sim VM has no disks or boot images (run the agent with --driver qemu)');
  return {
    name: r.name,
    ...(r.memory === undefined ? {} : { memory: r.memory }),
    ...(r.vcpus === undefined ? {} : { vcpus: r.vcpus }),
    ...(r.dirtyRate === undefined ? {} : { dirtyRate: r.dirtyRate }),
    ...(r.udpPort === undefined ? {} : { udpPort: r.udpPort }),
  };
}

function qemuSpec(r: VmCreateRequest, d: Extract<DriverChoice, { kind: 'qemu' }>['defaults']): QemuVmSpec {
  const extra = (['dirtyRate', 'udpPort'] as const).filter((k) => r[k] !== undefined);
  if (extra.length) refuse('qemu', r.name, extra, "a QEMU guest's dirty rate is its own, and the UDP service is a sim capability");
  const boot = r.boot ?? d.bootImage;
  return {
    name: r.name,
    memory: r.memory ?? d.memory,
    vcpus: r.vcpus ?? d.vcpus,
    ...(boot === undefined ? {} : { bootImage: boot }),
    ...(r.image === undefined
      ? {}
      : { disks: [{ path: r.image, format: extname(r.image).toLowerCase() === '.qcow2' ? 'qcow2' : 'raw', ...(r.imageName === undefined ? {} : { image: r.imageName }) }] }),
  };
}
