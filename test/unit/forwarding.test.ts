import { describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { rowCount, tempStores } from '../harness/temp-store.ts';
import { freeLoopbackPort } from '../../core/cli/free-port.ts';
import { connectPeer } from '../../core/wire/peer-client.ts';
import { SensorService } from '../../sensors/index.ts';
import { ManagedObjectService } from '../../core/objects/object-service.ts';
import { silentLogger } from '../../core/logger.ts';
import { Forwarding, IDLE_LINK_MS, type ForwardRecord } from '../../core/mobility/forwarding.ts';
import { PeerServer } from '../../core/wire/peer-server.ts';
import { unpack } from 'msgpackr';
import { ErrorCodes, EventError } from '../../core/errors.ts';
import type { Store } from '../../core/store/store.ts';
import type { EmbotEvent } from '../../core/events.ts';

/**
 * Forwarding with real parts: SQLite store files, the sensor service, and (for a new owner that is
 * down) a real refused connection to a loopback port nobody listens on.
 */
const cleanups = cleanupsAfterEach();
const { tmpStoreFile, openStore } = tempStores(cleanups, 'embot-forwarding-');

/** One agent's parts on `file`, as an agent start builds them; `down` is a peer URL that refuses connections. */
function agentOn(store: Store, name: string, down: string) {
  const sensors = new SensorService({ host: name, store, onError: () => {} });
  cleanups.push(() => sensors.close());
  const objects = new ManagedObjectService({ store });
  const forwarding = new Forwarding({
    host: { store, sensors, objects, logger: silentLogger },
    connect: () => connectPeer({ url: down, agent: name, secret: randomBytes(32), handshakeTimeoutMs: 1000 }),
    retryMs: 10,
    retryMaxMs: 50,
  });
  cleanups.push(() => forwarding.close());
  return { sensors, objects, forwarding };
}

const tick = (elementId: string, seq: number, id = `p-${seq}`) => ({ id, ts: 1000 + seq, elementId, type: 'TICK', payload: { seq } });

describe('Forwarding', () => {
  it('the new owner refuses forwarded events it took before a restart of its own, by id', async () => {
    const file = tmpStoreFile();
    const down = `ws://127.0.0.1:${await freeLoopbackPort()}/`;
    let store = openStore(file);
    let b = agentOn(store, 'b', down);
    const delivered: string[] = [];
    b.sensors.subscribe('vm:x', { deliver: (e: EmbotEvent) => void delivered.push(e.id) });
    const events = [tick('vm:x', 1), tick('vm:x', 2), tick('vm:x', 3)].map((e) => ({ ...e, source: 'a' }) as EmbotEvent);
    expect(await b.forwarding.receive('m-1', events)).toMatchObject({ accepted: 3, duplicates: 0 });
    await b.sensors.idle();
    expect(delivered).toEqual(['p-1', 'p-2', 'p-3']);

    // Processed and forgotten in memory: a restart of b.
    await b.sensors.close();
    store.close();
    store = openStore(file);
    b = agentOn(store, 'b', down);
    const again: string[] = [];
    b.sensors.subscribe('vm:x', { deliver: (e: EmbotEvent) => void again.push(e.id) });
    const resent = [events[1]!, events[2]!, { ...events[2]!, id: 'p-4', payload: { seq: 4 } }];
    expect(await b.forwarding.receive('m-1', resent)).toMatchObject({ accepted: 1, duplicates: 2 });
    await b.sensors.idle();
    expect(again).toEqual(['p-4']);
  });

  it('a restarted source gives its journaled rows to the restored forwarding, not to nobody; once the grace period is over they are dead letters and later events are refused naming the owner', async () => {
    const file = tmpStoreFile();
    const down = `ws://127.0.0.1:${await freeLoopbackPort()}/`;
    let store = openStore(file);
    let a = agentOn(store, 'a', down);
    a.sensors.recover();
    a.forwarding.afterEventsRecovered();
    const rec: ForwardRecord = { migrationId: 'm-7', vm: 'x', peer: 'b', elementIds: ['vm:x', 'disk:x.0'], until: Date.now() + 60_000 };
    a.forwarding.start(rec, undefined);
    a.forwarding.record(rec, undefined);
    expect(await a.forwarding.admit({ elementId: 'vm:x' })).toEqual({ forwardedTo: 'b' });
    for (let seq = 0; seq < 3; seq++) await a.sensors.emit(tick('vm:x', seq));
    await a.sensors.idle();
    // b is down: the rows stay.
    expect(rowCount(store)).toBe(3);
    expect(a.sensors.stats().forwarded).toBe(0);

    // Crash and restart inside the grace period: restored before recovery, the rows go to the redirect.
    a.forwarding.close();
    await a.sensors.close();
    store.close();
    store = openStore(file);
    a = agentOn(store, 'a', down);
    expect(a.forwarding.restore()).toBe(1);
    expect(a.sensors.recover()).toBe(3);
    a.forwarding.afterEventsRecovered();
    await a.sensors.idle();
    expect(a.sensors.stats()).toMatchObject({ unrouted: 0, dispatched: 0 });
    expect(a.sensors.stats().forwardQueued).toBe(3);
    expect(rowCount(store)).toBe(3);

    // The grace period ends (journaled as over) while b is still down: the next start dead-letters them.
    store.db.prepare('UPDATE forwardings SET until = ? WHERE migration_id = ?').run(Date.now() - 1, 'm-7');
    a.forwarding.close();
    await a.sensors.close();
    store.close();
    store = openStore(file);
    a = agentOn(store, 'a', down);
    a.forwarding.restore();
    a.sensors.recover();
    a.forwarding.afterEventsRecovered();
    const refused = await a.forwarding.admit({ elementId: 'disk:x.0' }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(refused).toBeInstanceOf(EventError);
    expect((refused as EventError).code).toBe(ErrorCodes.ELEMENT_MOVED);
    expect((refused as EventError).details).toMatchObject({ owner: 'b', migrationId: 'm-7', elementId: 'disk:x.0' });
    const letters = store.db.prepare('SELECT embot_id, reason FROM dead_letters').all() as { embot_id: string; reason: string }[];
    expect(letters).toHaveLength(3);
    for (const l of letters) {
      expect(l.embot_id).toBe('forward:m-7');
      expect(l.reason).toContain('grace period');
    }
    expect(a.forwarding.counts('m-7')).toEqual({ forwarded: 0, deadLettered: 3 });
    expect(rowCount(store)).toBe(0);
    // An element this agent does own is not refused.
    a.objects.register({ id: 'vm:y', kind: 'vm', state: {} });
    expect(await a.forwarding.admit({ elementId: 'vm:y' })).toEqual({});
  });
});

describe('Forwarding: its link to the new owner', () => {
  it('is closed once idle and dialled again for a later event, which still arrives (many moved VMs do not pile up links to one peer)', async () => {
    const secret = randomBytes(32);
    const server = await PeerServer.listen({ agent: 'b', secret, listen: '127.0.0.1:0' });
    cleanups.push(() => server.close());
    const got: string[] = [];
    server.handle('ForwardedEvents', (frame) => {
      // Redirected events go as a plain list (the hand-over of held ones as hold queues: none here).
      const events = unpack(frame.events) as EmbotEvent[];
      for (const e of events) got.push(e.id);
      return { type: 'ForwardedEventsAck', migrationId: frame.migrationId, accepted: events.length, duplicates: 0 };
    });
    const store = openStore(tmpStoreFile());
    const sensors = new SensorService({ host: 'a', store, onError: () => {} });
    cleanups.push(() => sensors.close());
    let dials = 0;
    const forwarding = new Forwarding({
      host: { store, sensors, objects: new ManagedObjectService({ store }), logger: silentLogger },
      connect: () => {
        dials++;
        return connectPeer({ url: server.url, agent: 'a', expectedPeer: 'b', secret });
      },
      retryMs: 10,
    });
    cleanups.push(() => forwarding.close());
    sensors.recover();
    forwarding.afterEventsRecovered();
    const link = await connectPeer({ url: server.url, agent: 'a', expectedPeer: 'b', secret });
    const rec: ForwardRecord = { migrationId: 'm-9', vm: 'x', peer: 'b', elementIds: ['vm:x'], until: Date.now() + 60_000 };
    expect(forwarding.start(rec, undefined, link)).toBe(true);
    forwarding.record(rec, undefined);
    await sensors.emit(tick('vm:x', 1));
    await waitUntil(() => got.length === 1);
    expect(dials).toBe(0); // the migration's own link carried it
    // Idle: closed, at both ends.
    await waitUntil(() => !link.isOpen && server.connections.length === 0, IDLE_LINK_MS + 2000);
    await sensors.emit(tick('vm:x', 2));
    await waitUntil(() => got.length === 2);
    expect(got).toEqual(['p-1', 'p-2']);
    expect(dials).toBe(1);
  });
});

async function waitUntil(pred: () => boolean, timeoutMs = 5000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!pred()) {
    if (Date.now() > end) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 20));
  }
}
