/**
 * The store checkpoints its WAL on a thread of its own once it is quiet (or when the WAL grows
 * past its cap while writes go on), instead of inside whichever commit crosses SQLite's 1000-page
 * mark. Checked on real files: a copy of the main database file alone (without its -wal) holds a
 * row only once a checkpoint has copied it there.
 */
import fs from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';
import { describe, expect, it, vi } from 'vitest';
import { Store } from '../../core/store/store.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { tempStores } from '../harness/temp-store.ts';

const cleanups = cleanupsAfterEach();
const { tmpStoreFile } = tempStores(cleanups, 'embot-checkpoint-');

function open(options: { checkpointIdleMs?: number; checkpointMaxWalBytes?: number } = {}, file = tmpStoreFile()): Store {
  const store = Store.open({ file, ...options });
  cleanups.push(() => store.close());
  store.db.exec('CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, bytes BLOB)');
  // The table itself must be in the main file before the tests look there.
  store.checkpoint();
  return store;
}

/**
 * Rows of `t` in the main database file alone: what checkpoints have copied out of the WAL. A
 * checkpoint thread may be writing the file while it is copied, and a copy taken halfway reads as
 * malformed: that is the copy's fault, not the store's, so it is taken again.
 */
function rowsInMainFile(store: Store): number {
  for (let attempt = 1; ; attempt++) {
    const copy = path.join(path.dirname(store.file), `main-only-${Math.random().toString(36).slice(2)}.sqlite`);
    fs.copyFileSync(store.file, copy);
    let db: Database.Database | undefined;
    try {
      db = new Database(copy, { readonly: true });
      return (db.prepare('SELECT count(*) AS n FROM t').get() as { n: number }).n;
    } catch (e) {
      const code = (e as { code?: string }).code;
      if (attempt >= 20 || (code !== 'SQLITE_CORRUPT' && code !== 'SQLITE_NOTADB')) throw e;
    } finally {
      db?.close();
      fs.rmSync(copy, { force: true });
    }
  }
}

function insert(store: Store, n: number, bytes = 1024): void {
  const stmt = store.db.prepare('INSERT INTO t(bytes) VALUES (?)');
  store.transaction(() => {
    for (let i = 0; i < n; i++) stmt.run(Buffer.alloc(bytes, i & 0xff));
  });
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

describe('Store WAL checkpoints', () => {
  it('does not checkpoint inside a commit: rows stay in the WAL until the store is quiet', async () => {
    const store = open({ checkpointIdleMs: 60_000 });
    // 4 MiB: past the 1000 pages at which SQLite would have checkpointed by itself in the commit.
    insert(store, 4096, 1024);
    expect(rowsInMainFile(store)).toBe(0);
    expect(store.checkpointStats.checkpoints).toBe(1); // the one open() ran by hand
  });

  it('copies the WAL into the database on its own thread once no write was seen for an idle interval', async () => {
    const store = open({ checkpointIdleMs: 20 });
    const before = store.checkpointStats.checkpoints;
    insert(store, 100);
    // The thread's answer (which the stats count) can land a turn after its copy is visible in the file.
    await vi.waitFor(
      () => {
        expect(rowsInMainFile(store)).toBe(100);
        expect(store.checkpointStats.checkpoints).toBeGreaterThan(before);
      },
      { timeout: 5000, interval: 20 },
    );
    expect(store.checkpointStats.forced).toBe(0);
    expect(store.checkpointStats.failed).toBe(0);
    // The connection stays usable and sees everything.
    expect((store.db.prepare('SELECT count(*) AS n FROM t').get() as { n: number }).n).toBe(100);
  });

  it('leaves a store without writes alone', async () => {
    const store = open({ checkpointIdleMs: 10 });
    const before = store.checkpointStats.checkpoints;
    await sleep(120);
    expect(store.checkpointStats.checkpoints).toBe(before);
  });

  it('checkpoints while writes go on once the WAL outgrows its cap, so the WAL stays bounded', async () => {
    const store = open({ checkpointIdleMs: 20, checkpointMaxWalBytes: 64 * 1024 });
    // A write every few ms: never quiet for a whole interval.
    const until = Date.now() + 600;
    while (Date.now() < until) {
      insert(store, 8, 2048);
      await sleep(3);
    }
    // A forced checkpoint started during the writes; its answer may still be on its way.
    await vi.waitFor(() => expect(store.checkpointStats.forced).toBeGreaterThan(0), { timeout: 5000, interval: 20 });
    expect(rowsInMainFile(store)).toBeGreaterThan(0);
  });

  it('checkpoint() settles the WAL at once on the caller’s connection', () => {
    const store = open({ checkpointIdleMs: 60_000 });
    insert(store, 50);
    expect(rowsInMainFile(store)).toBe(0);
    store.checkpoint();
    expect(rowsInMainFile(store)).toBe(50);
  });

  it('an in-memory store has nothing to checkpoint', () => {
    const store = Store.open({ file: ':memory:' });
    cleanups.push(() => store.close());
    store.checkpoint();
    expect(store.checkpointStats).toEqual({ checkpoints: 0, forced: 0, failed: 0 });
  });

  it('a reopened store finds every committed row, checkpointed or not', async () => {
    const file = tmpStoreFile();
    const a = Store.open({ file, checkpointIdleMs: 60_000 });
    a.db.exec('CREATE TABLE t(id INTEGER PRIMARY KEY, bytes BLOB)');
    insert(a, 30);
    a.close();
    const b = open({}, file);
    expect((b.db.prepare('SELECT count(*) AS n FROM t').get() as { n: number }).n).toBe(30);
  });
});
