#!/usr/bin/env node
// Builds the dashboard bundle (dashboard/dist) with Vite. Run by `npm install` (install script),
// `npm run build:ui`, and the test run's globalSetup when the bundle is missing.
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('.', import.meta.url));
let build;
try {
  ({ build } = await import('vite'));
} catch {
  // An install without dev dependencies (npm install --omit=dev) has no Vite: the agent still
  // runs, and its dashboard answers EMBOT_ERR_DASHBOARD_NOT_BUILT until someone builds it.
  console.warn('dashboard: vite is not installed; skipping the UI build (npm run build:ui after installing dev dependencies)');
  process.exit(0);
}
const started = Date.now();
await build({ configFile: fileURLToPath(new URL('vite.config.ts', import.meta.url)), root, logLevel: 'warn' });
if (!existsSync(fileURLToPath(new URL('dist/index.html', import.meta.url)))) {
  console.error('dashboard: the build wrote no dist/index.html');
  process.exit(1);
}
console.log(`dashboard: built dashboard/dist in ${Date.now() - started} ms`);
