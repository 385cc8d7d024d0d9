/**
 * The sim driver's `fanOut` capability (README "Several destinations"): one pre-copy per
 * destination, each over its own data paths and with its own dirty log, the VM stopped once. The
 * VM has one dirty bitmap; every read of it is split into one log per destination, so a slow
 * destination still gets every page dirtied while it copied, and a fast one is not held back.
 */
import { EffectorError, ErrorCodes } from '../../../core/errors.ts';
import type { FanOutSession, MigrateOutOptions, MigrateOutResult } from '../hypervisor-contract.ts';
import type { PreCopyVm } from './dataplane/precopy-sender.ts';

/** What the session needs of the sim driver. */
export interface FanOutDriver extends PreCopyVm {
  runPreCopy(name: string, options: MigrateOutOptions, view: PreCopyVm, stopVm: () => Promise<void>): Promise<MigrateOutResult>;
  stopForSwitch(name: string): boolean;
  /** The VM, or undefined once it is gone (removed at the source after the switch). */
  get(name: string): unknown;
}

/** One destination's dirty log: a byte per page, and how many are set. */
class DirtyLog {
  private readonly marks: Uint8Array;
  private count = 0;

  constructor(pageCount: number) {
    this.marks = new Uint8Array(pageCount);
  }

  add(indexes: Uint32Array): void {
    for (const i of indexes) {
      if (this.marks[i] === 0) {
        this.marks[i] = 1;
        this.count++;
      }
    }
  }

  /** Ascending indexes of the marked pages; clears them. */
  take(): Uint32Array {
    const out = new Uint32Array(this.count);
    let n = 0;
    for (let i = 0; i < this.marks.length && n < this.count; i++) {
      if (this.marks[i] === 1) {
        out[n++] = i;
        this.marks[i] = 0;
      }
    }
    this.count = 0;
    return out;
  }
}

/**
 * @example
 * ```ts
 * const session = driver.capabilities.fanOut!.begin('web-1', ['b', 'c']);
 * const [rb, rc] = await Promise.allSettled([session.migrateOut('b', optsB), session.migrateOut('c', optsC)]);
 * session.close();
 * ```
 */
export class SimFanOutSession implements FanOutSession {
  private readonly logs = new Map<string, DirtyLog>();
  /** Dirty rate each destination's auto-converge asked for; the VM runs at the lowest. */
  private readonly rates = new Map<string, number>();
  private readonly baseRate: number;
  private readonly running = new Set<string>();
  private closed = false;

  constructor(
    private readonly driver: FanOutDriver,
    private readonly vm: string,
    destinations: readonly string[],
  ) {
    if (destinations.length === 0) throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `a fan-out of VM ${vm} needs at least one destination`);
    const pageCount = driver.pages(vm).pageCount;
    for (const d of destinations) this.logs.set(d, new DirtyLog(pageCount));
    this.baseRate = driver.counters(vm).dirtyRate;
  }

  migrateOut(destination: string, options: MigrateOutOptions): Promise<MigrateOutResult> {
    const log = this.logs.get(destination);
    if (!log) return Promise.reject(new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `${destination} is not a destination of this fan-out of VM ${this.vm}`));
    if (this.closed) return Promise.reject(new EffectorError(ErrorCodes.MIGRATION_ABORTED, `the fan-out of VM ${this.vm} is closed`));
    if (this.running.has(destination)) return Promise.reject(new EffectorError(ErrorCodes.VM_BAD_STATE, `VM ${this.vm} is already copying to ${destination}`));
    this.running.add(destination);
    const view: PreCopyVm = {
      pages: (name) => this.driver.pages(name),
      takeDirty: () => {
        this.pull();
        return log.take();
      },
      setDirtyRate: (_name, rate) => {
        this.rates.set(destination, rate);
        this.applyRate();
      },
      counters: (name) => ({ dirtyRate: this.rates.get(destination) ?? this.baseRate, pagesWritten: this.driver.counters(name).pagesWritten }),
    };
    const stopVm = async (): Promise<void> => {
      // Every destination's own hand-over runs (its final management round); only the first stops the VM.
      await options.beforeSwitchover?.();
      this.driver.stopForSwitch(this.vm);
    };
    return this.driver.runPreCopy(this.vm, options, view, stopVm).finally(() => {
      this.running.delete(destination);
      this.rates.delete(destination);
      this.applyRate();
    });
  }

  close(): void {
    this.closed = true;
    this.rates.clear();
    this.applyRate();
  }

  /** The VM's dirty bitmap, read once, goes into every destination's log. */
  private pull(): void {
    const taken = this.driver.takeDirty(this.vm);
    if (taken.length === 0) return;
    for (const l of this.logs.values()) l.add(taken);
  }

  private applyRate(): void {
    // Gone once the winner committed and the source removed it: nothing left to pace. Asked first
    // because the refusal below is a thrown error, and capturing its stack cost the source ~2 ms
    // of CPU per call, 3-4 calls per fan-out (profiled, BENCHMARKS.md "Time to the first boot").
    if (this.driver.get(this.vm) === undefined) return;
    const rate = Math.min(this.baseRate, ...this.rates.values());
    try {
      if (this.driver.counters(this.vm).dirtyRate !== rate) this.driver.setDirtyRate(this.vm, rate);
    } catch {
      // The VM left (the winner committed and it was removed): nothing to throttle.
    }
  }
}
