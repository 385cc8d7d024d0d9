import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Store } from '../../core/store/store.ts';
import type { Cleanups } from './cleanups.ts';

export interface TempStores {
  /** A fresh `agent.sqlite` path in a new folder under the OS temp dir, removed after the test. */
  tmpStoreFile(): string;
  /** Opens a real store (a fresh file unless given one), closed after the test. */
  openStore(file?: string): Store;
}

/**
 * Real SQLite store files in temp folders named `<prefix>XXXXXX`, undone through `cleanups`.
 *
 * @example
 * ```ts
 * const { tmpStoreFile, openStore } = tempStores(cleanupsAfterEach(), 'embot-sensors-');
 * const file = tmpStoreFile();
 * const store = openStore(file);
 * ```
 */
export function tempStores(cleanups: Cleanups, prefix: string): TempStores {
  const tmpStoreFile = (): string => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
    cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
    return path.join(dir, 'agent.sqlite');
  };
  const openStore = (file: string = tmpStoreFile()): Store => {
    const store = Store.open({ file });
    cleanups.push(() => store.close());
    return store;
  };
  return { tmpStoreFile, openStore };
}

/** Rows in one table of `store` (`events` unless told), to see what was journaled or spilled. */
export function rowCount(store: Store, table = 'events'): number {
  return (store.db.prepare(`SELECT count(*) AS n FROM ${table}`).get() as { n: number }).n;
}
