/**
 * A token bucket that paces a byte stream to a rate, so one machine's loopback can stand in for
 * NICs of given speeds.
 */
import { EffectorError, ErrorCodes } from '../../../../core/errors.ts';

/** Clock hooks (for tests that check the pacing without waiting for it) and the starting fill. */
export interface TokenBucketOptions {
  /**
   * Bytes available at once (default: the burst). 0 makes the bucket pace from the first byte,
   * like a NIC, and keeps the burst only to catch up with timers that fire late.
   */
  readonly initialBytes?: number;
  /** ms, monotonic. Default `performance.now`. */
  readonly now?: () => number;
  /** Default `setTimeout`. */
  readonly sleep?: (ms: number) => Promise<void>;
}

const realSleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Paces `take(bytes)` calls to `bytesPerSec`, allowing bursts of up to `burstBytes` (default:
 * 50 ms worth of the rate). A take larger than the burst is allowed: it borrows, and the
 * takes after it wait the debt off, so the long-run rate holds for any take size.
 *
 * @example
 * ```ts
 * const nic = new TokenBucket(100 * 1024 * 1024); // 100 MiB/s
 * for (const chunk of chunks) { await nic.take(chunk.byteLength); ws.send(chunk); }
 * ```
 */
export class TokenBucket {
  readonly bytesPerSec: number;
  readonly burstBytes: number;
  private tokens: number;
  private last: number;
  private readonly now: () => number;
  private readonly sleep: (ms: number) => Promise<void>;

  constructor(bytesPerSec: number, burstBytes?: number, clock: TokenBucketOptions = {}) {
    if (typeof bytesPerSec !== 'number' || !Number.isFinite(bytesPerSec) || bytesPerSec <= 0) {
      throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `token bucket rate must be a finite number of bytes/s > 0, got ${String(bytesPerSec)}`);
    }
    const burst = burstBytes ?? Math.max(1, bytesPerSec / 20);
    if (typeof burst !== 'number' || !Number.isFinite(burst) || burst <= 0) {
      throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `token bucket burst must be a finite number of bytes > 0, got ${String(burstBytes)}`);
    }
    this.bytesPerSec = bytesPerSec;
    this.burstBytes = burst;
    this.now = clock.now ?? (() => performance.now());
    this.sleep = clock.sleep ?? realSleep;
    const initial = clock.initialBytes ?? burst;
    if (typeof initial !== 'number' || !Number.isFinite(initial) || initial < 0) {
      throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `token bucket initialBytes must be a finite number ≥ 0, got ${String(initial)}`);
    }
    this.tokens = Math.min(initial, burst);
    this.last = this.now();
  }

  /**
   * Resolves when `bytes` may be sent. Concurrent callers are served in call order: each one
   * reserves its bytes at once and waits for its own share of the debt.
   */
  take(bytes: number): Promise<void> {
    if (typeof bytes !== 'number' || !Number.isFinite(bytes) || bytes < 0) {
      return Promise.reject(new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `token bucket take needs a finite byte count ≥ 0, got ${String(bytes)}`));
    }
    const t = this.now();
    this.tokens = Math.min(this.burstBytes, this.tokens + ((t - this.last) * this.bytesPerSec) / 1000);
    this.last = t;
    this.tokens -= bytes;
    if (this.tokens >= 0) return Promise.resolve();
    return this.sleep((-this.tokens * 1000) / this.bytesPerSec);
  }
}
