import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { EffectorError, ErrorCodes } from '../../core/errors.ts';
import { GUEST_IMAGE, checkGuestMemory, guestRangeEnd, writeGuestImage } from '../../effectors/hypervisor/qemu/guest/guest-image.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { expectThrownCode } from '../harness/expect-code.ts';
import { qemuAvailability } from '../harness/qemu-processes.ts';

const cleanups = cleanupsAfterEach();
const PAGE = 4096;

/** A dump of `pages` pages whose counter bytes are `counters` (the rest of each page zero). */
function dump(counters: readonly number[]): Uint8Array {
  const d = new Uint8Array(counters.length * PAGE);
  counters.forEach((c, i) => (d[i * PAGE] = c));
  return d;
}

describe('test guest memory check (no QEMU needed)', () => {
  it('accepts all-equal counters and one step where the loop stopped, wrap-around included', () => {
    expect(checkGuestMemory(dump([5, 5, 5, 5]))).toEqual({ ok: true, pages: 4, counter: 5, boundary: null });
    expect(checkGuestMemory(dump([6, 6, 5, 5]))).toEqual({ ok: true, pages: 4, counter: 6, boundary: 2 });
    expect(checkGuestMemory(dump([0, 0, 255, 255]))).toMatchObject({ ok: true, boundary: 2 });
  });

  it('refuses a second step, a step the wrong way or by more than one, and an empty dump', () => {
    expect(checkGuestMemory(dump([6, 5, 6, 5]))).toMatchObject({ ok: false, page: 2 });
    expect(checkGuestMemory(dump([5, 5, 6, 6]))).toMatchObject({ ok: false, page: 2 });
    expect(checkGuestMemory(dump([7, 7, 5, 5]))).toMatchObject({ ok: false, page: 2 });
    expect(checkGuestMemory(new Uint8Array(100))).toMatchObject({ ok: false, pages: 0 });
  });

  it('gives the dirtied range: 1 MiB to 4 MiB short of the end of RAM, or the limit', () => {
    expect(guestRangeEnd(64 * 2 ** 20)).toBe(60 * 2 ** 20);
    expect(guestRangeEnd(64 * 2 ** 20, 20)).toBe(20 * 2 ** 20);
    expect(guestRangeEnd(64 * 2 ** 20, 100)).toBe(60 * 2 ** 20);
  });
});

describe.skipIf(!qemuAvailability().ok)('test guest image', () => {
  it('patches its settings at the documented offsets and keeps it a boot sector', () => {
    const dir = mkdtempSync(join(tmpdir(), 'embot-guest-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const out = join(dir, 'boot.img');
    writeGuestImage(out, { delayLoops: 1234, limitMiB: 40, passes: 3 });
    const image = readFileSync(out);
    expect(image.length).toBe(512);
    expect(image.readUInt32LE(0x1f0)).toBe(1234);
    expect(image.readUInt32LE(0x1f4)).toBe(40);
    expect(image.readUInt32LE(0x1f8)).toBe(3);
    expect(image.readUInt16LE(0x1fe)).toBe(0xaa55);
    // The built code is untouched.
    expect(image.subarray(0, 0x1f0)).toEqual(readFileSync(GUEST_IMAGE).subarray(0, 0x1f0));
  });

  it('refuses bad settings (VM_SPEC_INVALID) and an image that is not the guest (VM_IMAGE)', () => {
    const dir = mkdtempSync(join(tmpdir(), 'embot-guest-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    expectThrownCode(() => writeGuestImage(join(dir, 'a.img'), { delayLoops: -1 }), ErrorCodes.VM_SPEC_INVALID, EffectorError);
    expectThrownCode(() => writeGuestImage(join(dir, 'a.img'), { passes: 2 ** 32 }), ErrorCodes.VM_SPEC_INVALID, EffectorError);
    const other = join(dir, 'other.bin');
    writeFileSync(other, Buffer.alloc(512));
    expectThrownCode(() => writeGuestImage(join(dir, 'b.img'), {}, other), ErrorCodes.VM_IMAGE, EffectorError);
    expectThrownCode(() => writeGuestImage(join(dir, 'c.img'), {}, join(dir, 'missing.bin')), ErrorCodes.VM_IMAGE, EffectorError);
  });
});
