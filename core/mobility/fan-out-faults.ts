/**
 * Fault injection for migrations to several destinations, off unless the environment asks for it
 * (tests and `npm run bench`, like EMBOT_FAULT_KILL_AT in fault-points.ts): with
 * `EMBOT_FAULT_BOOT_FAIL=P` (0..1) this agent, as a destination, refuses each BootIncoming with
 * probability P, as if its incoming VM had failed to boot; `EMBOT_FAULT_BOOT_FAIL=1` always does.
 * `EMBOT_FAULT_SEED=N` makes the draws reproducible. The refusal is real (the destination discards
 * what it received); only the cause is made up, because a sim VM never fails to boot by itself.
 */
import { ErrorCodes, ProtocolError } from '../errors.ts';
import { prng } from '../prng.ts';

/** The draw for the current settings; read on each call, so a bench can switch injection on and off. */
let current: { readonly key: string; readonly random: () => number } | undefined;

/** Throws the injected boot failure when the draw says so; does nothing when injection is off. */
export function injectedBootFailure(vm: string): void {
  const raw = process.env['EMBOT_FAULT_BOOT_FAIL'];
  const probability = raw === undefined || raw === '' ? 0 : Number(raw);
  if (!(probability > 0)) return;
  const seed = process.env['EMBOT_FAULT_SEED'];
  const key = `${raw}/${seed ?? ''}`;
  if (current?.key !== key) current = { key, random: seed === undefined || seed === '' ? Math.random : prng(Number(seed)) };
  if (current.random() < probability) {
    throw new ProtocolError(ErrorCodes.MIGRATION_FAILED, `injected fault (EMBOT_FAULT_BOOT_FAIL=${raw}): incoming VM ${vm} failed to boot`);
  }
}
