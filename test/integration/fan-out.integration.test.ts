import { afterEach, describe, expect, it } from 'vitest';
import { Cluster } from '../harness/cluster.ts';
import { waitFor, type AgentProcess } from '../harness/agent-process.ts';
import { counterOf, tickProducer } from '../harness/counter-stream.ts';
import type { MigrationInfo } from '../../core/mobility/migration-record.ts';
import { cliHere } from '../harness/cli-in-process.ts';
import { expectClean, expectStreamExact } from '../harness/migration-checks.ts';

/**
 * Several destinations at once, first to boot wins (issue 13), with real agents on loopback and
 * the sim driver: one source `a` and destinations that fail to boot (fault injection
 * EMBOT_FAULT_BOOT_FAIL, the refusal is real), deny by policy (`mobility.allowedSources`), copy
 * slowly (a capped primary path, `dataplane.primaryCapBytesPerSecOf`) or win. After each run:
 * exactly one agent owns the VM and its embots, every other is clean (no VM, no embots, no held
 * events for it), and a sequence-numbered event stream was processed exactly once, in order.
 */

let cluster: Cluster | undefined;
afterEach(async () => {
  await cluster?.stop();
  cluster = undefined;
});

const MiB = 1 << 20;

interface Roles {
  /** Refuse BootIncoming (injected boot failure). */
  readonly bootFails?: readonly string[];
  /** Their migration policy denies `a`. */
  readonly denies?: readonly string[];
  /** `a`'s primary path to them is capped at this many bytes/s. */
  readonly slow?: Readonly<Record<string, number>>;
}

async function startCluster(names: readonly string[], roles: Roles): Promise<Cluster> {
  return Cluster.start(names, {
    plugins: [{ from: 'fixture', name: 'counter' }],
    env: (n): Record<string, string> => (roles.bootFails?.includes(n) ? { EMBOT_FAULT_BOOT_FAIL: '1' } : {}),
    config: (n) => ({
      mobility: { stepTimeoutMs: 3000, vmTimeoutMs: 20_000, forwardGraceMs: 5000, trust: { mode: 'any-authenticated-peer' }, ...(roles.denies?.includes(n) ? { allowedSources: ['nobody'] } : {}) },
      ...(n === 'a' && roles.slow ? { dataplane: { primaryCapBytesPerSecOf: roles.slow } } : {}),
    }),
  });
}

async function vmWithCounter(a: AgentProcess, memory = 4 * MiB): Promise<void> {
  await a.client.createVm({ name: 'app', memory });
  await a.client.vmAction('app', 'start');
  await waitFor(async () => counterOf(await a.client.listEmbots(), 'app'), 10_000, 'counter embot on a');
}

/** Who holds VM `app`, and the checks that everyone else is clean. */
async function owners(c: Cluster): Promise<string[]> {
  const out: string[] = [];
  for (const n of c.names) if ((await c.agent(n).client.listVms()).some((v) => v.name === 'app')) out.push(n);
  return out;
}

async function migrateMany(a: AgentProcess, to: readonly string[], extra: { retries?: number; fallback?: readonly string[] } = {}): Promise<MigrationInfo> {
  const { id } = await a.client.migrate('app', to, extra);
  return a.client.waitMigration(id, { timeoutMs: 90_000 });
}

describe('first to boot wins', () => {
  it('b fails to boot, c is slow, d wins: d alone owns the VM, b and c are clean and say why, the stream is exact', async () => {
    // d's path is capped too, so b's refusal (uncapped, it boots at once) comes before d's BootReady.
    cluster = await startCluster(['a', 'b', 'c', 'd'], { bootFails: ['b'], slow: { c: MiB, d: 8 * MiB } });
    const c = cluster;
    const a = c.agent('a');
    await vmWithCounter(a, 8 * MiB);
    const ticks = tickProducer(() => a, 'app');
    await waitFor(() => ticks.acked >= 20, 10_000, 'events before the move');
    const { id } = await a.client.migrate('app', ['b', 'c', 'd']);
    // While it runs, the record of the whole shows the copy furthest along, named (it has none of its own).
    const running = await waitFor(async () => {
      const m = await a.client.getMigration(id);
      return m.outcome === null && m.progress?.leading !== undefined && m.progress.memoryBytes > 0 ? m : undefined;
    }, 60_000, 'the fan-out showing its leading copy');
    expect(['b', 'c', 'd']).toContain(running.progress!.leading);
    expect(running.phase).toBe('racing');
    const info = await a.client.waitMigration(id, { timeoutMs: 90_000 });
    await ticks.stop();

    expect(info.outcome).toBe('completed');
    const s = info.summary!;
    expect(s.winner).toBe('d');
    expect(s.retries).toBe(0);
    const by = Object.fromEntries(s.destinations!.map((d) => [d.name, d]));
    expect(by['d']).toMatchObject({ outcome: 'won', migrationId: `${info.id}~d`, attempt: 0 });
    expect(by['d']!.bootReadyMs).toBeGreaterThan(0);
    expect(by['b']!.outcome).toBe('bootFailed');
    expect(by['b']!.reason).toMatch(/injected fault \(EMBOT_FAULT_BOOT_FAIL=1\)/);
    // The target's reason inside the source's says the failed step once (the source names it, the target's prefix goes).
    expect(by['b']!.reason).toMatch(/^bootIncoming failed: boot refused by the target: injected fault/);
    expect(by['b']!.reason!.match(/bootIncoming/g)).toHaveLength(1);
    expect(by['c']).toMatchObject({ outcome: 'terminated', reason: `terminated: d booted first (migration ${info.id})`, bootReadyMs: null });

    expect(await owners(c)).toEqual(['d']);
    for (const n of ['a', 'b', 'c']) await expectClean(c.agent(n));
    expect((await c.agent('d').client.listVms()).find((v) => v.name === 'app')?.state).toBe('running');
    // Each destination's own journal says why it let go.
    const onC = (await c.agent('c').client.listMigrations()).find((m) => m.id === `${info.id}~c`)!;
    expect(onC.outcome).toBe('aborted');
    expect(onC.reason).toContain(`terminated: d booted first (migration ${info.id})`);
    const onB = (await c.agent('b').client.listMigrations()).find((m) => m.id === `${info.id}~b`)!;
    expect(onB.outcome).toBe('aborted');
    expect(onB.reason).toMatch(/failed to boot/);
    await expectStreamExact(c.agent('d'), ticks.acked);
    // The source's metrics count the race's destinations by outcome (an operator's view of how often a destination fails).
    const text = await (await fetch(`${a.url}/metrics`)).text();
    for (const [outcome, n] of [['won', 1], ['terminated', 1], ['bootFailed', 1]] as const) expect(text).toContain(`embot_fanout_destinations_total{outcome="${outcome}"} ${n}\n`);
  }, 180_000);

  it('all destinations fail (boot, policy): the VM runs on at a, its embots act, nothing lost; retries are counted', async () => {
    cluster = await startCluster(['a', 'b', 'c'], { bootFails: ['b'], denies: ['c'] });
    const c = cluster;
    const a = c.agent('a');
    await vmWithCounter(a);
    const ticks = tickProducer(() => a, 'app');
    await waitFor(() => ticks.acked >= 20, 10_000, 'events before the move');
    const info = await migrateMany(a, ['b', 'c'], { retries: 1 });
    await ticks.stop();

    expect(info.outcome).toBe('aborted');
    const s = info.summary!;
    expect(s.winner).toBeNull();
    expect(s.retries).toBe(1);
    expect(s.destinations!.map((d) => `${d.attempt}:${d.name}:${d.outcome}`)).toEqual(['0:b:bootFailed', '0:c:denied', '1:b:bootFailed', '1:c:denied']);
    expect(s.reason).toMatch(/no destination booted/);
    expect(await owners(c)).toEqual(['a']);
    expect((await a.client.listVms()).find((v) => v.name === 'app')?.state).toBe('running');
    for (const n of ['b', 'c']) await expectClean(c.agent(n));
    await expectStreamExact(a, ticks.acked);
  }, 180_000);

  it('none of the set boots, the fallback host does: it owns the VM (CLI --fallback, --json summary)', async () => {
    cluster = await startCluster(['a', 'b', 'c', 'd'], { bootFails: ['b', 'c'] });
    const c = cluster;
    const a = c.agent('a');
    await vmWithCounter(a);
    const ticks = tickProducer(() => a, 'app');
    await waitFor(() => ticks.acked >= 10, 10_000, 'events before the move');
    // The CLI in this process (runCli's child has a 20 s limit; a loaded machine can need more for two tries).
    const r = await cliHere(['migrate', 'app', '--to', 'b,c', '--fallback', 'd', '--json', '--agent', a.url]);
    await ticks.stop();
    expect(r.code).toBe(0);
    const info = JSON.parse(r.stdout) as MigrationInfo;
    expect(info.summary?.winner).toBe('d');
    expect(info.summary?.retries).toBe(1);
    expect(info.summary?.destinations?.map((d) => `${d.attempt}:${d.name}:${d.outcome}`)).toEqual(['0:b:bootFailed', '0:c:bootFailed', '1:d:won']);
    expect(info.summary?.destinations?.[2]?.migrationId).toBe(`${info.id}.f~d`);
    expect(await owners(c)).toEqual(['d']);
    for (const n of ['a', 'b', 'c']) await expectClean(c.agent(n));
    await expectStreamExact(c.agent('d'), ticks.acked);
  }, 180_000);
});
