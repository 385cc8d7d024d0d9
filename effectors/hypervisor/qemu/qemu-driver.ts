import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { availableParallelism, loadavg } from 'node:os';
import { join } from 'node:path';
import { EventEmitter } from 'eventemitter3';
import { EffectorError, ErrorCodes, describeError, isEmbotError } from '../../../core/errors.ts';
import type { DriverEstimateHints } from '../hypervisor-contract.ts';
import type {
  HypervisorCapabilities,
  HypervisorDriver,
  HypervisorEvents,
  IncomingBootResult,
  IncomingOptions,
  MigrateOutOptions,
  MigrateOutResult,
  MigrationEndpoint,
  MigrationPhase,
  MigrationProgress,
  VmInfo,
  VmState,
  VmStats,
} from '../hypervisor-contract.ts';
import type { MigrationInfo, MigrationStatus, QmpClient, QmpEvent } from './qmp-client.ts';
import { addTlsObjects, writeTlsCredsDir, type QemuTlsFiles } from './migration-tls.ts';
import { QemuProcess, launchAccel, pidAlive, readPidFile, vmFiles, type Accel } from './qemu-process.ts';
import { SpareIncoming, killOrphanSpares, type SpareShape } from './spare-incoming.ts';
import { QemuFanOutSession } from './qemu-fan-out.ts';
import { faultGuestRamIn } from './ram-prefault.ts';
import { QemuCopyHold, heldParameters, holdMode, mapZeroPages, type QemuCopyHoldOptions } from './qemu-prewarm.ts';
import { checkImage, validateQemuSpec, type QemuVmSpec } from './vm-spec.ts';
import { checkRamForMigration, queryBaseMemory } from './ram-size-check.ts';
import { fitStream, type StreamFit } from './stream-fit.ts';
import { exportDisks, startDiskMirror, stopDiskExport, type DiskExport, type DiskMirror } from './disk-mirror.ts';
import { exportFromWire, exportToWire, faultExportRefused, mirroredDevices, testHookWrite, withOverlays, withoutImageDisks } from './disk-migration.ts';

export interface QemuDriverOptions {
  /** Folder holding one state dir per VM (QMP socket, pidfile, serial log, spec). */
  readonly root: string;
  /** Default `qemu-system-x86_64`. */
  readonly binary?: string;
  /** Default `auto`: KVM when /dev/kvm is usable, else TCG. */
  readonly accel?: Accel;
  /** Address an incoming migration listens on (default 127.0.0.1). */
  readonly listenHost?: string;
  /** Period of `query-migrate` polls during a migration (default 100 ms); MIGRATION events wake it early. */
  readonly pollMs?: number;
  /** QEMU start-up and QMP timeouts (default 30 s). */
  readonly timeoutMs?: number;
  /** Auto-converge's first vCPU throttle and its step, percent (QEMU's defaults: 20 and 10). */
  readonly cpuThrottle?: { readonly initial?: number; readonly increment?: number };
  /**
   * QEMU's own migration stream over TLS with these certificates (the agent's `peer.tls`): the
   * source checks that the target's certificate comes from the CA and names the target agent
   * (`tls-hostname`), the target that the source's comes from the CA and has the source agent's
   * CN (`tls-authz`). Without it the stream is plain TCP (loopback clusters).
   */
  readonly tls?: QemuTlsFiles;
  /** Several destinations (qemu-fan-out.ts): a destination queued past this many bytes in the relay holds the stream for `relayStallBudgetMs` in all, then is dropped (`tooSlow`). Default 64 MiB (the agent's `qemu.relay.bufferBytes`). */
  readonly relayBufferBytes?: number;
  /** Default 3 s (stream-relay.ts DEFAULT_RELAY_STALL_BUDGET_MS; the agent's `qemu.relay.stallBudgetMs`); 0 drops a destination at its bound at once. */
  readonly relayStallBudgetMs?: number;
  /**
   * When a VM's QMP connection drops while its QEMU runs, the driver connects again with a
   * doubling back-off (100 ms up to 2 s); each attempt waits this long for QEMU's greeting
   * (default 5 s: QEMU greets only once an earlier client has let go of the monitor).
   */
  readonly reattachAttemptMs?: number;
  /**
   * Keep a spare incoming QEMU (`-S -incoming defer`, QMP up) of this shape, so a migration to
   * this driver does not wait for QEMU to start: prepareIncoming adopts it when the incoming VM
   * has its shape (else starts a QEMU as without one). After each incoming migration the spare is
   * refilled with the shape just received. Absent: no spare (the agent's `qemu.spareIncoming`).
   */
  readonly spareIncoming?: SpareShape;
  /**
   * Start incoming QEMUs (not the spare) with their RAM faulted in (`-mem-prealloc`): the target's
   * kernel time per received page leaves the move, which makes its time steadier and the
   * estimate nearer (the estimate bench uses it). Default false: RAM is touched as pages arrive.
   */
  readonly preallocateIncoming?: boolean;
  /** How long after an incoming migration the spare is refilled (default {@link SPARE_REFILL_DELAY_MS}). */
  readonly spareRefillDelayMs?: number;
  /**
   * How many times slower than on an idle host a CPU-bound job runs now (default
   * {@link hostLoadFactor}: the 1-minute load average over the cores, at least 1). Each calibration
   * sample keeps the factor of its time, and the estimate scales to the factor at its own time:
   * under TCG the stream is CPU-bound, so on a shared host its time follows the CPU it gets.
   */
  readonly loadFactor?: () => number;
  /** This host's file of an indexed image (the agent's image index): a disk with `image` is a qcow2 overlay on it, here and at a migration target. */
  readonly imagePath?: (name: string) => string | undefined;
  /**
   * The migration settings the agent's config gives every migration out (`dataplane.autoConverge`,
   * `dataplane.downtimeLimitMs`): set on each VM's QEMU when it starts, with the capabilities every
   * migration uses, so a migration out sends only what differs (usually nothing) before `migrate`.
   */
  readonly migrationDefaults?: { readonly autoConverge?: boolean; readonly downtimeLimitMs?: number };
}

/** Migration capabilities and parameters as one QEMU has them, as far as this driver set them. */
interface MigrationSettings {
  readonly caps: Map<string, boolean>;
  readonly params: Map<string, number | string | boolean>;
}

/** What the qemu driver's migrateOut reads: the contract's options; `targetName` is required with {@link QemuDriverOptions.tls}. */
export type QemuMigrateOutOptions = MigrateOutOptions & {
  /** Into the fan-out relay's local socket (qemu-fan-out.ts): plaintext, the relay wraps each destination in TLS. */
  readonly viaLocalRelay?: true;
};

/** What the qemu driver's prepareIncoming reads; with TLS only a client certificate with the CN `sourceName` may send the VM. */
export type QemuIncomingOptions = IncomingOptions;

/** What {@link QemuDriver.getPersistedState} returns; the state dirs hold the rest. */
export interface QemuPersistedState {
  readonly version: 1;
  readonly vms: readonly PersistedVm[];
}

type PersistedVm = { readonly name: string; readonly state: VmState; readonly crashes: number };

interface SpecFile {
  readonly spec: QemuVmSpec;
  readonly incoming: boolean;
}

interface Vm {
  readonly spec: QemuVmSpec;
  readonly stateDir: string;
  state: VmState;
  crashes: number;
  startedAt: number | undefined;
  proc: QemuProcess | undefined;
  /** Why the process is expected to end (stop, kill, migrated…): its exit is then no crash. */
  expectingExit: string | undefined;
  incoming: boolean;
  /** The incoming QEMU said its stream completed (MIGRATION event): under -S it waits paused for the commit's `cont`. */
  incomingComplete: boolean;
  /** When that event came (epoch ms). */
  incomingCompletedAt: number | undefined;
  migrating: boolean;
  /** Reason for the STOP/RESUME event a pause()/resume() is about to cause (QEMU sends it before the reply). */
  intent: string | undefined;
  dirtyRate: number | undefined;
  /** A background dirty-rate measurement is due to start (measureDirtyRateSoon). */
  dirtyRateSoon: boolean;
  /** Bytes of non-zero pages, as last counted by {@link QemuDriver.measureNonZeroBytes}. */
  nonZero: { readonly bytes: number; readonly at: number } | undefined;
  cpuSample: { readonly at: number; readonly ticks: number } | undefined;
  load: number;
  /** The guest RAM of a QEMU re-attached at restoreState (not started by this driver), by its pid: migrateOut checks it (ram-size-check.ts). */
  attachedRam: { readonly pid: number; readonly bytes: number } | undefined;
}

/**
 * What one completed migration out showed of QEMU's own stream. The last
 * {@link CALIBRATION_SAMPLES} per channel count are kept in `<root>/migration-model.json` (an agent
 * restart keeps them) and their medians are the copy rate and fixed cost the estimate uses: under
 * TCG the stream is CPU-bound, so the link's bandwidth (the planner's probe) says little about it,
 * and one migration on a shared machine is a noisy sample.
 */
export interface StreamCalibration {
  /** Non-zero page bytes sent / the time from QEMU's end of setup to completion, bytes/s. */
  readonly copyRateBytesPerSec: number;
  /** QEMU's setup time (creating the channels), ms. */
  readonly fixedMs: number;
  /** What the rate was computed from: non-zero bytes sent, zero pages' bytes skipped, and the sending time (ms). */
  readonly sentBytes: number;
  readonly zeroBytes: number;
  readonly sendMs: number;
  readonly vm: string;
  readonly at: number;
  /** The host's load factor when the sample was taken ({@link QemuDriverOptions.loadFactor}); absent in older files: 1. */
  readonly loadFactor?: number;
}

interface ModelFile {
  readonly version: 1;
  readonly byChannels: Readonly<Record<string, readonly StreamCalibration[]>>;
}

/** The spare is refilled this long after an incoming migration ends, off the commit's path. */
export const SPARE_REFILL_DELAY_MS = 50;

/** Load factors closer than this ratio count as the same conditions: the sample is used unscaled. */
export const LOAD_BAND = 2;

/** Migrations per channel count whose medians make the calibration. */
export const CALIBRATION_SAMPLES = 5;
/** A migration that sent less than this says more about its fixed cost than its rate: not kept. */
const MIN_CALIBRATION_BYTES = 16 * 1024 * 1024;

/** How long after a stats() call its dirty-rate refresh starts (see measureDirtyRateSoon); the measurement itself lasts 1 s. */
export const DIRTY_RATE_START_DELAY_MS = 250;

/** QEMU's max-bandwidth has no "unlimited"; this is far above what a host link carries. */
const UNLIMITED_BANDWIDTH = 1024 ** 4;
const MiB = 1024 * 1024;
const PAGE = 4096;
const MODEL_FILE = 'migration-model.json';
const CLOCK_TICKS = 100;

const PHASES: Readonly<Record<MigrationStatus, MigrationPhase>> = {
  none: 'setup',
  setup: 'setup',
  active: 'precopy',
  'pre-switchover': 'pre-switchover',
  device: 'stop-and-copy',
  'postcopy-active': 'precopy',
  completed: 'completed',
  failed: 'failed',
  cancelling: 'cancelled',
  cancelled: 'cancelled',
  'wait-unplug': 'setup',
  colo: 'precopy',
  'postcopy-paused': 'precopy',
  'postcopy-recover': 'precopy',
};

/**
 * The `qemu` driver: a VM is a daemonized `qemu-system-x86_64` driven over QMP. VMs outlive the
 * driver: {@link close} lets go of them, {@link restoreState} re-attaches through their state dirs.
 * Live migration is QEMU's own (`migrate` / `-incoming defer`), with `pause-before-switchover` so
 * the management hand-over can run its last round while the VM is paused at the switch.
 *
 * @example
 * ```ts
 * const driver = new QemuDriver({ root: '/var/lib/embot/vms', accel: 'tcg' });
 * await driver.restoreState(undefined);
 * await driver.create({ name: 'web-1', memory: 128 * 2 ** 20, vcpus: 1 });
 * await driver.start('web-1');
 * ```
 */
export class QemuDriver implements HypervisorDriver<QemuVmSpec> {
  readonly name = 'qemu';
  readonly events = new EventEmitter<HypervisorEvents>();
  readonly capabilities: HypervisorCapabilities;
  private readonly vms = new Map<string, Vm>();
  private readonly pollMs: number;
  private readonly timeoutMs: number;
  private closed = false;
  private calibrations: Map<number, readonly StreamCalibration[]>;
  /** The spare incoming QEMU, with {@link QemuDriverOptions.spareIncoming}; never a VM (not listed, no events). */
  readonly spare: SpareIncoming | undefined;
  private restored = false;
  /** VM dirs whose live QEMU the restore could not attach to, being tried again ({@link attachLate}). */
  private readonly attachingLate = new Set<string>();
  private refillTimer: NodeJS.Timeout | undefined;
  private saveTimer: NodeJS.Timeout | undefined;
  /** An incoming VM's NBD export of its image disks, until its commit or abort (disk-migration.ts). */
  private readonly diskExports = new Map<string, DiskExport>();
  /** Per QMP connection: the migration settings sent on it, and the last such call (they go one after the other). */
  private readonly migrationSettings = new WeakMap<QmpClient, { readonly settings: MigrationSettings; last: Promise<void> }>();

  constructor(private readonly o: QemuDriverOptions) {
    this.pollMs = o.pollMs ?? 100;
    this.timeoutMs = o.timeoutMs ?? 30_000;
    mkdirSync(o.root, { recursive: true });
    this.spare =
      o.spareIncoming === undefined
        ? undefined
        : new SpareIncoming({ root: o.root, timeoutMs: this.timeoutMs, ...(o.binary === undefined ? {} : { binary: o.binary }), ...(o.accel === undefined ? {} : { accel: o.accel }) });
    this.calibrations = readModelFile(join(o.root, MODEL_FILE));
    this.capabilities = {
      migrationModel: { estimateHints: (vm, opts) => this.estimateHints(vm, opts?.channels ?? 1), recordEndToEnd: (vm, ms) => this.recordEndToEnd(vm, ms) },
      memoryDump: { dump: (vm, address, length) => this.dump(vm, address, length) },
      faults: { crash: (vm) => this.crash(vm) },
      incomingBoot: { bootIncoming: (vm, options) => this.bootIncoming(vm, options) },
      diskMirror: { sync: 'top' },
      fanOut: {
        // A pre-warm's copy is held with QEMU's own parameters (qemu-prewarm.ts).
        prewarm: true,
        begin: (vm, destinations) =>
          new QemuFanOutSession(this, vm, destinations, {
            relayParentDir: this.require(vm).stateDir,
            ...(o.tls === undefined ? {} : { tls: o.tls }),
            ...(o.relayBufferBytes === undefined ? {} : { bufferLimitBytes: o.relayBufferBytes }),
            ...(o.relayStallBudgetMs === undefined ? {} : { stallBudgetMs: o.relayStallBudgetMs }),
          }),
      },
    };
  }

  // ---- inspection

  list(): readonly VmInfo[] {
    return [...this.vms.values()].map(toInfo);
  }

  get(name: string): VmInfo | undefined {
    const vm = this.vms.get(name);
    return vm ? toInfo(vm) : undefined;
  }

  spec(name: string): QemuVmSpec | undefined {
    return this.vms.get(name)?.spec;
  }

  /** The pid of a VM's QEMU while it has one. */
  pid(name: string): number | undefined {
    const proc = this.vms.get(name)?.proc;
    return proc?.alive ? proc.pid : undefined;
  }

  /** The VM's current QMP connection, while it has one (diagnostics; a test drops it to see the driver re-attach). */
  qmp(name: string): QmpClient | undefined {
    const proc = this.vms.get(name)?.proc;
    return proc?.alive && !proc.qmp.closed ? proc.qmp : undefined;
  }

  /** The VM's state dir (serial.log holds the guest's console). */
  stateDir(name: string): string {
    return this.require(name).stateDir;
  }

  async stats(name: string): Promise<VmStats> {
    const vm = this.require(name);
    if (vm.proc?.alive) {
      vm.load = cpuLoad(vm);
      if (vm.state === 'running' && !vm.migrating) this.measureDirtyRateSoon(vm);
    } else {
      vm.load = 0;
    }
    return { name, state: vm.state, memory: vm.spec.memory, load: vm.load, dirtyRate: vm.dirtyRate, pageSize: 4096 };
  }

  /**
   * The refresh stats() asks for, started {@link DIRTY_RATE_START_DELAY_MS} later and only if no
   * migration out began meanwhile: a migration's plan calls stats() and reads the last measured
   * rate, and a measurement started then put its two commands ahead of `migrate` in the QEMU
   * monitor's queue (2-7 ms on the migration's path under load).
   */
  private measureDirtyRateSoon(vm: Vm): void {
    if (vm.dirtyRateSoon) return;
    vm.dirtyRateSoon = true;
    setTimeout(() => {
      vm.dirtyRateSoon = false;
      if (this.closed || this.vms.get(vm.spec.name) !== vm || vm.state !== 'running' || vm.migrating) return;
      void this.measureDirtyRate(vm.spec.name, 1, { yieldToMigration: true }).catch(() => {});
    }, DIRTY_RATE_START_DELAY_MS).unref();
  }

  /**
   * Measures the guest's dirty rate over `seconds` (QMP calc-dirty-rate), bytes/s. With
   * `yieldToMigration` (the background refresh) it stops polling once a migration out begins
   * (its queries would queue ahead of the migration's commands) and returns the last known rate.
   */
  async measureDirtyRate(name: string, seconds = 1, options: { readonly yieldToMigration?: boolean } = {}): Promise<number> {
    const proc = this.requireProc(name, 'measure the dirty rate of');
    const current = await proc.qmp.execute('query-dirty-rate');
    if (current.status !== 'measuring') await proc.qmp.execute('calc-dirty-rate', { 'calc-time': seconds });
    for (;;) {
      await sleep(Math.max(100, seconds * 250));
      const vm = this.vms.get(name);
      if (options.yieldToMigration && vm?.migrating) return vm.dirtyRate ?? 0;
      const r = await proc.qmp.execute('query-dirty-rate');
      if (r.status === 'measured' && r['dirty-rate'] !== undefined) {
        const rate = r['dirty-rate'] * MiB;
        this.require(name).dirtyRate = rate;
        return rate;
      }
    }
  }

  /**
   * Counts the VM's non-zero pages (QMP `pmemsave` of its RAM in 64 MiB pieces, each scanned and
   * deleted), for the estimate: QEMU sends a zero page as a header only. Costs about a write and a
   * read of the RAM on the state dir's disk; the VM may run meanwhile (the count is then as of
   * some moment during the scan). Returns bytes and keeps them for {@link estimateHints}.
   */
  async measureNonZeroBytes(name: string): Promise<number> {
    const vm = this.require(name);
    const proc = this.requireProc(name, 'count the non-zero pages of');
    const piece = 64 * MiB;
    const zero = Buffer.alloc(PAGE);
    let nonZero = 0;
    for (let address = 0; address < vm.spec.memory; address += piece) {
      const length = Math.min(piece, vm.spec.memory - address);
      const file = join(vm.stateDir, `pmem-scan-${process.pid}-${Date.now()}.bin`);
      try {
        await proc.qmp.execute('pmemsave', { val: address, size: length, filename: file }, { timeoutMs: Math.max(this.timeoutMs, 120_000) });
        const buf = readFileSync(file);
        for (let off = 0; off < buf.length; off += PAGE) if (buf.compare(zero, 0, Math.min(PAGE, buf.length - off), off, Math.min(off + PAGE, buf.length)) !== 0) nonZero += PAGE;
      } finally {
        rmSync(file, { force: true });
      }
    }
    const bytes = Math.min(nonZero, vm.spec.memory);
    vm.nonZero = { bytes, at: Date.now() };
    return bytes;
  }

  /**
   * The samples kept for `channels` (oldest first) and what they say, on an idle host (load factor
   * 1): a fixed cost per move plus a time per non-zero byte, fitted by least squares when the
   * samples span sizes (else the median time per byte and QEMU's setup time), and the zero-page
   * cost, fitted over the samples of every channel count (zero pages are found by QEMU 7.2's
   * migration thread, before multifd, so their cost does not depend on the channels; and the first
   * migration with a channel count then already knows it). stream-fit.ts has the model;
   * `fixedCost: false` is the rate-only model of before (the benchmark's A/B).
   */
  calibration(
    channels: number,
    options: { readonly fixedCost?: boolean } = {},
  ): (StreamFit & { readonly samples: readonly StreamCalibration[] }) | undefined {
    const samples = this.calibrations.get(channels) ?? [];
    if (samples.length === 0) return undefined;
    // A sample taken at a load factor less than LOAD_BAND× from now's is taken as it was measured:
    // the minute's load average follows one move's slowdown poorly (r ≈ 0.2), and scaling by it
    // made the estimate rise with the load while the moves did not (BENCHMARKS "planner's
    // estimate", the band's replay). Only a change beyond that (a quiet hour against a busy one) scales.
    const now = this.loadFactor();
    const asNow = (xs: readonly StreamCalibration[]): StreamCalibration[] =>
      xs.map((x) => {
        const ratio = now / (x.loadFactor ?? 1);
        return ratio < LOAD_BAND && ratio > 1 / LOAD_BAND ? { ...x, loadFactor: now } : x;
      });
    const fit = fitStream(new Map([...this.calibrations].map(([c, xs]) => [c, asNow(xs)])), channels, options);
    return fit === undefined ? undefined : { ...fit, samples };
  }

  private loadFactor(): number {
    const f = (this.o.loadFactor ?? hostLoadFactor)();
    return Number.isFinite(f) && f >= 1 ? f : 1;
  }

  private async estimateHints(name: string, channels: number): Promise<DriverEstimateHints> {
    const vm = this.require(name);
    const c = this.calibration(channels);
    const load = this.loadFactor();
    const parts = [
      c === undefined
        ? `no migration out with ${channels} channel(s) yet (copy rate unknown)`
        : `QEMU's setup ${(c.setupMsPerRamByte * MiB).toFixed(3)} ms per MiB of RAM; ${c.kind === 'fixed+per-byte' ? 'fixed cost and copy rate: least-squares fit over' : 'copy rate: median of'} the last ${c.samples.length} migration(s) out with ${channels} channel(s) (${c.samples.map((x) => x.vm).join(', ')}), ` +
          `each at its host load factor (${c.samples.map((x) => (x.loadFactor ?? 1).toFixed(1)).join(', ')}), scaled to the factor now (${load.toFixed(1)})`,
      vm.nonZero === undefined ? 'non-zero pages not counted' : `non-zero pages counted at ${new Date(vm.nonZero.at).toISOString()}`,
    ];
    return {
      ...(vm.nonZero === undefined ? {} : { nonZeroBytes: vm.nonZero.bytes }),
      // QEMU's setup grows with the guest's RAM (stream-fit.ts): its part of the fixed cost is this VM's.
      ...(c === undefined ? {} : { copyRateBytesPerSec: c.copyRateBytesPerSec / load, fixedMs: (c.fixedMs + c.setupMsPerRamByte * vm.spec.memory) * load, zeroPageCost: c.zeroPageCost }),
      source: `qemu: ${parts.join('; ')}`,
    };
  }

  /** Keeps what a completed migration showed of the stream; a migration too short to time says nothing. */
  private calibrate(vm: string, channels: number, info: MigrationInfo, wallMs: number): void {
    // The driver's own clock, not QEMU's total-time: 7.2 reports it short (or 0) for some migrations.
    const setupMs = Math.min(info['setup-time'] ?? 0, wallMs);
    const sendMs = wallMs - setupMs;
    const sent = info.ram?.['normal-bytes'] ?? 0;
    if (!(sendMs > 0) || !(sent >= MIN_CALIBRATION_BYTES) || !(wallMs >= sendMs)) return;
    const zeroBytes = (info.ram?.duplicate ?? 0) * (info.ram?.['page-size'] ?? PAGE);
    const sample: StreamCalibration = { copyRateBytesPerSec: (sent / sendMs) * 1000, fixedMs: wallMs - sendMs, sentBytes: sent, zeroBytes, sendMs, vm, at: Date.now(), loadFactor: this.loadFactor() };
    this.calibrations.set(channels, [...(this.calibrations.get(channels) ?? []), sample].slice(-CALIBRATION_SAMPLES));
    this.saveCalibrations();
  }

  /**
   * The caller's time of the migration of `vm`, from migrateOut until the target ran it, its own
   * hand-over left out: replaces the source's clock in that migration's sample. With multifd the
   * source completes once its channels are written, while the target may still be taking them in
   * (hundreds of ms for a few hundred MiB under TCG), so only the end-to-end time is the stream's.
   * Returns false when no sample of `vm` is kept (too small, or pushed out).
   */
  private recordEndToEnd(vm: string, endToEndMs: number): boolean {
    if (!(Number.isFinite(endToEndMs) && endToEndMs > 0)) {
      throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `end-to-end time of the migration of ${vm} must be a positive number of ms, not ${String(endToEndMs)}`, { details: { vm, endToEndMs } });
    }
    // The newest sample of `vm` over every channel count: the migration that just ended (a VM
    // migrated with 1 channel before and with 2 now has a sample in both lists).
    let found: { readonly channels: number; readonly i: number; readonly at: number } | undefined;
    for (const [channels, samples] of this.calibrations) {
      const i = samples.findLastIndex((x) => x.vm === vm);
      if (i >= 0 && (found === undefined || samples[i]!.at > found.at)) found = { channels, i, at: samples[i]!.at };
    }
    if (found === undefined) return false;
    const samples = this.calibrations.get(found.channels)!;
    const old = samples[found.i]!;
    const sendMs = endToEndMs - old.fixedMs;
    if (!(sendMs > 0)) return false;
    const next = [...samples];
    next[found.i] = { ...old, sendMs, copyRateBytesPerSec: (old.sentBytes / sendMs) * 1000 };
    this.calibrations.set(found.channels, next);
    this.saveCalibrations();
    return true;
  }

  /**
   * Writes the calibrations on the next turn, once for any number of changes in this one: the
   * migration's end (calibrate, then recordEndToEnd right after) must not wait for a file write.
   */
  private saveCalibrations(): void {
    if (this.saveTimer !== undefined) return;
    this.saveTimer = setTimeout(() => this.saveCalibrationsNow(), 0);
  }

  private saveCalibrationsNow(): void {
    clearTimeout(this.saveTimer);
    this.saveTimer = undefined;
    const file: ModelFile = { version: 1, byChannels: Object.fromEntries([...this.calibrations].map(([k, v]) => [String(k), v])) };
    try {
      writeFileSync(join(this.o.root, MODEL_FILE), `${JSON.stringify(file, null, 2)}\n`);
    } catch {
      // A calibration is a hint: failing to keep it costs the next estimate its precision, nothing else.
    }
  }

  // ---- lifecycle

  async create(input: QemuVmSpec): Promise<VmInfo> {
    const given = validateQemuSpec(input);
    if (this.vms.has(given.name)) throw new EffectorError(ErrorCodes.VM_EXISTS, `VM ${given.name} already exists`, { details: { vm: given.name } });
    if (given.bootImage !== undefined) checkImage(given.bootImage, 'raw', given.name);
    for (const d of given.disks ?? []) checkImage(d.path, d.format, given.name);
    const spec = withOverlays(given, join(this.o.root, given.name), this.o.imagePath);
    const vm = this.addVm(spec, false);
    this.setState(vm, 'created', 'create', null);
    return toInfo(vm);
  }

  /**
   * Starts a VM. On a `migrated` VM whose QEMU still waits in postmigrate (the migration's
   * management hand-over failed after QEMU's own stream completed, and the target's incoming QEMU
   * was not committed) it takes the VM back: `cont` on the same QEMU, which reactivates its disks.
   */
  async start(name: string): Promise<VmInfo> {
    const vm = this.require(name);
    if (vm.state === 'migrated' && vm.proc?.alive && !vm.incoming) return this.reclaim(vm, vm.proc);
    if (vm.incoming || !['created', 'stopped', 'crashed'].includes(vm.state)) throw badState(vm, 'start');
    const proc = await QemuProcess.launch({ ...this.launchBase(vm), incoming: false });
    this.wire(vm, proc);
    this.presetMigration(proc.qmp);
    vm.startedAt = Date.now();
    this.setState(vm, 'running', 'start');
    return toInfo(vm);
  }

  private async reclaim(vm: Vm, proc: QemuProcess): Promise<VmInfo> {
    vm.intent = 'reclaim';
    try {
      await proc.qmp.execute('cont');
    } finally {
      vm.intent = undefined;
    }
    vm.expectingExit = undefined;
    vm.startedAt = Date.now();
    this.setState(vm, 'running', 'reclaim');
    return toInfo(vm);
  }

  /** Pauses the guest's vCPUs (QMP `stop`). */
  async pause(name: string): Promise<VmInfo> {
    const vm = this.require(name);
    if (vm.state !== 'running') throw badState(vm, 'pause');
    vm.intent = 'pause';
    try {
      await this.requireProc(name, 'pause').qmp.execute('stop');
    } finally {
      vm.intent = undefined;
    }
    this.setState(vm, 'paused', 'pause');
    return toInfo(vm);
  }

  async resume(name: string): Promise<VmInfo> {
    const vm = this.require(name);
    if (vm.state !== 'paused') throw badState(vm, 'resume');
    vm.intent = 'resume';
    try {
      await this.requireProc(name, 'resume').qmp.execute('cont');
    } finally {
      vm.intent = undefined;
    }
    this.setState(vm, 'running', 'resume');
    return toInfo(vm);
  }

  /** QEMU quits (QMP `quit`); a guest OS that needs a clean shutdown gets one from inside first. */
  async stop(name: string): Promise<VmInfo> {
    const vm = this.require(name);
    if (vm.state !== 'running' && vm.state !== 'paused') throw badState(vm, 'stop');
    const proc = this.requireProc(name, 'stop');
    vm.expectingExit = 'stop';
    await proc.qmp.execute('quit').catch((e: unknown) => {
      if (!isEmbotError(e, ErrorCodes.QMP_PROTOCOL)) throw e;
    });
    await proc.waitExit(this.timeoutMs);
    this.processGone(vm, proc);
    return toInfo(vm);
  }

  async kill(name: string): Promise<VmInfo> {
    const vm = this.require(name);
    const proc = vm.proc;
    if (proc === undefined || !proc.alive) throw badState(vm, 'kill');
    vm.expectingExit = 'kill';
    await proc.kill(this.timeoutMs);
    this.processGone(vm, proc);
    return toInfo(vm);
  }

  /** kill -9 the driver did not ask for itself: the VM reads `crashed`, as after a real death. */
  private async crash(name: string): Promise<VmInfo> {
    const vm = this.require(name);
    const proc = vm.proc;
    if (proc === undefined || !proc.alive || vm.incoming) throw badState(vm, 'crash');
    const crashed = new Promise<void>((resolve) => proc.events.once('exit', () => resolve()));
    await proc.kill(this.timeoutMs);
    // The exit handler (QMP close, then pid dead) reports the crash; wait for it, so the state is settled.
    await crashed;
    return toInfo(vm);
  }

  async remove(name: string): Promise<void> {
    const vm = this.require(name);
    if (vm.state === 'running' || vm.state === 'paused' || vm.incoming) throw badState(vm, 'remove');
    // A migrated VM's QEMU waits in postmigrate until now: the target owns the VM.
    if (vm.proc?.alive) {
      vm.expectingExit = vm.expectingExit ?? 'remove';
      await vm.proc.kill(this.timeoutMs);
    }
    await vm.proc?.detach();
    this.vms.delete(name);
    rmSync(vm.stateDir, { recursive: true, force: true });
    this.events.emit('vm-removed', { name });
  }

  // ---- persistence

  getPersistedState(): QemuPersistedState {
    return { version: 1, vms: [...this.vms.values()].map((vm) => ({ name: vm.spec.name, state: vm.state, crashes: vm.crashes })) };
  }

  /**
   * Re-attaches to every VM in the root: a live QEMU is taken back as it runs (same pid, never
   * started twice); a VM that was running and whose QEMU died meanwhile is `crashed`.
   * `state` (from {@link getPersistedState}) gives crash counts and what each VM was doing.
   */
  async restoreState(state: unknown): Promise<void> {
    const known = new Map((isPersisted(state) ? state.vms : []).map((v) => [v.name, v]));
    // A spare the last agent left running (it died before its close) belongs to nobody now.
    if (!this.restored) await killOrphanSpares(this.o.root, this.timeoutMs);
    for (const entry of readdirSync(this.o.root, { withFileTypes: true })) {
      if (!entry.isDirectory() || this.vms.has(entry.name) || this.attachingLate.has(entry.name)) continue;
      const stateDir = join(this.o.root, entry.name);
      let file: SpecFile;
      try {
        file = JSON.parse(readFileSync(vmFiles(stateDir).spec, 'utf8')) as SpecFile;
        validateQemuSpec(file.spec);
        if (file.spec.name !== entry.name) throw new EffectorError(ErrorCodes.VM_SPEC_INVALID, `spec.json names VM ${file.spec.name}, its dir ${entry.name}`);
      } catch (e) {
        // Not a VM dir (no spec.json) is nothing to report; an unreadable one is.
        if ((e as NodeJS.ErrnoException).code === 'ENOENT') continue;
        const error = isEmbotError(e) ? e.toJSON() : { code: ErrorCodes.VM_SPEC_INVALID, message: `spec.json is not JSON: ${String(e)}` };
        this.events.emit('vm-event', { name: entry.name, event: 'REATTACH_FAILED', data: { ...error, stateDir } });
        continue;
      }
      const before = known.get(file.spec.name);
      let proc: QemuProcess | undefined;
      try {
        proc = await QemuProcess.attach(stateDir, { timeoutMs: this.timeoutMs });
      } catch (e) {
        // A live QEMU we cannot talk to is not guessed at: listing it as stopped or crashed would
        // invite a second start (refused anyway while it lives: QemuProcess.launch). Reported, and
        // tried again in the background; it is listed once attached (or crashed, if it dies).
        const error = isEmbotError(e) ? e.toJSON() : { code: ErrorCodes.QEMU_FAILED, message: String(e) };
        this.events.emit('vm-event', { name: file.spec.name, event: 'REATTACH_FAILED', data: { ...error, stateDir } });
        void this.attachLate(file, stateDir, before);
        continue;
      }
      if (proc) await this.adoptLive(file, before, proc);
      else this.adoptDead(file, stateDir, before);
    }
    if (!this.restored && this.o.spareIncoming !== undefined) this.spare?.fill(this.o.spareIncoming);
    this.restored = true;
  }

  /** A VM dir's QEMU, attached: taken back as it runs (same pid), its orphaned migration out cancelled. */
  private async adoptLive(file: SpecFile, before: PersistedVm | undefined, proc: QemuProcess): Promise<void> {
    const vm = this.addVm(file.spec, file.incoming, false);
    vm.crashes = before?.crashes ?? 0;
    this.wire(vm, proc);
    // A migration out whose agent died goes on in QEMU and would wait at pre-switchover for
    // ever, the VM paused: nobody follows it now, so it is cancelled and the VM runs here again.
    await this.cancelOrphanedMigration(vm, proc);
    // An older agent may have started it without the RAM pad: its migrations are refused, coded (ram-size-check.ts).
    const ram = await queryBaseMemory(proc.qmp).catch((e: unknown) => {
      this.events.emit('vm-event', { name: file.spec.name, event: 'RAM_SIZE_UNKNOWN', data: isEmbotError(e) ? e.toJSON() : { message: describeError(e) } });
      return undefined;
    });
    vm.attachedRam = ram === undefined ? undefined : { pid: proc.pid, bytes: ram };
    const status = await proc.qmp.execute('query-status').then((r) => r.status, () => undefined);
    vm.startedAt = Date.now();
    // An incoming VM is 'created' until its commit, also once its memory is in (held paused by -S).
    const state: VmState = file.incoming && status !== 'running' ? 'created' : vmStateOf(status);
    this.setState(vm, state, 'reattach', null);
  }

  /** A VM dir with no live QEMU: what it was, or crashed when it was running and its QEMU died. */
  private adoptDead(file: SpecFile, stateDir: string, before: PersistedVm | undefined): void {
    const vm = this.addVm(file.spec, file.incoming, false);
    vm.crashes = before?.crashes ?? 0;
    if (before?.state === 'running' || before?.state === 'paused' || (before === undefined && readPidFile(stateDir) !== undefined)) {
      // QEMU removes its pidfile when it exits cleanly; one left behind means it died.
      vm.crashes++;
      this.setState(vm, 'crashed', 'process-died', null);
    } else {
      this.setState(vm, before?.state ?? 'stopped', 'reattach', null);
    }
  }

  /**
   * The restore could not attach to a live QEMU: try again with a doubling back-off until it
   * works (the VM is listed then, `reattach` from no state), the process dies (listed crashed) or
   * the driver closes. Never a second QEMU for the dir.
   */
  private async attachLate(file: SpecFile, stateDir: string, before: PersistedVm | undefined): Promise<void> {
    this.attachingLate.add(file.spec.name);
    try {
      await this.attachLateLoop(file, stateDir, before);
    } finally {
      this.attachingLate.delete(file.spec.name);
    }
  }

  private async attachLateLoop(file: SpecFile, stateDir: string, before: PersistedVm | undefined): Promise<void> {
    for (let delay = 100, attempt = 1; ; delay = Math.min(delay * 2, 2000), attempt++) {
      await sleep(delay);
      if (this.closed || this.vms.has(file.spec.name)) return;
      let proc: QemuProcess | undefined;
      try {
        proc = await QemuProcess.attach(stateDir, { timeoutMs: this.o.reattachAttemptMs ?? 5000 });
      } catch {
        continue;
      }
      if (this.closed || this.vms.has(file.spec.name)) return void (await proc?.detach());
      if (proc) await this.adoptLive(file, before, proc);
      else this.adoptDead(file, stateDir, before);
      this.events.emit('vm-event', { name: file.spec.name, event: 'QMP_REATTACHED', data: { ...(proc ? { pid: proc.pid } : {}), attempts: attempt } });
      return;
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.saveTimer !== undefined) this.saveCalibrationsNow();
    // The spare is no VM: it does not outlive the agent.
    clearTimeout(this.refillTimer);
    await this.spare?.close();
    await Promise.all([...this.vms.values()].map(async (vm) => vm.proc?.detach()));
  }

  // ---- migration, source side

  async migrateOut(name: string, o: QemuMigrateOutOptions): Promise<MigrateOutResult> {
    const vm = this.require(name);
    if (vm.state !== 'running' || vm.migrating) throw badState(vm, 'migrate');
    const proc = this.requireProc(name, 'migrate');
    checkRamForMigration(name, vm.spec.memory, vm.attachedRam?.pid === proc.pid ? vm.attachedRam.bytes : undefined, launchAccel(this.o.accel));
    if (this.o.tls !== undefined && o.targetName === undefined && o.viaLocalRelay !== true) {
      throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `migration of VM ${name} over TLS needs the target agent's name (its certificate must name it)`, { details: { vm: name } });
    }
    const qmp = proc.qmp;
    const channels = o.channels ?? 1;
    if (!Number.isInteger(channels) || channels < 1 || channels > 255) {
      throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `channels must be 1..255, not ${channels}`, { details: { vm: name, channels } });
    }
    if (o.signal?.aborted) throw aborted(name);
    const mirrored = mirroredDevices(vm.spec);
    if (mirrored.length > 0 && o.endpoint.disks === undefined) {
      throw new EffectorError(ErrorCodes.MIGRATION_FAILED, `VM ${name} has image disks (${mirrored.join(', ')}) and the target offers no export of them${o.viaLocalRelay ? ' (a fan-out does not mirror disks yet)' : ''}; nothing moved`, {
        details: { vm: name },
      });
    }
    vm.migrating = true;
    let mirror: DiskMirror | undefined;
    let mirrorTls: string | undefined;
    let mirrorStats: { disks: number; bytes: number; readyMs: number; finishMs: number } | undefined;
    let testWritten = false;
    let wake: () => void = () => {};
    // An event that comes while no wait is armed (in the same read as the query's reply, or while
    // onProgress runs) is kept: the next wait does not start, else the completion would be noticed
    // a whole poll late.
    let woken = false;
    const wakeUp = (): void => {
      woken = true;
      wake();
    };
    // QEMU 7.2 reports total-time and downtime as 0 for some completed migrations (seen with
    // pause-before-switchover); the source's own STOP-to-completion time stands in for them then.
    let pausedAt: number | undefined;
    let completedAt: number | undefined;
    // QEMU waits at pre-switchover for us: the event is enough to act on, no query-migrate first.
    let atSwitchover = false;
    const onEvent = (e: QmpEvent): void => {
      if (e.event === 'STOP') pausedAt ??= Date.now();
      if (e.event === 'MIGRATION' && e.data['status'] === 'completed') completedAt ??= Date.now();
      if (e.event === 'MIGRATION' && e.data['status'] === 'pre-switchover') atSwitchover = true;
      if (e.event === 'MIGRATION' || e.event === 'MIGRATION_PASS') wakeUp();
    };
    qmp.events.on('event', onEvent);
    o.signal?.addEventListener('abort', wakeUp);
    const started = Date.now();
    let maxThrottle = 0;
    let throttleSteps = 0;
    let lastThrottle = 0;
    let expectedDowntimeMs = 0;
    const initialDirtyRate = vm.dirtyRate;
    let finalDirtyRate = 0;
    let lastInfo: MigrationInfo = {};
    let handoverMs = 0;
    let hold: QemuCopyHold | undefined;
    let transferredAtStop: number | undefined;
    const progress = (info: MigrationInfo): MigrationProgress => ({
      phase: PHASES[info.status ?? 'none'],
      rounds: info.ram?.['dirty-sync-count'] ?? 0,
      transferredBytes: info.ram?.transferred ?? 0,
      remainingBytes: info.ram?.remaining ?? 0,
      rateBytesPerSec: ((info.ram?.mbps ?? 0) * 1e6) / 8,
      dirtyRateBytesPerSec: (info.ram?.['dirty-pages-rate'] ?? 0) * (info.ram?.['page-size'] ?? 4096),
      expectedDowntimeMs: info['expected-downtime'] ?? 0,
      throttle: (info['cpu-throttle-percentage'] ?? 0) / 100,
      channels,
    });
    const cancel = async (): Promise<void> => {
      await qmp.execute('migrate_cancel');
      for (;;) {
        const info = await qmp.execute('query-migrate');
        if (info.status !== 'cancelling' && info.status !== 'pre-switchover' && info.status !== 'active' && info.status !== 'device') return;
        await sleep(20);
      }
    };
    try {
      // Into the relay: no TLS of QEMU's (an earlier migration's creds are cleared), the relay has its own per destination.
      const tlsParams = o.viaLocalRelay ? { 'tls-creds': '' } : this.o.tls === undefined ? {} : await this.tlsObjects(vm, qmp, { endpoint: 'client', hostname: o.targetName! });
      mirrorTls = tlsParams['tls-creds'];
      // A pre-warm's hold depends on how hard the guest writes (qemu-prewarm.ts): measured now, 1 s.
      const mode = o.prewarm?.held() ? holdMode(await this.measureDirtyRate(name, 1).catch(() => undefined)) : 'limit';
      // A reserve copy is paced by what the rest of its pass costs (zero pages are nearly free): the guest's zero pages, now.
      const pageCosts =
        mode === 'reserve'
          ? await mapZeroPages((address, size, filename) => qmp.execute('pmemsave', { val: address, size, filename }, { timeoutMs: Math.max(this.timeoutMs, 120_000) }), vm.spec.memory, vm.stateDir).catch(() => undefined)
          : undefined;
      const holdShape: Pick<QemuCopyHoldOptions, 'mode' | 'memoryBytes' | 'pollMs' | 'maxBandwidth' | 'pageCosts'> = {
        mode,
        memoryBytes: vm.spec.memory,
        pollMs: this.pollMs,
        ...(o.maxBandwidth === undefined ? {} : { maxBandwidth: o.maxBandwidth }),
        ...(pageCosts === undefined ? {} : { pageCosts }),
      };
      // Most of this was set when the QEMU started (presetMigration): only what differs goes out.
      await this.applyMigrationSettings(qmp, {
        caps: { ...this.baseMigrationCaps(o.autoConverge ?? false), multifd: channels > 1 },
        params: {
          ...tlsParams,
          ...this.baseMigrationParams(o.downtimeLimitMs, o.maxBandwidth),
          ...(channels > 1 ? { 'multifd-channels': channels } : {}),
          ...(o.prewarm?.held() ? heldParameters(holdShape) : {}),
        },
      });
      if (o.endpoint.disks !== undefined && mirrored.length > 0) {
        await testHookWrite(qmp, mirrored[0], 'beforeMirror');
        // Every guest write reaches the target too from READY on, before any memory moves.
        const mirrorTlsName = mirrorTls ? { tlsCreds: mirrorTls, ...(o.targetName === undefined ? {} : { tlsHostname: o.targetName }) } : {};
        const m0 = Date.now();
        mirror = await startDiskMirror(qmp, exportFromWire(o.endpoint.disks, mirrorTls), mirrorTlsName).catch((e: unknown) => {
          // The reason a migration record keeps is text: the code goes into it, as the image build's does.
          const code = e instanceof EffectorError ? e.code : ErrorCodes.QEMU_FAILED;
          throw new EffectorError(ErrorCodes.MIGRATION_FAILED, `VM ${name}: ${describeError(e)}; no memory moved, the VM runs here [${code}]`, { details: { vm: name }, cause: e });
        });
        mirrorStats = { disks: mirror.jobs.length, bytes: 0, readyMs: Date.now() - m0, finishMs: 0 };
        await testHookWrite(qmp, mirrored[0], 'afterReady');
      }
      await qmp.execute('migrate', { uri: o.endpoint.uri });
      hold = o.prewarm && new QemuCopyHold((params) => this.applyMigrationSettings(qmp, { caps: {}, params }), o.prewarm, {
        ...holdShape,
        downtimeLimitMs: o.downtimeLimitMs ?? 300,
        ...(this.o.cpuThrottle?.initial === undefined ? {} : { cpuThrottleInitial: this.o.cpuThrottle.initial }),
        onChange: wakeUp,
        onError: wakeUp,
      });
      let switched = false;
      for (;;) {
        woken = false;
        const info: MigrationInfo = atSwitchover && !switched ? { ...lastInfo, status: 'pre-switchover' } : await qmp.execute('query-migrate');
        lastInfo = info;
        maxThrottle = Math.max(maxThrottle, (info['cpu-throttle-percentage'] ?? 0) / 100);
        if ((info['cpu-throttle-percentage'] ?? 0) > lastThrottle) throttleSteps++;
        lastThrottle = info['cpu-throttle-percentage'] ?? lastThrottle;
        if ((info['expected-downtime'] ?? 0) > 0) expectedDowntimeMs = info['expected-downtime']!;
        const p = progress(info);
        if (p.dirtyRateBytesPerSec > 0) finalDirtyRate = p.dirtyRateBytesPerSec;
        o.onProgress?.(hold ? hold.progress(p, info.ram?.total) : p);
        if (mirror !== undefined && !testWritten && info.status === 'active') {
          testWritten = true;
          await testHookWrite(qmp, mirrored[0], 'duringMemory');
        }
        if (info.status === 'completed') break;
        if (info.status === 'failed' || info.status === 'cancelled') {
          throw new EffectorError(ErrorCodes.MIGRATION_FAILED, `migration of VM ${name} ${info.status}: ${info['error-desc'] ?? 'no reason given'}`, { details: { vm: name, status: info.status } });
        }
        if (o.signal?.aborted) {
          await cancel();
          throw aborted(name);
        }
        if (hold?.failure !== undefined && !switched) {
          // The hold's parameters did not take (a held copy would never switch): the migration ends, the VM runs here.
          await cancel();
          throw new EffectorError(ErrorCodes.MIGRATION_FAILED, `the pre-warm of VM ${name} could not change its copy's parameters: ${describeError(hold.failure)}; cancelled, the VM runs here`, {
            details: { vm: name, reason: 'holdFailed' },
            cause: hold.failure,
          });
        }
        if (info.status === 'pre-switchover' && !switched && hold?.holding()) {
          // A guest that dirtied nothing since the last sync meets any limit (qemu-prewarm.ts): not kept paused until the command.
          await cancel();
          throw new EffectorError(ErrorCodes.MIGRATION_FAILED, `the pre-warm of VM ${name} could not hold its copy: QEMU caught up while the guest dirtied almost nothing and reached its switchover before the command (a hard writer that went quiet under the 1 ms limit, or a reserve copy polled too late on a loaded host); cancelled, the VM runs here`, {
            details: { vm: name, reason: 'holdLost' },
          });
        }
        if (info.status === 'pre-switchover' && !switched) {
          switched = true;
          // Paused before the final pass: what is sent from here goes with the VM stopped. Woken by the event, the
          // loop has only the last poll's figure; asked now, alongside the hand-over.
          const atStop = atSwitchover ? qmp.execute('query-migrate').catch(() => undefined) : Promise.resolve(info);
          const h0 = Date.now();
          try {
            // Paused: the disk is final; the mirror ends with a consistent copy before the hand-over.
            if (mirror !== undefined) {
              await testHookWrite(qmp, mirrored[0], 'atSwitch');
              const f0 = Date.now();
              const reports = await mirror.finish();
              if (mirrorStats !== undefined) {
                mirrorStats.bytes = reports.reduce((n, r) => n + r.bytes, 0);
                mirrorStats.finishMs = Date.now() - f0;
              }
            }
            await o.beforeSwitchover?.();
            handoverMs = Date.now() - h0;
          } catch (e) {
            await cancel();
            throw e;
          }
          if (o.signal?.aborted) {
            await cancel();
            throw aborted(name);
          }
          // Not awaited before the continue (a reply read first would wait on this event loop, busy relaying): the
          // monitor answers in order, so the query still sees the paused state.
          const continued = qmp.execute('migrate-continue', { state: 'pre-switchover' });
          continued.catch(() => undefined); // awaited below; not an unhandled rejection while atStop is awaited
          // Asked before the continue, so answered before it: waiting for it does not hold the continue up.
          const stopInfo = (await atStop) ?? info;
          transferredAtStop = stopInfo.ram?.transferred;
          // QEMU's final pass holds its big lock: query-migrate (maybe the continue's own reply) may not answer before it
          // completes. Said now, with the figures at the stop, so a progress view shows why they stop moving.
          const stopping: MigrationProgress = { ...progress(stopInfo), phase: 'stop-and-copy' };
          o.onProgress?.(hold ? hold.progress(stopping) : stopping);
          await continued;
          continue;
        }
        // A held copy's budget starts at its lift: warming may last as long as the command takes.
        const budgetFrom = hold ? hold.budgetStart() : started;
        if (!switched && o.timeBudgetMs !== undefined && budgetFrom !== undefined && Date.now() - budgetFrom > o.timeBudgetMs) {
          await cancel();
          const p = progress(info);
          throw new EffectorError(
            ErrorCodes.MIGRATION_NOT_CONVERGED,
            `migration of VM ${name} did not converge within ${o.timeBudgetMs} ms (round ${p.rounds}, ${p.remainingBytes} bytes left, expected downtime ${p.expectedDowntimeMs} ms); cancelled, the VM runs here`,
            { details: { vm: name, rounds: p.rounds, remainingBytes: p.remainingBytes, expectedDowntimeMs: p.expectedDowntimeMs } },
          );
        }
        if (woken) continue;
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, this.pollMs);
          wake = () => {
            clearTimeout(timer);
            resolve();
          };
        });
      }
      vm.expectingExit = 'migrated';
      this.setState(vm, 'migrated', 'migrated');
      const ended = completedAt ?? Date.now();
      // The caller's hand-over at the switch is not the stream's: left out of the calibration (a pre-warm's wait for its command too).
      if (!o.prewarm) this.calibrate(name, channels, lastInfo, ended - started - handoverMs);
      return {
        bytes: lastInfo.ram?.transferred ?? 0,
        rounds: lastInfo.ram?.['dirty-sync-count'] ?? 0,
        totalMs: lastInfo['total-time'] || ended - started,
        downtimeMs: lastInfo.downtime || (pausedAt === undefined ? 0 : ended - pausedAt),
        ...(transferredAtStop === undefined || lastInfo.ram?.transferred === undefined ? {} : { stopBytes: Math.max(0, lastInfo.ram.transferred - transferredAtStop) }),
        expectedDowntimeMs,
        throttled: maxThrottle > 0,
        maxThrottle,
        channels,
        transport: o.viaLocalRelay ? 'relay' : 'direct',
        // QEMU switches over only once the expected downtime fits the limit.
        converged: true,
        throttleSteps,
        initialDirtyRate: initialDirtyRate ?? finalDirtyRate,
        finalDirtyRate,
        ...((lastInfo.ram?.mbps ?? 0) > 0 ? { rateBytesPerSec: ((lastInfo.ram?.mbps ?? 0) * 1e6) / 8 } : {}),
        ...(mirrorStats === undefined ? {} : { diskMirror: { ...mirrorStats } }),
      };
    } catch (e) {
      // The source's disk was never touched by the mirror: its jobs and NBD links just go.
      await mirror?.abort().catch(() => undefined);
      // QEMU resumes a source it paused when a migration is cancelled or fails.
      // (vm.state is re-read: the STOP/RESUME events of the migration changed it meanwhile.)
      const now = vm.state as VmState;
      if (vm.proc?.alive && now !== 'migrated') {
        const status = await qmp.execute('query-status').catch(() => undefined);
        if (status?.status === 'running' && now !== 'running') this.setState(vm, 'running', 'migration-cancelled');
      }
      // The source QEMU went away under the migration (its QMP closed): the migration failed; the
      // VM itself is reported crashed through the process's exit.
      if (isEmbotError(e, ErrorCodes.QMP_PROTOCOL) && !proc.alive) {
        // Only the QMP connection may have dropped (QEMU lives): the re-attach cancels the migration nobody follows.
        const why = pidAlive(proc.pid) ? 'its QMP connection dropped (the driver re-attaches and cancels it)' : 'its QEMU died';
        throw new EffectorError(ErrorCodes.MIGRATION_FAILED, `migration of VM ${name} failed: ${why}`, { details: { vm: name }, cause: e });
      }
      throw e;
    } finally {
      hold?.close();
      vm.migrating = false;
      qmp.events.off('event', onEvent);
      o.signal?.removeEventListener('abort', wakeUp);
    }
  }

  // ---- migration, target side

  async prepareIncoming(input: QemuVmSpec, options: QemuIncomingOptions = {}): Promise<{ readonly endpoint: MigrationEndpoint }> {
    const given = validateQemuSpec(input);
    if (this.vms.has(given.name)) throw new EffectorError(ErrorCodes.VM_EXISTS, `VM ${given.name} already exists here`, { details: { vm: given.name } });
    // Image disks: this host's own overlays on the image built here (the source's paths mean nothing here).
    const spec = withOverlays(given, join(this.o.root, given.name), this.o.imagePath);
    const channels = options.channels ?? 1;
    // Registered before the first await: a second prepare of the same VM is refused meanwhile.
    const vm = this.addVm(spec, true, false);
    try {
      // The spare, when it has this shape, already runs with `events` and `late-block-activate`
      // set; it moves into the VM's dir with its spec.json.
      const spare = await this.spare?.take(spec, vm.stateDir, specJson(vm));
      if (spare === undefined) {
        mkdirSync(vm.stateDir, { recursive: true });
        this.writeSpec(vm);
      }
      // Held (-S) until commitIncoming: the VM never runs at both ends.
      const proc = spare ?? (await QemuProcess.launch({ ...this.launchBase(vm), incoming: true, holdIncoming: true, preallocate: this.o.preallocateIncoming === true }));
      this.wire(vm, proc);
      if (spare === undefined || channels > 1) {
        await proc.qmp.execute('migrate-set-capabilities', {
          capabilities: [
            { capability: 'events', state: true },
            { capability: 'multifd', state: channels > 1 },
            // The disks stay the source's until the commit's `cont`: a source that takes its VM back
            // after QEMU's stream completed (hand-over failed) can still lock and write them.
            { capability: 'late-block-activate', state: true },
          ],
        });
      }
      const tlsParams =
        this.o.tls === undefined
          ? {}
          : await this.tlsObjects(vm, proc.qmp, { endpoint: 'server', ...(options.sourceName === undefined ? {} : { clientName: options.sourceName }) });
      if (channels > 1 || this.o.tls !== undefined) {
        await proc.qmp.execute('migrate-set-parameters', { ...tlsParams, ...(channels > 1 ? { 'multifd-channels': channels } : {}) });
      }
      // Before the stream starts (the monitor is busy meanwhile): a pre-warm's switch waits for its
      // command, so its target's first touches of guest RAM are taken now rather than in its stop.
      // Best effort: without it the copy is as a cold one's.
      const preallocated = spare === undefined && this.o.preallocateIncoming === true;
      if (options.prewarm === true && !preallocated) await faultGuestRamIn(proc.qmp, Math.max(this.timeoutMs, 120_000)).catch(() => undefined);
      const host = this.o.listenHost ?? '127.0.0.1';
      await proc.qmp.execute('migrate-incoming', { uri: `tcp:${host}:0` });
      const info = await proc.qmp.execute('query-migrate');
      const port = info['socket-address']?.find((a) => a.type === 'inet')?.port;
      if (port === undefined) throw new EffectorError(ErrorCodes.QEMU_FAILED, `incoming QEMU for VM ${spec.name} reports no listening port`, { details: { vm: spec.name } });
      const devices = mirroredDevices(spec);
      let disks: DiskExport | undefined;
      if (devices.length > 0) {
        const { 'tls-creds': tlsCreds, 'tls-authz': tlsAuthz } = tlsParams as Readonly<Record<string, string>>;
        disks = await exportDisks(proc.qmp, { host, devices, ...(tlsCreds ? { tlsCreds } : {}), ...(tlsAuthz ? { tlsAuthz } : {}) });
        this.diskExports.set(spec.name, disks);
        if (faultExportRefused()) await stopDiskExport(proc.qmp, disks.disks);
      }
      this.setState(vm, 'created', 'incoming', null);
      return { endpoint: { uri: `tcp:${host}:${port}`, ...(disks === undefined ? {} : { disks: exportToWire(disks) }) } };
    } catch (e) {
      await this.abortIncoming(spec.name).catch(() => {});
      throw e;
    }
  }

  /**
   * Waits until the incoming VM's stream completed and checks it is held there: paused by -S, its
   * disks not activated (late-block-activate; only the commit's `cont` takes them), so
   * abortIncoming still throws it away and the source can still take its VM back with `cont`.
   * Event-fed (MIGRATION), with `query-migrate` as the fallback after a re-attach.
   */
  private async bootIncoming(name: string, options: { readonly timeoutMs?: number } = {}): Promise<IncomingBootResult> {
    const vm = this.require(name);
    if (!vm.incoming) throw badState(vm, 'boot an incoming migration of');
    const proc = vm.proc;
    if (proc === undefined || !proc.alive) throw new EffectorError(ErrorCodes.MIGRATION_FAILED, `incoming VM ${name} has no QEMU any more: the migration stream broke`, { details: { vm: name } });
    const t0 = Date.now();
    const deadline = t0 + (options.timeoutMs ?? this.timeoutMs);
    let wake: () => void = () => {};
    const onEvent = (e: QmpEvent): void => {
      if (e.event === 'MIGRATION') wake();
    };
    proc.qmp.events.on('event', onEvent);
    try {
      for (;;) {
        if (!vm.incomingComplete) {
          const info = await proc.qmp.execute('query-migrate');
          if (info.status === 'completed' && !vm.incomingComplete) {
            vm.incomingComplete = true;
            vm.incomingCompletedAt = Date.now();
          } else if (info.status === 'failed' || info.status === 'cancelled') {
            throw new EffectorError(ErrorCodes.MIGRATION_FAILED, `incoming migration of VM ${name} ${info.status}`, { details: { vm: name, status: info.status } });
          }
        }
        if (vm.incomingComplete) {
          const { status } = await proc.qmp.execute('query-status');
          // Held by -S: nothing of the guest ran here, and the disks are still the source's.
          if (status !== 'paused') throw new EffectorError(ErrorCodes.MIGRATION_FAILED, `incoming VM ${name} is ${status}, not held at its last reversible point`, { details: { vm: name, status } });
          return { readyAt: vm.incomingCompletedAt ?? Date.now(), waitedMs: Date.now() - t0 };
        }
        if (Date.now() > deadline) throw new EffectorError(ErrorCodes.MIGRATION_FAILED, `incoming VM ${name}: its stream did not complete within ${options.timeoutMs ?? this.timeoutMs} ms`, { details: { vm: name } });
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, this.pollMs);
          wake = () => {
            clearTimeout(timer);
            resolve();
          };
        });
      }
    } catch (e) {
      // The QEMU went away under the wait: the stream broke.
      if (isEmbotError(e, ErrorCodes.QMP_PROTOCOL)) throw new EffectorError(ErrorCodes.MIGRATION_FAILED, `incoming VM ${name} has no QEMU any more: the migration stream broke`, { details: { vm: name }, cause: e });
      throw e;
    } finally {
      proc.qmp.events.off('event', onEvent);
    }
  }

  async commitIncoming(name: string, options: { readonly timeoutMs?: number; readonly running?: boolean } = {}): Promise<VmInfo> {
    const vm = this.require(name);
    if (!vm.incoming) throw badState(vm, 'commit an incoming migration of');
    const proc = vm.proc;
    // An incoming QEMU exits by itself when its stream breaks (source died, migration cancelled).
    if (proc === undefined || !proc.alive) throw new EffectorError(ErrorCodes.MIGRATION_FAILED, `incoming VM ${name} has no QEMU any more: the migration stream broke`, { details: { vm: name } });
    const deadline = Date.now() + (options.timeoutMs ?? this.timeoutMs);
    // RESUME (the incoming VM starts) or a MIGRATION event wakes the wait; the poll is the fallback.
    let wake: () => void = () => {};
    let resumed: () => void = () => {};
    const onEvent = (e: QmpEvent): void => {
      if (e.event === 'RESUME') resumed();
      if (e.event === 'RESUME' || e.event === 'MIGRATION') wake();
    };
    proc.qmp.events.on('event', onEvent);
    const exported = this.diskExports.get(name);
    this.diskExports.delete(name);
    // The export writes the disk the VM is about to own: gone before `cont` activates it.
    if (exported !== undefined) await stopDiskExport(proc.qmp, exported.disks);
    // Started with -S, the VM waits paused once its memory is in: `cont` is the commit.
    const resume = async (): Promise<void> => {
      if (options.running === false) return;
      vm.intent = 'migrated-in';
      const cont = proc.qmp.execute('cont').finally(() => (vm.intent = undefined));
      // QEMU emits RESUME once the vCPUs run (the disks activated before), then answers; under TCG
      // the answer can trail the event by several ms (the running vCPU thread holds the CPU): the
      // VM runs at the event. A `cont` that fails emits no RESUME, so its error still surfaces.
      const running = new Promise<void>((resolve) => (resumed = resolve));
      cont.catch(() => undefined);
      await Promise.race([cont, running]);
    };
    try {
      for (;;) {
        // The usual case: the stream's completion was seen (MIGRATION event), so one round trip
        // commits; QEMU is asked where it is (up to 4 round trips) only when it was not.
        if (vm.incomingComplete) {
          await resume();
          break;
        }
        const { status } = await proc.qmp.execute('query-status');
        if (status === 'running') break;
        // The completed event is read before the reply when both come in one read: no second query then.
        if (status === 'paused' && (vm.incomingComplete || (await proc.qmp.execute('query-migrate')).status === 'completed')) {
          await resume();
          break;
        }
        if (status !== 'inmigrate' && status !== 'paused') {
          throw new EffectorError(ErrorCodes.MIGRATION_FAILED, `incoming VM ${name} is ${status}, not running`, { details: { vm: name, status } });
        }
        if (Date.now() > deadline) throw new EffectorError(ErrorCodes.MIGRATION_FAILED, `incoming VM ${name} does not run after ${options.timeoutMs ?? this.timeoutMs} ms`, { details: { vm: name, status } });
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, this.pollMs);
          wake = () => {
            clearTimeout(timer);
            resolve();
          };
        });
      }
    } finally {
      proc.qmp.events.off('event', onEvent);
    }
    vm.incoming = false;
    this.writeSpec(vm);
    vm.startedAt = Date.now();
    this.setState(vm, options.running === false ? 'paused' : 'running', 'migrated-in');
    this.refillSpare(vm.spec);
    return toInfo(vm);
  }

  async abortIncoming(name: string): Promise<void> {
    const vm = this.vms.get(name);
    if (vm === undefined) return;
    if (!vm.incoming) throw badState(vm, 'abort an incoming migration of');
    // The export dies with the QEMU killed below.
    this.diskExports.delete(name);
    vm.expectingExit = 'abort-incoming';
    if (vm.proc?.alive) await vm.proc.kill(this.timeoutMs);
    await vm.proc?.detach();
    this.vms.delete(name);
    rmSync(vm.stateDir, { recursive: true, force: true });
    this.events.emit('vm-removed', { name });
    this.refillSpare(vm.spec);
  }

  /**
   * After an incoming migration (committed or not): a spare of the shape last received, started in
   * the background a moment later. Not at once: `spawn` forks the agent's process synchronously and
   * QEMU's start takes a core for tens of ms, which the commit's ack and the embots' start would wait for.
   */
  private refillSpare(spec: QemuVmSpec): void {
    if (this.spare === undefined || this.closed) return;
    // Not its image disks: they are this VM's own overlays, which a spare must not open.
    const { name: _name, ...shape } = withoutImageDisks(spec);
    clearTimeout(this.refillTimer);
    this.refillTimer = setTimeout(() => this.spare?.fill(shape), this.o.spareRefillDelayMs ?? SPARE_REFILL_DELAY_MS);
    this.refillTimer.unref();
  }

  // ---- internals

  /** Cancels a migration out of `proc` that no migrateOut call follows, and waits until QEMU has settled it. */
  private async cancelOrphanedMigration(vm: Vm, proc: QemuProcess): Promise<void> {
    if (vm.migrating || vm.incoming) return;
    const busy = (status: MigrationStatus | undefined): boolean => ['setup', 'active', 'pre-switchover', 'device', 'cancelling'].includes(status ?? 'none');
    try {
      if (!busy((await proc.qmp.execute('query-migrate')).status)) return;
      await proc.qmp.execute('migrate_cancel');
      const deadline = Date.now() + this.timeoutMs;
      while (busy((await proc.qmp.execute('query-migrate')).status) && Date.now() < deadline) await sleep(20);
      this.events.emit('vm-event', { name: vm.spec.name, event: 'MIGRATION_CANCELLED', data: { reason: 'no migration call follows it (agent restarted or QMP re-attached)' } });
    } catch {
      // QMP dropped again: the next attach tries again.
    }
  }

  /** The capabilities every migration out sets (multifd is per migration). */
  private baseMigrationCaps(autoConverge: boolean): Record<string, boolean> {
    return { events: true, 'auto-converge': autoConverge, 'pause-before-switchover': true };
  }

  private baseMigrationParams(downtimeLimitMs: number | undefined, maxBandwidth: number | undefined): Record<string, number> {
    return {
      'downtime-limit': Math.max(1, Math.round(downtimeLimitMs ?? 300)),
      'max-bandwidth': Math.round(maxBandwidth ?? UNLIMITED_BANDWIDTH),
      ...(this.o.cpuThrottle?.initial === undefined ? {} : { 'cpu-throttle-initial': this.o.cpuThrottle.initial }),
      ...(this.o.cpuThrottle?.increment === undefined ? {} : { 'cpu-throttle-increment': this.o.cpuThrottle.increment }),
    };
  }

  /**
   * A started VM's QEMU gets the settings a migration out of it will use with the config's
   * defaults, off any migration's path. Not awaited by start(): a migration out that comes first
   * waits for it (applyMigrationSettings), and one that fails leaves them to that migration.
   */
  private presetMigration(qmp: QmpClient): void {
    const d = this.o.migrationDefaults ?? {};
    const settings = this.applyMigrationSettings(qmp, {
      caps: { ...this.baseMigrationCaps(d.autoConverge ?? false), multifd: false },
      params: this.baseMigrationParams(d.downtimeLimitMs, undefined),
    });
    settings.catch(() => undefined);
  }

  /**
   * Sends the capabilities and parameters of `want` this QEMU does not have yet (as this driver
   * set them: a new QMP connection, as after a re-attach, starts from nothing known), the two
   * commands together (QEMU runs a monitor's commands in order); none when nothing differs. Each
   * waits for the previous call on the same QEMU, so what is known is what QEMU has.
   */
  private applyMigrationSettings(qmp: QmpClient, want: { readonly caps: Readonly<Record<string, boolean>>; readonly params: Readonly<Record<string, number | string | boolean>> }): Promise<void> {
    let known = this.migrationSettings.get(qmp);
    if (known === undefined) {
      known = { settings: { caps: new Map(), params: new Map() }, last: Promise.resolve() };
      this.migrationSettings.set(qmp, known);
    }
    const { settings } = known;
    const next = known.last.then(async () => {
      const caps = Object.entries(want.caps).filter(([k, v]) => settings.caps.get(k) !== v);
      const params = Object.entries(want.params).filter(([k, v]) => settings.params.get(k) !== v);
      const settled = await Promise.allSettled([
        caps.length === 0
          ? undefined
          : qmp.execute('migrate-set-capabilities', { capabilities: caps.map(([capability, state]) => ({ capability, state })) }).then(() => caps.forEach(([k, v]) => settings.caps.set(k, v))),
        params.length === 0 ? undefined : qmp.execute('migrate-set-parameters', Object.fromEntries(params)).then(() => params.forEach(([k, v]) => settings.params.set(k, v))),
      ]);
      for (const r of settled) if (r.status === 'rejected') throw r.reason;
    });
    known.last = next.catch(() => undefined);
    return next;
  }

  /** Loads the agent's certificates into `qmp`'s QEMU; the copies QEMU read are deleted right after. */
  private async tlsObjects(
    vm: Vm,
    qmp: QmpClient,
    o: { readonly endpoint: 'server' | 'client'; readonly hostname?: string; readonly clientName?: string },
  ): Promise<Readonly<Record<string, string>>> {
    const dir = writeTlsCredsDir(vm.stateDir, o.endpoint, this.o.tls!);
    try {
      const params = await addTlsObjects(qmp, { dir, ...o });
      // It cleared tls-creds and tls-authz on QEMU itself: the settings cache must not think an
      // earlier migration's still set, or a second TLS migration from this QEMU (after a cancel, a
      // cancelled pre-warm) would go out in plaintext and the incoming QEMU would reset it.
      const known = this.migrationSettings.get(qmp)?.settings.params;
      known?.delete('tls-creds');
      known?.delete('tls-authz');
      return params;
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }

  private async dump(name: string, address: number, length: number): Promise<Uint8Array> {
    const vm = this.require(name);
    if (vm.state === 'running') throw badState(vm, 'dump the memory of (pause it first)');
    const proc = this.requireProc(name, 'dump the memory of');
    const file = join(vm.stateDir, `pmem-${process.pid}-${Date.now()}.bin`);
    try {
      await proc.qmp.execute('pmemsave', { val: address, size: length, filename: file }, { timeoutMs: Math.max(this.timeoutMs, 120_000) });
      return readFileSync(file);
    } finally {
      rmSync(file, { force: true });
    }
  }

  private launchBase(vm: Vm): { binary?: string; stateDir: string; spec: QemuVmSpec; accel?: Accel; timeoutMs: number } {
    return {
      ...(this.o.binary === undefined ? {} : { binary: this.o.binary }),
      ...(this.o.accel === undefined ? {} : { accel: this.o.accel }),
      stateDir: vm.stateDir,
      spec: vm.spec,
      timeoutMs: this.timeoutMs,
    };
  }

  private addVm(spec: QemuVmSpec, incoming: boolean, write = true): Vm {
    const vm: Vm = {
      spec,
      stateDir: join(this.o.root, spec.name),
      state: 'created',
      crashes: 0,
      startedAt: undefined,
      proc: undefined,
      expectingExit: undefined,
      incoming,
      incomingComplete: false,
      incomingCompletedAt: undefined,
      migrating: false,
      intent: undefined,
      dirtyRate: undefined,
      dirtyRateSoon: false,
      nonZero: undefined,
      cpuSample: undefined,
      load: 0,
      attachedRam: undefined,
    };
    this.vms.set(spec.name, vm);
    if (write) {
      mkdirSync(vm.stateDir, { recursive: true });
      this.writeSpec(vm);
    }
    return vm;
  }

  private writeSpec(vm: Vm): void {
    writeFileSync(vmFiles(vm.stateDir).spec, specJson(vm));
  }

  private wire(vm: Vm, proc: QemuProcess): void {
    vm.proc = proc;
    vm.expectingExit = undefined;
    vm.cpuSample = undefined;
    proc.qmp.events.on('event', (e) => {
      if (vm.proc !== proc) return;
      this.events.emit('vm-event', { name: vm.spec.name, event: e.event, data: e.data });
      switch (e.event) {
        case 'STOP':
          if (vm.state === 'running') this.setState(vm, 'paused', vm.intent ?? (vm.migrating ? 'migration-switchover' : 'qmp-stop'));
          break;
        case 'RESUME':
          if (vm.state === 'paused' || (vm.incoming && vm.state === 'created')) this.setState(vm, 'running', vm.intent ?? (vm.incoming ? 'migrated-in' : 'qmp-cont'));
          break;
        case 'SHUTDOWN':
          vm.expectingExit ??= e.data['guest'] === true ? 'guest-shutdown' : 'qmp-quit';
          break;
        case 'MIGRATION':
          // QEMU sets the incoming side's runstate (paused, under -S) before it reports completed.
          if (vm.incoming && e.data['status'] === 'completed' && !vm.incomingComplete) {
            vm.incomingComplete = true;
            vm.incomingCompletedAt = Date.now();
          }
          break;
        case 'GUEST_PANICKED':
          vm.crashes++;
          this.setState(vm, 'crashed', 'guest-panicked');
          break;
      }
    });
    proc.events.once('exit', () => {
      if (vm.proc === proc) this.processGone(vm, proc);
    });
    proc.events.once('detached', () => void this.reattach(vm, proc));
  }

  /**
   * The QMP connection of `old` dropped while its QEMU runs: connect again (never a new QEMU) with
   * a doubling back-off until it works, the process dies (then it is a crash like any other) or
   * the driver closes. State changes missed meanwhile are read back with `query-status`, and a
   * migration out nobody follows any more is cancelled, so the VM keeps running here.
   */
  private async reattach(vm: Vm, old: QemuProcess): Promise<void> {
    this.events.emit('vm-event', { name: vm.spec.name, event: 'QMP_DETACHED', data: { pid: old.pid } });
    let delay = 100;
    for (let attempt = 1; ; attempt++) {
      if (this.closed || vm.proc !== old) return;
      if (!pidAlive(old.pid)) return this.processGone(vm, old);
      let proc: QemuProcess | undefined;
      try {
        proc = await QemuProcess.attach(vm.stateDir, { timeoutMs: this.o.reattachAttemptMs ?? 5000 });
      } catch {
        await sleep(delay);
        delay = Math.min(delay * 2, 2000);
        continue;
      }
      if (proc === undefined) return this.processGone(vm, old);
      if (this.closed || vm.proc !== old) return void (await proc.detach());
      const expecting = vm.expectingExit;
      this.wire(vm, proc);
      vm.expectingExit = expecting;
      try {
        await this.cancelOrphanedMigration(vm, proc);
        const { status } = await proc.qmp.execute('query-status');
        const now = vmStateOf(status);
        if (now !== vm.state && vm.state !== 'migrated') this.setState(vm, now, 'reattach');
      } catch {
        // The new connection dropped too: its own 'detached' or 'exit' carries on from here.
      }
      this.events.emit('vm-event', { name: vm.spec.name, event: 'QMP_REATTACHED', data: { pid: proc.pid, attempts: attempt } });
      return;
    }
  }

  /** The QEMU of `vm` ended: as asked (stopped), after a migration (migrated stays), or a crash. */
  private processGone(vm: Vm, proc: QemuProcess): void {
    if (vm.proc !== proc) return;
    vm.proc = undefined;
    void proc.detach();
    vm.startedAt = undefined;
    if (vm.state === 'migrated') return;
    const reason = vm.expectingExit;
    vm.expectingExit = undefined;
    if (reason !== undefined) {
      // A kill leaves QEMU's pidfile behind; gone, it cannot read as a crash after a restart.
      rmSync(vmFiles(vm.stateDir).pid, { force: true });
      this.setState(vm, 'stopped', reason);
    } else if (vm.state !== 'crashed') {
      vm.crashes++;
      this.setState(vm, 'crashed', 'process-died');
    }
  }

  private setState(vm: Vm, to: VmState, reason: string, from: VmState | null = vm.state): void {
    vm.state = to;
    if (from === to) return;
    this.events.emit('vm-state', { name: vm.spec.name, from, to, reason });
  }

  private require(name: string): Vm {
    const vm = this.vms.get(name);
    if (vm === undefined) throw new EffectorError(ErrorCodes.VM_UNKNOWN, `no VM ${name}`, { details: { vm: name } });
    return vm;
  }

  private requireProc(name: string, op: string): QemuProcess {
    const vm = this.require(name);
    if (vm.proc === undefined || !vm.proc.alive) throw badState(vm, op);
    return vm.proc;
  }
}

/** The VM state a QEMU found running (re-attached) is in, from its `query-status` (undefined: no answer). */
function vmStateOf(status: string | undefined): VmState {
  return status === 'running' ? 'running' : status === 'postmigrate' ? 'migrated' : status === 'inmigrate' ? 'created' : 'paused';
}

function specJson(vm: Vm): string {
  const file: SpecFile = { spec: vm.spec, incoming: vm.incoming };
  return JSON.stringify(file, null, 2);
}

function toInfo(vm: Vm): VmInfo {
  return {
    name: vm.spec.name,
    state: vm.state,
    memory: vm.spec.memory,
    vcpus: vm.spec.vcpus,
    crashes: vm.crashes,
    ...(vm.startedAt === undefined ? {} : { startedAt: vm.startedAt }),
    ...(vm.incoming ? { incoming: true } : {}),
  };
}

/** CPU share of the QEMU process since the last sample (/proc/PID/stat utime + stime), over its vCPUs. */
function cpuLoad(vm: Vm): number {
  const pid = vm.proc?.pid;
  if (pid === undefined) return 0;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const ticks = Number(fields[11]) + Number(fields[12]);
    const now = Date.now();
    const before = vm.cpuSample;
    vm.cpuSample = { at: now, ticks };
    if (before === undefined || now <= before.at) return vm.load;
    return Math.min(1, Math.max(0, (ticks - before.ticks) / CLOCK_TICKS / ((now - before.at) / 1000) / vm.spec.vcpus));
  } catch {
    return 0;
  }
}

function badState(vm: Vm, op: string): EffectorError {
  return new EffectorError(ErrorCodes.VM_BAD_STATE, `cannot ${op} VM ${vm.spec.name}: it is ${vm.incoming ? 'an incoming migration' : vm.state}`, {
    details: { vm: vm.spec.name, state: vm.state, incoming: vm.incoming, op },
  });
}

function aborted(name: string): EffectorError {
  return new EffectorError(ErrorCodes.MIGRATION_ABORTED, `migration of VM ${name} aborted; the VM keeps running here`, { details: { vm: name } });
}

function isPersisted(state: unknown): state is QemuPersistedState {
  return typeof state === 'object' && state !== null && (state as { version?: unknown }).version === 1 && Array.isArray((state as { vms?: unknown }).vms);
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/**
 * How many times slower than on an idle host a CPU-bound job runs now: the 1-minute load average
 * over the cores, at least 1. Coarse (a minute's average, and it counts our own QEMU threads), but
 * it follows what moves a TCG migration's time most on a shared host: the CPU it gets.
 */
export function hostLoadFactor(): number {
  return Math.max(1, loadavg()[0]! / availableParallelism());
}

function readModelFile(file: string): Map<number, readonly StreamCalibration[]> {
  const out = new Map<number, readonly StreamCalibration[]>();
  let parsed: unknown;
  try {
    parsed = JSON.parse(readFileSync(file, 'utf8'));
  } catch {
    return out; // none yet, or unreadable: uncalibrated
  }
  const by = typeof parsed === 'object' && parsed !== null ? (parsed as { byChannels?: unknown }).byChannels : undefined;
  if (typeof by !== 'object' || by === null) return out;
  const num = (v: unknown): v is number => typeof v === 'number' && Number.isFinite(v) && v >= 0;
  for (const [k, list] of Object.entries(by)) {
    const channels = Number(k);
    if (!Number.isInteger(channels) || channels < 1 || !Array.isArray(list)) continue;
    const kept: StreamCalibration[] = [];
    for (const v of list as unknown[]) {
      const c = (typeof v === 'object' && v !== null ? v : {}) as Partial<Record<keyof StreamCalibration, unknown>>;
      // A sample that does not read back whole is dropped, not guessed at: the estimate only loses precision.
      if (num(c.copyRateBytesPerSec) && c.copyRateBytesPerSec > 0 && num(c.fixedMs) && num(c.sentBytes) && num(c.sendMs) && typeof c.vm === 'string' && num(c.at)) {
        kept.push({
          copyRateBytesPerSec: c.copyRateBytesPerSec,
          fixedMs: c.fixedMs,
          sentBytes: c.sentBytes,
          zeroBytes: num(c.zeroBytes) ? c.zeroBytes : 0,
          sendMs: c.sendMs,
          vm: c.vm,
          at: c.at,
          ...(num(c.loadFactor) && c.loadFactor >= 1 ? { loadFactor: c.loadFactor } : {}),
        });
      }
    }
    if (kept.length > 0) out.set(channels, kept.slice(-CALIBRATION_SAMPLES));
  }
  return out;
}
