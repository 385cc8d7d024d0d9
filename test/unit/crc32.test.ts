import { existsSync } from 'node:fs';
import { crc32 as zlibCrc32 } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { CRC32_IMPLEMENTATION, DEFAULT_CRC32_CANDIDATES, ISAL_ADDON_PATH, chooseCrc32, crc32, type Crc32 } from '../../effectors/hypervisor/sim/dataplane/crc32.ts';
import { prng } from '../harness/prng.ts';

/** Compares an implementation with zlib over sizes, offsets and running values. */
function expectZlibValues(fn: Crc32, label: string): void {
  const rnd = prng(4);
  const backing = new Uint8Array(1 << 20);
  for (let i = 0; i < backing.length; i++) backing[i] = Math.floor(rnd() * 256);
  for (const [start, length] of [[0, 0], [0, 1], [3, 7], [1, 63], [5, 64], [9, 255], [1, 4096], [4093, 65_536], [17, (1 << 20) - 17]] as const) {
    const data = backing.subarray(start, start + length);
    expect(fn(data), `${label} ${start}+${length}`).toBe(zlibCrc32(data));
    expect(fn(data, 0xdeadbeef), `${label} ${start}+${length} continued`).toBe(zlibCrc32(data, 0xdeadbeef));
  }
  // Chained as batchChecksum does: indexes, then pages.
  expect(fn(backing.subarray(256, 300_000), fn(backing.subarray(0, 256))), label).toBe(zlibCrc32(backing.subarray(0, 300_000)));
  // A Buffer view into a larger pool, as ws and msgpackr hand them over.
  const view = Buffer.from(backing.buffer, 1001, 5000);
  expect(fn(view), label).toBe(zlibCrc32(view));
}

describe('page batch crc32', () => {
  it("gives zlib's values for any bytes, offset and running value", () => {
    expectZlibValues(crc32, CRC32_IMPLEMENTATION);
  });

  it('uses ISA-L where it was built, and every native implementation that loads agrees with zlib', () => {
    // CI installs libisal-dev before npm ci, so there the addon must have been built and chosen.
    if (existsSync('/usr/include/isa-l/crc.h')) {
      expect(existsSync(ISAL_ADDON_PATH)).toBe(true);
      expect(CRC32_IMPLEMENTATION).toBe('isa-l');
    }
    let loaded = 0;
    for (const candidate of DEFAULT_CRC32_CANDIDATES) {
      const choice = chooseCrc32([candidate]);
      if (choice.implementation === 'node:zlib') continue;
      expect(choice.implementation).toBe(candidate.implementation);
      expectZlibValues(choice.crc32, candidate.implementation);
      loaded++;
    }
    expect(loaded).toBeGreaterThan(0);
  });

  it('refuses bad arguments in the ISA-L addon with a TypeError', () => {
    const isal = chooseCrc32([DEFAULT_CRC32_CANDIDATES[0]!]);
    if (isal.implementation !== 'isa-l') return; // not built here: nothing of it runs
    const fn = isal.crc32 as unknown as (...a: unknown[]) => number;
    expect(() => fn()).toThrow(TypeError);
    expect(() => fn('123456789')).toThrow(TypeError);
    expect(() => fn(new Uint16Array(4))).toThrow(TypeError);
    expect(() => fn(Buffer.from('1'), 'x')).toThrow(TypeError);
    expect(fn(Buffer.from('123456789'), undefined)).toBe(0xcbf43926);
  });

  it('falls back, in order, past implementations that are missing or compute something else', () => {
    const missing = chooseCrc32([
      {
        implementation: 'isa-l',
        load: () => {
          throw new Error('Cannot find module crc32_isal.node');
        },
      },
    ]);
    expect(missing.implementation).toBe('node:zlib');
    expect(missing.crc32(Buffer.from('123456789'))).toBe(0xcbf43926);
    expect(chooseCrc32([{ implementation: 'isa-l', load: () => ({ crc32: () => 0 }) }]).implementation).toBe('node:zlib');
    expect(chooseCrc32([{ implementation: 'isa-l', load: () => ({}) }]).implementation).toBe('node:zlib');
    // Right on a whole input but wrong when continued: refused too.
    const noContinuation: Crc32 = (d, initial) => (initial === undefined ? zlibCrc32(d) : 0);
    expect(chooseCrc32([{ implementation: 'isa-l', load: () => ({ crc32: noContinuation }) }]).implementation).toBe('node:zlib');
    const second = chooseCrc32([
      { implementation: 'isa-l', load: () => ({}) },
      { implementation: '@node-rs/crc32', load: () => ({ crc32: zlibCrc32 }) },
    ]);
    expect(second.implementation).toBe('@node-rs/crc32');
    expect(chooseCrc32([{ implementation: 'isa-l', load: () => ({ crc32: zlibCrc32 }) }, { implementation: '@node-rs/crc32', load: () => ({ crc32: zlibCrc32 }) }]).implementation).toBe('isa-l');
  });
});
