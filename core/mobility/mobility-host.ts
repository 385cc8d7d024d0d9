import type { MigrationImageBuild } from './migration-record.ts';
import type { Store } from '../store/store.ts';
import type { Logger } from '../logger.ts';
import type { ManagedObjectService } from '../objects/object-service.ts';
import type { ManagedElement } from '../objects/managed-element.ts';
import type { SensorService, VmUdpServices } from '../../sensors/index.ts';
import type { EmbotRuntime } from '../../embots/index.ts';
import type { HypervisorDriver } from '../../effectors/index.ts';
import type { ModuleBundle } from '../wire/frames.ts';
import type { MigrationJournal } from './migration-journal.ts';

/** Modules on this agent, as migrations need them. */
export interface ModuleProvider {
  /** `name@version#hash` of a loaded module. */
  refOf(name: string): string | undefined;
  /** Answers a peer's ModuleRequest (source side); undefined when this agent has no such module. */
  bundleFor(name: string, hash: string): Omit<ModuleBundle, 'type' | 'replyTo'> | undefined;
  /**
   * Makes sure `name@version#hash` is loaded here (target side), fetching it from the source when
   * missing and checking its hash and the trust policy. Rejects with an error whose `instantiation`
   * is true when the module cannot be used here.
   */
  ensure(ref: string, fetch: (name: string, hash: string) => Promise<ModuleBundle>): Promise<{ readonly shipped: boolean }>;
}

/** What the two sides of a migration use of their agent. */
export interface MobilityHost {
  readonly agent: string;
  readonly store: Store;
  readonly objects: ManagedObjectService;
  readonly sensors: SensorService;
  readonly runtime: EmbotRuntime;
  /** The hypervisor, through the contract only: every driver migrates the same way here. */
  readonly driver: HypervisorDriver;
  readonly journal: MigrationJournal;
  readonly modules: ModuleProvider;
  readonly logger: Logger;
  /** Attaches an element's embots (resuming stored ones). */
  attach(el: ManagedElement): Promise<void>;
  /** VMs being created by an incoming migration: the agent must not attach embots to them itself. */
  readonly migratingIn: Set<string>;
  /** Memory offered to VMs, for the migration policy. */
  readonly hostMemory: number;
  readonly allowedSources: readonly string[];
  /** Relays and services of the VMs' UDP ports. */
  readonly udp: VmUdpServices;
  /** Share of CPU one more data path needs to reassemble pages here. */
  readonly reassemblyCpuPerPath: number;
  /** 0..1 load of this host (for the target's answer to PathOffer); driver stats are async. */
  hostLoad(): Promise<number>;
  /**
   * Readies the target for the VM before anything moves (issue 14: builds the VM's image there from
   * its cheapest holders). Resolves with what it did (undefined: nothing to do); a rejection fails
   * the migration with nothing moved.
   */
  prepareTarget?(vm: string, target: string): Promise<MigrationImageBuild | undefined>;
}

/** An error a target step raises when something shipped cannot be instantiated here. */
export class InstantiationError extends Error {
  readonly instantiation = true;
  constructor(message: string, readonly object?: string) {
    super(message);
  }
}
