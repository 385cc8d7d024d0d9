import { ErrorCodes, EmbotError } from './errors.ts';

/**
 * Services find each other only through the registry, by name. The map type keeps lookups typed:
 * `registry.get('sensors')` returns the sensor service's type.
 *
 * @example
 * ```ts
 * const registry = new ServiceRegistry<{ clock: () => number }>();
 * registry.register('clock', () => Date.now());
 * registry.get('clock')();
 * ```
 */
export class ServiceRegistry<Services extends object> {
  private readonly services = new Map<keyof Services, unknown>();

  register<K extends keyof Services>(name: K, service: Services[K]): void {
    if (this.services.has(name)) {
      throw new EmbotError(ErrorCodes.SERVICE_EXISTS, `service '${String(name)}' is already registered`);
    }
    this.services.set(name, service);
  }

  get<K extends keyof Services>(name: K): Services[K] {
    if (!this.services.has(name)) {
      throw new EmbotError(ErrorCodes.SERVICE_UNKNOWN, `no service named '${String(name)}'`);
    }
    return this.services.get(name) as Services[K];
  }

  has(name: keyof Services): boolean {
    return this.services.has(name);
  }

  names(): string[] {
    return [...this.services.keys()].map(String);
  }
}
