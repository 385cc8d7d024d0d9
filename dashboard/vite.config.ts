import { defineConfig } from 'vite';
import { fileURLToPath } from 'node:url';

// The control server serves the bundle under /ui/ (core/control/dashboard-routes.ts).
export default defineConfig({
  root: fileURLToPath(new URL('.', import.meta.url)),
  base: '/ui/',
  logLevel: 'warn',
  build: {
    outDir: 'dist',
    emptyOutDir: true,
    // The CSP allows no inline script or style: every asset is a file.
    assetsInlineLimit: 0,
    sourcemap: false,
  },
});
