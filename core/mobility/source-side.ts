import { pack } from 'msgpackr';
import { ErrorCodes, ProtocolError, describeError } from '../errors.ts';
import type { EmbotEvent } from '../events.ts';
import type { PeerConnection } from '../wire/peer-connection.ts';
import type { ReplyOf, RequestType } from '../wire/frames.ts';
import type { DirtyRoundResult, SourceInput, SourceSteps } from './mobility-contract.ts';
import { MEMORY_CHUNK_BYTES, type MobilityHost } from './mobility-host.ts';
import type { HoldCursor } from '../../sensors/sensor-service.ts';
import type { MigrationProgress } from './migration-record.ts';

export interface SourceSideOptions {
  readonly host: MobilityHost;
  readonly migrationId: string;
  readonly vm: string;
  readonly target: string;
  readonly connect: () => Promise<PeerConnection>;
  readonly stepTimeoutMs: number;
  readonly vmTimeoutMs: number;
  readonly forwardGraceMs: number;
  readonly onProgress: (p: Partial<MigrationProgress>) => void;
}

/** Counters that end up in the migration summary. */
export interface SourceStats {
  embots: number;
  events: number;
  modules: readonly string[];
  bytes: number;
  memoryBytes: number;
  dirtyRounds: number;
  stoppedAt: number | undefined;
  downtimeMs: number | undefined;
  forwarded: number;
}

/**
 * The work of each source step for one migration (the source machine decides the order and the
 * failure paths). Holds the VM's elements from the first step, so from then on every event for
 * them is either shipped or, on roll-back, released here: never both, never neither.
 */
export class SourceSide implements SourceSteps {
  readonly vmElement: string;
  readonly stats: SourceStats = { embots: 0, events: 0, modules: [], bytes: 0, memoryBytes: 0, dirtyRounds: 0, stoppedAt: undefined, downtimeMs: undefined, forwarded: 0 };
  private conn: PeerConnection | undefined;
  private scope: readonly string[] = [];
  private cursor: HoldCursor | undefined;
  private held = false;
  private detached = false;
  private wasRunning = false;
  private vmStopped = false;
  private unmute: (() => void) | undefined;

  constructor(private readonly o: SourceSideOptions) {
    this.vmElement = `vm:${o.vm}`;
  }

  private get host(): MobilityHost {
    return this.o.host;
  }

  private async request<T extends RequestType>(body: Parameters<PeerConnection['request']>[0] & { type: T }, timeoutMs = this.o.stepTimeoutMs): Promise<ReplyOf<T>> {
    this.conn ??= await this.o.connect();
    return (await this.conn.request(body, { timeoutMs })) as ReplyOf<T>;
  }

  async startMigration(input: SourceInput): Promise<{ readonly permitted: boolean; readonly reason?: string }> {
    const vm = this.host.driver.get(this.o.vm);
    if (!vm) throw new ProtocolError(ErrorCodes.VM_UNKNOWN, `no VM named ${this.o.vm} on ${this.host.agent}`);
    if (!this.host.objects.has(this.vmElement)) throw new ProtocolError(ErrorCodes.ELEMENT_UNKNOWN, `VM ${this.o.vm} has no managed element`);
    this.scope = this.host.objects.subtree(this.vmElement).map((e) => e.id);
    this.wasRunning = vm.state === 'running';
    const modules = this.moduleClosure([...new Set(this.host.runtime.exportEmbots(this.scope).map((e) => e.module))]);
    this.stats.modules = modules;
    this.host.journal.notes(input.migrationId, 'source', { wasRunning: this.wasRunning, scope: this.scope });
    const elements = this.host.objects.serialize(this.vmElement);
    const reply = await this.request({ type: 'StartMigration', migrationId: input.migrationId, vm: this.o.vm, elements, resources: { memory: vm.memory, vcpus: vm.vcpus }, modules });
    this.stats.bytes += elements.byteLength;
    return reply.type === 'MigrationPermitted' ? { permitted: true } : { permitted: false, reason: reply.reason };
  }

  /** The embots' modules and, recursively, their dependencies, each after what it depends on, as `name@version#hash`. */
  private moduleClosure(names: readonly string[]): string[] {
    const out: string[] = [];
    const seen = new Set<string>();
    const visit = (name: string): void => {
      if (seen.has(name)) return;
      seen.add(name);
      const m = this.host.runtime.module(name);
      const ref = this.host.modules.refOf(name);
      if (!m || !ref) throw new ProtocolError(ErrorCodes.PLUGIN_LOAD_FAILED, `module ${name} of the VM's embots is not loaded here; cannot announce it`);
      for (const dep of Object.keys(m.manifest.dependencies)) visit(dep);
      out.push(ref);
    };
    names.forEach(visit);
    return out;
  }

  async holdEvents(): Promise<void> {
    this.host.sensors.hold(this.scope);
    this.held = true;
    // Freeze the embots here: every event they were given is committed, their timers stop; their
    // state (with absolute deadlines) is what travels.
    await this.host.runtime.detach(this.scope, { keepState: true });
    this.detached = true;
  }

  async sendManagementState(input: SourceInput): Promise<void> {
    const embots = this.host.runtime.exportEmbots(this.scope);
    this.stats.embots = embots.length;
    const elements = this.host.objects.serialize(this.vmElement);
    // What changes from now on goes in the dirty rounds.
    this.host.objects.collectDirty(this.vmElement);
    const embotBytes = pack(embots);
    const reply = await this.request({ type: 'ManagementState', migrationId: input.migrationId, elements, embots: embotBytes });
    this.stats.bytes += elements.byteLength + embotBytes.byteLength;
    if (reply.type !== 'ManagementStateSuccess') throw stepFailed('ManagementState', reply);
  }

  async sendEventState(input: SourceInput): Promise<void> {
    const { bytes, cursor, count } = this.host.sensors.serializeHeldSince(this.scope, this.cursor);
    this.cursor = cursor;
    const reply = await this.request({ type: 'ManagementEventState', migrationId: input.migrationId, holdQueues: bytes });
    this.stats.events += count;
    this.stats.bytes += bytes.byteLength;
    if (reply.type !== 'ManagementEventStateSuccess') throw stepFailed('ManagementEventState', reply);
  }

  /** Stop-and-copy over the peer link (pre-copy rounds are the data plane's). */
  async migrateVm(input: SourceInput): Promise<void> {
    const driver = this.host.driver;
    this.unmute = this.host.sensors.mute(this.vmElement, 'vm');
    if (driver.get(this.o.vm)?.state === 'running') {
      driver.stop(this.o.vm);
      this.vmStopped = true;
      this.stats.stoppedAt = Date.now();
      this.host.journal.notes(input.migrationId, 'source', { vmStopped: true });
    }
    const memory = driver.pages(this.o.vm).memory;
    const chunks = Math.max(1, Math.ceil(memory.byteLength / MEMORY_CHUNK_BYTES));
    for (let seq = 0; seq < chunks; seq++) {
      const pages = memory.subarray(seq * MEMORY_CHUNK_BYTES, Math.min(memory.byteLength, (seq + 1) * MEMORY_CHUNK_BYTES));
      const reply = await this.request({ type: 'VmMemory', migrationId: input.migrationId, vm: this.o.vm, round: 0, seq, last: seq === chunks - 1, pages }, this.o.vmTimeoutMs);
      if (reply.type !== 'VmMemoryAck') throw stepFailed('VmMemory', reply);
      this.stats.memoryBytes += pages.byteLength;
      this.stats.bytes += pages.byteLength;
      this.o.onProgress({ bytes: this.stats.bytes, memoryBytes: this.stats.memoryBytes, memoryTotal: memory.byteLength });
    }
  }

  async sendDirtyObjects(input: SourceInput & { readonly round: number; readonly final: boolean }): Promise<DirtyRoundResult> {
    const changed = this.host.objects.collectDirty(this.vmElement);
    const deltas = pack(changed);
    const { bytes, cursor, count } = this.host.sensors.serializeHeldSince(this.scope, this.cursor);
    this.cursor = cursor;
    const reply = await this.request({ type: 'DirtyObjects', migrationId: input.migrationId, round: input.round, deltas, events: bytes });
    if (reply.type !== 'MigrationStateSuccess') throw stepFailed('DirtyObjects', reply);
    this.stats.dirtyRounds++;
    this.stats.events += count;
    this.stats.bytes += deltas.byteLength + bytes.byteLength;
    return { changedElements: changed.length, events: count };
  }

  async completeMigration(input: SourceInput): Promise<void> {
    const reply = await this.request({ type: 'MigrationComplete', migrationId: input.migrationId });
    if (reply.type !== 'MigrationCompleteAck') throw stepFailed('MigrationComplete', reply);
    if (this.stats.stoppedAt !== undefined) this.stats.downtimeMs = Date.now() - this.stats.stoppedAt;
  }

  /**
   * The target owns the VM now. New events for its elements are forwarded for the grace period;
   * the ones held since the last round follow them; then everything of the VM goes from here.
   */
  async finishSource(input: SourceInput): Promise<void> {
    const host = this.host;
    const migrationId = input.migrationId;
    const forward = async (events: readonly EmbotEvent[]): Promise<void> => {
      await this.request({ type: 'ForwardedEvents', migrationId, events: pack(events) });
      this.stats.forwarded += events.length;
    };
    const endRedirect = host.sensors.redirect(this.scope, forward);
    setTimeout(endRedirect, this.o.forwardGraceMs).unref();
    const rest = host.sensors.serializeHeldSince(this.scope, this.cursor);
    if (rest.count > 0) {
      const reply = await this.request({ type: 'ForwardedEvents', migrationId, events: rest.bytes });
      this.stats.forwarded += reply.type === 'ForwardedEventsAck' ? reply.accepted : 0;
    }
    host.store.transaction(() => {
      host.sensors.drop(this.scope);
      host.runtime.forget(this.scope);
      if (host.objects.has(this.vmElement)) host.objects.deregister(this.vmElement, { withDependents: true });
      if (host.driver.get(this.o.vm)) host.driver.remove(this.o.vm);
    });
    this.unmute?.();
    this.unmute = undefined;
    setTimeout(() => void this.conn?.close().catch(() => {}), this.o.forwardGraceMs).unref();
  }

  async rollBack(input: SourceInput & { readonly reason: string }): Promise<void> {
    const host = this.host;
    try {
      if (this.conn?.isOpen) this.conn.notify({ type: 'Abort', migrationId: input.migrationId, reason: input.reason });
    } catch (e) {
      host.logger.warn('could not tell the target about the abort', { error: describeError(e) });
    }
    try {
      if (this.vmStopped && this.wasRunning && host.driver.get(this.o.vm)?.state === 'stopped') host.driver.start(this.o.vm);
    } finally {
      this.unmute?.();
      this.unmute = undefined;
    }
    // Resume the embots from the state they were frozen in, then give them the held events.
    if (this.detached) await attachAll(host, this.scope);
    if (this.held) host.sensors.release(this.scope);
    void this.conn?.close().catch(() => {});
  }

  async resolveOutcome(input: SourceInput): Promise<'committed' | 'notCommitted'> {
    this.conn = undefined;
    const reply = await this.request({ type: 'MigrationStatusQuery', migrationId: input.migrationId });
    return reply.committed ? 'committed' : 'notCommitted';
  }
}

/** Resumes the embots of every element of a VM's tree. */
export async function attachAll(host: MobilityHost, scope: readonly string[]): Promise<void> {
  for (const id of scope) {
    const el = host.objects.get(id);
    if (el) await host.attach(el);
  }
}

function stepFailed(step: string, reply: { type: string; reason?: string }): ProtocolError {
  return new ProtocolError(ErrorCodes.REQUEST_FAILED, `${step} refused by the target: ${reply.type}${reply.reason ? `: ${reply.reason}` : ''}`, { details: { reply: reply.type } });
}
