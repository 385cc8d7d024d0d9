import { EventEmitter } from 'node:events';
import { describe, expect, it } from 'vitest';
import { LiveHub, type LiveState } from '../../core/control/live-hub.ts';
import { wireLiveSources, type LiveSources } from '../../core/control/live-sources.ts';
import type { DashboardSnapshot, LiveMessage, MigrationInfo } from '../../core/control/dashboard-api.ts';
import { hubServersAfterEach, until } from '../harness/live-stream.ts';

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

const servers = hubServersAfterEach();

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
  const page = await servers.stream(hub);
  await until(() => page.read().includes('event: snapshot'), 'the snapshot');
  return {
    migrations: () => [...page.read().matchAll(/event: migration\ndata: (.*)\n/g)].map((m) => (JSON.parse(m[1]!) as Extract<LiveMessage, { kind: 'migration' }>).migration),
    abort: page.abort,
  };
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
