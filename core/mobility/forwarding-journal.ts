import { pack } from 'msgpackr';
import type Database from 'better-sqlite3';
import type { Store } from '../store/store.ts';
import type { EmbotEvent } from '../events.ts';

/** What a completed migration moved, to whom, and until when events for it are forwarded there. */
export interface ForwardRecord {
  readonly migrationId: string;
  readonly vm: string;
  /** The new owner's peer name. */
  readonly peer: string;
  /** The VM element and its dependents. */
  readonly elementIds: readonly string[];
  /** End of the grace period, ms since epoch. */
  readonly until: number;
}

/** A forwarding as journaled, with what it has done so far. */
export interface ForwardingRow extends ForwardRecord {
  /** Hold-queue bytes of events held after the last dirty round that the peer has not taken yet. */
  readonly rest: Uint8Array | undefined;
  readonly forwarded: number;
  readonly deadLettered: number;
  readonly ended: boolean;
}

/** Where an element went: the tombstone kept for refusals. */
export interface MovedElement {
  readonly owner: string;
  readonly migrationId: string;
}

interface Raw {
  migration_id: string;
  vm: string;
  peer: string;
  element_ids: string;
  until: number;
  rest: Buffer | null;
  forwarded: number;
  dead_lettered: number;
  ended: number;
}

/** The dead-letter "embot" of events a forwarding could not hand over: `forward:<migrationId>`. */
export const forwardDeadLetterId = (migrationId: string): string => `forward:${migrationId}`;

/**
 * Tables `forwardings`, `moved_elements` and `forwarded_in` (schema step 6): the source's durable
 * record of a completed migration's forwarding and tombstones, and the new owner's record of the
 * forwarded event ids it took.
 */
export class ForwardingJournal {
  private readonly insertStmt: Database.Statement;
  private readonly tombstoneStmt: Database.Statement;
  private readonly openStmt: Database.Statement<[], Raw>;
  private readonly getStmt: Database.Statement<[string], Raw>;
  private readonly restTakenStmt: Database.Statement;
  private readonly forwardedStmt: Database.Statement;
  private readonly deadStmt: Database.Statement;
  private readonly endStmt: Database.Statement;
  private readonly movedStmt: Database.Statement<[string], { owner: string; migration_id: string }>;
  private readonly deadLetterStmt: Database.Statement;
  private readonly seenStmt: Database.Statement<[string], { n: number }>;
  private readonly rememberStmt: Database.Statement;
  private readonly pruneStmt: Database.Statement;
  private prunedAt = 0;

  constructor(private readonly store: Store) {
    const db = store.db;
    this.insertStmt = db.prepare('INSERT OR REPLACE INTO forwardings(migration_id, vm, peer, element_ids, until, rest, forwarded, dead_lettered, ended) VALUES (?, ?, ?, ?, ?, ?, 0, 0, 0)');
    this.tombstoneStmt = db.prepare('INSERT OR REPLACE INTO moved_elements(element_id, owner, migration_id, at) VALUES (?, ?, ?, ?)');
    this.openStmt = db.prepare('SELECT * FROM forwardings WHERE ended = 0 ORDER BY until');
    this.getStmt = db.prepare('SELECT * FROM forwardings WHERE migration_id = ?');
    this.restTakenStmt = db.prepare('UPDATE forwardings SET rest = NULL WHERE migration_id = ?');
    this.forwardedStmt = db.prepare('UPDATE forwardings SET forwarded = forwarded + ? WHERE migration_id = ?');
    this.deadStmt = db.prepare('UPDATE forwardings SET dead_lettered = dead_lettered + ? WHERE migration_id = ?');
    this.endStmt = db.prepare('UPDATE forwardings SET ended = 1, rest = NULL WHERE migration_id = ?');
    this.movedStmt = db.prepare('SELECT owner, migration_id FROM moved_elements WHERE element_id = ?');
    this.deadLetterStmt = db.prepare('INSERT OR IGNORE INTO dead_letters(id, embot_id, event, reason, at) VALUES (?, ?, ?, ?, ?)');
    this.seenStmt = db.prepare('SELECT count(*) AS n FROM forwarded_in WHERE id = ?');
    this.rememberStmt = db.prepare('INSERT OR IGNORE INTO forwarded_in(id, at) VALUES (?, ?)');
    this.pruneStmt = db.prepare('DELETE FROM forwarded_in WHERE at < ?');
  }

  /** The forwarding and its tombstones; call it inside the transaction that drops the moved elements. */
  record(rec: ForwardRecord, rest: Uint8Array | undefined): void {
    const now = Date.now();
    this.insertStmt.run(rec.migrationId, rec.vm, rec.peer, JSON.stringify(rec.elementIds), rec.until, rest && rest.byteLength > 0 ? Buffer.from(rest) : null);
    for (const id of rec.elementIds) this.tombstoneStmt.run(id, rec.peer, rec.migrationId, now);
  }

  /** Forwardings whose grace period has not been settled yet (a restarted source resumes them). */
  open(): ForwardingRow[] {
    return this.openStmt.all().map(fromRaw);
  }

  get(migrationId: string): ForwardingRow | undefined {
    const r = this.getStmt.get(migrationId);
    return r && fromRaw(r);
  }

  restTaken(migrationId: string, accepted: number): void {
    this.store.transaction(() => {
      this.restTakenStmt.run(migrationId);
      this.forwardedStmt.run(accepted, migrationId);
    });
  }

  countForwarded(migrationId: string, n: number): void {
    this.forwardedStmt.run(n, migrationId);
  }

  /** Dead letters with why, counted once each (a letter written again after a crash is ignored). */
  deadLetter(migrationId: string, events: readonly EmbotEvent[], reason: string): number {
    const now = Date.now();
    const embotId = forwardDeadLetterId(migrationId);
    let n = 0;
    this.store.transaction(() => {
      for (const e of events) n += this.deadLetterStmt.run(`${e.id}@${embotId}`, embotId, pack(e), reason, now).changes;
      this.deadStmt.run(n, migrationId);
    });
    return n;
  }

  end(migrationId: string): void {
    this.endStmt.run(migrationId);
  }

  movedTo(elementId: string): MovedElement | undefined {
    const r = this.movedStmt.get(elementId);
    return r && { owner: r.owner, migrationId: r.migration_id };
  }

  // ---- the new owner's side ----

  /** Which of these forwarded ids this agent already took. */
  seen(ids: readonly string[]): Set<string> {
    const out = new Set<string>();
    for (const id of ids) if (this.seenStmt.get(id)!.n > 0) out.add(id);
    return out;
  }

  /** Records forwarded ids taken here; rows older than `keepMs` go (a scan of the table, so at most once a minute). */
  remember(ids: readonly string[], keepMs: number): void {
    const now = Date.now();
    const prune = now - this.prunedAt >= 60_000;
    this.store.transaction(() => {
      for (const id of ids) this.rememberStmt.run(id, now);
      if (prune) this.pruneStmt.run(now - keepMs);
    });
    if (prune) this.prunedAt = now;
  }
}

function fromRaw(r: Raw): ForwardingRow {
  return {
    migrationId: r.migration_id,
    vm: r.vm,
    peer: r.peer,
    elementIds: JSON.parse(r.element_ids) as string[],
    until: r.until,
    rest: r.rest ? new Uint8Array(r.rest) : undefined,
    forwarded: r.forwarded,
    deadLettered: r.dead_lettered,
    ended: r.ended === 1,
  };
}
