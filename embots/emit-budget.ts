/**
 * Token bucket per embot for the events its policies raise: a policy that reacts to its own
 * events forever exhausts it within a second and is quarantined, instead of flooding the queue.
 */
export class EmitBudget {
  private readonly buckets = new Map<string, { tokens: number; at: number }>();

  constructor(private readonly perSecond: (embotId: string) => number, private readonly now: () => number = Date.now) {}

  /** Takes one token; false when the embot is over its rate. */
  take(embotId: string): boolean {
    const rate = this.perSecond(embotId);
    const now = this.now();
    const b = this.buckets.get(embotId) ?? { tokens: rate, at: now };
    b.tokens = Math.min(rate, b.tokens + ((now - b.at) / 1000) * rate);
    b.at = now;
    this.buckets.set(embotId, b);
    if (b.tokens < 1) return false;
    b.tokens -= 1;
    return true;
  }

  forget(embotId: string): void {
    this.buckets.delete(embotId);
  }
}
