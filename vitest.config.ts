import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // One temp folder per run, removed at its end (test/harness/temp-sandbox.ts).
    globalSetup: ['test/harness/temp-sandbox.ts', 'test/harness/dashboard-bundle.ts'],
    testTimeout: 30_000,
    hookTimeout: 30_000,
    // Integration tests spawn agents as child processes; two cores do not gain from more forks.
    pool: 'forks',
    maxWorkers: 2,
  },
});
