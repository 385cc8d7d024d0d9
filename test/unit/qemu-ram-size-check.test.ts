import { describe, expect, it } from 'vitest';
import { EffectorError, ErrorCodes } from '../../core/errors.ts';
import { baseMemoryOf, checkRamForMigration } from '../../effectors/hypervisor/qemu/ram-size-check.ts';
import { RAM_PAD_BYTES } from '../../effectors/hypervisor/qemu/ram-size.ts';
import { expectThrownCode, thrownCode } from '../harness/expect-code.ts';

const MiB = 1024 * 1024;

describe('the RAM check before a qemu migration out (ram-size-check.ts)', () => {
  it('reads base-memory from a query-memory-size-summary reply', () => {
    expect(baseMemoryOf({ 'base-memory': 64 * MiB + RAM_PAD_BYTES, 'plugged-memory': 0 })).toBe(64 * MiB + RAM_PAD_BYTES);
    expect(baseMemoryOf({ 'base-memory': 64 * MiB })).toBe(64 * MiB);
  });

  it('bad input: a reply of another shape is a coded QMP_PROTOCOL error', () => {
    for (const bad of [null, undefined, 42, 'x', [], {}, { 'base-memory': '64' }, { 'base-memory': -1 }, { 'base-memory': 0 }, { 'base-memory': 1.5 }, { 'base-memory': 2 ** 60 }]) {
      expect(thrownCode(() => baseMemoryOf(bad), EffectorError), JSON.stringify(bad)).toBe(ErrorCodes.QMP_PROTOCOL);
    }
  });

  it('refuses a QEMU whose RAM is not what a target started now gets; passes one that is, or one not measured', () => {
    expectThrownCode(() => checkRamForMigration('v', 64 * MiB, 64 * MiB, 'tcg'), ErrorCodes.VM_RESTART_NEEDED, EffectorError);
    expectThrownCode(() => checkRamForMigration('v', 64 * MiB, 64 * MiB + RAM_PAD_BYTES, 'kvm'), ErrorCodes.VM_RESTART_NEEDED, EffectorError);
    expect(() => checkRamForMigration('v', 64 * MiB, 64 * MiB + RAM_PAD_BYTES, 'tcg')).not.toThrow();
    expect(() => checkRamForMigration('v', 64 * MiB, 64 * MiB, 'kvm')).not.toThrow();
    expect(() => checkRamForMigration('v', 64 * MiB, undefined, 'tcg')).not.toThrow();
  });

  it("the refusal says why and what to do, and carries both sizes", () => {
    let e: unknown;
    try {
      checkRamForMigration('web-1', 64 * MiB, 64 * MiB, 'tcg');
    } catch (x) {
      e = x;
    }
    expect(e).toBeInstanceOf(EffectorError);
    const err = e as EffectorError;
    expect(err.message).toMatch(/started before the RAM pad/);
    expect(err.message).toMatch(/Restart the VM once here \(embot vm stop web-1, embot vm start web-1\)/);
    expect(err.message).toMatch(/nothing moved, it keeps running/);
    expect(err.details).toEqual({ vm: 'web-1', runningRamBytes: 64 * MiB, targetRamBytes: 64 * MiB + RAM_PAD_BYTES, accel: 'tcg' });
  });
});
