import { readFileSync } from 'node:fs';
import { expect } from 'vitest';
import { ManifestSchema, type Manifest } from '../../core/plugins/manifest.ts';

/**
 * A plugin folder's `manifest.json`, parsed by the same schema the loader uses.
 *
 * @example
 * ```ts
 * const manifest = readPluginManifest(new URL('../../plugins/vm-watchdog/', import.meta.url));
 * ```
 */
export function readPluginManifest(pluginDir: URL): Manifest {
  return ManifestSchema.parse(JSON.parse(readFileSync(new URL('manifest.json', pluginDir), 'utf8')));
}

/**
 * Asserts that a plugin's `index.ts` imports nothing at run time: a module shipped to a peer's
 * plugin cache resolves no packages, so it may only `import type`.
 *
 * @example
 * ```ts
 * expectTypeOnlyImports(new URL('../../plugins/host-load/', import.meta.url));
 * ```
 */
export function expectTypeOnlyImports(pluginDir: URL): void {
  const src = readFileSync(new URL('index.ts', pluginDir), 'utf8');
  const imports = src.split('\n').filter((l) => /^\s*import\s/.test(l));
  expect(imports.length).toBeGreaterThan(0);
  for (const line of imports) expect(line).toMatch(/^import type /);
  expect(src).not.toMatch(/\bimport\s*\(/);
}
