import { EffectorError, ErrorCodes } from '../../core/errors.ts';
import type { Effector } from '../effector.ts';
import type { HypervisorDriver } from './hypervisor-contract.ts';
import { unsupported } from './unsupported.ts';
import type { VmCreateRequest } from './create-driver.ts';

export const HYPERVISOR_OPS = ['create', 'start', 'stop', 'kill', 'crash', 'remove', 'list', 'stats'] as const;
export type HypervisorOp = (typeof HYPERVISOR_OPS)[number];

const SPEC_FIELDS = ['memory', 'dirtyRate', 'vcpus', 'udpPort', 'image', 'boot'] as const;

/**
 * The `hypervisor` effector: VM operations of whichever driver the agent runs, reachable from
 * policies as `api.effect('hypervisor', op, { vm, ...spec })`. While it acts on a VM, the `vm`
 * sensor is muted for that VM, so a policy sees its own action once (as `EFFECT_DONE`), not
 * again as a sensor event.
 *
 * @example
 * ```ts
 * const registry = new EffectorRegistry();
 * registry.register(new HypervisorEffector(new SimDriver()));
 * await registry.invoke('hypervisor', 'create', { vm: 'web-1', memory: 16 * 1024 * 1024 });
 * await registry.invoke('hypervisor', 'start', { vm: 'web-1' });
 * ```
 */
export class HypervisorEffector implements Effector {
  readonly name = 'hypervisor';
  readonly ops: readonly HypervisorOp[] = HYPERVISOR_OPS;
  readonly mutes: readonly string[] = ['vm'];

  /**
   * @param specFor the driver's spec for a create request (`createDriver(…).specFor`): a policy's
   *   `create` takes the same fields as `embot vm create`, and a driver refuses those it cannot do.
   */
  constructor(
    readonly driver: HypervisorDriver,
    private readonly specFor: (request: VmCreateRequest) => { readonly name: string } = (request) => request,
  ) {}

  elementOf(args: Readonly<Record<string, unknown>>): string | undefined {
    return typeof args?.vm === 'string' ? `vm:${args.vm}` : undefined;
  }

  async invoke(op: string, args: Readonly<Record<string, unknown>>): Promise<unknown> {
    if (!isOp(op)) {
      throw new EffectorError(ErrorCodes.EFFECTOR_OP_UNKNOWN, `hypervisor has no op ${String(op)} (ops: ${HYPERVISOR_OPS.join(', ')})`, {
        details: { effector: this.name, op: String(op) },
      });
    }
    if (op === 'list') return this.driver.list();
    const vm = vmArg(op, args);
    switch (op) {
      case 'create':
        return this.driver.create(this.specFor({ ...specArgs(args), name: vm }));
      case 'start':
        return this.driver.start(vm);
      case 'stop':
        return this.driver.stop(vm);
      case 'kill':
        return this.driver.kill(vm);
      case 'crash': {
        // An injected fault: only drivers that declare one can do it.
        const faults = this.driver.capabilities.faults;
        if (!faults) throw unsupported(this.driver.name, 'faults', 'crash');
        return faults.crash(vm);
      }
      case 'remove':
        await this.driver.remove(vm);
        return { removed: vm };
      case 'stats':
        return this.driver.stats(vm);
    }
  }
}

function isOp(op: unknown): op is HypervisorOp {
  return typeof op === 'string' && (HYPERVISOR_OPS as readonly string[]).includes(op);
}

function vmArg(op: string, args: Readonly<Record<string, unknown>> | undefined): string {
  const vm = typeof args === 'object' && args !== null ? args.vm : undefined;
  if (typeof vm !== 'string' || vm === '') {
    throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `hypervisor ${op} needs args.vm, the VM name`, { details: { effector: 'hypervisor', op } });
  }
  return vm;
}

/** Only the spec fields: a policy's stray args must not reach the driver as VM properties. */
function specArgs(args: Readonly<Record<string, unknown>>): Omit<VmCreateRequest, 'name'> {
  const out: Record<string, unknown> = {};
  for (const k of SPEC_FIELDS) if (args[k] !== undefined) out[k] = args[k];
  for (const k of ['image', 'boot'] as const) {
    if (out[k] !== undefined && typeof out[k] !== 'string') {
      throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `hypervisor create: args.${k} must be a file path`, { details: { effector: 'hypervisor', op: 'create' } });
    }
  }
  // Numbers are the driver's to validate (it refuses a bad memory or vcpus with VM_SPEC_INVALID).
  return out as Omit<VmCreateRequest, 'name'>;
}
