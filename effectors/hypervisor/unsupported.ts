import { EffectorError, ErrorCodes } from '../../core/errors.ts';
import type { HypervisorCapabilities } from './hypervisor-contract.ts';

/**
 * The error for an operation that needs a capability the running driver does not declare
 * (`vm load` on qemu): callers get one code to branch on instead of a driver faking the operation.
 */
export function unsupported(driver: string, capability: keyof HypervisorCapabilities, op: string): EffectorError {
  return new EffectorError(ErrorCodes.DRIVER_UNSUPPORTED, `the ${driver} driver cannot ${op}: it has no ${capability} capability`, {
    details: { driver, capability, op },
  });
}
