import { expect } from 'vitest';
import { isEmbotError, type EmbotError } from '../../core/errors.ts';

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

/**
 * The code of what `fn` throws (asserting it is an `errorClass`), or undefined when it returns:
 * for tables of inputs where some are fine and some are refused.
 */
export function thrownCode(fn: () => unknown, errorClass: abstract new (...args: never[]) => EmbotError): string | undefined {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(errorClass);
    return (e as EmbotError).code;
  }
  return undefined;
}

/**
 * What `fn` throws, asserted to be an `errorClass` (its code and message for the test to check);
 * fails the test when it returns.
 *
 * @example
 * ```ts
 * expect(thrown(() => loadConfig(bad), ConfigError).message).toMatch(/endpoints/);
 * ```
 */
export function thrown<E extends EmbotError>(fn: () => unknown, errorClass: abstract new (...args: never[]) => E): E {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(errorClass);
    return e as E;
  }
  throw new Error(`expected a ${errorClass.name}, nothing was thrown`);
}

/**
 * The EmbotError `p` rejects with; fails the test when it resolves or rejects with anything else.
 *
 * @example
 * ```ts
 * expect((await rejection(driver.start('ghost'))).code).toBe(ErrorCodes.VM_UNKNOWN);
 * ```
 */
export async function rejection(p: Promise<unknown>): Promise<EmbotError> {
  const e = await p.then(
    () => undefined,
    (err: unknown) => err,
  );
  if (!isEmbotError(e)) throw new Error(`expected an EmbotError, got ${String(e)}`);
  return e;
}
