/**
 * The hold of a pre-warm (issue 13 point 3, README "Several destinations"): a destination's
 * pre-copy keeps re-sending dirtied pages without stopping the VM while its gate is held, and
 * converges and switches as usual once the gate is lifted (the migrate command). The exit
 * condition the command waits for is judged here too, from a destination's last progress.
 */

/** What a driver's copy loop asks of a pre-warm hold. */
export interface PrewarmHold {
  /** True while the copy must not stop the VM (neither the round limit nor auto-converge apply). */
  held(): boolean;
  /** Settles when the hold is lifted (or the gate is closed): an idle copy wakes at once. */
  readonly lifted: Promise<void>;
  /**
   * Settles at the migrate command, before the lift (the gate still holds): a driver whose hold
   * also keeps its throttle off (qemu) may let it act from here, so a guest that dirties faster
   * than the stream can meet the exit condition. Absent: nothing to do at the command.
   */
  readonly commanded?: Promise<void>;
}

/**
 * @example
 * ```ts
 * const gate = new PrewarmGate();
 * driver.migrateOut('web-1', { ...options, prewarm: gate }); // copies, re-sends, never stops the VM
 * gate.lift(); // the next round that fits the downtime limit stops the VM
 * ```
 */
export class PrewarmGate implements PrewarmHold {
  private isHeld = true;
  private resolve!: () => void;
  private resolveCommand!: () => void;
  readonly lifted: Promise<void> = new Promise<void>((r) => (this.resolve = r));
  readonly commanded: Promise<void> = new Promise<void>((r) => (this.resolveCommand = r));

  /** The migrate command came; the gate still holds until {@link lift}. */
  command(): void {
    this.resolveCommand();
  }

  held(): boolean {
    return this.isHeld;
  }

  lift(): void {
    this.isHeld = false;
    this.resolveCommand();
    this.resolve();
  }
}

/** One destination's copy as a pre-warm reports it. */
export interface PrewarmProgress {
  /** Dirty-sync rounds so far, the running one included (1 = still in the full copy). */
  readonly rounds: number;
  readonly remainingBytes: number;
  readonly rateBytesPerSec: number;
  readonly dirtyRateBytesPerSec: number;
}

/**
 * The warm-up exit condition: the whole state sent once (the first, full round done) and
 * `remaining / (rate − dirty rate) < downtime limit`. A dirty rate at or above the send rate never
 * meets it: the remainder would not shrink however long the switch waited.
 *
 * @example
 * ```ts
 * exitConditionMet({ rounds: 3, remainingBytes: 1 << 20, rateBytesPerSec: 100 << 20, dirtyRateBytesPerSec: 10 << 20 }, 300); // true
 * ```
 */
export function exitConditionMet(p: PrewarmProgress, downtimeLimitMs: number): boolean {
  if (p.rounds < 2) return false;
  if (p.remainingBytes === 0) return true;
  const net = p.rateBytesPerSec - p.dirtyRateBytesPerSec;
  if (!(net > 0)) return false;
  return (p.remainingBytes * 1000) / net < downtimeLimitMs;
}

/** Whether at least `share` (0..1] of `met` is true; an empty selection never is. */
export function shareMet(met: readonly boolean[], share: number): boolean {
  if (met.length === 0) return false;
  return met.filter(Boolean).length >= Math.ceil(share * met.length - 1e-9);
}
