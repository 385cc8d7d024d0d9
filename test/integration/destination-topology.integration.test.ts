import { afterEach, describe, expect, it } from 'vitest';
import { Cluster } from '../harness/cluster.ts';
import { waitFor } from '../harness/agent-process.ts';
import { counterOf } from '../harness/counter-stream.ts';
import type { MigrationInfo } from '../../core/mobility/migration-record.ts';
import type { DestinationChoice, SharedNodes } from '../../core/mobility/destination-topology.ts';
import { cliHere } from '../harness/cli-in-process.ts';

/**
 * Where destinations are (issue 13 point 5), with real agents on loopback and the sim driver:
 * a and d hang off tor1, b and c off tor2, both racks under one spine. a's peers in config order
 * are b, c, d, so the first two by rank (b, c) share tor2 and spine; `--to auto --count 2` must
 * take b and d instead, and the fan-out must end with one owner.
 */

let cluster: Cluster | undefined;
afterEach(async () => {
  await cluster?.stop();
  cluster = undefined;
});

const TOPOLOGY = {
  nodes: ['tor1', 'tor2', 'spine'],
  links: [['a', 'tor1'], ['d', 'tor1'], ['b', 'tor2'], ['c', 'tor2'], ['tor1', 'spine'], ['tor2', 'spine']],
};

describe('migrate --to auto --count N with a topology', () => {
  it('picks the node-disjoint pair, the fan-out completes with one owner; --to b,c warns of the shared nodes; bad counts are refused', async () => {
    cluster = await Cluster.start(['a', 'b', 'c', 'd'], {
      plugins: [{ from: 'fixture', name: 'counter' }],
      config: () => ({ topology: TOPOLOGY, mobility: { stepTimeoutMs: 3000, vmTimeoutMs: 20_000, forwardGraceMs: 5000, trust: { mode: 'any-authenticated-peer' } } }),
    });
    const c = cluster;
    const a = c.agent('a');
    expect((await a.client.status()).destinations?.peers).toEqual(['b', 'c', 'd']);
    await a.client.createVm({ name: 'app', memory: 4 << 20 });
    await a.client.vmAction('app', 'start');
    await waitFor(async () => counterOf(await a.client.listEmbots(), 'app'), 10_000, 'counter embot on a');

    // Bad input first, while the VM is still at a: nothing starts, the VM stays.
    for (const bad of [['--count', '0'], ['--count', '4'], ['--count', 'x']]) {
      const r = await cliHere(['migrate', 'app', '--to', 'auto', ...bad, '--json', '--agent', a.url]);
      expect(r.code, bad.join(' ')).not.toBe(0);
      expect(r.stderr + r.stdout).toMatch(/--count must be a whole number/);
    }
    const notAuto = await cliHere(['migrate', 'app', '--to', 'b', '--count', '2', '--agent', a.url]);
    expect(notAuto.code).not.toBe(0);
    expect(notAuto.stderr).toMatch(/--count goes with --to auto only/);
    expect((await a.client.listMigrations())).toEqual([]);

    const r = await cliHere(['migrate', 'app', '--to', 'auto', '--count', '2', '--json', '--agent', a.url]);
    expect(r.code, r.stderr).toBe(0);
    const info = JSON.parse(r.stdout) as MigrationInfo & { destinationChoice: DestinationChoice & { rankedBy: string } };
    expect(info.destinationChoice).toMatchObject({ how: 'disjoint', chosen: ['b', 'd'], ranked: ['b', 'c', 'd'], rankedBy: 'config', uplink: ['tor1'], routes: { b: ['spine', 'tor2'], d: [] } });
    expect(info.outcome).toBe('completed');
    const winner = info.summary!.winner!;
    expect(['b', 'd']).toContain(winner);
    expect(info.summary!.destinations!.map((x) => x.name).sort()).toEqual(['b', 'd']);
    const owners: string[] = [];
    for (const n of c.names) if ((await c.agent(n).client.listVms()).some((v) => v.name === 'app')) owners.push(n);
    expect(owners).toEqual([winner]);

    // From the winner, naming two destinations in one rack is allowed, with a warning naming the node.
    const w = c.agent(winner);
    const pair = winner === 'b' ? ['a', 'd'] : ['b', 'c'];
    // Less the winner's own uplink (its tor), which every copy from it crosses anyway.
    const shared = winner === 'b' ? ['spine', 'tor1'] : ['spine', 'tor2'];
    const back = await cliHere(['migrate', 'app', '--to', pair.join(','), '--json', '--agent', w.url]);
    expect(back.code, back.stderr).toBe(0);
    const again = JSON.parse(back.stdout) as MigrationInfo & { sharedNodes: readonly SharedNodes[] };
    expect(again.sharedNodes).toEqual([{ destinations: pair, nodes: shared }]);
    expect(again.outcome).toBe('completed');
  }, 180_000);

  it('an agent whose topology leaves out a peer refuses to start, naming it (and the cluster harness leaves nothing behind)', async () => {
    await expect(
      Cluster.start(['a', 'b'], { config: () => ({ topology: { nodes: ['tor1'], links: [['a', 'tor1']] } }) }).then(async (started) => {
        cluster = started;
      }),
    ).rejects.toThrow(/host b not in any link/);
  }, 60_000);
});
