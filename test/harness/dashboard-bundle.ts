import { existsSync, readdirSync, statSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

/**
 * Vitest global setup: builds the dashboard bundle when it is missing or older than its sources
 * (a checkout where `npm install` ran before the dashboard existed or before a change to it), so
 * a plain `npm test` checks the UI the agent would serve.
 */
export default function setup(): void {
  const repo = resolve(fileURLToPath(new URL('../..', import.meta.url)));
  const ui = join(repo, 'dashboard');
  const bundle = join(ui, 'dist', 'index.html');
  if (existsSync(bundle) && newestSource([join(ui, 'src'), join(ui, 'index.html'), join(ui, 'vite.config.ts'), join(repo, 'core', 'control', 'dashboard-api.ts'), join(repo, 'embots', 'policy-chart.ts')]) <= statSync(bundle).mtimeMs) return;
  execFileSync(process.execPath, [join(ui, 'build.mjs')], { cwd: repo, stdio: 'inherit', timeout: 120_000 });
}

/** Latest modification time (ms) of the files under `paths`. */
function newestSource(paths: readonly string[]): number {
  let newest = 0;
  for (const p of paths) {
    if (!existsSync(p)) continue;
    const st = statSync(p);
    if (st.isDirectory()) newest = Math.max(newest, newestSource(readdirSync(p).map((n) => join(p, n))));
    else newest = Math.max(newest, st.mtimeMs);
  }
  return newest;
}
