/**
 * The discards of incoming migrations still running on this agent. A target answers the request
 * that failed (a refused BootIncoming, an Abort) before it has thrown the incoming VM away: with
 * qemu that is a SIGKILL, the wait for the process to go and the removal of its state dir, tens
 * of ms and more on a loaded host, during which the driver still lists the VM and counts its
 * memory. A source that tries again at once (a fan-out's `--retries`, an operator's second
 * `migrate`) reached the admission inside that window and was denied ("a VM named g1 already
 * exists") for a reason gone a moment later (issue 13, CI flake of the qemu set of one). The
 * admission asks this registry whether a discard still running could lift its refusal, and waits
 * for it, bounded, before it judges again (TargetSide.evaluate).
 */

/** One discard in progress: which VM's incoming copy, of which migration. */
export interface RunningDiscard {
  readonly vm: string;
  readonly migrationId: string;
  readonly since: number;
}

export class TargetDiscards {
  private readonly running = new Map<Promise<void>, RunningDiscard>();

  /** Registers `work` (the discard of `migrationId`'s incoming `vm`) until it settles; returns it. */
  track(vm: string, migrationId: string, work: Promise<void>): Promise<void> {
    const entry: RunningDiscard = { vm, migrationId, since: Date.now() };
    // The settled copy is the registry's own: a rejection stays the caller's to handle.
    const settled = work.then(
      () => undefined,
      () => undefined,
    );
    this.running.set(settled, entry);
    void settled.then(() => this.running.delete(settled));
    return work;
  }

  /** The discards still running, of `vm` only when given. */
  list(vm?: string): readonly RunningDiscard[] {
    return [...this.running.values()].filter((d) => vm === undefined || d.vm === vm);
  }

  /**
   * Resolves once every discard running now (of `vm` only when given) has settled: true, or false
   * when `timeoutMs` passed first. A discard that starts during the wait is not waited for.
   */
  async settled(vm: string | undefined, timeoutMs: number): Promise<boolean> {
    const waits = [...this.running].filter(([, d]) => vm === undefined || d.vm === vm).map(([p]) => p);
    if (waits.length === 0) return true;
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<false>((resolve) => {
      timer = setTimeout(() => resolve(false), timeoutMs);
    });
    try {
      return await Promise.race([Promise.all(waits).then(() => true as const), timedOut]);
    } finally {
      clearTimeout(timer);
    }
  }
}
