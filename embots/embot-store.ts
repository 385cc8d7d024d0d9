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

/** The runtime's tables: embots, their policy snapshots (with timers), dead letters. */
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
  }

  saveEmbot(row: EmbotRow): void {
    this.upsertEmbot.run({ id: row.id, module: row.module, type: row.type, elementIds: JSON.stringify(row.elementIds), status: row.status, error: row.error ?? null, createdAt: row.createdAt });
  }

  setStatus(id: string, status: EmbotStatus, error?: string): void {
    this.setStatusStmt.run(status, error ?? null, id);
  }

  deleteEmbot(id: string): void {
    this.deleteEmbotStmt.run(id);
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
