import { describeError } from '../errors.ts';
import { moduleRef } from '../plugins/manifest.ts';
import { checkModuleDir } from '../plugins/catalogue.ts';
import type { ModuleBundle } from '../wire/frames.ts';
import { EMBOT_API_VERSION, type EmbotRuntime, type RuntimeModule } from '../../embots/index.ts';
import { InstantiationError, type ModuleProvider } from './mobility-host.ts';
import { acceptModuleBundle, packModule } from './module-shipping.ts';
import type { PluginCache } from './plugin-cache.ts';
import type { TrustPolicy } from './trust-policy.ts';

/**
 * Modules as migrations see them: the ones loaded here are announced and shipped on request;
 * a missing one is fetched from the source, checked (hash, trust), installed in the plugin
 * cache and loaded.
 */
export class AgentModuleProvider implements ModuleProvider {
  constructor(
    private readonly runtime: EmbotRuntime,
    private readonly cache: PluginCache,
    private readonly trust: TrustPolicy,
    /** Called after a shipped module was loaded from the cache (so the agent lists it). */
    private readonly onShipped: (m: RuntimeModule & { readonly dir: string }) => void,
  ) {}

  refOf(name: string): string | undefined {
    const m = this.runtime.module(name);
    return m && moduleRef(m);
  }

  bundleFor(name: string, hash: string): Omit<ModuleBundle, 'type' | 'replyTo'> | undefined {
    const m = this.runtime.module(name) as (RuntimeModule & { readonly dir?: string }) | undefined;
    if (!m || m.hash !== hash || !m.dir) return undefined;
    const packed = packModule(m.dir);
    // The folder changed since it was loaded: what we would ship is not what was announced.
    if (packed.hash !== hash) return undefined;
    return packed;
  }

  async ensure(ref: string, fetch: (name: string, hash: string) => Promise<ModuleBundle>): Promise<{ readonly shipped: boolean }> {
    const m = /^([a-z][a-z0-9-]*)@([^#]+)#([0-9a-f]+)$/.exec(ref);
    if (!m) throw new InstantiationError(`bad module reference ${ref}`, ref);
    const [, name, version, hash] = m as unknown as [string, string, string, string];
    const loaded = this.runtime.module(name);
    if (loaded?.hash === hash) return { shipped: false };
    if (loaded) throw new InstantiationError(`module ${name} is loaded here as ${moduleRef(loaded)}, the migration needs ${ref}`, ref);
    let cached = this.cache.get(name, hash);
    let shipped = false;
    if (!cached) {
      let bundle: ModuleBundle;
      try {
        bundle = await fetch(name, hash);
      } catch (e) {
        throw new InstantiationError(`could not fetch module ${ref} from the source: ${describeError(e)}`, ref);
      }
      try {
        cached = acceptModuleBundle(bundle, { name, version, hash }, { trust: this.trust, cache: this.cache });
      } catch (e) {
        // Its message already names the module and why it was refused.
        throw new InstantiationError(describeError(e), ref);
      }
      shipped = true;
    }
    const check = checkModuleDir(cached.dir, EMBOT_API_VERSION);
    if (!check.ok) throw new InstantiationError(`module ${ref} in the cache is not usable: ${check.problem.error.message}`, ref);
    try {
      await this.runtime.loadModule(check.record);
    } catch (e) {
      throw new InstantiationError(`module ${ref} does not load here: ${describeError(e)}`, ref);
    }
    this.onShipped(check.record);
    return { shipped };
  }
}
