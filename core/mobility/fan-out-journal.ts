import type Database from 'better-sqlite3';
import { ErrorCodes, ProtocolError } from '../errors.ts';
import type { Store } from '../store/store.ts';

export type FanOutJournalOutcome = 'completed' | 'aborted';

export interface FanOutRow {
  readonly id: string;
  readonly vm: string;
  /** In the order given on the command line. */
  readonly destinations: readonly string[];
  readonly winner: string | undefined;
  readonly winnerAt: number | undefined;
  readonly outcome: FanOutJournalOutcome | undefined;
  readonly reason: string | undefined;
  readonly startedAt: number;
  readonly updatedAt: number;
}

interface Raw {
  id: string;
  vm: string;
  destinations: string;
  winner: string | null;
  winner_at: number | null;
  outcome: string | null;
  reason: string | null;
  started_at: number;
  updated_at: number;
}

/**
 * The source's journal of migrations to several destinations (table `fan_outs`): which
 * destinations, and the one winner. `claimWinner` writes the winner once, in one statement, before
 * the coordinator tells anyone (README "Several destinations"): a source restarted at any point
 * reads here whether some destination may have been told to commit, and which.
 *
 * @example
 * ```ts
 * const j = new FanOutJournal(store);
 * j.begin('m-1', 'web', ['b', 'c']);
 * j.claimWinner('m-1', 'c'); // 'c'
 * j.claimWinner('m-1', 'b'); // still 'c': the first claim stands
 * ```
 */
export class FanOutJournal {
  private readonly insertStmt: Database.Statement;
  private readonly claimStmt: Database.Statement;
  private readonly finishStmt: Database.Statement;
  private readonly getStmt: Database.Statement<[string], Raw>;
  private readonly openStmt: Database.Statement<[], Raw>;
  private readonly attemptsStmt: Database.Statement<[string, string], Raw>;

  constructor(store: Store) {
    const db = store.db;
    this.insertStmt = db.prepare('INSERT INTO fan_outs(id, vm, destinations, started_at, updated_at) VALUES (?, ?, ?, ?, ?)');
    // One statement on the decision's path: it claims only for a destination of the row (json_each), so a
    // claim that changed the row needs no second look; one that did not is explained by reading the row.
    this.claimStmt = db.prepare(
      'UPDATE fan_outs SET winner = ?, winner_at = ?, updated_at = ? WHERE id = ? AND winner IS NULL AND outcome IS NULL AND EXISTS (SELECT 1 FROM json_each(fan_outs.destinations) WHERE value = ?)',
    );
    this.finishStmt = db.prepare('UPDATE fan_outs SET outcome = ?, reason = ?, updated_at = ? WHERE id = ? AND outcome IS NULL');
    this.getStmt = db.prepare('SELECT * FROM fan_outs WHERE id = ?');
    this.openStmt = db.prepare('SELECT * FROM fan_outs WHERE outcome IS NULL ORDER BY started_at');
    this.attemptsStmt = db.prepare('SELECT * FROM fan_outs WHERE id = ? OR id LIKE ? ORDER BY started_at, rowid');
  }

  begin(id: string, vm: string, destinations: readonly string[]): void {
    const now = Date.now();
    this.insertStmt.run(id, vm, JSON.stringify(destinations), now, now);
  }

  /**
   * Journals `dest` as the winner unless one is journaled already; returns the winner that stands.
   * The caller commits `dest` only when that is `dest`.
   *
   * @throws ProtocolError `EMBOT_ERR_MIGRATION_UNKNOWN` for no such fan-out, `EMBOT_ERR_MIGRATION_MISMATCH`
   *   for a `dest` not among its destinations, `EMBOT_ERR_MIGRATION_PHASE` for one already ended without a winner.
   */
  claimWinner(id: string, dest: string): string {
    const now = Date.now();
    if (this.claimStmt.run(dest, now, now, id, dest).changes === 1) return dest;
    const row = this.get(id);
    if (!row) throw new ProtocolError(ErrorCodes.MIGRATION_UNKNOWN, `no fan-out migration ${id} in the journal`);
    if (!row.destinations.includes(dest)) throw new ProtocolError(ErrorCodes.MIGRATION_MISMATCH, `${dest} is not a destination of migration ${id} (${row.destinations.join(', ')})`);
    if (row.winner === undefined) throw new ProtocolError(ErrorCodes.MIGRATION_PHASE, `migration ${id} already ended (${row.outcome ?? 'unknown'}) without a winner`);
    return row.winner;
  }

  finish(id: string, outcome: FanOutJournalOutcome, reason?: string): void {
    this.finishStmt.run(outcome, reason ?? null, Date.now(), id);
  }

  get(id: string): FanOutRow | undefined {
    const r = this.getStmt.get(id);
    return r && fromRaw(r);
  }

  /** The attempts of migration `id`: itself, its retries (`<id>.rN`) and its fallback (`<id>.f`), oldest first. */
  attemptsOf(id: string): FanOutRow[] {
    return this.attemptsStmt.all(id, `${id}.%`).map(fromRaw);
  }

  /** Fan-outs without an outcome: running, or cut by a crash (recoverFanOut decides what follows). */
  unfinished(): FanOutRow[] {
    return this.openStmt.all().map(fromRaw);
  }
}

function fromRaw(r: Raw): FanOutRow {
  return {
    id: r.id,
    vm: r.vm,
    destinations: JSON.parse(r.destinations) as string[],
    winner: r.winner ?? undefined,
    winnerAt: r.winner_at ?? undefined,
    outcome: (r.outcome ?? undefined) as FanOutJournalOutcome | undefined,
    reason: r.reason ?? undefined,
    startedAt: r.started_at,
    updatedAt: r.updated_at,
  };
}
