import { afterEach, describe, expect, it } from 'vitest';
import { Cluster } from '../harness/cluster.ts';
import { sleep, waitFor, type AgentProcess } from '../harness/agent-process.ts';
import { expectCleanSoon } from '../harness/migration-checks.ts';

/**
 * SIGTERM of a source agent while a migration is under way. Found by hand: the agent logged
 * "stopped" and never ended (its migration's copy kept its links to the destinations open), for
 * minutes, while the destinations waited for their timeouts. Now it ends; restarted, its recovery
 * takes the VM back and every destination is clean, as after a crash. Real agents on loopback, sim
 * driver, the copies slowed by a capped path so the signal lands inside them.
 */

let cluster: Cluster | undefined;
afterEach(async () => {
  await cluster?.stop();
  cluster = undefined;
});

const MiB = 1 << 20;

/** SIGTERM, and the agent's exit code, or a failure when it has not ended within `ms`. */
async function stopWithin(a: AgentProcess, ms: number): Promise<number | null> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`agent ${a.opts.name} did not end within ${ms} ms of SIGTERM`)), ms)));
  try {
    return await Promise.race([a.stop(), late]);
  } finally {
    clearTimeout(timer);
  }
}

async function startCluster(names: readonly string[]): Promise<Cluster> {
  const caps = Object.fromEntries(names.filter((n) => n !== 'a').map((n) => [n, MiB]));
  return Cluster.start(names, {
    config: (n) => ({
      mobility: { stepTimeoutMs: 5000, vmTimeoutMs: 120_000, forwardGraceMs: 5000, trust: { mode: 'any-authenticated-peer' } },
      ...(n === 'a' ? { dataplane: { primaryCapBytesPerSecOf: caps } } : {}),
    }),
  });
}

describe('SIGTERM of the source during a migration', () => {
  for (const to of [['b'], ['b', 'c']] as const) {
    it(`ends the agent; restarted, the VM runs there again and ${to.join(', ')} ${to.length > 1 ? 'are' : 'is'} clean (--to ${to.join(',')})`, async () => {
      cluster = await startCluster(['a', ...to]);
      const a = cluster.agent('a');
      await a.client.createVm({ name: 'app', memory: 24 * MiB });
      await a.client.vmAction('app', 'start');
      const { id } = await a.client.migrate('app', to.length === 1 ? to[0] : [...to]);
      // Inside the copy (24 MiB at 1 MiB/s per destination: ~24 s of it).
      await waitFor(async () => (await a.client.listMigrations()).some((m) => m.phase === 'migratingVm' && m.outcome === null), 30_000, 'the copy under way');
      await sleep(500);
      expect(await stopWithin(a, 30_000)).toBe(0);

      const back = await cluster.startAgent('a');
      await cluster.untilMigrationsSettled(60_000);
      expect((await back.client.listMigrations()).find((m) => m.id === id)?.outcome).toBe('aborted');
      expect((await back.client.listVms()).find((v) => v.name === 'app')?.state).toBe('running');
      for (const n of to) await expectCleanSoon(cluster.agent(n));
    }, 180_000);
  }
});
