import { ErrorCodes, EventError } from '../core/errors.ts';
import type { HypervisorDriver, VmState, VmStateChange } from '../effectors/index.ts';
import type { SensorContext, SensorLogic } from './sensor.ts';

export interface VmSensorOptions {
  readonly driver: HypervisorDriver;
  /** Period of `VM_LOAD` readings for running VMs (default 1000 ms). */
  readonly intervalMs?: number;
}

export interface VmStatePayload {
  readonly name: string;
  readonly from: VmState | null;
  readonly to: VmState;
  readonly reason: string;
}

export interface VmLoadPayload {
  readonly name: string;
  readonly load: number;
}

const EVENT_OF: Readonly<Record<VmState, string>> = {
  created: 'VM_CREATED',
  running: 'VM_STARTED',
  stopped: 'VM_STOPPED',
  crashed: 'VM_CRASHED',
  paused: 'VM_PAUSED',
  migrated: 'VM_MIGRATED',
};

/**
 * Turns a hypervisor driver's state changes into `VM_CREATED` / `VM_STARTED` / `VM_STOPPED` /
 * `VM_CRASHED` (and `VM_REMOVED`) for element `vm:<name>`, and posts `VM_LOAD` for running VMs
 * every `intervalMs`. It persists the last state it saw of every VM, so a change that happened
 * while the agent was down is reported at start (reason `observed-at-start`).
 *
 * @example
 * ```ts
 * sensors.addSensor(new VmSensor({ driver, intervalMs: 1000 }));
 * sensors.startSensors();
 * ```
 */
export class VmSensor implements SensorLogic {
  readonly name = 'vm';
  private readonly driver: HypervisorDriver;
  private readonly intervalMs: number;
  private ctx: SensorContext | undefined;
  private timer: ReturnType<typeof setInterval> | undefined;
  /** Last state seen per VM (bounded by the VMs of this host). */
  private readonly known = new Map<string, VmState>();

  constructor(options: VmSensorOptions) {
    if (options?.driver === undefined || typeof options.driver.list !== 'function' || typeof options.driver.events?.on !== 'function') {
      throw new EventError(ErrorCodes.SENSOR_INVALID, 'VmSensor: driver must be a HypervisorDriver');
    }
    this.driver = options.driver;
    this.intervalMs = options.intervalMs ?? 1000;
    if (!Number.isFinite(this.intervalMs) || this.intervalMs < 1) throw new EventError(ErrorCodes.SENSOR_INVALID, `VmSensor: intervalMs must be >= 1, got ${options.intervalMs}`);
  }

  start(ctx: SensorContext): void {
    this.stop();
    this.ctx = ctx;
    this.driver.events.on('vm-state', this.onState);
    this.driver.events.on('vm-removed', this.onRemoved);
    for (const vm of this.driver.list()) {
      const before = this.known.get(vm.name);
      if (before !== undefined && before !== vm.state) this.onState({ name: vm.name, from: before, to: vm.state, reason: 'observed-at-start' });
      this.known.set(vm.name, vm.state);
    }
    this.timer = setInterval(this.sample, this.intervalMs);
    this.timer.unref?.();
  }

  stop(): void {
    this.driver.events.off('vm-state', this.onState);
    this.driver.events.off('vm-removed', this.onRemoved);
    if (this.timer !== undefined) clearInterval(this.timer);
    this.timer = undefined;
    this.ctx = undefined;
  }

  getPersistedState(): unknown {
    return { vms: Object.fromEntries(this.known) };
  }

  restoreState(state: unknown): void {
    const vms = (state as { vms?: unknown } | null)?.vms;
    if (vms === null || typeof vms !== 'object') return;
    for (const [name, s] of Object.entries(vms as Record<string, unknown>)) {
      if (typeof s === 'string' && s in EVENT_OF) this.known.set(name, s as VmState);
    }
  }

  private readonly onState = (e: VmStateChange): void => {
    this.known.set(e.name, e.to);
    const payload: VmStatePayload = { name: e.name, from: e.from, to: e.to, reason: e.reason };
    this.ctx?.emit({ elementId: `vm:${e.name}`, type: EVENT_OF[e.to], payload });
  };

  private readonly onRemoved = (e: { readonly name: string }): void => {
    this.known.delete(e.name);
    this.ctx?.emit({ elementId: `vm:${e.name}`, type: 'VM_REMOVED', payload: { name: e.name } });
  };

  /** The previous sample still running (stats are async: a slow driver must not pile them up). */
  private sampling = false;

  private readonly sample = (): void => {
    if (this.ctx === undefined || this.sampling) return;
    this.sampling = true;
    void this.sampleOnce()
      // A reading that fails is skipped; the next tick tries again.
      .catch(() => undefined)
      .finally(() => {
        this.sampling = false;
      });
  };

  private async sampleOnce(): Promise<void> {
    const running = this.driver.list().filter((vm) => vm.state === 'running');
    const loads = await Promise.all(
      running.map((vm) =>
        this.driver.stats(vm.name).then(
          (s) => s.load,
          // Removed (or its process gone) between list() and stats(): its state event tells.
          () => undefined,
        ),
      ),
    );
    const ctx = this.ctx;
    if (ctx === undefined) return;
    running.forEach((vm, i) => {
      const load = loads[i];
      if (load === undefined) return;
      const payload: VmLoadPayload = { name: vm.name, load };
      ctx.emit({ elementId: `vm:${vm.name}`, type: 'VM_LOAD', payload });
    });
  }
}
