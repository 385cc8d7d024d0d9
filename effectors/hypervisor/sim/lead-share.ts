/**
 * How a sim fan-out shares the source between its destinations while the first one named (the
 * lead) makes its full copy. Every destination copies from the start, but each of the others
 * sends one batch's bytes for every `ratio` the lead has had acknowledged in its full round; once
 * that round is over (or the lead's copy ended, however), all go at full speed.
 *
 * Why: on hosts whose cores the destinations' receive work shares with the source (and, in a test
 * cluster, with each other), an even split delays the first boot by the other copies' work; the
 * lead's head start brings it close to a single migration's, while a destination that must take
 * over when the lead fails has already begun. `ratio` 0 is the even split (no pacing).
 *
 * @example
 * ```ts
 * const share = new LeadShare('b', 3);
 * await share.take('c', 1 << 20);   // c's first batch goes at once
 * share.leadAcked(3 << 20, 0);      // b's full round has 3 MiB acknowledged: c may send 1 MiB more
 * ```
 */
export class LeadShare {
  private earned = 0;
  private opened = false;
  private readonly spent = new Map<string, number>();
  private waiters: (() => void)[] = [];

  constructor(
    readonly lead: string,
    private readonly ratio: number,
  ) {}

  /** Whether the others are still paced by the lead. */
  get pacing(): boolean {
    return !this.opened && this.ratio > 0;
  }

  /** The lead had `bytes` acknowledged in `round` (0: its full copy); a later round ends the pacing. */
  leadAcked(bytes: number, round: number): void {
    if (round !== 0) return this.open();
    this.earned += bytes / this.ratio;
    this.wake();
  }

  /** No more pacing: the lead's full round is over or its copy ended. */
  open(): void {
    this.opened = true;
    this.wake();
  }

  /** Resolves when `destination` may send a batch of `bytes` (at once for the lead, or once the pacing is over). */
  async take(destination: string, bytes: number): Promise<void> {
    if (destination === this.lead) return;
    // Each destination's first batch goes at once: every copy begins with the lead's.
    while (this.pacing && (this.spent.get(destination) ?? 0) > this.earned) await new Promise<void>((resolve) => this.waiters.push(resolve));
    this.spent.set(destination, (this.spent.get(destination) ?? 0) + bytes);
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }
}
