/**
 * A pre-warm's hold with the qemu driver (issue 13 point 4, qemu-prewarm.ts): one source driver,
 * two target drivers, the one QEMU stream through the relay, held by QEMU's own parameters until
 * the gate lifts (the reserve hold: a 64 MiB guest is never measured as a hard writer). Real QEMU
 * (TCG), the dirty guest. And a pre-warm of one destination: QEMU straight to it, held the same way.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../core/errors.ts';
import type { FanOutSession, MigrateOutResult, MigrationProgress } from '../../effectors/hypervisor/hypervisor-contract.ts';
import { PrewarmGate } from '../../effectors/hypervisor/prewarm-gate.ts';
import { GUEST_RANGE_START, checkGuestMemory, guestRangeEnd } from '../../effectors/hypervisor/qemu/guest/guest-image.ts';
import { QemuDriver } from '../../effectors/hypervisor/qemu/qemu-driver.ts';
import { HEAVY_DIRTY_RATE, reserveBytes } from '../../effectors/hypervisor/qemu/qemu-prewarm.ts';
import type { QemuVmSpec } from '../../effectors/hypervisor/qemu/vm-spec.ts';
import { waitFor } from '../harness/agent-process.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { heartbeat, qemuDrivers, qemuTestFile, serialBytes } from '../harness/qemu-processes.ts';

const MiB = 1024 * 1024;
const { run, qemus } = qemuTestFile();
const cleanups = cleanupsAfterEach();

const drivers = (): Record<'a' | 'b' | 'c', QemuDriver> => qemuDrivers(qemus, cleanups, ['a', 'b', 'c']);

async function warmFromRunningA(spec: QemuVmSpec, beats = 2) {
  const { a, b, c } = drivers();
  await a.create(spec);
  await a.start(spec.name);
  if (beats > 0) await heartbeat(a.stateDir(spec.name), beats);
  const [eb, ec] = await Promise.all([b.prepareIncoming(spec), c.prepareIncoming(spec)]);
  const session = a.capabilities.fanOut!.begin(spec.name, ['b', 'c']);
  return { a, b, c, eb, ec, session };
}

describe.skipIf(!run)('qemu pre-warm: the one stream held until the gate lifts (TCG)', () => {
  it('a guest writing 8 MiB of its 64: the copy sends all but the reserve and crawls, the guest runs at a, nothing completes; lifted, both destinations complete and the committed one runs intact', async () => {
    // The 64 MiB VM is sampled at most 64 MiB/s by calc-dirty-rate: below HEAVY_DIRTY_RATE, so the reserve hold.
    const spec: QemuVmSpec = { name: 'pw', memory: 64 * MiB, vcpus: 1, testGuest: { delayLoops: 2000, limitMiB: 9 } };
    expect(qemuFanOutPrewarm()).toBe(true);
    const { a, b, c, eb, ec, session } = await warmFromRunningA(spec);
    const gate = new PrewarmGate();
    let last: MigrationProgress | undefined;
    let switches = 0;
    const opts = (endpoint: { uri: string }) => ({
      endpoint,
      downtimeLimitMs: 500,
      autoConverge: true,
      prewarm: gate,
      beforeSwitchover: async () => void switches++,
      onProgress: (p: MigrationProgress) => void (last = p),
    });
    let settled = false;
    const both = Promise.all([session.migrateOut('b', opts(eb.endpoint)), session.migrateOut('c', opts(ec.endpoint))]).finally(() => (settled = true));
    both.catch(() => undefined);
    // All but the reserve sent: the copy counts as past its first round and crawls.
    await waitFor(() => (last !== undefined && last.rounds >= 2 && last.remainingBytes <= reserveBytes(spec.memory) ? true : undefined), 120_000, 'all but the reserve sent');
    const beat = serialBytes(a.stateDir('pw'));
    const remaining = last!.remainingBytes;
    await new Promise((r) => setTimeout(r, 4000));
    expect(settled).toBe(false);
    expect(switches).toBe(0);
    expect(a.get('pw')?.state).toBe('running');
    expect(serialBytes(a.stateDir('pw'))).toBeGreaterThan(beat);
    expect(last!.phase).toBe('precopy');
    // Crawling: about a page per 100 ms window, far from caught up.
    expect(last!.remainingBytes).toBeGreaterThan(remaining / 2);
    expect(last!.rateBytesPerSec).toBeGreaterThan(0);
    gate.lift();
    const [rb, rc] = await both;
    session.close();
    expect(switches).toBe(2);
    expect(rb.bytes).toBe(rc.bytes);
    await Promise.all([b.capabilities.incomingBoot!.bootIncoming('pw', { timeoutMs: 30_000 }), c.capabilities.incomingBoot!.bootIncoming('pw', { timeoutMs: 30_000 })]);
    await b.abortIncoming('pw');
    await c.commitIncoming('pw', { running: true, timeoutMs: 30_000 });
    await heartbeat(c.stateDir('pw'), 2);
    expect(b.pid('pw')).toBeUndefined();
    await c.pause('pw');
    const end = guestRangeEnd(64 * MiB, 9);
    const check = checkGuestMemory(await c.capabilities.memoryDump!.dump('pw', GUEST_RANGE_START, end - GUEST_RANGE_START));
    expect(check, JSON.stringify(check)).toMatchObject({ ok: true });
  }, 300_000);

  it('a guest that writes nothing is held too (a 1 ms limit alone would have let QEMU complete at once), longer than its time budget, and switches after the lift', async () => {
    // Two passes, then read-only: nothing dirtied, QEMU would complete whatever the limit once caught up.
    const spec: QemuVmSpec = { name: 'quiet', memory: 64 * MiB, vcpus: 1, testGuest: { passes: 2 } };
    const { a, c, eb, ec, session } = await warmFromRunningA(spec, 0);
    await waitFor(() => (serialBytes(a.stateDir('quiet')) >= 2 ? true : undefined), 30_000, 'two passes of the quiet guest');
    const gate = new PrewarmGate();
    let last: MigrationProgress | undefined;
    // The budget counts from the lift: a copy warm for longer than it still switches (issue 13: one warm
    // for 2m48s was cancelled at its lift as "did not converge within 115000 ms").
    const opts = (endpoint: { uri: string }) => ({ endpoint, downtimeLimitMs: 500, timeBudgetMs: 2000, prewarm: gate, onProgress: (p: MigrationProgress) => void (last = p) });
    let settled = false;
    const both = Promise.allSettled([session.migrateOut('b', opts(eb.endpoint)), session.migrateOut('c', opts(ec.endpoint))]).finally(() => (settled = true));
    await waitFor(() => (last !== undefined && last.rounds >= 2 ? true : undefined), 120_000, 'all but the reserve sent');
    await new Promise((r) => setTimeout(r, 3000));
    expect(settled, settled ? JSON.stringify((await both).map((r) => (r.status === 'rejected' ? String(r.reason) : 'done')).concat(JSON.stringify(last))) : '').toBe(false);
    expect(a.get('quiet')?.state).toBe('running');
    gate.lift();
    const results = await both;
    session.close();
    expect(results.map((r) => (r.status === 'rejected' ? String(r.reason) : r.status))).toEqual(['fulfilled', 'fulfilled']);
    await c.capabilities.incomingBoot!.bootIncoming('quiet', { timeoutMs: 30_000 });
    await c.commitIncoming('quiet', { running: true, timeoutMs: 30_000 });
    expect(c.get('quiet')?.state).toBe('running');
  }, 300_000);

  it('a guest that wrote 8 MiB of its 64 and went quiet (a tail of zero pages, nothing dirtied): held for seconds, also with a poll 0.5 s late during the approach, then switched intact', async () => {
    // Issue 13: QEMU sends a zero page as 9 bytes, so under a byte cap the zero tail went in one poll, the pass ended,
    // the re-read found nothing dirtied and QEMU reached pre-switchover while held (holdLost). Now paced by the page map.
    const spec: QemuVmSpec = { name: 'sparse', memory: 64 * MiB, vcpus: 1, testGuest: { passes: 2, limitMiB: 9 } };
    const { a, b } = drivers();
    await a.create(spec);
    await a.start('sparse');
    await waitFor(() => (serialBytes(a.stateDir('sparse')) >= 2 ? true : undefined), 30_000, 'two passes of the guest');
    const eb = await b.prepareIncoming(spec);
    const session = a.capabilities.fanOut!.begin('sparse', ['b']);
    const gate = new PrewarmGate();
    let last: MigrationProgress | undefined;
    let late = false;
    let settled = false;
    const onProgress = (p: MigrationProgress): void => {
      last = p;
      if (!late && p.phase === 'precopy' && p.remainingBytes > 0 && p.remainingBytes < 60 * MiB) {
        // The driver's event loop held, as a loaded host holds it: its next poll (and any change of the cap) comes 0.5 s late.
        late = true;
        const until = Date.now() + 500;
        while (Date.now() < until) {
          /* busy: a real stall of this process */
        }
      }
    };
    const done = session.migrateOut('b', { endpoint: eb.endpoint, downtimeLimitMs: 500, prewarm: gate, onProgress }).finally(() => (settled = true));
    done.catch(() => undefined);
    await waitFor(() => (settled || (last !== undefined && last.rounds >= 2 && last.remainingBytes <= reserveBytes(spec.memory)) ? true : undefined), 120_000, 'all but the reserve sent');
    await new Promise((r) => setTimeout(r, 4000));
    if (settled) await done; // a hold lost says so (holdLost) instead of a bare false below
    expect(settled).toBe(false);
    expect(late).toBe(true);
    expect(a.get('sparse')?.state).toBe('running');
    expect(last!.phase).toBe('precopy');
    expect(last!.remainingBytes).toBeGreaterThan(0);
    gate.lift();
    await done;
    session.close();
    await b.capabilities.incomingBoot!.bootIncoming('sparse', { timeoutMs: 30_000 });
    await b.commitIncoming('sparse', { running: true, timeoutMs: 30_000 });
    await b.pause('sparse');
    const end = guestRangeEnd(spec.memory, 9);
    const check = checkGuestMemory(await b.capabilities.memoryDump!.dump('sparse', GUEST_RANGE_START, end - GUEST_RANGE_START));
    expect(check, JSON.stringify(check)).toMatchObject({ ok: true });
  }, 300_000);

  it('a guest that writes hard (a 256 MiB VM sampled at 128 MiB/s or more) gets the 1 ms limit hold: held, the copy keeps re-sending past the whole VM while the guest runs; lifted, it switches and runs intact', async (ctx) => {
    const spec: QemuVmSpec = { name: 'lim', memory: 256 * MiB, vcpus: 1, testGuest: { delayLoops: 0 } };
    const { a, b } = drivers();
    await a.create(spec);
    await a.start('lim');
    await heartbeat(a.stateDir('lim'), 1, 60_000);
    // The driver chooses the hold from this same measurement; a host too loaded for the guest to write that fast cannot run this case.
    const sampled = await a.measureDirtyRate('lim', 1);
    if (sampled < HEAVY_DIRTY_RATE * 1.2) ctx.skip();
    const eb = await b.prepareIncoming(spec);
    const session = a.capabilities.fanOut!.begin('lim', ['b']);
    const gate = new PrewarmGate();
    let last: MigrationProgress | undefined;
    let settled = false;
    const done = session.migrateOut('b', { endpoint: eb.endpoint, downtimeLimitMs: 500, autoConverge: true, prewarm: gate, onProgress: (p) => void (last = p) }).finally(() => (settled = true));
    done.catch(() => undefined);
    await waitFor(() => (last !== undefined && last.transferredBytes > spec.memory && last.rounds >= 5 ? true : undefined), 180_000, 'held rounds past the whole VM');
    const sent = last!.transferredBytes;
    const beat = serialBytes(a.stateDir('lim'));
    await new Promise((r) => setTimeout(r, 3000));
    expect(settled).toBe(false);
    expect(a.get('lim')?.state).toBe('running');
    expect(serialBytes(a.stateDir('lim'))).toBeGreaterThan(beat);
    expect(last!.transferredBytes).toBeGreaterThan(sent);
    gate.lift();
    await done;
    session.close();
    await b.capabilities.incomingBoot!.bootIncoming('lim', { timeoutMs: 60_000 });
    await b.commitIncoming('lim', { running: true, timeoutMs: 60_000 });
    await b.pause('lim');
    const end = guestRangeEnd(spec.memory);
    const check = checkGuestMemory(await b.capabilities.memoryDump!.dump('lim', GUEST_RANGE_START, end - GUEST_RANGE_START));
    expect(check, JSON.stringify(check)).toMatchObject({ ok: true });
  }, 420_000);
});

describe.skipIf(!run)('qemu pre-warm of one destination: QEMU straight to it, held the same way (TCG)', () => {
  // The second case is the regression test of the lost-pages bug (ram-size.ts): without the 8 KiB pad on the VM's RAM,
  // QEMU 7.2 under TCG lost dirtied pages of the copy that follows a cancelled one in 5 of 6 runs (0 of 6 with it).
  for (const cancelFirst of [false, true]) {
    it(`a guest writing 8 MiB of its 64, one destination${cancelFirst ? ', after a first pre-warm cancelled while warm' : ''}: held (all but the reserve sent, the guest running at a), lifted, transport direct and the committed copy runs intact`, async () => {
      const spec: QemuVmSpec = { name: 'pw1', memory: 64 * MiB, vcpus: 1, testGuest: { delayLoops: 2000, limitMiB: 9 } };
      const { a, b } = drivers();
      await a.create(spec);
      await a.start('pw1');
      await heartbeat(a.stateDir('pw1'), 2);
      const warmOnce = async (): Promise<{ gate: PrewarmGate; done: Promise<MigrateOutResult>; session: FanOutSession }> => {
        const eb = await b.prepareIncoming(spec);
        const session = a.capabilities.fanOut!.begin('pw1', ['b']);
        const gate = new PrewarmGate();
        let last: MigrationProgress | undefined;
        const done = session.migrateOut('b', { endpoint: eb.endpoint, downtimeLimitMs: 500, autoConverge: true, prewarm: gate, onProgress: (p) => void (last = p) });
        done.catch(() => undefined);
        await waitFor(() => (last !== undefined && last.rounds >= 2 && last.remainingBytes <= reserveBytes(spec.memory) ? true : undefined), 120_000, 'all but the reserve sent');
        return { gate, done, session };
      };
      if (cancelFirst) {
        const { done, session } = await warmOnce();
        session.close();
        await expect(done).rejects.toMatchObject({ code: ErrorCodes.MIGRATION_ABORTED });
        expect(a.get('pw1')?.state).toBe('running');
        await b.abortIncoming('pw1');
        await heartbeat(a.stateDir('pw1'), 2);
      }
      const { gate, done, session } = await warmOnce();
      const beat = serialBytes(a.stateDir('pw1'));
      await new Promise((r) => setTimeout(r, 2000));
      expect(a.get('pw1')?.state).toBe('running');
      expect(serialBytes(a.stateDir('pw1'))).toBeGreaterThan(beat);
      gate.lift();
      const r = await done;
      session.close();
      expect(r.transport).toBe('direct');
      await b.capabilities.incomingBoot!.bootIncoming('pw1', { timeoutMs: 30_000 });
      await b.commitIncoming('pw1', { running: true, timeoutMs: 30_000 });
      await heartbeat(b.stateDir('pw1'), 2);
      await b.pause('pw1');
      const end = guestRangeEnd(64 * MiB, 9);
      const check = checkGuestMemory(await b.capabilities.memoryDump!.dump('pw1', GUEST_RANGE_START, end - GUEST_RANGE_START));
      expect(check, JSON.stringify(check)).toMatchObject({ ok: true });
    }, 300_000);
  }
});

function qemuFanOutPrewarm(): boolean | undefined {
  const d = new QemuDriver({ root: join(qemus.root(), 'cap'), accel: 'tcg' });
  cleanups.push(() => d.close());
  return d.capabilities.fanOut?.prewarm;
}
