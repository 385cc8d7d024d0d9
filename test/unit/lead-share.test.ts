import { describe, expect, it } from 'vitest';
import { LeadShare } from '../../effectors/hypervisor/sim/lead-share.ts';

const MiB = 1 << 20;

/** Whether `p` has settled after the pending microtasks ran. */
async function settled(p: Promise<void>): Promise<boolean> {
  let done = false;
  void p.then(() => (done = true));
  await new Promise((r) => setImmediate(r));
  return done;
}

describe('LeadShare: the first destination of a fan-out goes ahead during its full copy', () => {
  it('the lead never waits; another sends its first batch at once, then one per `ratio` of the lead’s acknowledged in round 0', async () => {
    const share = new LeadShare('b', 3);
    expect(await settled(share.take('b', MiB))).toBe(true);
    expect(await settled(share.take('c', MiB))).toBe(true);
    const second = share.take('c', MiB);
    expect(await settled(second)).toBe(false);
    share.leadAcked(2 * MiB, 0);
    expect(await settled(second)).toBe(false);
    share.leadAcked(MiB, 0);
    expect(await settled(second)).toBe(true);
    // Each destination has its own count: d starts at once too.
    expect(await settled(share.take('d', MiB))).toBe(true);
  });

  it('ends at the lead’s first later round, or when opened (the lead’s copy ended): waiting batches go, and later ones at once', async () => {
    const byRound = new LeadShare('b', 4);
    await byRound.take('c', MiB);
    const waiting = byRound.take('c', MiB);
    expect(await settled(waiting)).toBe(false);
    byRound.leadAcked(64 * 1024, 1);
    expect(await settled(waiting)).toBe(true);
    expect(byRound.pacing).toBe(false);
    expect(await settled(byRound.take('c', 8 * MiB))).toBe(true);

    const byEnd = new LeadShare('b', 4);
    await byEnd.take('c', MiB);
    const held = [byEnd.take('c', MiB), byEnd.take('d', MiB)];
    expect(await settled(held[0]!)).toBe(false);
    byEnd.open();
    expect(await settled(Promise.all(held).then(() => undefined))).toBe(true);
  });

  it('ratio 0 is an even split: nobody is paced', async () => {
    const share = new LeadShare('b', 0);
    expect(share.pacing).toBe(false);
    for (let i = 0; i < 5; i++) expect(await settled(share.take('c', MiB))).toBe(true);
  });
});
