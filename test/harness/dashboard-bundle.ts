import { existsSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

/**
 * Vitest global setup: builds the dashboard bundle when it is missing (a checkout where
 * `npm install` ran before the dashboard existed, or someone deleted dashboard/dist), so a plain
 * `npm test` checks the UI it would serve. A present bundle is left alone: the tests serve what
 * `npm run build:ui` last built.
 */
export default function setup(): void {
  const repo = resolve(fileURLToPath(new URL('../..', import.meta.url)));
  if (existsSync(join(repo, 'dashboard', 'dist', 'index.html'))) return;
  execFileSync(process.execPath, [join(repo, 'dashboard', 'build.mjs')], { cwd: repo, stdio: 'inherit', timeout: 120_000 });
}
