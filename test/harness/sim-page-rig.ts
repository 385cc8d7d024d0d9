import { randomFillSync } from 'node:crypto';
import { PeerServer, connectPeer, type PeerConnection } from '../../core/wire/index.ts';
import { PageReceiver, pageBatchHandler, type PageReceiverOptions } from '../../effectors/hypervisor/sim/dataplane/index.ts';
import { SimDriver } from '../../effectors/hypervisor/sim/sim-driver.ts';
import type { Cleanups } from './cleanups.ts';

/** One migration destination over a real loopback peer link: what it received lands in `receiver`. */
export interface PageDestination {
  readonly conn: PeerConnection;
  readonly receiver: PageReceiver;
}

/**
 * A peer server named `name` that feeds PageBatch frames into a PageReceiver of `memory` bytes
 * (migration `m~<name>`; `target`: the memory it fills, and whether that starts all zero), and
 * agent `a`'s connection to it; both closed by `cleanups`.
 */
export async function pageDestination(
  cleanups: Cleanups,
  secret: Buffer,
  name: string,
  memory: number,
  target: Pick<PageReceiverOptions, 'memory' | 'memoryIsZero'> = {},
): Promise<PageDestination> {
  const server = await PeerServer.listen({ agent: name, secret, listen: '127.0.0.1:0' });
  const receiver = new PageReceiver({ memoryBytes: memory, pageSize: 4096, migrationId: `m~${name}`, ...target });
  server.handle('PageBatch', pageBatchHandler(receiver));
  const conn = await connectPeer({ url: server.url, agent: 'a', expectedPeer: name, secret });
  cleanups.push(async () => {
    await conn.close();
    await server.close();
  });
  return { conn, receiver };
}

/**
 * A sim driver running `vm1` with random memory (so a missed page shows as a byte difference) and
 * the given dirty rate; `stops` collects the reason of every stop.
 */
export async function runningSimVm(cleanups: Cleanups, memory: number, dirtyRate: number): Promise<{ driver: SimDriver; stops: string[] }> {
  const driver = new SimDriver({ tickMs: 10 });
  cleanups.push(() => driver.close());
  await driver.create({ name: 'vm1', memory, dirtyRate });
  randomFillSync(driver.pages('vm1').memory);
  await driver.start('vm1');
  const stops: string[] = [];
  driver.events.on('vm-state', (e) => {
    if (e.to === 'stopped') stops.push(e.reason ?? '');
  });
  return { driver, stops };
}
