import { createHash } from 'node:crypto';
import { EventEmitter } from 'eventemitter3';
import { EffectorError, ErrorCodes } from '../../../core/errors.ts';
import { prng } from '../../../core/prng.ts';
import type {
  HypervisorCapabilities,
  HypervisorDriver,
  HypervisorEvents,
  MigrateOutOptions,
  MigrateOutResult,
  MigrationEndpoint,
  VmInfo,
  VmStats,
} from '../hypervisor-contract.ts';
import { PageReceiver } from './dataplane/page-receiver.ts';
import { preCopy, THROTTLE_MAX, THROTTLE_STEP, type PreCopyVm } from './dataplane/precopy-sender.ts';
import { SimFanOutSession } from './sim-fan-out.ts';
import { DEFAULT_POOL_BYTES, MemoryPool, type MemoryPoolCounts } from './memory-pool.ts';

/** The states a sim VM can be in (it never pauses, and forgets a migrated VM at once). */
export type SimVmState = 'created' | 'running' | 'stopped' | 'crashed';

/** The machine shape of a sim VM. */
export interface VmSpec {
  readonly name: string;
  /** Memory in bytes. */
  readonly memory: number;
  /** Bytes of memory dirtied per second while running. */
  readonly dirtyRate: number;
  readonly vcpus: number;
  /** Port of the VM's UDP service (the udpService capability), if it runs one. */
  readonly udpPort?: number;
}

/** {@link VmInfo} with the sim's spec fields (what `vm list` shows). */
export interface SimVmInfo extends VmInfo {
  readonly state: SimVmState;
  readonly dirtyRate: number;
  readonly udpPort?: number;
}

type VmState = SimVmState;

const VM_NAME = /^[a-z0-9][a-z0-9-]{0,62}$/;
const MiB = 1024 * 1024;

/** Built-in spec defaults: small enough that a laptop runs a few dozen sim VMs. */
export const SIM_DEFAULT_SPEC: Readonly<Omit<VmSpec, 'name'>> = Object.freeze({
  memory: 64 * MiB,
  dirtyRate: 4 * MiB,
  vcpus: 1,
});

export interface SimDriverOptions {
  /** Bytes per page (default 4096). */
  readonly pageSize?: number;
  /** Overrides of {@link SIM_DEFAULT_SPEC} for VMs created without those fields. */
  readonly defaults?: Partial<Omit<VmSpec, 'name'>>;
  /** Clock in ms (default `Date.now`); the dirtying timer measures elapsed time with it. */
  readonly now?: () => number;
  /** Source of randomness in [0, 1) for picking pages (default `Math.random`). */
  readonly random?: () => number;
  /** Period of the dirtying timer in ms (default 50). */
  readonly tickMs?: number;
  /** Largest memory a VM may ask for, in bytes (default 1 GiB): the pages live in this process. */
  readonly maxMemory?: number;
  /** Memory of removed or discarded VMs kept for the next VM of its size, in bytes (default 64 MiB; 0: none). See memory-pool.ts. */
  readonly memoryPoolBytes?: number;
  /**
   * What a created VM's memory holds before its guest writes: `zero` (default; a fresh guest) or
   * `random` (a guest that has used all its RAM, so a migration has every page to send in full).
   */
  readonly startMemory?: 'zero' | 'random';
}

/** {@link VmStats} plus sim-only counters. */
export interface SimVmStats extends VmStats {
  readonly state: SimVmState;
  readonly dirtyRate: number;
  /** Pages dirtied since the last takeDirty. */
  readonly dirtyPages: number;
  /** Page writes done by the dirtying timer since the VM was created (repeats included). */
  readonly pagesWritten: number;
  readonly pageCount: number;
}

/** A live view on a sim VM's memory, for the migration data plane. */
export interface SimPages {
  readonly pageSize: number;
  readonly pageCount: number;
  /** The whole memory; writes through it are the VM's memory. */
  readonly memory: Uint8Array;
  /** Page `index` as a view (the last page may be shorter than `pageSize`). */
  page(index: number): Uint8Array;
}

/** What {@link SimDriver.getPersistedState} returns: plain data, msgpackr/JSON encodable. */
export interface SimPersistedState {
  readonly version: 1;
  readonly vms: readonly {
    readonly spec: VmSpec;
    readonly state: VmState;
    readonly crashes: number;
    readonly load: number;
  }[];
}

interface SimVm {
  spec: VmSpec;
  state: VmState;
  crashes: number;
  load: number;
  startedAt: number | undefined;
  memory: Uint8Array | undefined;
  /** One bit per page. */
  dirty: Uint8Array | undefined;
  dirtyCount: number;
  pagesWritten: number;
  timer: ReturnType<typeof setInterval> | undefined;
  lastTick: number;
  /** Bytes owed to the next tick, so low rates still dirty pages over time. */
  carry: number;
  /** Pre-copies reading this VM's memory now: a removed VM's memory is reused only once none is left. */
  readers: number;
  removed: boolean;
}

const STATES: readonly VmState[] = ['created', 'running', 'stopped', 'crashed'];

/**
 * The embedded hypervisor: a VM is an array of memory pages in the agent, dirtied at a
 * configurable rate while running, so migrations move real bytes.
 *
 * @example
 * ```ts
 * const driver = new SimDriver({ defaults: { memory: 16 * 1024 * 1024 } });
 * driver.events.on('vm-state', (e) => console.log(e.name, e.from, '→', e.to));
 * driver.create({ name: 'web-1', dirtyRate: 1_000_000 });
 * driver.start('web-1');
 * setTimeout(() => console.log(driver.takeDirty('web-1').length, 'pages dirtied'), 1000);
 * ```
 */
export class SimDriver implements HypervisorDriver<Partial<VmSpec> & { readonly name: string }> {
  readonly name = 'sim';
  readonly events = new EventEmitter<HypervisorEvents>();
  readonly pageSize: number;
  readonly capabilities: HypervisorCapabilities;

  private readonly vms = new Map<string, SimVm>();
  /** VMs a migration is bringing here: their pages land in a receiver until the commit. */
  private readonly incoming = new Map<string, { readonly spec: VmSpec; readonly receiver: PageReceiver }>();
  private readonly defaults: Omit<VmSpec, 'name'>;
  private readonly now: () => number;
  private readonly random: () => number;
  private readonly tickMs: number;
  private readonly maxMemory: number;
  private readonly memoryPool: MemoryPool;
  private readonly startMemory: 'zero' | 'random';

  constructor(options: SimDriverOptions = {}) {
    this.pageSize = positiveInt(options.pageSize ?? 4096, 'pageSize');
    this.tickMs = positiveInt(options.tickMs ?? 50, 'tickMs');
    this.maxMemory = positiveInt(options.maxMemory ?? 1024 * MiB, 'maxMemory');
    const poolBytes = options.memoryPoolBytes ?? DEFAULT_POOL_BYTES;
    if (!Number.isInteger(poolBytes) || poolBytes < 0) throw new EffectorError(ErrorCodes.VM_SPEC_INVALID, `SimDriver option memoryPoolBytes must be a non-negative integer, got ${String(poolBytes)}`);
    this.memoryPool = new MemoryPool({ maxFreeBytes: poolBytes, maxBufferBytes: poolBytes });
    if (options.startMemory !== undefined && options.startMemory !== 'zero' && options.startMemory !== 'random') {
      throw new EffectorError(ErrorCodes.VM_SPEC_INVALID, `SimDriver option startMemory must be 'zero' or 'random', got ${String(options.startMemory)}`);
    }
    this.startMemory = options.startMemory ?? 'zero';
    this.now = options.now ?? Date.now;
    this.random = options.random ?? Math.random;
    this.defaults = { ...SIM_DEFAULT_SPEC, ...options.defaults };
    this.validateSpec({ name: 'defaults', ...this.defaults });
    this.capabilities = {
      coldMigration: { from: ['created', 'paused', 'stopped', 'crashed'] },
      faults: { crash: async (vm) => this.crash(vm) },
      loadKnob: { setLoad: async (vm, load) => this.setLoad(vm, load) },
      memoryChecksum: { checksum: async (vm) => createHash('sha256').update(this.pages(vm).memory).digest('hex') },
      udpService: { udpPort: (vm) => this.vms.get(vm)?.spec.udpPort },
      fanOut: { begin: (vm, destinations) => new SimFanOutSession(this, vm, destinations), prewarm: true },
      incomingPages: {
        apply: (vm, batch) => {
          const inc = this.incoming.get(vm);
          return inc ? inc.receiver.apply(batch) : { ok: false, reason: `no incoming VM ${vm} on this agent` };
        },
        complete: (vm) => this.incoming.get(vm)?.receiver.finalReceived ?? false,
      },
    };
  }

  list(): readonly SimVmInfo[] {
    return [...this.vms.values()].map(toInfo);
  }

  get(name: string): SimVmInfo | undefined {
    const vm = this.vms.get(name);
    return vm ? toInfo(vm) : undefined;
  }

  spec(name: string): VmSpec | undefined {
    const vm = this.vms.get(name);
    return vm ? { ...vm.spec } : undefined;
  }

  async create(spec: Partial<VmSpec> & { readonly name: string }): Promise<SimVmInfo> {
    return this.createNow(spec);
  }

  private createNow(spec: Partial<VmSpec> & { readonly name: string }): SimVmInfo {
    if (!isRecord(spec)) throw new EffectorError(ErrorCodes.VM_SPEC_INVALID, 'a VM spec must be an object with a name');
    const full = this.validateSpec({ ...this.defaults, ...stripUndefined(spec) });
    if (this.vms.has(full.name) || this.incoming.has(full.name)) throw new EffectorError(ErrorCodes.VM_EXISTS, `VM ${full.name} already exists`, { details: { vm: full.name } });
    const vm = newVm(full, 'created', 0, 0);
    this.vms.set(full.name, vm);
    this.emitState(full.name, null, 'created', 'create');
    return toInfo(vm);
  }

  async start(name: string): Promise<SimVmInfo> {
    return toInfo(this.transition(name, ['created', 'stopped', 'crashed'], 'running', 'start'));
  }

  async stop(name: string): Promise<SimVmInfo> {
    return toInfo(this.transition(name, ['running'], 'stopped', 'stop'));
  }

  /** A sim VM has no process: killing it is stopping it at once. */
  async kill(name: string): Promise<SimVmInfo> {
    return toInfo(this.transition(name, ['running'], 'stopped', 'kill'));
  }

  /** A simulated fault: the VM reads `crashed` (the `faults` capability). */
  crash(name: string): SimVmInfo {
    return toInfo(this.transition(name, ['running'], 'crashed', 'crash'));
  }

  /**
   * Removes a VM that is not running (stop or crash it first). Done before the first await, so a
   * caller inside a store transaction has the removal (and the persisted state) in it.
   */
  async remove(name: string): Promise<void> {
    this.removeNow(name);
  }

  private removeNow(name: string): void {
    const vm = this.require(name);
    if (vm.state === 'running') {
      throw new EffectorError(ErrorCodes.VM_BAD_STATE, `VM ${name} is running; stop it before removing it`, {
        details: { vm: name, state: vm.state, op: 'remove' },
      });
    }
    this.vms.delete(name);
    vm.removed = true;
    this.releaseMemory(vm);
    this.events.emit('vm-removed', { name });
  }

  async stats(name: string): Promise<SimVmStats> {
    return this.counters(name);
  }

  /** {@link stats} without the promise: pre-copy reads these between batches. */
  counters(name: string): SimVmStats {
    const vm = this.require(name);
    return {
      name,
      state: vm.state,
      load: vm.state === 'running' ? vm.load : 0,
      memory: vm.spec.memory,
      dirtyRate: vm.spec.dirtyRate,
      dirtyPages: vm.dirtyCount,
      pageSize: this.pageSize,
      pageCount: this.pageCount(vm),
      pagesWritten: vm.pagesWritten,
    };
  }

  /** The VM's memory, allocated on first need (a migration target fills pages before starting). */
  pages(name: string): SimPages {
    const vm = this.require(name);
    const memory = this.memoryOf(vm);
    const { pageSize } = this;
    const pageCount = this.pageCount(vm);
    return {
      pageSize,
      pageCount,
      memory,
      page(index: number): Uint8Array {
        if (!Number.isInteger(index) || index < 0 || index >= pageCount) {
          throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `page ${index} out of range 0..${pageCount - 1}`, { details: { vm: name, index } });
        }
        return memory.subarray(index * pageSize, Math.min((index + 1) * pageSize, memory.length));
      },
    };
  }

  /**
   * Gives a created (not yet started) VM the memory a migration received, without copying it:
   * the switch at the target should not pay for a copy of the whole memory.
   */
  adoptMemory(name: string, memory: Uint8Array): void {
    const vm = this.require(name);
    if (vm.state !== 'created') throw new EffectorError(ErrorCodes.VM_BAD_STATE, `VM ${name} is ${vm.state}; memory can only be given to a created VM`, { details: { vm: name } });
    if (memory.byteLength !== vm.spec.memory) throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `VM ${name} has ${vm.spec.memory} bytes of memory, not ${memory.byteLength}`, { details: { vm: name } });
    vm.memory = memory;
  }

  /** Indexes of the pages dirtied since the last call, ascending; clears the dirty bitmap. */
  takeDirty(name: string): Uint32Array {
    const vm = this.require(name);
    const out = new Uint32Array(vm.dirtyCount);
    const bits = vm.dirty;
    if (!bits || vm.dirtyCount === 0) return out;
    let n = 0;
    for (let byte = 0; byte < bits.length; byte++) {
      const b = bits[byte];
      if (b === 0) continue;
      for (let bit = 0; bit < 8; bit++) if (b & (1 << bit)) out[n++] = byte * 8 + bit;
      bits[byte] = 0;
    }
    vm.dirtyCount = 0;
    return out;
  }

  setDirtyRate(name: string, rate: number): void {
    const vm = this.require(name);
    vm.spec = this.validateSpec({ ...vm.spec, dirtyRate: rate });
  }

  /** Sets the CPU load (0..1) the VM reports while running. */
  setLoad(name: string, load: number): void {
    const vm = this.require(name);
    if (typeof load !== 'number' || !Number.isFinite(load) || load < 0 || load > 1) {
      throw new EffectorError(ErrorCodes.VM_SPEC_INVALID, `load must be a number in 0..1, got ${String(load)}`, { details: { vm: name } });
    }
    vm.load = load;
  }

  getPersistedState(): SimPersistedState {
    return {
      version: 1,
      vms: [...this.vms.values()].map((vm) => ({ spec: { ...vm.spec }, state: vm.state, crashes: vm.crashes, load: vm.load })),
    };
  }

  /**
   * Replaces every VM with the persisted ones (pages start zeroed); VMs that were running are
   * running again. The whole state is validated before anything changes.
   */
  async restoreState(state: unknown): Promise<void> {
    const parsed = this.parsePersisted(state);
    this.haltAll();
    this.vms.clear();
    for (const p of parsed.vms) {
      const vm = newVm(p.spec, p.state, p.crashes, p.load);
      this.vms.set(p.spec.name, vm);
      if (vm.state === 'running') this.run(vm);
      this.emitState(p.spec.name, null, p.state, 'restore');
    }
  }

  /** Stops every dirtying timer; VMs keep their state (a closed driver can be restored or reused). */
  async close(): Promise<void> {
    this.haltAll();
    this.incoming.clear();
  }

  private haltAll(): void {
    for (const vm of this.vms.values()) this.halt(vm);
  }

  // ---- migration

  /**
   * Pre-copy over the agent's data paths (`options.dataPaths`): rounds of dirty pages until the
   * remainder fits the downtime limit, then `beforeSwitchover`, the VM stops and the rest follows.
   * On failure a VM this call stopped runs again before the rejection.
   */
  async migrateOut(name: string, options: MigrateOutOptions): Promise<MigrateOutResult> {
    dataPathsOf(name, options);
    this.require(name);
    let stoppedHere = false;
    try {
      return await this.runPreCopy(name, options, this, async () => {
        await options.beforeSwitchover?.();
        if (this.vms.get(name)?.state === 'running') {
          this.transition(name, ['running'], 'stopped', 'migrate');
          stoppedHere = true;
        }
      });
    } catch (e) {
      if (stoppedHere && this.vms.get(name)?.state === 'stopped') this.transition(name, ['stopped'], 'running', 'migration-aborted');
      throw e;
    }
  }

  /**
   * One pre-copy of VM `name` over `options.dataPaths`, reading its memory and dirty log through
   * `view` (the driver itself, or one destination's view of a fan-out), `stopVm` at the switch.
   */
  runPreCopy(name: string, options: MigrateOutOptions, view: PreCopyVm, stopVm: () => Promise<void>): Promise<MigrateOutResult> {
    const dp = dataPathsOf(name, options);
    const read = preCopy({
      migrationId: dp.migrationId,
      vm: name,
      driver: view,
      paths: dp.paths,
      ...(options.downtimeLimitMs === undefined ? {} : { downtimeLimitMs: options.downtimeLimitMs }),
      ...(dp.maxRounds === undefined ? {} : { maxRounds: dp.maxRounds }),
      ...(options.autoConverge === undefined ? {} : { autoConverge: options.autoConverge }),
      ...(dp.requestTimeoutMs === undefined ? {} : { requestTimeoutMs: dp.requestTimeoutMs }),
      ...(options.signal ? { signal: options.signal } : {}),
      ...(options.prewarm ? { hold: options.prewarm } : {}),
      stopVm,
      onProgress: (p) =>
        options.onProgress?.({
          phase: p.phase === 'done' ? 'completed' : p.phase,
          rounds: p.round + 1,
          // The memory brought up to date, zero pages included: what a progress bar of the VM's size shows.
          transferredBytes: p.sentBytes + p.zeroBytes,
          sentBytes: p.sentBytes,
          remainingBytes: p.remainingBytes,
          rateBytesPerSec: p.rateBytesPerSec,
          dirtyRateBytesPerSec: p.dirtyRateBytesPerSec,
          expectedDowntimeMs: p.expectedDowntimeMs,
          throttle: p.throttle,
          channels: dp.paths.length,
        }),
    }).then((r) => ({
      bytes: r.bytes,
      zeroBytes: r.zeroBytes,
      rounds: r.rounds,
      totalMs: r.totalMs,
      downtimeMs: r.downtimeMs,
      stopBytes: r.stopBytes,
      expectedDowntimeMs: r.expectedDowntimeMs,
      throttled: r.throttled,
      maxThrottle: Math.min(THROTTLE_MAX, r.throttleSteps * THROTTLE_STEP),
      channels: dp.paths.length,
      converged: r.converged,
      throttleSteps: r.throttleSteps,
      initialDirtyRate: r.initialDirtyRate,
      finalDirtyRate: r.finalDirtyRate,
      resent: r.resent,
      rateBytesPerSec: r.rateBytesPerSec,
      perPath: r.perPath,
    }));
    const vm = this.vms.get(name);
    if (!vm) return read;
    vm.readers++;
    return read.finally(() => {
      vm.readers--;
      this.releaseMemory(vm);
    });
  }

  /** Stops a running VM for the switch of a fan-out (sim-fan-out.ts); false when it was not running. */
  stopForSwitch(name: string): boolean {
    if (this.vms.get(name)?.state !== 'running') return false;
    this.transition(name, ['running'], 'stopped', 'migrate');
    return true;
  }

  /** The incoming VM is a page receiver (not listed) until the commit; its memory arrives through `capabilities.incomingPages`. */
  async prepareIncoming(input: Partial<VmSpec> & { readonly name: string }, _options?: { readonly channels?: number }): Promise<{ readonly endpoint: MigrationEndpoint }> {
    // `channels` is for a stream of the driver's own; the sim's pages come on whichever data paths the source opened.
    if (!isRecord(input)) throw new EffectorError(ErrorCodes.VM_SPEC_INVALID, 'a VM spec must be an object with a name');
    const spec = this.validateSpec({ ...this.defaults, ...stripUndefined(input) });
    if (this.vms.has(spec.name) || this.incoming.has(spec.name)) throw new EffectorError(ErrorCodes.VM_EXISTS, `VM ${spec.name} already exists here`, { details: { vm: spec.name } });
    this.incoming.set(spec.name, { spec, receiver: new PageReceiver({ memoryBytes: spec.memory, pageSize: this.pageSize, memory: this.memoryPool.take(spec.memory), memoryIsZero: true }) });
    return { endpoint: { uri: 'sim:data-paths' } };
  }

  /**
   * Makes the incoming VM a VM, with the received memory (not copied), started when it ran at the
   * source. All of it happens before this returns: called inside a store transaction, the VM and
   * its persisted state are in that transaction, and a refusal throws there and rolls it back.
   */
  commitIncoming(name: string, options: { readonly timeoutMs?: number; readonly running?: boolean } = {}): Promise<VmInfo> {
    const inc = this.incoming.get(name);
    if (!inc) throw new EffectorError(ErrorCodes.VM_UNKNOWN, `no incoming VM named ${name}`, { details: { vm: name } });
    if (!inc.receiver.finalReceived) throw new EffectorError(ErrorCodes.MIGRATION_FAILED, `incoming VM ${name}: its final page batch has not arrived`, { details: { vm: name } });
    this.incoming.delete(name);
    this.createNow(inc.spec);
    this.adoptMemory(name, inc.receiver.memory);
    const info = options.running ? toInfo(this.transition(name, ['created'], 'running', 'start')) : toInfo(this.require(name));
    return Promise.resolve(info);
  }

  async abortIncoming(name: string): Promise<void> {
    const inc = this.incoming.get(name);
    this.incoming.delete(name);
    // Its pages are only reachable through `incoming` (incomingPages.apply looks it up by name).
    if (inc) this.memoryPool.give(inc.receiver.memory);
  }

  /** Reuse of memory let go of (memory-pool.ts), for tests and benches. */
  get memoryPoolCounts(): Readonly<MemoryPoolCounts> & { readonly freeBytes: number } {
    return { ...this.memoryPool.counts, freeBytes: this.memoryPool.bytes };
  }

  /** A removed VM's memory goes to the pool once no pre-copy reads it (a fan-out's loser may still be copying). */
  private releaseMemory(vm: SimVm): void {
    if (!vm.removed || vm.readers > 0 || !vm.memory) return;
    this.memoryPool.give(vm.memory);
    vm.memory = undefined;
  }

  private transition(name: string, from: readonly VmState[], to: VmState, reason: string): SimVm {
    const vm = this.require(name);
    const prev = vm.state;
    if (!from.includes(prev)) {
      throw new EffectorError(ErrorCodes.VM_BAD_STATE, `cannot ${reason} VM ${name}: it is ${prev} (needs ${from.join(' or ')})`, {
        details: { vm: name, state: prev, op: reason },
      });
    }
    vm.state = to;
    if (to === 'running') this.run(vm);
    else this.halt(vm);
    if (to === 'crashed') vm.crashes++;
    this.emitState(name, prev, to, reason);
    return vm;
  }

  private run(vm: SimVm): void {
    this.memoryOf(vm);
    vm.startedAt = this.now();
    vm.lastTick = vm.startedAt;
    vm.carry = 0;
    vm.timer = setInterval(() => this.dirtyPages(vm), this.tickMs);
    // The agent's servers keep the process alive; a sim VM must not.
    vm.timer.unref?.();
  }

  private halt(vm: SimVm): void {
    if (vm.timer !== undefined) clearInterval(vm.timer);
    vm.timer = undefined;
    vm.startedAt = undefined;
  }

  private dirtyPages(vm: SimVm): void {
    const memory = vm.memory;
    const bits = vm.dirty;
    if (!memory || !bits) return;
    const t = this.now();
    const bytes = vm.carry + (vm.spec.dirtyRate * Math.max(0, t - vm.lastTick)) / 1000;
    vm.lastTick = t;
    const pageCount = this.pageCount(vm);
    let writes = Math.floor(bytes / this.pageSize);
    vm.carry = bytes - writes * this.pageSize;
    if (writes >= pageCount) {
      // A rate above the memory size per tick dirties everything; don't loop past that.
      writes = pageCount;
      vm.carry = 0;
    }
    for (let i = 0; i < writes; i++) {
      const page = Math.min(pageCount - 1, Math.floor(this.random() * pageCount));
      const base = page * this.pageSize;
      const len = Math.min(this.pageSize, memory.length - base);
      memory[base + Math.floor(this.random() * len)] = (Math.floor(this.random() * 256) & 0xff) | 1;
      const mask = 1 << (page & 7);
      if ((bits[page >> 3] & mask) === 0) {
        bits[page >> 3] |= mask;
        vm.dirtyCount++;
      }
    }
    vm.pagesWritten += writes;
  }

  private memoryOf(vm: SimVm): Uint8Array {
    if (!vm.memory) {
      vm.memory = this.memoryPool.take(vm.spec.memory);
      if (this.startMemory === 'random') fillPseudoRandom(vm.memory, this.random());
      vm.dirty = new Uint8Array(Math.ceil(this.pageCount(vm) / 8));
    }
    return vm.memory;
  }

  private pageCount(vm: SimVm): number {
    return Math.ceil(vm.spec.memory / this.pageSize);
  }

  private require(name: string): SimVm {
    if (typeof name === 'string' && this.incoming.has(name) && !this.vms.has(name)) {
      throw new EffectorError(ErrorCodes.VM_BAD_STATE, `VM ${name} is still arriving in a migration`, { details: { vm: name, state: 'incoming' } });
    }
    const vm = typeof name === 'string' ? this.vms.get(name) : undefined;
    if (!vm) throw new EffectorError(ErrorCodes.VM_UNKNOWN, `no VM named ${String(name)}`, { details: { vm: String(name) } });
    return vm;
  }

  private emitState(name: string, from: VmState | null, to: VmState, reason: string): void {
    this.events.emit('vm-state', { name, from, to, reason });
  }

  private validateSpec(spec: Record<string, unknown>): VmSpec {
    const bad = (why: string): never => {
      throw new EffectorError(ErrorCodes.VM_SPEC_INVALID, `invalid VM spec for ${String(spec.name)}: ${why}`, { details: { vm: String(spec.name) } });
    };
    const { name, memory, dirtyRate, vcpus, udpPort } = spec;
    if (typeof name !== 'string' || !VM_NAME.test(name)) bad(`name must match ${VM_NAME.source}`);
    if (typeof memory !== 'number' || !Number.isInteger(memory) || memory <= 0) bad('memory must be a positive integer of bytes');
    if ((memory as number) > this.maxMemory) bad(`memory ${String(memory)} exceeds the sim limit of ${this.maxMemory} bytes`);
    if (typeof dirtyRate !== 'number' || !Number.isFinite(dirtyRate) || dirtyRate < 0) bad('dirtyRate must be a finite number ≥ 0 (bytes/s)');
    if (typeof vcpus !== 'number' || !Number.isInteger(vcpus) || vcpus < 1 || vcpus > 1024) bad('vcpus must be an integer in 1..1024');
    if (udpPort !== undefined && (typeof udpPort !== 'number' || !Number.isInteger(udpPort) || udpPort < 1 || udpPort > 65535)) {
      bad('udpPort must be an integer in 1..65535');
    }
    const out: VmSpec = { name: name as string, memory: memory as number, dirtyRate: dirtyRate as number, vcpus: vcpus as number };
    return udpPort === undefined ? out : { ...out, udpPort: udpPort as number };
  }

  private parsePersisted(state: unknown): SimPersistedState {
    const bad = (why: string): never => {
      throw new EffectorError(ErrorCodes.VM_SPEC_INVALID, `persisted sim driver state is invalid: ${why}`);
    };
    if (!isRecord(state) || state.version !== 1 || !Array.isArray(state.vms)) return bad('expected { version: 1, vms: [...] }');
    const seen = new Set<string>();
    const vms = state.vms.map((v: unknown, i: number) => {
      if (!isRecord(v) || !isRecord(v.spec)) return bad(`vms[${i}] is not { spec, state, crashes, load }`);
      const spec = this.validateSpec(v.spec);
      if (seen.has(spec.name)) bad(`VM ${spec.name} appears twice`);
      seen.add(spec.name);
      if (!STATES.includes(v.state as VmState)) bad(`vms[${i}].state ${String(v.state)} is not a VM state`);
      const crashes = v.crashes ?? 0;
      if (typeof crashes !== 'number' || !Number.isInteger(crashes) || crashes < 0) bad(`vms[${i}].crashes must be an integer ≥ 0`);
      const load = v.load ?? 0;
      if (typeof load !== 'number' || !(load >= 0 && load <= 1)) bad(`vms[${i}].load must be in 0..1`);
      return { spec, state: v.state as VmState, crashes: crashes as number, load: load as number };
    });
    return { version: 1, vms };
  }
}

function newVm(spec: VmSpec, state: VmState, crashes: number, load: number): SimVm {
  return {
    spec,
    state,
    crashes,
    load,
    startedAt: undefined,
    memory: undefined,
    dirty: undefined,
    dirtyCount: 0,
    pagesWritten: 0,
    timer: undefined,
    lastTick: 0,
    carry: 0,
    readers: 0,
    removed: false,
  };
}

function toInfo(vm: SimVm): SimVmInfo {
  const info: SimVmInfo = { ...vm.spec, state: vm.state, crashes: vm.crashes };
  return vm.startedAt === undefined ? info : { ...info, startedAt: vm.startedAt };
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function stripUndefined<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}

function positiveInt(v: number, what: string): number {
  if (!Number.isInteger(v) || v <= 0) throw new EffectorError(ErrorCodes.VM_SPEC_INVALID, `SimDriver option ${what} must be a positive integer, got ${String(v)}`);
  return v;
}

function dataPathsOf(name: string, options: MigrateOutOptions): NonNullable<MigrateOutOptions['dataPaths']> {
  const dp = options.dataPaths;
  if (!dp || dp.paths.length === 0) {
    throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `the sim driver migrates VM ${name} over the agent's data paths: options.dataPaths is required`, { details: { vm: name } });
  }
  return dp;
}

/**
 * Fills `memory` with non-zero pseudo-random words (core/prng.ts): a used guest's RAM (crypto-grade
 * bytes cost several times as much and nothing here needs them). `seed` in [0, 1): the driver's own
 * source of randomness, so a seeded driver fills alike.
 */
function fillPseudoRandom(memory: Uint8Array, seed: number): void {
  const words = new Uint32Array(memory.buffer, memory.byteOffset, Math.floor(memory.byteLength / 4));
  const next = prng(Math.floor(seed * 0x100000000));
  for (let i = 0; i < words.length; i++) words[i] = (next() * 0x100000000) >>> 0 || 1;
  for (let i = words.length * 4; i < memory.byteLength; i++) memory[i] = 1;
}
