// The npm registry mirror here lacks msgpackr-extract's non-Linux prebuilds, so `npm install`
// leaves them out of package-lock.json and `npm ci` then refuses the lock as out of sync.
// Record them as optional, platform-bound entries: npm never fetches them on Linux.
import { readFileSync, writeFileSync } from 'node:fs';
const lock = JSON.parse(readFileSync('package-lock.json', 'utf8'));
const want = { 'darwin-arm64': ['darwin', 'arm64'], 'darwin-x64': ['darwin', 'x64'], 'linux-arm': ['linux', 'arm'], 'win32-x64': ['win32', 'x64'] };
const extract = lock.packages['node_modules/msgpackr-extract'];
for (const [suffix, [os, cpu]] of Object.entries(want)) {
  const key = `node_modules/@msgpackr-extract/msgpackr-extract-${suffix}`;
  if (lock.packages[key]) continue;
  lock.packages[key] = { version: extract.version, cpu: [cpu], license: 'MIT', optional: true, os: [os] };
}
writeFileSync('package-lock.json', JSON.stringify(lock, null, 2) + '\n');
