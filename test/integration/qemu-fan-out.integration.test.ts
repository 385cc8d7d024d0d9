/**
 * Several destinations with the qemu driver (issue 13, README "Several destinations"): one QEMU
 * stream, relayed by the source agent to every destination's incoming QEMU (stream-relay.ts),
 * each destination held at its last reversible point (bootIncoming), the first BootReady wins.
 * Real agents, real QEMU (TCG), the project's dirty guest.
 */
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { GUEST_RANGE_START, checkGuestMemory, guestRangeEnd, writeGuestImage } from '../../effectors/hypervisor/qemu/guest/guest-image.ts';
import { QemuDriver } from '../../effectors/hypervisor/qemu/qemu-driver.ts';
import { runningPid } from '../../effectors/hypervisor/qemu/qemu-process.ts';
import { waitFor, type AgentProcess } from '../harness/agent-process.ts';
import { Cluster } from '../harness/cluster.ts';
import { counterOf, tickProducer } from '../harness/counter-stream.ts';
import { heartbeat, qemuAgentConfig, qemuProcesses, requireQemu } from '../harness/qemu-processes.ts';

const MiB = 1024 * 1024;
const run = requireQemu();
const qemus = qemuProcesses();

let cluster: Cluster | undefined;
afterEach(async () => {
  await cluster?.stop();
  cluster = undefined;
  await qemus.killAll();
});

/** Agents `--driver qemu` (TCG), no spare incoming QEMU (so every QEMU counted is a VM's), the counter fixture. */
async function qemuCluster(root: string, names: readonly string[], o: { readonly capOfA?: number; readonly bootFails?: readonly string[]; readonly tls?: boolean } = {}): Promise<Cluster> {
  return Cluster.start(names, {
    ...(o.tls ? { tls: {} } : {}),
    plugins: [{ from: 'fixture', name: 'counter' }],
    env: (n): Record<string, string> => (o.bootFails?.includes(n) ? { EMBOT_FAULT_BOOT_FAIL: '1' } : {}),
    config: (n) => ({
      ...qemuAgentConfig(root, n),
      qemu: { ...qemuAgentConfig(root, n).qemu, spareIncoming: false },
      // The guest dirties every page each pass; with three TCG QEMUs and the relay on 2 shared cores the copy needs the throttle and a looser limit.
      ...(n === 'a' ? { dataplane: { downtimeLimitMs: 2000, autoConverge: true, ...(o.capOfA === undefined ? {} : { primaryCapBytesPerSec: o.capOfA }) } } : {}),
      mobility: { stepTimeoutMs: 30_000, vmTimeoutMs: 120_000, forwardGraceMs: 10_000, trust: { mode: 'any-authenticated-peer' } },
    }),
  });
}

async function guestWithCounter(a: AgentProcess, root: string, boot?: string): Promise<void> {
  await a.client.createVm({ name: 'g1', memory: 64 * MiB, ...(boot === undefined ? {} : { boot }) });
  await a.client.vmAction('g1', 'start');
  await heartbeat(join(root, 'a', 'g1'), 2);
  await waitFor(async () => counterOf(await a.client.listEmbots(), 'g1'), 20_000, 'counter embot on a');
}

/** The winner's guest memory passes the integrity check (a driver of our own on its root, after its agent is gone). */
async function expectIntactAt(c: Cluster, root: string, name: string, pid: number): Promise<void> {
  await c.kill(name);
  const look = new QemuDriver({ root: join(root, name), accel: 'tcg' });
  try {
    await look.restoreState(undefined);
    expect(look.pid('g1')).toBe(pid);
    await look.pause('g1');
    const end = guestRangeEnd(64 * MiB);
    const check = checkGuestMemory(await look.capabilities.memoryDump!.dump('g1', GUEST_RANGE_START, end - GUEST_RANGE_START));
    expect(check, JSON.stringify(check)).toMatchObject({ ok: true });
  } finally {
    await look.close();
  }
}

describe.skipIf(!run)('qemu: one stream to several destinations, first to boot wins (TCG)', () => {
  it('b fails to boot, c wins: c alone runs the guest (heartbeat, memory intact), no QEMU left at a or b, every event once in order', async () => {
    const root = qemus.root();
    cluster = await qemuCluster(root, ['a', 'b', 'c'], { bootFails: ['b'], tls: true });
    const a = cluster.agent('a');
    const c = cluster.agent('c');
    await guestWithCounter(a, root);
    const prod = tickProducer(() => a, 'g1');
    await waitFor(() => prod.acked >= 30, 20_000, 'events before the move');
    const { id } = await a.client.migrate('g1', ['b', 'c'], {});
    const info = await a.client.waitMigration(id, { timeoutMs: 240_000 });
    expect(info.outcome, JSON.stringify(info)).toBe('completed');
    const s = info.summary!;
    expect(s.winner).toBe('c');
    const by = Object.fromEntries(s.destinations!.map((d) => [d.name, d]));
    // b cannot boot, so c must win; b's refusal and c's BootReady race, so b ends refused or terminated.
    expect(['bootFailed', 'terminated']).toContain(by['b']?.outcome);
    expect(by['c']?.outcome).toBe('won');
    // Both got the whole stream through the relay (the same bytes), each over its own TLS session.
    expect(by['b']?.bytes).toBeGreaterThan(0);
    await waitFor(() => prod.acked >= s.events + 50, 20_000, 'events after the switch (forwarded by a)');
    await prod.stop();

    expect((await c.client.listVms()).map((v) => `${v.name}:${v.state}`)).toEqual(['g1:running']);
    const winnerPid = runningPid(join(root, 'c', 'g1'));
    expect(winnerPid).toBeDefined();
    await heartbeat(join(root, 'c', 'g1'), 2);
    await waitFor(() => (qemus.live().length === 1 ? true : undefined), 15_000, 'only the winner QEMU left');
    expect(qemus.live()).toEqual([winnerPid]);
    for (const loser of ['a', 'b']) {
      expect((await cluster.agent(loser).client.listVms()).filter((v) => v.name === 'g1')).toEqual([]);
      expect((await cluster.agent(loser).client.listMigrations()).filter((m) => m.outcome === null)).toEqual([]);
    }
    const bRecord = (await cluster.agent('b').client.listMigrations()).find((m) => m.id.startsWith(id));
    expect(bRecord?.outcome).not.toBe('completed');

    const final = await waitFor(async () => {
      const x = counterOf(await c.client.listEmbots(), 'g1');
      return x && x.count >= prod.acked ? x : undefined;
    }, 20_000, `all ${prod.acked} events processed at c`);
    expect(final.count).toBe(prod.acked);
    expect(final.lastSeq).toBe(prod.acked - 1);
    expect(final.outOfOrder).toBe(0);
    await expectIntactAt(cluster, root, 'c', winnerPid!);
  }, 360_000);

  it('none boots: the source takes its guest back with cont on the same QEMU, it heartbeats at a, the destinations have no QEMU', async () => {
    const root = qemus.root();
    cluster = await qemuCluster(root, ['a', 'b', 'c'], { bootFails: ['b', 'c'] });
    const a = cluster.agent('a');
    await guestWithCounter(a, root);
    const pid = runningPid(join(root, 'a', 'g1'));
    const { id } = await a.client.migrate('g1', ['b', 'c'], {});
    const info = await a.client.waitMigration(id, { timeoutMs: 240_000 });
    expect(info.summary?.winner ?? null).toBeNull();
    expect(info.summary?.destinations?.map((d) => `${d.name}:${d.outcome}`)).toEqual(['b:bootFailed', 'c:bootFailed']);
    expect((await a.client.listVms()).map((v) => `${v.name}:${v.state}`)).toEqual(['g1:running']);
    expect(runningPid(join(root, 'a', 'g1'))).toBe(pid);
    await heartbeat(join(root, 'a', 'g1'), 2);
    await waitFor(() => (qemus.live().length === 1 ? true : undefined), 15_000, 'only the source QEMU left');
    expect(qemus.live()).toEqual([pid]);
    await expectIntactAt(cluster, root, 'a', pid!);
  }, 360_000);

  it("a destination whose QEMU is killed mid-stream is dropped; the other wins", async () => {
    const root = qemus.root();
    // 16 MiB/s for a 64 MiB guest whose pages are nearly all non-zero: seconds of stream to kill b's QEMU in;
    // a slower-dirtying guest (delayLoops 2000) so the capped copy converges.
    cluster = await qemuCluster(root, ['a', 'b', 'c'], { capOfA: 16 * MiB });
    const a = cluster.agent('a');
    const c = cluster.agent('c');
    const image = join(root, 'slow-guest.img');
    writeGuestImage(image, { delayLoops: 2000 });
    await guestWithCounter(a, root, image);
    const { id } = await a.client.migrate('g1', ['b', 'c'], {});
    const bDir = join(root, 'b', 'g1');
    const bPid = await waitFor(() => runningPid(bDir), 60_000, "b's incoming QEMU");
    await waitFor(async () => ((await a.client.getMigration(`${id}~c`).catch(() => undefined))?.progress?.memoryBytes ?? 0) > 2 * MiB || undefined, 60_000, 'the stream under way');
    process.kill(bPid, 'SIGKILL');
    const info = await a.client.waitMigration(id, { timeoutMs: 240_000 });
    expect(info.outcome, JSON.stringify(info)).toBe('completed');
    expect(info.summary?.winner).toBe('c');
    const by = Object.fromEntries(info.summary!.destinations!.map((d) => [d.name, d]));
    expect(by['b']?.outcome).toBe('failed');
    expect(by['b']?.reason ?? '').toMatch(/dropped|failed|broke|closed|ECONNRESET|EPIPE/);
    expect((await c.client.listVms()).map((v) => `${v.name}:${v.state}`)).toEqual(['g1:running']);
    await heartbeat(join(root, 'c', 'g1'), 2);
    const winnerPid = runningPid(join(root, 'c', 'g1'));
    await waitFor(() => (qemus.live().length === 1 ? true : undefined), 15_000, 'only the winner QEMU left');
    expect(qemus.live()).toEqual([winnerPid]);
    expect((await cluster.agent('b').client.listVms()).filter((v) => v.name === 'g1')).toEqual([]);
  }, 360_000);
});
