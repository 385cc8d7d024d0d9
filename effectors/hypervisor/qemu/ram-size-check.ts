import { EffectorError, ErrorCodes } from '../../../core/errors.ts';
import type { QmpClient } from './qmp-client.ts';
import { RAM_PAD_BYTES, qemuRamBytes } from './ram-size.ts';

/**
 * Refusing, before anything moves, the migration of a VM whose QEMU has another RAM size than a
 * target started now would give it. The case: a QEMU started before the RAM pad (ram-size.ts), its
 * RAM exactly the spec's, re-attached by an agent that pads. Its target's incoming QEMU would
 * refuse the stream's RAM block and exit, and the source would see only QEMU's "Broken pipe"
 * (`MIGRATION_FAILED`); here it is a coded refusal that names the one fix, a restart of the VM.
 *
 * Only QEMUs the driver did not start itself are measured (at re-attach): the ones it starts get
 * `qemuRamBytes` by construction, so the migration path pays no QMP round trip for it.
 */

/**
 * `base-memory` of a `query-memory-size-summary` reply: the RAM QEMU was started with (`-m`),
 * hot-plugged memory apart. A reply of another shape is QEMU's or a stranger's error, coded.
 */
export function baseMemoryOf(reply: unknown): number {
  const base = typeof reply === 'object' && reply !== null && !Array.isArray(reply) ? (reply as Record<string, unknown>)['base-memory'] : undefined;
  if (typeof base !== 'number' || !Number.isSafeInteger(base) || base <= 0) {
    throw new EffectorError(ErrorCodes.QMP_PROTOCOL, `query-memory-size-summary answered without a positive integer base-memory: ${JSON.stringify(reply)?.slice(0, 200)}`, {
      details: { command: 'query-memory-size-summary' },
    });
  }
  return base;
}

/** The guest RAM of the QEMU behind `qmp`, in bytes. */
export async function queryBaseMemory(qmp: QmpClient): Promise<number> {
  return baseMemoryOf(await qmp.executeRaw('query-memory-size-summary'));
}

/**
 * Throws `VM_RESTART_NEEDED` when `runningBytes` (the VM's QEMU's RAM, as measured; undefined:
 * started by this driver, or not known) differs from what a target started now gets for the spec.
 */
export function checkRamForMigration(vm: string, specMemory: number, runningBytes: number | undefined, accel: 'kvm' | 'tcg'): void {
  if (runningBytes === undefined) return;
  const targetBytes = qemuRamBytes(specMemory, accel);
  if (runningBytes === targetBytes) return;
  const why =
    accel === 'tcg' && runningBytes === specMemory
      ? `it was started before the RAM pad (under TCG every QEMU now gets its memory + ${RAM_PAD_BYTES / 1024} KiB, a QEMU 7.2 lost-pages workaround)`
      : `it has ${runningBytes} bytes of RAM, a target gets ${targetBytes}`;
  throw new EffectorError(
    ErrorCodes.VM_RESTART_NEEDED,
    `VM ${vm} cannot migrate: ${why}, and a target's QEMU would refuse its memory. Restart the VM once here (embot vm stop ${vm}, embot vm start ${vm}), then migrate it; nothing moved, it keeps running`,
    { details: { vm, runningRamBytes: runningBytes, targetRamBytes: targetBytes, accel } },
  );
}
