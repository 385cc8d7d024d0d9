import { describe, expect, it } from 'vitest';
import { qemuArgs } from '../../effectors/hypervisor/qemu/qemu-process.ts';
import { DIRTY_SYNC_WORD_BYTES, RAM_PAD_BYTES, qemuRamArg } from '../../effectors/hypervisor/qemu/ram-size.ts';
import type { QemuVmSpec } from '../../effectors/hypervisor/qemu/vm-spec.ts';

const MiB = 1024 * 1024;

/** `-m 65544k` → bytes. */
const ramBytes = (arg: string): number => {
  const m = /^(\d+)k$/.exec(arg);
  if (!m) throw new Error(`not a size in KiB: ${arg}`);
  return Number(m[1]) * 1024;
};

describe('the RAM size QEMU is started with (ram-size.ts: QEMU 7.2 loses TCG pages on the 256 KiB fast path)', () => {
  it('under TCG every size a spec allows (whole MiB, 32 MiB..3 GiB) becomes one off a whole number of 256 KiB words, in QEMU 8 KiB steps, 8 KiB above the spec; under KVM the spec itself', () => {
    for (let mib = 32; mib <= 3072; mib++) {
      const bytes = ramBytes(qemuRamArg(mib * MiB, 'tcg'));
      expect(bytes - mib * MiB).toBe(RAM_PAD_BYTES);
      expect(bytes % DIRTY_SYNC_WORD_BYTES).not.toBe(0);
      expect(bytes % 8192).toBe(0);
      expect(ramBytes(qemuRamArg(mib * MiB, 'kvm'))).toBe(mib * MiB);
    }
  });

  it('the source and the incoming QEMU of one spec get the same -m (migration needs equal block lengths), and it is the padded one', () => {
    const spec: QemuVmSpec = { name: 'v', memory: 64 * MiB, vcpus: 1 };
    const m = (incoming: boolean): string => {
      const args = qemuArgs({ stateDir: '/nonexistent/v', spec, accel: 'tcg', incoming });
      return args[args.indexOf('-m') + 1]!;
    };
    expect(m(false)).toBe(m(true));
    expect(ramBytes(m(false))).toBe(64 * MiB + RAM_PAD_BYTES);
  });
});
