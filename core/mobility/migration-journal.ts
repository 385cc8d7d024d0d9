import type Database from 'better-sqlite3';
import type { Store } from '../store/store.ts';
import type { MigrationOutcome } from './mobility-contract.ts';

export type MigrationRole = 'source' | 'target';

/** Facts a restarted agent needs to resolve a migration it was part of. */
export interface MigrationNotes {
  /** The VM was running at the source before the move (restart it on roll-back; start it at the target). */
  readonly wasRunning?: boolean;
  /** The source stopped the VM for the copy. */
  readonly vmStopped?: boolean;
  /** Element ids that moved (the VM element and its dependents). */
  readonly scope?: readonly string[];
  readonly summary?: unknown;
  /** The row of a migration to several destinations (its children are `<attempt id>~<peer>` rows; fan-out.ts). */
  readonly fanOut?: boolean;
  /** Target: the source's hand-over of the events it held is awaited (forwarding-hand-over.ts), or came. */
  readonly handOver?: 'pending' | 'done';
}

export interface MigrationRow {
  readonly id: string;
  readonly role: MigrationRole;
  readonly vm: string;
  readonly peer: string;
  readonly phase: string;
  readonly outcome: MigrationOutcome | undefined;
  readonly reason: string | undefined;
  readonly startedAt: number;
  readonly updatedAt: number;
  readonly notes: MigrationNotes;
}

interface Raw {
  id: string;
  role: MigrationRole;
  vm: string;
  peer: string;
  phase: string;
  outcome: string | null;
  reason: string | null;
  started_at: number;
  updated_at: number;
  summary: string | null;
}

/**
 * Each side's migration phase in SQLite, written as the phase is entered, so that an agent
 * restarted mid-migration knows whether to finish or roll back.
 */
export class MigrationJournal {
  private readonly insert: Database.Statement;
  private readonly setPhaseStmt: Database.Statement;
  private readonly finishStmt: Database.Statement;
  private readonly notesStmt: Database.Statement;
  private readonly getStmt: Database.Statement<[string, string], Raw>;
  private readonly listStmt: Database.Statement<[number], Raw>;
  private readonly openStmt: Database.Statement<[], Raw>;
  private readonly handOverStmt: Database.Statement<[], Raw>;
  private readonly movesStmt: Database.Statement<[string], Raw>;

  constructor(store: Store) {
    const db = store.db;
    this.insert = db.prepare('INSERT INTO migrations(id, role, vm, peer, phase, started_at, updated_at, summary) VALUES (?, ?, ?, ?, ?, ?, ?, ?)');
    this.setPhaseStmt = db.prepare('UPDATE migrations SET phase = ?, updated_at = ? WHERE id = ? AND role = ?');
    this.finishStmt = db.prepare('UPDATE migrations SET phase = ?, outcome = ?, reason = ?, updated_at = ?, summary = ? WHERE id = ? AND role = ?');
    this.notesStmt = db.prepare('UPDATE migrations SET summary = ?, updated_at = ? WHERE id = ? AND role = ?');
    this.getStmt = db.prepare('SELECT * FROM migrations WHERE id = ? AND role = ?');
    this.listStmt = db.prepare('SELECT * FROM migrations ORDER BY started_at DESC LIMIT ?');
    this.openStmt = db.prepare('SELECT * FROM migrations WHERE outcome IS NULL ORDER BY started_at');
    this.handOverStmt = db.prepare("SELECT * FROM migrations WHERE role = 'target' AND json_extract(summary, '$.handOver') = 'pending' ORDER BY started_at");
    this.movesStmt = db.prepare("SELECT * FROM migrations WHERE vm = ? AND (outcome = 'completed' OR outcome IS NULL) ORDER BY updated_at DESC, rowid DESC LIMIT 50");
  }

  begin(id: string, role: MigrationRole, vm: string, peer: string, phase: string, notes: MigrationNotes = {}): void {
    const now = Date.now();
    this.insert.run(id, role, vm, peer, phase, now, now, JSON.stringify(notes));
  }

  phase(id: string, role: MigrationRole, phase: string): void {
    this.setPhaseStmt.run(phase, Date.now(), id, role);
  }

  notes(id: string, role: MigrationRole, notes: MigrationNotes): void {
    const prev = this.get(id, role)?.notes ?? {};
    this.notesStmt.run(JSON.stringify({ ...prev, ...notes }), Date.now(), id, role);
  }

  finish(id: string, role: MigrationRole, phase: string, outcome: MigrationOutcome, reason: string | undefined, summary?: unknown): void {
    const prev = this.get(id, role)?.notes ?? {};
    this.finishStmt.run(phase, outcome, reason ?? null, Date.now(), JSON.stringify(summary === undefined ? prev : { ...prev, summary }), id, role);
  }

  get(id: string, role: MigrationRole): MigrationRow | undefined {
    const r = this.getStmt.get(id, role);
    return r && fromRaw(r);
  }

  list(limit = 100): MigrationRow[] {
    return this.listStmt.all(limit).map(fromRaw);
  }

  /** Committed incoming migrations whose source has not handed over the events it held yet (finished or not). */
  pendingHandOvers(): MigrationRow[] {
    return this.handOverStmt.all().map(fromRaw);
  }

  /** VM `vm`'s migrations that completed or have no outcome yet, the latest first. */
  movesOf(vm: string): MigrationRow[] {
    return this.movesStmt.all(vm).map(fromRaw);
  }

  /** Migrations without an outcome: in progress, or interrupted by a crash. */
  unfinished(): MigrationRow[] {
    return this.openStmt.all().map(fromRaw);
  }
}

function fromRaw(r: Raw): MigrationRow {
  return {
    id: r.id,
    role: r.role,
    vm: r.vm,
    peer: r.peer,
    phase: r.phase,
    outcome: (r.outcome ?? undefined) as MigrationOutcome | undefined,
    reason: r.reason ?? undefined,
    startedAt: r.started_at,
    updatedAt: r.updated_at,
    notes: r.summary ? (JSON.parse(r.summary) as MigrationNotes) : {},
  };
}
