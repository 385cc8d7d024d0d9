import { spawn } from 'node:child_process';
import { rejection } from '../harness/expect-code.ts';
import { mkdirSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../core/errors.ts';
import type { VmStateChange } from '../../effectors/hypervisor/hypervisor-contract.ts';
import { GUEST_RANGE_START, checkGuestMemory, guestRangeEnd } from '../../effectors/hypervisor/qemu/guest/guest-image.ts';
import { QemuDriver } from '../../effectors/hypervisor/qemu/qemu-driver.ts';
import { QemuProcess, pidAlive, vmFiles } from '../../effectors/hypervisor/qemu/qemu-process.ts';
import { QmpClient, type QmpEvent } from '../../effectors/hypervisor/qemu/qmp-client.ts';
import type { QemuVmSpec } from '../../effectors/hypervisor/qemu/vm-spec.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { heartbeat, qemuTestFile } from '../harness/qemu-processes.ts';

const MiB = 1024 * 1024;
const { run, qemus } = qemuTestFile();
const cleanups = cleanupsAfterEach();
// VMs outlive their driver by design: each test ends with none of its QEMUs left.

function driver(root = qemus.root(), options: Partial<ConstructorParameters<typeof QemuDriver>[0]> = {}): QemuDriver {
  const d = new QemuDriver({ root, accel: 'tcg', ...options });
  cleanups.push(() => d.close());
  return d;
}

const spec = (name: string, extra: Partial<QemuVmSpec> = {}): QemuVmSpec => ({ name, memory: 64 * MiB, vcpus: 1, testGuest: { delayLoops: 2000 }, ...extra });

async function until(cond: () => boolean, what: string, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe.skipIf(!run)('qemu driver against real QEMU (TCG)', () => {
  it('QMP client: greeting, commands, errors and events from a real QEMU', async () => {
    const d = driver();
    await d.create(spec('qmp-1'));
    await d.start('qmp-1');
    const pid = d.pid('qmp-1')!;
    // The driver holds the one QMP connection QEMU serves; let go of it to talk directly.
    await d.close();
    const qmp = await QmpClient.connect(vmFiles(d.stateDir('qmp-1')).qmp);
    cleanups.push(() => qmp.close());
    expect(qmp.greeting.version.qemu.major).toBeGreaterThanOrEqual(7);
    expect(await qmp.execute('query-status')).toMatchObject({ status: 'running', running: true });
    const e = await rejection(qmp.executeRaw('no-such-command'));
    expect(e.code).toBe(ErrorCodes.QMP_COMMAND);
    expect(e.details).toMatchObject({ class: 'CommandNotFound' });
    const events: QmpEvent[] = [];
    qmp.events.on('event', (ev) => events.push(ev));
    await qmp.execute('stop');
    await qmp.execute('cont');
    await until(() => events.length >= 2, 'STOP and RESUME');
    expect(events.map((ev) => ev.event)).toEqual(['STOP', 'RESUME']);
    expect(pidAlive(pid)).toBe(true);
  });

  it('boots the test guest: it heartbeats on serial and its memory passes the integrity check', async () => {
    const d = driver();
    const events: VmStateChange[] = [];
    d.events.on('vm-state', (e) => events.push(e));
    await d.create(spec('guest-1'));
    await d.start('guest-1');
    await heartbeat(d.stateDir('guest-1'), 3);
    await d.pause('guest-1');
    const end = guestRangeEnd(64 * MiB);
    const dump = await d.capabilities.memoryDump!.dump('guest-1', GUEST_RANGE_START, end - GUEST_RANGE_START);
    const check = checkGuestMemory(dump);
    expect(check, JSON.stringify(check)).toMatchObject({ ok: true, pages: (end - GUEST_RANGE_START) / 4096 });
    // It ran at least three passes (three heartbeats), so the counters are not the zeroes of fresh RAM.
    expect(check.ok && check.counter).toBeGreaterThanOrEqual(3);
    // A page changed behind the guest's back is found.
    dump[100 * 4096] = (dump[100 * 4096]! + 7) & 0xff;
    expect(checkGuestMemory(dump).ok).toBe(false);
    await d.resume('guest-1');
    await heartbeat(d.stateDir('guest-1'), 1);
    expect(events.map((e) => `${e.to}:${e.reason}`)).toEqual(['created:create', 'running:start', 'paused:pause', 'running:resume']);
  });

  it('lifecycle: stop, start again, kill, remove, with state events; running VMs refuse remove', async () => {
    const d = driver();
    const events: VmStateChange[] = [];
    d.events.on('vm-state', (e) => events.push(e));
    const removed: string[] = [];
    d.events.on('vm-removed', (e) => removed.push(e.name));
    await d.create(spec('life-1'));
    expect((await rejection(d.create(spec('life-1')))).code).toBe(ErrorCodes.VM_EXISTS);
    await d.start('life-1');
    expect((await rejection(d.start('life-1'))).code).toBe(ErrorCodes.VM_BAD_STATE);
    expect((await rejection(d.remove('life-1'))).code).toBe(ErrorCodes.VM_BAD_STATE);
    const first = d.pid('life-1')!;
    expect((await d.stop('life-1')).state).toBe('stopped');
    expect(pidAlive(first)).toBe(false);
    await d.start('life-1');
    const second = d.pid('life-1')!;
    expect(second).not.toBe(first);
    expect((await d.kill('life-1')).state).toBe('stopped');
    expect(pidAlive(second)).toBe(false);
    await d.remove('life-1');
    expect(d.get('life-1')).toBeUndefined();
    expect(removed).toEqual(['life-1']);
    expect(events.map((e) => `${e.to}:${e.reason}`)).toEqual(['created:create', 'running:start', 'stopped:stop', 'running:start', 'stopped:kill']);
    expect((await d.get('life-1'))?.crashes).toBeUndefined();
  });

  it('a QEMU killed from outside (kill -9) becomes a crashed VM, and it can be started again', async () => {
    const d = driver();
    await d.create(spec('crash-1'));
    await d.start('crash-1');
    const crashed = new Promise<VmStateChange>((resolve) => d.events.on('vm-state', (e) => e.to === 'crashed' && resolve(e)));
    process.kill(d.pid('crash-1')!, 'SIGKILL');
    expect(await crashed).toMatchObject({ name: 'crash-1', from: 'running', to: 'crashed', reason: 'process-died' });
    expect(d.get('crash-1')).toMatchObject({ state: 'crashed', crashes: 1 });
    await d.start('crash-1');
    await heartbeat(d.stateDir('crash-1'), 1);
    expect((await d.stats('crash-1')).state).toBe('running');
    // The declared fault capability does the same.
    const pid = d.pid('crash-1')!;
    expect(await d.capabilities.faults!.crash('crash-1')).toMatchObject({ state: 'crashed', crashes: 2 });
    expect(pidAlive(pid)).toBe(false);
  });

  it('a new driver on the same root re-attaches to the running QEMU: same pid, no second QEMU; a VM that died meanwhile is crashed', async () => {
    const root = qemus.root();
    const first = driver(root);
    await first.create(spec('keep-1'));
    await first.create(spec('dies-1'));
    await first.create(spec('idle-1'));
    await first.start('keep-1');
    await first.start('dies-1');
    const keepPid = first.pid('keep-1')!;
    const diesPid = first.pid('dies-1')!;
    const persisted = first.getPersistedState();
    // The agent goes away; its VMs stay.
    await first.close();
    expect(pidAlive(keepPid)).toBe(true);
    process.kill(diesPid, 'SIGKILL');
    await until(() => !pidAlive(diesPid), 'the killed QEMU to die');

    const second = driver(root);
    const events: VmStateChange[] = [];
    second.events.on('vm-state', (e) => events.push(e));
    await second.restoreState(persisted);
    expect(second.get('keep-1')).toMatchObject({ state: 'running' });
    expect(second.pid('keep-1')).toBe(keepPid);
    expect(second.get('dies-1')).toMatchObject({ state: 'crashed', crashes: 1 });
    expect(second.get('idle-1')).toMatchObject({ state: 'created' });
    expect(qemus.live().filter((p) => p === keepPid)).toHaveLength(1);
    expect(qemus.live()).toEqual([keepPid]);
    // Starting what already runs would make a duplicate: refused.
    expect((await rejection(second.start('keep-1'))).code).toBe(ErrorCodes.VM_BAD_STATE);
    expect((await rejection(QemuProcess.launch({ stateDir: second.stateDir('keep-1'), spec: spec('keep-1'), accel: 'tcg' }))).code).toBe(ErrorCodes.VM_BAD_STATE);
    await heartbeat(second.stateDir('keep-1'), 1);
    // Events still flow through the new connection.
    await second.pause('keep-1');
    expect((await second.stats('keep-1')).state).toBe('paused');
    expect(events.some((e) => e.name === 'keep-1' && e.reason === 'reattach')).toBe(true);
  });

  it('a guest with passes: 2 stops writing after two passes: every counter is 2, and it still heartbeats', async () => {
    const d = driver();
    await d.create(spec('passes-1', { testGuest: { passes: 2, delayLoops: 0 } }));
    await d.start('passes-1');
    await heartbeat(d.stateDir('passes-1'), 4);
    await d.pause('passes-1');
    const end = guestRangeEnd(64 * MiB);
    const check = checkGuestMemory(await d.capabilities.memoryDump!.dump('passes-1', GUEST_RANGE_START, end - GUEST_RANGE_START));
    expect(check).toMatchObject({ ok: true, counter: 2, boundary: null });
    await d.resume('passes-1');
    await heartbeat(d.stateDir('passes-1'), 2);
  });

  it('restore without a persisted state: a QEMU that was killed reads as crashed, one that was stopped as stopped', async () => {
    const root = qemus.root();
    const first = driver(root);
    for (const n of ['k-1', 's-1']) {
      await first.create(spec(n));
      await first.start(n);
    }
    await first.stop('s-1');
    const killed = first.pid('k-1')!;
    await first.close();
    process.kill(killed, 'SIGKILL');
    await until(() => !pidAlive(killed), 'the killed QEMU to die');
    const second = driver(root);
    await second.restoreState(undefined);
    expect(second.get('k-1')).toMatchObject({ state: 'crashed', crashes: 1 });
    expect(second.get('s-1')).toMatchObject({ state: 'stopped' });
  });

  it('stats report memory, load and a measured dirty rate', async () => {
    const d = driver();
    await d.create(spec('stats-1', { testGuest: { delayLoops: 0 } }));
    await d.start('stats-1');
    const rate = await d.measureDirtyRate('stats-1', 1);
    expect(rate).toBeGreaterThan(0);
    await new Promise((r) => setTimeout(r, 300));
    const s = await d.stats('stats-1');
    expect(s).toMatchObject({ name: 'stats-1', state: 'running', memory: 64 * MiB, pageSize: 4096, dirtyRate: rate });
    expect(s.load).toBeGreaterThanOrEqual(0);
    expect(s.load).toBeLessThanOrEqual(1);
  });

  describe('bad input: a coded error, nothing started, the driver keeps working', () => {
    it('a missing, empty, misaligned or qcow2-in-disguise image is VM_IMAGE', async () => {
      const d = driver();
      const dir = join(qemus.root(), 'images');
      mkdirSync(dir);
      const empty = join(dir, 'empty.img');
      writeFileSync(empty, '');
      const odd = join(dir, 'odd.img');
      writeFileSync(odd, Buffer.alloc(1000, 1));
      const fakeQcow = join(dir, 'fake.qcow2');
      writeFileSync(fakeQcow, Buffer.from('not a qcow2 header at all'));
      const disguised = join(dir, 'disguised.img');
      const header = Buffer.alloc(512);
      header.writeUInt32BE(0x514649fb, 0);
      header.writeUInt32BE(3, 4);
      writeFileSync(disguised, header);
      const cases: QemuVmSpec[] = [
        spec('img-1', { bootImage: join(dir, 'missing.img') }),
        spec('img-2', { bootImage: empty }),
        spec('img-3', { bootImage: odd }),
        spec('img-4', { disks: [{ path: fakeQcow, format: 'qcow2' }] }),
        spec('img-5', { disks: [{ path: disguised, format: 'raw' }] }),
        spec('img-6', { disks: [{ path: join(dir, 'gone.qcow2'), format: 'qcow2' }] }),
      ];
      for (const c of cases) {
        const e = await rejection(d.create(c));
        expect(e.code, c.name).toBe(ErrorCodes.VM_IMAGE);
        expect(d.get(c.name), c.name).toBeUndefined();
      }
      // A qcow2 header that passes the check but is corrupt inside: QEMU refuses it, still VM_IMAGE.
      const broken = join(dir, 'broken.qcow2');
      const h = Buffer.alloc(4096);
      h.writeUInt32BE(0x514649fb, 0);
      h.writeUInt32BE(3, 4);
      writeFileSync(broken, h);
      await d.create(spec('img-7', { disks: [{ path: broken, format: 'qcow2' }] }));
      expect((await rejection(d.start('img-7'))).code).toBe(ErrorCodes.VM_IMAGE);
      expect(d.get('img-7')?.state).toBe('created');
      expect(qemus.live()).toEqual([]);
      await d.create(spec('img-ok'));
      await d.start('img-ok');
      expect(d.get('img-ok')?.state).toBe('running');
    });

    it('a bad spec is VM_SPEC_INVALID', async () => {
      const d = driver();
      for (const bad of [{}, { name: 'Bad Name', memory: 64 * MiB, vcpus: 1 }, spec('m', { memory: 1000 }), spec('v', { vcpus: 0 }), spec('n', { nics: [{ model: 'rtl' as 'e1000' }] })]) {
        expect((await rejection(d.create(bad as QemuVmSpec))).code).toBe(ErrorCodes.VM_SPEC_INVALID);
      }
    });

    it('a missing QEMU binary is QEMU_MISSING', async () => {
      const d = driver(qemus.root(), { binary: '/nonexistent/qemu-system-x86_64' });
      await d.create(spec('nobin-1'));
      const e = await rejection(d.start('nobin-1'));
      expect(e.code).toBe(ErrorCodes.QEMU_MISSING);
      expect(e.message).toContain('qemu-system-x86');
      expect(d.get('nobin-1')?.state).toBe('created');
    });

    it('re-attach while another client holds the one QMP connection is a coded QMP error, not a hang', async () => {
      const d = driver();
      await d.create(spec('held-1'));
      await d.start('held-1');
      await d.close();
      const holder = await QmpClient.connect(vmFiles(d.stateDir('held-1')).qmp);
      cleanups.push(() => holder.close());
      const e = await rejection(QemuProcess.attach(d.stateDir('held-1'), { timeoutMs: 500 }));
      expect([ErrorCodes.QMP_TIMEOUT, ErrorCodes.QMP_PROTOCOL]).toContain(e.code);
    });

    it('restore past bad state dirs (QMP answering garbage, torn or mismatched spec.json): REATTACH_FAILED with a code each, the good VM kept, never a second QEMU', async () => {
      const root = qemus.root();
      const first = driver(root);
      await first.create(spec('good-1'));
      await first.start('good-1');
      const goodPid = first.pid('good-1')!;
      await first.close();
      // FAKE, named as such: a "QEMU" that answers garbage cannot be caused with real QEMU. A node
      // process whose command line names the socket stands in for the process, a unix socket
      // server writing noise for its monitor.
      const dir = join(root, 'noisy-1');
      mkdirSync(dir);
      const files = vmFiles(dir);
      writeFileSync(files.spec, JSON.stringify({ spec: spec('noisy-1'), incoming: false }));
      const server = net.createServer((socket) => {
        socket.on('error', () => {});
        socket.end('\u0000\u00ffnot qmp at all\n');
      });
      await new Promise<void>((r) => server.listen(files.qmp, r));
      cleanups.push(() => new Promise<void>((r) => server.close(() => r())));
      const fake = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 60_000)', files.qmp], { stdio: 'ignore' });
      cleanups.push(() => void fake.kill('SIGKILL'));
      writeFileSync(files.pid, String(fake.pid));

      // Two more bad dirs: a spec.json that is not JSON, one that names another VM; and a dir that is no VM at all.
      for (const [name, content] of [['torn-1', '{"spec": {"name": "torn-1", "mem'], ['other-1', JSON.stringify({ spec: spec('good-1'), incoming: false })]] as const) {
        mkdirSync(join(root, name));
        writeFileSync(vmFiles(join(root, name)).spec, content);
      }
      mkdirSync(join(root, 'not-a-vm'));

      const second = driver(root);
      const events: { name: string; event: string; data: Readonly<Record<string, unknown>> }[] = [];
      second.events.on('vm-event', (e) => events.push(e));
      await second.restoreState(undefined);
      expect(events.find((e) => e.name === 'noisy-1')).toMatchObject({ event: 'REATTACH_FAILED', data: { code: ErrorCodes.QMP_PROTOCOL } });
      expect(events.find((e) => e.name === 'torn-1')).toMatchObject({ event: 'REATTACH_FAILED', data: { code: ErrorCodes.VM_SPEC_INVALID } });
      expect(events.find((e) => e.name === 'other-1')).toMatchObject({ event: 'REATTACH_FAILED', data: { code: ErrorCodes.VM_SPEC_INVALID } });
      expect(events.filter((e) => e.event === 'REATTACH_FAILED')).toHaveLength(3);
      expect(second.list().map((v) => v.name)).toEqual(['good-1']);
      expect(second.get('noisy-1')).toBeUndefined();
      expect(second.get('good-1')).toMatchObject({ state: 'running' });
      expect(second.pid('good-1')).toBe(goodPid);
      // The unreachable VM's dir still has a live process: a start there is refused, not doubled.
      expect((await rejection(QemuProcess.launch({ stateDir: dir, spec: spec('noisy-1'), accel: 'tcg' }))).code).toBe(ErrorCodes.VM_BAD_STATE);
      // The fake process passes for the dir's QEMU (that is the point); no real QEMU was added.
      expect(qemus.live().filter((p) => p !== fake.pid)).toEqual([goodPid]);
    });
  });
});
