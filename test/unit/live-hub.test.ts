import { describe, expect, it } from 'vitest';
import { LiveHub, type LiveState, type LiveTopic } from '../../core/control/live-hub.ts';
import type { DashboardSnapshot, LiveMessage } from '../../core/control/dashboard-api.ts';
import type { EmbotEvent } from '../../core/events.ts';
import { hubServersAfterEach, until } from '../harness/live-stream.ts';

/** A LiveState that counts its reads (the hub's cost is what it reads and writes). */
function countingState(): LiveState & { reads: Record<string, number> } {
  const reads: Record<string, number> = { snapshot: 0 };
  const snapshot = { cluster: {}, vms: [], embots: [], plugins: [], migrations: [], events: [], charts: {} } as unknown as DashboardSnapshot;
  return {
    reads,
    async snapshot() {
      reads['snapshot']!++;
      return snapshot;
    },
    async message(topic: LiveTopic): Promise<LiveMessage> {
      reads[topic] = (reads[topic] ?? 0) + 1;
      return topic === 'embots' ? { kind: 'embots', embots: [] } : ({ kind: topic } as LiveMessage);
    },
  };
}

const ev = (i: number): EmbotEvent => ({ id: `e${i}`, ts: i, elementId: 'vm:x', type: 'TICK', payload: { i } });

const servers = hubServersAfterEach();
/** A real HTTP server whose every request becomes a hub client; returns the received text so far. */
const serve = servers.stream;

describe('LiveHub', () => {
  it('does nothing on the event path while no client is connected', async () => {
    const state = countingState();
    const hub = new LiveHub({ state, flushMs: 1 });
    for (let i = 0; i < 1000; i++) hub.events([ev(i)]);
    hub.changed('vms');
    await new Promise((r) => setTimeout(r, 20));
    expect(state.reads).toEqual({ snapshot: 0 });
    hub.close();
  });

  it('sends a snapshot first, then coalesces a burst into one events message and one read per topic', async () => {
    const state = countingState();
    const hub = new LiveHub({ state, flushMs: 30 });
    const client = await serve(hub);
    await until(() => client.read().includes('event: snapshot'), 'the snapshot');
    for (let i = 0; i < 100; i++) hub.events([ev(i)]);
    await until(() => client.read().includes('event: embots'), 'the embots message');
    const text = client.read();
    expect(text.match(/event: events/g)).toHaveLength(1);
    expect(state.reads['embots']).toBe(1);
    const data = JSON.parse(/event: events\ndata: (.*)\n/.exec(text)![1]!) as Extract<LiveMessage, { kind: 'events' }>;
    expect(data.events.map((e) => e.id)).toEqual(Array.from({ length: 100 }, (_, i) => `e${i}`));
    client.abort();
    await until(() => hub.size === 0, 'the client to be gone');
    hub.close();
  });

  it('keeps the newest events of a burst larger than its bound and says how many it left out', async () => {
    const hub = new LiveHub({ state: countingState(), flushMs: 30, maxPendingEvents: 10 });
    const client = await serve(hub);
    await until(() => client.read().includes('event: snapshot'), 'the snapshot');
    for (let i = 0; i < 25; i++) hub.events([ev(i)]);
    await until(() => client.read().includes('event: events'), 'the events message');
    const data = JSON.parse(/event: events\ndata: (.*)\n/.exec(client.read())![1]!) as Extract<LiveMessage, { kind: 'events' }>;
    expect(data.dropped).toBe(15);
    expect(data.events.map((e) => e.id)).toEqual(Array.from({ length: 10 }, (_, i) => `e${i + 15}`));
    client.abort();
    hub.close();
  });

  it('cuts a client that falls too far behind (it reconnects and gets a fresh snapshot)', async () => {
    const hub = new LiveHub({ state: countingState(), flushMs: 1, maxBufferedBytes: 1 });
    const port = await servers.listen(hub);
    // A client that never reads: the socket buffers fill and writableLength grows.
    const { connect } = await import('node:net');
    const sock = connect(port, '127.0.0.1');
    sock.pause();
    sock.write('GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n');
    await until(() => hub.size === 1, 'the client');
    const big = Array.from({ length: 500 }, (_, i) => ({ ...ev(i), payload: 'x'.repeat(2000) }));
    for (let round = 0; round < 200 && hub.size > 0; round++) {
      hub.events(big);
      await new Promise((r) => setTimeout(r, 5));
    }
    expect(hub.size).toBe(0);
    sock.destroy();
    hub.close();
  });
});
