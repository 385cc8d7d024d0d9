/**
 * The decision of a migration to several destinations (issue 13, README "Several destinations"):
 * which destination wins, whom to terminate, when the source takes its VM back. Pure: the
 * coordinator feeds it what its child migrations report and carries out the effects in the
 * order given. The order is the safety argument: `journalWinner` always comes before any
 * `terminate` or `commit`, so a source killed at any point finds on restart either no winner
 * (nobody was told to commit: take the VM back) or the one winner it may have told.
 */
import { ErrorCodes, ProtocolError } from '../errors.ts';

/** How one destination ended, as the summary and `embot migrations` show it. */
export type DestinationOutcome = 'won' | 'terminated' | 'bootFailed' | 'denied' | 'failed';

export type DestinationStatus = 'copying' | 'ready' | DestinationOutcome;

export interface DestinationState {
  readonly name: string;
  readonly status: DestinationStatus;
  readonly reason?: string;
  /** ms since the fan-out started when its BootReady reached the source. */
  readonly bootReadyMs?: number;
}

export type FanOutPhase = 'racing' | 'committing' | 'completed' | 'takingBack';

export interface FanOutState {
  readonly migrationId: string;
  readonly phase: FanOutPhase;
  readonly winner: string | undefined;
  readonly destinations: readonly DestinationState[];
}

/** What the coordinator learns, from the child migrations or from the winner's commit. */
export type FanOutInput =
  /** The destination's VM is booted to its last reversible point (BootReady reached the source). */
  | { readonly type: 'bootReady'; readonly dest: string; readonly atMs: number }
  /**
   * A pre-warm's migrate command named `dest` alone: nothing is left to race, so it wins now, at the
   * command, before the VM stops (its final round and MigrationComplete follow the copy as usual).
   */
  | { readonly type: 'named'; readonly dest: string }
  | { readonly type: 'bootFailed'; readonly dest: string; readonly reason: string }
  /** The destination's migration policy said no (MigrationDenied). */
  | { readonly type: 'denied'; readonly dest: string; readonly reason: string }
  /** The child migration ended before a boot report (a step failed, timed out, the link dropped). */
  | { readonly type: 'failed'; readonly dest: string; readonly reason: string }
  | { readonly type: 'winnerCommitted' }
  /** The winner surely did not commit (it answered so, or has no record of the migration). */
  | { readonly type: 'winnerNotCommitted'; readonly reason: string };

export type FanOutEffect =
  /** Write the winner to the journal, once, before anything else is sent. */
  | { readonly type: 'journalWinner'; readonly dest: string }
  /** Abort the child migration to `dest` with `reason`: its target discards everything. */
  | { readonly type: 'terminate'; readonly dest: string; readonly reason: string }
  /** Send the winner MigrationComplete. */
  | { readonly type: 'commit'; readonly dest: string }
  /** After a restart: ask the journaled winner whether it committed (MigrationStatusQuery). */
  | { readonly type: 'resolveWinner'; readonly dest: string }
  /** The winner committed: drop the VM here, forward late events to the winner. */
  | { readonly type: 'finishSource'; readonly winner: string }
  /** No destination will own the VM: restart it here, resume its embots. */
  | { readonly type: 'takeBack'; readonly reason: string };

export interface FanOutStep {
  readonly state: FanOutState;
  readonly effects: readonly FanOutEffect[];
}

const FINAL: ReadonlySet<DestinationStatus> = new Set(['won', 'terminated', 'bootFailed', 'denied', 'failed']);

export function isFinalStatus(s: DestinationStatus): boolean {
  return FINAL.has(s);
}

/** A fan-out that has just started every child migration. */
export function startFanOut(migrationId: string, destinations: readonly string[]): FanOutState {
  return { migrationId, phase: 'racing', winner: undefined, destinations: destinations.map((name) => ({ name, status: 'copying' })) };
}

/**
 * One step of the decision. Reports about a destination already ended (a BootReady that crossed
 * its termination, a failure after it) change nothing.
 *
 * @throws ProtocolError `EMBOT_ERR_MIGRATION_MISMATCH` for a destination not in the fan-out.
 * @example
 * ```ts
 * let s = startFanOut('m-1', ['b', 'c']);
 * ({ state: s, effects } = decide(s, { type: 'bootReady', dest: 'c', atMs: 40 }));
 * // effects: journalWinner c, terminate b, commit c
 * ```
 */
export function decide(state: FanOutState, input: FanOutInput): FanOutStep {
  switch (input.type) {
    case 'winnerCommitted':
      if (state.phase !== 'committing' || state.winner === undefined) return { state, effects: [] };
      return { state: withDest({ ...state, phase: 'completed' }, state.winner, { status: 'won' }), effects: [{ type: 'finishSource', winner: state.winner }] };
    case 'winnerNotCommitted':
      if (state.phase !== 'committing' || state.winner === undefined) return { state, effects: [] };
      return {
        state: withDest({ ...state, phase: 'takingBack' }, state.winner, { status: 'failed', reason: `booted first but did not commit: ${input.reason}` }),
        effects: [{ type: 'takeBack', reason: `winner ${state.winner} did not commit: ${input.reason}` }],
      };
    default:
      break;
  }
  const dest = destOf(state, input.dest);
  if (isFinalStatus(dest.status) || state.phase === 'completed' || state.phase === 'takingBack') return { state, effects: [] };
  if (input.type === 'bootReady' || input.type === 'named') {
    if (state.phase === 'committing') return { state, effects: [] };
    const winner = input.dest;
    const reason = input.type === 'named' ? `terminated: not named by the migrate command (migration ${state.migrationId})` : `terminated: ${winner} booted first (migration ${state.migrationId})`;
    const losers = state.destinations.filter((d) => d.name !== winner && !isFinalStatus(d.status));
    let next: FanOutState = withDest({ ...state, phase: 'committing', winner }, winner, input.type === 'named' ? { status: 'ready' } : { status: 'ready', bootReadyMs: input.atMs });
    for (const l of losers) next = withDest(next, l.name, { status: 'terminated', reason });
    return {
      state: next,
      effects: [{ type: 'journalWinner', dest: winner }, ...losers.map((l): FanOutEffect => ({ type: 'terminate', dest: l.name, reason })), { type: 'commit', dest: winner }],
    };
  }
  const status: DestinationOutcome = input.type;
  // The winner failing before its commit is answered is settled by winnerCommitted / winnerNotCommitted.
  if (state.phase === 'committing' && input.dest === state.winner) return { state, effects: [] };
  const next = withDest(state, input.dest, { status, reason: input.reason });
  if (next.phase === 'racing' && next.destinations.every((d) => isFinalStatus(d.status))) {
    const why = next.destinations.map((d) => `${d.name}: ${d.status}${d.reason ? ` (${d.reason})` : ''}`).join('; ');
    return { state: { ...next, phase: 'takingBack' }, effects: [{ type: 'takeBack', reason: `no destination booted: ${why}` }] };
  }
  return { state: next, effects: [] };
}

/**
 * What a source restarted mid-fan-out does, from its journal alone: with no winner journaled
 * nobody was told to commit, so it terminates every destination and takes the VM back; with one,
 * it terminates the others and asks the winner whether it committed (the single path's resolving:
 * a target asked discards an uncommitted migration before it answers, so the answer is final).
 *
 * @throws ProtocolError `EMBOT_ERR_MIGRATION_MISMATCH` when the journaled winner is not a destination.
 */
export function recoverFanOut(migrationId: string, destinations: readonly string[], journaledWinner: string | undefined): FanOutStep {
  const start = startFanOut(migrationId, destinations);
  if (journaledWinner === undefined) {
    const reason = `terminated: the source restarted before any destination won (migration ${migrationId})`;
    return {
      state: { ...start, phase: 'takingBack', destinations: start.destinations.map((d) => ({ ...d, status: 'terminated', reason })) },
      effects: [...destinations.map((dest): FanOutEffect => ({ type: 'terminate', dest, reason })), { type: 'takeBack', reason: 'the source restarted before any destination won' }],
    };
  }
  if (!destinations.includes(journaledWinner)) throw new ProtocolError(ErrorCodes.MIGRATION_MISMATCH, `journaled winner ${journaledWinner} is not a destination of migration ${migrationId}`);
  const reason = `terminated: ${journaledWinner} booted first (migration ${migrationId})`;
  return {
    state: {
      ...start,
      phase: 'committing',
      winner: journaledWinner,
      destinations: start.destinations.map((d) => (d.name === journaledWinner ? { ...d, status: 'ready' } : { ...d, status: 'terminated', reason })),
    },
    effects: [...destinations.filter((d) => d !== journaledWinner).map((dest): FanOutEffect => ({ type: 'terminate', dest, reason })), { type: 'resolveWinner', dest: journaledWinner }],
  };
}

function destOf(state: FanOutState, name: string): DestinationState {
  const d = state.destinations.find((x) => x.name === name);
  if (!d) throw new ProtocolError(ErrorCodes.MIGRATION_MISMATCH, `${name} is not a destination of migration ${state.migrationId}`);
  return d;
}

function withDest(state: FanOutState, name: string, patch: Omit<Partial<DestinationState>, 'name'>): FanOutState {
  return { ...state, destinations: state.destinations.map((d) => (d.name === name ? { ...d, ...patch } : d)) };
}
