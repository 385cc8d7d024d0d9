import { pack, unpack } from 'msgpackr';
import type Database from 'better-sqlite3';
import type { Store } from '../core/store/store.ts';
import type { EmbotEvent } from '../core/events.ts';
import type { PolicyState } from './worker/worker-protocol.ts';

export type EmbotStatus = 'running' | 'quarantined' | 'disabled' | 'unloaded';

export interface EmbotRow {
  readonly id: string;
  readonly module: string;
  readonly type: string;
  readonly elementIds: readonly string[];
  readonly status: EmbotStatus;
  readonly error: string | undefined;
  readonly createdAt: number;
}

/** An event an embot could not take, kept with why. */
export interface DeadLetter {
  readonly embotId: string;
  readonly event: EmbotEvent;
  readonly reason: string;
  /** When it became a dead letter, ms since epoch. */
  readonly at: number;
}

/** An event waiting for its embot's module, as stored. */
export interface ParkedEvent {
  readonly seq: number;
  readonly event: EmbotEvent;
}

/** The runtime's tables: embots, their policy snapshots (with timers), parked events, dead letters. */
export class EmbotStore {
  private readonly upsertEmbot: Database.Statement;
  private readonly setStatusStmt: Database.Statement;
  private readonly deleteEmbotStmt: Database.Statement;
  private readonly upsertSnapshot: Database.Statement;
  private readonly selectSnapshots: Database.Statement<[string], { policy: string; snapshot: Buffer; timers: Buffer | null; updated_at: number }>;
  private readonly selectEmbot: Database.Statement<[string], RawEmbot>;
  private readonly selectAll: Database.Statement<[], RawEmbot>;
  private readonly insertDead: Database.Statement;
  private readonly countDead: Database.Statement<[], { n: number }>;
  private readonly selectDead: Database.Statement<[number], { embot_id: string; event: Buffer; reason: string; at: number }>;
  private readonly insertParked: Database.Statement;
  private readonly selectParked: Database.Statement<[string, number], { seq: number; event: Buffer }>;
  private readonly deleteParkedStmt: Database.Statement;
  private readonly countParkedFor: Database.Statement<[string], { n: number }>;
  private readonly countParked: Database.Statement<[], { n: number }>;

  constructor(readonly store: Store) {
    const db = store.db;
    this.upsertEmbot = db.prepare(
      `INSERT INTO embots(id, module, type, element_ids, status, error, created_at) VALUES (@id, @module, @type, @elementIds, @status, @error, @createdAt)
       ON CONFLICT(id) DO UPDATE SET element_ids = excluded.element_ids, status = excluded.status, error = excluded.error`,
    );
    this.setStatusStmt = db.prepare('UPDATE embots SET status = ?, error = ? WHERE id = ?');
    this.deleteEmbotStmt = db.prepare('DELETE FROM embots WHERE id = ?');
    this.upsertSnapshot = db.prepare(
      `INSERT INTO policy_snapshots(embot_id, policy, snapshot, timers, updated_at) VALUES (?, ?, ?, ?, ?)
       ON CONFLICT(embot_id, policy) DO UPDATE SET snapshot = excluded.snapshot, timers = excluded.timers, updated_at = excluded.updated_at`,
    );
    this.selectSnapshots = db.prepare('SELECT policy, snapshot, timers, updated_at FROM policy_snapshots WHERE embot_id = ?');
    this.selectEmbot = db.prepare('SELECT * FROM embots WHERE id = ?');
    this.selectAll = db.prepare('SELECT * FROM embots ORDER BY id');
    this.insertDead = db.prepare('INSERT OR IGNORE INTO dead_letters(id, embot_id, event, reason, at) VALUES (?, ?, ?, ?, ?)');
    this.countDead = db.prepare('SELECT count(*) AS n FROM dead_letters');
    this.selectDead = db.prepare('SELECT embot_id, event, reason, at FROM dead_letters ORDER BY at DESC, rowid DESC LIMIT ?');
    this.insertParked = db.prepare('INSERT INTO parked_events(embot_id, event, at) VALUES (?, ?, ?)');
    this.selectParked = db.prepare('SELECT seq, event FROM parked_events WHERE embot_id = ? ORDER BY seq LIMIT ?');
    this.deleteParkedStmt = db.prepare('DELETE FROM parked_events WHERE seq = ?');
    this.countParkedFor = db.prepare('SELECT count(*) AS n FROM parked_events WHERE embot_id = ?');
    this.countParked = db.prepare('SELECT count(*) AS n FROM parked_events');
  }

  saveEmbot(row: EmbotRow): void {
    this.upsertEmbot.run({ id: row.id, module: row.module, type: row.type, elementIds: JSON.stringify(row.elementIds), status: row.status, error: row.error ?? null, createdAt: row.createdAt });
  }

  setStatus(id: string, status: EmbotStatus, error?: string): void {
    this.setStatusStmt.run(status, error ?? null, id);
  }

  /** Deletes an embot with its snapshots; events still parked for it become dead letters (they are not dropped). */
  deleteEmbot(id: string, now: number, reason = 'its embot was removed before its module loaded'): void {
    this.store.transaction(() => {
      for (;;) {
        const rows = this.parked(id, 1000);
        if (rows.length === 0) break;
        for (const r of rows) this.deadLetter(id, r.event, reason, now);
        this.unpark(rows);
      }
      this.deleteEmbotStmt.run(id);
    });
  }

  getEmbot(id: string): EmbotRow | undefined {
    const r = this.selectEmbot.get(id);
    return r && fromRaw(r);
  }

  listEmbots(): EmbotRow[] {
    return this.selectAll.all().map(fromRaw);
  }

  saveSnapshot(embotId: string, policy: string, state: PolicyState, now: number): void {
    this.upsertSnapshot.run(embotId, policy, pack(state.snapshot), state.timers.length ? pack(state.timers) : null, now);
  }

  loadSnapshots(embotId: string): Record<string, PolicyState> {
    const out: Record<string, PolicyState> = {};
    for (const r of this.selectSnapshots.all(embotId)) {
      out[r.policy] = { snapshot: unpack(r.snapshot), timers: r.timers ? (unpack(r.timers) as PolicyState['timers']) : [] };
    }
    return out;
  }

  deadLetter(embotId: string, event: EmbotEvent, reason: string, now: number): void {
    this.insertDead.run(`${event.id}@${embotId}`, embotId, pack(event), reason, now);
  }

  deadLetterCount(): number {
    return this.countDead.get()!.n;
  }

  /** The newest `limit` dead letters, newest last. */
  deadLetters(limit: number): DeadLetter[] {
    return this.selectDead
      .all(limit)
      .reverse()
      .map((r) => ({ embotId: r.embot_id, event: unpack(r.event) as EmbotEvent, reason: r.reason, at: r.at }));
  }

  park(embotId: string, event: EmbotEvent, now: number): void {
    this.insertParked.run(embotId, pack(event), now);
  }

  /** The oldest `limit` events parked for an embot, in the order they were parked. */
  parked(embotId: string, limit: number): ParkedEvent[] {
    return this.selectParked.all(embotId, limit).map((r) => ({ seq: r.seq, event: unpack(r.event) as EmbotEvent }));
  }

  unpark(rows: readonly ParkedEvent[]): void {
    for (const r of rows) this.deleteParkedStmt.run(r.seq);
  }

  /** Events parked for one embot, or for all of them. */
  parkedCount(embotId?: string): number {
    return embotId === undefined ? this.countParked.get()!.n : this.countParkedFor.get(embotId)!.n;
  }
}

interface RawEmbot {
  id: string;
  module: string;
  type: string;
  element_ids: string;
  status: string;
  error: string | null;
  created_at: number;
}

function fromRaw(r: RawEmbot): EmbotRow {
  return { id: r.id, module: r.module, type: r.type, elementIds: JSON.parse(r.element_ids) as string[], status: r.status as EmbotStatus, error: r.error ?? undefined, createdAt: r.created_at };
}
