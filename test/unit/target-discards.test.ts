import { describe, expect, it } from 'vitest';
import { TargetDiscards } from '../../core/mobility/target-discards.ts';

function gate(): { readonly promise: Promise<void>; open(): void; fail(e: Error): void } {
  let open!: () => void;
  let fail!: (e: Error) => void;
  const promise = new Promise<void>((resolve, reject) => {
    open = resolve;
    fail = reject;
  });
  return { promise, open, fail };
}

describe('TargetDiscards: the admission waits for discards still running, bounded', () => {
  it('lists a discard until it settles, resolved or rejected; the rejection stays the caller’s', async () => {
    const d = new TargetDiscards();
    const ok = gate();
    const bad = gate();
    d.track('g1', 'm-1', ok.promise);
    const failing = d.track('g2', 'm-2', bad.promise);
    expect(d.list().map((x) => `${x.vm}:${x.migrationId}`)).toEqual(['g1:m-1', 'g2:m-2']);
    expect(d.list('g2').map((x) => x.migrationId)).toEqual(['m-2']);
    ok.open();
    bad.fail(new Error('QEMU pid 1 still runs'));
    await expect(failing).rejects.toThrow('still runs');
    await Promise.resolve();
    expect(d.list()).toEqual([]);
  });

  it('settled(vm) waits for that VM’s discards only, and is true once they ended', async () => {
    const d = new TargetDiscards();
    const g1 = gate();
    const g2 = gate();
    d.track('g1', 'm-1', g1.promise);
    d.track('g2', 'm-2', g2.promise);
    const waiting = d.settled('g1', 60_000);
    g1.open();
    expect(await waiting).toBe(true);
    expect(d.list().map((x) => x.vm)).toEqual(['g2']);
    g2.open();
  });

  it('settled() without a VM waits for every discard running when asked, not one started later', async () => {
    const d = new TargetDiscards();
    const early = gate();
    d.track('g1', 'm-1', early.promise);
    let done = false;
    const waiting = d.settled(undefined, 60_000).then((v) => {
      done = true;
      return v;
    });
    const late = gate();
    d.track('g2', 'm-2', late.promise);
    await new Promise((r) => setTimeout(r, 5));
    expect(done).toBe(false);
    early.open();
    expect(await waiting).toBe(true);
    expect(d.list().map((x) => x.vm)).toEqual(['g2']);
    late.open();
  });

  it('a discard that does not end within the bound: false after it, the discard still listed', async () => {
    const d = new TargetDiscards();
    const stuck = gate();
    d.track('g1', 'm-1', stuck.promise);
    expect(await d.settled('g1', 20)).toBe(false);
    expect(d.list('g1').map((x) => x.migrationId)).toEqual(['m-1']);
    stuck.open();
  });

  it('nothing running: true at once', async () => {
    expect(await new TargetDiscards().settled('g1', 1)).toBe(true);
  });
});
