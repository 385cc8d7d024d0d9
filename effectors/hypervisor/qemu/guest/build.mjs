#!/usr/bin/env node
// Builds the test guest's boot sector (dirty-guest.S) with GNU as/ld at install (package.json
// "install"). Without as/ld it prints one line and the install goes on: only the QEMU tests and
// benchmarks need the guest, and they say so when it is missing.
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const dir = dirname(fileURLToPath(import.meta.url));
export const GUEST_IMAGE = join(dir, 'build', 'dirty-guest.bin');

const run = (cmd, args) => spawnSync(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'], encoding: 'utf8' });

/** Builds the image; returns its path, or a reason it was not built (as/ld missing). Throws when as/ld fail. */
export function buildGuest() {
  for (const tool of ['as', 'ld']) {
    const r = run(tool, ['--version']);
    if (r.error || r.status !== 0) return { built: false, reason: `${tool} not found (Debian: binutils)` };
  }
  const out = join(dir, 'build');
  mkdirSync(out, { recursive: true });
  const obj = join(out, 'dirty-guest.o');
  const asm = run('as', ['--32', '-o', obj, join(dir, 'dirty-guest.S')]);
  if (asm.status !== 0) throw new Error(`as failed: ${asm.stderr.trim()}`);
  const link = run('ld', ['-m', 'elf_i386', '-Ttext', '0x7c00', '--oformat', 'binary', '-e', '_start', '-o', GUEST_IMAGE, obj]);
  rmSync(obj, { force: true });
  if (link.status !== 0) throw new Error(`ld failed: ${link.stderr.trim()}`);
  const image = readFileSync(GUEST_IMAGE);
  // The settings offsets in guest-image.ts rely on this exact shape.
  if (image.length !== 512 || image.readUInt16LE(510) !== 0xaa55 || image.toString('latin1', 508, 510) !== 'EG') {
    throw new Error(`built guest is not a 512-byte boot sector with the EG magic (${image.length} bytes)`);
  }
  return { built: true, path: GUEST_IMAGE };
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const r = buildGuest();
  if (r.built) console.log(`embot: QEMU test guest built (${r.path})`);
  else console.warn(`embot: QEMU test guest not built (${r.reason}); the QEMU tests and benchmarks will skip.`);
}
