import { EffectorError, EmbotError, ErrorCodes, describeError } from '../core/errors.ts';
import type { Effector } from './effector.ts';

/** What the runtime lends {@link EffectorRegistry.invoke} while an effector acts. */
export interface InvokeHooks {
  /** Mutes the named sensors for one element; returns the unmute. */
  mute?(elementId: string, sensorNames: readonly string[]): () => void;
}

/**
 * The `effectors` service: effectors by name, and the one place they are invoked, so that
 * muting, argument checks and error wrapping happen the same way for every effector.
 *
 * @example
 * ```ts
 * const effectors = new EffectorRegistry();
 * effectors.register(new HypervisorEffector(driver));
 * const info = await effectors.invoke('hypervisor', 'start', { vm: 'web-1' }, {
 *   mute: (element, sensors) => sensorService.mute(element, sensors),
 * });
 * ```
 */
export class EffectorRegistry {
  private readonly effectors = new Map<string, Effector>();

  register(effector: Effector): void {
    if (typeof effector?.name !== 'string' || effector.name === '' || typeof effector.invoke !== 'function' || !Array.isArray(effector.ops)) {
      throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, 'an effector needs a name, an ops array and an invoke function');
    }
    if (this.effectors.has(effector.name)) {
      throw new EffectorError(ErrorCodes.EFFECTOR_EXISTS, `an effector named ${effector.name} is already registered`, { details: { effector: effector.name } });
    }
    this.effectors.set(effector.name, effector);
  }

  /** Removes an effector; true if it was registered. */
  unregister(name: string): boolean {
    return this.effectors.delete(name);
  }

  has(name: string): boolean {
    return this.effectors.has(name);
  }

  get(name: string): Effector {
    const e = this.effectors.get(name);
    if (!e) {
      throw new EffectorError(ErrorCodes.EFFECTOR_UNKNOWN, `no effector named ${String(name)} (known: ${[...this.effectors.keys()].join(', ') || 'none'})`, {
        details: { effector: String(name) },
      });
    }
    return e;
  }

  list(): readonly Effector[] {
    return [...this.effectors.values()];
  }

  /**
   * Runs `op` of effector `name`. If the effector mutes sensors and names the element it acts
   * on, those sensors are muted for that element until the effector settles, success or not.
   * Failures reject with an EmbotError: the effector's own, or EMBOT_ERR_EFFECTOR_FAILED with
   * the original as `cause`.
   */
  async invoke(name: string, op: string, args: Readonly<Record<string, unknown>> = {}, hooks: InvokeHooks = {}): Promise<unknown> {
    const effector = this.get(name);
    if (!effector.ops.includes(op)) {
      throw new EffectorError(ErrorCodes.EFFECTOR_OP_UNKNOWN, `effector ${name} has no op ${String(op)} (ops: ${effector.ops.join(', ')})`, {
        details: { effector: name, op: String(op) },
      });
    }
    if (typeof args !== 'object' || args === null || Array.isArray(args)) {
      throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `args of ${name}.${op} must be an object`, { details: { effector: name, op } });
    }
    let unmute: (() => void) | undefined;
    try {
      const element = effector.mutes?.length && effector.elementOf ? effector.elementOf(args) : undefined;
      if (element !== undefined && hooks.mute) unmute = hooks.mute(element, effector.mutes ?? []);
      return await effector.invoke(op, args);
    } catch (e) {
      if (e instanceof EmbotError) throw e;
      throw new EffectorError(ErrorCodes.EFFECTOR_FAILED, `effector ${name}.${op} failed: ${describeError(e)}`, {
        cause: e,
        details: { effector: name, op },
      });
    } finally {
      unmute?.();
    }
  }
}
