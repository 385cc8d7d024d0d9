/**
 * The cost of the metrics registry on the event path (issue 15): events/s through the `counter`
 * policy (sensor service → journal → runtime → module worker → snapshot commit) without metrics,
 * and with an AgentMetrics wired to the same services and scraped while the events flow: every
 * second (already 15 × Prometheus's default rate) and every 50 ms (a stress case that shows what a
 * scrape itself costs). Same run, rounds rotating the three, each round's ratio to its own
 * without-metrics pump, median of the rounds. Target: at most 3 % slower (ratio >= 0.97).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { AgentMetrics } from '../core/metrics/index.ts';
import type { EmbotRuntime } from '../embots/index.ts';
import type { SensorService } from '../sensors/index.ts';
import { attachCounter, openRuntimeStack, postTickBursts, processedWaiter } from './runtime-stack.ts';
import type { BenchRow, BenchTable } from './table.ts';

const BURST = 10_000;
const SCRAPE_INTERVALS_MS = [1000, 50] as const;
const MAX_SLOWDOWN = 0.03;

export interface MetricsBenchOptions {
  readonly quick?: boolean;
}

interface Rig {
  readonly sensors: SensorService;
  readonly runtime: EmbotRuntime;
  readonly metrics?: AgentMetrics;
  seq: number;
  close(): Promise<void>;
}

async function startRig(file: string, withMetrics: boolean): Promise<Rig> {
  const { sensors, runtime, close } = openRuntimeStack(file);
  await attachCounter(runtime);
  // Wired as core/agent.ts wires it: the scrape reads the services' own counts.
  const metrics = withMetrics
    ? new AgentMetrics({
        agent: { name: 'bench', version: '0', driver: 'sim' },
        events: () => ({ ...sensors.stats(), parked: runtime.parkedCount(), deadLetters: runtime.deadLetterCount() }),
        embots: () => runtime.list(),
        plugins: () => runtime.loadedModules().map((m) => ({ name: m.name, status: 'loaded', restarts: m.restarts })),
        vms: () => [],
        migrations: () => [],
        udp: () => [],
        directory: () => ({ kind: 'static', state: 'static', peers: [] }),
      })
    : undefined;
  return { sensors, runtime, ...(metrics ? { metrics } : {}), seq: 0, close };
}

/** Posts `n` TICKs and resolves with events/s once the runtime committed them all; scrapes meanwhile when the rig has metrics. */
async function pump(rig: Rig, n: number, scrapeEveryMs: number | undefined): Promise<{ rate: number; cpuRate: number; scrapes: number; scrapeMs: number }> {
  const processed = processedWaiter(rig.runtime, n);
  let scrapes = 0;
  let scrapeNs = 0n;
  let bytes = 0;
  const timer = rig.metrics && scrapeEveryMs !== undefined
    ? setInterval(() => {
        const t = process.hrtime.bigint();
        void rig.metrics!.text().then((text) => {
          scrapeNs += process.hrtime.bigint() - t;
          scrapes++;
          bytes += text.length;
        });
      }, scrapeEveryMs)
    : undefined;
  const cpu = process.cpuUsage();
  const start = process.hrtime.bigint();
  await postTickBursts(rig, n, BURST);
  await processed.done;
  const rate = n / (Number(process.hrtime.bigint() - start) / 1e9);
  const used = process.cpuUsage(cpu);
  // Events per CPU-second of the whole process (main thread, module worker, scrapes): what the
  // metrics cost, with less of the other tenants of a shared machine in it than wall time has.
  const cpuRate = n / ((used.user + used.system) / 1e6);
  if (timer) clearInterval(timer);
  processed.stop();
  await rig.runtime.idle();
  return { rate, cpuRate, scrapes, scrapeMs: scrapes ? Number(scrapeNs) / 1e6 / scrapes : 0 };
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
export async function run(opts: MetricsBenchOptions = {}): Promise<BenchTable> {
  const events = opts.quick ? 20_000 : 60_000;
  const rounds = opts.quick ? 3 : 11;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'embot-bench-metrics-'));
  const rigs: Rig[] = [];
  try {
    // One rig: its registry costs nothing until scraped (nothing is counted per event), so
    // "without" is the same rig with no scraper; the same SQLite file and worker on both sides.
    const measured = await startRig(path.join(dir, 'metrics.sqlite'), true);
    rigs.push(measured);
    await pump(measured, events / 4, undefined);
    const without: number[] = [];
    const withoutCpu: number[] = [];
    const per = SCRAPE_INTERVALS_MS.map((every) => ({ every, rates: [] as number[], ratios: [] as number[], cpuRates: [] as number[], cpuRatios: [] as number[], scrapes: 0, scrapeMs: [] as number[] }));
    // Each round: the plain pump and one pump per scrape interval, the order rotated, each ratio
    // taken against the plain pump of its own round (the shared machine's speed wanders between rounds).
    for (let r = 0; r < rounds; r++) {
      const jobs: (() => Promise<void>)[] = [
        async () => {
          const res = await pump(measured, events, undefined);
          without.push(res.rate);
          withoutCpu.push(res.cpuRate);
        },
        ...per.map((p) => async () => {
          const res = await pump(measured, events, p.every);
          p.rates.push(res.rate);
          p.cpuRates.push(res.cpuRate);
          p.scrapes += res.scrapes;
          if (res.scrapes) p.scrapeMs.push(res.scrapeMs);
        }),
      ];
      for (let j = 0; j < jobs.length; j++) await jobs[(j + r) % jobs.length]!();
      for (const p of per) {
        p.ratios.push(p.rates[r]! / without[r]!);
        p.cpuRatios.push(p.cpuRates[r]! / withoutCpu[r]!);
      }
    }
    // The metrics still tell the truth after all this: every event in and dispatched.
    const text = await measured.metrics!.text();
    const total = events / 4 + rounds * events * (per.length + 1);
    if (!text.includes(`embot_events_in_total ${total}\n`) || !text.includes(`embot_events_dispatched_total ${total}\n`)) {
      throw new Error(`metrics do not show ${total} events in and dispatched:\n${text.split('\n').filter((l) => l.startsWith('embot_events_')).join('\n')}`);
    }
    const row = (p: (typeof per)[number], cpu: boolean): BenchRow => {
      const ratio = median(cpu ? p.cpuRatios : p.ratios);
      return {
        name: `counter policy, durable SQLite, metrics scraped every ${p.every} ms, ${cpu ? 'per CPU-second' : 'wall clock'} (${events.toLocaleString('en-US')} events × ${rounds} rounds)`,
        value: median(cpu ? p.cpuRates : p.rates),
        unit: cpu ? 'ev/CPU-s' : 'ev/s',
        limitName: 'the same without metrics',
        limit: median(cpu ? withoutCpu : without),
        ratio,
        target: `ratio >= ${(1 - MAX_SLOWDOWN).toFixed(2)}`,
        met: ratio >= 1 - MAX_SLOWDOWN,
      };
    };
    const rows: BenchRow[] = [...per.map((p) => row(p, true)), ...per.map((p) => row(p, false))];
    const list = (xs: readonly number[], f: (x: number) => string): string => xs.map(f).join(', ');
    const evs = (x: number): string => Math.round(x).toLocaleString('en-US');
    return {
      title: 'Metrics on the event path (issue 15)',
      rows,
      notes: [
        'ratio = median over the rounds of (rate with the rig\'s AgentMetrics scraped meanwhile) / (rate of the same rig unscraped in the same round); value and limit are the medians of the rates. Same run, one rig, order rotated each round. Per CPU-second = events / CPU time of the whole process (main thread, module worker, scrapes); wall clock = events / elapsed time, which on a shared machine swings by tens of percent between rounds (see the rates below), so read the CPU rows for a 3 % target.',
        `nothing is counted per event for the metrics: a scrape reads the services' own counters (sensor stats, runtime lists), each source once per scrape. ${per.map((p) => `every ${p.every} ms: ${p.scrapes} scrapes, median ${p.scrapeMs.length ? median(p.scrapeMs).toFixed(2) : '-'} ms each`).join('; ')}. Prometheus scrapes every 15 s by default.`,
        `wall rates without: ${list(without, evs)} ev/s; ${per.map((p) => `every ${p.every} ms: ${list(p.rates, evs)} ev/s (ratios ${list(p.ratios, (x) => x.toFixed(3))})`).join('; ')}.`,
        `CPU rates without: ${list(withoutCpu, evs)} ev/CPU-s; ${per.map((p) => `every ${p.every} ms: ratios ${list(p.cpuRatios, (x) => x.toFixed(3))}`).join('; ')}.`,
      ],
    };
  } finally {
    for (const r of rigs) await r.close().catch(() => {});
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
