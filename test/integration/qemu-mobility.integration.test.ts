import { join } from 'node:path';
import { counterOf, tickProducer } from '../harness/counter-stream.ts';
import { describe, expect, it } from 'vitest';
import { GUEST_RANGE_START, checkGuestMemory, guestRangeEnd, writeGuestImage } from '../../effectors/hypervisor/qemu/guest/guest-image.ts';
import { QemuDriver } from '../../effectors/hypervisor/qemu/qemu-driver.ts';
import { runningPid } from '../../effectors/hypervisor/qemu/qemu-process.ts';
import { waitFor } from '../harness/agent-process.ts';
import { Cluster, migrate } from '../harness/cluster.ts';
import { heartbeat, qemuAgentConfig, qemuTestFile, sparesIn } from '../harness/qemu-processes.ts';

const MiB = 1024 * 1024;
let cluster: Cluster | undefined;
const { run, qemus } = qemuTestFile(async () => { await cluster?.stop(); cluster = undefined; });




/** Two agents `--driver qemu` (TCG) with the counter fixture and the shipped watchdog; VM state dirs under `root/<agent>`. */
async function qemuCluster(root: string, mobility: Record<string, unknown> = {}, extra: Record<string, unknown> = {}, qemu: Record<string, unknown> = {}, tls = false): Promise<Cluster> {
  return Cluster.start(['a', 'b'], {
    ...(tls ? { tls: {} } : {}),
    plugins: [
      { from: 'fixture', name: 'counter' },
      { from: 'shipped', name: 'vm-watchdog' },
    ],
    config: (n) => ({
      ...qemuAgentConfig(root, n),
      ...extra,
      qemu: { ...qemuAgentConfig(root, n).qemu, ...qemu },
      // TCG on a shared 2-core machine: QEMU start-up and the copy get generous budgets.
      mobility: { stepTimeoutMs: 20_000, vmTimeoutMs: 120_000, forwardGraceMs: 10_000, trust: { mode: 'any-authenticated-peer' }, ...mobility },
    }),
  });
}

describe.skipIf(!run)('two agents --driver qemu on loopback: a VM and its management move together (TCG)', () => {
  it('moves a running guest with a vm-watchdog embot while events flow: it runs and heartbeats at b, memory intact, source QEMU gone, every event once and in order', async () => {
    const root = qemus.root();
    cluster = await qemuCluster(root);
    const a = cluster.agent('a');
    const b = cluster.agent('b');
    await a.client.createVm({ name: 'g1', memory: 64 * MiB });
    await a.client.vmAction('g1', 'start');
    const stateA = join(root, 'a', 'g1');
    const stateB = join(root, 'b', 'g1');
    await heartbeat(stateA, 2);
    const sourcePid = runningPid(stateA);
    expect(sourcePid).toBeDefined();
    await waitFor(async () => counterOf(await a.client.listEmbots(), 'g1'), 20_000, 'counter embot on a');
    await waitFor(async () => (await a.client.listEmbots()).find((e) => e.id === 'vm-watchdog/watchdog/vm:g1'), 20_000, 'watchdog embot on a');

    // b keeps a spare incoming QEMU of its default shape (qemu.spareIncoming), which is g1's.
    const bSpare = await waitFor(() => sparesIn(join(root, 'b'))[0], 30_000, "b's spare incoming QEMU");
    const prod = tickProducer(() => a, 'g1');
    await waitFor(() => prod.acked >= 50, 20_000, '50 events before the move');
    const info = await migrate(a, 'g1', 'b', { timeoutMs: 180_000 });
    expect(info.outcome, JSON.stringify(info)).toBe('completed');
    await waitFor(() => prod.acked >= info.summary!.events + 100, 20_000, 'events after the switch (forwarded by a)');
    await prod.stop();

    // At b the VM runs in a QEMU of b's, and the guest goes on writing and printing.
    expect((await b.client.listVms()).map((v) => `${v.name}:${v.state}`)).toEqual(['g1:running']);
    const targetPid = runningPid(stateB);
    expect(targetPid).toBe(bSpare);
    await heartbeat(stateB, 2);
    // The source QEMU is gone and a lists nothing of the VM.
    await waitFor(() => runningPid(stateA) === undefined, 10_000, 'source QEMU gone');
    expect(qemus.live()).toEqual([targetPid]);
    expect((await a.client.listVms()).map((v) => v.name)).toEqual([]);
    expect((await a.client.listEmbots()).filter((e) => e.elementIds.includes('vm:g1'))).toEqual([]);

    // The embots are at b with their policy state, and every event was processed once, in order.
    const final = await waitFor(async () => {
      const c = counterOf(await b.client.listEmbots(), 'g1');
      return c && c.count >= prod.acked ? c : undefined;
    }, 20_000, `all ${prod.acked} events processed at b`);
    expect(final.count).toBe(prod.acked);
    expect(final.lastSeq).toBe(prod.acked - 1);
    expect(final.outOfOrder).toBe(0);
    const watchdog = (await b.client.listEmbots()).find((e) => e.id === 'vm-watchdog/watchdog/vm:g1');
    expect(watchdog?.status).toBe('running');
    expect(info.summary!.embots).toBe(2);
    expect(info.summary!.precopy?.copyMs).toBeGreaterThan(0);

    // The memory check needs QMP, which b's agent holds: stop b (its VMs outlive it) and look with a driver of our own.
    await cluster.kill('b');
    const look = new QemuDriver({ root: join(root, 'b'), accel: 'tcg' });
    try {
      await look.restoreState(undefined);
      expect(look.pid('g1')).toBe(targetPid);
      // The spare b refilled after the commit outlived b's SIGKILL; a driver restored on its root kills it.
      expect(sparesIn(join(root, 'b'))).toEqual([]);
      await look.pause('g1');
      const end = guestRangeEnd(64 * MiB);
      const check = checkGuestMemory(await look.capabilities.memoryDump!.dump('g1', GUEST_RANGE_START, end - GUEST_RANGE_START));
      expect(check, JSON.stringify(check)).toMatchObject({ ok: true });
    } finally {
      await look.close();
    }
  });

  describe('convergence through the agents: a fast-dirtying guest under a 50 ms downtime limit on a 64 MiB/s path', () => {
    // delayLoops 2000: a pass over the guest's RAM takes tens of ms under TCG, so every page is
    // dirty again in every round at 64 MiB/s; only throttling the vCPU lets the rounds shrink.
    const dataplane = (autoConverge: boolean) => ({ dataplane: { downtimeLimitMs: 50, autoConverge, primaryCapBytesPerSec: 64 * MiB } });

    it('auto-converge off: aborted within the VM time budget; the source VM runs on with its embots, the target QEMU is gone, no event lost', async () => {
      const root = qemus.root();
      const image = join(root, 'fast-guest.img');
      writeGuestImage(image, { delayLoops: 2000 });
      cluster = await qemuCluster(root, { vmTimeoutMs: 8000 }, dataplane(false));
      const a = cluster.agent('a');
      const b = cluster.agent('b');
      await a.client.createVm({ name: 'hot', memory: 64 * MiB, boot: image });
      await a.client.vmAction('hot', 'start');
      const stateA = join(root, 'a', 'hot');
      await heartbeat(stateA, 2);
      const sourcePid = runningPid(stateA);
      await waitFor(async () => counterOf(await a.client.listEmbots(), 'hot'), 20_000, 'counter embot on a');
      const prod = tickProducer(() => a, 'hot');
      await waitFor(() => prod.acked >= 20, 20_000, 'events before the move');
      const info = await migrate(a, 'hot', 'b', { timeoutMs: 60_000 });
      expect(info.outcome, JSON.stringify(info)).toBe('aborted');
      expect(JSON.stringify(info)).toMatch(/did not converge/);
      await waitFor(() => prod.acked >= 40, 20_000, 'events after the abort');
      await prod.stop();
      // The source runs on in its same QEMU; b kept nothing.
      expect((await a.client.listVms()).map((v) => `${v.name}:${v.state}`)).toEqual(['hot:running']);
      expect(runningPid(stateA)).toBe(sourcePid);
      await heartbeat(stateA, 2);
      await waitFor(() => runningPid(join(root, 'b', 'hot')) === undefined, 20_000, 'target QEMU gone');
      expect(qemus.live()).toEqual([sourcePid]);
      expect(await b.client.listVms()).toEqual([]);
      const c = await waitFor(async () => {
        const x = counterOf(await a.client.listEmbots(), 'hot');
        return x && x.count >= prod.acked ? x : undefined;
      }, 20_000, 'all events processed at a');
      expect(c.count).toBe(prod.acked);
      expect(c.outOfOrder).toBe(0);
    }, 120_000);

    it('auto-converge on: completes, and the summary says it throttled', async () => {
      const root = qemus.root();
      const image = join(root, 'fast-guest.img');
      writeGuestImage(image, { delayLoops: 2000 });
      cluster = await qemuCluster(root, { vmTimeoutMs: 100_000 }, dataplane(true), { cpuThrottle: { initial: 60, increment: 20 } });
      const a = cluster.agent('a');
      const b = cluster.agent('b');
      await a.client.createVm({ name: 'hot', memory: 64 * MiB, boot: image });
      await a.client.vmAction('hot', 'start');
      await heartbeat(join(root, 'a', 'hot'), 2);
      const info = await migrate(a, 'hot', 'b', { timeoutMs: 120_000 });
      expect(info.outcome, JSON.stringify(info)).toBe('completed');
      expect(info.summary?.precopy?.throttled).toBe(true);
      expect((await b.client.listVms()).map((v) => `${v.name}:${v.state}`)).toEqual(['hot:running']);
      await heartbeat(join(root, 'b', 'hot'), 1);
      await waitFor(() => runningPid(join(root, 'a', 'hot')) === undefined, 20_000, 'source QEMU gone');
    }, 150_000);
  });

  it("with peer.tls the agents' QEMU stream uses their certificates (tls-creds-x509, names checked both ways) and the move completes; the summary shows QEMU's figures", async () => {
    const root = qemus.root();
    cluster = await qemuCluster(root, {}, {}, {}, true);
    const a = cluster.agent('a');
    const b = cluster.agent('b');
    await a.client.createVm({ name: 'sec', memory: 64 * MiB });
    await a.client.vmAction('sec', 'start');
    await heartbeat(join(root, 'a', 'sec'), 2);
    const info = await migrate(a, 'sec', 'b', { timeoutMs: 120_000 });
    expect(info.outcome, JSON.stringify(info)).toBe('completed');
    expect((await b.client.listVms()).map((v) => `${v.name}:${v.state}`)).toEqual(['sec:running']);
    await heartbeat(join(root, 'b', 'sec'), 2);
    const s = info.summary!;
    expect(s.precopy?.copyMs).toBeGreaterThan(0);
    expect(s.memoryBytes).toBeGreaterThan(1 * MiB);
    expect(s.downtimeMs).toBeGreaterThan(0);
  }, 120_000);
});
