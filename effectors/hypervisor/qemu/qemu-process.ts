import { spawn } from 'node:child_process';
import { accessSync, constants, existsSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { EventEmitter } from 'eventemitter3';
import { EffectorError, ErrorCodes, isEmbotError } from '../../../core/errors.ts';
import { writeGuestImage } from './guest/guest-image.ts';
import { QmpClient } from './qmp-client.ts';
import { qemuRamArg } from './ram-size.ts';
import { checkImage, type QemuVmSpec } from './vm-spec.ts';

export type Accel = 'auto' | 'kvm' | 'tcg';

/** The files of one VM in its state dir; a restarted agent finds its VMs through them. */
export function vmFiles(stateDir: string): {
  readonly qmp: string;
  readonly pid: string;
  readonly serial: string;
  readonly boot: string;
  readonly spec: string;
  readonly origin: string;
} {
  return {
    qmp: join(stateDir, 'qmp.sock'),
    pid: join(stateDir, 'qemu.pid'),
    serial: join(stateDir, 'serial.log'),
    boot: join(stateDir, 'boot.img'),
    spec: join(stateDir, 'spec.json'),
    // The dir QEMU was started in, when the dir was renamed since (an adopted spare incoming QEMU):
    // its command line names the old paths.
    origin: join(stateDir, 'qemu.origin'),
  };
}

export interface QemuLaunchOptions {
  /** Default `qemu-system-x86_64` on the PATH. */
  readonly binary?: string;
  readonly stateDir: string;
  readonly spec: QemuVmSpec;
  readonly accel?: Accel;
  /** Start with `-incoming defer`: a migration target waiting for `migrate-incoming`. */
  readonly incoming?: boolean;
  /** With `incoming`: `-S`, the VM stays paused once its memory is in, until a `cont` (the driver's commit). Default false: it runs by itself, as a bare QEMU does. */
  readonly holdIncoming?: boolean;
  /**
   * With `incoming`: `-mem-prealloc`, the guest RAM faulted in when QEMU starts, not page by page
   * as the stream writes it (that kernel time varied 5× between moves of the same guest on the
   * 2-core TCG host, BENCHMARKS "planner's estimate"). Costs the RAM resident from the start.
   */
  readonly preallocate?: boolean;
  /** Wait this long for QEMU to come up and answer QMP (default 30 s). */
  readonly timeoutMs?: number;
  /**
   * The boot image is shared by several QEMUs (a spare incoming QEMU's read-only test guest, which
   * an incoming VM never boots from): opened without QEMU's image lock, which would refuse the
   * second VM's activation at its `cont`.
   */
  readonly sharedBootImage?: boolean;
}

export interface QemuProcessEvents {
  /** The QEMU process is gone (its QMP socket closed and the pid is dead). */
  exit: () => void;
  /** QMP closed but the process still runs (someone else holds it, or QEMU hangs). */
  detached: () => void;
}

/** /dev/kvm exists and this process may open it read-write. */
export function kvmUsable(): boolean {
  try {
    accessSync('/dev/kvm', constants.R_OK | constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

/** The accelerator a QEMU started now gets: the one asked for, or with `auto` KVM when it is usable, else TCG. */
export function launchAccel(accel: Accel | undefined): 'kvm' | 'tcg' {
  return accel === 'kvm' || accel === 'tcg' ? accel : kvmUsable() ? 'kvm' : 'tcg';
}

/**
 * Whether `pid` is a live process. A zombie counts as dead: QEMU runs daemonized, reparented to a
 * pid 1 that may never reap it.
 */
export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return process.platform !== 'linux';
  }
}

/** True when `pid` is the QEMU of this state dir (its command line names the QMP socket): pid reuse must not make a stranger "our" VM. */
function isOurQemu(pid: number, stateDir: string): boolean {
  let cmdline: string;
  try {
    cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
  } catch {
    return false;
  }
  if (cmdline.includes(vmFiles(stateDir).qmp)) return true;
  let origin: string;
  try {
    origin = readFileSync(vmFiles(stateDir).origin, 'utf8').trim();
  } catch {
    return false;
  }
  return origin.length > 0 && cmdline.includes(vmFiles(origin).qmp);
}

export function readPidFile(stateDir: string): number | undefined {
  try {
    const pid = Number.parseInt(readFileSync(vmFiles(stateDir).pid, 'utf8').trim(), 10);
    return Number.isInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

/** The live QEMU of `stateDir`, if there is one. */
export function runningPid(stateDir: string): number | undefined {
  const pid = readPidFile(stateDir);
  return pid !== undefined && pidAlive(pid) && isOurQemu(pid, stateDir) ? pid : undefined;
}

/** The command line for a spec: the same spec gives the same machine, which is what migration needs. */
export function qemuArgs(o: {
  readonly stateDir: string;
  readonly spec: QemuVmSpec;
  readonly accel: 'kvm' | 'tcg';
  readonly incoming: boolean;
  readonly holdIncoming?: boolean;
  readonly sharedBootImage?: boolean;
  readonly preallocate?: boolean;
}): string[] {
  const f = vmFiles(o.stateDir);
  const { spec } = o;
  const args = [
    '-name', `${spec.name},process=qemu-${spec.name}`,
    '-machine', 'pc',
    '-accel', o.accel,
    // Not the spec's size exactly under TCG: QEMU 7.2 loses pages of a TCG guest when its RAM is a multiple of 256 KiB (ram-size.ts).
    '-m', qemuRamArg(spec.memory, o.accel),
    '-smp', String(spec.vcpus),
    '-nodefaults', '-no-user-config', '-display', 'none',
    '-chardev', `socket,id=qmp,path=${f.qmp},server=on,wait=off`,
    '-mon', 'chardev=qmp,mode=control',
    '-serial', `file:${f.serial}`,
    '-drive', `file=${spec.bootImage ?? f.boot},format=raw,if=ide,index=0${o.sharedBootImage ? ',file.locking=off' : ''}`,
  ];
  for (const d of spec.disks ?? []) args.push('-drive', `file=${d.path},format=${d.format},if=virtio`);
  for (const n of spec.nics ?? []) args.push('-nic', `user,model=${n.model}${n.mac ? `,mac=${n.mac}` : ''}`);
  // -S: an incoming VM stays paused once its memory is in, until the agent commits the migration
  // (commitIncoming sends `cont`); so the VM never runs at both ends, and its management's last
  // round happens while it runs nowhere.
  if (o.incoming && o.holdIncoming) args.push('-S');
  if (o.incoming) args.push('-incoming', 'defer');
  if (o.incoming && o.preallocate) args.push('-mem-prealloc');
  args.push('-pidfile', f.pid, '-daemonize');
  return args;
}

/**
 * One QEMU process of a VM, daemonized (`-daemonize`: its own session, reparented away from the
 * agent) so the VM outlives the agent, and reached over QMP on a unix socket in the VM's state
 * dir. {@link QemuProcess.attach} finds it again from that dir after an agent restart.
 */
export class QemuProcess {
  readonly events = new EventEmitter<QemuProcessEvents>();
  private gone = false;

  private constructor(
    readonly stateDir: string,
    readonly pid: number,
    readonly qmp: QmpClient,
  ) {
    qmp.events.once('close', () => void this.onQmpClosed());
  }

  /**
   * Starts QEMU for `spec` in `stateDir`. Refuses when a QEMU of that dir still runs (never a
   * duplicate). Missing binary → QEMU_MISSING; bad images → VM_IMAGE; anything else QEMU refuses
   * → QEMU_FAILED with its message.
   */
  static async launch(o: QemuLaunchOptions): Promise<QemuProcess> {
    const binary = o.binary ?? 'qemu-system-x86_64';
    const f = vmFiles(o.stateDir);
    mkdirSync(o.stateDir, { recursive: true });
    const already = runningPid(o.stateDir);
    if (already !== undefined) {
      throw new EffectorError(ErrorCodes.VM_BAD_STATE, `VM ${o.spec.name} already has a QEMU (pid ${already}) in ${o.stateDir}`, { details: { vm: o.spec.name, pid: already } });
    }
    if (o.spec.bootImage !== undefined) checkImage(o.spec.bootImage, 'raw', o.spec.name);
    else writeGuestImage(f.boot, o.spec.testGuest);
    for (const d of o.spec.disks ?? []) checkImage(d.path, d.format, o.spec.name);
    rmSync(f.pid, { force: true });
    rmSync(f.qmp, { force: true });
    // This QEMU names this dir on its command line: an earlier adopted QEMU's origin no longer applies.
    rmSync(f.origin, { force: true });
    const accel = launchAccel(o.accel);
    const args = qemuArgs({ stateDir: o.stateDir, spec: o.spec, accel, incoming: o.incoming ?? false, holdIncoming: o.holdIncoming ?? false, sharedBootImage: o.sharedBootImage ?? false, preallocate: o.preallocate ?? false });
    const timeoutMs = o.timeoutMs ?? 30_000;
    // The parent QEMU exits once the daemon is initialised (0) or failed to (1, message on stderr).
    const { code, stderr } = await new Promise<{ code: number | null; stderr: string }>((resolve, reject) => {
      const child = spawn(binary, args, { cwd: o.stateDir, detached: true, stdio: ['ignore', 'ignore', 'pipe'] });
      let stderr = '';
      child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
      const timer = setTimeout(() => {
        child.kill('SIGKILL');
        reject(new EffectorError(ErrorCodes.QEMU_FAILED, `QEMU for VM ${o.spec.name} did not start within ${timeoutMs} ms`, { details: { vm: o.spec.name } }));
      }, timeoutMs);
      child.once('error', (e: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        reject(
          e.code === 'ENOENT' || e.code === 'EACCES'
            ? new EffectorError(ErrorCodes.QEMU_MISSING, `cannot run ${binary} (${e.code}): install QEMU (Debian: apt-get install qemu-system-x86)`, { details: { binary } })
            : new EffectorError(ErrorCodes.QEMU_FAILED, `cannot run ${binary}: ${e.message}`, { details: { binary }, cause: e }),
        );
      });
      child.once('exit', (code) => {
        clearTimeout(timer);
        // The daemon may keep the stderr pipe a moment longer; what the parent said is already read.
        setImmediate(() => resolve({ code, stderr }));
      });
      child.unref();
    });
    if (code !== 0) {
      const message = stderr.trim().split('\n').slice(-3).join(' | ') || `exit code ${code}`;
      const images = [o.spec.bootImage ?? f.boot, ...(o.spec.disks ?? []).map((d) => d.path)];
      const imageError = images.some((p) => stderr.includes(p)) || /image|drive|format/i.test(stderr);
      throw new EffectorError(imageError ? ErrorCodes.VM_IMAGE : ErrorCodes.QEMU_FAILED, `QEMU refused VM ${o.spec.name}: ${message}`, { details: { vm: o.spec.name, stderr: stderr.trim() } });
    }
    const pid = readPidFile(o.stateDir);
    if (pid === undefined || !pidAlive(pid)) {
      throw new EffectorError(ErrorCodes.QEMU_FAILED, `QEMU for VM ${o.spec.name} exited right after it started`, { details: { vm: o.spec.name } });
    }
    try {
      const qmp = await QmpClient.connect(f.qmp, { connectTimeoutMs: timeoutMs });
      return new QemuProcess(o.stateDir, pid, qmp);
    } catch (e) {
      // A QEMU we cannot drive is killed rather than left behind.
      killPid(pid);
      throw e;
    }
  }

  /**
   * The running QEMU of `stateDir` with a fresh QMP connection, or undefined when none runs
   * there. QEMU serves one QMP client at a time: attach only after the old holder is gone.
   */
  static async attach(stateDir: string, options: { readonly timeoutMs?: number } = {}): Promise<QemuProcess | undefined> {
    const pid = runningPid(stateDir);
    if (pid === undefined) return undefined;
    const timeoutMs = options.timeoutMs ?? 10_000;
    const deadline = Date.now() + timeoutMs;
    // QEMU's monitor listens with a backlog of one and serves one client at a time: while it has
    // not yet seen the old holder's hang-up, a new connect can fail at once (EAGAIN), which is no
    // answer about the VM. Tried again within the budget while the process lives.
    for (let delay = 50; ; delay = Math.min(delay * 2, 1000)) {
      try {
        const qmp = await QmpClient.connect(vmFiles(stateDir).qmp, { connectTimeoutMs: Math.max(1, deadline - Date.now()) });
        return new QemuProcess(stateDir, pid, qmp);
      } catch (e) {
        if (!isRefusedConnect(e) || !pidAlive(pid) || Date.now() + delay >= deadline) throw e;
        await sleep(delay);
      }
    }
  }

  get alive(): boolean {
    return !this.gone && pidAlive(this.pid);
  }

  /** SIGKILL, then wait until the pid is dead. */
  async kill(timeoutMs = 10_000): Promise<void> {
    killPid(this.pid);
    await this.waitExit(timeoutMs);
  }

  /** Resolves once the process is dead; QEMU_FAILED when it is still alive after `timeoutMs`. */
  async waitExit(timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (pidAlive(this.pid)) {
      if (Date.now() > deadline) throw new EffectorError(ErrorCodes.QEMU_FAILED, `QEMU pid ${this.pid} still runs after ${timeoutMs} ms`, { details: { pid: this.pid } });
      await sleep(20);
    }
  }

  /** Drops the QMP connection and leaves QEMU running (agent shutdown: VMs outlive the agent). */
  async detach(): Promise<void> {
    this.gone = true;
    this.events.removeAllListeners();
    await this.qmp.close();
  }

  private async onQmpClosed(): Promise<void> {
    if (this.gone) return;
    // QEMU closes its monitor socket a moment before the process ends (milliseconds); a process
    // still there after a second let go of QMP only, and the driver re-attaches.
    const deadline = Date.now() + 1000;
    while (pidAlive(this.pid) && Date.now() < deadline) await sleep(20);
    if (this.gone) return;
    this.gone = true;
    if (pidAlive(this.pid)) this.events.emit('detached');
    else this.events.emit('exit');
  }
}

/** A connect the monitor turned away before any greeting (backlog full, not listening yet, hung up at once). */
function isRefusedConnect(e: unknown): boolean {
  if (!isEmbotError(e) || e.code !== ErrorCodes.QMP_PROTOCOL) return false;
  const cause = e.cause as NodeJS.ErrnoException | undefined;
  return ['EAGAIN', 'ECONNREFUSED'].includes(cause?.code ?? '') || /closed before its greeting/.test(e.message);
}

export function killPid(pid: number): void {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    /* already gone */
  }
}

/** The state dir holds a VM (spec.json) — used when a restarted driver scans its root. */
export function hasVm(stateDir: string): boolean {
  return existsSync(vmFiles(stateDir).spec);
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
