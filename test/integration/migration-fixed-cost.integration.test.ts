import { cpSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { createServer, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { startAgent, type RunningAgent } from '../../core/agent.ts';
import { loadConfig } from '../../core/config/config.ts';
import { createLogger } from '../../core/logger.ts';
import type { PeerServer } from '../../core/wire/peer-server.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { waitFor } from '../harness/agent-process.ts';

const cleanups = cleanupsAfterEach();

async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((r, j) => (srv.once('error', j), srv.listen(0, '127.0.0.1', () => r())));
  const port = (srv.address() as AddressInfo).port;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

/** Agents a and b in this process, each the other's peer, with vm-watchdog (one embot per VM). */
async function pair(bHostMemory?: number, warmConnections = true): Promise<{ a: RunningAgent; b: RunningAgent }> {
  const root = mkdtempSync(join(tmpdir(), 'embot-fixed-cost-test-'));
  cleanups.push(() => rmSync(root, { recursive: true, force: true }));
  const plugins = join(root, 'plugins');
  mkdirSync(plugins);
  cpSync(join(import.meta.dirname, '../../plugins/vm-watchdog'), join(plugins, 'vm-watchdog'), { recursive: true });
  const secretFile = join(root, 'secret');
  writeFileSync(secretFile, randomBytes(32).toString('hex'));
  const ports = { a: await freePort(), b: await freePort() };
  const start = async (name: 'a' | 'b'): Promise<RunningAgent> => {
    const other = name === 'a' ? 'b' : 'a';
    const flags = {
      name,
      dataDir: join(root, `data-${name}`),
      pluginsDir: plugins,
      logLevel: 'error' as const,
      control: { port: 0 },
      peer: { listen: `127.0.0.1:${ports[name]}`, peers: { [other]: `ws://127.0.0.1:${ports[other]}` }, secretFile },
      mobility: { trust: { mode: 'any-authenticated-peer' as const }, warmConnections },
      sensors: { host: { intervalMs: 600_000 }, vm: { intervalMs: 600_000 } },
      // Every page written, so the memory step moves the VM's bytes (a fresh VM's zero pages go as indexes).
      sim: { startMemory: 'random' as const, ...(name === 'b' && bHostMemory !== undefined ? { hostMemory: bHostMemory } : {}) },
    };
    const agent = await startAgent(loadConfig({ env: {}, flags }), createLogger({ level: 'error', name }));
    cleanups.push(() => agent.stop());
    return agent;
  };
  return { a: await start('a'), b: await start('b') };
}

/** The target's authenticated peer connections (the mobility service keeps its server private). */
function peerConnections(agent: RunningAgent): number {
  const server = (agent.services.get('mobility') as unknown as { server: PeerServer | undefined }).server;
  if (!server) throw new Error(`${agent.name} has no peer server`);
  return server.connections.length;
}

describe('fixed cost of a small migration (issue 12)', () => {
  it('a 64 KiB VM is planned without a bandwidth probe, the summary times the memory step, and everything arrives', async () => {
    const { a, b } = await pair();
    await a.control.createVm({ name: 'tiny', memory: 64 * 1024 });
    await a.control.vmAction('tiny', 'start');
    await waitFor(() => a.control.listEmbots().some((e) => e.elementIds[0] === 'vm:tiny'), 10_000, 'the embot of tiny');
    const s = await a.control.waitMigration(a.control.migrate('tiny', 'b').id);
    expect(s?.outcome).toBe('completed');
    expect(s!.memoryBytes).toBe(64 * 1024);
    expect(s!.paths).toBe(1);
    expect(s!.plan?.decisions[0]).toMatch(/^primary direct: setup \d+ ms, not measured \(assumed ≥ 1 MB\/s/);
    expect(s!.plan?.decisions.at(-1)).toMatch(/≤ threshold 60000 ms with 1 path/);
    const v = s!.vmSteps!;
    for (const k of ['planMs', 'prepareMs', 'moveMs', 'ackMs'] as const) expect(v[k], k).toBeGreaterThanOrEqual(0);
    const migratingVm = s!.phases.find((p) => p.phase === 'migratingVm')!.ms;
    // Whole-ms phase marks against 0.1 ms steps: the steps fit in the phase up to rounding.
    expect(v.planMs + v.prepareMs + v.moveMs + v.ackMs).toBeLessThanOrEqual(migratingVm + 1);
    await waitFor(() => b.control.listVms().find((x) => x.name === 'tiny' && x.state === 'running'), 10_000, 'tiny running at b');
    expect(b.control.listEmbots().filter((e) => e.elementIds[0] === 'vm:tiny')).toHaveLength(1);
    expect(a.control.listVms().some((x) => x.name === 'tiny')).toBe(false);
  });

  it('a denied migration closes the control link and the data path it dialled early: the target keeps no connection', async () => {
    // Without warm links: a's pool re-dials b as soon as the denied migration's links closed, and
    // those idle links would be counted (the close of the links this migration dialled is the point).
    const { a, b } = await pair(1 << 20, false);
    await a.control.createVm({ name: 'big', memory: 8 << 20 });
    await a.control.vmAction('big', 'start');
    const s = await a.control.waitMigration(a.control.migrate('big', 'b').id);
    expect(s?.outcome).toBe('denied');
    expect(s?.reason).toMatch(/not enough memory/);
    await waitFor(() => peerConnections(b) === 0, 10_000, 'no connection left at b');
    expect(a.control.listVms().map((x) => `${x.name}:${x.state}`)).toEqual(['big:running']);
  });
});
