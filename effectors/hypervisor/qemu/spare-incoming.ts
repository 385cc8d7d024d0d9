import { randomBytes } from 'node:crypto';
import { existsSync, readdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { writeGuestImage } from './guest/guest-image.ts';
import { QemuProcess, killPid, pidAlive, runningPid, vmFiles, type Accel } from './qemu-process.ts';
import type { QemuVmSpec } from './vm-spec.ts';

/** The machine shape of a spare: everything of a spec that QEMU's command line depends on, but the name. */
export type SpareShape = Omit<QemuVmSpec, 'name'>;

/** Spare dirs start with a dot: a VM name cannot (vm-spec's VM_NAME), so no VM dir is ever taken for one. */
const SPARE_PREFIX = '.spare-';
/**
 * The test guest a spare of that shape boots from, outside the spare's dir: QEMU opens its images
 * again by path when `cont` activates them (late-block-activate), after the dir was renamed. An
 * incoming VM never boots, so the image's bytes do not matter, and the file is kept for as long as
 * the root (adopted QEMUs keep it open by name).
 */
const SHARED_GUEST_IMAGE = '.guest-boot.img';

export interface SpareIncomingOptions {
  readonly root: string;
  readonly binary?: string;
  readonly accel?: Accel;
  readonly timeoutMs: number;
}

/** Events of the spare's life, for diagnostics and tests (never a VM's: a spare is no VM). */
export type SpareEvent =
  | { readonly kind: 'ready'; readonly pid: number; readonly ms: number }
  | { readonly kind: 'failed'; readonly error: unknown }
  | { readonly kind: 'adopted'; readonly pid: number; readonly vm: string }
  | { readonly kind: 'discarded'; readonly pid: number; readonly why: string };

interface Spare {
  readonly key: string;
  readonly shape: SpareShape;
  readonly dir: string;
  /** Resolves to the QEMU once it listens on QMP with its capabilities set; undefined when it failed to start. */
  readonly ready: Promise<QemuProcess | undefined>;
}

/**
 * The same machine for the same key: the parts of a spec that change QEMU's command line. The test
 * guest's settings only change the boot image's bytes, which are rewritten at adoption, so they are
 * left out (a VM started from the test guest with other settings still takes the spare).
 */
export function shapeKey(spec: SpareShape): string {
  return JSON.stringify({
    memory: spec.memory,
    vcpus: spec.vcpus,
    bootImage: spec.bootImage ?? null,
    disks: (spec.disks ?? []).map((d) => [d.path, d.format]),
    nics: (spec.nics ?? []).map((n) => [n.model, n.mac ?? null]),
  });
}

/**
 * One pre-started incoming QEMU (`-S -incoming defer`, QMP up, the capabilities every incoming
 * migration sets), kept by a target so a migration does not wait for QEMU to start (45–110 ms
 * under TCG here, the largest part of a small VM's fixed cost). {@link take} hands it over for a
 * spec of its shape: its dir is renamed to the VM's (QEMU keeps its open sockets and files; the
 * `qemu.origin` file says which dir its command line names). The spare is no VM: it is not listed
 * and raises no events; it is killed by {@link close} and, after an agent crash, by
 * {@link killOrphanSpares} when the driver restores.
 */
export class SpareIncoming {
  private spare: Spare | undefined;
  private closed = false;
  private readonly listeners = new Set<(e: SpareEvent) => void>();

  constructor(private readonly o: SpareIncomingOptions) {}

  /** Calls `fn` for each of the spare's events; returns the unsubscribe. */
  onEvent(fn: (e: SpareEvent) => void): () => void {
    this.listeners.add(fn);
    return () => void this.listeners.delete(fn);
  }

  /** The shape of the spare kept (or starting) now. */
  get shape(): SpareShape | undefined {
    return this.spare?.shape;
  }

  /** The spare's pid once it is up (diagnostics, tests). */
  async pid(): Promise<number | undefined> {
    const proc = await this.spare?.ready;
    return proc?.alive ? proc.pid : undefined;
  }

  /**
   * Keeps a spare of `shape`: nothing to do when the one kept (or starting) has it; else the old
   * one is killed and a new one started in the background.
   */
  fill(shape: SpareShape): void {
    if (this.closed) return;
    const key = shapeKey(shape);
    if (this.spare?.key === key) return;
    const old = this.spare;
    this.spare = undefined;
    if (old) void this.discard(old, 'another shape is kept now');
    const dir = join(this.o.root, `${SPARE_PREFIX}${randomBytes(4).toString('hex')}`);
    const t0 = Date.now();
    const ready = this.launch(dir, shape).then(
      (proc) => {
        this.emit({ kind: 'ready', pid: proc.pid, ms: Date.now() - t0 });
        return proc;
      },
      (error: unknown) => {
        // No spare is no failure: the next migration starts its QEMU as without one.
        rmSync(dir, { recursive: true, force: true });
        if (this.spare?.dir === dir) this.spare = undefined;
        this.emit({ kind: 'failed', error });
        return undefined;
      },
    );
    this.spare = { key, shape, dir, ready };
  }

  /**
   * The spare for `spec` when it has its shape and lives, moved to `stateDir` (which must not
   * exist) with `spec.json` (`specJson`) already in it; undefined otherwise (start a QEMU as
   * without a spare). The caller owns the QEMU from then on.
   */
  async take(spec: QemuVmSpec, stateDir: string, specJson: string): Promise<QemuProcess | undefined> {
    const spare = this.spare;
    if (this.closed || spare === undefined || spare.key !== shapeKey(spec)) return undefined;
    // Taken before any await: a second incoming VM of the same shape starts its own QEMU.
    this.spare = undefined;
    const proc = await spare.ready;
    if (proc === undefined) return undefined;
    if (!proc.alive || this.closed) {
      void this.discard(spare, this.closed ? 'the driver closed' : 'it died');
      return undefined;
    }
    try {
      // spec.json and the origin go in before the rename, so the VM dir is whole from its first
      // moment: a crash right after it finds an incoming VM (killed without a commit), never a
      // QEMU in a dir that names no VM.
      writeFileSync(vmFiles(spare.dir).origin, spare.dir);
      writeFileSync(vmFiles(spare.dir).spec, specJson);
      renameSync(spare.dir, stateDir);
    } catch {
      void this.discard(spare, `cannot move it to ${stateDir}`);
      return undefined;
    }
    this.emit({ kind: 'adopted', pid: proc.pid, vm: spec.name });
    return proc;
  }

  /** Kills the spare (agent stop). Later {@link fill} calls do nothing. */
  async close(): Promise<void> {
    this.closed = true;
    const spare = this.spare;
    this.spare = undefined;
    if (spare) await this.discard(spare, 'the driver closed');
  }

  private async launch(dir: string, shape: SpareShape): Promise<QemuProcess> {
    const guestImage = join(this.o.root, SHARED_GUEST_IMAGE);
    if (shape.bootImage === undefined && !existsSync(guestImage)) writeGuestImage(guestImage);
    const proc = await QemuProcess.launch({
      ...(this.o.binary === undefined ? {} : { binary: this.o.binary }),
      ...(this.o.accel === undefined ? {} : { accel: this.o.accel }),
      stateDir: dir,
      spec: { ...shape, name: 'spare', bootImage: shape.bootImage ?? guestImage },
      incoming: true,
      holdIncoming: true,
      sharedBootImage: shape.bootImage === undefined,
      timeoutMs: this.o.timeoutMs,
    });
    try {
      // What every incoming migration sets; multifd, TLS and the listen address are per migration.
      await proc.qmp.execute('migrate-set-capabilities', {
        capabilities: [
          { capability: 'events', state: true },
          { capability: 'late-block-activate', state: true },
        ],
      });
    } catch (e) {
      await proc.kill(this.o.timeoutMs).catch(() => {});
      await proc.detach();
      throw e;
    }
    if (this.closed) {
      await proc.kill(this.o.timeoutMs).catch(() => {});
      await proc.detach();
      throw new Error('the driver closed while the spare started');
    }
    return proc;
  }

  private async discard(spare: Spare, why: string): Promise<void> {
    const proc = await spare.ready;
    if (proc !== undefined) {
      await proc.kill(this.o.timeoutMs).catch(() => {});
      await proc.detach();
      this.emit({ kind: 'discarded', pid: proc.pid, why });
    }
    rmSync(spare.dir, { recursive: true, force: true });
  }

  private emit(e: SpareEvent): void {
    for (const fn of this.listeners) fn(e);
  }
}

/**
 * Kills the spares an agent left behind when it died (SIGKILL, crash) and removes their dirs; a
 * restarted driver calls it before it re-attaches its VMs. Returns the pids killed.
 */
export async function killOrphanSpares(root: string, timeoutMs = 10_000): Promise<number[]> {
  const killed: number[] = [];
  let entries: string[];
  try {
    entries = readdirSync(root).filter((e) => e.startsWith(SPARE_PREFIX));
  } catch {
    return killed;
  }
  for (const entry of entries) {
    const dir = join(root, entry);
    const pid = runningPid(dir);
    if (pid !== undefined) {
      killPid(pid);
      killed.push(pid);
    }
  }
  const deadline = Date.now() + timeoutMs;
  while (killed.some(pidAlive) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  for (const entry of entries) rmSync(join(root, entry), { recursive: true, force: true });
  return killed;
}

/** Whether a dir under a driver root is a spare's (tests and benches count VM QEMUs without them). */
export function isSpareDir(name: string): boolean {
  return name.startsWith(SPARE_PREFIX);
}
