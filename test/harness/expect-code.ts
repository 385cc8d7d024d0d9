import { expect } from 'vitest';
import type { EmbotError } from '../../core/errors.ts';

/**
 * Asserts that `fn` throws an instance of `errorClass` carrying the stable `code`.
 *
 * @example
 * ```ts
 * expectThrownCode(() => service.post(bad), ErrorCodes.EVENT_INVALID, EventError);
 * ```
 */
export function expectThrownCode(fn: () => unknown, code: string, errorClass: abstract new (...args: never[]) => EmbotError): void {
  let thrown: unknown;
  try {
    fn();
  } catch (e) {
    thrown = e;
  }
  expect(thrown).toBeInstanceOf(errorClass);
  expect((thrown as EmbotError).code).toBe(code);
}
