import { join } from 'node:path';
import { waitFor, type AgentProcess } from './agent-process.ts';
import { Cluster } from './cluster.ts';
import { counterOf } from './counter-stream.ts';
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
