import type Database from 'better-sqlite3';
import { ErrorCodes, PluginError } from '../errors.ts';
import type { Store } from '../store/store.ts';

export const PLUGIN_STATUSES = ['loaded', 'error', 'disabled', 'quarantined', 'unloaded'] as const;
export type PluginStatusKind = (typeof PLUGIN_STATUSES)[number];

/** What the agent last knew about a module, as `embot plugins` shows it. */
export interface PluginStatus {
  readonly name: string;
  /** Empty when the module was disabled before it was ever seen. */
  readonly version: string;
  readonly hash: string;
  readonly status: PluginStatusKind;
  readonly error?: string;
  readonly restarts: number;
  /** Set by an operator; survives restarts until `enable`. */
  readonly disabled: boolean;
  readonly disabledReason?: string;
  /** Epoch ms of the last change. */
  readonly updatedAt: number;
}

export interface PluginStatusRecord {
  readonly name: string;
  readonly version: string;
  readonly hash: string;
  readonly status: PluginStatusKind;
  readonly error?: string;
  /** Omitted: the stored count is kept (0 for a new module). */
  readonly restarts?: number;
}

interface Row {
  name: string;
  version: string;
  hash: string;
  status: string;
  error: string | null;
  restarts: number;
  disabled: number;
  updated_at: number;
}

interface UpsertParams {
  name: string;
  version: string;
  hash: string;
  status: string;
  error: string | null;
  restarts: number | null;
  now: number;
}

/** `meta` key holding the reason a module was disabled (the `plugins` table has no column for it). */
const reasonKey = (name: string): string => `plugins.disabled-reason.${name}`;

/**
 * Per-module status in the `plugins` table of the agent's store: the runtime records what
 * happened to each module (loaded, error, quarantined, …), operators disable and enable modules,
 * and a disabled module stays disabled across restarts. Recording a status never touches the
 * disabled flag.
 *
 * @example
 * ```ts
 * const statuses = new PluginStatusStore(store);
 * if (!statuses.isDisabled(m.name)) statuses.record({ name: m.name, version: m.version, hash: m.hash, status: 'loaded' });
 * statuses.disable('vm-watchdog', 'restarting VMs in a loop');
 * ```
 */
export class PluginStatusStore {
  private readonly store: Store;
  private readonly getStmt: Database.Statement<[string], Row>;
  private readonly listStmt: Database.Statement<[], Row>;
  private readonly upsertStmt: Database.Statement<[UpsertParams]>;
  private readonly setDisabledStmt: Database.Statement<[number, number, string]>;
  private readonly insertDisabledStmt: Database.Statement<[string, number]>;
  private readonly reasonStmt: Database.Statement<[string], { value: string }>;
  private readonly deleteReasonStmt: Database.Statement<[string]>;

  constructor(store: Store) {
    this.store = store;
    const db = store.db;
    this.getStmt = db.prepare('SELECT * FROM plugins WHERE name = ?');
    this.listStmt = db.prepare('SELECT * FROM plugins ORDER BY name');
    this.upsertStmt = db.prepare(
      `INSERT INTO plugins(name, version, hash, status, error, restarts, disabled, updated_at)
         VALUES (@name, @version, @hash, @status, @error, coalesce(@restarts, 0), 0, @now)
       ON CONFLICT(name) DO UPDATE SET version = excluded.version, hash = excluded.hash, status = excluded.status,
         error = excluded.error, restarts = coalesce(@restarts, plugins.restarts), updated_at = excluded.updated_at`,
    );
    this.setDisabledStmt = db.prepare('UPDATE plugins SET disabled = ?, updated_at = ? WHERE name = ?');
    this.insertDisabledStmt = db.prepare(`INSERT INTO plugins(name, version, hash, status, disabled, updated_at) VALUES (?, '', '', 'disabled', 1, ?) ON CONFLICT(name) DO NOTHING`);
    this.reasonStmt = db.prepare('SELECT value FROM meta WHERE key = ?');
    this.deleteReasonStmt = db.prepare('DELETE FROM meta WHERE key = ?');
  }

  /** Records what happened to a module; a status outside {@link PLUGIN_STATUSES} is refused. */
  record(s: PluginStatusRecord): void {
    if (!(PLUGIN_STATUSES as readonly string[]).includes(s.status)) {
      throw new PluginError(ErrorCodes.PLUGIN_LOAD_FAILED, `unknown plugin status ${JSON.stringify(s.status)} for ${s.name}; expected one of ${PLUGIN_STATUSES.join(', ')}`, { details: { name: s.name } });
    }
    if (s.restarts !== undefined && !(Number.isInteger(s.restarts) && s.restarts >= 0)) {
      throw new PluginError(ErrorCodes.PLUGIN_LOAD_FAILED, `restarts of ${s.name} must be a non-negative integer, got ${String(s.restarts)}`, { details: { name: s.name } });
    }
    this.upsertStmt.run({ name: s.name, version: s.version, hash: s.hash, status: s.status, error: s.error ?? null, restarts: s.restarts ?? null, now: Date.now() });
  }

  get(name: string): PluginStatus | undefined {
    const row = this.getStmt.get(name);
    return row ? this.toStatus(row) : undefined;
  }

  /** Every known module, by name. */
  list(): PluginStatus[] {
    return this.listStmt.all().map((r) => this.toStatus(r));
  }

  /** Disables a module (known or not yet seen) until {@link enable}; the runtime checks {@link isDisabled} before loading. */
  disable(name: string, reason: string): void {
    const now = Date.now();
    this.store.transaction(() => {
      this.insertDisabledStmt.run(name, now);
      this.setDisabledStmt.run(1, now, name);
      this.store.setMeta(reasonKey(name), reason);
    });
  }

  enable(name: string): void {
    this.store.transaction(() => {
      this.setDisabledStmt.run(0, Date.now(), name);
      this.deleteReasonStmt.run(reasonKey(name));
    });
  }

  isDisabled(name: string): boolean {
    return this.getStmt.get(name)?.disabled === 1;
  }

  private toStatus(row: Row): PluginStatus {
    const disabled = row.disabled === 1;
    const reason = disabled ? this.reasonStmt.get(reasonKey(row.name))?.value : undefined;
    return {
      name: row.name,
      version: row.version,
      hash: row.hash,
      status: row.status as PluginStatusKind,
      ...(row.error === null ? {} : { error: row.error }),
      restarts: row.restarts,
      disabled,
      ...(reason === undefined ? {} : { disabledReason: reason }),
      updatedAt: row.updated_at,
    };
  }
}
