import net from 'node:net';
import { describe, expect, it } from 'vitest';
import { QemuDriver } from '../../effectors/hypervisor/qemu/qemu-driver.ts';
import { pidAlive, vmFiles } from '../../effectors/hypervisor/qemu/qemu-process.ts';
import type { QemuVmSpec } from '../../effectors/hypervisor/qemu/vm-spec.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { heartbeat, qemuTestFile } from '../harness/qemu-processes.ts';

const MiB = 1024 * 1024;
const { run, qemus } = qemuTestFile();
const cleanups = cleanupsAfterEach();

const spec = (name: string): QemuVmSpec => ({ name, memory: 32 * MiB, vcpus: 1, testGuest: { delayLoops: 2000 } });

type VmEvent = { readonly name: string; readonly event: string; readonly data: Readonly<Record<string, unknown>> };

function driver(root = qemus.root()): { d: QemuDriver; events: VmEvent[] } {
  const d = new QemuDriver({ root, accel: 'tcg', reattachAttemptMs: 300 });
  cleanups.push(() => d.close());
  const events: VmEvent[] = [];
  d.events.on('vm-event', (e) => events.push(e));
  return { d, events };
}

async function until(what: string, check: () => boolean, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe.skipIf(!run)('QMP connection dropped while QEMU keeps running (TCG)', () => {
  it('re-attaches to the same QEMU: same pid, no second QEMU, the VM answers QMP again', async () => {
    const { d, events } = driver();
    await d.create(spec('re-1'));
    await d.start('re-1');
    const pid = d.pid('re-1')!;
    const old = d.qmp('re-1')!;
    await old.close();
    // The driver wires the new connection, then reads back the state it missed; QMP_REATTACHED
    // comes after that read, so wait for the event, not only for the connection.
    await until('QMP_REATTACHED', () => events.some((e) => e.event === 'QMP_REATTACHED'));
    expect(d.qmp('re-1')).not.toBe(old);
    expect(d.pid('re-1')).toBe(pid);
    expect(qemus.live()).toEqual([pid]);
    expect(d.get('re-1')?.state).toBe('running');
    expect(events.map((e) => e.event).filter((e) => e.startsWith('QMP_'))).toEqual(['QMP_DETACHED', 'QMP_REATTACHED']);
    // Driving the VM works through the new connection, and its events still change the state.
    expect((await d.pause('re-1')).state).toBe('paused');
    expect((await d.resume('re-1')).state).toBe('running');
    await heartbeat(d.stateDir('re-1'), 1);
  });

  it('while another client holds the monitor, it retries with back-off and takes it back once freed', async () => {
    const { d, events } = driver();
    await d.create(spec('re-2'));
    await d.start('re-2');
    const pid = d.pid('re-2')!;
    // QEMU serves one QMP client at a time: this one queues now and gets the monitor when the driver's drops.
    const squatter = net.createConnection({ path: vmFiles(d.stateDir('re-2')).qmp });
    await new Promise<void>((resolve, reject) => squatter.once('connect', resolve).once('error', reject));
    const greeted = new Promise<void>((resolve) => squatter.once('data', () => resolve()));
    await d.qmp('re-2')!.close();
    await greeted;
    await until('the detach', () => events.some((e) => e.event === 'QMP_DETACHED'));
    // Several attempts time out (300 ms each) while the squatter holds it.
    await new Promise((r) => setTimeout(r, 1500));
    expect(d.qmp('re-2')).toBeUndefined();
    expect(events.some((e) => e.event === 'QMP_REATTACHED')).toBe(false);
    squatter.destroy();
    await until('the re-attach', () => events.some((e) => e.event === 'QMP_REATTACHED'));
    const reattached = events.find((e) => e.event === 'QMP_REATTACHED')!;
    expect(reattached.data['attempts']).toBeGreaterThan(1);
    expect(reattached.data['pid']).toBe(pid);
    expect(qemus.live()).toEqual([pid]);
    expect((await d.stats('re-2')).state).toBe('running');
  });

  it('a QEMU that dies while detached is a crash, and is not restarted', async () => {
    const { d } = driver();
    await d.create(spec('re-3'));
    await d.start('re-3');
    const pid = d.pid('re-3')!;
    const squatter = net.createConnection({ path: vmFiles(d.stateDir('re-3')).qmp });
    await new Promise<void>((resolve, reject) => squatter.once('connect', resolve).once('error', reject));
    cleanups.push(() => void squatter.destroy());
    await d.qmp('re-3')!.close();
    process.kill(pid, 'SIGKILL');
    await until('the crash', () => d.get('re-3')?.state === 'crashed');
    expect(d.get('re-3')?.crashes).toBe(1);
    expect(pidAlive(pid)).toBe(false);
    expect(qemus.live()).toEqual([]);
  });

  it('a restarted driver whose QEMU turns connects away at first (monitor backlog full) re-attaches within its timeout and lists the VM running', async () => {
    const root = qemus.root();
    const first = driver(root);
    await first.d.create(spec('re-4'));
    await first.d.start('re-4');
    const pid = first.d.pid('re-4')!;
    // The driver lets go: QEMU runs on, as after an agent's exit.
    await first.d.close();
    const path = vmFiles(first.d.stateDir('re-4')).qmp;
    const connect = (): Promise<net.Socket | undefined> =>
      new Promise((resolve) => {
        const s = net.createConnection({ path });
        s.once('connect', () => resolve(s)).once('error', () => resolve(undefined));
      });
    // One client served, then connects until QEMU's listen queue is full and the next is refused at once.
    const held: net.Socket[] = [];
    let refused = false;
    while (!refused && held.length < 8) {
      const s = await connect();
      if (s) held.push(s);
      else refused = true;
    }
    expect(refused).toBe(true);
    setTimeout(() => held.forEach((s) => s.destroy()), 1500);
    cleanups.push(() => held.forEach((s) => s.destroy()));

    const second = driver(root);
    await second.d.restoreState(undefined);
    expect(second.events.filter((e) => e.event === 'REATTACH_FAILED')).toEqual([]);
    expect(second.d.get('re-4')?.state).toBe('running');
    expect(second.d.pid('re-4')).toBe(pid);
    expect(qemus.live()).toEqual([pid]);
  });
});
