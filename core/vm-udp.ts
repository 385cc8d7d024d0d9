import type { Logger } from './logger.ts';
import { describeError } from './errors.ts';
import { UdpRelay, decodePackets, encodePackets, type BufferedPacket, type UdpAddress, type UdpRelayStats } from '../sensors/udp-relay.ts';
import { SimUdpService } from '../effectors/hypervisor/sim-udp-service.ts';

interface VmUdp {
  service: SimUdpService | undefined;
  relay: UdpRelay;
  /** Packets handed over to a target, kept until the move is settled (given back on abort). */
  handed?: BufferedPacket[];
}

/**
 * The UDP side of sim VMs: a VM created with `udpPort` runs a counter service (its "guest"
 * UDP service) behind the agent's relay on 127.0.0.1:udpPort, which clients use. During a
 * migration the relay buffers while the VM is offline and hands the buffer to the target's relay,
 * then re-points: clients keep the source address for the grace period (see UdpRelay).
 */
export class VmUdpServices {
  private readonly vms = new Map<string, VmUdp>();
  /** One chain per VM: state changes arrive faster than sockets open. */
  private readonly chains = new Map<string, Promise<void>>();

  constructor(private readonly log: Logger) {}

  private serial(vm: string, fn: () => Promise<void>): Promise<void> {
    const next = (this.chains.get(vm) ?? Promise.resolve()).then(fn, fn);
    this.chains.set(vm, next.catch(() => {}));
    return next;
  }

  /** Starts the relay (and, for a running VM, its service) for a VM with a UDP port; follows its state after. */
  ensure(vm: string, udpPort: number, running: boolean): Promise<void> {
    return this.serial(vm, () => this.ensureNow(vm, udpPort, running));
  }

  private async ensureNow(vm: string, udpPort: number, running: boolean): Promise<void> {
    if (this.vms.has(vm)) return this.setRunning(vm, running);
    const service = running ? await SimUdpService.start() : undefined;
    const relay = await UdpRelay.start({ port: udpPort, ...(service ? { backend: service.address } : { paused: true }) });
    relay.on('drop', (d) => this.log.warn(`udp relay of ${vm} dropped a packet`, { reason: d.reason }));
    this.vms.set(vm, { service, relay });
  }

  /** The VM started or stopped: its service follows; the relay buffers while it is down. */
  private async setRunning(vm: string, running: boolean): Promise<void> {
    const v = this.vms.get(vm);
    if (!v || v.relay.mode === 'repointed') return;
    if (running && (!v.service || v.service.state === 'closed')) {
      v.service = await SimUdpService.start({ served: v.service?.served ?? 0 });
      v.relay.setBackend(v.service.address);
      if (v.relay.mode === 'buffering') v.relay.resume();
    } else if (running && v.service?.state === 'halted') {
      v.service.resume();
      if (v.relay.mode === 'buffering') v.relay.resume();
    } else if (!running && v.service && v.service.state === 'serving') {
      v.relay.pause();
      await v.service.halt();
    }
  }

  /** Source, at stop-and-copy: buffer client packets, let the service finish what it already got. */
  async pauseForMigration(vm: string): Promise<void> {
    const v = this.vms.get(vm);
    if (!v) return;
    v.relay.pause();
    if (v.service?.state === 'serving') await v.service.halt();
  }

  /** Source, after the target committed: the service's count and the buffered packets, to ship. */
  handOver(vm: string): { readonly served: number; readonly packets: Uint8Array } | undefined {
    const v = this.vms.get(vm);
    if (!v) return undefined;
    v.handed = v.relay.handOver();
    return { served: v.service?.served ?? 0, packets: encodePackets(v.handed) };
  }

  /** Target: start the moved VM's service where the source's stopped, deliver the handed-over packets first. */
  async adopt(vm: string, served: number, packets: Uint8Array): Promise<UdpAddress> {
    const handed = decodePackets(packets);
    const service = await SimUdpService.start({ served });
    // Port 0: on one machine the source's relay still holds the VM's port (clients keep using it).
    const relay = await UdpRelay.start({ port: 0, backend: service.address, paused: true });
    relay.deliverFirst(handed, { resume: true });
    this.vms.set(vm, { service, relay });
    return relay.peerAddress;
  }

  /** Source: from now on the relay forwards to the target's relay; it closes after the grace period. */
  repoint(vm: string, to: UdpAddress, graceMs: number): void {
    const v = this.vms.get(vm);
    if (!v) return;
    v.relay.repoint(to);
    void v.service?.close();
    v.service = undefined;
    setTimeout(() => void this.remove(vm), graceMs).unref();
  }

  /** Source, migration aborted: the VM serves here again, buffered packets first. */
  resumeAfterAbort(vm: string): void {
    const v = this.vms.get(vm);
    if (!v) return;
    try {
      v.service?.resume();
      if (v.handed?.length) v.relay.deliverFirst(v.handed, { resume: true });
      else if (v.relay.mode === 'buffering') v.relay.resume();
      v.handed = undefined;
    } catch (e) {
      this.log.warn(`could not resume the UDP service of ${vm}`, { error: describeError(e) });
    }
  }

  /** The relay now forwards to another host's relay (kept open for the grace period). */
  isRepointed(vm: string): boolean {
    return this.vms.get(vm)?.relay.mode === 'repointed';
  }

  stats(vm: string): UdpRelayStats | undefined {
    return this.vms.get(vm)?.relay.stats();
  }

  address(vm: string): UdpAddress | undefined {
    return this.vms.get(vm)?.relay.address;
  }

  remove(vm: string): Promise<void> {
    return this.serial(vm, () => this.removeNow(vm));
  }

  private async removeNow(vm: string): Promise<void> {
    const v = this.vms.get(vm);
    if (!v) return;
    this.vms.delete(vm);
    await Promise.all([v.relay.close(), v.service?.close()]);
  }

  async close(): Promise<void> {
    await Promise.all([...this.vms.keys()].map((vm) => this.remove(vm)));
  }
}
