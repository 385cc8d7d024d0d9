import Database from 'better-sqlite3';
import { join } from 'node:path';
import { eventPackr } from '../../sensors/journal.ts';

/**
 * The `seq` payloads of the TICK events for `elementId` still journaled (not yet processed) in a
 * stopped agent's store: read straight from its SQLite file, to see whether a POST whose answer
 * never came (the agent was killed) had been taken.
 */
export function journaledTickSeqs(dataDir: string, elementId: string): number[] {
  const db = new Database(join(dataDir, 'embot.sqlite'), { readonly: true, fileMustExist: true });
  try {
    const rows = db.prepare("SELECT payload FROM events WHERE element_id = ? AND type = 'TICK' ORDER BY seq").all(elementId) as { payload: Buffer | null }[];
    return rows.map((r) => (r.payload === null ? -1 : Number((eventPackr.unpack(r.payload) as { seq?: unknown }).seq ?? -1)));
  } finally {
    db.close();
  }
}
