/**
 * Pre-warm with the qemu driver (issue 13 point 4, README "Several destinations", *Pre-warm with
 * qemu*). QEMU has no "copy but do not switch" mode, so the hold is made of its own parameters,
 * applied live with `migrate-set-parameters` while the one stream runs:
 *
 * - held: `downtime-limit` 1 ms. QEMU switches only when what is left fits the downtime limit at
 *   its measured rate; while held it sends only what the guest dirties, so 1 ms of that rate is
 *   less than the pages a writing guest dirties between two syncs and the copy keeps re-sending.
 *   Auto-converge (a capability, fixed for the whole migration) is kept at its configured setting
 *   but capped at 1 % (`cpu-throttle-initial` = `max-cpu-throttle` = 1): throttling a guest for
 *   minutes is no warm-up;
 * - at the command (the gate's `commanded`): the configured throttle comes back, so a guest that
 *   dirties faster than the stream can meet the exit condition; the downtime limit stays 1 ms;
 * - lifted: the real `downtime-limit`, and QEMU switches as soon as it fits (pause-before-switchover
 *   still gives the management hand-over its paused moment).
 *
 * What it cannot hold: a guest that dirtied no page since the last sync has nothing left, and
 * QEMU completes whatever the limit (pending 0). The copy then reaches `pre-switchover` (the VM
 * paused) before the command; the driver cancels it (the VM runs on, nothing lost) and the copy
 * fails with MIGRATION_FAILED `details.reason: holdLost` rather than keep the VM paused until the
 * command.
 */
import type { MigrationProgress } from '../hypervisor-contract.ts';
import type { PrewarmHold } from '../prewarm-gate.ts';

/** The downtime limit that holds a pre-warm's copy, ms. */
export const HOLD_DOWNTIME_LIMIT_MS = 1;

/** QEMU's throttle defaults (cpu-throttle-initial, max-cpu-throttle), restored at the command. */
const QEMU_THROTTLE_INITIAL = 20;
const QEMU_MAX_CPU_THROTTLE = 99;

/** What the hold needs of the source QEMU's monitor: `migrate-set-parameters` with these. */
export type SetParameters = (params: Readonly<Record<string, number>>) => Promise<unknown>;

export interface QemuCopyHoldOptions {
  /** The migration's own downtime limit, applied at the lift. */
  readonly downtimeLimitMs: number;
  /** The configured first throttle step, percent (QEMU's default 20), applied at the command. */
  readonly cpuThrottleInitial?: number;
  /** Called after each parameter change (the driver's poll wakes at once). */
  readonly onChange?: () => void;
  /** A parameter change failed (the monitor went away): the driver's loop reports it. */
  readonly onError?: (e: unknown) => void;
}

/** The parameters a held copy starts with (they override the migration's own). */
export function heldParameters(): Readonly<Record<string, number>> {
  return { 'downtime-limit': HOLD_DOWNTIME_LIMIT_MS, 'cpu-throttle-initial': 1, 'max-cpu-throttle': 1 };
}

/**
 * One held copy of one QEMU migration.
 *
 * @example
 * ```ts
 * await qmp.execute('migrate-set-parameters', { ...own, ...(o.prewarm?.held() ? heldParameters() : {}) });
 * await qmp.execute('migrate', { uri });
 * const hold = o.prewarm && new QemuCopyHold((p) => qmp.execute('migrate-set-parameters', p), o.prewarm, { downtimeLimitMs: 300 });
 * o.onProgress?.(hold ? hold.progress(p) : p);
 * if (info.status === 'pre-switchover' && hold?.holding()) { … the hold was lost … }
 * hold?.close();
 * ```
 */
export class QemuCopyHold {
  private peakRate = 0;
  private closed = false;
  /** Epoch ms of the lift once its parameters are applied; undefined while held. */
  liftedAt: number | undefined;
  /** A parameter change QEMU refused (or the monitor went away): the driver ends the migration with it. */
  failure: unknown;

  constructor(
    private readonly setParameters: SetParameters,
    private readonly hold: PrewarmHold,
    private readonly o: QemuCopyHoldOptions,
  ) {
    const throttleBack = { 'cpu-throttle-initial': o.cpuThrottleInitial ?? QEMU_THROTTLE_INITIAL, 'max-cpu-throttle': QEMU_MAX_CPU_THROTTLE };
    // The lift settles `commanded` too (just before): then the lift's own change carries the throttle.
    void hold.commanded?.then(() => (hold.held() ? this.apply(throttleBack) : undefined));
    void hold.lifted.then(async () => {
      if (await this.apply({ ...throttleBack, 'downtime-limit': Math.max(1, Math.round(o.downtimeLimitMs)) })) this.liftedAt ??= Date.now();
      o.onChange?.();
    });
  }

  /** True while the gate holds (QEMU must not reach its switchover). */
  holding(): boolean {
    return this.hold.held();
  }

  /**
   * A progress report as the pre-warm judges it. While held QEMU sends only what the guest
   * dirties, so its measured rate is the dirty rate, not what the stream can carry: the rate
   * reported is the highest measured in this migration (the full copy's).
   */
  progress(p: MigrationProgress): MigrationProgress {
    this.peakRate = Math.max(this.peakRate, p.rateBytesPerSec);
    return { ...p, rateBytesPerSec: this.peakRate };
  }

  /** The migration ended: later gate changes touch nothing. */
  close(): void {
    this.closed = true;
  }

  private async apply(params: Readonly<Record<string, number>>): Promise<boolean> {
    if (this.closed) return false;
    try {
      await this.setParameters(params);
      this.o.onChange?.();
      return true;
    } catch (e) {
      if (this.closed) return false;
      this.failure ??= e;
      this.o.onError?.(e);
      return false;
    }
  }
}
