import { crc32 as zlibCrc32 } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { CRC32_IMPLEMENTATION, chooseCrc32, crc32 } from '../../effectors/dataplane/crc32.ts';
import { prng } from '../harness/prng.ts';

describe('page batch crc32', () => {
  it('gives zlib\'s values for any bytes, offset and running value', () => {
    expect(['@node-rs/crc32', 'node:zlib']).toContain(CRC32_IMPLEMENTATION);
    const rnd = prng(4);
    const backing = new Uint8Array(1 << 20);
    for (let i = 0; i < backing.length; i++) backing[i] = Math.floor(rnd() * 256);
    for (const [start, length] of [[0, 0], [0, 1], [3, 7], [1, 4096], [4093, 65_536], [17, (1 << 20) - 17]] as const) {
      const data = backing.subarray(start, start + length);
      expect(crc32(data), `${start}+${length}`).toBe(zlibCrc32(data));
      expect(crc32(data, 0xdeadbeef), `${start}+${length} continued`).toBe(zlibCrc32(data, 0xdeadbeef));
    }
    // Chained as batchChecksum does: indexes, then pages.
    const a = backing.subarray(0, 256);
    const b = backing.subarray(256, 300_000);
    expect(crc32(b, crc32(a))).toBe(zlibCrc32(backing.subarray(0, 300_000)));
  });

  it('falls back to zlib when the native module is missing or computes something else', () => {
    const missing = chooseCrc32(() => {
      throw new Error('Cannot find native binding');
    });
    expect(missing.implementation).toBe('node:zlib');
    expect(missing.crc32(Buffer.from('123456789'))).toBe(0xcbf43926);
    expect(chooseCrc32(() => ({ crc32: () => 0 })).implementation).toBe('node:zlib');
    expect(chooseCrc32(() => ({})).implementation).toBe('node:zlib');
  });
});
