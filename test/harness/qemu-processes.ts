import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach } from 'vitest';
import { GUEST_IMAGE } from '../../effectors/hypervisor/qemu/guest/guest-image.ts';
import { QemuDriver, type QemuDriverOptions } from '../../effectors/hypervisor/qemu/qemu-driver.ts';
import { killPid, pidAlive, runningPid, vmFiles } from '../../effectors/hypervisor/qemu/qemu-process.ts';
import { isSpareDir } from '../../effectors/hypervisor/qemu/spare-incoming.ts';
import { REPO } from './agent-process.ts';
import type { Cleanups } from './cleanups.ts';

export const QEMU_BINARY = 'qemu-system-x86_64';

export type QemuAvailability = { readonly ok: true } | { readonly ok: false; readonly reason: string };

/**
 * Whether the QEMU tests can run: the binary answers `--version` and the test guest is built
 * (built here when binutils are there but the install step did not run). Missing QEMU skips
 * locally but fails under CI (`process.env.CI`): CI installs qemu-system-x86 and must run these.
 */
export function qemuAvailability(): QemuAvailability {
  const r = spawnSync(QEMU_BINARY, ['--version'], { encoding: 'utf8' });
  if (r.error || r.status !== 0) return { ok: false, reason: `${QEMU_BINARY} not found: install the Debian package qemu-system-x86` };
  if (!existsSync(GUEST_IMAGE)) spawnSync(process.execPath, [join(REPO, 'effectors/hypervisor/qemu/guest/build.mjs')], { stdio: 'ignore' });
  if (!existsSync(GUEST_IMAGE)) return { ok: false, reason: 'the test guest could not be built (GNU as/ld missing: install binutils)' };
  return { ok: true };
}

/** Call at the top of a QEMU test file: returns whether to run; throws under CI when QEMU is missing. */
export function requireQemu(): boolean {
  const a = qemuAvailability();
  if (a.ok) return true;
  if (process.env['CI']) throw new Error(`CI must run the QEMU tests: ${a.reason}`);
  process.stderr.write(`QEMU tests skipped: ${a.reason}\n`);
  return false;
}

export interface QemuProcesses {
  /** A fresh root for a driver's VM state dirs; every QEMU under it is killed and the dir removed in afterAll. */
  root(): string;
  /** A QEMU pid started outside a root (bare QEMU in a test or bench), killed in afterAll. */
  track(pid: number): void;
  /** Live VM QEMU pids under the roots and among the tracked pids, now (an agent's spare incoming QEMU is no VM: see {@link spares}). */
  live(): number[];
  /** Live spare incoming QEMUs (`.spare-*` dirs) under the roots, now. */
  spares(): number[];
  /** Kills everything now (afterAll does it too). */
  killAll(): Promise<void>;
}

function pidsUnder(root: string, which: 'vms' | 'spares' | 'all' = 'vms'): number[] {
  const pids: number[] = [];
  let entries: string[];
  try {
    entries = readdirSync(root);
  } catch {
    return [];
  }
  for (const entry of entries) {
    const dir = join(root, entry);
    // A test may remove a VM dir while this walks.
    let isDir = false;
    try {
      isDir = statSync(dir).isDirectory();
    } catch {
      /* gone */
    }
    if (!isDir) continue;
    const spare = isSpareDir(entry);
    const pid = runningPid(dir);
    if (pid !== undefined && (which === 'all' || (which === 'spares') === spare)) pids.push(pid);
    // A migration test keeps a second root level (source/target) under one root.
    if (!spare) pids.push(...pidsUnder(dir, which).filter((p) => p !== pid));
  }
  return pids;
}

/**
 * Tracks every QEMU a test file starts — VMs outlive their driver by design, so nothing else would
 * stop them — and kills any left in afterAll, also when a test failed, then removes the temp roots.
 *
 * @example
 * ```ts
 * const qemus = qemuProcesses();
 * const driver = new QemuDriver({ root: qemus.root(), accel: 'tcg' });
 * ```
 */
export function qemuProcesses(): QemuProcesses {
  const roots: string[] = [];
  const tracked = new Set<number>();
  const live = (): number[] => [...new Set([...roots.flatMap((r) => pidsUnder(r)), ...[...tracked].filter(pidAlive)])];
  const spares = (): number[] => roots.flatMap((r) => pidsUnder(r, 'spares'));
  const all = (): number[] => [...new Set([...roots.flatMap((r) => pidsUnder(r, 'all')), ...[...tracked].filter(pidAlive)])];
  const killAll = async (): Promise<void> => {
    const pids = all();
    for (const pid of pids) killPid(pid);
    const deadline = Date.now() + 10_000;
    while (pids.some(pidAlive) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  };
  afterAll(async () => {
    const left = all();
    await killAll();
    for (const root of roots) rmSync(root, { recursive: true, force: true });
    if (left.length > 0) process.stderr.write(`qemu hygiene: killed ${left.length} QEMU process(es) a test left running: ${left.join(', ')}\n`);
  });
  return {
    root: () => {
      // Short: a unix socket path (root/vm/qmp.sock) must fit in 108 bytes.
      const root = mkdtempSync(join(tmpdir(), 'embot-qemu-'));
      roots.push(root);
      return root;
    },
    track: (pid) => void tracked.add(pid),
    live,
    spares,
    killAll,
  };
}

/**
 * A QEMU test file's set-up in one call: whether QEMU is here ({@link requireQemu}), every QEMU it
 * starts tracked ({@link qemuProcesses}), and after each test, also a failed one, `before` (stopping
 * the test's agents, which would restart or re-attach what is killed under them) and then a kill of
 * every QEMU left.
 *
 * @example
 * ```ts
 * let cluster: Cluster | undefined;
 * const { run, qemus } = qemuTestFile(async () => { await cluster?.stop(); cluster = undefined; });
 * ```
 */
export function qemuTestFile(before?: () => Promise<void>): { readonly run: boolean; readonly qemus: QemuProcesses } {
  const run = requireQemu();
  const qemus = qemuProcesses();
  afterEach(async () => {
    await before?.();
    await qemus.killAll();
  });
  return { run, qemus };
}

/** One TCG driver per name, as hosts with roots of their own under one fresh root; each closed by `cleanups` after the test. */
export function qemuDrivers<N extends string>(qemus: QemuProcesses, cleanups: Cleanups, names: readonly N[], extra: (name: N) => Partial<QemuDriverOptions> = () => ({})): Record<N, QemuDriver> {
  const root = qemus.root();
  return Object.fromEntries(
    names.map((n) => {
      const d = new QemuDriver({ root: join(root, n), accel: 'tcg', ...extra(n) });
      cleanups.push(() => d.close());
      return [n, d];
    }),
  ) as Record<N, QemuDriver>;
}

/** Live spare incoming QEMUs in one driver root (an agent's `qemu.stateDir`). */
export function sparesIn(root: string): number[] {
  let entries: string[];
  try {
    entries = readdirSync(root);
  } catch {
    return [];
  }
  return entries
    .filter(isSpareDir)
    .map((d) => runningPid(join(root, d)))
    .filter((p): p is number => p !== undefined);
}

/** Bytes of the guest's serial log (heartbeat 'B' per pass) in a VM state dir. */
export function serialBytes(stateDir: string): number {
  try {
    return statSync(vmFiles(stateDir).serial).size;
  } catch {
    return 0;
  }
}

/** Resolves once the serial log of `stateDir` has grown by `more` bytes; rejects after `timeoutMs`. */
export async function heartbeat(stateDir: string, more = 2, timeoutMs = 20_000): Promise<number> {
  const from = serialBytes(stateDir);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const now = serialBytes(stateDir);
    if (now >= from + more) return now;
    if (Date.now() > deadline) throw new Error(`no heartbeat in ${stateDir}/serial.log within ${timeoutMs} ms (${from} -> ${now} bytes)`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** The `qemu:` settings of a test agent (see core/config/config.ts): TCG, VM state dirs under a tracked root. */
export interface QemuAgentSettings {
  readonly binary?: string;
  readonly accel?: 'auto' | 'tcg' | 'kvm';
  readonly listenHost?: string;
  readonly stepTimeoutMs?: number;
}

/**
 * Config of agent `name` running `--driver qemu` in a test cluster (pass it from
 * `Cluster.start(…, { config })`): its VMs live in `<root>/<name>/`, where `root` comes from
 * {@link QemuProcesses.root}, so every QEMU the agent starts is killed after the file even when the
 * agent was SIGKILLed (VMs outlive their agent). TCG by default: KVM runs the guest ~20x slower here.
 *
 * @example
 * ```ts
 * const qemus = qemuProcesses();
 * const root = qemus.root();
 * const cluster = await Cluster.start(['a', 'b'], { config: (n) => ({ ...qemuAgentConfig(root, n), mobility: { … } }) });
 * ```
 */
export function qemuAgentConfig(root: string, name: string, settings: QemuAgentSettings = {}): { readonly driver: 'qemu'; readonly qemu: Record<string, unknown> } {
  return { driver: 'qemu', qemu: { stateDir: join(root, name), accel: 'tcg', ...settings } };
}
