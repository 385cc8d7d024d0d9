import { afterEach, describe, expect, it } from 'vitest';
import { counterOf } from '../harness/counter-stream.ts';
import { Cluster } from '../harness/cluster.ts';
import { sleep, waitFor } from '../harness/agent-process.ts';
import { prng } from '../harness/prng.ts';
import { ControlError, ErrorCodes } from '../../core/errors.ts';
import { MAX_EVENTS_LIMIT } from '../../core/control/control-api.ts';
import { cpSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

/**
 * SIGKILL of the source or the target at a random moment of a migration's life (before it, while
 * it runs, right after the switch, inside the grace period), not at the phases the code journals,
 * while a producer posts sequence-numbered events for the VM to whichever agent it believes owns
 * it (following the ELEMENT_MOVED refusal's owner). After the restart: exactly one owner, and every
 * acknowledged event processed there exactly once, in order.
 *
 * Size and replay: EMBOT_FAULT_RUNS (iterations, default 3) and EMBOT_FAULT_SEED (seed of the first
 * iteration; iteration i uses seed + i). A failure names its seed: EMBOT_FAULT_SEED=<seed>
 * EMBOT_FAULT_RUNS=1 replays its choices (the machine's timing still varies).
 */
const RUNS = Math.max(1, Number(process.env['EMBOT_FAULT_RUNS'] ?? 3));
const BASE_SEED = process.env['EMBOT_FAULT_SEED'] !== undefined ? Number(process.env['EMBOT_FAULT_SEED']) : Math.floor(Math.random() * 2 ** 31);
const SEEDS = Array.from({ length: RUNS }, (_, i) => BASE_SEED + i);
/**
 * Test-only pins for chasing one failure: EMBOT_FAULT_VICTIM (a or b) and EMBOT_FAULT_KILL_MS (ms
 * after the request, or a range LO-HI drawn from the seed) override the seed's choices; EMBOT_FAULT_KEEP names a folder
 * where a failed run leaves both agents' data folders and full logs (the cluster's own goes).
 */
const PIN_VICTIM = process.env['EMBOT_FAULT_VICTIM'];
const PIN_KILL_MS = process.env['EMBOT_FAULT_KILL_MS']?.split('-').map(Number);
const KEEP = process.env['EMBOT_FAULT_KEEP'];

/** Longer than a kill, a restart and the forwarding's longest back-off together, so nothing acknowledged becomes a dead letter. */
const GRACE_MS = 8000;
/** Kills happen this long after the migration is requested, at most: well inside the grace period. */
const KILL_WINDOW_MS = 1800;
/** The VM's memory crosses a path capped at this rate, so the migration itself lasts ~0.5 s and kills land inside it too. */
const VM_MEMORY = 4 << 20;
const PATH_CAP_BYTES_PER_SEC = 8 << 20;
/** The producer runs at least this long after the request: past the grace period, so it meets the refusal. */
const PRODUCE_MS = GRACE_MS + 1500;



/** Errors of an agent that is down or stopping: the producer tries the same event again. */
const TRANSIENT = new Set<string>([ErrorCodes.CONTROL_UNREACHABLE, ErrorCodes.AGENT_STOPPED, ErrorCodes.CONTROL_INTERNAL, ErrorCodes.STORE_CORRUPT]);

let cluster: Cluster | undefined;
/** The killed agent's output up to the kill (its restart is a new process with a new log). */
const killedLogs = new Map<string, string>();
afterEach(async () => {
  killedLogs.clear();
  await cluster?.stop();
  cluster = undefined;
});

describe('random-moment faults during a migration', () => {
  it.each(SEEDS)('seed %i: one owner, every acknowledged event processed there once, in order', async (seed) => {
    const rnd = prng(seed);
    const drawnVictim = rnd() < 0.5 ? 'a' : 'b';
    // A tenth before the request, half while the migration runs (~0.5 s), the rest after the switch, inside the grace period.
    const r = rnd();
    const drawnKillMs = r < 0.1 ? -1 : r < 0.55 ? Math.floor(rnd() * 600) : 600 + Math.floor(rnd() * (KILL_WINDOW_MS - 600));
    const victim = PIN_VICTIM === 'a' || PIN_VICTIM === 'b' ? PIN_VICTIM : drawnVictim;
    const pinned = PIN_KILL_MS && PIN_KILL_MS[0]! + Math.floor(rnd() * ((PIN_KILL_MS[1] ?? PIN_KILL_MS[0]!) - PIN_KILL_MS[0]! + 1));
    const killAfterMs = pinned ?? drawnKillMs;
    const restartAfterMs = Math.floor(rnd() * 300);
    const before = 5 + Math.floor(rnd() * 20);
    const plan = `seed ${seed}: kill ${victim} ${killAfterMs < 0 ? 'before the migration request' : `${killAfterMs} ms after the migration request`}, restart it ${restartAfterMs} ms later (replay: EMBOT_FAULT_SEED=${seed} EMBOT_FAULT_RUNS=1)`;
    try {
      const c = await Cluster.start(['a', 'b'], {
        plugins: [{ from: 'fixture', name: 'counter' }],
        config: () => ({
          mobility: { stepTimeoutMs: 3000, vmTimeoutMs: 10_000, forwardGraceMs: GRACE_MS, trust: { mode: 'any-authenticated-peer' } },
          dataplane: { primaryCapBytesPerSec: PATH_CAP_BYTES_PER_SEC },
        }),
      });
      cluster = c;
      const a = c.agent('a');
      await a.client.createVm({ name: 'app', memory: VM_MEMORY });
      await a.client.vmAction('app', 'start');
      await waitFor(async () => counterOf(await a.client.listEmbots(), 'app'), 10_000, 'counter embot at a');

      // The producer: one event at a time, each sent again (same id) until acknowledged.
      const state = { acked: 0, stop: false, followed: [] as string[], failure: undefined as unknown };
      const producer = (async () => {
        let owner = 'a';
        while (!state.stop) {
          const seq = state.acked;
          for (;;) {
            const agent = c.agents.get(owner);
            if (agent === undefined) {
              await sleep(50);
              continue;
            }
            try {
              await agent.client.emitEvent({ id: `p${seed}-${seq}`, elementId: 'vm:app', type: 'TICK', payload: { seq } });
              state.acked++;
              break;
            } catch (e) {
              if (e instanceof ControlError && e.code === ErrorCodes.ELEMENT_MOVED) {
                owner = String(e.details?.['owner']);
                state.followed.push(owner);
              } else if (e instanceof ControlError && TRANSIENT.has(e.code)) {
                await sleep(50);
              } else {
                state.failure = e;
                return;
              }
            }
          }
        }
      })();
      await waitFor(() => state.acked >= before || state.failure, 10_000, 'events before the move');

      const requested = Date.now();
      const kill = async (): Promise<void> => {
        const before = c.agents.get(victim);
        if (before) killedLogs.set(victim, `${before.stdout}\n--- stderr\n${before.stderr}`);
        await c.kill(victim);
      };
      if (killAfterMs < 0) await kill();
      // Refused when a is down already; aborted by a when b is.
      const migration = (c.agents.get('a')?.client.migrate('app', 'b') ?? Promise.reject(new Error('a is down'))).then(
        (m) => m.id,
        () => undefined,
      );
      if (killAfterMs >= 0) {
        await sleep(killAfterMs);
        await kill();
      }
      await sleep(restartAfterMs);
      await c.startAgent(victim);
      const backAfterMs = Date.now() - requested;
      // The grace period runs from the commit, which comes after the request: a victim b back within GRACE_MS of the
      // request was back before it ended, and took the last offer of whatever the source still had for it. One back
      // later may have missed it (a restart took 8 s at load 13 here): what a still had for it then are dead letters,
      // as documented (README "Events that reach the source after the switch"), and the run checks that each
      // acknowledged event is processed at the owner once or is such a dead letter, never both, never neither.
      const ownerMayHaveMissedGrace = victim === 'b' && backAfterMs >= GRACE_MS;
      const id = await migration;

      // Both sides settle: no migration without an outcome.
      await waitFor(async () => {
        const all = [...(await c.agent('a').client.listMigrations()), ...(await c.agent('b').client.listMigrations())];
        return all.every((m) => m.outcome !== null) && (id === undefined || all.some((m) => m.id === id)) ? all : undefined;
      }, 30_000, 'the migration settled on both sides');
      await sleep(Math.max(0, requested + PRODUCE_MS - Date.now()));
      state.stop = true;
      await producer;
      expect(state.failure).toBeUndefined();

      const [vmsA, vmsB] = [await c.agent('a').client.listVms(), await c.agent('b').client.listVms()];
      const owners = [vmsA.some((v) => v.name === 'app') && 'a', vmsB.some((v) => v.name === 'app') && 'b'].filter((x): x is string => typeof x === 'string');
      expect(owners).toHaveLength(1);
      const owner = c.agent(owners[0]!);
      const other = c.agent(owners[0] === 'a' ? 'b' : 'a');
      expect((await other.client.listEmbots()).filter((e) => e.elementIds.includes('vm:app'))).toEqual([]);
      expect((await owner.client.listEmbots()).filter((e) => e.id === 'counter/counter/vm:app')).toHaveLength(1);
      // Whoever the producer followed is the owner.
      if (state.followed.length > 0) expect(state.followed.at(-1)).toBe(owners[0]);

      const acked = state.acked;
      const deadLettered = async (): Promise<{ seq: number; embot: string; reason: string }[]> => {
        const all = [...(await owner.client.listDeadLetters({ limit: MAX_EVENTS_LIMIT })), ...(await other.client.listDeadLetters({ limit: MAX_EVENTS_LIMIT }))].filter((d) => d.event.elementId === 'vm:app');
        return all.map((d) => ({ seq: Number((d.event.payload as { seq?: number } | null)?.seq), embot: d.embotId, reason: d.reason })).sort((x, y) => x.seq - y.seq);
      };
      // Processed, or (see ownerMayHaveMissedGrace) a dead letter: the source's forwarding settles them before its refusals go out.
      await waitFor(async () => {
        const x = counterOf(await owner.client.listEmbots(), 'app');
        return x && x.count + (await deadLettered()).length >= acked ? x : undefined;
      }, 30_000, `all ${acked} acknowledged events processed at ${owners[0]}`).catch(async (e: unknown) => {
        // What the owner processed, and what both agents logged at warn and above, for a run that loses events.
        const counter = counterOf(await owner.client.listEmbots(), 'app');
        const warnings = (agent: typeof owner): string => agent.stderr.split('\n').filter((l) => /"level":"(warn|error)"/.test(l)).slice(-40).join('\n');
        throw new Error(`${String(e)}; counter ${JSON.stringify(counter)}; ${(await deadLettered()).length} dead letters; ${victim} back ${backAfterMs} ms after the request; followed ${state.followed.join('>') || 'nobody'}\n--- ${owners[0]} warnings:\n${warnings(owner)}\n--- other warnings:\n${warnings(other)}`);
      });
      await sleep(300);
      const settled = counterOf(await owner.client.listEmbots(), 'app')!;
      const letters = await deadLettered();
      const dead = letters.map((d) => d.seq);
      // Nothing acknowledged was parked as a dead letter on either side, unless the new owner was down at the end of the grace period.
      if (!ownerMayHaveMissedGrace) expect(letters, `dead letters (${victim} back ${backAfterMs} ms after the request, within the grace period)`).toEqual([]);
      expect(letters.filter((d) => !d.embot.startsWith('forward:')), 'dead letters of anything but the forwarding').toEqual([]);
      // A dead letter's successors are dead letters too (forwarding.ts): one run of the stream, no gap in what the owner took.
      expect(dead, 'dead-lettered seqs, one run of the stream').toEqual(dead.map((_, i) => dead[0]! + i));
      const deadSet = new Set(dead);
      const seen = ((settled as unknown as { seen?: string[] }).seen ?? []).map(Number);
      expect(seen.filter((v) => deadSet.has(v)), 'dead letters the owner processed too').toEqual([]);
      const reordered = seen.flatMap((v, i) => (i > 0 && v <= seen[i - 1]! ? [seen.slice(Math.max(0, i - 3), i + 3).join(',')] : []));
      let lastTaken = acked - 1;
      while (deadSet.has(lastTaken)) lastTaken--;
      expect(settled, `owner ${owners[0]}, followed ${state.followed.join('>') || 'nobody'}, ${dead.length} dead letters; out of order near: ${reordered.join(' | ')}`).toMatchObject({ count: acked - dead.length, lastSeq: lastTaken, outOfOrder: 0 });
      const deadNote = `; ${victim} back ${backAfterMs} ms after the request${dead.length > 0 ? `, after the grace period's end: ${dead.length} dead letters (seq ${dead[0]}..${dead.at(-1)})` : ''}`;
      console.info(`${plan}: ${acked} events acknowledged, owner ${owners[0]}${state.followed.length > 0 ? `, producer followed the refusal to ${state.followed.join(', ')}` : ''}${deadNote}`);
    } catch (e) {
      if (KEEP !== undefined && cluster !== undefined) keepEvidence(cluster, join(KEEP, `seed-${seed}-${Date.now()}`), plan, e);
      throw new Error(`${plan}\n${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
    }
  }, 120_000);
});

/** A failed run's data folders (SQLite journals) and full logs, copied before the cluster's folder goes. */
function keepEvidence(c: Cluster, dir: string, plan: string, error: unknown): void {
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'plan.txt'), `${plan}\n${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
  for (const name of c.names) {
    try {
      cpSync(c.dataDir(name), join(dir, `data-${name}`), { recursive: true });
    } catch {
      // A data folder the agent never made: nothing to keep.
    }
    const killed = killedLogs.get(name);
    if (killed !== undefined) writeFileSync(join(dir, `${name}.before-kill.log`), killed);
    const agent = c.agents.get(name);
    if (agent) writeFileSync(join(dir, `${name}.log`), `${agent.stdout}\n--- stderr\n${agent.stderr}`);
  }
}
