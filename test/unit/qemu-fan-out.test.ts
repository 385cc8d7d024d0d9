/**
 * Bad calls and bad peer input to the qemu fanOut session: refused with coded errors before any
 * QEMU migration starts. The migrator here is a recorder that must never be called (the real
 * driver path is in qemu-fan-out-driver.integration).
 */
import { createServer } from 'node:net';
import { describe, expect, it } from 'vitest';
import { EffectorError, ErrorCodes } from '../../core/errors.ts';
import type { MigrateOutOptions, MigrateOutResult } from '../../effectors/hypervisor/hypervisor-contract.ts';
import { QemuFanOutSession, type RelayMigrator } from '../../effectors/hypervisor/qemu/qemu-fan-out.ts';
import { waitFor } from '../harness/agent-process.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { expectThrownCode } from '../harness/expect-code.ts';

const cleanups = cleanupsAfterEach();

function recorder(): RelayMigrator & { readonly calls: string[]; readonly options: (MigrateOutOptions & { readonly viaLocalRelay?: true })[] } {
  const calls: string[] = [];
  const options: (MigrateOutOptions & { readonly viaLocalRelay?: true })[] = [];
  return {
    calls,
    options,
    migrateOut: (vm, o): Promise<MigrateOutResult> => {
      calls.push(vm);
      options.push(o);
      return Promise.reject(new Error('not to be called'));
    },
  };
}

const opts = (uri: string, extra: Partial<MigrateOutOptions> = {}): MigrateOutOptions => ({ endpoint: { uri }, ...extra });

describe('qemu fanOut session: bad calls', () => {
  it('refuses no destinations, an unknown one, one twice, more than one channel through a relay that is sure, and any call after close', async () => {
    const m = recorder();
    expectThrownCode(() => new QemuFanOutSession(m, 'vm', []), ErrorCodes.EFFECTOR_ARGS_INVALID, EffectorError);
    const relayed = new QemuFanOutSession(m, 'vm', ['b'], { relayAlways: true });
    await expect(relayed.migrateOut('b', opts('tcp:127.0.0.1:1', { channels: 2 }))).rejects.toMatchObject({ code: ErrorCodes.DRIVER_UNSUPPORTED });
    relayed.close();
    const s = new QemuFanOutSession(m, 'vm', ['b', 'c'], { joinWindowMs: 60_000 });
    await expect(s.migrateOut('x', opts('tcp:127.0.0.1:1'))).rejects.toMatchObject({ code: ErrorCodes.EFFECTOR_ARGS_INVALID });
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

  it('starts the stream once every other destination has withdrawn (its child ended before its copy), not after the join window; a withdrawn one cannot join later', async () => {
    // A real listener stands for b's incoming QEMU (b, left alone, goes straight to it: nothing connects through a relay).
    const server = createServer((c) => c.on('error', () => undefined).resume());
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    cleanups.push(() => new Promise<void>((r) => server.close(() => r())));
    const port = (server.address() as { port: number }).port;
    const m = recorder();
    const s = new QemuFanOutSession(m, 'vm', ['b', 'c', 'd'], { joinWindowMs: 600_000 });
    cleanups.push(() => s.close());
    const b = s.migrateOut('b', opts(`tcp:127.0.0.1:${port}`));
    b.catch(() => undefined);
    s.withdraw('c');
    s.withdraw('nobody');
    await new Promise((r) => setTimeout(r, 50));
    // d has neither called nor withdrawn: still waiting.
    expect(m.calls).toEqual([]);
    s.withdraw('d');
    await waitFor(() => (m.calls.length > 0 ? true : undefined), 10_000, 'QEMU asked to migrate');
    expect(m.calls).toEqual(['vm']);
    // The only destination left: straight to b's endpoint, not into a relay.
    expect(m.options[0]).toMatchObject({ endpoint: { uri: `tcp:127.0.0.1:${port}` }, targetName: 'b' });
    expect(m.options[0]!.viaLocalRelay).toBeUndefined();
    // The recorder's migrate fails, and with it b's copy.
    await expect(b).rejects.toThrow(/not to be called|dropped/);
    await expect(s.migrateOut('c', opts(`tcp:127.0.0.1:${port}`))).rejects.toMatchObject({ code: ErrorCodes.MIGRATION_ABORTED });
  });

  it('one destination alone: its endpoint from a peer that is not tcp:HOST:PORT is refused with a coded error, QEMU never asked to migrate (no relay to check it)', async () => {
    const m = recorder();
    const s = new QemuFanOutSession(m, 'vm', ['b']);
    await expect(s.migrateOut('b', opts('exec:rm -rf /'))).rejects.toMatchObject({ code: ErrorCodes.EFFECTOR_ARGS_INVALID });
    s.close();
    expect(m.calls).toEqual([]);
  });

  it('two destinations, one with two channels: at the start that one is refused (a relay carries one channel) and the other, alone, goes straight to its own endpoint with its own options', async () => {
    const m = recorder();
    const s = new QemuFanOutSession(m, 'vm', ['b', 'c'], { joinWindowMs: 60_000 });
    cleanups.push(() => s.close());
    const b = s.migrateOut('b', opts('tcp:127.0.0.1:4001', { channels: 2 }));
    const c = s.migrateOut('c', opts('tcp:127.0.0.1:4002', { downtimeLimitMs: 77, targetName: 'agent-c' }));
    await expect(b).rejects.toMatchObject({ code: ErrorCodes.DRIVER_UNSUPPORTED, details: { destination: 'b' } });
    await expect(c).rejects.toThrow(/not to be called/);
    expect(m.options).toHaveLength(1);
    expect(m.options[0]).toMatchObject({ endpoint: { uri: 'tcp:127.0.0.1:4002' }, downtimeLimitMs: 77, targetName: 'agent-c' });
    expect(m.options[0]!.viaLocalRelay).toBeUndefined();
  });
});
