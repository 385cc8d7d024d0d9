import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { freeLoopbackPort } from '../../core/cli/free-port.ts';
import { waitFor } from '../harness/agent-process.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { Cluster, migrate } from '../harness/cluster.ts';

const cleanups = cleanupsAfterEach();

interface Link {
  readonly seq: number;
  bytes: number;
  open: boolean;
}

/**
 * A plain TCP relay in front of b's peer port: every link a opens to b is one TCP connection
 * accepted here (one WebSocket + auth handshake at b), with the bytes it carried.
 */
async function countingRelay(upstreamPort: number): Promise<{ readonly port: number; readonly links: Link[] }> {
  const links: Link[] = [];
  const sockets = new Set<Socket>();
  const server: Server = createServer((down) => {
    const link: Link = { seq: links.length, bytes: 0, open: true };
    links.push(link);
    const up = connect(upstreamPort, '127.0.0.1');
    sockets.add(down).add(up);
    const end = (): void => {
      link.open = false;
      down.destroy();
      up.destroy();
    };
    for (const [from, to] of [[down, up], [up, down]] as const) {
      from.on('data', (d: Buffer) => {
        link.bytes += d.length;
        to.write(d);
      });
      from.on('close', end);
      from.on('error', end);
    }
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  cleanups.push(async () => {
    for (const s of sockets) s.destroy();
    await new Promise((r) => server.close(r));
  });
  return { port: (server.address() as { port: number }).port, links };
}

/** Agents a and b; a reaches b only through the relay. */
async function pair(warmConnections: boolean) {
  const dir = mkdtempSync(join(tmpdir(), 'embot-warm-'));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  const secretFile = join(dir, 'cluster.secret');
  writeFileSync(secretFile, randomBytes(32).toString('base64'));
  const ports = { a: await freeLoopbackPort(), b: await freeLoopbackPort() };
  const relay = await countingRelay(ports.b);
  const peer = (name: 'a' | 'b') => ({
    listen: `127.0.0.1:${ports[name]}`,
    peers: name === 'a' ? { b: `ws://127.0.0.1:${relay.port}` } : { a: `ws://127.0.0.1:${ports.a}` },
    secretFile,
  });
  const cluster = await Cluster.start(['a', 'b'], {
    plugins: [{ from: 'shipped', name: 'vm-watchdog' }],
    config: (name) => ({
      peer: peer(name as 'a' | 'b'),
      mobility: { stepTimeoutMs: 3000, vmTimeoutMs: 10_000, forwardGraceMs: 5000, trust: { mode: 'any-authenticated-peer' }, warmConnections },
    }),
  });
  cleanups.push(() => cluster.stop());
  return { cluster, relay };
}

/** Migrates a fresh VM a → b; returns the links that carried the migration (their bytes grew) and which of them were accepted during it. */
async function migrateCounting(cluster: Cluster, relay: { readonly links: Link[] }, vm: string) {
  const a = cluster.agent('a');
  await a.client.createVm({ name: vm, memory: 1 << 20 });
  await a.client.vmAction(vm, 'start');
  const before = relay.links.map((l) => l.bytes);
  const info = await migrate(a, vm, 'b');
  // The relay sees a link's bytes before either agent does; give its last chunks a moment.
  await new Promise((r) => setTimeout(r, 100));
  const used = relay.links.filter((l) => l.bytes - (before[l.seq] ?? 0) > 1024);
  return { info, used, dialledDuring: used.filter((l) => l.seq >= before.length) };
}

describe('warm peer connections between two agent processes (issue 12)', () => {
  it('a migration takes the pre-dialled links: the target accepts no new link for it; without the key it dials both', async () => {
    const { cluster, relay } = await pair(true);
    await waitFor(() => relay.links.filter((l) => l.open).length >= 2, 15_000, "a's two idle links to b");
    const warm = await migrateCounting(cluster, relay, 'w-1');
    expect(warm.info.outcome).toBe('completed');
    // Control link and primary data path (the 1 MiB memory): both dialled before the migration.
    expect(warm.used.length).toBeGreaterThanOrEqual(2);
    expect(warm.dialledDuring).toEqual([]);
    // Refilled once the migration's links closed: the next migration is warm too.
    await waitFor(() => relay.links.filter((l) => l.open).length >= 2, 10_000, 'the idle links refilled');
    const next = await migrateCounting(cluster, relay, 'w-2');
    expect(next.info.outcome).toBe('completed');
    expect(next.dialledDuring).toEqual([]);

    const off = await pair(false);
    const cold = await migrateCounting(off.cluster, off.relay, 'c-1');
    expect(cold.info.outcome).toBe('completed');
    expect(cold.dialledDuring.length).toBeGreaterThanOrEqual(2);
  });

  it('a target that restarted: the idle links it dropped are re-dialled, and a migration right after the restart completes', async () => {
    const { cluster, relay } = await pair(true);
    await waitFor(() => relay.links.filter((l) => l.open).length >= 2, 15_000, "a's two idle links to b");
    const firstLinks = relay.links.length;
    await cluster.kill('b');
    await waitFor(() => relay.links.slice(0, firstLinks).every((l) => !l.open), 5000, 'the old links dropped');
    await cluster.startAgent('b');
    // At once: a's pool may still be backing off (it dials itself) or have re-dialled (it takes them).
    const now = await migrateCounting(cluster, relay, 'r-1');
    expect(now.info.outcome).toBe('completed');
    await waitFor(() => relay.links.filter((l) => l.open).length >= 2, 15_000, 'idle links to the restarted b');
    const later = await migrateCounting(cluster, relay, 'r-2');
    expect(later.info.outcome).toBe('completed');
    expect(later.dialledDuring).toEqual([]);
  });
});
