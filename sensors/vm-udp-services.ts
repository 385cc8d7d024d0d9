import type { Logger } from '../core/logger.ts';
import { EffectorError, ErrorCodes, describeError } from '../core/errors.ts';
import { SimUdpService } from '../effectors/index.ts';
import { UdpRelay, decodePackets, encodePackets, type BufferedPacket, type UdpAddress, type UdpRelayStats } from './udp-relay.ts';

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
  /**
   * Every relay and service opened and not yet closed, whether or not `vms` still names it: a
   * socket that outlives its entry would keep the process alive after shutdown.
   */
  private readonly open = new Set<{ close(): Promise<void> }>();
  private closed = false;

  constructor(private readonly log: Logger) {}

  private serial<T>(vm: string, fn: () => Promise<T>): Promise<T> {
    const next = (this.chains.get(vm) ?? Promise.resolve()).then(fn, fn);
    this.chains.set(
      vm,
      next.then(
        () => {},
        () => {},
      ),
    );
    return next;
  }

  /** Tracks a socket owner until it closes; after `close()` it is closed at once and the caller told so. */
  private async track<T extends { close(): Promise<void> }>(opened: Promise<T>): Promise<T> {
    const thing = await opened;
    if (this.closed) {
      await thing.close();
      throw new EffectorError(ErrorCodes.AGENT_STOPPED, 'the agent is stopping; UDP services are closed');
    }
    this.open.add(thing);
    return thing;
  }

  private async release(thing: { close(): Promise<void> } | undefined): Promise<void> {
    if (!thing) return;
    this.open.delete(thing);
    await thing.close();
  }

  /** Starts the relay (and, for a running VM, its service) for a VM with a UDP port; follows its state after. */
  ensure(vm: string, udpPort: number, running: boolean): Promise<void> {
    return this.serial(vm, () => this.ensureNow(vm, udpPort, running));
  }

  private async ensureNow(vm: string, udpPort: number, running: boolean): Promise<void> {
    if (this.closed) return;
    if (this.vms.has(vm)) return this.setRunning(vm, running);
    const service = running ? await this.track(SimUdpService.start()) : undefined;
    let relay: UdpRelay;
    try {
      relay = await this.track(UdpRelay.start({ port: udpPort, ...(service ? { backend: service.address } : { paused: true }) }));
    } catch (e) {
      await this.release(service);
      throw e;
    }
    relay.on('drop', (d) => this.log.warn(`udp relay of ${vm} dropped a packet`, { reason: d.reason }));
    this.vms.set(vm, { service, relay });
  }

  /** The VM started or stopped: its service follows; the relay buffers while it is down. */
  private async setRunning(vm: string, running: boolean): Promise<void> {
    const v = this.vms.get(vm);
    if (!v || v.relay.mode === 'repointed') return;
    if (running && (!v.service || v.service.state === 'closed')) {
      const old = v.service;
      v.service = await this.track(SimUdpService.start({ served: old?.served ?? 0 }));
      if (old) this.open.delete(old);
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

  /**
   * Target: start the moved VM's service where the source's stopped, deliver the handed-over
   * packets first. Whatever served the VM here before is closed: its sockets would otherwise stay
   * open, unnamed, until the process ends.
   */
  async adopt(vm: string, served: number, packets: Uint8Array): Promise<UdpAddress> {
    if (this.closed) throw new EffectorError(ErrorCodes.AGENT_STOPPED, 'the agent is stopping; UDP services are closed');
    // Decoded before anything opens: a bad hand-over costs no socket.
    const handed = decodePackets(packets);
    return this.serial(vm, async () => {
      await this.removeNow(vm);
      const service = await this.track(SimUdpService.start({ served }));
      let relay: UdpRelay;
      try {
        // Port 0: on one machine the source's relay still holds the VM's port (clients keep using it).
        relay = await this.track(UdpRelay.start({ port: 0, backend: service.address, paused: true }));
      } catch (e) {
        await this.release(service);
        throw e;
      }
      relay.deliverFirst(handed, { resume: true });
      this.vms.set(vm, { service, relay });
      return relay.peerAddress;
    });
  }

  /** Source: from now on the relay forwards to the target's relay; it closes after the grace period. */
  repoint(vm: string, to: UdpAddress, graceMs: number): void {
    const v = this.vms.get(vm);
    if (!v) return;
    v.relay.repoint(to);
    void this.release(v.service);
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
    await Promise.all([this.release(v.relay), this.release(v.service)]);
  }

  /** How many relays and services hold sockets now (for tests and status). */
  get openCount(): number {
    return this.open.size;
  }

  /** Closes every relay and service, named or not; later `ensure` / `adopt` calls open nothing. */
  async close(): Promise<void> {
    this.closed = true;
    await Promise.all([...this.vms.keys()].map((vm) => this.remove(vm)));
    this.vms.clear();
    await Promise.all([...this.open].map((t) => this.release(t)));
  }
}
