/**
 * What the child migrations of one fan-out (README "Several destinations") share because there is
 * only one of it at the source: the VM's elements and their changes, and the switch (the VM stops
 * once, its sensor is muted once, its UDP relay buffers once). The coordinator holds the events and
 * detaches the embots itself; each child keeps its own hold cursor, so it ships every held event
 * exactly once to its own destination.
 */
import { ErrorCodes, ProtocolError } from '../errors.ts';
import type { ManagedElement } from '../objects/managed-element.ts';
import type { MigrateOutOptions, MigrateOutResult } from '../../effectors/index.ts';
import type { MobilityHost } from './mobility-host.ts';

/** One destination's memory move, through the driver's fan-out session (its own dirty log). */
export type FanOutMove = (vm: string, options: MigrateOutOptions) => Promise<MigrateOutResult>;

/** The VM's management state as every child ships it in ManagementState: serialized and packed once. */
export interface ManagementSnapshot {
  /** The VM's elements, serialized (ObjectStore.serialize). */
  readonly elements: Uint8Array;
  /** The embots, packed (msgpack of RuntimeHost.exportEmbots). */
  readonly embots: Uint8Array;
  readonly embotCount: number;
}

export class FanOutShared {
  readonly vmElement: string;
  /** Changed elements each child has not shipped yet, by child id (later versions replace earlier ones). */
  private readonly pending = new Map<string, Map<string, ManagedElement>>();
  private switched = false;
  /** ms since the epoch when the VM stopped for the switch. */
  stoppedAt: number | undefined;
  /** performance.now() of the stop, of a pre-warm's command and of its lift: the children's `vmSteps.afterStop`. */
  stoppedPerf: number | undefined;
  commandedPerf: number | undefined;
  liftedPerf: number | undefined;
  vmStopped = false;
  private unmuteFn: (() => void) | undefined;
  /** The VM's UDP relay buffering from the switch (one pause for every child). */
  udpPaused: Promise<void> | undefined;
  /**
   * A pre-warm (fan-out.ts): the events are held and the embots detached only at the migrate
   * command, so until then the children ship no held events; after it, each child's first dirty
   * round carries the embots again, as they were frozen at the command.
   */
  readonly prewarm: boolean;
  /** False during a pre-warm until the command's hold: the VM's events are processed here meanwhile. */
  eventsHeld: boolean;
  /** Children whose destination has the embots as frozen at the command (a pre-warm's first dirty round). */
  private readonly embotsSent = new Set<string>();
  /** The embots as frozen at a pre-warm's command, packed then: the final round, inside the downtime, only sends them. */
  private frozenEmbots: Uint8Array | undefined;
  /** The elements as StartMigration carries them: the children start in one synchronous loop, so one serialization serves all. */
  private startElements: Uint8Array | undefined;
  private snapshot: ManagementSnapshot | undefined;

  constructor(
    private readonly host: MobilityHost,
    readonly vm: string,
    /** Child migration ids, for the journal notes every child carries (a restart reads any of them). */
    readonly childIds: readonly string[],
    options: { readonly prewarm?: boolean } = {},
  ) {
    this.vmElement = `vm:${vm}`;
    this.prewarm = options.prewarm === true;
    this.eventsHeld = !this.prewarm;
    for (const id of childIds) this.pending.set(id, new Map());
  }

  /** Everything changed since `child` last asked, once to each child. */
  collectDirtyFor(child: string): ManagedElement[] {
    this.pullDirty();
    const mine = this.pending.get(child);
    if (!mine) return [];
    const out = [...mine.values()];
    mine.clear();
    return out;
  }

  /** A pre-warm's command detached the embots: packed now, once for every child, before the VM stops. */
  freezeEmbots(packed: Uint8Array): void {
    this.frozenEmbots = packed;
  }

  /**
   * A pre-warm's child after the command: the embots as frozen then, once, the first time it asks
   * (it ships them then); `exportPacked` only if the command's pack is missing.
   */
  takeEmbotsResend(child: string, exportPacked: () => Uint8Array): Uint8Array | undefined {
    if (!this.prewarm || !this.eventsHeld || this.embotsSent.has(child)) return undefined;
    this.embotsSent.add(child);
    return this.frozenEmbots ?? exportPacked();
  }

  /**
   * The elements for a child's StartMigration, serialized once for every child of the attempt.
   * Only the target's policy reads them; the state it stages comes with ManagementState.
   */
  elementsForStart(): Uint8Array {
    this.startElements ??= this.host.objects.serialize(this.vmElement);
    return this.startElements;
  }

  /**
   * The management state for `child`'s ManagementState, serialized and packed once for every
   * child instead of once each (README "Several destinations"). Taking it counts as shipping the
   * state as it was when the first child took it: that child's call clears every child's pending
   * changes, and what changes afterwards reaches every child's pending set (pullDirty), so a
   * child that takes the snapshot later ships those changes in its dirty rounds, none twice.
   */
  managementStateFor(child: string, exportEmbots: () => { readonly embots: Uint8Array; readonly count: number }): ManagementSnapshot {
    if (!this.pending.has(child)) throw new ProtocolError(ErrorCodes.MIGRATION_MISMATCH, `${child} is not a child of this fan-out of VM ${this.vm}`);
    if (this.snapshot === undefined) {
      const { embots, count } = exportEmbots();
      const elements = this.host.objects.serialize(this.vmElement);
      this.pullDirty();
      for (const p of this.pending.values()) p.clear();
      this.snapshot = { elements, embots, embotCount: count };
    }
    return this.snapshot;
  }

  private pullDirty(): void {
    if (!this.host.objects.has(this.vmElement)) return;
    const changed = this.host.objects.collectDirty(this.vmElement);
    for (const p of this.pending.values()) for (const e of changed) p.set(e.id, e);
  }

  /**
   * The offline phase starts, once for all children (the first destination whose copy fits the
   * downtime limit gets here first): sensor muted, stop journaled on every child's row, UDP buffered.
   */
  enterSwitchover(): void {
    if (this.switched) return;
    this.switched = true;
    const host = this.host;
    this.unmuteFn = host.sensors.mute(this.vmElement, 'vm');
    const state = host.driver.get(this.vm)?.state;
    if (state === 'running' || state === 'paused') {
      this.vmStopped = true;
      // One transaction for every child's row: the switch is one step, not one write per destination.
      host.store.transaction(() => {
        for (const id of this.childIds) host.journal.notes(id, 'source', { vmStopped: true });
      });
    }
    this.stoppedAt = Date.now();
    this.stoppedPerf = performance.now();
    this.udpPaused = host.udp.pauseForMigration(this.vm);
  }

  get switchedOver(): boolean {
    return this.switched;
  }

  unmute(): void {
    this.unmuteFn?.();
    this.unmuteFn = undefined;
  }
}
