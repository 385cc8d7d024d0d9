import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { EffectorError, ErrorCodes } from '../../core/errors.ts';
import { GUEST_IMAGE, GUEST_RANGE_START, checkGuestMemory, guestRangeEnd, writeGuestImage } from '../../effectors/hypervisor/qemu/guest/guest-image.ts';
import { QemuDriver } from '../../effectors/hypervisor/qemu/qemu-driver.ts';
import { vmFiles } from '../../effectors/hypervisor/qemu/qemu-process.ts';
import { QmpClient } from '../../effectors/hypervisor/qemu/qmp-client.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { expectThrownCode } from '../harness/expect-code.ts';
import { qemuAvailability, qemuTestFile } from '../harness/qemu-processes.ts';

const { run, qemus } = qemuTestFile();
const cleanups = cleanupsAfterEach();
const PAGE = 4096;
const MiB = 1024 * 1024;

/** CPU seconds (user + system) the process has used: /proc/<pid>/stat fields 14 and 15, in clock ticks (100 per second on Linux). */
function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

async function serialUntil(stateDir: string, want: string, timeoutMs = 60_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    let text = '';
    try {
      text = readFileSync(vmFiles(stateDir).serial, 'latin1');
    } catch {
      /* not yet */
    }
    if (text.includes(want)) return text;
    if (Date.now() > deadline) throw new Error(`serial of ${stateDir} never showed ${JSON.stringify(want)} (has ${JSON.stringify(text)})`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

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
    writeGuestImage(out, { delayLoops: 1234, limitMiB: 40, passes: 3, halt: true });
    const image = readFileSync(out);
    expect(image.length).toBe(512);
    expect(image.readUInt32LE(0x1ec)).toBe(1);
    expect(image.readUInt32LE(0x1f0)).toBe(1234);
    expect(image.readUInt32LE(0x1f4)).toBe(40);
    expect(image.readUInt32LE(0x1f8)).toBe(3);
    expect(image.readUInt16LE(0x1fe)).toBe(0xaa55);
    // The built code is untouched.
    expect(image.subarray(0, 0x1ec)).toEqual(readFileSync(GUEST_IMAGE).subarray(0, 0x1ec));
    writeGuestImage(out, { passes: 3 });
    expect(readFileSync(out).readUInt32LE(0x1ec)).toBe(0);
  });

  it('refuses bad settings (VM_SPEC_INVALID) and an image that is not the guest (VM_IMAGE)', () => {
    const dir = mkdtempSync(join(tmpdir(), 'embot-guest-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    expectThrownCode(() => writeGuestImage(join(dir, 'a.img'), { delayLoops: -1 }), ErrorCodes.VM_SPEC_INVALID, EffectorError);
    expectThrownCode(() => writeGuestImage(join(dir, 'a.img'), { passes: 2 ** 32 }), ErrorCodes.VM_SPEC_INVALID, EffectorError);
    // A halt after passes that never end (0 = forever), and a halt that is not a boolean (a config's "yes").
    expectThrownCode(() => writeGuestImage(join(dir, 'a.img'), { halt: true }), ErrorCodes.VM_SPEC_INVALID, EffectorError);
    expectThrownCode(() => writeGuestImage(join(dir, 'a.img'), { passes: 0, halt: true }), ErrorCodes.VM_SPEC_INVALID, EffectorError);
    expectThrownCode(() => writeGuestImage(join(dir, 'a.img'), { passes: 1, halt: 'yes' as unknown as boolean }), ErrorCodes.VM_SPEC_INVALID, EffectorError);
    const other = join(dir, 'other.bin');
    writeFileSync(other, Buffer.alloc(512));
    expectThrownCode(() => writeGuestImage(join(dir, 'b.img'), {}, other), ErrorCodes.VM_IMAGE, EffectorError);
    expectThrownCode(() => writeGuestImage(join(dir, 'c.img'), {}, join(dir, 'missing.bin')), ErrorCodes.VM_IMAGE, EffectorError);
  });
});

describe.skipIf(!run)('fill-then-halt guest against real QEMU (TCG)', () => {
  it('fills its pages once, says H, halts: memory non-zero and static, the vCPU asleep', async () => {
    const d = new QemuDriver({ root: qemus.root(), accel: 'tcg' });
    cleanups.push(() => d.close());
    const memory = 96 * MiB;
    await d.create({ name: 'halt-1', memory, vcpus: 1, testGuest: { passes: 1, delayLoops: 0, halt: true } });
    await d.start('halt-1');
    const dir = d.stateDir('halt-1');
    expect(await serialUntil(dir, 'H')).toBe('BH');
    const pid = d.pid('halt-1')!;
    // Asleep: over 2 s its QEMU uses a small share of one core (a spinning TCG vCPU takes all of one).
    const c0 = cpuSeconds(pid);
    const t0 = performance.now();
    await new Promise((r) => setTimeout(r, 2000));
    expect((cpuSeconds(pid) - c0) / ((performance.now() - t0) / 1000)).toBeLessThan(0.2);
    const end = guestRangeEnd(memory);
    const nonZero = await d.measureNonZeroBytes('halt-1');
    expect(nonZero).toBeGreaterThanOrEqual(end - GUEST_RANGE_START);
    expect(nonZero).toBeLessThan(memory);
    // Every page of the range is non-zero (counter 1) and no further pass ran.
    await d.pause('halt-1');
    expect(checkGuestMemory(await d.capabilities.memoryDump!.dump('halt-1', GUEST_RANGE_START, end - GUEST_RANGE_START))).toMatchObject({ ok: true, counter: 1, boundary: null });
    await d.resume('halt-1');
    // The driver holds the one QMP connection QEMU serves; let go of it to ask the CPU's state.
    await d.close();
    const qmp = await QmpClient.connect(vmFiles(dir).qmp);
    cleanups.push(() => qmp.close());
    expect(await qmp.execute('query-status')).toMatchObject({ status: 'running', running: true });
    const regs = await qmp.executeRaw('human-monitor-command', { 'command-line': 'info registers' });
    expect(String(regs)).toMatch(/HLT=1/);
    expect(readFileSync(vmFiles(dir).serial, 'latin1')).toBe('BH');
  });

  it('the same guest without halt keeps its vCPU busy (the contrast the halt is for)', async () => {
    const d = new QemuDriver({ root: qemus.root(), accel: 'tcg' });
    cleanups.push(() => d.close());
    await d.create({ name: 'spin-1', memory: 64 * MiB, vcpus: 1, testGuest: { passes: 1, delayLoops: 0 } });
    await d.start('spin-1');
    await serialUntil(d.stateDir('spin-1'), 'BB');
    const pid = d.pid('spin-1')!;
    const c0 = cpuSeconds(pid);
    const t0 = performance.now();
    await new Promise((r) => setTimeout(r, 2000));
    const share = (cpuSeconds(pid) - c0) / ((performance.now() - t0) / 1000);
    expect(share).toBeGreaterThan(0.3);
    expect(readFileSync(vmFiles(d.stateDir('spin-1')).serial, 'latin1')).not.toContain('H');
  });
});
