/**
 * Two full agents in the bench process, each the other's peer, with one shipped module
 * (vm-watchdog: one embot per VM) and quiet sensors, so nothing but the migration runs.
 */
import { randomBytes } from 'node:crypto';
import { cpSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { startAgent, type RunningAgent } from '../core/agent.ts';
import { freeLoopbackPort } from '../core/cli/free-port.ts';
import { loadConfig } from '../core/config/config.ts';
import { createLogger } from '../core/logger.ts';

export interface AgentPair {
  readonly a: RunningAgent;
  readonly b: RunningAgent;
  stop(): Promise<void>;
}

export interface AgentPairOptions {
  readonly driver?: 'sim' | 'qemu';
  /** Protocol timeouts, when the default ones are too short for the VMs moved (TCG guests). */
  readonly mobility?: { readonly stepTimeoutMs?: number; readonly vmTimeoutMs?: number; readonly warmConnections?: boolean };
  /** qemu: keep a spare incoming QEMU (the agents' default, `qemu.spareIncoming`); false for the A/B without it. */
  readonly spareIncoming?: boolean;
}

/** Agents a and b under `root` (data, plugins, QEMU state dirs, the cluster secret). */
export async function startAgentPair(root: string, options: AgentPairOptions = {}): Promise<AgentPair> {
  const plugins = join(root, 'plugins');
  mkdirSync(plugins, { recursive: true });
  cpSync(join(import.meta.dirname, '../plugins/vm-watchdog'), join(plugins, 'vm-watchdog'), { recursive: true });
  const secretFile = join(root, 'cluster.secret');
  writeFileSync(secretFile, randomBytes(32).toString('base64'));
  const ports = { a: await freeLoopbackPort(), b: await freeLoopbackPort() };
  const start = (name: 'a' | 'b'): Promise<RunningAgent> => {
    const other = name === 'a' ? 'b' : 'a';
    const flags = {
      name,
      dataDir: join(root, `data-${name}`),
      pluginsDir: plugins,
      ...(options.driver === 'qemu'
        ? { driver: 'qemu' as const, qemu: { stateDir: join(root, `vms-${name}`), accel: 'tcg' as const, ...(options.spareIncoming === undefined ? {} : { spareIncoming: options.spareIncoming }) } }
        : // Every page written, so a migration moves the VM's bytes (an untouched VM's zero pages go as indexes).
          { sim: { startMemory: 'random' as const } }),
      logLevel: 'error' as const,
      control: { port: 0 },
      peer: { listen: `127.0.0.1:${ports[name]}`, peers: { [other]: `ws://127.0.0.1:${ports[other]}` }, secretFile },
      mobility: { trust: { mode: 'any-authenticated-peer' as const }, ...options.mobility },
      sensors: { host: { intervalMs: 600_000 }, vm: { intervalMs: 600_000 } },
    };
    return startAgent(loadConfig({ env: {}, flags }), createLogger({ level: 'error', name }));
  };
  const a = await start('a');
  let b: RunningAgent;
  try {
    b = await start('b');
  } catch (e) {
    await a.stop();
    throw e;
  }
  return { a, b, stop: async () => void (await Promise.allSettled([a.stop(), b.stop()])) };
}
