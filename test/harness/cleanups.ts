import { afterEach } from 'vitest';

export type Cleanup = () => void | Promise<void>;

/** What a test registers to undo; run newest first, so a store closes before its folder goes. */
export interface Cleanups {
  push(cleanup: Cleanup): void;
}

/**
 * Registers an `afterEach` (in the suite it is called from) that runs, newest first, every cleanup
 * pushed during the test.
 *
 * @example
 * ```ts
 * const cleanups = cleanupsAfterEach();
 * const service = new SensorService({ host: 'a' });
 * cleanups.push(() => service.close());
 * ```
 */
export function cleanupsAfterEach(): Cleanups {
  const pending: Cleanup[] = [];
  afterEach(async () => {
    while (pending.length > 0) await pending.pop()!();
  });
  return { push: (cleanup) => void pending.push(cleanup) };
}
