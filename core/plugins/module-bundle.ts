import { build, type Message } from 'esbuild';
import { createHash } from 'node:crypto';
import { ErrorCodes, PluginError } from '../errors.ts';

/** A module's entry with everything it imports relatively, as one self-contained ESM text. */
export interface ModuleBundle {
  readonly code: string;
  /** sha256 hex of `code`. */
  readonly codeHash: string;
}

/**
 * Bundles a module entry (TypeScript or JavaScript) into one ESM text that a worker imports from a
 * `data:` URL. Why bundle instead of importing the file: a plugins folder outside an ESM package
 * would load `.ts` as CommonJS, a module shipped from a peer must run from bytes, and a hot reload
 * gets fresh code without cache-busting the ESM loader. Bare package imports are refused: modules
 * get xstate from the kit, so a bundle never depends on what the host has installed.
 *
 * @example
 * ```ts
 * const { code } = await bundleModule('/srv/plugins/vm-watchdog/index.ts');
 * ```
 */
export async function bundleModule(entryPath: string): Promise<ModuleBundle> {
  let code: string;
  try {
    const out = await build({
      entryPoints: [entryPath],
      bundle: true,
      format: 'esm',
      platform: 'node',
      target: 'node20',
      write: false,
      logLevel: 'silent',
      sourcemap: false,
      plugins: [
        {
          name: 'embot-no-packages',
          setup(b) {
            b.onResolve({ filter: /^[^./]/ }, (args) => {
              if (args.path.startsWith('node:')) return { path: args.path, external: true };
              return { errors: [{ text: `module imports package '${args.path}' at run time; take it from the kit (kit.xstate) or use 'import type'` }] };
            });
          },
        },
      ],
    });
    code = out.outputFiles[0]!.text;
  } catch (e) {
    const errors = (e as { errors?: Message[] }).errors;
    const detail = errors?.length ? errors.map(formatMessage).join('; ') : (e as Error).message;
    throw new PluginError(ErrorCodes.PLUGIN_LOAD_FAILED, `cannot compile ${entryPath}: ${detail}`, { cause: e });
  }
  return { code, codeHash: createHash('sha256').update(code).digest('hex') };
}

function formatMessage(m: Message): string {
  const at = m.location ? `${m.location.file}:${m.location.line}:${m.location.column}: ` : '';
  return `${at}${m.text}`;
}
