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
import type { AgentControl } from '../core/control/control-api.ts';
import { createDashboard } from '../core/control/dashboard-routes.ts';
import { wireLiveSources } from '../core/control/live-sources.ts';
import { startControlServer } from '../core/control/server.ts';
import { createLogger } from '../core/logger.ts';
import type { EmbotRuntime } from '../embots/index.ts';
import type { SensorService } from '../sensors/index.ts';
import { attachCounter, openRuntimeStack, postTickBursts, processedWaiter } from './runtime-stack.ts';
import type { BenchRow, BenchTable } from './table.ts';

const BURST = 10_000;
const MAX_SLOWDOWN = 0.03;
const ORDERS = [
  [0, 1, 2],
  [1, 2, 0],
  [2, 0, 1],
  [0, 2, 1],
  [2, 1, 0],
  [1, 0, 2],
] as const;

export interface LiveChannelBenchOptions {
  readonly quick?: boolean;
}

interface Rig {
  /** Live pages connected. */
  readonly clients: () => number;
  readonly sensors: SensorService;
  readonly runtime: EmbotRuntime;
  readonly url: string;
  wire(): void;
  unwire(): void;
  seq: number;
  close(): Promise<void>;
}

async function startRig(file: string): Promise<Rig> {
  const stack = openRuntimeStack(file);
  const { sensors, runtime } = stack;
  await attachCounter(runtime);
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
    clients: () => dashboard.hub.size,
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
      await stack.close();
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
      if (text.includes('event: snapshot')) first();
    }
  })().catch(() => {});
  await snapshot;
  return { bytes: () => bytes, text: () => text, close: () => abort.abort() };
}

/** One pump's rates: events per wall-clock second, and per CPU second of this process (main thread, the module worker and, with a page, its reader). */
interface Rates {
  readonly wall: number;
  readonly cpu: number;
}

/** Posts `n` TICKs and resolves with the rates once the runtime committed them all. */
async function pump(rig: Rig, n: number): Promise<Rates> {
  const processed = processedWaiter(rig.runtime, n);
  const cpu0 = process.cpuUsage();
  const start = process.hrtime.bigint();
  await postTickBursts(rig, n, BURST);
  await processed.done;
  const wall = n / (Number(process.hrtime.bigint() - start) / 1e9);
  const used = process.cpuUsage(cpu0);
  processed.stop();
  await rig.runtime.idle();
  return { wall, cpu: n / ((used.user + used.system) / 1e6) };
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
  // Short pumps, many rounds: on a shared machine the speed wanders over seconds, so the three
  // cases of a round run back to back and only their ratios are compared.
  const events = opts.quick ? 5_000 : 10_000;
  const rounds = opts.quick ? 6 : 48;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'embot-bench-live-'));
  let rig: Rig | undefined;
  try {
    rig = await startRig(path.join(dir, 'live.sqlite'));
    await pump(rig, events * 2);
    const noClient: Rates[] = [];
    const withClient: Rates[] = [];
    const unwired: Rates[] = [];
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
        client.close();
        // The next case must not start while the hub still has this page.
        while (r0.clients() > 0) await new Promise((r) => setTimeout(r, 5));
        for (const line of client.text().split('\n')) {
          if (!line.startsWith('data: {"kind":"events"')) continue;
          const m = JSON.parse(line.slice(6)) as { events: unknown[]; dropped: number };
          pushedEvents += m.events.length;
          skippedEvents += m.dropped;
        }
      },
      async () => {
        r0.unwire();
        unwired.push(await pump(r0, events));
        r0.wire();
      },
    ];
    // Every order of the three cases in turn: a rotation alone keeps each case behind the same
    // neighbour, and what one case leaves behind (garbage, a WAL checkpoint) would bias the next.
    for (let r = 0; r < rounds; r++) for (const j of ORDERS[r % ORDERS.length]!) await jobs[j]!();
    const evs = (x: number): string => Math.round(x).toLocaleString('en-US');
    const n = `${events.toLocaleString('en-US')} events × ${rounds} rounds`;
    const target = `ratio >= ${(1 - MAX_SLOWDOWN).toFixed(2)}`;
    const row = (name: string, unit: string, limitName: string, xs: readonly Rates[], ys: readonly Rates[], pick: (r: Rates) => number): BenchRow => {
      const ratio = median(xs.map((x, i) => pick(x) / pick(ys[i]!)));
      return { name, value: median(xs.map(pick)), unit, limitName, limit: median(ys.map(pick)), ratio, target, met: ratio >= 1 - MAX_SLOWDOWN };
    };
    const spread = (xs: readonly Rates[], ys: readonly Rates[], pick: (r: Rates) => number): string => {
      const r = xs.map((x, i) => pick(x) / pick(ys[i]!)).sort((a, b) => a - b);
      return `${r[Math.floor(r.length / 4)]!.toFixed(3)}–${r[Math.floor((3 * r.length) / 4)]!.toFixed(3)}`;
    };
    const wall = (r: Rates): number => r.wall;
    const cpu = (r: Rates): number => r.cpu;
    const rows: BenchRow[] = [
      row(`counter policy, durable SQLite, one live page connected, wall clock (${n})`, 'ev/s', 'the same, no page connected', withClient, noClient, wall),
      row(`the same, per CPU second of the agent process (page reader included)`, 'ev/CPU-s', 'the same, no page connected', withClient, noClient, cpu),
      row(`counter policy, live hub wired, no page connected, wall clock (${n})`, 'ev/s', 'the same, hub not wired', noClient, unwired, wall),
      row(`the same, per CPU second of the agent process`, 'ev/CPU-s', 'the same, hub not wired', noClient, unwired, cpu),
    ];
    return {
      title: 'Dashboard live channel on the event path (issue 15)',
      rows,
      notes: [
        'ratio = median over the rounds of (rate in the case) / (rate of its limit in the same round); value and limit are the medians of the rates. Same rig; the rounds go through all six orders of the three cases. Wall clock is what the issue asks; CPU seconds (process.cpuUsage: main thread and module worker) are shown beside it because on a shared machine the wall-clock rate of one pump wanders far more than 3 %.',
        `interquartile range of the per-round ratios: page vs none ${spread(withClient, noClient, wall)} (wall), ${spread(withClient, noClient, cpu)} (CPU); wired vs not ${spread(noClient, unwired, wall)} (wall), ${spread(noClient, unwired, cpu)} (CPU).`,
        `the connected page got ${(pushedBytes / 1024 / 1024).toFixed(1)} MiB over the rounds: ${pushedEvents.toLocaleString('en-US')} events, ${skippedEvents.toLocaleString('en-US')} more counted as skipped (a flush carries the newest 500; a page shows a few hundred), and the embot list once per 50 ms flush. The stream is a real HTTP response read by a fetch client in the same process (its CPU is counted against the page case).`,
        `wall-clock medians: no page ${evs(median(noClient.map(wall)))}, one page ${evs(median(withClient.map(wall)))}, hub not wired ${evs(median(unwired.map(wall)))} ev/s; slowest and fastest no-page pumps ${evs(Math.min(...noClient.map(wall)))} and ${evs(Math.max(...noClient.map(wall)))} ev/s.`,
      ],
    };
  } finally {
    await rig?.close().catch(() => {});
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
