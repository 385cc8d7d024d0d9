#!/usr/bin/env node
// Builds the ISA-L crc32 addon at install (package.json "install"). Optional by design: without
// libisal-dev or a compiler, page batches use @node-rs/crc32 (or zlib) with the same values, so a
// failed build prints one line and the install goes on.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const dir = dirname(fileURLToPath(import.meta.url));
const skip = (why) => {
  console.warn(`embot: ISA-L crc32 not built (${why}); page batches use @node-rs/crc32. For the faster checksum: apt-get install libisal-dev, then npm run install.`);
  process.exit(0);
};

if (process.platform !== 'linux') skip(`not on ${process.platform}`);
if (!existsSync('/usr/include/isa-l/crc.h')) skip('no /usr/include/isa-l/crc.h');
// npm gives lifecycle scripts the path of its own node-gyp.
const nodeGyp = process.env.npm_config_node_gyp;
if (!nodeGyp || !existsSync(nodeGyp)) skip('node-gyp not found (run through npm)');
// Build against the headers of the Node that runs this when it has them (no download; there is no
// network here but the package registries), else leave it to node-gyp's own settings.
const prefix = dirname(dirname(process.execPath));
const nodedir = existsSync(join(prefix, 'include', 'node', 'node_api.h')) ? [`--nodedir=${prefix}`] : [];
const r = spawnSync(process.execPath, [nodeGyp, 'rebuild', '--directory', dir, ...nodedir], { stdio: ['ignore', 'ignore', 'pipe'], encoding: 'utf8' });
if (r.status !== 0) skip(`node-gyp failed: ${(r.stderr || r.error?.message || '').trim().split('\n').slice(-3).join(' | ')}`);
console.log('embot: ISA-L crc32 built');
