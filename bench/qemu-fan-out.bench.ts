/**
 * Issue 13 with the qemu driver: one QEMU stream relayed to several destinations
 * (effectors/hypervisor/qemu/stream-relay.ts, qemu-fan-out.ts). Driver level (no agents), the
 * same 64 MiB guest each time, real QEMU under TCG:
 *
 *   direct: prepareIncoming, then migrateOut straight to the target's QEMU → its bootIncoming
 *           (the target at its last reversible point) — the limit, measured in the same run;
 *   relay n: the fanOut session to n = 1, 2, 3 targets (prepared beforehand like the direct one)
 *           → the first target's bootIncoming.
 *
 * Runs alternate (direct, 1, 2, 3, direct, …) so load on this shared machine falls on all
 * alike; medians. Rows: the relay's cost (n = 1 against direct), and time to first boot with
 * 2 and 3 destinations against direct (issue target ≤ 1.2× with 2). Called from qemu.bench.ts
 * (its section "(f)") and runnable alone: `node --experimental-strip-types bench/qemu-fan-out.bench.ts [--quick]`.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path, { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { QemuDriver } from '../effectors/hypervisor/qemu/qemu-driver.ts';
import type { QemuVmSpec } from '../effectors/hypervisor/qemu/vm-spec.ts';
import { killQemusUnder, median, qemuMissing, waitSerial } from './qemu-bench-support.ts';
import { renderTable, type BenchRow, type BenchTable } from './table.ts';

const MiB = 1024 * 1024;

interface FanOutRun {
  readonly ms: number;
  readonly bytes: number;
}

/** One migration of `spec`: `n` = 0 direct, else through the relay to n targets; time from migrate to the first bootIncoming. */
async function once(root: string, spec: QemuVmSpec, n: number): Promise<FanOutRun> {
  const dir = mkdtempSync(join(root, 'r-'));
  const source = new QemuDriver({ root: join(dir, 's'), accel: 'tcg' });
  const targets = Array.from({ length: Math.max(1, n) }, (_, i) => new QemuDriver({ root: join(dir, `t${i}`), accel: 'tcg' }));
  try {
    await source.create(spec);
    await source.start(spec.name);
    await waitSerial(source.stateDir(spec.name), 2);
    const endpoints = await Promise.all(targets.map((t) => t.prepareIncoming(spec)));
    const started = performance.now();
    let bytes = 0;
    let firstBoot: Promise<unknown>;
    if (n === 0) {
      bytes = (await source.migrateOut(spec.name, { endpoint: endpoints[0]!.endpoint })).bytes;
      firstBoot = targets[0]!.capabilities.incomingBoot!.bootIncoming(spec.name, { timeoutMs: 60_000 });
    } else {
      const names = targets.map((_, i) => `t${i}`);
      const session = source.capabilities.fanOut!.begin(spec.name, names);
      // Each destination boots as soon as its own copy is in: the first to be ready wins.
      firstBoot = Promise.any(
        names.map(async (name, i) => {
          const r = await session.migrateOut(name, { endpoint: endpoints[i]!.endpoint });
          bytes = r.bytes;
          return targets[i]!.capabilities.incomingBoot!.bootIncoming(spec.name, { timeoutMs: 60_000 });
        }),
      );
      await firstBoot;
      session.close();
    }
    await firstBoot;
    return { ms: performance.now() - started, bytes };
  } finally {
    await source.close();
    for (const t of targets) await t.close();
    await killQemusUnder(dir);
    rmSync(dir, { recursive: true, force: true });
  }
}

export async function fanOutRows(root: string, reps: number): Promise<{ rows: BenchRow[]; notes: string[] }> {
  // Idle after one pass: static memory, so every run moves the same bytes and the rounds do not vary.
  const spec: QemuVmSpec = { name: 'fo', memory: 64 * MiB, vcpus: 1, testGuest: { passes: 1, delayLoops: 0 } };
  const runs = new Map<number, FanOutRun[]>([0, 1, 2, 3].map((n) => [n, []]));
  for (let i = 0; i < reps; i++) for (const n of [0, 1, 2, 3]) runs.get(n)!.push(await once(root, spec, n));
  const med = (n: number): number => median(runs.get(n)!.map((r) => r.ms));
  const direct = med(0);
  const row = (n: number, name: string, target?: { readonly text: string; readonly max: number }): BenchRow => ({
    name,
    value: med(n),
    unit: 'ms',
    limitName: 'direct migrateOut → bootIncoming, same guest',
    limit: direct,
    ratio: direct / med(n),
    ...(target ? { target: target.text, met: med(n) <= target.max * direct } : {}),
  });
  const rows = [
    row(1, 'qemu relay cost: 1 destination through the relay → bootIncoming (64 MiB idle guest)'),
    row(2, 'qemu time to first boot, 2 destinations (relay)', { text: '≤ 1.2 × single destination', max: 1.2 }),
    row(3, 'qemu time to first boot, 3 destinations (relay)'),
  ];
  const list = (n: number): string => runs.get(n)!.map((r) => r.ms.toFixed(0)).join(', ');
  const notes = [
    `(f) medians of ${reps}, runs alternated: direct [${list(0)}] ms, relay n=1 [${list(1)}], n=2 [${list(2)}], n=3 [${list(3)}]; bytes per destination ${(runs.get(1)![0]!.bytes / MiB).toFixed(1)} MiB (direct ${(runs.get(0)![0]!.bytes / MiB).toFixed(1)} MiB). Driver level, targets prepared before the clock starts; ratio = direct / value (below 1: slower than direct).`,
  ];
  return { rows, notes };
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) {
  const missing = qemuMissing();
  if (missing) {
    process.stdout.write(`qemu fan-out bench skipped: ${missing}\n`);
    process.exit(0);
  }
  const root = mkdtempSync(join(tmpdir(), 'embot-qfo-'));
  try {
    const { rows, notes } = await fanOutRows(root, process.argv.includes('--quick') ? 2 : 5);
    const table: BenchTable = { title: 'qemu driver: one stream to several destinations (issue 13)', rows, notes };
    process.stdout.write(`${renderTable(table)}\n`);
  } finally {
    await killQemusUnder(root);
    rmSync(root, { recursive: true, force: true });
  }
  process.exit(0);
}
