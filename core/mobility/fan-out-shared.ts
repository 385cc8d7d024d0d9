/**
 * What the child migrations of one fan-out (README "Several destinations") share because there is
 * only one of it at the source: the VM's elements and their changes, and the switch (the VM stops
 * once, its sensor is muted once, its UDP relay buffers once). The coordinator holds the events and
 * detaches the embots itself; each child keeps its own hold cursor, so it ships every held event
 * exactly once to its own destination.
 */
import type { ManagedElement } from '../objects/managed-element.ts';
import type { MigrateOutOptions, MigrateOutResult } from '../../effectors/index.ts';
import type { MobilityHost } from './mobility-host.ts';

/** One destination's memory move, through the driver's fan-out session (its own dirty log). */
export type FanOutMove = (vm: string, options: MigrateOutOptions) => Promise<MigrateOutResult>;

export class FanOutShared {
  readonly vmElement: string;
  /** Changed elements each child has not shipped yet, by child id (later versions replace earlier ones). */
  private readonly pending = new Map<string, Map<string, ManagedElement>>();
  private switched = false;
  /** ms since the epoch when the VM stopped for the switch. */
  stoppedAt: number | undefined;
  vmStopped = false;
  private unmuteFn: (() => void) | undefined;
  /** The VM's UDP relay buffering from the switch (one pause for every child). */
  udpPaused: Promise<void> | undefined;

  constructor(
    private readonly host: MobilityHost,
    readonly vm: string,
    /** Child migration ids, for the journal notes every child carries (a restart reads any of them). */
    readonly childIds: readonly string[],
  ) {
    this.vmElement = `vm:${vm}`;
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

  /** `child` just shipped the whole state: what changed before is in it. */
  resetDirtyFor(child: string): void {
    this.pullDirty();
    this.pending.get(child)?.clear();
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
      for (const id of this.childIds) host.journal.notes(id, 'source', { vmStopped: true });
    }
    this.stoppedAt = Date.now();
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
