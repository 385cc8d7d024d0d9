import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { EffectorError, ErrorCodes } from '../../../../core/errors.ts';

/** Where `npm install` (build.mjs) puts the built boot sector. */
export const GUEST_IMAGE = join(dirname(fileURLToPath(import.meta.url)), 'build', 'dirty-guest.bin');

/** First byte the guest dirties: it writes one byte per page from here to the end of RAM. */
export const GUEST_RANGE_START = 1024 * 1024;
export const GUEST_PAGE_SIZE = 4096;
/** The heartbeat byte the guest writes to its serial port after every full pass. */
export const GUEST_HEARTBEAT = 'B';
/** The byte a guest with {@link GuestSettings.halt} writes once, as it halts. */
export const GUEST_HALTED = 'H';
/** The guest stops this far short of the end of RAM, where the firmware keeps its tables. */
const FIRMWARE_TOP = 4 * 1024 * 1024;

/** End (exclusive) of the range the guest dirties in a VM with `memory` bytes of RAM. */
export function guestRangeEnd(memory: number, limitMiB = 0): number {
  const end = memory - FIRMWARE_TOP;
  return limitMiB > 0 ? Math.min(end, limitMiB * 1024 * 1024) : end;
}

const OFFSET_HALT = 0x1ec;
const OFFSET_DELAY = 0x1f0;
const OFFSET_LIMIT = 0x1f4;
const OFFSET_PASSES = 0x1f8;
const MAGIC = 'EG';

export interface GuestSettings {
  /** Spin iterations after each page write: the dirty rate knob (0 = as fast as the vCPU goes). */
  readonly delayLoops?: number;
  /** End of the dirtied range in MiB (0 or absent = the end of RAM). */
  readonly limitMiB?: number;
  /** Passes that write before the guest turns read-only, memory static (0 or absent = never). */
  readonly passes?: number;
  /**
   * After its `passes` (which must then be > 0): write {@link GUEST_HALTED} to serial and halt
   * the vCPU (`cli; hlt`) instead of reading on. Memory is as filled and the vCPU thread sleeps,
   * so a migration of the guest has the host's cores to itself. Absent/false: read on, heartbeating.
   */
  readonly halt?: boolean;
}

/**
 * Writes a copy of the built guest to `dest` with `settings` patched in at the offsets
 * dirty-guest.S documents. Throws VM_IMAGE when the guest was not built.
 */
export function writeGuestImage(dest: string, settings: GuestSettings = {}, source: string = GUEST_IMAGE): void {
  if (!existsSync(source)) {
    throw new EffectorError(ErrorCodes.VM_IMAGE, `the test guest ${source} is not built: run node effectors/hypervisor/qemu/guest/build.mjs (needs GNU as/ld, Debian: binutils)`, { details: { image: source } });
  }
  const image = readFileSync(source);
  if (image.length !== 512 || image.toString('latin1', 508, 510) !== MAGIC) {
    throw new EffectorError(ErrorCodes.VM_IMAGE, `${source} is not the embot test guest`, { details: { image: source } });
  }
  const u32 = (value: number | undefined, what: string): number => {
    const v = value ?? 0;
    if (!Number.isInteger(v) || v < 0 || v > 0xffff_ffff) throw new EffectorError(ErrorCodes.VM_SPEC_INVALID, `guest ${what} must be an integer 0..2^32-1, not ${v}`, { details: { [what]: v } });
    return v;
  };
  image.writeUInt32LE(u32(settings.delayLoops, 'delayLoops'), OFFSET_DELAY);
  image.writeUInt32LE(u32(settings.limitMiB, 'limitMiB'), OFFSET_LIMIT);
  image.writeUInt32LE(u32(settings.passes, 'passes'), OFFSET_PASSES);
  if (settings.halt !== undefined && typeof settings.halt !== 'boolean') throw new EffectorError(ErrorCodes.VM_SPEC_INVALID, `guest halt must be true or false, not ${String(settings.halt)}`, { details: { halt: String(settings.halt) } });
  // passes 0 writes forever: a halt after it would never come, which is surely not what was meant.
  if (settings.halt === true && !(settings.passes !== undefined && settings.passes > 0)) throw new EffectorError(ErrorCodes.VM_SPEC_INVALID, 'guest halt needs passes > 0 (the passes that fill memory before it halts)', { details: { halt: true, passes: settings.passes ?? 0 } });
  image.writeUInt32LE(settings.halt === true ? 1 : 0, OFFSET_HALT);
  writeFileSync(dest, image);
}

export type IntegrityResult =
  | { readonly ok: true; readonly pages: number; readonly counter: number; readonly boundary: number | null }
  | { readonly ok: false; readonly pages: number; readonly reason: string; readonly page: number };

/**
 * Checks a dump of the guest's dirtied range (from {@link GUEST_RANGE_START}): every page's
 * counter byte is the same, except that the pages before one boundary (where the loop was when
 * the VM stopped) are one step ahead. Anything else means memory was lost or mixed up.
 */
export function checkGuestMemory(dump: Uint8Array, pageSize: number = GUEST_PAGE_SIZE): IntegrityResult {
  const pages = Math.floor(dump.length / pageSize);
  if (pages === 0) return { ok: false, pages, reason: 'the dump holds no whole page', page: 0 };
  const first = dump[0]!;
  let boundary: number | null = null;
  for (let i = 1; i < pages; i++) {
    const prev = dump[(i - 1) * pageSize]!;
    const cur = dump[i * pageSize]!;
    if (cur === prev) continue;
    if (boundary !== null) return { ok: false, pages, reason: `a second step at page ${i} (${prev} -> ${cur}) after the one at page ${boundary}`, page: i };
    if (((cur + 1) & 0xff) !== prev) return { ok: false, pages, reason: `page ${i} holds ${cur} after ${prev}: not one step behind`, page: i };
    boundary = i;
  }
  return { ok: true, pages, counter: first, boundary };
}
