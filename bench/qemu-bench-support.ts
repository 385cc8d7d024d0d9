/**
 * What the QEMU benches share: whether they can run here, the bare QMP migration that is their
 * limit, and leaving no QEMU behind (VMs outlive their drivers and agents).
 */
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { GUEST_IMAGE } from '../effectors/hypervisor/qemu/guest/guest-image.ts';
import { QemuProcess, killPid, pidAlive, runningPid, vmFiles } from '../effectors/hypervisor/qemu/qemu-process.ts';
import type { QemuVmSpec } from '../effectors/hypervisor/qemu/vm-spec.ts';

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export const median = (xs: readonly number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

/** Why the QEMU rows cannot run here (no binary, no guest), or undefined; builds the guest if it can. */
export function qemuMissing(): string | undefined {
  const r = spawnSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8' });
  if (r.error || r.status !== 0) return 'qemu-system-x86_64 not found';
  if (!existsSync(GUEST_IMAGE)) spawnSync(process.execPath, [join(import.meta.dirname, '../effectors/hypervisor/qemu/guest/build.mjs')], { stdio: 'ignore' });
  if (!existsSync(GUEST_IMAGE)) return 'the test guest is not built (GNU as/ld missing)';
  return undefined;
}

/** Every QEMU under `root` (any depth), killed, and waited for. */
export async function killQemusUnder(root: string): Promise<void> {
  const pids: number[] = [];
  const walk = (dir: string): void => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      if (!e.isDirectory()) continue;
      const sub = join(dir, e.name);
      const pid = runningPid(sub);
      if (pid !== undefined) pids.push(pid);
      walk(sub);
    }
  };
  if (existsSync(root)) walk(root);
  for (const pid of pids) killPid(pid);
  while (pids.some(pidAlive)) await sleep(20);
}

/** Waits until the guest in `stateDir` printed `bytes` heartbeats on its serial port (it runs). */
export async function waitSerial(stateDir: string, bytes: number): Promise<void> {
  const deadline = Date.now() + 120_000;
  for (;;) {
    let size = 0;
    try {
      size = statSync(vmFiles(stateDir).serial).size;
    } catch {
      /* not yet */
    }
    if (size >= bytes) return;
    if (Date.now() > deadline) throw new Error(`the guest in ${stateDir} gave no heartbeat`);
    await sleep(20);
  }
}

/**
 * Bare QMP, the limit: both QEMUs started untimed (the target's start reported apart), the guest
 * running `heartbeats` passes, then `migrate` → target running, timed.
 */
export async function bareMigrate(root: string, spec: QemuVmSpec, heartbeats: number): Promise<{ readonly ms: number; readonly targetStartMs: number }> {
  const src = await QemuProcess.launch({ stateDir: join(root, 'bare-src'), spec, accel: 'tcg' });
  const t0 = performance.now();
  const dst = await QemuProcess.launch({ stateDir: join(root, 'bare-dst'), spec, accel: 'tcg', incoming: true });
  const targetStartMs = performance.now() - t0;
  try {
    await waitSerial(src.stateDir, heartbeats);
    await dst.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
    await dst.qmp.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' });
    const port = (await dst.qmp.execute('query-migrate'))['socket-address']![0]!.port;
    await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 1024 ** 4 });
    const started = performance.now();
    await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
    for (;;) {
      const { status } = await dst.qmp.execute('query-status');
      if (status === 'running') break;
      if (status !== 'inmigrate' && status !== 'paused') throw new Error(`bare target is ${status}`);
      await sleep(1);
    }
    return { ms: performance.now() - started, targetStartMs };
  } finally {
    await src.kill();
    await dst.kill();
    await src.detach();
    await dst.detach();
    rmSync(src.stateDir, { recursive: true, force: true });
    rmSync(dst.stateDir, { recursive: true, force: true });
  }
}
