import { join } from 'node:path';
import { isEmbotError, ErrorCodes } from '../../core/errors.ts';
import { sleep, waitFor, type AgentProcess } from './agent-process.ts';
import { Cluster } from './cluster.ts';
import { counterOf, sequencedPoster, type SequencedPoster } from './counter-stream.ts';
import { heartbeat, qemuAgentConfig } from './qemu-processes.ts';

/** Set-ups shared by the qemu fan-out tests through agents (issue 13: one QEMU stream relayed to several destinations). */

const MiB = 1024 * 1024;

export interface QemuFanOutClusterOptions {
  /** The source's primary path cap (bytes/s): QEMU's max-bandwidth for the whole relayed stream. */
  readonly capOfA?: number;
  /** These agents refuse every BootIncoming (EMBOT_FAULT_BOOT_FAIL=1: the refusal and the discard are real). */
  readonly bootFails?: readonly string[];
  readonly tls?: boolean;
  /** Mobility timeouts, over the defaults below. */
  readonly mobility?: Record<string, unknown>;
}

/** Agents `--driver qemu` (TCG), no spare incoming QEMU (so every QEMU counted is a VM's), the counter fixture; `a` is the source. */
export async function qemuFanOutCluster(root: string, names: readonly string[], o: QemuFanOutClusterOptions = {}): Promise<Cluster> {
  return Cluster.start(names, {
    ...(o.tls ? { tls: {} } : {}),
    plugins: [{ from: 'fixture', name: 'counter' }],
    env: (n): Record<string, string> => (o.bootFails?.includes(n) ? { EMBOT_FAULT_BOOT_FAIL: '1' } : {}),
    config: (n) => ({
      ...qemuAgentConfig(root, n),
      qemu: { ...qemuAgentConfig(root, n).qemu, spareIncoming: false },
      // The guest dirties every page each pass; with several TCG QEMUs and the relay on 2 shared cores the copy needs the throttle and a looser limit.
      ...(n === 'a' ? { dataplane: { downtimeLimitMs: 2000, autoConverge: true, ...(o.capOfA === undefined ? {} : { primaryCapBytesPerSec: o.capOfA }) } } : {}),
      mobility: { stepTimeoutMs: 30_000, vmTimeoutMs: 120_000, forwardGraceMs: 10_000, trust: { mode: 'any-authenticated-peer' }, ...o.mobility },
    }),
  });
}

/** VM `vm` (64 MiB, TCG) running at `a` with its heart beating and its counter embot attached. */
export async function guestWithCounter(a: AgentProcess, root: string, vm: string, boot?: string): Promise<void> {
  await a.client.createVm({ name: vm, memory: 64 * MiB, ...(boot === undefined ? {} : { boot }) });
  await a.client.vmAction(vm, 'start');
  await heartbeat(join(root, 'a', vm), 2);
  await waitFor(async () => counterOf(await a.client.listEmbots(), vm), 20_000, `counter embot of ${vm} on a`);
}

/**
 * Posts TICK seq=n with id `tick-n` for VM `vm` to whoever owns it as far as it knows: `a` first,
 * then the owner an ELEMENT_MOVED answer names. A failed post (the agent down, restarting) is
 * re-sent with the same id; a duplicate answer means the earlier post was taken. So an agent
 * killed between taking a post and answering it cannot make the stream count one event twice.
 */
export function ownerFollowingProducer(c: Cluster, vm: string): SequencedPoster {
  let owner = 'a';
  return sequencedPoster(async (seq) => {
    const agent = c.agents.get(owner);
    try {
      if (!agent) throw new Error('owner down');
      await agent.client.emitEvent({ elementId: `vm:${vm}`, type: 'TICK', payload: { seq }, id: `tick-${seq}` });
      return true;
    } catch (e) {
      if (isEmbotError(e, ErrorCodes.EVENT_DUPLICATE)) return true;
      if (isEmbotError(e, ErrorCodes.ELEMENT_MOVED)) owner = String((e as { details?: { owner?: unknown } }).details?.owner ?? owner);
      else await sleep(20);
      return false;
    }
  });
}
