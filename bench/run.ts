/**
 * `npm run bench`: runs every benchmark module in sequence and prints its table, the machine and
 * the command. One failing benchmark prints its error and the others still run; the exit code is
 * 1 if any failed.
 *
 * @example
 * ```sh
 * npm run bench                       # everything, markdown tables
 * npm run bench -- --only runtime     # one module
 * npm run bench -- --quick --json     # smoke run, machine-readable
 * ```
 */
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { Command, InvalidArgumentError } from 'commander';
import { run as runRuntime } from './runtime.bench.ts';
import { run as runSensors } from './sensors.bench.ts';
import { run as runWire } from './wire.bench.ts';
import { run as runMobility } from './mobility.bench.ts';
import { run as runFanOut } from './fan-out.bench.ts';
import { run as runDataplane } from './dataplane.bench.ts';
import { run as runDataplaneTls } from './dataplane-tls.bench.ts';
import { run as runUdp } from './udp.bench.ts';
import { run as runEstimate } from './estimate.bench.ts';
import { run as runQemu } from './qemu.bench.ts';
import { run as runFixedCost } from './fixed-cost.bench.ts';
import { run as runHandOver } from './hand-over.bench.ts';
import { run as runLiveChannel } from './live-channel.bench.ts';
import { run as runMetrics } from './metrics.bench.ts';
import { run as runImages } from './images.bench.ts';
import { run as runQemuPrewarm } from './qemu-prewarm.bench.ts';
import { run as runDirectory } from './directory.bench.ts';
import { renderTable, type BenchTable } from './table.ts';

export interface BenchRunOptions {
  /** Smaller N, for a smoke run; modules without a quick mode ignore it. */
  readonly quick?: boolean;
}

export interface BenchModule {
  readonly name: string;
  readonly run: (opts: BenchRunOptions) => Promise<BenchTable>;
}

/** Every `bench/*.bench.ts`, imported explicitly so a missing one fails the typecheck, not the run. */
export const BENCHES: readonly BenchModule[] = [
  { name: 'sensors', run: runSensors },
  { name: 'runtime', run: runRuntime },
  { name: 'wire', run: runWire },
  { name: 'mobility', run: runMobility },
  { name: 'fan-out', run: runFanOut },
  { name: 'dataplane', run: runDataplane },
  { name: 'dataplane-tls', run: runDataplaneTls },
  { name: 'udp', run: runUdp },
  { name: 'estimate', run: runEstimate },
  { name: 'qemu', run: runQemu },
  { name: 'fixed-cost', run: runFixedCost },
  { name: 'hand-over', run: runHandOver },
  { name: 'live-channel', run: runLiveChannel },
  { name: 'metrics', run: runMetrics },
  { name: 'images', run: runImages },
  { name: 'qemu-prewarm', run: runQemuPrewarm },
  { name: 'directory', run: runDirectory },
];

export interface MachineInfo {
  readonly cpus: number;
  readonly cpuModel: string;
  readonly node: string;
  readonly platform: string;
  readonly date: string;
}

export function machineInfo(): MachineInfo {
  const cpus = os.cpus();
  return { cpus: cpus.length, cpuModel: cpus[0]?.model.trim() ?? 'unknown', node: process.version, platform: `${os.platform()} ${os.release()} ${os.arch()}`, date: new Date().toISOString() };
}

export type BenchResult =
  | { readonly name: string; readonly ok: true; readonly seconds: number; readonly table: BenchTable }
  | { readonly name: string; readonly ok: false; readonly seconds: number; readonly error: string };

/** Runs the given modules one after the other; a failure is recorded and the next module still runs. */
export async function runBenches(benches: readonly BenchModule[], opts: BenchRunOptions, onResult?: (r: BenchResult) => void): Promise<BenchResult[]> {
  const results: BenchResult[] = [];
  for (const b of benches) {
    const start = process.hrtime.bigint();
    const elapsed = (): number => Number(process.hrtime.bigint() - start) / 1e9;
    let result: BenchResult;
    try {
      result = { name: b.name, ok: true, seconds: elapsed(), table: await b.run(opts) };
      result = { ...result, seconds: elapsed() };
    } catch (e) {
      result = { name: b.name, ok: false, seconds: elapsed(), error: e instanceof Error ? (e.stack ?? e.message) : String(e) };
    }
    results.push(result);
    onResult?.(result);
  }
  return results;
}

/** Picks the modules named by `--only` (comma-separated); an unknown name is a usage error listing the known ones. */
export function selectBenches(only: readonly string[] | undefined, benches: readonly BenchModule[] = BENCHES): readonly BenchModule[] {
  if (!only?.length) return benches;
  const known = new Map(benches.map((b) => [b.name, b]));
  const unknown = only.filter((n) => !known.has(n));
  if (unknown.length) throw new InvalidArgumentError(`unknown benchmark ${unknown.join(', ')} (known: ${benches.map((b) => b.name).join(', ')})`);
  return only.map((n) => known.get(n)!);
}

function commandLine(argv: readonly string[]): string {
  const args = argv.slice(2);
  return `npm run bench${args.length ? ` -- ${args.join(' ')}` : ''}`;
}

async function main(argv: readonly string[]): Promise<number> {
  const program = new Command('bench')
    .description('Run the embot benchmarks; every figure is a ratio against a limit measured in the same run.')
    .option('--only <names>', `comma-separated benchmarks to run (${BENCHES.map((b) => b.name).join(', ')})`, (v: string, prev: string[] = []) => [...prev, ...v.split(',').map((s) => s.trim()).filter(Boolean)])
    .option('--json', 'print machine-readable results (one JSON document) instead of tables')
    .option('--quick', 'smaller N: a smoke run, figures are not representative')
    .allowExcessArguments(false)
    .exitOverride()
    .configureOutput({ writeErr: (s) => process.stderr.write(s) });
  try {
    program.parse([...argv], { from: 'node' });
  } catch (e) {
    const code = (e as { exitCode?: number }).exitCode;
    return code ?? 2;
  }
  const o = program.opts<{ only?: string[]; json?: boolean; quick?: boolean }>();
  let benches: readonly BenchModule[];
  try {
    benches = selectBenches(o.only);
  } catch (e) {
    // Same shape and exit code as commander's own usage errors.
    process.stderr.write(`error: ${(e as Error).message}\n`);
    return 1;
  }
  const machine = machineInfo();
  const command = commandLine(argv);
  const opts: BenchRunOptions = o.quick ? { quick: true } : {};
  const say = (s: string): void => {
    if (!o.json) process.stdout.write(`${s}\n`);
  };
  say(`machine: ${machine.cpus} × ${machine.cpuModel}, node ${machine.node}, ${machine.platform}, ${machine.date}`);
  say(`command: ${command}${o.quick ? '  (QUICK: smoke run, not representative)' : ''}\n`);
  const results = await runBenches(benches, opts, (r) => {
    if (r.ok) say(`${renderTable(r.table)}\n\n_(${r.name}: ${r.seconds.toFixed(1)} s)_\n`);
    else {
      process.stderr.write(`bench ${r.name} FAILED after ${r.seconds.toFixed(1)} s:\n${r.error}\n\n`);
      say(`### ${r.name}\n\nFAILED: ${r.error.split('\n')[0]}\n`);
    }
  });
  const failed = results.filter((r) => !r.ok).map((r) => r.name);
  if (o.json) process.stdout.write(`${JSON.stringify({ machine, command, quick: o.quick === true, results, failed }, null, 2)}\n`);
  else if (failed.length) say(`failed: ${failed.join(', ')}`);
  return failed.length ? 1 : 0;
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) {
  // Exit explicitly: a bench that leaks a handle (socket, timer) must not keep the run alive.
  process.exit(await main(process.argv));
}
