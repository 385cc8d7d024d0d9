/**
 * A migration out of a QEMU that already had one cancelled (a retry after an aborted migration): the
 * lost-pages bug of QEMU 7.2 under TCG (effectors/hypervisor/qemu/ram-size.ts). Real QEMU (TCG), the
 * writing test guest, the single path capped at 8 MiB/s so the copy spans several passes of the
 * guest's writes (a fast copy switches before a page can be written twice between syncs), and the guest
 * stops writing after its passes (some seconds) so the copy completes whatever the host's load. Without the
 * 8 KiB RAM pad the retried copy came out with stale pages; the pre-warm form is in
 * qemu-prewarm-driver.integration.test.ts.
 */
import { describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../core/errors.ts';
import type { MigrationProgress } from '../../effectors/hypervisor/hypervisor-contract.ts';
import { GUEST_RANGE_START, checkGuestMemory, guestRangeEnd } from '../../effectors/hypervisor/qemu/guest/guest-image.ts';
import { DIRTY_SYNC_WORD_BYTES, RAM_PAD_BYTES } from '../../effectors/hypervisor/qemu/ram-size.ts';
import type { QemuVmSpec } from '../../effectors/hypervisor/qemu/vm-spec.ts';
import { waitFor } from '../harness/agent-process.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { heartbeat, qemuDrivers, qemuTestFile, serialBytes } from '../harness/qemu-processes.ts';

const MiB = 1024 * 1024;
/** The guest writes ~50 passes a second here at load 4-6 (one serial byte each): some seconds of writing, then only reads. */
const PASSES = 400;
const { run, qemus } = qemuTestFile();
const cleanups = cleanupsAfterEach();

describe.skipIf(!run)('qemu: a migration after a cancelled one out of the same QEMU (TCG)', () => {
  it('an 8 MiB/s copy aborted after its first round, then retried to a fresh target at the same cap: the target commits intact memory, and QEMU runs the VM with its RAM off the 256 KiB fast path', async () => {
    const spec: QemuVmSpec = { name: 'rt', memory: 64 * MiB, vcpus: 1, testGuest: { delayLoops: 2000, limitMiB: 9, passes: PASSES } };
    const { a, b, c } = qemuDrivers(qemus, cleanups, ['a', 'b', 'c']);
    await a.create(spec);
    await a.start('rt');
    await heartbeat(a.stateDir('rt'), 2);
    // What QEMU itself made of -m: the block length the sync's fast path would take is what the pad avoids.
    const size = await a.qmp('rt')!.executeRaw('query-memory-size-summary');
    expect(size).toMatchObject({ 'base-memory': spec.memory + RAM_PAD_BYTES });
    expect((spec.memory + RAM_PAD_BYTES) % DIRTY_SYNC_WORD_BYTES).not.toBe(0);

    const cap = 8 * MiB;
    const eb = await b.prepareIncoming(spec);
    const abort = new AbortController();
    let last: MigrationProgress | undefined;
    const first = a.migrateOut('rt', { endpoint: eb.endpoint, downtimeLimitMs: 300, maxBandwidth: cap, signal: abort.signal, onProgress: (p) => void (last = p) });
    first.catch(() => undefined);
    // Past the bulk round: QEMU synced its dirty log at least twice, as a pre-warm's cancel does.
    await waitFor(() => (last !== undefined && last.rounds >= 2 ? true : undefined), 120_000, 'the first copy past its first round');
    abort.abort();
    await expect(first).rejects.toMatchObject({ code: ErrorCodes.MIGRATION_ABORTED });
    expect(a.get('rt')?.state).toBe('running');
    await b.abortIncoming('rt');
    await heartbeat(a.stateDir('rt'), 2);

    const ec = await c.prepareIncoming(spec);
    // Still writing for a while when the retry starts, or it would prove nothing.
    expect(serialBytes(a.stateDir('rt'))).toBeLessThan(PASSES - 100);
    let rounds = 0;
    // The guest dirties its 9 MiB faster than the cap sends them: the copy goes round after round until the guest's
    // passes end (it then only reads), and completes.
    const r = await a.migrateOut('rt', { endpoint: ec.endpoint, downtimeLimitMs: 300, maxBandwidth: cap, onProgress: (p) => void (rounds = p.rounds) });
    // Several syncs with the guest running between them: the window the bug needs.
    expect(Math.max(rounds, r.rounds)).toBeGreaterThanOrEqual(3);
    await c.commitIncoming('rt', { running: true, timeoutMs: 30_000 });
    await heartbeat(c.stateDir('rt'), 2);
    await c.pause('rt');
    const end = guestRangeEnd(spec.memory, 9);
    const check = checkGuestMemory(await c.capabilities.memoryDump!.dump('rt', GUEST_RANGE_START, end - GUEST_RANGE_START));
    expect(check, JSON.stringify(check)).toMatchObject({ ok: true });
  }, 180_000);
});
