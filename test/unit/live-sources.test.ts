import { EventEmitter } from 'node:events';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { LiveHub, type LiveState } from '../../core/control/live-hub.ts';
import { wireLiveSources, type LiveSources } from '../../core/control/live-sources.ts';
import type { DashboardSnapshot, LiveMessage, MigrationInfo } from '../../core/control/dashboard-api.ts';

/**
 * The live channel's wiring for a pre-warm (issue 15): its state lives on the parent row, which has
 * no progress of its own, so each destination's reading re-sends the parent; nothing extra is read
 * while no page is connected. Real hub, real HTTP stream, node EventEmitters as the agent's sources.
 */
const state: LiveState = {
  snapshot: async () => ({ cluster: {}, vms: [], embots: [], plugins: [], migrations: [], events: [], charts: {} }) as unknown as DashboardSnapshot,
  message: async (topic) => ({ kind: topic }) as LiveMessage,
};

const row = (id: string, extra: Partial<MigrationInfo> = {}): MigrationInfo => ({ id, role: 'source', vm: 'app', peer: 'b,c', phase: 'racing', outcome: null, startedAt: 1, updatedAt: 1, ...extra });
const prewarm = { commandedAt: null, downtimeLimitMs: 300, exitShare: 1, destinations: [{ name: 'b', status: 'warming', copiedBytes: 10, remainingBytes: 0, rateBytesPerSec: 5, dirtyRateBytesPerSec: 1, rounds: 3, exitConditionMet: true }] } as const;

let server: Server | undefined;
afterEach(async () => {
  await new Promise<void>((r) => (server ? server.close(() => r()) : r()));
  server?.closeAllConnections();
  server = undefined;
});

function sources(records: ReadonlyMap<string, MigrationInfo>): LiveSources & { mobility: EventEmitter; reads: string[] } {
  const reads: string[] = [];
  return {
    reads,
    runtime: new EventEmitter() as unknown as LiveSources['runtime'],
    mobility: new EventEmitter(),
    vms: new EventEmitter() as unknown as LiveSources['vms'],
    getMigration: (id) => {
      reads.push(id);
      return records.get(id);
    },
  } as LiveSources & { mobility: EventEmitter; reads: string[] };
}

async function client(hub: LiveHub): Promise<{ migrations(): MigrationInfo[]; abort(): void }> {
  server = createServer((_req, res) => void hub.attach(res));
  await new Promise<void>((r) => server!.listen(0, '127.0.0.1', () => r()));
  const { port } = server.address() as AddressInfo;
  let text = '';
  const abort = new AbortController();
  const res = await fetch(`http://127.0.0.1:${port}/`, { signal: abort.signal });
  void (async () => {
    for await (const chunk of res.body!) text += Buffer.from(chunk as Uint8Array).toString('utf8');
  })().catch(() => {});
  await until(() => text.includes('event: snapshot'), 'the snapshot');
  return {
    migrations: () => [...text.matchAll(/event: migration\ndata: (.*)\n/g)].map((m) => (JSON.parse(m[1]!) as Extract<LiveMessage, { kind: 'migration' }>).migration),
    abort: () => abort.abort(),
  };
}

async function until(check: () => boolean, what: string): Promise<void> {
  const started = Date.now();
  while (!check()) {
    if (Date.now() - started > 5000) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

describe('wireLiveSources: pre-warm', () => {
  it("a destination's reading re-sends its running pre-warm's parent row, with the per-destination state", async () => {
    const records = new Map([['m-1', row('m-1', { prewarm })]]);
    const s = sources(records);
    const hub = new LiveHub({ state, flushMs: 5 });
    const undo = wireLiveSources(hub, s);
    const c = await client(hub);
    s.mobility.emit('progress', row('m-1~b', { peer: 'b', phase: 'migratingVm' }));
    await until(() => c.migrations().length >= 2, 'child and parent');
    const sent = c.migrations();
    expect(sent.map((m) => m.id).sort()).toEqual(['m-1', 'm-1~b']);
    expect(sent.find((m) => m.id === 'm-1')?.prewarm).toEqual(prewarm);
    c.abort();
    undo();
    hub.close();
  });

  it('a plain fan-out child, a target-side reading or a finished pre-warm sends the reading alone', async () => {
    const records = new Map([
      ['m-2', row('m-2')],
      ['m-3', row('m-3', { prewarm, outcome: 'completed' })],
    ]);
    const s = sources(records);
    const hub = new LiveHub({ state, flushMs: 5 });
    const undo = wireLiveSources(hub, s);
    const c = await client(hub);
    s.mobility.emit('progress', row('m-2~b'));
    s.mobility.emit('progress', row('m-3~c'));
    s.mobility.emit('progress', row('m-4~b', { role: 'target' }));
    s.mobility.emit('progress', row('m-5'));
    await until(() => c.migrations().length >= 4, 'the four readings');
    await new Promise((r) => setTimeout(r, 30));
    expect(c.migrations().map((m) => m.id).sort()).toEqual(['m-2~b', 'm-3~c', 'm-4~b', 'm-5']);
    // Only the two source-side children looked their parent up.
    expect(s.reads).toEqual(['m-2', 'm-3']);
    c.abort();
    undo();
    hub.close();
  });

  it('reads nothing while no page is connected', () => {
    const s = sources(new Map([['m-1', row('m-1', { prewarm })]]));
    const hub = new LiveHub({ state, flushMs: 5 });
    const undo = wireLiveSources(hub, s);
    for (let i = 0; i < 100; i++) s.mobility.emit('progress', row('m-1~b'));
    expect(s.reads).toEqual([]);
    undo();
    hub.close();
  });
});
