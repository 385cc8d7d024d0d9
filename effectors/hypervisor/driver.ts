import type { EventEmitter } from 'eventemitter3';

export type VmState = 'created' | 'running' | 'stopped' | 'crashed';

export interface VmSpec {
  readonly name: string;
  /** Memory in bytes. */
  readonly memory: number;
  /** Bytes of memory dirtied per second while running. */
  readonly dirtyRate: number;
  readonly vcpus: number;
  readonly udpPort?: number;
}

export interface VmInfo extends VmSpec {
  readonly state: VmState;
  readonly startedAt?: number;
  readonly crashes: number;
}

export interface VmStats {
  readonly name: string;
  readonly state: VmState;
  /** 0..1 CPU load of the VM. */
  readonly load: number;
  readonly memory: number;
  readonly dirtyRate: number;
  readonly dirtyPages: number;
  readonly pageSize: number;
}

export interface DriverEvents {
  /** A VM changed state, whoever caused it. */
  'vm-state': (e: { readonly name: string; readonly from: VmState | null; readonly to: VmState; readonly reason: string }) => void;
  'vm-removed': (e: { readonly name: string }) => void;
}

/**
 * A hypervisor driver (`sim`, later `qemu`). Persistence hooks follow xstate's ActorLogic
 * naming: the agent stores `getPersistedState()` and hands it back to `restoreState()`.
 */
export interface HypervisorDriver {
  readonly name: string;
  readonly events: EventEmitter<DriverEvents>;
  list(): readonly VmInfo[];
  get(name: string): VmInfo | undefined;
  create(spec: Partial<VmSpec> & { readonly name: string }): VmInfo;
  start(name: string): VmInfo;
  stop(name: string): VmInfo;
  /** Simulated fault (sim) or kill -9 of the VM process (qemu). */
  crash(name: string): VmInfo;
  remove(name: string): void;
  stats(name: string): VmStats;
  getPersistedState(): unknown;
  restoreState(state: unknown): void;
  close(): void;
}
