import { describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../core/errors.ts';
import { PrewarmControl } from '../../core/mobility/prewarm.ts';
import type { DriverMigrationProgress } from '../../effectors/index.ts';

/** The pre-warm's command and its exit share (prewarm.ts): what may be named, when the gate lifts, what migrations shows. */

const MiB = 1 << 20;
const warmProgress = (over: Partial<DriverMigrationProgress> = {}): DriverMigrationProgress => ({
  phase: 'precopy',
  rounds: 4,
  transferredBytes: 20 * MiB,
  remainingBytes: 64 * 1024,
  rateBytesPerSec: 100 * MiB,
  dirtyRateBytesPerSec: MiB,
  ...over,
}) as DriverMigrationProgress;

describe('PrewarmControl', () => {
  it('a command names warm destinations only (notWarmed), once (VM_BAD_STATE); none named means all still warming', () => {
    const pw = new PrewarmControl(['b', 'c', 'd'], { downtimeLimitMs: 300, exitShare: 1 });
    pw.end('d');
    expect(() => pw.command(['b', 'zz'])).toThrow(expect.objectContaining({ code: ErrorCodes.DESTINATIONS_INVALID, details: { problem: 'notWarmed', names: ['zz'] } }));
    expect(() => pw.command(['d'])).toThrow(expect.objectContaining({ code: ErrorCodes.DESTINATIONS_INVALID, details: { problem: 'notWarmed', names: ['d'] } }));
    expect(pw.selected).toBeUndefined();
    expect(pw.command(undefined)).toEqual(['b', 'c']);
    expect(() => pw.command(['b'])).toThrow(expect.objectContaining({ code: ErrorCodes.VM_BAD_STATE }));
  });

  it('with nothing left warming a command is refused', () => {
    const pw = new PrewarmControl(['b'], { downtimeLimitMs: 300, exitShare: 1 });
    pw.end('b');
    expect(() => pw.command(undefined)).toThrow(expect.objectContaining({ code: ErrorCodes.DESTINATIONS_INVALID }));
  });

  it('switches once the configured share of the named destinations still copying meets the exit condition', async () => {
    const pw = new PrewarmControl(['b', 'c', 'd'], { downtimeLimitMs: 300, exitShare: 0.5 });
    pw.record('b', warmProgress());
    pw.record('c', warmProgress({ rounds: 1 }));
    pw.record('d', warmProgress({ dirtyRateBytesPerSec: 200 * MiB }));
    const commanded = pw.commanded;
    pw.command(['c', 'd']);
    await expect(commanded).resolves.toEqual(['c', 'd']);
    // c has not finished its full copy, d dirties faster than it sends: 0 of 2.
    expect(pw.readyToSwitch()).toBe(false);
    pw.record('c', warmProgress());
    expect(pw.readyToSwitch()).toBe(true);
    const info = pw.info();
    expect(info.commandedAt).toBeTypeOf('number');
    expect(info.destinations.map((d) => [d.name, d.status, d.exitConditionMet])).toEqual([
      ['b', 'dropped', true],
      ['c', 'selected', true],
      ['d', 'selected', false],
    ]);
    // Every named one ended: nothing to wait for.
    const all = new PrewarmControl(['b'], { downtimeLimitMs: 300, exitShare: 1 });
    all.command(['b']);
    expect(all.readyToSwitch()).toBe(false);
    all.end('b');
    expect(all.readyToSwitch()).toBe(true);
  });
});

describe('PrewarmControl and its gate', () => {
  it("the command settles the gate's commanded (a driver may let its throttle act) while the gate still holds; refused commands do not", async () => {
    const pw = new PrewarmControl(['b', 'c'], { downtimeLimitMs: 300, exitShare: 1 });
    let commanded = false;
    void pw.gate.commanded.then(() => (commanded = true));
    expect(() => pw.command(['zz'])).toThrow();
    await Promise.resolve();
    expect(commanded).toBe(false);
    pw.command(['b']);
    await Promise.resolve();
    expect(commanded).toBe(true);
    expect(pw.gate.held()).toBe(true);
    pw.gate.lift();
    expect(pw.gate.held()).toBe(false);
  });
});
