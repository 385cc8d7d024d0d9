import Database from 'better-sqlite3';
import { EventEmitter } from 'eventemitter3';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import type { EmbotEvent, EmbotEventInput } from '../core/events.ts';
import { Store } from '../core/store/store.ts';
import { SensorService } from '../sensors/index.ts';
import { eventPackr } from '../sensors/journal.ts';
import type { BenchRow, BenchTable } from './table.ts';
import { renderTable } from './table.ts';

const ELEMENTS = 1000;
const MEMORY_EVENTS = 1_000_000;
const DURABLE_EVENTS = 100_000;
const BATCH = 1000;
const GIVEN_PAIRS = 5;

function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

const elementIds = Array.from({ length: ELEMENTS }, (_, i) => `vm:bench-${i}`);

function seconds(start: bigint): number {
  return Number(process.hrtime.bigint() - start) / 1e9;
}

/**
 * Service: post N events over 1000 elements to no-op subscribers in bursts of `burst` (awaiting idle() after each),
 * until all are dispatched. One burst of N measures the worst case: every event alive at once (old-generation GC).
 */
async function serviceMemoryRate(burst: number): Promise<{ rate: number; delivered: number }> {
  const sensors = new SensorService({ host: 'bench' });
  let delivered = 0;
  const noop = { deliver(): void { delivered++; } };
  for (const id of elementIds) sensors.subscribe(id, noop);
  const round = async (n: number): Promise<number> => {
    const start = process.hrtime.bigint();
    for (let done = 0; done < n; done += burst) {
      const end = Math.min(n, done + burst);
      for (let i = done; i < end; i++) sensors.post({ elementId: elementIds[i % ELEMENTS]!, type: 'TICK', payload: i });
      await sensors.idle();
    }
    return n / seconds(start);
  };
  await round(100_000); // warm-up
  delivered = 0;
  const rate = await round(MEMORY_EVENTS);
  await sensors.close();
  if (delivered !== MEMORY_EVENTS) throw new Error(`sensor service delivered ${delivered} of ${MEMORY_EVENTS}`);
  return { rate, delivered };
}

/** Limit: the same number of events handed to no-op listeners by a bare eventemitter3 emit loop. */
function bareEmitRate(): number {
  const ee = new EventEmitter();
  let delivered = 0;
  for (const id of elementIds) ee.on(id, () => { delivered++; });
  const round = (n: number): number => {
    const start = process.hrtime.bigint();
    for (let i = 0; i < n; i++) {
      const elementId = elementIds[i % ELEMENTS]!;
      const event: EmbotEvent = { id: `bench.${i}`, ts: i, elementId, type: 'TICK', payload: i };
      ee.emit(elementId, event, i);
    }
    return n / seconds(start);
  };
  round(100_000);
  const rate = round(MEMORY_EVENTS);
  if (delivered !== MEMORY_EVENTS + 100_000) throw new Error('bare emit loop lost events');
  return rate;
}

function tmpFile(name: string): { file: string; cleanup: () => void } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'embot-bench-sensors-'));
  return { file: path.join(dir, name), cleanup: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

/** Service, durable: emitMany in batches → group-commit journal → dispatch → durable subscriber completes per tick in one transaction. */
async function serviceDurableRate(givenIds = false): Promise<{ rate: number; leftRows: number }> {
  const { file, cleanup } = tmpFile('agent.sqlite');
  const store = Store.open({ file, synchronous: 'NORMAL' });
  const sensors = new SensorService({ host: 'bench', store });
  let done: number[] = [];
  let completed = 0;
  const completeBatch = (): void => {
    const seqs = done;
    done = [];
    store.transaction(() => sensors.complete(seqs));
    completed += seqs.length;
  };
  const durable = {
    durable: true,
    deliver(_e: EmbotEvent, seq: number): void {
      if (done.length === 0) setImmediate(completeBatch);
      done.push(seq);
    },
  };
  for (const id of elementIds) sensors.subscribe(id, durable);
  const start = process.hrtime.bigint();
  for (let b = 0; b < DURABLE_EVENTS; b += BATCH) {
    const inputs: EmbotEventInput[] = [];
    // givenIds: the producer names each event (POST /v1/events with an id), so the group commit also records the id in taken_ids.
    for (let i = b; i < b + BATCH; i++) inputs.push({ elementId: elementIds[i % ELEMENTS]!, type: 'TICK', payload: { i }, ...(givenIds ? { id: `p.${i}` } : {}) });
    await sensors.emitMany(inputs);
  }
  await sensors.idle();
  while (completed < DURABLE_EVENTS) await new Promise((r) => setImmediate(r));
  const rate = DURABLE_EVENTS / seconds(start);
  const leftRows = sensors.stats().journaled;
  await sensors.close();
  store.close();
  cleanup();
  return { rate, leftRows };
}

/** Limit: bare better-sqlite3, identical table, same synchronous mode, inserts in transactions of BATCH rows. */
function bareInsertRate(): number {
  const { file, cleanup } = tmpFile('bare.sqlite');
  const db = new Database(file);
  db.pragma('journal_mode = WAL');
  db.pragma('synchronous = NORMAL');
  db.exec(`CREATE TABLE events (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, ts INTEGER NOT NULL, element_id TEXT NOT NULL,
    type TEXT NOT NULL, payload BLOB, source TEXT); CREATE INDEX events_element ON events(element_id);`);
  const insert = db.prepare('INSERT INTO events(seq, id, ts, element_id, type, payload, source) VALUES (?, ?, ?, ?, ?, ?, ?)');
  const batch = db.transaction((from: number) => {
    for (let i = from; i < from + BATCH; i++) insert.run(i + 1, `bench.${i}`, 1_700_000_000_000 + i, elementIds[i % ELEMENTS]!, 'TICK', eventPackr.pack({ i }), null);
  });
  const start = process.hrtime.bigint();
  for (let b = 0; b < DURABLE_EVENTS; b += BATCH) batch(b);
  const rate = DURABLE_EVENTS / seconds(start);
  db.close();
  cleanup();
  return rate;
}

export async function run(): Promise<BenchTable> {
  const limitEmit = bareEmitRate();
  const memory = await serviceMemoryRate(10_000);
  const oneBurst = await serviceMemoryRate(MEMORY_EVENTS);
  bareInsertRate(); // warm-up: the first run pays for JIT and cold file pages
  const limitInsert = bareInsertRate();
  const durable = await serviceDurableRate();
  // Given ids against ids minted here, alternated in the same minutes: medians of GIVEN_PAIRS each.
  const minted: number[] = [];
  const given: number[] = [];
  for (let p = 0; p < GIVEN_PAIRS; p++) {
    minted.push((await serviceDurableRate(false)).rate);
    given.push((await serviceDurableRate(true)).rate);
  }
  const mintedRate = median(minted);
  const givenRate = median(given);
  const rows: BenchRow[] = [
    {
      name: `sensor service in-memory dispatch (${MEMORY_EVENTS.toLocaleString('en-US')} events in bursts of 10,000, ${ELEMENTS} elements, no-op subscriber)`,
      value: memory.rate,
      unit: 'ev/s',
      limitName: 'bare eventemitter3 emit loop',
      limit: limitEmit,
      ratio: memory.rate / limitEmit,
      target: '>= 1,000,000 ev/s',
      met: memory.rate >= 1_000_000,
    },
    {
      name: `sensor service in-memory dispatch, one burst of ${MEMORY_EVENTS.toLocaleString('en-US')} (all queued at once)`,
      value: oneBurst.rate,
      unit: 'ev/s',
      limitName: 'bare eventemitter3 emit loop',
      limit: limitEmit,
      ratio: oneBurst.rate / limitEmit,
    },
    {
      name: `sensor service durable end to end (${DURABLE_EVENTS.toLocaleString('en-US')} events: emit, journal, dispatch, complete)`,
      value: durable.rate,
      unit: 'ev/s',
      limitName: 'bare better-sqlite3 batched insert',
      limit: limitInsert,
      ratio: durable.rate / limitInsert,
      target: '>= 50,000 ev/s',
      met: durable.rate >= 50_000,
    },
    {
      name: `sensor service durable end to end, producer-given ids (each recorded in taken_ids in the same commit), median of ${GIVEN_PAIRS}`,
      value: givenRate,
      unit: 'ev/s',
      limitName: `the same with ids minted here, alternated, median of ${GIVEN_PAIRS}`,
      limit: mintedRate,
      ratio: givenRate / mintedRate,
    },
  ];
  return {
    title: 'Sensor service',
    rows,
    notes: [
      'ratio = service rate / limit rate (higher is better).',
      `in-memory: post() validates, mints the id and queues; dispatch drains on setImmediate in 10 ms slices; every delivery is counted and checked. The one-burst row keeps a million events alive at once, so old-generation GC dominates it and it varies most with machine load.`,
      `durable: real SQLite file (WAL, synchronous NORMAL); emitMany batches of ${BATCH} group-committed per tick; the durable subscriber completes (deletes rows) once per tick in one transaction; the limit only inserts. Journal rows left at the end: ${durable.leftRows}.`,
      'durable ratio above 1 is expected: the service deletes rows as they are processed, so its table and id index stay small, while the limit table grows to the full count.',
      `producer-given ids: what the control API does for POST /v1/events with an id (README "Events: idempotent posts"): the id goes through the in-memory de-duplication set and is written to taken_ids with its event, one INSERT … SELECT FROM json_each per commit. Pairs (minted, given) ev/s: ${minted.map((m, i) => `${Math.round(m)}/${Math.round(given[i]!)}`).join(', ')}.`,
    ],
  };
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) {
  console.log(renderTable(await run()));
}
