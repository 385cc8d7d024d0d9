import { createHash } from 'node:crypto';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';

/** Names never part of a module's content: installed dependencies and dot-files (editor swap files, `.git`). */
function skipped(name: string): boolean {
  return name === 'node_modules' || name.startsWith('.');
}

/**
 * Relative paths (always `/`-separated) of the files that make up a module folder, sorted by
 * code unit so the order does not depend on the file system or the locale. Symbolic links to
 * files are followed; directories reached through a link are not, so a link cycle cannot loop.
 *
 * @example
 * ```ts
 * moduleFiles('plugins/vm-watchdog') // ['manifest.json', 'src/index.ts']
 * ```
 */
export function moduleFiles(dir: string): string[] {
  const out: string[] = [];
  const walk = (abs: string, rel: string): void => {
    for (const entry of readdirSync(abs, { withFileTypes: true })) {
      if (skipped(entry.name)) continue;
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
 * another host keeps the hash; `node_modules` and dot-files are skipped.
 * Throws the file system's error (e.g. ENOENT) when the folder changes while it is read.
 *
 * @example
 * ```ts
 * const hash = hashModuleDir('plugins/vm-watchdog'); // '3f1c…' (64 hex chars)
 * ```
 */
export function hashModuleDir(dir: string): string {
  const h = createHash('sha256');
  h.update('embot-module-v1\0');
  for (const rel of moduleFiles(dir)) {
    const content = readFileSync(join(dir, rel));
    const path = Buffer.from(rel, 'utf8');
    h.update(`${path.length}:`);
    h.update(path);
    h.update(`${content.length}:`);
    h.update(content);
  }
  return h.digest('hex');
}
