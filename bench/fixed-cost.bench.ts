/**
 * Fixed cost of a migration (issue 12): one embot, a tiny sim VM (64 KiB), moved between two full
 * agents on loopback, broken down by phase, against the raw limit measured in the same run: the
 * same state (elements, embot with its policy snapshot, hold queues, memory) packed with msgpackr,
 * sent as one ws binary message over an open connection, unpacked, answered.
 *
 * What such a migration costs is round trips and set-up, not bytes, so the figure is time per
 * phase: requesting (connect + authenticate + StartMigration → permit), holding, sendingState,
 * sendingEvents, migratingVm (split into its steps: path planning/probe, PrepareIncoming, memory
 * copy, the VmMemory ack), dirty rounds, completing (MigrationComplete → ack: the target's commit),
 * finishing (the source drops its copies). The QEMU counterpart (same phases, against a bare QMP
 * migrate of the same guest) is in qemu.bench.ts.
 *
 * Both agents run in this process: with one embot and 64 KiB there is no bulk work for them to
 * fight over, and one process keeps the figure free of a second process's scheduling.
 *
 * @example
 * ```sh
 * npx tsx bench/fixed-cost.bench.ts           # markdown table
 * npx tsx bench/fixed-cost.bench.ts --quick   # fewer migrations
 * npx tsx bench/fixed-cost.bench.ts --sim-only --no-warm   # A/B: each migration dials its peer links (mobility.warmConnections false)
 * npm run bench -- --only fixed-cost
 * ```
 */
import { mkdtempSync, rmSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { Packr } from 'msgpackr';
import WebSocket, { WebSocketServer } from 'ws';
import type { MigrationSummary } from '../core/mobility/migration-record.ts';
import { SimDriver } from '../effectors/hypervisor/sim/sim-driver.ts';
import { writeGuestImage } from '../effectors/hypervisor/qemu/guest/guest-image.ts';
import type { QemuVmSpec } from '../effectors/hypervisor/qemu/vm-spec.ts';
import { startAgentPair, type AgentPair } from './agent-pair.ts';
import { renderTable, type BenchRow, type BenchTable } from './table.ts';
import { bareMigrate, killQemusUnder, median, qemuMissing, waitSerial } from './qemu-bench-support.ts';

const KiB = 1024;
const VM_MEMORY = 64 * KiB;
const TARGET_MS = 30;
const RAW_ROUNDS = 5;
const WARMUP_MIGRATIONS = 2;

export interface FixedCostOptions {
  readonly quick?: boolean;
  /** Leave out the QEMU rows. */
  readonly simOnly?: boolean;
  /** Leave out the sim rows (A/B runs of the QEMU rows on a shared machine). */
  readonly qemuOnly?: boolean;
  /** QEMU migrations measured (default 7, quick 3). */
  readonly qemuRuns?: number;
  /** With `qemuOnly`: false (`--no-spare`) runs the agents without the target's spare incoming QEMU, for an A/B. */
  readonly spareIncoming?: boolean;
  /** false (`--no-warm`): the agents dial each migration's peer links instead of taking pre-dialled ones (`mobility.warmConnections`), for an A/B. */
  readonly warmConnections?: boolean;
  /** `--max-dirty-rounds=N`: the agents' `mobility.maxDirtyRounds` (non-final DirtyObjects rounds), for an A/B; default the config's. */
  readonly maxDirtyRounds?: number;
}

/** One migration: its summary and the raw limit of its state measured just before it. */
interface Sample {
  readonly summary: MigrationSummary;
  readonly rawMs: number;
  readonly rawBytes: number;
}




const rawPackr = new Packr({ useRecords: false });

/** A raw endpoint: unpacks what it gets and answers with a small packed reply. */
async function startRawEndpoint(): Promise<{ readonly url: string; close(): Promise<void> }> {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0, perMessageDeflate: false });
  await new Promise<void>((r) => wss.once('listening', () => r()));
  wss.on('connection', (ws) => {
    ws.on('message', (data: Buffer) => {
      const v = rawPackr.unpack(data) as { memory?: Uint8Array };
      ws.send(rawPackr.pack({ ok: true, memory: v.memory?.byteLength ?? 0 }), { binary: true });
    });
  });
  return {
    url: `ws://127.0.0.1:${(wss.address() as AddressInfo).port}`,
    close: () =>
      new Promise<void>((r) => {
        for (const c of wss.clients) c.terminate();
        wss.close(() => r());
      }),
  };
}

/** Median of `rounds` pack + send + unpack + reply of `payload` on one open ws, after a warm-up round. */
async function measureRaw(url: string, payload: unknown, rounds: number): Promise<{ ms: number; bytes: number }> {
  const ws = new WebSocket(url, { perMessageDeflate: false });
  await new Promise<void>((r, j) => (ws.once('open', () => r()), ws.once('error', j)));
  try {
    const once = async (): Promise<{ ms: number; bytes: number }> => {
      const start = performance.now();
      const bytes = rawPackr.pack(payload);
      const reply = new Promise<Buffer>((r) => ws.once('message', (d: Buffer) => r(d)));
      ws.send(bytes, { binary: true });
      const answer = rawPackr.unpack(await reply) as { memory: number };
      if (answer.memory !== VM_MEMORY) throw new Error(`fixed-cost bench: raw endpoint saw ${answer.memory} bytes of memory`);
      return { ms: performance.now() - start, bytes: bytes.byteLength };
    };
    await once();
    const ms: number[] = [];
    let bytes = 0;
    for (let i = 0; i < rounds; i++) {
      const s = await once();
      ms.push(s.ms);
      bytes = s.bytes;
    }
    return { ms: median(ms), bytes };
  } finally {
    ws.terminate();
  }
}


async function waitUntil(what: string, check: () => boolean, timeoutMs = 30_000): Promise<void> {
  const start = Date.now();
  while (!check()) {
    if (Date.now() - start > timeoutMs) throw new Error(`fixed-cost bench: timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

let vmCounter = 0;

async function migrateOnce(pair: AgentPair, rawUrl: string): Promise<Sample> {
  const { a, b } = pair;
  const vm = `fc${++vmCounter}`;
  const vmEl = `vm:${vm}`;
  const driver = a.services.get('hypervisor');
  if (!(driver instanceof SimDriver)) throw new Error('fixed-cost bench: needs the sim driver');
  const runtime = a.services.get('runtime');
  await a.control.createVm({ name: vm, memory: VM_MEMORY });
  await a.control.vmAction(vm, 'start');
  await waitUntil(`the embot of ${vmEl}`, () => runtime.list().some((e) => e.elementIds[0] === vmEl && e.status === 'running'));
  await a.services.get('sensors').idle();
  await runtime.idle();

  const objects = a.services.get('objects');
  const sensors = a.services.get('sensors');
  const scope = objects.subtree(vmEl).map((e) => e.id);
  // The hold queues as the protocol ships them (empty: nothing is queued); held only to serialize them.
  sensors.hold(scope);
  const heldBytes = sensors.serializeHeld(scope);
  sensors.release(scope);
  const payload = {
    elements: rawPackr.unpack(objects.serialize(vmEl)),
    embots: runtime.exportEmbots(scope),
    queues: rawPackr.unpack(heldBytes),
    memory: Uint8Array.from(driver.pages(vm).memory),
  };
  if (payload.embots.length !== 1) throw new Error(`fixed-cost bench: ${payload.embots.length} embots on ${vmEl}, expected 1`);
  const raw = await measureRaw(rawUrl, payload, RAW_ROUNDS);

  const id = a.control.migrate(vm, 'b').id;
  const summary = await a.control.waitMigration(id);
  if (!summary) throw new Error(`fixed-cost bench: no summary for ${id}`);
  if (summary.outcome !== 'completed') throw new Error(`fixed-cost bench: migration of ${vm} ${summary.outcome}: ${summary.reason ?? ''}`);
  if (summary.memoryBytes < VM_MEMORY) throw new Error(`fixed-cost bench: moved ${summary.memoryBytes} bytes of memory, expected ≥ ${VM_MEMORY}`);
  await waitUntil(`${vm} running on b`, () => b.control.listVms().some((v) => v.name === vm && v.state === 'running'));
  if (driver.get(vm)) throw new Error(`fixed-cost bench: a still has ${vm}`);
  return { summary, rawMs: raw.ms, rawBytes: raw.bytes };
}

/** Phase → ms of one summary, the migratingVm steps split out when the summary has them. */
function phasesOf(s: MigrationSummary): Map<string, number> {
  const out = new Map<string, number>();
  for (const p of s.phases) {
    if (p.phase === 'migratingVm' && s.vmSteps) {
      const v = s.vmSteps;
      out.set('migratingVm: stats + path plan/probe', v.planMs);
      out.set('migratingVm: PrepareIncoming', v.prepareMs);
      out.set('migratingVm: memory copy (driver)', v.moveMs);
      out.set('migratingVm: VmMemory ack', v.ackMs);
      out.set('migratingVm: rest', Math.max(0, p.ms - v.planMs - v.prepareMs - v.moveMs - v.ackMs));
    } else {
      out.set(p.phase, p.ms);
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// QEMU: the same migration of an idle 64 MiB TCG guest, against a bare QMP migrate of it.
// ---------------------------------------------------------------------------------------------

const MiB = 1024 * KiB;
const QEMU_EXTRA_MS = 30;
const QEMU_NEEDS = 'needs qemu-system-x86';
/** An idle guest: one pass writes its counters, then it only reads (memory static). */
const IDLE_GUEST: QemuVmSpec = { name: 'idle', memory: 64 * MiB, vcpus: 1, testGuest: { passes: 1, delayLoops: 0 } };
/** `EMBOT_BENCH_TRACE=1`: says on stderr what the bench is doing (QEMU steps can take a while). */
const trace = (what: string): void => void (process.env['EMBOT_BENCH_TRACE'] ? process.stderr.write(`fixed-cost: ${what}\n`) : undefined);

let qemuCounter = 0;

/** One migration a → b of the idle guest through two agents `--driver qemu` (target QEMU start included). */
async function qemuAgentMigrate(pair: AgentPair, root: string, bootImage: string): Promise<MigrationSummary> {
  const name = `q${++qemuCounter}`;
  trace(`agents: migrate ${name}`);
  await pair.a.control.createVm({ name, memory: IDLE_GUEST.memory, boot: bootImage });
  await pair.a.control.vmAction(name, 'start');
  await waitSerial(join(root, 'vms-a', name), 2);
  trace(`agents: ${name} runs`);
  await waitUntil(`the embot of vm:${name}`, () => pair.a.services.get('runtime').list().some((e) => e.elementIds[0] === `vm:${name}` && e.status === 'running'));
  const { id } = pair.a.control.migrate(name, 'b');
  const summary = await pair.a.control.waitMigration(id);
  if (summary?.outcome !== 'completed') throw new Error(`fixed-cost bench: qemu migration of ${name}: ${JSON.stringify(summary)}`);
  // Gone from b again (its QEMU killed), so every run starts alike.
  await pair.b.control.vmAction(name, 'stop');
  return summary;
}

/** Phase rows of `summaries` (median per phase) against `limit`. */
function phaseRows(prefix: string, summaries: readonly MigrationSummary[], limitName: string, limit: number): BenchRow[] {
  const names = [...new Set(summaries.flatMap((s) => [...phasesOf(s).keys()]))];
  return names.map((name) => {
    const v = median(summaries.map((s) => phasesOf(s).get(name) ?? 0));
    return { name: `${prefix}: phase ${name}`, value: v, unit: 'ms', limitName, limit, ratio: v / limit };
  });
}

async function runQemu(runs: number, spareIncoming = true, warmConnections = true, maxDirtyRounds?: number): Promise<{ rows: BenchRow[]; notes: string[] }> {
  const missing = qemuMissing();
  if (missing) {
    return { rows: [{ name: `qemu: migrate idle 64 MiB guest + 1 embot (${QEMU_NEEDS})`, value: 0, unit: 'ms', limitName: QEMU_NEEDS, limit: 0, ratio: 0 }], notes: [`qemu rows skipped: ${missing}`] };
  }
  const root = mkdtempSync(join(tmpdir(), 'embot-fixed-cost-qemu-'));
  try {
    const bare: number[] = [];
    const bootImage = join(root, 'idle-guest.img');
    writeGuestImage(bootImage, IDLE_GUEST.testGuest);
    const mobility = { warmConnections, ...(maxDirtyRounds === undefined ? {} : { maxDirtyRounds }) };
    const pair = await startAgentPair(join(root, 'agents'), { driver: 'qemu', spareIncoming, mobility });
    const summaries: MigrationSummary[] = [];
    try {
      await qemuAgentMigrate(pair, join(root, 'agents'), bootImage); // warm-up
      // Bare and through-the-agents alternate, so each pair of figures shares its minute of a shared machine's load.
      for (let i = 0; i < runs; i++) {
        trace(`bare migrate ${i + 1}/${runs}`);
        bare.push((await bareMigrate(root, IDLE_GUEST, 2)).ms);
        summaries.push(await qemuAgentMigrate(pair, join(root, 'agents'), bootImage));
      }
    } finally {
      await pair.stop();
    }
    const bareMs = median(bare);
    const total = median(summaries.map((s) => s.totalMs));
    const pairCost = median(summaries.map((s, i) => s.totalMs - bare[i]!));
    const limitName = 'bare QMP migrate → target running, same guest';
    return {
      rows: [
        {
          name: 'qemu: migrate idle 64 MiB TCG guest + 1 embot, total (median; target QEMU start included)',
          value: total,
          unit: 'ms',
          limitName,
          limit: bareMs,
          ratio: total / bareMs,
          target: `<= bare + ${QEMU_EXTRA_MS} ms`,
          met: total <= bareMs + QEMU_EXTRA_MS,
        },
        {
          name: 'qemu: the same, best run',
          value: Math.min(...summaries.map((s) => s.totalMs)),
          unit: 'ms',
          limitName: 'best bare QMP migrate',
          limit: Math.min(...bare),
          ratio: Math.min(...summaries.map((s) => s.totalMs)) / Math.min(...bare),
          target: `<= bare + ${QEMU_EXTRA_MS} ms`,
          met: Math.min(...summaries.map((s) => s.totalMs)) <= Math.min(...bare) + QEMU_EXTRA_MS,
        },
        {
          name: 'qemu: fixed cost, median over the alternating pairs of (agents − bare)',
          value: pairCost,
          unit: 'ms',
          limitName: 'the target\'s fixed cost',
          limit: QEMU_EXTRA_MS,
          ratio: pairCost / QEMU_EXTRA_MS,
          target: `<= ${QEMU_EXTRA_MS} ms`,
          met: pairCost <= QEMU_EXTRA_MS,
        },
        ...phaseRows('qemu', summaries, limitName, bareMs),
      ],
      notes: [
        `qemu: ${spareIncoming ? 'with' : 'WITHOUT (--no-spare)'} the target's spare incoming QEMU, ${warmConnections ? 'with' : 'WITHOUT (--no-warm)'} warm peer links${maxDirtyRounds === undefined ? '' : `, maxDirtyRounds ${maxDirtyRounds}`}; medians of ${runs} (after 1 warm-up), bare and agents alternating; fixed cost = ${(total - bareMs).toFixed(0)} ms over bare (median of pairs ${pairCost.toFixed(0)}). Totals (ms): ${summaries.map((s) => s.totalMs).join(' / ')}; bare (ms): ${bare.map((b) => b.toFixed(0)).join(' / ')}; pairs (ms): ${summaries.map((s, i) => (s.totalMs - bare[i]!).toFixed(0)).join(' / ')}.`,
        'qemu: the bare QEMUs are started before the clock starts; the agents\' figure includes starting the incoming QEMU (PrepareIncoming) and QEMU\'s own stream inside "memory copy (driver)".',
      ],
    };
  } finally {
    await killQemusUnder(root);
    rmSync(root, { recursive: true, force: true });
  }
}

/**
 * Runs the migrations and returns the table: for each driver the total against its target and
 * limit, then one row per phase (median over the runs). `--sim-only` / `{ simOnly }` skips QEMU.
 */
export async function run(opts: FixedCostOptions = {}): Promise<BenchTable> {
  const qemuRuns = opts.qemuRuns ?? (opts.quick ? 3 : 7);
  if (opts.qemuOnly) {
    const qemu = await runQemu(qemuRuns, opts.spareIncoming ?? true, opts.warmConnections ?? true, opts.maxDirtyRounds);
    return { title: 'Fixed cost of a migration per phase: QEMU rows only', rows: qemu.rows, notes: qemu.notes };
  }
  const runs = opts.quick ? 5 : 25;
  const root = mkdtempSync(join(tmpdir(), 'embot-fixed-cost-bench-'));
  const samples: Sample[] = [];
  const cold: number[] = [];
  try {
    const simMobility = { warmConnections: opts.warmConnections ?? true, ...(opts.maxDirtyRounds === undefined ? {} : { maxDirtyRounds: opts.maxDirtyRounds }) };
    const pair = await startAgentPair(root, { mobility: simMobility });
    const rawEndpoint = await startRawEndpoint();
    try {
      for (let i = 0; i < WARMUP_MIGRATIONS; i++) cold.push((await migrateOnce(pair, rawEndpoint.url)).summary.totalMs);
      for (let i = 0; i < runs; i++) samples.push(await migrateOnce(pair, rawEndpoint.url));
    } finally {
      await rawEndpoint.close();
      await pair.stop();
    }
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
  const total = median(samples.map((s) => s.summary.totalMs));
  const best = Math.min(...samples.map((s) => s.summary.totalMs));
  const raw = median(samples.map((s) => s.rawMs));
  const rawName = 'raw pack + ws send + unpack of the same state';
  const rows: BenchRow[] = [
    { name: 'sim: migrate 1 VM (64 KiB) + 1 embot, total (median)', value: total, unit: 'ms', limitName: rawName, limit: raw, ratio: total / raw, target: `<= ${TARGET_MS} ms`, met: total <= TARGET_MS },
    // The machine is shared: load only adds time, so the best run is the protocol's own cost.
    { name: 'sim: the same, best run', value: best, unit: 'ms', limitName: rawName, limit: raw, ratio: best / raw, target: `<= ${TARGET_MS} ms`, met: best <= TARGET_MS },
    ...phaseRows('sim', samples.map((s) => s.summary), rawName, raw),
  ];
  const qemu = opts.simOnly ? { rows: [], notes: [] } : await runQemu(qemuRuns);
  const s0 = samples[0]!.summary;
  return {
    title: 'Fixed cost of a migration per phase: one embot, a tiny VM, two agents in this process (loopback)',
    rows: [...rows, ...qemu.rows],
    notes: [
      `sim: value = median over ${runs} migrations (after ${WARMUP_MIGRATIONS} warm-up ones) of MigrationSummary.totalMs or of one phase; ratio = value / limit (LOWER is better). ` +
        `Phases sum to the total up to rounding (phase marks are whole ms; the migratingVm steps, from summary.vmSteps, are 0.1 ms); each migration is a fresh 64 KiB VM with one vm-watchdog embot, a → b.`,
      `sim: raw = msgpackr pack of {elements, embot with its policy snapshot, hold queues, memory} (${(samples[0]!.rawBytes / KiB).toFixed(0)} KiB) + one ws binary message + unpack + a small reply, on an open connection; median of ${RAW_ROUNDS} per migration, measured just before it.`,
      `sim: ${(opts.warmConnections ?? true) ? 'with' : 'WITHOUT (--no-warm)'} warm peer links (mobility.warmConnections).`,
      `sim: the first migrations of a fresh pair (cold JIT, first connections) took ${cold.join(' / ')} ms.`,
      `sim: protocol bytes ${(s0.bytes / KiB).toFixed(0)} KiB (memory ${(s0.memoryBytes / KiB).toFixed(0)} KiB); plan: ${s0.plan?.decisions.join(' | ') ?? 'none'}.`,
      `sim: totals (ms): ${samples.map((s) => s.summary.totalMs).join(' / ')}; raw (ms): ${samples.map((s) => s.rawMs.toFixed(2)).join(' / ')}.`,
      ...qemu.notes,
    ],
  };
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) {
  const runsArg = process.argv.find((a) => a.startsWith('--qemu-runs='));
  const roundsArg = process.argv.find((a) => a.startsWith('--max-dirty-rounds='));
  console.log(
    renderTable(
      await run({
        quick: process.argv.includes('--quick'),
        simOnly: process.argv.includes('--sim-only'),
        qemuOnly: process.argv.includes('--qemu-only'),
        spareIncoming: !process.argv.includes('--no-spare'),
        warmConnections: !process.argv.includes('--no-warm'),
        ...(runsArg ? { qemuRuns: Math.max(1, Number(runsArg.slice('--qemu-runs='.length)) || 1) } : {}),
        ...(roundsArg ? { maxDirtyRounds: Math.max(0, Math.trunc(Number(roundsArg.slice('--max-dirty-rounds='.length))) || 0) } : {}),
      }),
    ),
  );
  process.exit(0);
}
