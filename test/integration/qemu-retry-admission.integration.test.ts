/**
 * A destination asked again right after it refused or was told to abort (issue 13, the CI flake of
 * the qemu set of one: `--to b --retries 1` saw b's second attempt `denied`). b answers the failed
 * step before its discard has thrown the incoming QEMU away (SIGKILL, the wait for it to go, its
 * state dir removed), and the retry's StartMigration reached b's admission meanwhile: "a VM named
 * g1 already exists on b", or its memory still counted. The admission now waits for a discard
 * that could lift its refusal (core/mobility/target-discards.ts) before it judges.
 *
 * Real agent b (`--driver qemu`, TCG), real incoming QEMUs; the source is hand-driven (RawPeer), so
 * the next StartMigration goes out right behind the Abort, inside the discard, every run.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadClusterSecret } from '../../core/wire/index.ts';
import { pidAlive, runningPid } from '../../effectors/hypervisor/qemu/qemu-process.ts';
import { waitFor } from '../harness/agent-process.ts';
import { Cluster } from '../harness/cluster.ts';
import { startMigration } from '../harness/migration-frames.ts';
import { qemuAgentConfig, qemuTestFile } from '../harness/qemu-processes.ts';
import { RawPeer, type Outcome } from '../harness/raw-peer.ts';

const MiB = 1024 * 1024;
let cluster: Cluster | undefined;
const { run, qemus } = qemuTestFile(async () => { await cluster?.stop(); cluster = undefined; });

/** The reply is a frame of `type` (the whole reply in the message otherwise: a denial's reason). */
function expectReply(o: Outcome, type: string): void {
  const got = o.kind === 'frame' ? o.frame : o;
  expect(got, JSON.stringify(got)).toMatchObject({ type });
}

describe.skipIf(!run)('qemu: a destination admits a retry that arrives while it still discards the last attempt (TCG)', () => {
  it('StartMigration right behind the Abort: the same VM again, then another VM that fits only once the discarded one is gone; each admitted after the discard, not denied', async () => {
    const root = qemus.root();
    cluster = await Cluster.start(['b'], {
      config: (n) => ({
        // No spare incoming QEMU: every QEMU under b's root is one of these migrations'.
        driver: 'qemu',
        qemu: { ...qemuAgentConfig(root, n).qemu, spareIncoming: false },
        // Room for one 32 MiB guest only: a discarded one still counted would refuse the next.
        sim: { hostMemory: 48 * MiB },
        mobility: { stepTimeoutMs: 30_000, vmTimeoutMs: 60_000, forwardGraceMs: 5000, trust: { mode: 'any-authenticated-peer' } },
      }),
    });
    const b = cluster.agent('b');
    const listen = (JSON.parse(readFileSync(join(cluster.root, 'config-b.json'), 'utf8')) as { peer: { listen: string } }).peer.listen;
    const src = await RawPeer.connect(`ws://${listen}`, 'a', loadClusterSecret(cluster.secretFile));
    let reqId = 0;
    /** Admitted, and its incoming QEMU started: its pid. */
    const prepared = async (id: string, vm: string): Promise<number> => {
      const ready = await src.request({ type: 'PrepareIncoming', reqId: ++reqId, migrationId: id, vm, spec: { name: vm, memory: 32 * MiB, vcpus: 1 }, channels: 1 });
      expectReply(ready, 'IncomingReady');
      return runningPid(join(root, 'b', vm))!;
    };
    try {
      expectReply(await src.request(startMigration(++reqId, 'm-1', 'g1', 32 * MiB)), 'MigrationPermitted');
      const first = await prepared('m-1', 'g1');
      expect(pidAlive(first)).toBe(true);

      // The retry of the same VM, right behind the Abort: b is still killing m-1's QEMU.
      src.send({ type: 'Abort', migrationId: 'm-1', reason: 'test: this attempt failed, the source tries again at once' });
      const again = await src.request(startMigration(++reqId, 'm-2', 'g1', 32 * MiB));
      expectReply(again, 'MigrationPermitted');
      // Admitted only once the discard was done: m-1's QEMU is gone, and its state dir's removal cannot hit m-2's.
      expect(pidAlive(first)).toBe(false);
      const second = await prepared('m-2', 'g1');
      expect(second).not.toBe(first);
      expect((await b.client.listVms()).map((v) => `${v.name}:${v.state}`)).toEqual(['g1:created']);

      // Another VM that fits only without g1's 32 MiB: asked while m-2's discard still counts them.
      src.send({ type: 'Abort', migrationId: 'm-2', reason: 'test: the source moves another VM instead' });
      const other = await src.request(startMigration(++reqId, 'm-3', 'g2', 32 * MiB));
      expectReply(other, 'MigrationPermitted');
      expect(pidAlive(second)).toBe(false);
      await prepared('m-3', 'g2');
      src.send({ type: 'Abort', migrationId: 'm-3', reason: 'test: done' });

      // Every attempt ended aborted at b (none denied), nothing left: no VM, no QEMU.
      await waitFor(async () => ((await b.client.listMigrations()).every((m) => m.outcome !== null) ? true : undefined), 30_000, "b's migrations ended");
      const rows = await b.client.listMigrations();
      expect(rows.map((m) => `${m.id}:${m.outcome}`).sort(), JSON.stringify(rows.map((m) => [m.id, m.outcome, m.reason]))).toEqual(['m-1:aborted', 'm-2:aborted', 'm-3:aborted']);
      await waitFor(() => (qemus.live().length === 0 ? true : undefined), 30_000, "b's incoming QEMUs gone");
      expect(await b.client.listVms()).toEqual([]);
    } finally {
      await src.close();
    }
  }, 120_000);
});
