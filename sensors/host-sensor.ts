import os from 'node:os';
import { ErrorCodes, EventError } from '../core/errors.ts';
import type { SensorContext, SensorLogic } from './sensor.ts';

export interface VmLoad {
  readonly name: string;
  /** 0..1 CPU load of the VM (1 = one host CPU busy). */
  readonly load: number;
}

export interface HostSensorOptions {
  /** Agent name: the element is `host:<agent>`. */
  readonly agent: string;
  /** Period of `HOST_LOAD` readings (default 1000 ms). */
  readonly intervalMs?: number;
  /** `os`: 1-minute load average / CPUs; `sim`: sum of running VM loads / host CPUs (default `os`). */
  readonly source?: 'os' | 'sim';
  /** CPUs of the host (default: the real machine's). */
  readonly hostCpus?: number;
  /** Loads of the running VMs (driver stats are async); required for `sim`, fills `topVms` in both modes. */
  readonly vmLoads?: () => readonly VmLoad[] | Promise<readonly VmLoad[]>;
  /** How many VMs `topVms` lists, busiest first (default 3). */
  readonly topVms?: number;
}

export interface HostLoadPayload {
  /** 0..1, above 1 when overloaded. */
  readonly load: number;
  readonly memFree: number;
  readonly memTotal: number;
  readonly cpus: number;
  readonly topVms: readonly VmLoad[];
}

/**
 * Posts `HOST_LOAD` for element `host:<agent>` at start and every `intervalMs`.
 *
 * @example
 * ```ts
 * sensors.addSensor(new HostSensor({ agent: 'a', intervalMs: 1000, source: 'sim', hostCpus: 4,
 *   vmLoads: async () => Promise.all(driver.list().filter((v) => v.state === 'running').map(async (v) => ({ name: v.name, load: (await driver.stats(v.name)).load }))) }));
 * ```
 */
export class HostSensor implements SensorLogic {
  readonly name = 'host';
  readonly elementId: string;
  private readonly intervalMs: number;
  private readonly source: 'os' | 'sim';
  private readonly hostCpus: number;
  private readonly vmLoads: (() => readonly VmLoad[] | Promise<readonly VmLoad[]>) | undefined;
  /** A reading in progress: a slow driver must not pile readings up. */
  private reading = false;
  private readonly topCount: number;
  private timer: ReturnType<typeof setInterval> | undefined;
  private lastLoad: number | undefined;

  constructor(options: HostSensorOptions) {
    const bad = (why: string): never => {
      throw new EventError(ErrorCodes.SENSOR_INVALID, `HostSensor: ${why}`);
    };
    if (typeof options?.agent !== 'string' || options.agent.length === 0) bad('agent must be a non-empty string');
    this.elementId = `host:${options.agent}`;
    this.intervalMs = options.intervalMs ?? 1000;
    if (!Number.isFinite(this.intervalMs) || this.intervalMs < 1) bad(`intervalMs must be >= 1, got ${options.intervalMs}`);
    this.source = options.source ?? 'os';
    if (this.source !== 'os' && this.source !== 'sim') bad(`source must be 'os' or 'sim', got ${String(options.source)}`);
    this.hostCpus = options.hostCpus ?? (os.availableParallelism?.() ?? os.cpus().length);
    if (!Number.isFinite(this.hostCpus) || this.hostCpus <= 0) bad(`hostCpus must be > 0, got ${options.hostCpus}`);
    this.vmLoads = options.vmLoads;
    if (this.source === 'sim' && typeof this.vmLoads !== 'function') bad("source 'sim' needs a vmLoads function");
    this.topCount = options.topVms ?? 3;
  }

  start(ctx: SensorContext): void {
    this.stop();
    this.ctx = ctx;
    const tick = (): void => {
      if (this.reading) return;
      let vms: readonly VmLoad[] | Promise<readonly VmLoad[]>;
      try {
        vms = this.vmLoads ? this.vmLoads() : [];
      } catch {
        return; // the next tick tries again
      }
      if (!(vms instanceof Promise)) {
        ctx.emit({ elementId: this.elementId, type: 'HOST_LOAD', payload: this.payloadOf(vms) });
        return;
      }
      // Driver stats are async: one reading at a time, and none after stop() or a restart.
      this.reading = true;
      vms
        .then((v) => {
          if (this.ctx === ctx) ctx.emit({ elementId: this.elementId, type: 'HOST_LOAD', payload: this.payloadOf(v) });
        })
        .catch(() => undefined)
        .finally(() => {
          this.reading = false;
        });
    };
    tick();
    this.timer = setInterval(tick, this.intervalMs);
    this.timer.unref?.();
  }

  stop(): void {
    if (this.timer !== undefined) clearInterval(this.timer);
    this.timer = undefined;
    this.ctx = undefined;
  }

  private ctx: SensorContext | undefined;

  /** One reading; undefined when the VM load callback failed (the next tick tries again). */
  async read(): Promise<HostLoadPayload | undefined> {
    try {
      return this.payloadOf(this.vmLoads ? await this.vmLoads() : []);
    } catch {
      return undefined;
    }
  }

  private payloadOf(all: readonly VmLoad[]): HostLoadPayload {
    const vms = all.filter((v) => typeof v?.name === 'string' && Number.isFinite(v.load));
    let load: number;
    if (this.source === 'sim') {
      let sum = 0;
      for (const v of vms) sum += v.load;
      load = sum / this.hostCpus;
    } else {
      load = os.loadavg()[0]! / this.hostCpus;
    }
    this.lastLoad = load;
    const topVms = [...vms].sort((a, b) => b.load - a.load).slice(0, this.topCount).map((v) => ({ name: v.name, load: v.load }));
    return { load, memFree: os.freemem(), memTotal: os.totalmem(), cpus: this.hostCpus, topVms };
  }

  getPersistedState(): unknown {
    return this.lastLoad === undefined ? undefined : { lastLoad: this.lastLoad };
  }

  restoreState(state: unknown): void {
    const last = (state as { lastLoad?: unknown } | null)?.lastLoad;
    if (typeof last === 'number' && Number.isFinite(last)) this.lastLoad = last;
  }

  /** The most recent load reading (restored across restarts). */
  get load(): number | undefined {
    return this.lastLoad;
  }
}
