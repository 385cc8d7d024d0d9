/**
 * Pre-warmed switch with the qemu driver (issue 13 point 4): two agents `--driver qemu` (TCG) in
 * this process, a fresh 64 MiB guest each run, two kinds (GUESTS): one writing the first 8 MiB of
 * its memory over and over (the dirty guest, delayLoops 500, limitMiB 9), one that filled 60 MiB
 * and writes nothing (passes 2): an idle VM with data, where a pre-warm has the most to save.
 *
 *   cold: `embot migrate VM --to b`, timed from the command to the migration's end (the VM runs
 *         at b: the target committed) — the limit, measured in the same run;
 *   warm: `embot prewarm VM --to b`, then once b is warm (exit condition met, all but the hold's
 *         reserve sent) `embot migrate VM --to b`, timed the same way from that command.
 *
 * Both rows also give the summary's downtime (the VM stopped at a → b committed). Runs alternate
 * (cold, warm, cold, …) so the load on the shared machine falls on both alike; medians. Target
 * (the issue): the warm switch's command-to-running and downtime at most the cold migration's.
 *
 * @example
 * ```sh
 * npm run bench -- --only qemu-prewarm [--quick]
 * ```
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import type { MigrationInfo, MigrationSummary } from '../core/mobility/migration-record.ts';
import type { PrewarmInfo } from '../core/mobility/prewarm.ts';
import { writeGuestImage } from '../effectors/hypervisor/qemu/guest/guest-image.ts';
import { reserveBytes } from '../effectors/hypervisor/qemu/qemu-prewarm.ts';
import { startAgentPair, type AgentPair } from './agent-pair.ts';
import { killQemusUnder, median, qemuMissing, sleep, waitSerial } from './qemu-bench-support.ts';
import type { BenchRunOptions } from './run.ts';
import type { BenchRow, BenchTable } from './table.ts';

const MiB = 1024 * 1024;
const MEMORY = 64 * MiB;
const DELAY_LOOPS = 500;
/** The guest writes the first 8 MiB of its 64 over and over: a working set far smaller than the VM, as most guests have. */
const LIMIT_MIB = 9;
const trace = (what: string): void => void (process.env['EMBOT_BENCH_TRACE'] ? process.stderr.write(`qemu-prewarm: ${what}\n`) : undefined);

interface Switch {
  readonly ms: number;
  readonly s: MigrationSummary;
  /** Warm only: how long from `prewarm` until b was warm. */
  readonly warmUpMs?: number;
}

let count = 0;

async function runningGuest(pair: AgentPair, root: string, image: string): Promise<string> {
  const name = `pw${++count}`;
  await pair.a.control.createVm({ name, memory: MEMORY, boot: image });
  await pair.a.control.vmAction(name, 'start');
  await waitSerial(join(root, 'agents', 'vms-a', name), 2);
  return name;
}

async function ended(pair: AgentPair, id: string, what: string): Promise<MigrationSummary> {
  const s = await pair.a.control.waitMigration(id);
  if (s?.outcome !== 'completed') throw new Error(`qemu-prewarm bench: ${what} ${id}: ${JSON.stringify(s)}`);
  return s;
}

async function cold(pair: AgentPair, root: string, image: string): Promise<Switch> {
  const vm = await runningGuest(pair, root, image);
  trace(`cold ${vm}`);
  const t0 = performance.now();
  const { id } = pair.a.control.migrate(vm, 'b');
  const s = await ended(pair, id, 'cold migration');
  const ms = performance.now() - t0;
  await pair.b.control.vmAction(vm, 'stop');
  return { ms, s };
}

async function warm(pair: AgentPair, root: string, image: string): Promise<Switch> {
  const vm = await runningGuest(pair, root, image);
  trace(`warm ${vm}`);
  const w0 = performance.now();
  const { id } = pair.a.control.prewarm!(vm, ['b']);
  for (let i = 0; ; i++) {
    const m = pair.a.control.listMigrations().find((x) => x.id === id) as (MigrationInfo & { readonly prewarm?: PrewarmInfo }) | undefined;
    const b = m?.prewarm?.destinations.find((d) => d.name === 'b');
    // Warm: all but the reserve sent (qemu-prewarm.ts), the exit condition met.
    if (b?.exitConditionMet && b.rounds >= 2 && b.remainingBytes <= reserveBytes(MEMORY)) break;
    if (m?.outcome != null) throw new Error(`qemu-prewarm bench: pre-warm ${id} ended before the command: ${m.outcome} ${m.reason ?? ''}`);
    if (i > 1200) throw new Error(`qemu-prewarm bench: pre-warm ${id} never got warm: ${JSON.stringify(m?.prewarm)}`);
    await sleep(50);
  }
  const warmUpMs = performance.now() - w0;
  // Held a while, as a pre-warm is: the command comes later than the first moment it is warm.
  await sleep(1000);
  const t0 = performance.now();
  pair.a.control.migrate(vm, 'b');
  const s = await ended(pair, id, 'pre-warmed switch');
  const ms = performance.now() - t0;
  await pair.b.control.vmAction(vm, 'stop');
  return { ms, s, warmUpMs };
}

/** The guests measured: one writing a small working set; one holding 60 MiB of data and writing nothing (an idle, loaded VM). */
const GUESTS = [
  { label: `guest writing ${LIMIT_MIB - 1} MiB`, settings: { delayLoops: DELAY_LOOPS, limitMiB: LIMIT_MIB } },
  { label: 'guest with 60 MiB of data, writing nothing', settings: { passes: 2 } },
] as const;

export async function run(opts: BenchRunOptions = {}): Promise<BenchTable> {
  const title = 'Pre-warmed switch with qemu (issue 13 point 4)';
  const missing = qemuMissing();
  if (missing) return { title, rows: [], notes: [`skipped: ${missing}`] };
  const reps = opts.quick ? 2 : 5;
  const root = mkdtempSync(join(tmpdir(), 'embot-bench-qemu-prewarm-'));
  let pair: AgentPair | undefined;
  try {
    // No spare incoming QEMU at b: the cold migration starts its target QEMU after the command (inside its time), the
    // pre-warm at its own start (before the command): that difference is part of what a pre-warm buys.
    pair = await startAgentPair(join(root, 'agents'), { driver: 'qemu', spareIncoming: false, mobility: { stepTimeoutMs: 30_000, vmTimeoutMs: 120_000 } });
    const rows: BenchRow[] = [];
    const notes: string[] = [];
    const runs = (xs: readonly Switch[], f: (x: Switch) => number): string => xs.map((x) => Math.round(f(x))).join(', ');
    // Where each path spends its time: the single path's phases; the pre-warm's winner child's (migratingVm holds the whole warm-up).
    const phasesOf = (x: Switch): readonly { readonly phase: string; readonly ms: number }[] => x.s.destinations?.find((d) => d.outcome === 'won')?.phases ?? x.s.phases;
    const phaseMedians = (xs: readonly Switch[]): string => {
      const by = new Map<string, number[]>();
      for (const x of xs) for (const p of phasesOf(x)) by.set(p.phase, [...(by.get(p.phase) ?? []), p.ms]);
      return [...by].map(([phase, ms]) => `${phase} ${Math.round(median(ms))}`).join(', ');
    };
    const stopMarks = (xs: readonly Switch[]): string => {
      const by = new Map<string, number[]>();
      for (const x of xs) for (const [k, v] of Object.entries(x.s.vmSteps?.afterStop ?? {})) by.set(k, [...(by.get(k) ?? []), v]);
      return [...by].map(([k, v]) => `${k} ${median(v).toFixed(1)}`).join(', ');
    };
    const transports = (xs: readonly Switch[]): string => xs.map((x) => x.s.precopy?.transport ?? '?').join(', ');
    let first = true;
    for (const guest of GUESTS) {
      const image = join(root, `guest-${rows.length}.img`);
      writeGuestImage(image, guest.settings);
      const colds: Switch[] = [];
      const warms: Switch[] = [];
      const loads: number[] = [loadavg()[0]!];
      if (first) await cold(pair, root, image); // warm-up: links, module caches, JIT
      first = false;
      for (let r = 0; r < reps; r++) {
        colds.push(await cold(pair, root, image));
        warms.push(await warm(pair, root, image));
        loads.push(loadavg()[0]!);
      }
      const [cm, wm] = [median(colds.map((x) => x.ms)), median(warms.map((x) => x.ms))];
      const [cd, wd] = [median(colds.map((x) => x.s.downtimeMs ?? 0)), median(warms.map((x) => x.s.downtimeMs ?? 0))];
      rows.push(
        {
          name: `pre-warmed switch (b warm, migrate --to b): command to VM running at b (qemu TCG, ${MEMORY / MiB} MiB ${guest.label}, median of ${reps})`,
          value: wm,
          unit: 'ms',
          limitName: 'cold qemu migration of the same guest to b',
          limit: cm,
          ratio: cm / wm,
          target: '<= the cold migration (ratio >= 1)',
          met: wm <= cm,
        },
        {
          name: `pre-warmed switch with qemu: downtime (${guest.label}, median of ${reps})`,
          value: wd,
          unit: 'ms',
          limitName: 'cold qemu migration downtime',
          limit: cd,
          ratio: cd / Math.max(wd, 0.1),
          target: '<= the cold migration (ratio >= 1)',
          met: wd <= cd,
        },
      );
      notes.push(
        `${guest.label}: cold runs (ms, command to running) ${runs(colds, (x) => x.ms)}, downtime ${runs(colds, (x) => x.s.downtimeMs ?? 0)}; warm ${runs(warms, (x) => x.ms)}, downtime ${runs(warms, (x) => x.s.downtimeMs ?? 0)}; pre-warm to warm ${runs(warms, (x) => x.warmUpMs ?? 0)}`,
        `${guest.label}: memory bytes in the summary (median MiB) cold ${(median(colds.map((x) => x.s.memoryBytes)) / MiB).toFixed(1)}, warm (whole pre-warm) ${(median(warms.map((x) => x.s.memoryBytes)) / MiB).toFixed(1)}`,
        `${guest.label}: phases (median ms) cold ${phaseMedians(colds)}; warm (winner child) ${phaseMedians(warms)}`,
        // Where the downtime goes: QEMU's own (its STOP to its stream's completion at the source) and the agents' after it.
        `${guest.label}: QEMU's downtime (STOP → completed, median ms) cold ${median(colds.map((x) => x.s.precopy?.copyDowntimeMs ?? 0))} (runs ${runs(colds, (x) => x.s.precopy?.copyDowntimeMs ?? 0)}), warm ${median(warms.map((x) => x.s.precopy?.copyDowntimeMs ?? 0))} (runs ${runs(warms, (x) => x.s.precopy?.copyDowntimeMs ?? 0)})`,
        // Each step's end after the stop (source side), and the bytes QEMU sent stopped: where the warm switch's downtime goes beyond the cold one's.
        `${guest.label}: steps after the stop (median ms after it) cold ${stopMarks(colds)}; warm ${stopMarks(warms)}`,
        `${guest.label}: sent with the VM stopped (pre-switchover → completed, device state included, MiB) cold ${runs(colds, (x) => ((x.s.precopy?.stopBytes ?? 0) / MiB) * 10)} ×0.1, warm ${runs(warms, (x) => ((x.s.precopy?.stopBytes ?? 0) / MiB) * 10)} ×0.1`,
        // The stream's way to b (precopy.transport): the warm switch of one destination goes direct since issue 13's direct path.
        `${guest.label}: transport (precopy.transport) cold ${transports(colds)}; warm ${transports(warms)}`,
        `${guest.label}: load average (1 min) during the runs ${Math.min(...loads).toFixed(1)}–${Math.max(...loads).toFixed(1)}`,
      );
    }
    notes.push('the warm path goes through the fan-out (the decision journaled; no BootIncoming: the command named b alone), its one stream QEMU → b direct as the cold one\'s (a pre-warm of one destination is not relayed). Both send VmMemory and the final round while QEMU is paused at pre-switchover');
    return { title, rows, notes };
  } finally {
    await pair?.stop();
    await killQemusUnder(root);
    rmSync(root, { recursive: true, force: true });
  }
}
