/**
 * The coordinator of a migration to several destinations at once, first to boot wins (issue 13,
 * README "Several destinations"). One child migration per destination (the source machine in its
 * fan-out form, ids `<id>~<peer>`) copies the VM and its management; the coordinator owns what
 * there is one of: the hold of the VM's events and its embots' detach, the VM (stopped once by
 * the driver's fan-out session, taken back once), and the decision (fan-out-decision.ts), whose
 * effects it carries out in order: the winner journaled write-once (fan-out-journal.ts) before
 * anyone is told, then the others terminated, then the winner alone committed.
 */
import { pack } from 'msgpackr';
import { describeError } from '../errors.ts';
import { faultPoint } from './fault-points.ts';
import type { FanOutSession } from '../../effectors/index.ts';
import type { FanOutVerdict } from './mobility-contract.ts';
import type { MobilityHost } from './mobility-host.ts';
import type { DestinationReport, MigrationSummary } from './migration-record.ts';

export type { DestinationReport };
import { decide, isFinalStatus, startFanOut, type DestinationOutcome, type FanOutEffect, type FanOutInput, type FanOutState } from './fan-out-decision.ts';
import type { FanOutJournal } from './fan-out-journal.ts';
import { FanOutShared, type FanOutMove } from './fan-out-shared.ts';
import { attachAll } from './source-side.ts';
import type { PrewarmControl } from './prewarm.ts';

/** The id of the child migration of fan-out `id` to `dest`. */
export function childId(id: string, dest: string): string {
  return `${id}~${dest}`;
}

/** What the coordinator gives each child migration it asks the service to start. */
export interface ChildHooks {
  readonly shared: FanOutShared;
  readonly move: FanOutMove;
  /** The child's BootReady reached the source (or it skipped booting, see `sole`): the decision runs now. */
  readonly bootReady: () => void;
  /**
   * True when no other destination can win any more: a pre-warm's command named this one alone
   * (the others were terminated at the command). Its BootIncoming would decide nothing, so the
   * child skips it and goes to the verdict at once (the winner is still journaled first).
   */
  readonly sole: () => boolean;
  /** The child asks for the coordinator's verdict (it may have been given already). */
  readonly awaitDecision: () => Promise<FanOutVerdict>;
  /** True once the coordinator chose this child (its winner journaled, its verdict commit): a pre-warm's named one from the command on. */
  readonly chosen: () => boolean;
  /** A pre-warm's: when its command came (ms since the epoch); undefined before it, or for a plain fan-out. */
  readonly commandedAt: () => number | undefined;
}

/** A child migration as the service started it. */
export interface ChildHandle {
  /** Terminates the child: its destination gets Abort with exactly `reason`, and discards. */
  terminate(reason: string): void;
  readonly done: Promise<MigrationSummary>;
}

export type StartChild = (dest: string, id: string, hooks: ChildHooks) => ChildHandle;

export interface AttemptResult {
  readonly winner: string | undefined;
  readonly winnerSummary: MigrationSummary | undefined;
  readonly destinations: readonly DestinationReport[];
  readonly reason?: string;
}

export interface FanOutAttemptOptions {
  readonly host: MobilityHost;
  readonly journal: FanOutJournal;
  /** The attempt's id: its children are `<id>~<peer>`, the termination reason names it. */
  readonly id: string;
  readonly vm: string;
  readonly destinations: readonly string[];
  readonly attempt: number;
  readonly startChild: StartChild;
  readonly onState?: (s: FanOutState) => void;
  /**
   * True once the agent is stopping: its children were stopped, not ended, so the attempt leaves the
   * VM and the journal as they are for the restart's recovery (recoverFanOut) instead of taking back.
   */
  readonly stopping?: () => boolean;
  /**
   * A pre-warm (prewarm.ts): the copies are held until `prewarm.command`, and the hold of the VM's
   * events and the embots' detach wait for it too (the VM's events are processed here meanwhile).
   */
  readonly prewarm?: PrewarmControl;
}

/** How often a commanded pre-warm looks whether its exit condition holds. */
const PREWARM_POLL_MS = 10;

interface Deferred<T> {
  readonly promise: Promise<T>;
  resolve(v: T): void;
}

function deferred<T>(): Deferred<T> {
  let resolve!: (v: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}

/**
 * One attempt: every destination of the set at once. Resolves when every child ended and the VM
 * is either owned by the winner or running here again with its embots and events (nothing lost).
 *
 * @example
 * ```ts
 * const r = await runFanOutAttempt({ host, journal, id: 'm-1', vm: 'web', destinations: ['b', 'c'], attempt: 0, startChild });
 * r.winner; // 'c', or undefined when none booted (the VM runs here again)
 * ```
 */
export async function runFanOutAttempt(o: FanOutAttemptOptions): Promise<AttemptResult> {
  const { host, vm, id } = o;
  const capability = host.driver.capabilities.fanOut;
  if (!capability) throw new Error(`the ${host.driver.name} driver has no fanOut capability`);
  const vmElement = `vm:${vm}`;
  const scope = host.objects.subtree(vmElement).map((e) => e.id);
  const wasRunning = host.driver.get(vm)?.state === 'running';
  o.journal.begin(id, vm, o.destinations);
  const started = performance.now();
  const ids = o.destinations.map((d) => childId(id, d));
  const pw = o.prewarm;
  const shared = new FanOutShared(host, vm, ids, { prewarm: pw !== undefined });
  let session: FanOutSession | undefined;
  let held = false;
  let detached = false;
  // The hold and the detach happen once, before any child ships state: from here every event for
  // the VM's elements is held, and each child ships it once to its destination (its own cursor).
  // A pre-warm does both at its command instead.
  const holdAndDetach = async (): Promise<void> => {
    host.sensors.hold(scope);
    held = true;
    await host.runtime.detach(scope, { keepState: true });
    detached = true;
    shared.eventsHeld = true;
  };
  try {
    if (pw && !capability.prewarm) throw new Error(`the ${host.driver.name} driver cannot hold a copy for a pre-warm`);
    if (!pw) await holdAndDetach();
    session = capability.begin(vm, o.destinations);
  } catch (e) {
    if (detached) await attachAll(host, scope);
    if (held) host.sensors.release(scope);
    o.journal.finish(id, 'aborted', `could not start: ${describeError(e)}`);
    throw e;
  }
  const s = session;

  let state = startFanOut(id, o.destinations);
  const verdicts = new Map(o.destinations.map((d) => [d, deferred<FanOutVerdict>()]));
  const children = new Map<string, ChildHandle>();
  const summaries = new Map<string, MigrationSummary>();
  const bootAt = new Map<string, number>();
  let takeBackReason: string | undefined;
  /** The destination given the commit verdict (after its claim was journaled). */
  let committedTo: string | undefined;
  /**
   * A pre-warm's command naming one destination drops the others in two steps: their copies stop at
   * the command, their children (the Abort, the destination's discard, the links' close) are told
   * once the named one's child ended. Told at the command, their tear-down on these two cores ran
   * inside the named one's downtime (warming b alone switched in ~14 ms where b and c took ~22, same
   * runs). A parked child's copy waits for its own roll-back, which aborts its signal first.
   */
  const copies = new Map<string, AbortController>();
  let parking = false;
  const parked: { readonly dest: string; readonly reason: string }[] = [];
  const dropCopy = (dest: string): boolean => {
    const c = copies.get(dest);
    c?.abort(new Error(`${dest} was not named by the migrate command`));
    return c !== undefined;
  };
  const tellParked = (): void => {
    for (const p of parked.splice(0)) children.get(p.dest)?.terminate(p.reason);
  };

  const apply = (input: FanOutInput): void => {
    const step = decide(state, input);
    // A report that changes nothing (the named winner's own ready, after the stop) costs no transaction.
    if (step.state === state && step.effects.length === 0) return;
    state = step.state;
    // One transaction per step: the winner's claim and every terminated child's phase are one write,
    // not one per destination. Nothing a destination is told waits for it: an Abort may leave before
    // the commit (telling a loser to discard is safe at any time), the winner's MigrationComplete
    // only after it (its child goes on in a later microtask, once the verdict below resolves).
    host.store.transaction(() => {
      o.onState?.(state);
      for (const effect of step.effects) carryOut(effect);
    });
  };
  const carryOut = (e: FanOutEffect): void => {
    switch (e.type) {
      case 'journalWinner': {
        // Before anyone is told: a source killed from here on finds this winner on restart.
        const stands = o.journal.claimWinner(id, e.dest);
        if (stands !== e.dest) throw new Error(`fan-out ${id}: ${stands} is journaled as the winner, not ${e.dest}`);
        return;
      }
      case 'terminate':
        verdicts.get(e.dest)?.resolve({ commit: false, reason: e.reason });
        if (parking && dropCopy(e.dest)) {
          parked.push({ dest: e.dest, reason: e.reason });
          return;
        }
        children.get(e.dest)?.terminate(e.reason);
        return;
      case 'commit':
        committedTo = e.dest;
        verdicts.get(e.dest)?.resolve({ commit: true });
        return;
      case 'takeBack':
        takeBackReason = e.reason;
        return;
      case 'finishSource':
      case 'resolveWinner':
        // The winner's own child finishes the source (drop, forwarding) as a single migration does.
        return;
    }
  };

  // Every child's journal rows (its begin, its first phase) in one transaction; their requests go out after it.
  host.store.transaction(() => {
    for (const dest of o.destinations) {
      const cid = childId(id, dest);
      const handle = o.startChild(dest, cid, {
        shared,
        move: (name, options) => {
          if (!pw) return s.migrateOut(dest, options);
          const own = options.signal;
          const copy = new AbortController();
          if (own) copies.set(dest, copy);
          const moved = s.migrateOut(dest, {
            ...options,
            ...(own ? { signal: AbortSignal.any([own, copy.signal]) } : {}),
            prewarm: pw.gate,
            onProgress: (p) => {
              pw.record(dest, p);
              options.onProgress?.(p);
            },
          });
          if (!own) return moved;
          // Dropped at the command (parked): the child hears of its copy's end only when it is told, after the switch.
          return moved.catch(async (e: unknown) => {
            if (copy.signal.aborted && !own.aborted) await new Promise((r) => own.addEventListener('abort', r, { once: true }));
            throw e;
          });
        },
        bootReady: () => {
          bootAt.set(dest, performance.now() - started);
          apply({ type: 'bootReady', dest, atMs: performance.now() - started });
        },
        awaitDecision: () => verdicts.get(dest)!.promise,
        chosen: () => committedTo === dest,
        sole: () => pw?.selected?.length === 1 && pw.selected[0] === dest,
        commandedAt: () => pw?.commandedAt,
      });
      children.set(dest, handle);
      // A child that ends before its copy (denied, refused) is not waited for by a one-stream driver.
      void handle.done.finally(() => s.withdraw?.(dest)).catch(() => undefined);
      if (pw) void handle.done.finally(() => pw.end(dest));
    }
  });
  /** A pre-warm's command at work: the take-back waits for it (a detach half done must finish first). */
  let commandWork: Promise<void> | undefined;
  let over = false;
  if (pw) {
    void pw.commanded.then((selected) => {
      if (over) return;
      shared.commandedPerf = performance.now();
      commandWork = (async () => {
      try {
        const dropped = o.destinations.filter((d) => !selected.includes(d));
        if (selected.length === 1) {
          // Named alone, the winner is known now: journaled (write-once) and given its verdict here, with the
          // VM running, so nothing is decided after the stop. A source killed from here on finds this winner
          // and asks it (recoverFanOut): a destination asked before its commit discards, and the VM runs here again.
          parking = true;
          try {
            apply({ type: 'named', dest: selected[0]! });
          } finally {
            parking = false;
          }
          faultPoint('source:winnerNamed');
        }
        // Several named (they race), or the one named had ended meanwhile (nothing decided): the others are told now.
        if (state.winner === undefined) {
          for (const dest of dropped) {
            const reason = `terminated: not named by the migrate command (migration ${id})`;
            verdicts.get(dest)?.resolve({ commit: false, reason });
            children.get(dest)?.terminate(reason);
          }
        }
        // The hold starts at the command: what the embots did before is in their state and the elements.
        await holdAndDetach();
        // Frozen now: packed here, with the VM still running, not in each child's final round after the stop.
        shared.freezeEmbots(pack(host.runtime.exportEmbots(scope)));
        while (!pw.readyToSwitch()) await new Promise((r) => setTimeout(r, PREWARM_POLL_MS));
      } catch (e) {
        host.logger.warn(`pre-warm ${id}: the command failed; its destinations are terminated`, { error: describeError(e) });
        parked.length = 0;
        for (const h of children.values()) h.terminate(`terminated: the migrate command failed (${describeError(e)})`);
      } finally {
        shared.liftedPerf = performance.now();
        pw.gate.lift();
      }
      })();
    });
  }

  await Promise.all(
    o.destinations.map(async (dest) => {
      const summary = await children.get(dest)!.done;
      summaries.set(dest, summary);
      if (state.winner === dest) {
        tellParked();
        apply(summary.outcome === 'completed' ? { type: 'winnerCommitted' } : { type: 'winnerNotCommitted', reason: summary.reason ?? summary.outcome });
        return;
      }
      const d = state.destinations.find((x) => x.name === dest);
      if (d && !isFinalStatus(d.status)) apply(childEnd(dest, summary));
    }),
  );
  over = true;
  await commandWork;
  s.close();
  if (o.stopping?.()) throw new Error(`the agent stopped during fan-out ${id}; its restart settles it`);

  const won = state.phase === 'completed' ? state.winner : undefined;
  if (won === undefined) {
    takeBackReason ??= 'no destination owns the VM';
    // Every child ended (their copies cancelled and settled): the VM, its embots and its held events come back here.
    try {
      const st = host.driver.get(vm)?.state;
      // qemu: a stream that completed leaves the VM 'migrated' in its QEMU; start() takes it back with cont.
      if (shared.vmStopped && wasRunning && (st === 'stopped' || st === 'migrated')) await host.driver.start(vm);
      await shared.udpPaused;
      if (shared.switchedOver) host.udp.resumeAfterAbort(vm);
    } catch (e) {
      host.logger.warn(`fan-out ${id}: could not restart VM ${vm}`, { error: describeError(e) });
    } finally {
      shared.unmute();
    }
    // A pre-warm never commanded held nothing: its embots ran here all along.
    if (detached) await attachAll(host, scope);
    if (held) host.sensors.release(scope);
    o.journal.finish(id, 'aborted', takeBackReason);
  } else {
    o.journal.finish(id, 'completed');
  }

  const destinations = state.destinations.map((d): DestinationReport => {
    const sum = summaries.get(d.name);
    const reason = d.reason ?? (d.status === 'won' ? undefined : sum?.reason);
    // A pre-warm's destination the command did not name was terminated, whatever the decision saw.
    const notNamed = pw?.selected !== undefined && !pw.selected.includes(d.name);
    const outcome: DestinationOutcome = notNamed ? 'terminated' : d.status === 'ready' || d.status === 'copying' ? 'failed' : d.status;
    return {
      name: d.name,
      migrationId: childId(id, d.name),
      outcome,
      ...(reason === undefined ? {} : { reason }),
      phases: sum?.phases ?? [],
      bootReadyMs: bootAt.has(d.name) ? Math.round(bootAt.get(d.name)!) : null,
      bytes: sum?.bytes ?? 0,
      attempt: o.attempt,
    };
  });
  return { winner: won, winnerSummary: won === undefined ? undefined : summaries.get(won), destinations, ...(won === undefined ? { reason: takeBackReason } : {}) };
}

/** How a child that ended before the decision counts: denied, failed to boot, or failed otherwise. */
function childEnd(dest: string, s: MigrationSummary): FanOutInput {
  const reason = s.reason ?? s.outcome;
  if (s.outcome === 'denied') return { type: 'denied', dest, reason };
  if (reason.startsWith('bootIncoming ')) return { type: 'bootFailed', dest, reason };
  return { type: 'failed', dest, reason };
}

export interface FanOutPlan {
  readonly destinations: readonly string[];
  /** Tries of the same set after the first, while none boots. */
  readonly retries: number;
  /** Tried once after the retries, when none of the set booted. */
  readonly fallback: readonly string[];
}

export interface FanOutResult {
  readonly winner: string | undefined;
  readonly winnerSummary: MigrationSummary | undefined;
  readonly destinations: readonly DestinationReport[];
  /** Attempts after the first (retries of the set, and the fallback set). */
  readonly retries: number;
  readonly reason?: string;
}

/** The attempts of a plan in order: the set, its retries, then the fallback set; with their ids. */
export function attemptsOf(id: string, plan: FanOutPlan): { readonly id: string; readonly destinations: readonly string[] }[] {
  const out = [{ id, destinations: plan.destinations }];
  for (let r = 1; r <= plan.retries; r++) out.push({ id: `${id}.r${r}`, destinations: plan.destinations });
  if (plan.fallback.length > 0) out.push({ id: `${id}.f`, destinations: plan.fallback });
  return out;
}

/**
 * The whole migration: attempts until one has a winner (the VM runs here again between them).
 *
 * @example
 * ```ts
 * const r = await runFanOut({ ..., id: 'm-1' }, { destinations: ['b', 'c'], retries: 1, fallback: ['d'] });
 * ```
 */
export interface FanOutRunOptions extends Omit<FanOutAttemptOptions, 'destinations' | 'attempt'> {
  readonly onAttempt?: (attempt: number, id: string) => void;
  /** Asked before each retry: true stops (cancelled by the operator, the agent stopping). */
  readonly cancelled?: () => boolean;
}

export async function runFanOut(o: FanOutRunOptions, plan: FanOutPlan): Promise<FanOutResult> {
  const reports: DestinationReport[] = [];
  const attempts = attemptsOf(o.id, plan);
  let reason: string | undefined;
  let made = 0;
  for (const [i, a] of attempts.entries()) {
    if (i > 0 && (o.cancelled?.() || o.stopping?.())) break;
    made = i;
    o.onAttempt?.(i, a.id);
    const r = await runFanOutAttempt({ ...o, id: a.id, destinations: a.destinations, attempt: i });
    reports.push(...r.destinations);
    if (r.winner !== undefined) return { winner: r.winner, winnerSummary: r.winnerSummary, destinations: reports, retries: i };
    reason = r.reason;
  }
  return { winner: undefined, winnerSummary: undefined, destinations: reports, retries: made, ...(reason === undefined ? {} : { reason }) };
}
