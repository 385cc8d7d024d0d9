import { existsSync, readFileSync } from 'node:fs';
import { counterOf, tickProducer, type CounterContext, type SequencedPoster } from '../harness/counter-stream.ts';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { writeGuestImage } from '../../effectors/hypervisor/qemu/guest/guest-image.ts';
import { pidAlive, runningPid } from '../../effectors/hypervisor/qemu/qemu-process.ts';
import { waitFor, type AgentProcess } from '../harness/agent-process.ts';
import { Cluster } from '../harness/cluster.ts';
import { heartbeat, qemuAgentConfig, qemuTestFile, sparesIn } from '../harness/qemu-processes.ts';
import { journaledTickSeqs } from '../harness/journal-peek.ts';
import { RawPeer } from '../harness/raw-peer.ts';
import { startMigration } from '../harness/migration-frames.ts';
import { loadClusterSecret } from '../../core/wire/index.ts';

const MiB = 1024 * 1024;
let cluster: Cluster | undefined;
const { run, qemus } = qemuTestFile(async () => { await cluster?.stop(); cluster = undefined; });




/**
 * Two agents `--driver qemu`; a 64 MiB guest whose memory stops changing after its first pass
 * (so its copy over the 8 MiB/s path lasts ~8 s, long enough to hit it in the middle).
 */
async function setup(): Promise<{ root: string; a: AgentProcess; b: AgentProcess; stateA: string; stateB: string; sourcePid: number }> {
  const root = qemus.root();
  const image = join(root, 'guest.img');
  writeGuestImage(image, { delayLoops: 2000, passes: 1 });
  cluster = await Cluster.start(['a', 'b'], {
    plugins: [
      { from: 'fixture', name: 'counter' },
      { from: 'shipped', name: 'vm-watchdog' },
    ],
    config: (n) => ({
      ...qemuAgentConfig(root, n),
      mobility: { stepTimeoutMs: 5000, vmTimeoutMs: 60_000, forwardGraceMs: 10_000, trust: { mode: 'any-authenticated-peer' } },
      dataplane: { primaryCapBytesPerSec: 8 * MiB },
    }),
  });
  const a = cluster.agent('a');
  const b = cluster.agent('b');
  await a.client.createVm({ name: 'f1', memory: 64 * MiB, boot: image });
  await a.client.vmAction('f1', 'start');
  const stateA = join(root, 'a', 'f1');
  await heartbeat(stateA, 2);
  await waitFor(async () => counterOf(await a.client.listEmbots(), 'f1'), 20_000, 'counter embot on a');
  return { root, a, b, stateA, stateB: join(root, 'b', 'f1'), sourcePid: runningPid(stateA)! };
}

/** Starts a migration a -> b and resolves once b's incoming QEMU exists and a few MiB went across. */
async function midMigration(a: AgentProcess, stateB: string): Promise<string> {
  const { id } = await a.client.migrate('f1', 'b');
  await waitFor(() => runningPid(stateB), 30_000, "b's incoming QEMU");
  await waitFor(async () => ((await a.client.getMigration(id)).progress?.memoryBytes ?? 0) > 4 * MiB, 30_000, 'some memory on the way');
  return id;
}

/**
 * Every acknowledged TICK processed exactly once, in order, by the VM's counter at `owner`. On a
 * mismatch the message names the sequence numbers seen twice or missing (among the counter's last
 * 1000) and the producer's failed posts, to tell a re-post after a failed POST from a product double.
 */
async function exactlyOnce(owner: AgentProcess, prod: SequencedPoster, note = ''): Promise<void> {
  const acked = prod.acked;
  const c = await waitFor(async () => {
    const x = counterOf(await owner.client.listEmbots(), 'f1');
    return x && x.count >= acked ? x : undefined;
  }, 30_000, `all ${acked} events processed at the owner`);
  const seen = ((c as CounterContext & { seen?: string[] }).seen ?? []).map(Number);
  const counts = new Map<number, number>();
  for (const s of seen) counts.set(s, (counts.get(s) ?? 0) + 1);
  const twice = [...counts].filter(([, n]) => n > 1).map(([s, n]) => `${s}x${n}`);
  const first = seen[0] ?? 0;
  const missing: number[] = [];
  for (let s = first; s < acked; s++) if (!counts.has(s)) missing.push(s);
  const why = JSON.stringify({ acked, count: c.count, lastSeq: c.lastSeq, outOfOrder: c.outOfOrder, twice, missing, note, failures: prod.failures });
  expect(c.count, why).toBe(acked);
  expect(c.lastSeq, why).toBe(acked - 1);
  expect(c.outOfOrder, why).toBe(0);
}

describe.skipIf(!run)('qemu migration faults through the agents: one running QEMU for the VM, its embots with it, no event lost or repeated (TCG)', () => {
  it('an Abort while the early PrepareIncoming (sent right after the permit) starts the incoming QEMU: aborted, b keeps no QEMU and no VM', async () => {
    const root = qemus.root();
    cluster = await Cluster.start(['b'], {
      config: (n) => ({ ...qemuAgentConfig(root, n), mobility: { stepTimeoutMs: 60_000, vmTimeoutMs: 60_000, forwardGraceMs: 5000, trust: { mode: 'any-authenticated-peer' } } }),
    });
    const b = cluster.agent('b');
    const listen = (JSON.parse(readFileSync(join(cluster.root, 'config-b.json'), 'utf8')) as { peer: { listen: string } }).peer.listen;
    // A hand-driven source: the frames a real one sends, with the Abort right behind the prepare.
    const src = await RawPeer.connect(`ws://${listen}`, 'a', loadClusterSecret(cluster.secretFile));
    try {
      const permit = await src.request(startMigration(1, 'm-early', 'early', 32 * MiB));
      expect(permit.kind === 'frame' ? permit.frame.type : permit).toBe('MigrationPermitted');
      const prepared = src.request({ type: 'PrepareIncoming', reqId: 2, migrationId: 'm-early', vm: 'early', spec: { name: 'early', memory: 32 * MiB, vcpus: 1 }, channels: 1 });
      src.send({ type: 'Abort', migrationId: 'm-early', reason: 'test: the source rolls back while the target QEMU starts' });
      const reply = await prepared;
      // The prepare finished after the discard began: the source is told not to send memory.
      expect(reply.kind === 'frame' ? reply.frame : reply).toMatchObject({ type: 'MigrationStateFailed', reason: expect.stringMatching(/discarded/) });
      await waitFor(async () => (await b.client.getMigration('m-early')).outcome === 'aborted', 30_000, 'm-early aborted at b');
      await waitFor(() => qemus.live().length === 0, 30_000, "b's incoming QEMU gone");
      expect(runningPid(join(root, 'b', 'early'))).toBeUndefined();
      expect(await b.client.listVms()).toEqual([]);
    } finally {
      await src.close();
    }
  }, 90_000);

  it('the target QEMU killed mid-migration: aborted, the VM runs on at a in its same QEMU', async () => {
    const { a, b, stateA, stateB, sourcePid } = await setup();
    const prod = tickProducer(() => a, 'f1', 20);
    const id = await midMigration(a, stateB);
    process.kill(runningPid(stateB)!, 'SIGKILL');
    const info = await a.client.waitMigration(id, { timeoutMs: 90_000 });
    expect(info.outcome, JSON.stringify(info)).toBe('aborted');
    await waitFor(() => prod.acked >= 30, 20_000, 'events after the abort');
    await prod.stop();
    expect((await a.client.listVms()).map((v) => `${v.name}:${v.state}`)).toEqual(['f1:running']);
    expect(runningPid(stateA)).toBe(sourcePid);
    await heartbeat(stateA, 1);
    expect(qemus.live()).toEqual([sourcePid]);
    expect(await b.client.listVms()).toEqual([]);
    await exactlyOnce(a, prod);
  }, 150_000);

  it('the target agent SIGKILLed mid-migration and restarted: aborted, the VM runs on at a, b keeps no QEMU', async () => {
    const { a, stateA, stateB, sourcePid } = await setup();
    const prod = tickProducer(() => a, 'f1', 20);
    const id = await midMigration(a, stateB);
    // b's spare incoming QEMU (qemu.spareIncoming, on by default) outlives the SIGKILL; the restart kills it.
    const bRoot = join(stateB, '..');
    const oldSpares = await waitFor(() => (sparesIn(bRoot).length === 1 ? sparesIn(bRoot) : undefined), 30_000, "b's spare");
    await cluster!.kill('b');
    const info = await a.client.waitMigration(id, { timeoutMs: 90_000 });
    expect(info.outcome, JSON.stringify(info)).toBe('aborted');
    expect(oldSpares.every(pidAlive)).toBe(true);
    const b = await cluster!.startAgent('b');
    expect(oldSpares.some(pidAlive)).toBe(false);
    await waitFor(() => sparesIn(bRoot).length === 1, 30_000, "b's new spare");
    await waitFor(() => runningPid(stateB) === undefined, 30_000, "b's incoming QEMU gone");
    await waitFor(() => prod.acked >= 30, 20_000, 'events after the abort');
    await prod.stop();
    expect((await a.client.listVms()).map((v) => `${v.name}:${v.state}`)).toEqual(['f1:running']);
    expect(runningPid(stateA)).toBe(sourcePid);
    await heartbeat(stateA, 1);
    expect(qemus.live()).toEqual([sourcePid]);
    expect(await b.client.listVms()).toEqual([]);
    await exactlyOnce(a, prod);
  }, 150_000);

  it('the source agent SIGKILLed mid-migration and restarted: it re-attaches to its QEMU (same pid), cancels the orphaned migration, owns the VM; b keeps nothing', async () => {
    const { a, b, stateA, stateB, sourcePid } = await setup();
    let current: AgentProcess | undefined = a;
    const prod = tickProducer(() => current, 'f1', 20);
    await midMigration(a, stateB);
    current = undefined;
    await cluster!.kill('a');
    const ackedBeforeKill = prod.acked;
    // The VM's events were held for the migration, so every TICK taken since is still journaled:
    // whether the post in flight at the kill (seq ackedBeforeKill) is among them.
    const journaled = journaledTickSeqs(cluster!.dataDir('a'), 'vm:f1');
    const inFlight = `in flight at the kill: seq ${ackedBeforeKill}, journaled: ${journaled.includes(ackedBeforeKill)} (journal ${journaled.length} TICKs, last ${journaled.at(-1)})`;
    const restarted = await cluster!.startAgent('a');
    current = restarted;
    await waitFor(async () => (await restarted.client.listVms()).find((v) => v.name === 'f1' && v.state === 'running'), 30_000, 'f1 running at a again');
    expect(runningPid(stateA)).toBe(sourcePid);
    await heartbeat(stateA, 1);
    await waitFor(() => runningPid(stateB) === undefined, 60_000, "b's incoming QEMU gone");
    await waitFor(() => prod.acked >= ackedBeforeKill + 30, 30_000, 'events after the restart');
    await prod.stop();
    expect(qemus.live()).toEqual([sourcePid]);
    expect(await b.client.listVms()).toEqual([]);
    const migrations = await restarted.client.listMigrations();
    expect(migrations.map((m) => m.outcome)).toEqual(['aborted']);
    await exactlyOnce(restarted, prod, inFlight);
  }, 180_000);

  it('the source agent SIGKILLed right after journaling the migration completed (its QEMU not yet removed) and restarted: it does not adopt the VM again; b alone owns it, a keeps no QEMU, no state dir, no VM', async () => {
    const { b, stateA, stateB, sourcePid } = await setup();
    // a again, on the same running QEMU, set to die right after it journals the move as completed:
    // the drop of the VM (element, embots) is in that transaction, its QEMU's removal follows it.
    await cluster!.kill('a');
    const dying = await cluster!.startAgent('a', { EMBOT_FAULT_KILL_AT: 'source:completed' });
    expect(runningPid(stateA)).toBe(sourcePid);
    await dying.client.migrate('f1', 'b');
    await waitFor(() => dying.child.exitCode !== null || dying.child.signalCode !== null, 90_000, 'a to die at source:completed');
    cluster!.agents.delete('a');
    const restarted = await cluster!.startAgent('a');
    await waitFor(async () => (await b.client.listVms()).find((v) => v.name === 'f1' && v.state === 'running'), 30_000, 'f1 running at b');
    await heartbeat(stateB, 1);
    expect(await restarted.client.listVms()).toEqual([]);
    expect((await restarted.client.listEmbots()).filter((e) => e.elementIds.includes('vm:f1'))).toEqual([]);
    await waitFor(() => (runningPid(stateA) === undefined && !existsSync(stateA) ? true : undefined), 30_000, "a's QEMU and state dir gone");
    expect(qemus.live()).toEqual([runningPid(stateB)]);
    expect((await restarted.client.listMigrations()).map((m) => m.outcome)).toEqual(['completed']);
  }, 180_000);

  it('an agent SIGKILLed and restarted with a running VM re-attaches to it: same QEMU pid, not restarted, its embots go on', async () => {
    const { a, stateA, sourcePid } = await setup();
    let current: AgentProcess | undefined = a;
    const prod = tickProducer(() => current, 'f1', 20);
    await waitFor(() => prod.acked >= 20, 20_000, 'events before the kill');
    current = undefined;
    await cluster!.kill('a');
    const restarted = await cluster!.startAgent('a');
    current = restarted;
    expect((await restarted.client.listVms()).map((v) => `${v.name}:${v.state}:${v.crashes}`)).toEqual(['f1:running:0']);
    expect(runningPid(stateA)).toBe(sourcePid);
    await waitFor(() => prod.acked >= 40, 20_000, 'events after the restart');
    await prod.stop();
    expect(qemus.live()).toEqual([sourcePid]);
    await exactlyOnce(restarted, prod);
  }, 120_000);
});
