/**
 * TargetSide.evaluate with discards still running (target-discards.ts): the paths the qemu
 * integration test (qemu-retry-admission) cannot reach on purpose — a discard that outlasts the
 * wait, an Abort during the wait, a refusal no discard can lift. A real sim driver and object
 * service; standing in for "qemu still lists the VM while its incoming QEMU dies" is a sim VM of that
 * name plus a tracked promise the test settles (the sim's own discard has no such window).
 */
import { describe, expect, it } from 'vitest';
import type { MobilityHost } from '../../core/mobility/mobility-host.ts';
import type { TargetInput } from '../../core/mobility/mobility-contract.ts';
import { TargetDiscards } from '../../core/mobility/target-discards.ts';
import { TargetSide } from '../../core/mobility/target-side.ts';
import { ManagedObjectService } from '../../core/objects/object-service.ts';
import type { StartMigration } from '../../core/wire/frames.ts';
import type { PeerConnection } from '../../core/wire/peer-connection.ts';
import { SimDriver } from '../../effectors/hypervisor/sim/sim-driver.ts';
import { startMigration } from '../harness/migration-frames.ts';

const MiB = 1024 * 1024;

interface Rig {
  readonly host: MobilityHost;
  readonly driver: SimDriver;
  readonly discards: TargetDiscards;
  side(discardWaitMs: number): TargetSide;
  input(id: string, vm: string, memory?: number): TargetInput & { readonly reason: string };
}

function rig(hostMemory = 1024 * MiB): Rig {
  const driver = new SimDriver();
  // What evaluate and a discard of a side that staged nothing use of the agent.
  const host = { agent: 'b', driver, objects: new ManagedObjectService(), migratingIn: new Set<string>(), hostMemory, allowedSources: [] } as Partial<MobilityHost> as MobilityHost;
  const discards = new TargetDiscards();
  return {
    host,
    driver,
    discards,
    side: (discardWaitMs) => new TargetSide({ host, conn: {} as PeerConnection, stepTimeoutMs: 10_000, onProgress: () => {}, discards, discardWaitMs }),
    input: (id, vm, memory = 32 * MiB) => ({
      migrationId: id,
      vm,
      source: 'a',
      timeouts: { stepMs: 10_000, vmMs: 10_000 },
      start: startMigration(1, id, vm, memory) as unknown as StartMigration,
      replyStart: () => {},
      reason: 'test',
    }),
  };
}

/** A discard still running that the test ends: `end()` removes the VM it stood for (as abortIncoming does) and settles. */
async function runningDiscard(r: Rig, vm: string, id: string, memory = 32 * MiB): Promise<{ end(): Promise<void> }> {
  await r.driver.create({ name: vm, memory });
  let settle!: () => void;
  r.discards.track(vm, id, new Promise<void>((resolve) => (settle = resolve)));
  return {
    end: async () => {
      await r.driver.remove(vm);
      settle();
    },
  };
}

describe('TargetSide.evaluate: a refusal a running discard may lift waits for it, bounded', () => {
  it('the same VM: admitted once its discard ended, with the name and the memory claimed', async () => {
    const r = rig();
    const old = await runningDiscard(r, 'g1', 'm-1');
    const side = r.side(10_000);
    const verdict = side.evaluate(r.input('m-2', 'g1'));
    await new Promise((resolve) => setTimeout(resolve, 20));
    expect(r.host.migratingIn.has('g1')).toBe(false);
    await old.end();
    expect(await verdict).toEqual({ permitted: true });
    expect(r.host.migratingIn.has('g1')).toBe(true);
    expect(side.reservedBytes).toBe(32 * MiB);
  });

  it('a discard that outlasts the wait: denied, the reason names the discard still running; nothing claimed', async () => {
    const r = rig();
    const stuck = await runningDiscard(r, 'g1', 'm-1');
    const verdict = await r.side(30).evaluate(r.input('m-2', 'g1'));
    expect(verdict).toEqual({ permitted: false, reason: 'a VM named g1 already exists on b (the discard of migration m-1 still ran after 30 ms)' });
    expect(r.host.migratingIn.has('g1')).toBe(false);
    await stuck.end();
  });

  it('memory short while another VM is discarded: admitted once that discard freed it', async () => {
    const r = rig(48 * MiB);
    const other = await runningDiscard(r, 'g2', 'm-1');
    const verdict = r.side(10_000).evaluate(r.input('m-2', 'g1'));
    await other.end();
    expect(await verdict).toEqual({ permitted: true });
  });

  it('a refusal no discard can lift (the VM exists, only another VM is discarded) is given at once', async () => {
    const r = rig();
    await r.driver.create({ name: 'g1', memory: 32 * MiB });
    const other = await runningDiscard(r, 'g2', 'm-1');
    const verdict = await r.side(10_000).evaluate(r.input('m-2', 'g1'));
    expect(verdict).toEqual({ permitted: false, reason: 'a VM named g1 already exists on b' });
    await other.end();
  });

  it('aborted while it waits (its own discard runs): not admitted after the wait, and it claims nothing', async () => {
    const r = rig();
    const old = await runningDiscard(r, 'g1', 'm-1');
    const side = r.side(10_000);
    const input = r.input('m-2', 'g1');
    const verdict = side.evaluate(input);
    // What the machine does on ABORT in evaluating: the side's discard, while evaluate still waits.
    await side.discard(input);
    await old.end();
    expect(await verdict).toMatchObject({ permitted: false, reason: expect.stringContaining('discarded while waiting') });
    expect(r.host.migratingIn.has('g1')).toBe(false);
    expect(side.reservedBytes).toBe(0);
  });

  it("a discard releases only the VM name its own migration claimed, not another migration's", async () => {
    const r = rig();
    const admitted = r.side(10_000);
    expect(await admitted.evaluate(r.input('m-1', 'g1'))).toEqual({ permitted: true });
    const refused = r.side(10_000);
    const input = r.input('m-2', 'g1');
    expect(await refused.evaluate(input)).toMatchObject({ permitted: false });
    await refused.discard(input);
    expect(r.host.migratingIn.has('g1')).toBe(true);
  });
});
