import { unpack } from 'msgpackr';
import { ErrorCodes, ProtocolError, describeError } from '../errors.ts';
import type { ManagedElement } from '../objects/managed-element.ts';
import type { PeerConnection } from '../wire/peer-connection.ts';
import type { BootIncoming, DirtyObjects, ManagementEventState, ManagementState, ModuleBundle, PageBatch, PrepareIncoming, VmMemory } from '../wire/frames.ts';
import type { ExportedEmbot } from '../../embots/index.ts';
import type { TargetInput, TargetSteps } from './mobility-contract.ts';
import { InstantiationError, type MobilityHost } from './mobility-host.ts';
import type { MigrationEndpoint } from '../../effectors/index.ts';
import type { MigrationProgress } from './migration-record.ts';
import { attachAll } from './source-side.ts';
import { faultPoint } from './fault-points.ts';
import { injectedBootFailure } from './fan-out-faults.ts';
import { mergeDeltaRounds } from '../objects/delta-rounds.ts';
import type { HandOverWaits } from './forwarding-hand-over.ts';
import type { TargetDiscards } from './target-discards.ts';

export interface TargetSideOptions {
  readonly host: MobilityHost;
  /** The link the StartMigration came on: the source answers ModuleRequests on it. */
  readonly conn: PeerConnection;
  readonly stepTimeoutMs: number;
  readonly onProgress: (p: Partial<MigrationProgress>) => void;
  /** Bytes of memory other incoming migrations have been promised and not yet committed or discarded. */
  readonly reservedMemory?: () => number;
  /**
   * Keeps the moved elements held after the commit until the source hands over the events it held
   * (forwarding-hand-over.ts); without it they are released once the embots run.
   */
  readonly handOver?: HandOverWaits;
  /**
   * This agent's discards still running (target-discards.ts): `discard` registers there, and a
   * refusal one of them may lift waits for it (bounded by `discardWaitMs`) before it is given.
   */
  readonly discards?: TargetDiscards;
  /** How long the admission waits for such a discard; default half the step timeout (the machine's evaluating bound). */
  readonly discardWaitMs?: number;
}

/** The policy's verdict; a refusal says which running discards could lift it (the same VM's, or any one's memory). */
type Judgement =
  | { readonly permitted: true; readonly elements: ManagedElement[] }
  | { readonly permitted: false; readonly reason: string; readonly liftedBy?: 'sameVm' | 'anyDiscard' };

export interface TargetStats {
  bytes: number;
  memoryBytes: number;
  modulesShipped: number;
  events: number;
  embots: number;
}

/**
 * The work of each target step for one migration. Everything is staged in memory (the events in
 * hold queues) until `commit`, which makes the VM, its elements and its embots ours in one
 * SQLite transaction; a crash before it leaves nothing that owns the VM here.
 */
export class TargetSide implements TargetSteps {
  readonly stats: TargetStats = { bytes: 0, memoryBytes: 0, modulesShipped: 0, events: 0, embots: 0 };
  private elementsBytes: Uint8Array | undefined;
  private elements: ManagedElement[] = [];
  private deltas: ManagedElement[] = [];
  private embots: ExportedEmbot[] = [];
  private scope: string[] = [];
  /**
   * The driver's incoming VM, readied by PrepareIncoming (outside the machine's steps, like the
   * pages that may follow on the data paths); VmMemory `last` says the memory is complete.
   */
  private incoming: Promise<MigrationEndpoint> | undefined;
  private vm = '';
  private discarded = false;
  private held = false;
  private committed = false;
  /** Memory this migration was permitted to stage, until it commits or is discarded. */
  private reserved = 0;
  /** The VM element as StartMigration showed it: before the source stopped the VM for the copy. */
  private startVm: { state?: string } | undefined;

  constructor(private readonly o: TargetSideOptions) {}

  private get host(): MobilityHost {
    return this.o.host;
  }

  /** Bytes of memory this migration holds a promise of (0 once committed or discarded). */
  get reservedBytes(): number {
    return this.reserved;
  }

  async evaluate(input: TargetInput): Promise<{ readonly permitted: boolean; readonly reason?: string }> {
    let verdict = this.judge(input);
    const discards = this.o.discards;
    if (!verdict.permitted && verdict.liftedBy !== undefined && discards !== undefined) {
      // Refused for something a discard still running here is about to remove (the same VM's
      // incoming copy still listed, its memory still counted): the source that failed a moment ago
      // was answered before the discard ended, and its retry must not be turned away for it.
      const vm = verdict.liftedBy === 'sameVm' ? input.start.vm : undefined;
      const running = discards.list(vm);
      if (running.length > 0) {
        const waitMs = this.o.discardWaitMs ?? Math.floor(this.o.stepTimeoutMs / 2);
        const settled = await discards.settled(vm, waitMs);
        // Aborted or timed out meanwhile: the machine left evaluating and discarded this side; nothing may be claimed now.
        if (this.discarded) return { permitted: false, reason: `discarded while waiting for the discard of migration ${running.map((d) => d.migrationId).join(', ')}` };
        verdict = this.judge(input);
        if (!verdict.permitted && !settled) {
          verdict = { permitted: false, reason: `${verdict.reason} (the discard of migration ${running.map((d) => d.migrationId).join(', ')} still ran after ${waitMs} ms)` };
        }
      }
    }
    if (!verdict.permitted) return { permitted: false, reason: verdict.reason };
    const { start } = input;
    this.elements = verdict.elements;
    this.startVm = this.elements.find((e) => e.id === `vm:${start.vm}`)?.state as typeof this.startVm;
    this.host.migratingIn.add(start.vm);
    this.vm = start.vm;
    this.reserved = start.resources.memory;
    return { permitted: true };
  }

  /** The migration policy, without side effects: judged again after a wait for a discard. */
  private judge(input: TargetInput): Judgement {
    const host = this.host;
    const { start } = input;
    if (host.allowedSources.length && !host.allowedSources.includes(input.source)) return { permitted: false, reason: `source ${input.source} is not allowed to migrate VMs to ${host.agent}` };
    if (host.driver.get(start.vm) || host.migratingIn.has(start.vm)) return { permitted: false, reason: `a VM named ${start.vm} already exists on ${host.agent}`, liftedBy: 'sameVm' };
    // Memory promised to migrations still arriving counts as used: each stages its pages in a buffer of that size.
    const used = host.driver.list().reduce((sum, v) => sum + v.memory, 0) + (this.o.reservedMemory?.() ?? 0);
    if (used + start.resources.memory > host.hostMemory) {
      return { permitted: false, reason: `not enough memory on ${host.agent}: ${start.resources.memory} bytes asked, ${host.hostMemory - used} free`, liftedBy: 'anyDiscard' };
    }
    let elements: ManagedElement[];
    try {
      elements = host.objects.deserialize(start.elements);
    } catch (e) {
      return { permitted: false, reason: `elements do not decode: ${describeError(e)}` };
    }
    const clash = elements.find((e) => host.objects.has(e.id));
    if (clash) return { permitted: false, reason: `element ${clash.id} already exists on ${host.agent}` };
    return { permitted: true, elements };
  }

  async stageState(input: TargetInput & { readonly frame: ManagementState }): Promise<void> {
    const host = this.host;
    try {
      this.elements = host.objects.deserialize(input.frame.elements);
    } catch (e) {
      throw new InstantiationError(`elements do not decode: ${describeError(e)}`);
    }
    this.elementsBytes = input.frame.elements;
    this.scope = this.elements.map((e) => e.id);
    this.embots = decodeEmbots(input.frame.embots);
    this.stats.embots = this.embots.length;
    this.stats.bytes += input.frame.elements.byteLength + input.frame.embots.byteLength;
    const announced = new Map(input.start.modules.map((ref) => [ref.slice(0, ref.indexOf('@')), ref]));
    for (const e of this.embots) {
      if (!announced.has(e.module)) throw new InstantiationError(`embot ${e.id} needs module ${e.module}, which StartMigration did not announce`, e.id);
      if (!this.scope.includes(e.elementIds[0] ?? '')) throw new InstantiationError(`embot ${e.id} is attached to ${e.elementIds[0]}, which is not among the shipped elements`, e.id);
    }
    const fetch = (name: string, hash: string): Promise<ModuleBundle> =>
      this.o.conn.request({ type: 'ModuleRequest', migrationId: input.migrationId, name, hash }, { timeoutMs: this.o.stepTimeoutMs });
    // Announced in dependency order: a module's dependencies are loaded before it.
    for (const ref of input.start.modules) {
      const { shipped } = await host.modules.ensure(ref, fetch);
      if (shipped) this.stats.modulesShipped++;
    }
    // From here on, events for these elements wait in hold queues until the commit.
    host.sensors.hold(this.scope);
    this.held = true;
  }

  async stageEvents(input: TargetInput & { readonly frame: ManagementEventState }): Promise<void> {
    const before = this.host.sensors.heldCount(this.scope);
    // One blob row instead of a journal row per event: the per-event journaling happens at release, after the switch.
    this.host.sensors.insertHeld(input.frame.holdQueues, { deferJournal: true });
    this.stats.events += this.host.sensors.heldCount(this.scope) - before;
    this.stats.bytes += input.frame.holdQueues.byteLength;
  }

  /**
   * PrepareIncoming (see MobilityService's handler): the driver readies a VM of the source's spec
   * and says where the memory goes. Once per migration; the spec must be the VM that was permitted.
   */
  async prepareIncoming(frame: PrepareIncoming): Promise<MigrationEndpoint> {
    if (this.incoming) throw new InstantiationError(`migration ${frame.migrationId}: the incoming VM is already prepared`);
    if (this.discarded) throw new InstantiationError(`migration ${frame.migrationId} was discarded`);
    const memory = frame.spec['memory'];
    if (frame.spec['name'] !== this.vm) throw new InstantiationError(`the spec names VM ${String(frame.spec['name'])}, this migration moves ${this.vm}`);
    if (typeof memory === 'number' && memory > this.reserved) throw new InstantiationError(`the spec asks ${memory} bytes of memory, ${this.reserved} were permitted`);
    const host = this.host;
    // The authenticated source: a driver whose stream checks its peer (qemu over TLS) admits only its certificate.
    const prepared = host.driver.prepareIncoming(frame.spec as { readonly name: string }, { channels: frame.channels, sourceName: this.o.conn.remoteAgent, ...(frame.prewarm === true ? { prewarm: true } : {}) }).then((r) => r.endpoint);
    this.incoming = prepared;
    // A failed prepare leaves nothing to abort; the source hears why in the reply.
    prepared.catch(() => (this.incoming = undefined));
    const endpoint = await prepared;
    // Discarded while the driver was at it (an Abort, a timeout): discard() waited for this
    // prepare and throws the VM away; the source must not send it memory.
    if (this.discarded) throw new InstantiationError(`migration ${frame.migrationId} was discarded while its incoming VM was being prepared`);
    return endpoint;
  }

  /** A PageBatch from a data path (see MobilityService's handler), for a driver whose memory rides them (sim). */
  receivePages(frame: PageBatch): { readonly ok: true } | { readonly ok: false; readonly reason: string } {
    const pages = this.host.driver.capabilities.incomingPages;
    if (!this.incoming || !pages) return { ok: false, reason: 'this migration is not receiving memory' };
    const r = pages.apply(this.vm, frame);
    if (r.ok) {
      this.stats.memoryBytes += frame.pages.byteLength;
      this.stats.bytes += frame.pages.byteLength;
      this.o.onProgress({ bytes: this.stats.bytes, memoryBytes: this.stats.memoryBytes, memoryTotal: this.reserved });
    }
    return r;
  }

  /** The source says the memory is complete: it is, if the incoming VM was prepared and (sim) its final batch arrived. */
  async receiveMemory(input: TargetInput & { readonly frame: VmMemory }): Promise<void> {
    if (!input.frame.last) throw new InstantiationError('memory travels on the data paths; the control link only marks its end');
    if (!this.incoming) throw new InstantiationError('the source says the memory is complete, but no incoming VM was prepared (PrepareIncoming)');
    await this.incoming;
    const pages = this.host.driver.capabilities.incomingPages;
    if (pages && !pages.complete(this.vm)) throw new InstantiationError('the source says the memory is complete, but its final page batch has not arrived');
  }

  /**
   * Several destinations (issue 13): the incoming VM at its last reversible point. For a driver
   * whose memory rides the data paths (the sim) that is every page batch in, each checked against
   * its checksum on arrival, the VM held not running until commitIncoming. A driver with a stream
   * of its own (qemu) answers through its `incomingBoot` capability: stream complete, paused under -S.
   */
  async bootIncoming(_input: TargetInput & { readonly frame: BootIncoming | DirtyObjects }): Promise<void> {
    if (!this.incoming) throw new InstantiationError('asked to boot, but no incoming VM was prepared (PrepareIncoming)');
    await this.incoming;
    const pages = this.host.driver.capabilities.incomingPages;
    const boot = this.host.driver.capabilities.incomingBoot;
    if (!pages && boot) {
      await boot.bootIncoming(this.vm, { timeoutMs: this.o.stepTimeoutMs });
      injectedBootFailure(this.vm);
      return;
    }
    if (!pages) throw new ProtocolError(ErrorCodes.DRIVER_UNSUPPORTED, `booting an incoming VM before its commit is not built for the ${this.host.driver.name} driver yet`);
    if (!pages.complete(this.vm)) throw new InstantiationError('asked to boot, but the final page batch has not arrived');
    injectedBootFailure(this.vm);
  }

  async applyDirty(input: TargetInput & { readonly frame: DirtyObjects }): Promise<void> {
    const changed = unpack(input.frame.deltas) as ManagedElement[];
    if (!Array.isArray(changed)) throw new InstantiationError('dirty objects do not decode to a list of elements');
    // An element changed in an earlier round too: its latest delta replaces the earlier one.
    this.deltas = mergeDeltaRounds(this.deltas, changed);
    if (input.frame.embots) {
      // A pre-warm's embots ran at the source until the command: these, frozen then, replace the staged ones.
      const embots = decodeEmbots(input.frame.embots);
      for (const e of embots) {
        if (!input.start.modules.some((ref) => ref.startsWith(`${e.module}@`))) throw new InstantiationError(`embot ${e.id} needs module ${e.module}, which StartMigration did not announce`, e.id);
        if (!this.scope.includes(e.elementIds[0] ?? '')) throw new InstantiationError(`embot ${e.id} is attached to ${e.elementIds[0]}, which is not among the shipped elements`, e.id);
      }
      this.embots = embots;
      this.stats.embots = embots.length;
      this.stats.bytes += input.frame.embots.byteLength;
    }
    if (input.frame.events.byteLength) await this.stageEvents({ ...input, frame: { type: 'ManagementEventState', reqId: input.frame.reqId, migrationId: input.migrationId, holdQueues: input.frame.events } });
    this.stats.bytes += input.frame.deltas.byteLength;
  }

  /**
   * MigrationComplete's `memoryBytes`: what the source sent. Taken only where this side counts
   * none itself (a driver with a stream of its own, qemu), so a record never mixes two counts.
   */
  sourceSent(memoryBytes: number | undefined): void {
    if (memoryBytes === undefined || this.host.driver.capabilities.incomingPages || this.stats.memoryBytes > 0) return;
    // `bytes` is everything that moved, memory included, as at the source and with the sim.
    this.stats.memoryBytes = memoryBytes;
    this.stats.bytes += memoryBytes;
  }

  async commit(input: TargetInput): Promise<void> {
    const host = this.host;
    const name = input.start.vm;
    const vmState = this.startVm;
    const wasRunning = vmState?.state === 'running';
    const unmute = host.sensors.mute(`vm:${name}`, 'vm');
    let running: Promise<unknown> | undefined;
    try {
      // One transaction: the VM, its elements, its embots and the journal's 'committed' are all
      // here after a crash, or none of them is. The sim commits its VM before commitIncoming's
      // first await (so inside this transaction, and a refusal throws here and rolls it back);
      // qemu's wait for its VM to run follows the transaction.
      host.store.transaction(() => {
        running = host.driver.commitIncoming(name, { running: wasRunning, timeoutMs: this.o.stepTimeoutMs });
        // Awaited below; until then a rejection must not count as unhandled.
        running.catch(() => undefined);
        host.objects.instantiate(this.elementsBytes!);
        if (this.deltas.length) host.objects.applyDeltas(this.deltas);
        host.runtime.adoptEmbots(this.embots);
        // What moved: forwarded events are taken for these elements only (MobilityService.assertMoved).
        host.journal.notes(input.migrationId, 'target', { scope: this.scope });
        this.o.handOver?.journalPending(input.migrationId);
        host.journal.phase(input.migrationId, 'target', 'committed');
      });
      this.committed = true;
      faultPoint('target:committed');
      try {
        await running;
      } catch (e) {
        // Committed all the same: the journal says so, and the source has let go. The VM's state event tells the watchdog.
        host.logger.error(`migration ${input.migrationId}: VM ${name} did not come up here after the commit`, { error: describeError(e) });
      }
    } finally {
      unmute();
    }
    host.migratingIn.delete(name);
    this.reserved = 0;
    const actual = host.driver.get(name)?.state;
    if (actual && host.objects.get(`vm:${name}`)?.state['state'] !== actual) host.objects.update(`vm:${name}`, { state: actual });
    // The embots start and the held events reach them after the acknowledgement (DESIGN step 6):
    // starting a thousand embots or releasing a large queue must not hold up the switch. The embots
    // are tracked (and listed) as soon as attach begins; their events wait in the hold queues until
    // they run, and (with a hand-over wait) until the source handed over what it still held: those
    // are older than anything posted here from now on. A crash before that loses nothing: the next
    // start attaches the stored embots and recovers the events from their blob rows.
    const attached = attachAll(host, this.scope);
    if (this.o.handOver) this.o.handOver.begin(input.migrationId, name, this.scope, attached);
    void attached
      .then(() => (this.o.handOver ? undefined : host.sensors.release(this.scope)))
      .catch((e: unknown) => host.logger.warn('could not start the migrated embots or release their events', { error: describeError(e) }));
  }

  async discard(input: TargetInput & { readonly reason: string }): Promise<void> {
    const work = this.throwAway(input.start.vm);
    return this.o.discards ? this.o.discards.track(input.start.vm, input.migrationId, work) : work;
  }

  private async throwAway(vm: string): Promise<void> {
    const host = this.host;
    // Only what this migration claimed: one refused or still being judged claimed no name.
    if (this.vm !== '') host.migratingIn.delete(this.vm);
    this.reserved = 0;
    if (this.committed) return;
    this.discarded = true;
    if (this.held) host.sensors.drop(this.scope);
    const incoming = this.incoming;
    this.incoming = undefined;
    if (incoming) {
      // A prepare still running is waited for: its VM is thrown away here, once.
      const prepared = await incoming.then(() => true, () => false);
      if (prepared) await host.driver.abortIncoming(vm).catch((e: unknown) => host.logger.warn(`could not throw away the incoming VM ${vm}`, { error: describeError(e) }));
    }
    this.embots = [];
    this.elements = [];
  }
}

function decodeEmbots(bytes: Uint8Array): ExportedEmbot[] {
  let v: unknown;
  try {
    v = unpack(bytes);
  } catch (e) {
    throw new InstantiationError(`embots do not decode: ${describeError(e)}`);
  }
  if (!Array.isArray(v)) throw new InstantiationError('embots must be a list');
  for (const e of v as unknown[]) {
    const ok =
      typeof e === 'object' && e !== null &&
      typeof (e as ExportedEmbot).id === 'string' &&
      typeof (e as ExportedEmbot).module === 'string' &&
      typeof (e as ExportedEmbot).type === 'string' &&
      Array.isArray((e as ExportedEmbot).elementIds) &&
      typeof (e as ExportedEmbot).policies === 'object' && (e as ExportedEmbot).policies !== null;
    if (!ok) throw new InstantiationError(`an embot entry is malformed: ${JSON.stringify(e).slice(0, 200)}`);
  }
  return v as ExportedEmbot[];
}
