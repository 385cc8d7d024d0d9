/**
 * The cost of the dashboard's live channel on the event path (issue 15): events/s through the
 * `counter` policy (sensor service → journal → runtime → module worker → snapshot commit) with the
 * live hub wired as core/agent.ts wires it, (a) with no page connected and (b) with one page's
 * event stream connected over real HTTP and read to the end, which gets every processed event and
 * the policies' new state pushed. Same run, same rig, rounds rotating the two, each round's ratio
 * to its own no-client pump, median of the rounds. Target: at most 3 % slower (ratio >= 0.97).
 * A third row: the hub wired with no client against the hub not wired at all (the branch it adds).
 */
import { EventEmitter } from 'eventemitter3';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { AgentControl } from '../core/control/control-api.ts';
import { createDashboard } from '../core/control/dashboard-routes.ts';
import { wireLiveSources } from '../core/control/live-sources.ts';
import { startControlServer } from '../core/control/server.ts';
import type { EmbotEvent } from '../core/events.ts';
import { createLogger } from '../core/logger.ts';
import { checkModuleDir } from '../core/plugins/index.ts';
import { Store } from '../core/store/store.ts';
import { EffectorRegistry } from '../effectors/index.ts';
import { EMBOT_API_VERSION, EmbotRuntime } from '../embots/index.ts';
import { SensorService } from '../sensors/index.ts';
import type { BenchRow, BenchTable } from './table.ts';

const COUNTER_DIR = fileURLToPath(new URL('../test/fixtures/plugins/counter/', import.meta.url));
const BURST = 10_000;
const MAX_SLOWDOWN = 0.03;

export interface LiveChannelBenchOptions {
  readonly quick?: boolean;
}

interface Rig {
  readonly sensors: SensorService;
  readonly runtime: EmbotRuntime;
  readonly url: string;
  wire(): void;
  unwire(): void;
  seq: number;
  close(): Promise<void>;
}

async function startRig(file: string): Promise<Rig> {
  const store = Store.open({ file, synchronous: 'NORMAL' });
  const sensors = new SensorService({ host: 'bench', store });
  const runtime = new EmbotRuntime({ store, sensors, effectors: new EffectorRegistry() });
  const c = checkModuleDir(COUNTER_DIR, EMBOT_API_VERSION);
  if (!c.ok) throw new Error(`counter fixture is not a valid module: ${c.problem.error.message}`);
  await runtime.loadModule(c.record);
  await runtime.attach({ id: 'vm:bench-0', kind: 'vm', scope: ['vm:bench-0'] });
  // The control API over this rig's runtime: what the dashboard reads when it pushes. The parts a
  // bench without VMs, migrations or an agent has nothing for answer empty (named as such).
  const started = Date.now();
  const control = {
    status: () => ({ name: 'bench', version: '0', pid: process.pid, startedAt: started, uptimeMs: Date.now() - started, driver: 'none', safe: false, dataDir: '', pluginsDir: '', control: { host: '127.0.0.1', port: 0 }, counts: { vms: 0, elements: 1, embots: runtime.list().length, quarantinedEmbots: 0, modules: 1, modulesWithErrors: 0, queuedEvents: sensors.stats().queued, heldEvents: 0, parkedEvents: 0, deadLetters: 0 } }),
    listVms: () => [],
    listEmbots: () => runtime.list(),
    listPlugins: () => [],
    listMigrations: () => [],
    listEvents: () => [],
    getMigration: () => undefined,
  } as unknown as AgentControl;
  const logger = createLogger({ level: 'silent' });
  const dashboard = createDashboard({ host: { control, policyCharts: () => runtime.policyCharts(), peers: () => [], hostLoad: async () => 0, cancelMigration: () => false }, logger });
  const server = await startControlServer({ host: '127.0.0.1', port: 0, control, dashboard, logger });
  // No VMs and no migrations in this rig: their sources are emitters that never fire.
  const idle = new EventEmitter();
  let unwire: (() => void) | undefined;
  const wire = (): void => {
    unwire ??= wireLiveSources(dashboard.hub, { runtime, mobility: idle as never, vms: idle as never, getMigration: () => undefined });
  };
  wire();
  return {
    sensors,
    runtime,
    url: server.url,
    wire,
    unwire: () => {
      unwire?.();
      unwire = undefined;
    },
    seq: 0,
    close: async () => {
      dashboard.close();
      await server.close();
      await sensors.idle();
      await runtime.close();
      await sensors.close();
      store.close();
    },
  };
}

/** A page's live connection: reads the stream to the end, counting what it got. */
async function connectClient(url: string): Promise<{ bytes(): number; text(): string; close(): void }> {
  const abort = new AbortController();
  const res = await fetch(`${url}/ui/live`, { signal: abort.signal });
  if (res.status !== 200) throw new Error(`live channel answered ${res.status}`);
  let bytes = 0;
  let text = '';
  const decoder = new TextDecoder();
  let first!: () => void;
  const snapshot = new Promise<void>((r) => (first = r));
  void (async () => {
    for await (const chunk of res.body!) {
      bytes += (chunk as Uint8Array).length;
      text += decoder.decode(chunk as Uint8Array, { stream: true });
      if (bytes > 0) first();
    }
  })().catch(() => {});
  await snapshot;
  return { bytes: () => bytes, text: () => text, close: () => abort.abort() };
}

/** Posts `n` TICKs and resolves with events/s once the runtime committed them all. */
async function pump(rig: Rig, n: number): Promise<number> {
  let processed = 0;
  let resolveDone!: () => void;
  const done = new Promise<void>((r) => (resolveDone = r));
  const onProcessed = (events: readonly EmbotEvent[]): void => {
    processed += events.length;
    if (processed >= n) resolveDone();
  };
  rig.runtime.on('processed', onProcessed);
  const start = process.hrtime.bigint();
  for (let from = 0; from < n; from += BURST) {
    const end = Math.min(n, from + BURST);
    for (let i = from; i < end; i++) rig.sensors.post({ elementId: 'vm:bench-0', type: 'TICK', payload: { seq: rig.seq++ } });
    await rig.sensors.idle();
  }
  await done;
  const rate = n / (Number(process.hrtime.bigint() - start) / 1e9);
  rig.runtime.off('processed', onProcessed);
  await rig.runtime.idle();
  return rate;
}

function median(xs: readonly number[]): number {
  return [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
}

/**
 * @example
 * ```ts
 * console.log(renderTable(await run({ quick: true })));
 * ```
 */
export async function run(opts: LiveChannelBenchOptions = {}): Promise<BenchTable> {
  const events = opts.quick ? 20_000 : 60_000;
  const rounds = opts.quick ? 3 : 11;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'embot-bench-live-'));
  let rig: Rig | undefined;
  try {
    rig = await startRig(path.join(dir, 'live.sqlite'));
    await pump(rig, events / 4);
    const noClient: number[] = [];
    const withClient: number[] = [];
    const unwired: number[] = [];
    let pushedBytes = 0;
    let pushedEvents = 0;
    let skippedEvents = 0;
    const r0 = rig;
    const jobs: (() => Promise<void>)[] = [
      async () => void noClient.push(await pump(r0, events)),
      async () => {
        const client = await connectClient(r0.url);
        const before = client.bytes();
        withClient.push(await pump(r0, events));
        // Let the last coalesced flush reach the page before it goes.
        await new Promise((r) => setTimeout(r, 120));
        pushedBytes += client.bytes() - before;
        for (const line of client.text().split('\n')) {
          if (!line.startsWith('data: {"kind":"events"')) continue;
          const m = JSON.parse(line.slice(6)) as { events: unknown[]; dropped: number };
          pushedEvents += m.events.length;
          skippedEvents += m.dropped;
        }
        client.close();
      },
      async () => {
        r0.unwire();
        unwired.push(await pump(r0, events));
        r0.wire();
      },
    ];
    for (let r = 0; r < rounds; r++) for (let j = 0; j < jobs.length; j++) await jobs[(j + r) % jobs.length]!();
    const clientRatios = withClient.map((v, i) => v / noClient[i]!);
    const branchRatios = noClient.map((v, i) => v / unwired[i]!);
    const evs = (x: number): string => Math.round(x).toLocaleString('en-US');
    const list = (xs: readonly number[], f: (x: number) => string): string => xs.map(f).join(', ');
    const n = `${events.toLocaleString('en-US')} events × ${rounds} rounds`;
    const rows: BenchRow[] = [
      {
        name: `counter policy, durable SQLite, one live page connected (${n})`,
        value: median(withClient),
        unit: 'ev/s',
        limitName: 'the same, no page connected',
        limit: median(noClient),
        ratio: median(clientRatios),
        target: `ratio >= ${(1 - MAX_SLOWDOWN).toFixed(2)}`,
        met: median(clientRatios) >= 1 - MAX_SLOWDOWN,
      },
      {
        name: `counter policy, live hub wired, no page connected (${n})`,
        value: median(noClient),
        unit: 'ev/s',
        limitName: 'the same, hub not wired',
        limit: median(unwired),
        ratio: median(branchRatios),
        target: `ratio >= ${(1 - MAX_SLOWDOWN).toFixed(2)}`,
        met: median(branchRatios) >= 1 - MAX_SLOWDOWN,
      },
    ];
    return {
      title: 'Dashboard live channel on the event path (issue 15)',
      rows,
      notes: [
        'ratio = median over the rounds of (events/s in the case) / (events/s of its limit in the same round); value and limit are the medians of the rates. Same rig, order rotated each round.',
        `the connected page got ${(pushedBytes / 1024 / 1024).toFixed(1)} MiB over the rounds: ${pushedEvents.toLocaleString('en-US')} events, ${skippedEvents.toLocaleString('en-US')} more counted as skipped (a flush carries the newest 500; a page shows a few hundred), and the embot list once per 50 ms flush. The stream is a real HTTP response read by a fetch client.`,
        `rounds: no page ${list(noClient, evs)} ev/s; one page ${list(withClient, evs)} ev/s (ratios ${list(clientRatios, (x) => x.toFixed(3))}); hub not wired ${list(unwired, evs)} ev/s.`,
      ],
    };
  } finally {
    await rig?.close().catch(() => {});
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
