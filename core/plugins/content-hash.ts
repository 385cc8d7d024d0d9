import { createHash } from 'node:crypto';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';

/**
 * The detached signature of a module (see core/mobility/trust-policy.ts). It signs the hash, so
 * it cannot be part of what is hashed; only the one at the module's root is special.
 */
export const MODULE_SIGNATURE_FILE = 'module.sig';

/** Names never part of a module's content: installed dependencies and dot-files (editor swap files, `.git`). */
function skipped(name: string): boolean {
  return name === 'node_modules' || name.startsWith('.');
}

/**
 * Whether a relative `/`-separated path could be one `moduleFiles` returns: no dot-file or
 * `node_modules` segment and not the root signature file. Shipped file maps are held to this so
 * that the hash of the map and the hash of the folder it is written to are the same.
 */
export function isModuleContentPath(rel: string): boolean {
  return rel !== MODULE_SIGNATURE_FILE && rel.split('/').every((segment) => segment !== '' && !skipped(segment));
}

/**
 * Relative paths (always `/`-separated) of the files that make up a module folder, sorted by
 * code unit so the order does not depend on the file system or the locale. Symbolic links to
 * files are followed; directories reached through a link are not, so a link cycle cannot loop.
 *
 * @example
 * ```ts
 * moduleFiles('plugins/vm-watchdog') // ['manifest.json', 'src/index.ts']  (never the root module.sig)
 * ```
 */
export function moduleFiles(dir: string): string[] {
  const out: string[] = [];
  const walk = (abs: string, rel: string): void => {
    for (const entry of readdirSync(abs, { withFileTypes: true })) {
      if (skipped(entry.name) || (rel === '' && entry.name === MODULE_SIGNATURE_FILE)) continue;
      const childAbs = join(abs, entry.name);
      const childRel = rel === '' ? entry.name : `${rel}/${entry.name}`;
      if (entry.isDirectory()) walk(childAbs, childRel);
      else if (entry.isFile()) out.push(childRel);
      else if (entry.isSymbolicLink()) {
        const target = statSync(childAbs, { throwIfNoEntry: false });
        if (target?.isFile()) out.push(childRel);
      }
    }
  };
  walk(dir, '');
  return out.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
}

/**
 * SHA-256 (hex) of a module folder's content: every file's relative path and bytes, in sorted
 * path order, each length-prefixed so no two different trees can produce the same byte stream.
 * Timestamps and permissions are not included, so touching a file or copying the folder to
 * another host keeps the hash; `node_modules`, dot-files and the root `module.sig` are skipped.
 * Throws the file system's error (e.g. ENOENT) when the folder changes while it is read.
 *
 * @example
 * ```ts
 * const hash = hashModuleDir('plugins/vm-watchdog'); // '3f1c…' (64 hex chars)
 * ```
 */
export function hashModuleDir(dir: string): string {
  return hashModuleFiles(new Map(moduleFiles(dir).map((rel) => [rel, readFileSync(join(dir, rel))])));
}

/**
 * The same hash as `hashModuleDir`, over an in-memory file map (relative `/`-separated path →
 * bytes), e.g. a module bundle received from a peer. The map's order does not matter. The map
 * is hashed as given: a caller that accepts paths from outside checks them first
 * (`isModuleContentPath`), else the hash of the map and of the folder written from it differ.
 *
 * @example
 * ```ts
 * hashModuleFiles(new Map([['manifest.json', bytes], ['index.ts', code]])); // '9ad0…'
 * ```
 */
export function hashModuleFiles(files: ReadonlyMap<string, Uint8Array>): string {
  const h = createHash('sha256');
  h.update('embot-module-v1\0');
  const paths = [...files.keys()].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  for (const rel of paths) {
    const content = files.get(rel)!;
    const path = Buffer.from(rel, 'utf8');
    h.update(`${path.length}:`);
    h.update(path);
    h.update(`${content.length}:`);
    h.update(content);
  }
  return h.digest('hex');
}
