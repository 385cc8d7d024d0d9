/**
 * The hand-over at the end of a migration (core/mobility/forwarding-hand-over.ts): the new owner
 * holds the moved VM's events after its commit until the source's first forwarded batch is in, so
 * that nothing posted to it overtakes what the source still held. What that costs is the time the
 * running embots' events are held for the hand-over alone (`heldMs`: from the embots running, or
 * the commit, to the release), against the limit measured in the same migration: its own
 * MigrationComplete round trip (the `completing` phase: one request, the target's commit, the reply).
 *
 * Two full agents in this process (bench/agent-pair.ts), one sim VM with one embot moved a → b → a …
 *
 * @example
 * ```sh
 * npx tsx bench/hand-over.bench.ts           # markdown table
 * npx tsx bench/hand-over.bench.ts --quick   # fewer migrations
 * npm run bench -- --only hand-over
 * ```
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import type { HandOverEnd } from '../core/mobility/forwarding-hand-over.ts';
import { startAgentPair } from './agent-pair.ts';
import { median } from './qemu-bench-support.ts';
import { renderTable, type BenchTable } from './table.ts';

const VM_MEMORY = 64 * 1024;
/** The wait may cost at most one more round trip of the protocol's own (the source's hand-over request). */
const TARGET_RATIO = 1;

async function waitUntil(what: string, check: () => boolean, timeoutMs = 30_000): Promise<void> {
  const start = Date.now();
  while (!check()) {
    if (Date.now() - start > timeoutMs) throw new Error(`hand-over bench: timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

export async function run(opts: { readonly quick?: boolean } = {}): Promise<BenchTable> {
  const runs = opts.quick ? 6 : 20;
  const root = mkdtempSync(join(tmpdir(), 'embot-hand-over-bench-'));
  const held: number[] = [];
  const completing: number[] = [];
  let timedOut = 0;
  try {
    const pair = await startAgentPair(root);
    try {
      const ends = new Map<string, HandOverEnd>();
      for (const agent of [pair.a, pair.b]) agent.services.get('mobility').handOvers.observe((e) => ends.set(e.migrationId, e));
      await pair.a.control.createVm({ name: 'ho', memory: VM_MEMORY });
      await pair.a.control.vmAction('ho', 'start');
      let [from, to] = [pair.a, pair.b];
      // One warm-up move each way (cold JIT, first links), not counted.
      for (let i = 0; i < runs + 2; i++) {
        const id = from.control.migrate('ho', to === pair.b ? 'b' : 'a').id;
        const summary = await from.control.waitMigration(id);
        if (summary?.outcome !== 'completed') throw new Error(`hand-over bench: migration ${id} ${summary?.outcome ?? 'without a summary'}: ${summary?.reason ?? ''}`);
        await waitUntil(`the hand-over of ${id}`, () => ends.has(id));
        const end = ends.get(id)!;
        if (i >= 2) {
          if (!end.handedOver) timedOut++;
          held.push(end.heldMs);
          completing.push(summary.phases.find((p) => p.phase === 'completing')?.ms ?? Number.NaN);
        }
        [from, to] = [to, from];
      }
    } finally {
      await pair.stop();
    }
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
  const h = median(held);
  // Whole ms in the summary: at least 1, so the ratio stays finite on a fast machine.
  const c = Math.max(1, median(completing));
  return {
    title: 'Hand-over at the switch: the new owner\'s events held for the source\'s first forwarded batch (sim, two agents in this process)',
    rows: [
      { name: 'events held at the new owner for the hand-over (median)', value: h, unit: 'ms', limitName: 'MigrationComplete round trip of the same migrations (median)', limit: c, ratio: h / c, target: `<= ${TARGET_RATIO} x the limit`, met: h / c <= TARGET_RATIO && timedOut === 0 },
    ],
    notes: [
      `value = median over ${runs} migrations (a → b → a …, after 2 warm-up ones) of HandOverEnd.heldMs; ratio = value / limit (LOWER is better).`,
      `held (ms): ${held.join(' / ')}; completing (ms): ${completing.join(' / ')}; hand-overs that timed out: ${timedOut}.`,
    ],
  };
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) {
  console.log(renderTable(await run({ quick: process.argv.includes('--quick') })));
  process.exit(0);
}
