/**
 * Pre-warm with the qemu driver (issue 13 point 4, README "Several destinations", *Pre-warm with
 * qemu*): real agents `--driver qemu` (TCG) on loopback, one QEMU stream relayed to every warmed
 * destination and held by QEMU's own parameters (qemu-prewarm.ts) until `embot migrate`. Mirrors
 * the sim's prewarm.integration test: the switch, bad input, cancel, the source SIGKILLed.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../core/errors.ts';
import type { MigrationInfo } from '../../core/mobility/migration-record.ts';
import type { PrewarmInfo } from '../../core/mobility/prewarm.ts';
import { GUEST_RANGE_START, checkGuestMemory, guestRangeEnd, writeGuestImage } from '../../effectors/hypervisor/qemu/guest/guest-image.ts';
import { QemuDriver } from '../../effectors/hypervisor/qemu/qemu-driver.ts';
import { reserveBytes } from '../../effectors/hypervisor/qemu/qemu-prewarm.ts';
import { runningPid } from '../../effectors/hypervisor/qemu/qemu-process.ts';
import { sleep, waitFor, type AgentProcess } from '../harness/agent-process.ts';
import { cliHere } from '../harness/cli-in-process.ts';
import { Cluster } from '../harness/cluster.ts';
import { counterOf, tickProducer, type SequencedPoster } from '../harness/counter-stream.ts';
import { expectClean, expectCleanSoon, expectStreamExact } from '../harness/migration-checks.ts';
import { heartbeat, qemuAgentConfig, qemuTestFile, serialBytes } from '../harness/qemu-processes.ts';

const MiB = 1024 * 1024;
const VM_BYTES = 64 * MiB;
let cluster: Cluster | undefined;
const { run, qemus } = qemuTestFile(async () => { await cluster?.stop(); cluster = undefined; });

/** Agents a, b, c `--driver qemu` (TCG), no spare incoming QEMU (every QEMU counted is a VM's), the counter fixture. */
async function qemuCluster(root: string, tls = false): Promise<Cluster> {
  return Cluster.start(['a', 'b', 'c'], {
    ...(tls ? { tls: {} } : {}),
    plugins: [{ from: 'fixture', name: 'counter' }],
    config: (n) => ({
      ...qemuAgentConfig(root, n),
      qemu: { ...qemuAgentConfig(root, n).qemu, spareIncoming: false },
      ...(n === 'a' ? { dataplane: { downtimeLimitMs: 500, autoConverge: true } } : {}),
      mobility: { stepTimeoutMs: 30_000, vmTimeoutMs: 120_000, forwardGraceMs: 10_000, trust: { mode: 'any-authenticated-peer' } },
    }),
  });
}

/** The guest writes the first 8 MiB of its 64 over and over: pages dirtied while warm, a working set far smaller than the VM. */
const GUEST_LIMIT_MIB = 9;

/** `app` running at a (the writing guest above), its counter embot, ten events acknowledged. */
async function appWithEvents(root: string, tls = false): Promise<{ c: Cluster; a: AgentProcess; ticks: SequencedPoster }> {
  cluster = await qemuCluster(root, tls);
  const a = cluster.agent('a');
  const image = join(root, 'slow-guest.img');
  writeGuestImage(image, { delayLoops: 500, limitMiB: GUEST_LIMIT_MIB });
  await a.client.createVm({ name: 'app', memory: VM_BYTES, boot: image });
  await a.client.vmAction('app', 'start');
  await heartbeat(join(root, 'a', 'app'), 2);
  await waitFor(async () => counterOf(await a.client.listEmbots(), 'app'), 20_000, 'counter embot on a');
  const ticks = tickProducer(() => a, 'app');
  await waitFor(() => ticks.acked >= 10, 20_000, 'events before the pre-warm');
  return { c: cluster, a, ticks };
}

/** Resident memory of a process, bytes (/proc/<pid>/status VmRSS). */
function residentBytes(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m?.[1] ?? 0) * 1024;
}

async function warmth(a: AgentProcess, id: string): Promise<PrewarmInfo | undefined> {
  const m = (await a.client.listMigrations()).find((x) => x.id === id) as (MigrationInfo & { prewarm?: PrewarmInfo }) | undefined;
  return m?.prewarm;
}

/** Every destination named warm: all but the reserve sent (qemu-prewarm.ts: the copy then crawls), the exit condition met. */
async function untilWarm(a: AgentProcess, id: string, names: readonly string[]): Promise<PrewarmInfo> {
  let seen: unknown;
  return waitFor(async () => {
    const w = await warmth(a, id);
    seen = w ?? (await a.client.listMigrations());
    const ok = w && names.every((n) => w.destinations.some((d) => d.name === n && d.status === 'warming' && d.exitConditionMet && d.rounds >= 2 && d.remainingBytes <= reserveBytes(VM_BYTES)));
    return ok ? w : undefined;
  }, 120_000, `${names.join(', ')} warm`).catch((e: unknown) => {
    throw new Error(`${String(e)}; last seen: ${JSON.stringify(seen)}`);
  });
}

/** The guest's memory at `name` passes the integrity check (a driver of our own on its root, after its agent is gone). */
async function expectIntactAt(c: Cluster, root: string, name: string, pid: number): Promise<void> {
  await c.kill(name);
  const look = new QemuDriver({ root: join(root, name), accel: 'tcg' });
  try {
    await look.restoreState(undefined);
    expect(look.pid('app')).toBe(pid);
    await look.pause('app');
    const end = guestRangeEnd(VM_BYTES, GUEST_LIMIT_MIB);
    const check = checkGuestMemory(await look.capabilities.memoryDump!.dump('app', GUEST_RANGE_START, end - GUEST_RANGE_START));
    expect(check, JSON.stringify(check)).toMatchObject({ ok: true });
  } finally {
    await look.close();
  }
}

describe.skipIf(!run)('qemu pre-warm: one held stream, switched by the migrate command (TCG)', () => {
  it('warms b and c while the guest runs and its events are processed at a; migrate --to b switches: b runs it (heartbeat, memory intact), c terminated and clean, every event once in order', async () => {
    const root = qemus.root();
    const { c, a, ticks } = await appWithEvents(root, true);
    const sourcePid = runningPid(join(root, 'a', 'app'));

    const started = await cliHere(['prewarm', 'app', '--to', 'b,c', '--json', '--agent', a.url]);
    expect(started.code, started.stderr).toBe(0);
    const { id } = JSON.parse(started.stdout) as { id: string };
    await untilWarm(a, id, ['b', 'c']);
    // Held: the guest runs in its own QEMU at a, its events are processed there, nothing switches.
    const before = counterOf(await a.client.listEmbots(), 'app')!.count;
    const beat = serialBytes(join(root, 'a', 'app'));
    await sleep(3000);
    expect(counterOf(await a.client.listEmbots(), 'app')!.count).toBeGreaterThan(before);
    expect(serialBytes(join(root, 'a', 'app'))).toBeGreaterThan(beat);
    expect((await a.client.listVms()).find((v) => v.name === 'app')?.state).toBe('running');
    expect(runningPid(join(root, 'a', 'app'))).toBe(sourcePid);
    const w = await warmth(a, id);
    // Still held: a pre-warm that ended while held says why here.
    if (!w) throw new Error(`the pre-warm ended while held: ${JSON.stringify((await a.client.listMigrations()).filter((m) => m.id.startsWith(id)))}`);
    expect(w.destinations.map((d) => d.status)).toEqual(['warming', 'warming']);
    for (const d of w.destinations) {
      expect(d.remainingBytes, `${d.name}: the reserve, crawling`).toBeGreaterThan(0);
      expect(d.rateBytesPerSec, `${d.name} rate while held (the bulk copy's)`).toBeGreaterThan(d.dirtyRateBytesPerSec);
    }
    const human = await cliHere(['migrations', '--agent', a.url]);
    expect(human.stdout).toMatch(/PRE-WARM[\s\S]*b\s+warming/);
    // At each destination the VM is listed as arriving, its guest RAM faulted in before the copy
    // (PrepareIncoming.prewarm: the first touch of a 2 MiB is not left to the switch's stop).
    for (const name of ['b', 'c']) {
      const agent = c.agent(name);
      expect((await agent.client.listVms()).find((v) => v.name === 'app'), name).toMatchObject({ state: 'created', incoming: true });
      expect((await cliHere(['vm', 'list', '--agent', agent.url])).stdout, name).toMatch(/app\s+created \(incoming\)/);
      expect(residentBytes(runningPid(join(root, name, 'app'))!), `${name}: guest RAM resident`).toBeGreaterThanOrEqual(VM_BYTES);
    }

    const { id: same } = await a.client.migrate('app', 'b');
    expect(same).toBe(id);
    const info = await a.client.waitMigration(id, { timeoutMs: 240_000 });
    expect(info.outcome, JSON.stringify(info)).toBe('completed');
    const s = info.summary!;
    expect(s.winner).toBe('b');
    const by = Object.fromEntries(s.destinations!.map((d) => [d.name, d]));
    expect(by['c']).toMatchObject({ outcome: 'terminated', reason: `terminated: not named by the migrate command (migration ${id})` });
    // b's own record says what moved (QEMU's stream is not counted at a target: the source tells it at the commit).
    const onB = (await c.agent('b').client.listMigrations()).find((m) => m.id === `${id}~b`);
    expect(onB?.outcome).toBe('completed');
    expect(onB?.summary?.memoryBytes, JSON.stringify(onB?.summary)).toBeGreaterThan(0);
    expect(onB!.summary!.bytes, 'bytes: memory and management').toBeGreaterThan(onB!.summary!.memoryBytes);
    // The switch as the single path makes it: VmMemory and the final round while QEMU was paused at
    // pre-switchover (no syncingDirty after the copy), and no BootIncoming (b was named alone).
    // b and c both copying when the stream started: one stream through the relay (c dropped from it at the command).
    expect(s.precopy?.transport).toBe('relay');
    const phasesB = by['b']!.phases.map((p) => p.phase);
    expect(phasesB).not.toContain('booting');
    expect(phasesB).not.toContain('syncingDirty');
    // Chosen at the command (the winner journaled then): no verdict to wait for after the stop.
    expect(phasesB).not.toContain('awaitingDecision');
    await waitFor(() => (ticks.acked >= s.events + 20 ? true : undefined), 30_000, 'events after the switch (forwarded by a)');
    await ticks.stop();

    const b = c.agent('b');
    expect((await b.client.listVms()).map((v) => `${v.name}:${v.state}`)).toEqual(['app:running']);
    const winnerPid = runningPid(join(root, 'b', 'app'));
    expect(winnerPid).toBeDefined();
    await heartbeat(join(root, 'b', 'app'), 2);
    await waitFor(() => (qemus.live().length === 1 ? true : undefined), 30_000, 'only the QEMU at b left');
    expect(qemus.live()).toEqual([winnerPid]);
    await expectClean(a);
    await expectCleanSoon(c.agent('c'));
    const onC = (await c.agent('c').client.listMigrations()).find((m) => m.id === `${id}~c`);
    expect(onC?.outcome).toBe('aborted');
    await expectStreamExact(b, ticks.acked);
    await expectIntactAt(c, root, 'b', winnerPid!);
  }, 420_000);

  it('one destination: prewarm --to b then migrate --to b switches with QEMU streaming straight to b (--json: precopy.transport direct), b runs it intact, every event once in order; then a pre-warm from b back to a, cancelled, leaves nothing at a and the guest in its QEMU at b', async () => {
    const root = qemus.root();
    const { c, a, ticks } = await appWithEvents(root, true);
    const b = c.agent('b');

    const { id } = await a.client.prewarm('app', ['b']);
    await untilWarm(a, id, ['b']);
    expect((await a.client.listVms()).find((v) => v.name === 'app')?.state).toBe('running');
    const switched = await cliHere(['migrate', 'app', '--to', 'b', '--json', '--agent', a.url]);
    expect(switched.code, `${switched.stderr} ${switched.stdout}`).toBe(0);
    const info = JSON.parse(switched.stdout) as MigrationInfo;
    expect(info.id).toBe(id);
    expect(info.outcome, JSON.stringify(info)).toBe('completed');
    const s = info.summary!;
    expect(s.winner).toBe('b');
    // The one stream went QEMU → b's incoming QEMU over QEMU's own TLS, not through a's relay.
    expect(s.precopy?.transport).toBe('direct');
    await waitFor(() => (ticks.acked >= s.events + 20 ? true : undefined), 30_000, 'events after the switch (forwarded by a)');
    await ticks.stop();
    expect((await b.client.listVms()).map((v) => `${v.name}:${v.state}`)).toEqual(['app:running']);
    const winnerPid = runningPid(join(root, 'b', 'app'));
    await heartbeat(join(root, 'b', 'app'), 2);
    await waitFor(() => (qemus.live().length === 1 ? true : undefined), 30_000, 'only the QEMU at b left');
    expect(qemus.live()).toEqual([winnerPid]);
    await expectClean(a);

    // Back towards a, one destination again, cancelled while warm: QEMU's direct stream is cancelled (migrate_cancel), a discards.
    const back = await b.client.prewarm('app', ['a']);
    await untilWarm(b, back.id, ['a']);
    const cancelled = await cliHere(['prewarm', 'app', '--cancel', '--json', '--agent', b.url]);
    expect(cancelled.code, cancelled.stderr).toBe(0);
    const gone = await b.client.waitMigration(back.id, { timeoutMs: 120_000 });
    expect(gone.outcome).toBe('aborted');
    expect(gone.summary!.winner).toBeNull();
    await expectCleanSoon(a);
    await waitFor(() => (qemus.live().length === 1 ? true : undefined), 30_000, 'only the QEMU at b left');
    expect(qemus.live()).toEqual([winnerPid]);
    expect((await b.client.listVms()).find((v) => v.name === 'app')?.state).toBe('running');
    await heartbeat(join(root, 'b', 'app'), 2);
    expect((await b.client.listMigrations()).filter((m) => m.outcome === null)).toEqual([]);
    await expectStreamExact(b, ticks.acked);
    await expectIntactAt(c, root, 'b', winnerPid!);
  }, 420_000);

  it('bad input is refused with codes (a stopped VM, --to self, a second pre-warm, a destination not warmed); --cancel leaves nothing on b or c, the guest runs on in its QEMU at a', async () => {
    const root = qemus.root();
    const { c, a, ticks } = await appWithEvents(root);
    const sourcePid = runningPid(join(root, 'a', 'app'));
    await a.client.createVm({ name: 'cold', memory: 32 * MiB });

    const stopped = await cliHere(['prewarm', 'cold', '--to', 'b', '--agent', a.url]);
    expect(stopped.code, stopped.stderr).toBe(1);
    expect(stopped.stderr).toContain(ErrorCodes.VM_BAD_STATE);
    expect(stopped.stderr).toContain('start it first');
    // Nor does it migrate, to one or to several: refused before anything starts (the copy used to find out, and a fan-out blamed a dropped stream).
    for (const to of ['b', 'b,c']) {
      const cold = await cliHere(['migrate', 'cold', '--to', to, '--agent', a.url]);
      expect(cold.code, cold.stderr).toBe(1);
      expect(cold.stderr).toMatch(/VM cold is created: the qemu driver migrates only a running VM \(start it first\) \[EMBOT_ERR_VM_BAD_STATE\]/);
    }
    expect((await a.client.listMigrations()).filter((m) => m.vm === 'cold')).toEqual([]);
    const self = await cliHere(['prewarm', 'app', '--to', 'a,b', '--agent', a.url]);
    expect(self.code).toBe(2);
    expect(self.stderr).toContain(ErrorCodes.DESTINATIONS_INVALID);
    const { id } = await a.client.prewarm('app', ['b', 'c']);
    const twice = await cliHere(['prewarm', 'app', '--to', 'b', '--agent', a.url]);
    expect(twice.code).toBe(1);
    expect(twice.stderr).toContain(ErrorCodes.VM_BAD_STATE);
    await untilWarm(a, id, ['b', 'c']);
    await expect(a.client.migrate('app', ['b', 'zz'])).rejects.toMatchObject({ code: ErrorCodes.DESTINATIONS_INVALID });
    expect((await warmth(a, id))?.commandedAt).toBeNull();

    const cancelled = await cliHere(['prewarm', 'app', '--cancel', '--json', '--agent', a.url]);
    expect(cancelled.code, cancelled.stderr).toBe(0);
    const info = await a.client.waitMigration(id, { timeoutMs: 120_000 });
    await ticks.stop();
    expect(info.outcome).toBe('aborted');
    expect(info.summary!.winner).toBeNull();

    for (const n of ['b', 'c']) await expectCleanSoon(c.agent(n));
    // migrate_cancel at the source: the guest never left its QEMU, which alone is left.
    await waitFor(() => (qemus.live().length === 1 ? true : undefined), 30_000, 'only the QEMU at a left');
    expect(qemus.live()).toEqual([sourcePid]);
    expect((await a.client.listVms()).find((v) => v.name === 'app')?.state).toBe('running');
    await heartbeat(join(root, 'a', 'app'), 2);
    expect((await a.client.listMigrations()).filter((m) => m.outcome === null)).toEqual([]);
    await expectStreamExact(a, ticks.acked);
  }, 420_000);

  it('the source SIGKILLed during a qemu pre-warm: after its restart the pre-warm is aborted, b and c discard, the guest runs on in the same QEMU at a', async () => {
    const root = qemus.root();
    const { c, a, ticks } = await appWithEvents(root);
    const sourcePid = runningPid(join(root, 'a', 'app'));
    const { id } = await a.client.prewarm('app', ['b', 'c']);
    await untilWarm(a, id, ['b', 'c']);
    await ticks.stop();
    await c.kill('a');
    await c.startAgent('a');
    const a2 = c.agent('a');
    await c.untilMigrationsSettled(120_000);
    expect((await a2.client.listMigrations()).find((m) => m.id === id)?.outcome).toBe('aborted');
    for (const n of ['b', 'c']) await expectClean(c.agent(n));
    await waitFor(() => (qemus.live().length === 1 ? true : undefined), 30_000, 'only the QEMU at a left');
    expect(qemus.live()).toEqual([sourcePid]);
    // Listed running again (a monitor that does not answer at once is attached in the background: qemu-driver attachLate).
    await waitFor(async () => ((await a2.client.listVms()).find((v) => v.name === 'app')?.state === 'running' ? true : undefined), 30_000, 'app listed running at a').catch((e: unknown) => {
      throw new Error(`${String(e)}; a's log: ${a2.stderr.slice(-20000)}`);
    });
    await heartbeat(join(root, 'a', 'app'), 2);
    await expectStreamExact(a2, ticks.acked);
  }, 420_000);
});
