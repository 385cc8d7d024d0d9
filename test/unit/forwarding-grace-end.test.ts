import { describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { unpack } from 'msgpackr';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { rowCount, tempStores } from '../harness/temp-store.ts';
import { freeLoopbackPort } from '../../core/cli/free-port.ts';
import { connectPeer } from '../../core/wire/peer-client.ts';
import { PeerServer } from '../../core/wire/peer-server.ts';
import { SensorService } from '../../sensors/index.ts';
import { ManagedObjectService } from '../../core/objects/object-service.ts';
import { silentLogger } from '../../core/logger.ts';
import { Forwarding, decodeForwarded, type ForwardRecord } from '../../core/mobility/forwarding.ts';
import type { EmbotEvent } from '../../core/events.ts';

/**
 * The end of a forwarding's grace period while a batch waits out its back-off (random-faults seed
 * 1882673222: the new owner b, SIGKILLed after the switch, was back 0.5 s before the grace period
 * ended, but the source's batch of seq 218 slept in a 2 s back-off, was woken by the end and
 * dead-lettered without another try, while seq 219 onwards, queued behind it, got their one try
 * and were taken: one acknowledged event never processed, in the middle of the stream).
 *
 * Real parts: SQLite store files, the sensor service, a real peer server for the new owner, and a
 * real refused connection (a loopback port nobody listens on) while it is down. The back-off is
 * longer than the grace period, so the only attempt after the first is the one the end allows.
 */
const cleanups = cleanupsAfterEach();
const { openStore } = tempStores(cleanups, 'embot-forwarding-grace-');

const GRACE_MS = 600;
/** Longer than the test: the batch (or the rest) sleeps until the end of the grace period wakes it. */
const BACK_OFF_MS = 60_000;

interface Received {
  readonly ids: string[];
  readonly handOvers: string[][];
}

/** The new owner: a peer server that takes ForwardedEvents. */
async function owner(secret: Buffer): Promise<{ url: string; got: Received }> {
  const server = await PeerServer.listen({ agent: 'b', secret, listen: '127.0.0.1:0' });
  cleanups.push(() => server.close());
  const got: Received = { ids: [], handOvers: [] };
  server.handle('ForwardedEvents', (frame) => {
    const events = decodeForwarded(frame.events);
    if (frame.handOver === true) got.handOvers.push(events.map((e) => e.id));
    else for (const e of events) got.ids.push(e.id);
    return { type: 'ForwardedEventsAck', migrationId: frame.migrationId, accepted: events.length, duplicates: 0 };
  });
  return { url: server.url, got };
}

/**
 * The source's forwarding to b; `reachable(dial)` says whether dial number `dial` (from 1) reaches b
 * or the refusing port.
 */
async function source(ownerUrl: string, secret: Buffer, reachable: (dial: number) => boolean) {
  const down = `ws://127.0.0.1:${await freeLoopbackPort()}/`;
  const store = openStore();
  const sensors = new SensorService({ host: 'a', store, onError: () => {} });
  cleanups.push(() => sensors.close());
  const dials: boolean[] = [];
  const forwarding = new Forwarding({
    host: { store, sensors, objects: new ManagedObjectService({ store }), logger: silentLogger },
    connect: () => {
      const up = reachable(dials.length + 1);
      dials.push(up);
      return connectPeer({ url: up ? ownerUrl : down, agent: 'a', expectedPeer: 'b', secret, handshakeTimeoutMs: 1000 });
    },
    retryMs: BACK_OFF_MS,
    retryMaxMs: BACK_OFF_MS,
  });
  cleanups.push(() => forwarding.close());
  sensors.recover();
  forwarding.afterEventsRecovered();
  const rec: ForwardRecord = { migrationId: 'm-g', vm: 'x', peer: 'b', elementIds: ['vm:x'], until: Date.now() + GRACE_MS };
  const deadLetters = (): { id: string; seq: number }[] =>
    (store.db.prepare('SELECT event FROM dead_letters ORDER BY at').all() as { event: Buffer }[]).map((r) => {
      const e = unpack(r.event) as EmbotEvent;
      return { id: e.id, seq: (e.payload as { seq: number }).seq };
    });
  /** Resolves once the grace period is over and everything accepted before it was handed over or dead-lettered. */
  const settled = async (): Promise<void> => {
    await waitUntil(() => Date.now() > rec.until, GRACE_MS + 2000);
    await waitUntil(() => forwarding.journal.get('m-g')?.ended === true, 10_000);
  };
  return { store, sensors, forwarding, rec, dials, deadLetters, settled };
}

const tick = (seq: number): { id: string; ts: number; elementId: string; type: string; payload: { seq: number } } => ({ id: `p-${seq}`, ts: 1000 + seq, elementId: 'vm:x', type: 'TICK', payload: { seq } });

describe('Forwarding at the end of its grace period', () => {
  it('offers a batch that was waiting out a back-off once more when the grace period ends: the owner, back meanwhile, takes it', async () => {
    const secret = randomBytes(32);
    const b = await owner(secret);
    // b is down for the first dial, back for any later one.
    const a = await source(b.url, secret, (dial) => dial > 1);
    a.forwarding.start(a.rec, undefined);
    a.forwarding.record(a.rec, undefined);
    await a.sensors.emit(tick(1));
    await waitUntil(() => a.dials.length === 1);
    // The batch sleeps in its back-off: b is back, but nobody dials it before the grace period ends.
    await a.settled();
    expect(a.deadLetters()).toEqual([]);
    expect(b.got.ids).toEqual(['p-1']);
    expect(a.dials).toEqual([false, true]);
    expect(a.forwarding.counts('m-g')).toEqual({ forwarded: 1, deadLettered: 0 });
    expect(rowCount(a.store)).toBe(0);
  });

  it('offers the held rest (the hand-over) that was waiting out a back-off once more when the grace period ends', async () => {
    const secret = randomBytes(32);
    const b = await owner(secret);
    const a = await source(b.url, secret, (dial) => dial > 1);
    // The events held after the last dirty round, in the hold-queue format the switch ships.
    const held = new SensorService({ host: 'a0', onError: () => {} });
    cleanups.push(() => held.close());
    held.hold(['vm:x']);
    for (const seq of [1, 2]) await held.emit(tick(seq));
    const rest = held.serializeHeld(['vm:x']);
    a.forwarding.start(a.rec, rest);
    a.forwarding.record(a.rec, rest);
    await waitUntil(() => a.dials.length === 1);
    await a.settled();
    expect(a.deadLetters()).toEqual([]);
    expect(b.got.handOvers).toEqual([['p-1', 'p-2']]);
    expect(a.forwarding.counts('m-g')).toEqual({ forwarded: 2, deadLettered: 0 });
  });

  it('dead-letters every batch after a dead letter, so the owner never takes an event whose predecessor it lacks', async () => {
    const secret = randomBytes(32);
    const b = await owner(secret);
    // Down for the first attempt and the last one the end allows; back in time for the next batch's.
    const a = await source(b.url, secret, (dial) => dial > 2);
    a.forwarding.start(a.rec, undefined);
    a.forwarding.record(a.rec, undefined);
    await a.sensors.emit(tick(1));
    await waitUntil(() => a.dials.length === 1);
    // Accepted inside the grace period, queued behind the batch that waits.
    await a.sensors.emit(tick(2));
    await a.settled();
    expect(a.deadLetters().map((d) => d.seq)).toEqual([1, 2]);
    expect(b.got.ids).toEqual([]);
    expect(a.dials).toEqual([false, false]);
    expect(a.forwarding.counts('m-g')).toEqual({ forwarded: 0, deadLettered: 2 });
    expect(rowCount(a.store)).toBe(0);
  });
});

async function waitUntil(pred: () => boolean, timeoutMs = 5000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!pred()) {
    if (Date.now() > end) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 20));
  }
}
