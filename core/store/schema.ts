/**
 * Versioned schema. `MIGRATIONS[v]` takes a store from `user_version = v` to `v + 1`; never edit
 * a released step, append a new one.
 */
export const MIGRATIONS: readonly string[] = [
  `
  CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

  -- Sensor-service journal: an event is here from before its producer is acknowledged until
  -- every durable subscriber has processed it (deleted in the same transaction as their snapshots).
  CREATE TABLE events (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    ts INTEGER NOT NULL,
    element_id TEXT NOT NULL,
    type TEXT NOT NULL,
    payload BLOB,
    source TEXT
  );
  CREATE INDEX events_element ON events(element_id);

  -- Hold queues that grew past their memory limit spill here, in order; never dropped.
  CREATE TABLE held_spill (
    element_id TEXT NOT NULL,
    pos INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    event BLOB NOT NULL,
    PRIMARY KEY (element_id, pos)
  );

  -- Managed elements (VMs, disks, NICs, services) with their dependency links.
  CREATE TABLE elements (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    state BLOB,
    version INTEGER NOT NULL,
    dirty INTEGER NOT NULL,
    dependents TEXT NOT NULL
  );

  CREATE TABLE embots (
    id TEXT PRIMARY KEY,
    module TEXT NOT NULL,
    type TEXT NOT NULL,
    element_ids TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    created_at INTEGER NOT NULL
  );

  -- One row per policy instance: xstate persisted snapshot plus the absolute deadlines of its
  -- pending delayed events (xstate does not persist those).
  CREATE TABLE policy_snapshots (
    embot_id TEXT NOT NULL REFERENCES embots(id) ON DELETE CASCADE,
    policy TEXT NOT NULL,
    snapshot BLOB NOT NULL,
    timers BLOB,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (embot_id, policy)
  );

  -- Events that could not be processed because their module is disabled or their embot
  -- quarantined: kept, with the reason, never silently dropped.
  CREATE TABLE dead_letters (
    id TEXT PRIMARY KEY,
    embot_id TEXT NOT NULL,
    event BLOB NOT NULL,
    reason TEXT NOT NULL,
    at INTEGER NOT NULL
  );

  -- Per-module status, so a disabled plugin stays disabled across restarts.
  CREATE TABLE plugins (
    name TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    hash TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    restarts INTEGER NOT NULL DEFAULT 0,
    disabled INTEGER NOT NULL DEFAULT 0,
    updated_at INTEGER NOT NULL
  );

  -- Persisted state of sensors, effectors and drivers (their getPersistedState hook).
  CREATE TABLE component_state (
    name TEXT PRIMARY KEY,
    state BLOB NOT NULL,
    updated_at INTEGER NOT NULL
  );
  `,
  `
  -- Each side of a migration journals its phase, so an agent restarted mid-migration can finish
  -- or roll back and exactly one host owns the VM.
  CREATE TABLE migrations (
    id TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('source', 'target')),
    vm TEXT NOT NULL,
    peer TEXT NOT NULL,
    phase TEXT NOT NULL,
    outcome TEXT,
    reason TEXT,
    started_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    summary TEXT,
    PRIMARY KEY (id, role)
  );
  `,
  `
  -- Hold-queue spill rows are looked up, appended and deleted by (element_id, pos) only: without a
  -- rowid that is one b-tree instead of two (a spill is written and deleted in bulk during a
  -- migration). Their content is transient (the sensor service clears it on start), so the table is
  -- recreated rather than copied. A row either holds the event's msgpack bytes, or is empty and
  -- names its event by seq in table events (which keeps every held event until it is processed).
  DROP TABLE held_spill;
  CREATE TABLE held_spill (
    element_id TEXT NOT NULL,
    pos INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    event BLOB NOT NULL,
    PRIMARY KEY (element_id, pos)
  ) WITHOUT ROWID;
  `,
  `
  -- Hold-queue bytes a migration target took in without journaling each event (insertHeld with
  -- deferJournal): one row per shipment, its accepted events numbered seq0, seq0 + 1, ... in byte order
  -- (skip: JSON list of the indices refused as duplicates). element_ids lists the elements whose events
  -- are still only here; release journals them, drop forgets them, a restart journals what is left.
  CREATE TABLE held_blobs (
    seq0 INTEGER PRIMARY KEY,
    count INTEGER NOT NULL,
    element_ids TEXT NOT NULL,
    skip TEXT NOT NULL,
    bytes BLOB NOT NULL
  );
  `,
  `
  -- Events for an embot whose module is not loaded (safe mode, a module not yet or no longer in
  -- the plugins folder): they wait here, in arrival order, and are delivered when the module loads,
  -- before any newer event of that embot.
  CREATE TABLE parked_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    embot_id TEXT NOT NULL,
    event BLOB NOT NULL,
    at INTEGER NOT NULL
  );
  CREATE INDEX parked_events_embot ON parked_events(embot_id, seq);
  `,
  `
  -- A completed migration's forwarding, written by the source in the transaction that drops the VM's
  -- elements: what moved (element_ids, JSON), to whom (peer) and until when events for them go there
  -- (until, ms since epoch). rest: hold-queue bytes of events held after the last round, not yet taken
  -- by the peer (NULL once it took them). ended: the grace period is over and nothing waits any more.
  CREATE TABLE forwardings (
    migration_id TEXT PRIMARY KEY,
    vm TEXT NOT NULL,
    peer TEXT NOT NULL,
    element_ids TEXT NOT NULL,
    until INTEGER NOT NULL,
    rest BLOB,
    forwarded INTEGER NOT NULL DEFAULT 0,
    dead_lettered INTEGER NOT NULL DEFAULT 0,
    ended INTEGER NOT NULL DEFAULT 0
  );
  -- Element -> the agent it moved to: events posted here after the grace period are refused with its name.
  CREATE TABLE moved_elements (
    element_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    migration_id TEXT NOT NULL,
    at INTEGER NOT NULL
  ) WITHOUT ROWID;
  -- Ids of events a source forwarded here and this agent journaled: a batch sent again after a crash of
  -- either side is refused by id even when its events were processed (and forgotten) before the crash.
  CREATE TABLE forwarded_in (
    id TEXT PRIMARY KEY,
    at INTEGER NOT NULL
  ) WITHOUT ROWID;
  `,
  `
  -- A migration to several destinations at once (issue 13): its destinations (JSON array, in the
  -- order given) and the winner, journaled before any destination is told to commit or terminate.
  -- The winner is written once: the trigger refuses to change it, so no bug can name a second owner.
  CREATE TABLE fan_outs (
    id TEXT PRIMARY KEY,
    vm TEXT NOT NULL,
    destinations TEXT NOT NULL,
    winner TEXT,
    winner_at INTEGER,
    outcome TEXT,
    reason TEXT,
    started_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
  );
  CREATE TRIGGER fan_outs_winner_once BEFORE UPDATE OF winner ON fan_outs
    WHEN OLD.winner IS NOT NULL AND NEW.winner IS NOT OLD.winner
    BEGIN SELECT RAISE(ABORT, 'fan-out winner already journaled'); END;
  `,
  `
  -- Images this host holds (issue 14): its own (origin 'local') and, on an agent with an image
  -- library, the library's ('library'); each block's sha256 by position, so the host can say which
  -- blocks it has and serve one by hash.
  CREATE TABLE images (
    name TEXT NOT NULL,
    origin TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    block_size INTEGER NOT NULL,
    mtime_ms REAL NOT NULL,
    indexed_at INTEGER NOT NULL,
    PRIMARY KEY (origin, name)
  ) WITHOUT ROWID;
  CREATE TABLE image_blocks (
    origin TEXT NOT NULL,
    image TEXT NOT NULL,
    idx INTEGER NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (origin, image, idx)
  ) WITHOUT ROWID;
  CREATE INDEX image_blocks_hash ON image_blocks(hash);
  `,
  `
  -- The running VMs' disks (issue 14 point 2): each block of a VM's disk this host indexes (a qcow2
  -- overlay: the blocks the VM wrote; a raw disk: all), its hash and where it lies in the file
  -- (file_offset -1: a block of zeros the overlay records without data).
  CREATE TABLE vm_disks (
    vm TEXT NOT NULL,
    disk INTEGER NOT NULL,
    path TEXT NOT NULL,
    format TEXT NOT NULL,
    size INTEGER NOT NULL,
    block_size INTEGER NOT NULL,
    mtime_ms REAL NOT NULL,
    indexed_at INTEGER NOT NULL,
    PRIMARY KEY (vm, disk)
  ) WITHOUT ROWID;
  CREATE TABLE vm_disk_blocks (
    vm TEXT NOT NULL,
    disk INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    hash TEXT NOT NULL,
    file_offset INTEGER NOT NULL,
    PRIMARY KEY (vm, disk, idx)
  ) WITHOUT ROWID;
  CREATE INDEX vm_disk_blocks_hash ON vm_disk_blocks(hash);
  `,
  `
  -- Ids producers gave their events (POST /v1/events with an id), written in the group commit that
  -- journals the event and read back at start: a re-post after a restart is refused even when its
  -- first copy was processed (and its journal row deleted) before. Rowid order is arrival order; the
  -- newest sensors dedupWindow rows are kept.
  CREATE TABLE taken_ids (
    id TEXT PRIMARY KEY,
    at INTEGER NOT NULL
  );
  `,
  `
  -- The taken event's own ts, so a re-post with the same id is answered with the first copy's ts,
  -- also after a restart. NULL on rows written before this step (read back as \`at\`, the commit time).
  ALTER TABLE taken_ids ADD COLUMN ts REAL;
  `,
];

export const SCHEMA_VERSION = MIGRATIONS.length;
