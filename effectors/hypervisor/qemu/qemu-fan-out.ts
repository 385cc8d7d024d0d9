/**
 * The qemu driver's `fanOut` capability (issue 13, README "Several destinations"): QEMU sends one
 * stream, so one `migrate` runs for the whole set, into a {@link StreamRelay} that copies it to
 * every destination's incoming QEMU. Each destination's child migration calls `migrateOut` with
 * its own endpoint once its target is prepared; the stream starts when every destination has
 * called or withdrawn (its child ended before its copy: denied, refused, failed), or `joinWindowMs`
 * after the first call, whichever is first. The window is a backstop for a destination that hangs
 * before its copy: a fixed 3 s one shut out a destination whose incoming QEMU took longer than that to
 * start on a loaded machine, and with it the only one that could boot.
 *
 * At QEMU's pause-before-switchover every destination's own hand-over runs (its final dirty-object
 * round); one that fails is dropped from the relay, the others go on. A destination dropped by the
 * relay (its QEMU died, `tooSlow`) or aborted has its `migrateOut` rejected at once; the stream
 * goes on for the rest. With none left QEMU's migration is cancelled and the VM runs here.
 *
 * One destination left when the stream starts (`prewarm --to b`, a retry or fallback set of one,
 * or all but one withdrew): QEMU migrates straight to it, as the single path does — QEMU's own TLS
 * (`tls-creds-x509`, `tls-hostname` the destination agent, which the incoming QEMU prepared for
 * the relay already admits: the same source certificate, the same `tls-authz`), its channels
 * (multifd too), its own downtime, cap, budget, hold and hand-over — and no relay: the hop through
 * Node costs ~35 ms per 60 MiB on two cores and is the whole of what a pre-warmed switch's
 * downtime had over a cold one (BENCHMARKS.md, "Pre-warmed switch with qemu"). Its result says
 * `transport: 'direct'`; a relayed copy's `'relay'`.
 */
import { readFileSync } from 'node:fs';
import { EffectorError, ErrorCodes } from '../../../core/errors.ts';
import type { FanOutSession, MigrateOutOptions, MigrateOutResult, MigrationProgress } from '../hypervisor-contract.ts';
import type { QemuTlsFiles } from './migration-tls.ts';
import { StreamRelay, parseTcpUri, type RelaySourceTransport, type RelayTls } from './stream-relay.ts';

/**
 * What the session needs of the driver: a migration out, either into the relay's local socket
 * (`viaLocalRelay`: plaintext, the relay wraps each destination in TLS) or straight to the one
 * destination left (QEMU's own TLS, as the single path).
 */
export interface RelayMigrator {
  migrateOut(vm: string, options: MigrateOutOptions & { readonly viaLocalRelay?: true }): Promise<MigrateOutResult>;
}

export interface QemuFanOutOptions {
  /** The agent's `peer.tls`: each destination's copy is wrapped in TLS with them. */
  readonly tls?: QemuTlsFiles;
  /** A destination queued past this many bytes holds the stream for its stall budget, then is dropped (`tooSlow`). */
  readonly bufferLimitBytes?: number;
  /** StreamRelayOptions.stallBudgetMs. */
  readonly stallBudgetMs?: number;
  /** Where the relay's socket dir goes (the VM's state dir). */
  readonly relayParentDir?: string;
  /** How long after the first destination the stream waits for the others that have not withdrawn. Default {@link DEFAULT_JOIN_WINDOW_MS}. */
  readonly joinWindowMs?: number;
  /** The relay's read slab (StreamRelayOptions.slabBytes; 0: Node's 64 KiB reads, the bench's A/B). */
  readonly slabBytes?: number;
  /** How QEMU reaches the relay (StreamRelayOptions.source; default loopback TCP where Linux tells its owner; 'unix': the bench's A/B). */
  readonly relaySource?: RelaySourceTransport;
  /** Relay one destination too instead of migrating straight to it (the bench's A/B of the relay's cost; default false). */
  readonly relayAlways?: boolean;
}

/** Default join window: longer than an incoming QEMU takes to start under TCG on a loaded machine (seen: 4 s). */
export const DEFAULT_JOIN_WINDOW_MS = 15_000;

interface Entry {
  readonly dest: string;
  readonly options: MigrateOutOptions;
  readonly resolve: (r: MigrateOutResult) => void;
  readonly reject: (e: unknown) => void;
  settled: boolean;
}

export class QemuFanOutSession implements FanOutSession {
  private readonly entries = new Map<string, Entry>();
  /** Destinations whose child ended without joining: not waited for. */
  private readonly withdrawn = new Set<string>();
  private started = false;
  private closed = false;
  private relay: StreamRelay | undefined;
  private timer: NodeJS.Timeout | undefined;
  private readonly abort = new AbortController();

  constructor(
    private readonly driver: RelayMigrator,
    private readonly vm: string,
    private readonly destinations: readonly string[],
    private readonly o: QemuFanOutOptions = {},
  ) {
    if (destinations.length === 0) throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `a fan-out of VM ${vm} needs at least one destination`);
  }

  migrateOut(destination: string, options: MigrateOutOptions): Promise<MigrateOutResult> {
    if (!this.destinations.includes(destination)) {
      return Promise.reject(new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, `${destination} is not a destination of this fan-out of VM ${this.vm}`));
    }
    if (this.closed) return Promise.reject(new EffectorError(ErrorCodes.MIGRATION_ABORTED, `the fan-out of VM ${this.vm} is closed`));
    if (this.entries.has(destination)) return Promise.reject(new EffectorError(ErrorCodes.VM_BAD_STATE, `VM ${this.vm} is already copying to ${destination}`));
    if (this.withdrawn.has(destination)) return Promise.reject(new EffectorError(ErrorCodes.MIGRATION_ABORTED, `${destination} withdrew from the fan-out of VM ${this.vm}`));
    if (this.started) {
      return Promise.reject(new EffectorError(ErrorCodes.MIGRATION_ABORTED, `VM ${this.vm}'s stream to its other destinations had already started when ${destination} was ready`));
    }
    // Whether a copy is relayed is known only at the start (the others may withdraw, leaving it alone:
    // direct, multifd allowed): judged then, in run(), unless it will be relayed whatever happens.
    if ((options.channels ?? 1) !== 1 && this.o.relayAlways === true) return Promise.reject(relayOneChannel(this.vm, destination, options.channels));
    return new Promise<MigrateOutResult>((resolve, reject) => {
      const entry: Entry = { dest: destination, options, resolve, reject, settled: false };
      this.entries.set(destination, entry);
      options.signal?.addEventListener('abort', () => this.fail(entry, new EffectorError(ErrorCodes.MIGRATION_ABORTED, `migration of VM ${this.vm} to ${destination} aborted`)), { once: true });
      if (this.allIn()) this.start();
      else this.timer ??= setTimeout(() => this.start(), this.o.joinWindowMs ?? DEFAULT_JOIN_WINDOW_MS);
    });
  }

  withdraw(destination: string): void {
    if (!this.destinations.includes(destination) || this.entries.has(destination)) return;
    this.withdrawn.add(destination);
    if (this.entries.size > 0 && this.allIn()) this.start();
  }

  /** Every destination has called or withdrawn. */
  private allIn(): boolean {
    return this.entries.size + this.withdrawn.size === this.destinations.length;
  }

  close(): void {
    this.closed = true;
    clearTimeout(this.timer);
    for (const e of this.entries.values()) this.fail(e, new EffectorError(ErrorCodes.MIGRATION_ABORTED, `the fan-out of VM ${this.vm} is closed`));
    this.relay?.close();
  }

  private live(): Entry[] {
    return [...this.entries.values()].filter((e) => !e.settled);
  }

  private fail(e: Entry, error: unknown): void {
    if (e.settled) return;
    e.settled = true;
    e.reject(error);
    this.relay?.drop(e.dest, error instanceof Error ? error.message : String(error));
    if (this.started && this.live().length === 0) this.abort.abort();
  }

  private start(): void {
    if (this.started || this.closed) return;
    this.started = true;
    clearTimeout(this.timer);
    void this.run().catch((err: unknown) => {
      for (const e of this.live()) this.fail(e, err);
    });
  }

  private async run(): Promise<void> {
    if (this.live().length > 1 || this.o.relayAlways === true) {
      // One QEMU channel through the relay; multifd's connections would need one relay each, in QEMU's order.
      for (const e of this.live()) if ((e.options.channels ?? 1) !== 1) this.fail(e, relayOneChannel(this.vm, e.dest, e.options.channels));
    }
    const entries = this.live();
    if (entries.length === 0) return;
    if (entries.length === 1 && this.o.relayAlways !== true) return this.direct(entries[0]!);
    const tls: RelayTls | undefined = this.o.tls && { ca: readFileSync(this.o.tls.ca), cert: readFileSync(this.o.tls.cert), key: readFileSync(this.o.tls.key) };
    const relay = await StreamRelay.open({
      destinations: entries.map((e) => ({ name: e.dest, uri: e.options.endpoint.uri, ...(tls ? { tls: { ...tls, serverName: e.options.targetName ?? e.dest } } : {}) })),
      ...(this.o.bufferLimitBytes === undefined ? {} : { bufferLimitBytes: this.o.bufferLimitBytes }),
      ...(this.o.stallBudgetMs === undefined ? {} : { stallBudgetMs: this.o.stallBudgetMs }),
      ...(this.o.relayParentDir === undefined ? {} : { parentDir: this.o.relayParentDir }),
      ...(this.o.slabBytes === undefined ? {} : { slabBytes: this.o.slabBytes }),
      ...(this.o.relaySource === undefined ? {} : { source: this.o.relaySource }),
    });
    this.relay = relay;
    if (this.closed) {
      relay.close();
      return;
    }
    // A destination dropped mid-stream (its QEMU died, tooSlow) ends its own migration now, not at the stream's end.
    for (const e of entries) {
      void relay.result(e.dest).then((r) => {
        if (r.outcome !== 'delivered') {
          this.fail(e, new EffectorError(ErrorCodes.MIGRATION_FAILED, `the stream of VM ${this.vm} to ${e.dest} was dropped (${r.outcome}): ${r.reason ?? ''}`, { details: { vm: this.vm, destination: e.dest, outcome: r.outcome } }));
        }
      });
    }
    const all = entries.map((e) => e.options);
    const caps = all.map((o) => o.maxBandwidth);
    try {
      const result = await this.driver.migrateOut(this.vm, {
        viaLocalRelay: true,
        endpoint: { uri: relay.uri },
        channels: 1,
        // The fastest sets the pace: the loosest cap and budget; the strictest downtime.
        downtimeLimitMs: Math.min(...all.map((o) => o.downtimeLimitMs ?? 300)),
        autoConverge: all.some((o) => o.autoConverge === true),
        ...(caps.every((c) => c !== undefined) ? { maxBandwidth: Math.max(...(caps as number[])) } : {}),
        ...(all.every((o) => o.timeBudgetMs !== undefined) ? { timeBudgetMs: Math.max(...all.map((o) => o.timeBudgetMs!)) } : {}),
        signal: this.abort.signal,
        // A pre-warm's one gate (every destination's copy gets the same): the one stream is held (qemu-prewarm.ts).
        ...(all.find((o) => o.prewarm) ? { prewarm: all.find((o) => o.prewarm)!.prewarm! } : {}),
        onProgress: (p: MigrationProgress) => {
          for (const e of this.live()) e.options.onProgress?.(p);
        },
        beforeSwitchover: async () => {
          const live = this.live();
          const settled = await Promise.allSettled(live.map((e) => e.options.beforeSwitchover?.()));
          settled.forEach((s, i) => {
            if (s.status === 'rejected') this.fail(live[i]!, s.reason);
          });
          const firstFailure = settled.find((s): s is PromiseRejectedResult => s.status === 'rejected');
          if (this.live().length === 0) throw firstFailure?.reason ?? new EffectorError(ErrorCodes.MIGRATION_ABORTED, `no destination of VM ${this.vm} is left`);
        },
      });
      await Promise.all(
        this.live().map(async (e) => {
          const r = await relay.result(e.dest);
          if (r.outcome !== 'delivered' || e.settled) return;
          e.settled = true;
          e.resolve({ ...result, bytes: r.bytes, ...(r.heldMs > 0 ? { relayHeldMs: r.heldMs } : {}) });
        }),
      );
    } finally {
      relay.close();
    }
  }

  /** The one destination left: QEMU's own stream straight to its incoming QEMU, with that destination's options (the single path's). */
  private async direct(e: Entry): Promise<void> {
    const o = e.options;
    // The endpoint comes from a peer: QEMU migrates to a tcp:HOST:PORT only (never exec: or file:), as through the relay.
    parseTcpUri(o.endpoint.uri);
    const result = await this.driver.migrateOut(this.vm, {
      ...o,
      // The relay checks the destination's certificate against this name too (QEMU's tls-hostname).
      targetName: o.targetName ?? e.dest,
      // Its own signal already fails the entry, which aborts this one (and so does close()).
      signal: this.abort.signal,
      beforeSwitchover: async () => {
        try {
          await o.beforeSwitchover?.();
        } catch (err) {
          this.fail(e, err);
          throw err;
        }
      },
    });
    if (e.settled) return;
    e.settled = true;
    e.resolve(result);
  }
}

/** A relayed copy with more than one channel: refused (one relay carries one QEMU channel). */
function relayOneChannel(vm: string, destination: string, channels: number | undefined): EffectorError {
  return new EffectorError(ErrorCodes.DRIVER_UNSUPPORTED, `the qemu relay carries one channel, not ${channels} (a fan-out to several destinations relays one stream)`, { details: { vm, destination } });
}
