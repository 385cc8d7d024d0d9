import Database from 'better-sqlite3';
import { mkdirSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import { Worker } from 'node:worker_threads';
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
  /** How long the store must see no write before it checkpoints the WAL; default {@link DEFAULT_CHECKPOINT_IDLE_MS}. */
  readonly checkpointIdleMs?: number;
  /** A WAL larger than this is checkpointed even while writes go on; default {@link DEFAULT_CHECKPOINT_MAX_WAL_BYTES}. */
  readonly checkpointMaxWalBytes?: number;
}

/** See {@link StoreOptions.checkpointIdleMs}. */
export const DEFAULT_CHECKPOINT_IDLE_MS = 250;
/** See {@link StoreOptions.checkpointMaxWalBytes}. */
export const DEFAULT_CHECKPOINT_MAX_WAL_BYTES = 16 * 1024 * 1024;

/** What {@link Store.checkpointStats} reports. */
export interface CheckpointStats {
  /** Checkpoints the store ran (idle ones and forced ones). */
  readonly checkpoints: number;
  /** Of those, the ones forced by the WAL size while writes went on. */
  readonly forced: number;
  /** Checkpoints that failed (busy database, thread gone); the next quiet moment tries again. */
  readonly failed: number;
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
  private readonly checkpointer: IdleCheckpointer | undefined;

  private constructor(db: Database.Database, file: string, options: StoreOptions) {
    this.db = db;
    this.file = file;
    this.checkpointer = file === ':memory:' ? undefined : new IdleCheckpointer(db, file, options);
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
      // SQLite's own checkpoint runs inside whichever commit pushes the WAL past 1000 pages, so
      // a large write (a migration's staged events) paid for copying the WAL into the database
      // too. The IdleCheckpointer does that copy on a thread of its own instead.
      if (file !== ':memory:') db.pragma('wal_autocheckpoint = 0');
      // Up to 64 MiB of page cache (SQLite's default is 2 MiB): a migration's staged events are one
      // ~10 MB row, which then goes to the WAL in one pass instead of being spilled mid-transaction.
      db.pragma('cache_size = -65536');
      const check = db.pragma('quick_check', { simple: true });
      if (check !== 'ok') throw new Error(`quick_check: ${String(check)}`);
    } catch (cause) {
      throw new StoreError(ErrorCodes.STORE_CORRUPT, `store file ${file} is not a usable embot database (${(cause as Error).message}); move it away or restore a backup`, { cause, details: { file } });
    }
    migrate(db, file);
    return new Store(db, file, options);
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

  /**
   * Copies the WAL into the database now (PASSIVE: readers are not waited for). The store does
   * this by itself when it is quiet; a caller that just wrote a lot and is about to do something
   * latency-sensitive can settle it first.
   */
  checkpoint(): void {
    this.checkpointer?.runHere();
  }

  /** Checkpoints run so far (none for `:memory:`). */
  get checkpointStats(): CheckpointStats {
    return this.checkpointer?.stats ?? { checkpoints: 0, forced: 0, failed: 0 };
  }

  /** Closing checkpoints the WAL (SQLite does so when the last connection closes). */
  close(): void {
    this.checkpointer?.stop();
    if (this.db.open) this.db.close();
  }
}

/**
 * The checkpointing thread's code (CommonJS, evaluated): its own connection to the store file,
 * one PASSIVE checkpoint per message, the outcome posted back.
 */
const CHECKPOINT_WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const Database = require(workerData.sqlite);
const db = new Database(workerData.file, { fileMustExist: true });
db.pragma('busy_timeout = 2000');
parentPort.on('message', (m) => {
  if (m === 'close') { db.close(); process.exit(0); }
  try { db.pragma('wal_checkpoint(PASSIVE)'); parentPort.postMessage({ ok: true }); }
  catch (e) { parentPort.postMessage({ ok: false, error: String(e && e.message || e) }); }
});
`;
const SQLITE_MODULE = createRequire(import.meta.url).resolve('better-sqlite3');

/**
 * Checkpoints the WAL once no write has been seen for `checkpointIdleMs`, or while writes go on
 * when the WAL outgrows `checkpointMaxWalBytes` (so it stays bounded). The copy runs on a thread
 * of its own with its own connection (WAL lets it run beside this connection's writes), so the
 * event loop never waits for it. A write is seen as a change of `total_changes()`, which counts
 * every row this connection changed. The timer and the thread are unref'd: neither keeps the
 * process alive.
 */
class IdleCheckpointer {
  private readonly timer: NodeJS.Timeout;
  private readonly walFile: string;
  private readonly maxWalBytes: number;
  private readonly totalChanges: Database.Statement<[], { n: number }>;
  private worker: Worker | undefined;
  private inFlight = false;
  /** What the checkpoint in flight covers. */
  private pendingMark: { readonly changes: number; readonly forced: boolean } | undefined;
  private lastSeen: number;
  private lastCheckpointed: number;
  private counts = { checkpoints: 0, forced: 0, failed: 0 };

  constructor(
    private readonly db: Database.Database,
    private readonly file: string,
    options: StoreOptions,
  ) {
    this.walFile = `${file}-wal`;
    this.maxWalBytes = options.checkpointMaxWalBytes ?? DEFAULT_CHECKPOINT_MAX_WAL_BYTES;
    this.totalChanges = db.prepare('SELECT total_changes() AS n');
    this.lastSeen = this.lastCheckpointed = this.changes();
    this.timer = setInterval(() => this.tick(), options.checkpointIdleMs ?? DEFAULT_CHECKPOINT_IDLE_MS);
    this.timer.unref();
  }

  get stats(): CheckpointStats {
    return { ...this.counts };
  }

  /** A checkpoint on this connection, now (see {@link Store.checkpoint}). */
  runHere(): void {
    if (!this.db.open || this.db.inTransaction) return;
    const now = this.changes();
    try {
      this.db.pragma('wal_checkpoint(PASSIVE)');
    } catch {
      // The thread's checkpoint holds the lock: it is doing the same copy.
      this.counts.failed++;
      return;
    }
    this.lastSeen = this.lastCheckpointed = now;
    this.counts.checkpoints++;
  }

  stop(): void {
    clearInterval(this.timer);
    this.worker?.postMessage('close');
    this.worker = undefined;
  }

  private changes(): number {
    return this.totalChanges.get()!.n;
  }

  private tick(): void {
    if (!this.db.open) return this.stop();
    if (this.inFlight) return;
    const now = this.changes();
    const idle = now === this.lastSeen;
    this.lastSeen = now;
    if (now === this.lastCheckpointed) return;
    const forced = !idle && this.walBytes() > this.maxWalBytes;
    if (!idle && !forced) return;
    this.inFlight = true;
    this.thread().postMessage('checkpoint');
    this.pendingMark = { changes: now, forced };
  }

  private thread(): Worker {
    if (this.worker) return this.worker;
    const worker = new Worker(CHECKPOINT_WORKER_SOURCE, { eval: true, workerData: { file: this.file, sqlite: SQLITE_MODULE }, stdout: false, stderr: false });
    worker.unref();
    worker.on('message', (r: { readonly ok: boolean }) => {
      this.inFlight = false;
      const mark = this.pendingMark;
      this.pendingMark = undefined;
      if (!r.ok || mark === undefined) {
        this.counts.failed++;
        return; // a busy database: the next quiet tick tries again
      }
      this.lastCheckpointed = mark.changes;
      this.counts.checkpoints++;
      if (mark.forced) this.counts.forced++;
    });
    // A thread that died (e.g. the file was removed under it) is replaced on the next tick.
    worker.on('error', () => this.forget(worker));
    worker.on('exit', () => this.forget(worker));
    this.worker = worker;
    return worker;
  }

  private forget(worker: Worker): void {
    if (this.worker !== worker) return;
    this.worker = undefined;
    if (this.inFlight) this.counts.failed++;
    this.inFlight = false;
    this.pendingMark = undefined;
  }

  private walBytes(): number {
    try {
      return statSync(this.walFile).size;
    } catch {
      return 0;
    }
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
