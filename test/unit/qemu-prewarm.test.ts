/**
 * The qemu pre-warm's hold (qemu-prewarm.ts) on its own: which QEMU parameters it sets when, and
 * the rate it reports while held. The monitor is a recorder of the parameters sent (the real QEMU
 * side is qemu-prewarm-driver.integration).
 */
import { mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { MigrationProgress } from '../../effectors/hypervisor/hypervisor-contract.ts';
import { PrewarmGate } from '../../effectors/hypervisor/prewarm-gate.ts';
import {
  CRAWL_BANDWIDTH,
  DATA_PAGE_COST,
  HEAVY_DIRTY_RATE,
  HOLD_DOWNTIME_LIMIT_MS,
  HOLD_SAFE_MS,
  PageCosts,
  QemuCopyHold,
  ZERO_PAGE_COST,
  heldParameters,
  holdMode,
  mapZeroPages,
  reserveBytes,
} from '../../effectors/hypervisor/qemu/qemu-prewarm.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';

const MiB = 1 << 20;
const cleanups = cleanupsAfterEach();
/** A 64 MiB VM, the driver's 100 ms poll: a `limit` hold unless a test says otherwise. */
const LIMIT = { mode: 'limit' as const, memoryBytes: 64 * MiB, pollMs: 100 };
const RESERVE = { ...LIMIT, mode: 'reserve' as const };

const tick = (): Promise<void> => new Promise((r) => setTimeout(r, 0));

function progress(p: Partial<MigrationProgress>): MigrationProgress {
  return { phase: 'precopy', rounds: 1, transferredBytes: 0, remainingBytes: 0, rateBytesPerSec: 0, dirtyRateBytesPerSec: 0, expectedDowntimeMs: 0, throttle: 0, channels: 1, ...p };
}

function recorder(): { sent: Record<string, number>[]; set: (p: Readonly<Record<string, number>>) => Promise<unknown> } {
  const sent: Record<string, number>[] = [];
  return { sent, set: async (p) => void sent.push({ ...p }) };
}

describe('qemu pre-warm hold', () => {
  it('starts with a 1 ms downtime limit and the throttle capped at 1 %; a reserve hold also caps the bulk copy at half the reserve per poll', () => {
    expect(heldParameters(LIMIT)).toEqual({ 'downtime-limit': HOLD_DOWNTIME_LIMIT_MS, 'cpu-throttle-initial': 1, 'max-cpu-throttle': 1 });
    expect(HOLD_DOWNTIME_LIMIT_MS).toBe(1);
    expect(reserveBytes(64 * MiB)).toBe(8 * MiB);
    expect(heldParameters(RESERVE)).toEqual({ 'downtime-limit': 1, 'cpu-throttle-initial': 1, 'max-cpu-throttle': 1, 'max-bandwidth': 40 * MiB });
    // The migration's own cap wins when it is lower.
    expect(heldParameters({ ...RESERVE, maxBandwidth: MiB })['max-bandwidth']).toBe(MiB);
  });

  it('the mode: the 1 ms limit only for a guest measured to write hard, else the reserve (it cannot be lost); the reserve is an eighth of the VM within 4..256 MiB', () => {
    expect(holdMode(undefined)).toBe('reserve');
    expect(holdMode(HEAVY_DIRTY_RATE - 1)).toBe('reserve');
    expect(holdMode(HEAVY_DIRTY_RATE)).toBe('limit');
    expect(reserveBytes(16 * MiB)).toBe(4 * MiB);
    expect(reserveBytes(8192 * MiB)).toBe(256 * MiB);
  });

  it('a reserve hold crawls once only the reserve is left (one page per window), counts as past its first round, and gets its own cap back at the lift', async () => {
    const gate = new PrewarmGate();
    const m = recorder();
    const hold = new QemuCopyHold(m.set, gate, { ...RESERVE, downtimeLimitMs: 300, maxBandwidth: 50 * MiB });
    expect(hold.progress(progress({ rounds: 1, remainingBytes: 30 * MiB, rateBytesPerSec: 20 * MiB })).rounds).toBe(1);
    await tick();
    expect(m.sent).toEqual([]);
    // Three reserves left: an eighth of the reserve per poll from here (10 MiB/s), so a late poll still finds the reserve.
    hold.progress(progress({ rounds: 1, remainingBytes: 24 * MiB - 4096, rateBytesPerSec: 20 * MiB }));
    hold.progress(progress({ rounds: 1, remainingBytes: 20 * MiB, rateBytesPerSec: 10 * MiB }));
    await tick();
    expect(m.sent).toEqual([{ 'max-bandwidth': 10 * MiB }]);
    m.sent.length = 0;
    const crawl = hold.progress(progress({ rounds: 1, remainingBytes: 8 * MiB - 4096, rateBytesPerSec: 10 * MiB }));
    expect(crawl.rounds).toBe(2);
    // The rate judged is the highest the copy had (the first bulk cap's).
    expect(crawl.rateBytesPerSec).toBe(20 * MiB);
    hold.progress(progress({ rounds: 1, remainingBytes: 8 * MiB - 8192 }));
    await tick();
    expect(m.sent).toEqual([{ 'max-bandwidth': CRAWL_BANDWIDTH }]);
    gate.lift();
    await tick();
    await tick();
    expect(m.sent.at(-1)).toMatchObject({ 'downtime-limit': 300, 'max-bandwidth': 50 * MiB });
    // After the lift QEMU's own rounds again.
    expect(hold.progress(progress({ rounds: 1, remainingBytes: MiB })).rounds).toBe(1);
  });

  it('a limit hold does not crawl while the guest writes hard (or before QEMU has measured it), however little is left of a round', async () => {
    const m = recorder();
    const hold = new QemuCopyHold(m.set, new PrewarmGate(), { ...LIMIT, downtimeLimitMs: 300 });
    hold.progress(progress({ rounds: 1, remainingBytes: 4096 }));
    hold.progress(progress({ rounds: 6, remainingBytes: 4096, dirtyRateBytesPerSec: HEAVY_DIRTY_RATE }));
    await tick();
    expect(m.sent).toEqual([]);
  });

  it('a limit hold whose guest QEMU measures below half the heavy rate (starved on a loaded host) crawls with what is left of the round, once', async () => {
    const m = recorder();
    const gate = new PrewarmGate();
    const hold = new QemuCopyHold(m.set, gate, { ...LIMIT, memoryBytes: 256 * MiB, downtimeLimitMs: 300 });
    hold.progress(progress({ rounds: 5, remainingBytes: 90 * MiB, dirtyRateBytesPerSec: 250 * MiB }));
    const slowed = hold.progress(progress({ rounds: 6, remainingBytes: 40 * MiB, dirtyRateBytesPerSec: HEAVY_DIRTY_RATE / 2 - 1 }));
    hold.progress(progress({ rounds: 6, remainingBytes: 40 * MiB - 4096, dirtyRateBytesPerSec: 1 }));
    await tick();
    expect(m.sent).toEqual([{ 'max-bandwidth': CRAWL_BANDWIDTH }]);
    expect(slowed.rounds).toBe(6);
    gate.lift();
    await tick();
    await tick();
    expect(m.sent.at(-1)).toMatchObject({ 'downtime-limit': 300, 'max-bandwidth': 1024 ** 4 });
  });

  it('the command gives the throttle back (limit still held); the lift sets the real downtime limit and wakes the driver', async () => {
    const gate = new PrewarmGate();
    const m = recorder();
    let changes = 0;
    const hold = new QemuCopyHold(m.set, gate, { ...LIMIT, downtimeLimitMs: 499.6, cpuThrottleInitial: 30, onChange: () => changes++ });
    await tick();
    expect(m.sent).toEqual([]);
    expect(hold.holding()).toBe(true);
    gate.command();
    await tick();
    expect(m.sent).toEqual([{ 'cpu-throttle-initial': 30, 'max-cpu-throttle': 99 }]);
    expect(hold.holding()).toBe(true);
    expect(hold.liftedAt).toBeUndefined();
    expect(hold.budgetStart(), 'no budget runs while held, the command come or not').toBeUndefined();
    const beforeLift = Date.now();
    gate.lift();
    expect(hold.holding()).toBe(false);
    // The budget starts at the lift at once, not a monitor round trip later (nor at the pre-warm's start).
    expect(hold.liftedAt).toBeUndefined();
    expect(hold.budgetStart()).toBeGreaterThanOrEqual(beforeLift);
    await tick();
    await tick();
    expect(m.sent[1]).toEqual({ 'cpu-throttle-initial': 30, 'max-cpu-throttle': 99, 'downtime-limit': 500, 'max-bandwidth': 1024 ** 4 });
    expect(hold.liftedAt).toBeTypeOf('number');
    expect(changes).toBeGreaterThanOrEqual(2);
  });

  it("QEMU's throttle default when none is configured; a lift without a command still restores it", async () => {
    const gate = new PrewarmGate();
    const m = recorder();
    new QemuCopyHold(m.set, gate, { ...LIMIT, downtimeLimitMs: 300 });
    gate.lift();
    await tick();
    await tick();
    expect(m.sent).toEqual([{ 'cpu-throttle-initial': 20, 'max-cpu-throttle': 99, 'downtime-limit': 300, 'max-bandwidth': 1024 ** 4 }]);
  });

  it('after close (the migration ended) the gate touches QEMU no more', async () => {
    const gate = new PrewarmGate();
    const m = recorder();
    const hold = new QemuCopyHold(m.set, gate, { ...LIMIT, downtimeLimitMs: 300 });
    hold.close();
    gate.lift();
    await tick();
    await tick();
    expect(m.sent).toEqual([]);
  });

  it('a failed parameter change is reported, not thrown', async () => {
    const gate = new PrewarmGate();
    const errors: unknown[] = [];
    const hold = new QemuCopyHold(() => Promise.reject(new Error('monitor gone')), gate, { ...LIMIT, downtimeLimitMs: 300, onError: (e) => errors.push(e) });
    gate.lift();
    await tick();
    await tick();
    expect(errors).toHaveLength(1);
    expect(String(errors[0])).toContain('monitor gone');
    // The driver ends the migration with it; the lift never counts as applied.
    expect(String(hold.failure)).toContain('monitor gone');
    expect(hold.liftedAt).toBeUndefined();
  });

  it("reports the highest rate of the migration while held (QEMU's own rate then is only what is dirtied), the rest as QEMU gives it", () => {
    const hold = new QemuCopyHold(recorder().set, new PrewarmGate(), { ...LIMIT, downtimeLimitMs: 300 });
    expect(hold.progress(progress({ rateBytesPerSec: 400e6, rounds: 1 })).rateBytesPerSec).toBe(400e6);
    const held = hold.progress(progress({ rateBytesPerSec: 2e6, dirtyRateBytesPerSec: 2e6, remainingBytes: 8192, rounds: 9 }));
    expect(held).toMatchObject({ rateBytesPerSec: 400e6, dirtyRateBytesPerSec: 2e6, remainingBytes: 8192, rounds: 9 });
  });

  it('the page map: what the last pages of a pass cost, pages past the map (QEMU\'s smaller blocks) taken as zero pages', () => {
    const costs = new PageCosts(Uint8Array.from([0, 0, 1, 1, 1, 1, 1, 1]));
    expect(costs.pages).toBe(8);
    expect(costs.costOfLast(3, 8)).toBe(3 * ZERO_PAGE_COST);
    expect(costs.costOfLast(8, 8)).toBe(2 * DATA_PAGE_COST + 6 * ZERO_PAGE_COST);
    expect(costs.costOfLast(10, 10)).toBe(2 * DATA_PAGE_COST + 8 * ZERO_PAGE_COST);
    expect(costs.costOfLast(1, 10)).toBe(ZERO_PAGE_COST);
    expect(costs.costOfLast(0, 8)).toBe(0);
  });

  describe('a guest that wrote 8 MiB of its 64 (a tail of zero pages): the sequence that lost the hold', () => {
    // The guest's pages from 1 MiB to 9 MiB hold data, the rest is zeros; QEMU's RAM also has 384 KiB of ROM blocks after it.
    const PAGES = (64 * MiB) / 4096;
    const map = new Uint8Array(PAGES).fill(1).fill(0, 256, 2304);
    const costs = new PageCosts(map);
    const total = 64 * MiB + 384 * 1024;
    const SPARSE = { ...RESERVE, pageCosts: costs };
    /** What the rest of the pass costs with `remaining` unsent. */
    const passCost = (remaining: number): number => costs.costOfLast(Math.ceil(remaining / 4096), total / 4096);

    it('starts capped so that the whole pass takes HOLD_SAFE_MS (not the bulk cap, which sends the zero tail within one poll)', () => {
      const cap = heldParameters(SPARSE)['max-bandwidth']!;
      expect(cap).toBeLessThan(heldParameters(RESERVE)['max-bandwidth']!);
      expect((cap * HOLD_SAFE_MS) / 1000).toBeLessThanOrEqual(passCost(64 * MiB));
    });

    it('each poll of the first pass lowers the cap with what the pass has left, so a poll up to 0.8 × HOLD_SAFE_MS late still finds it unfinished; the crawl once the rest costs half the reserve; the reserve reported at what it costs', async () => {
      const m = recorder();
      const hold = new QemuCopyHold(m.set, new PrewarmGate(), { ...SPARSE, downtimeLimitMs: 300 });
      let cap = heldParameters(SPARSE)['max-bandwidth']!;
      // QEMU's first reading of the run that lost it, then the guest's data going (it ends 55.375 MiB before the end of QEMU's RAM).
      const seen = [66473984, 61 * MiB, 59.5 * MiB];
      for (const remaining of seen) {
        hold.progress(progress({ rounds: 1, remainingBytes: remaining, rateBytesPerSec: 9 * MiB }), total);
        await tick();
        cap = (m.sent.at(-1)?.['max-bandwidth'] as number | undefined) ?? cap;
        // What the cap sends in 0.8 × HOLD_SAFE_MS is less than what the pass has left.
        expect((cap * 0.8 * HOLD_SAFE_MS) / 1000, `remaining ${remaining}`).toBeLessThan(passCost(remaining));
      }
      expect(m.sent.length).toBeGreaterThan(1);
      expect(m.sent.every((x) => x['max-bandwidth']! > CRAWL_BANDWIDTH)).toBe(true);
      // 3.6 MiB of data left and the zero tail: the rest costs half the reserve or less, so it is the reserve.
      const crawl = hold.progress(progress({ rounds: 1, remainingBytes: 59 * MiB, rateBytesPerSec: 0 }), total);
      await tick();
      expect(m.sent.at(-1)).toEqual({ 'max-bandwidth': CRAWL_BANDWIDTH });
      // 15 104 pages unsent (QEMU says 59 MiB), which cost 3.8 MiB to send.
      expect(crawl.remainingBytes).toBe(passCost(59 * MiB));
      expect(crawl.remainingBytes).toBeLessThanOrEqual(reserveBytes(64 * MiB) / 2);
      expect(crawl.remainingBytes).toBeGreaterThan(3.5 * MiB);
      expect(crawl.rounds).toBe(2);
      // Judged at the bulk cap (the rate the stream had before the pacing), not the paced 9 MiB/s.
      expect(crawl.rateBytesPerSec).toBe(heldParameters(RESERVE)['max-bandwidth']);
      // No second crawl, no more caps.
      hold.progress(progress({ rounds: 1, remainingBytes: 59 * MiB - 4096 }), total);
      await tick();
      expect(m.sent.filter((x) => x['max-bandwidth'] === CRAWL_BANDWIDTH)).toHaveLength(1);
    });

    it('a pass already over (QEMU re-read its dirty log) is held as without the map, its reserve (a dirty set) reported as QEMU gives it', async () => {
      const m = recorder();
      const hold = new QemuCopyHold(m.set, new PrewarmGate(), { ...SPARSE, downtimeLimitMs: 300 });
      hold.progress(progress({ rounds: 2, remainingBytes: 20 * MiB }), total);
      await tick();
      expect(m.sent).toEqual([{ 'max-bandwidth': 10 * MiB }]);
      expect(hold.progress(progress({ rounds: 3, remainingBytes: 5 * MiB }), total).remainingBytes).toBe(5 * MiB);
      await tick();
      expect(m.sent.at(-1)).toEqual({ 'max-bandwidth': CRAWL_BANDWIDTH });
    });
  });
});

describe('mapZeroPages', () => {
  it('maps zero pages from what pmemsave writes, in a private 0700 folder (the pieces are guest memory in clear) that is gone afterwards', async () => {
    const state = mkdtempSync(join(tmpdir(), 'embot-zero-map-'));
    cleanups.push(() => rmSync(state, { recursive: true, force: true }));
    // What QEMU's pmemsave does, with a known guest: pages 1 and 3 of 4 hold data, in a 16 KiB "RAM".
    const guest = Buffer.alloc(4 * 4096);
    guest[4096 + 7] = 1;
    guest[3 * 4096] = 0xff;
    const seen: { dir: string; mode: number }[] = [];
    const costs = await mapZeroPages(
      async (address, size, file) => {
        seen.push({ dir: dirname(file), mode: statSync(dirname(file)).mode & 0o777 });
        writeFileSync(file, guest.subarray(address, address + size));
      },
      guest.length,
      state,
    );
    expect(costs?.pages).toBe(4);
    // The last page is data, then zero, data, zero.
    expect(costs?.costOfLast(1, 4)).toBe(DATA_PAGE_COST);
    expect(costs?.costOfLast(4, 4)).toBe(2 * DATA_PAGE_COST + 2 * ZERO_PAGE_COST);
    expect(seen).toHaveLength(1);
    expect(seen[0]!.dir).not.toBe(state);
    expect(seen[0]!.mode).toBe(0o700);
    expect(readdirSync(state)).toEqual([]);
  });

  it('leaves nothing behind when pmemsave fails, and maps no guest over the limit', async () => {
    const state = mkdtempSync(join(tmpdir(), 'embot-zero-map-'));
    cleanups.push(() => rmSync(state, { recursive: true, force: true }));
    await expect(mapZeroPages(async (_a, _s, file) => { writeFileSync(file, 'partial'); throw new Error('QMP: pmemsave failed'); }, 4096, state)).rejects.toThrow('pmemsave failed');
    expect(readdirSync(state)).toEqual([]);
    expect(await mapZeroPages(async () => { throw new Error('not called'); }, 4096 * 1024 * 1024, state)).toBeUndefined();
  });
});
