/**
 * Bad calls and bad peer input to the qemu fanOut session: refused with coded errors before any
 * QEMU migration starts. The migrator here is a recorder that must never be called (the real
 * driver path is in qemu-fan-out-driver.integration).
 */
import { describe, expect, it } from 'vitest';
import { EffectorError, ErrorCodes } from '../../core/errors.ts';
import type { MigrateOutOptions, MigrateOutResult } from '../../effectors/hypervisor/hypervisor-contract.ts';
import { QemuFanOutSession, type RelayMigrator } from '../../effectors/hypervisor/qemu/qemu-fan-out.ts';
import { expectThrownCode } from '../harness/expect-code.ts';

function recorder(): RelayMigrator & { readonly calls: string[] } {
  const calls: string[] = [];
  return {
    calls,
    migrateOut: (vm: string): Promise<MigrateOutResult> => {
      calls.push(vm);
      return Promise.reject(new Error('not to be called'));
    },
  };
}

const opts = (uri: string, extra: Partial<MigrateOutOptions> = {}): MigrateOutOptions => ({ endpoint: { uri }, ...extra });

describe('qemu fanOut session: bad calls', () => {
  it('refuses no destinations, an unknown one, one twice, more than one channel, and any call after close', async () => {
    const m = recorder();
    expectThrownCode(() => new QemuFanOutSession(m, 'vm', []), ErrorCodes.EFFECTOR_ARGS_INVALID, EffectorError);
    const s = new QemuFanOutSession(m, 'vm', ['b', 'c'], { joinWindowMs: 60_000 });
    await expect(s.migrateOut('x', opts('tcp:127.0.0.1:1'))).rejects.toMatchObject({ code: ErrorCodes.EFFECTOR_ARGS_INVALID });
    await expect(s.migrateOut('b', opts('tcp:127.0.0.1:1', { channels: 2 }))).rejects.toMatchObject({ code: ErrorCodes.DRIVER_UNSUPPORTED });
    const first = s.migrateOut('b', opts('tcp:127.0.0.1:1'));
    first.catch(() => undefined);
    await expect(s.migrateOut('b', opts('tcp:127.0.0.1:1'))).rejects.toMatchObject({ code: ErrorCodes.VM_BAD_STATE });
    s.close();
    await expect(first).rejects.toMatchObject({ code: ErrorCodes.MIGRATION_ABORTED });
    await expect(s.migrateOut('c', opts('tcp:127.0.0.1:1'))).rejects.toMatchObject({ code: ErrorCodes.MIGRATION_ABORTED });
    expect(m.calls).toEqual([]);
  });

  it('an endpoint from a peer that is not tcp:HOST:PORT fails every destination of the set with a coded error; QEMU is never asked to migrate', async () => {
    const m = recorder();
    const s = new QemuFanOutSession(m, 'vm', ['b', 'c']);
    const results = await Promise.allSettled([s.migrateOut('b', opts('exec:rm -rf /')), s.migrateOut('c', opts('tcp:127.0.0.1:4444'))]);
    s.close();
    for (const r of results) {
      expect(r.status).toBe('rejected');
      expect((r as PromiseRejectedResult).reason).toMatchObject({ code: ErrorCodes.EFFECTOR_ARGS_INVALID });
    }
    expect(m.calls).toEqual([]);
  });

  it('a destination aborted before the stream starts is refused with MIGRATION_ABORTED, and QEMU is not asked to migrate', async () => {
    const m = recorder();
    const s = new QemuFanOutSession(m, 'vm', ['b', 'c'], { joinWindowMs: 60_000 });
    const ac = new AbortController();
    const b = s.migrateOut('b', opts('tcp:127.0.0.1:1', { signal: ac.signal }));
    ac.abort();
    await expect(b).rejects.toMatchObject({ code: ErrorCodes.MIGRATION_ABORTED });
    s.close();
    expect(m.calls).toEqual([]);
  });
});
