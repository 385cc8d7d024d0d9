import Database from 'better-sqlite3';
import { mkdirSync } from 'node:fs';
import { dirname } from 'node:path';
import { ErrorCodes, StoreError } from '../errors.ts';
import { MIGRATIONS, SCHEMA_VERSION } from './schema.ts';

export interface StoreOptions {
  /** `:memory:` for tests and benches that do not need durability. */
  readonly file: string;
  /**
   * `NORMAL` (default) loses at most the last transactions on power loss but never corrupts;
   * a process crash (SIGKILL) loses nothing committed. `FULL` fsyncs every commit.
   */
  readonly synchronous?: 'NORMAL' | 'FULL' | 'OFF';
}

/**
 * The agent's one SQLite file (better-sqlite3, WAL). Every service keeps its durable state in
 * the tables of `schema.ts`; services get the raw handle through {@link Store.db} and prepare
 * their own statements, and group writes with {@link Store.transaction}.
 *
 * @example
 * ```ts
 * const store = Store.open({ file: './data/agent.sqlite' });
 * store.transaction(() => { store.setMeta('owner', 'a') });
 * ```
 */
export class Store {
  readonly db: Database.Database;
  readonly file: string;
  private readonly getMetaStmt: Database.Statement<[string], { value: string }>;
  private readonly setMetaStmt: Database.Statement<[string, string]>;
  private readonly getStateStmt: Database.Statement<[string], { state: Buffer }>;
  private readonly setStateStmt: Database.Statement<[string, Buffer, number]>;

  private constructor(db: Database.Database, file: string) {
    this.db = db;
    this.file = file;
    this.getMetaStmt = db.prepare('SELECT value FROM meta WHERE key = ?');
    this.setMetaStmt = db.prepare('INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value');
    this.getStateStmt = db.prepare('SELECT state FROM component_state WHERE name = ?');
    this.setStateStmt = db.prepare(
      'INSERT INTO component_state(name, state, updated_at) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at',
    );
  }

  /** Opens (creating if needed) and migrates the store; a file that is not a usable SQLite database is refused with `EMBOT_ERR_STORE_CORRUPT`. */
  static open(options: StoreOptions): Store {
    const file = options.file;
    if (file !== ':memory:') mkdirSync(dirname(file), { recursive: true });
    let db: Database.Database;
    try {
      db = new Database(file);
      db.pragma('journal_mode = WAL');
      db.pragma(`synchronous = ${options.synchronous ?? 'NORMAL'}`);
      db.pragma('foreign_keys = ON');
      db.pragma('busy_timeout = 2000');
      const check = db.pragma('quick_check', { simple: true });
      if (check !== 'ok') throw new Error(`quick_check: ${String(check)}`);
    } catch (cause) {
      throw new StoreError(ErrorCodes.STORE_CORRUPT, `store file ${file} is not a usable embot database (${(cause as Error).message}); move it away or restore a backup`, { cause, details: { file } });
    }
    migrate(db, file);
    return new Store(db, file);
  }

  /** Runs `fn` in one transaction (nested calls become savepoints). */
  transaction<T>(fn: () => T): T {
    return this.db.transaction(fn)();
  }

  getMeta(key: string): string | undefined {
    return this.getMetaStmt.get(key)?.value;
  }

  setMeta(key: string, value: string): void {
    this.setMetaStmt.run(key, value);
  }

  /** Persisted state of a component (sensor, effector, driver): the `getPersistedState` hook lands here. */
  getComponentState(name: string): Buffer | undefined {
    return this.getStateStmt.get(name)?.state;
  }

  setComponentState(name: string, state: Uint8Array): void {
    this.setStateStmt.run(name, Buffer.from(state.buffer, state.byteOffset, state.byteLength), Date.now());
  }

  close(): void {
    if (this.db.open) this.db.close();
  }
}

function migrate(db: Database.Database, file: string): void {
  const current = db.pragma('user_version', { simple: true }) as number;
  if (current > SCHEMA_VERSION) {
    db.close();
    throw new StoreError(ErrorCodes.STORE_SCHEMA_TOO_NEW, `store ${file} has schema ${current}, this embot knows up to ${SCHEMA_VERSION}; upgrade embot`, { details: { file, current, known: SCHEMA_VERSION } });
  }
  if (current === SCHEMA_VERSION) return;
  db.transaction(() => {
    for (let v = current; v < SCHEMA_VERSION; v++) db.exec(MIGRATIONS[v]!);
    db.pragma(`user_version = ${SCHEMA_VERSION}`);
  })();
}
