import { cpSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { freeLoopbackPort } from '../../core/cli/free-port.ts';
import { AgentProcess, FIXTURE_PLUGINS, SHIPPED_PLUGINS, waitFor } from './agent-process.ts';
import type { MigrationInfo } from '../../core/mobility/migration-record.ts';
import { makeTlsFixture, type TlsFixture } from './cluster-tls.ts';

export interface PluginRef {
  readonly from: 'fixture' | 'shipped';
  readonly name: string;
}

export interface ClusterOptions {
  /** Modules in every agent's plugins folder. */
  readonly plugins?: readonly PluginRef[];
  /** Modules only some agents have (by agent name), on top of `plugins`. */
  readonly pluginsOf?: Readonly<Record<string, readonly PluginRef[]>>;
  /** Extra config per agent (merged over the generated one). */
  readonly config?: (name: string) => Record<string, unknown>;
  readonly env?: (name: string) => Record<string, string>;
  /**
   * Peer links over mutual TLS: a cluster CA in the cluster's folder, a certificate per agent,
   * wss:// peer URLs. The cluster secret stays as a second factor unless `secret` is false.
   */
  readonly tls?: { readonly secret?: boolean };
}

/** A free port on 127.0.0.1 for an agent to listen on later (see core/cli/free-port.ts). */
export const freePort = (): Promise<number> => freeLoopbackPort();

/**
 * N real agents as child processes on loopback, each with its own SQLite file and plugins
 * folder, peers of each other with one cluster secret.
 */
export class Cluster {
  readonly agents = new Map<string, AgentProcess>();
  readonly root: string;
  readonly secretFile: string;
  /** The cluster CA and its certificates (with the `tls` option). */
  tls: TlsFixture | undefined;
  private readonly ports = new Map<string, number>();

  private constructor(readonly names: readonly string[], private readonly opts: ClusterOptions) {
    this.root = mkdtempSync(join(tmpdir(), 'embot-cluster-'));
    this.secretFile = join(this.root, 'cluster.secret');
    writeFileSync(this.secretFile, randomBytes(32).toString('base64'));
  }

  static async start(names: readonly string[], opts: ClusterOptions = {}): Promise<Cluster> {
    const c = new Cluster(names, opts);
    if (opts.tls) c.tls = await makeTlsFixture(join(c.root, 'tls'), names);
    for (const n of names) c.ports.set(n, await freePort());
    for (const n of names) {
      const dir = c.pluginsDir(n);
      mkdirSync(dir, { recursive: true });
      for (const p of [...(opts.plugins ?? []), ...(opts.pluginsOf?.[n] ?? [])]) cpSync(join(p.from === 'fixture' ? FIXTURE_PLUGINS : SHIPPED_PLUGINS, p.name), join(dir, p.name), { recursive: true });
    }
    // An agent that refuses to start (a bad config under test) must not leave the others or the folder behind.
    const started = await Promise.allSettled(names.map((n) => c.startAgent(n)));
    const failed = started.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) {
      await c.stop();
      throw failed.reason;
    }
    return c;
  }

  pluginsDir(name: string): string {
    return join(this.root, `plugins-${name}`);
  }

  dataDir(name: string): string {
    return join(this.root, `data-${name}`);
  }

  agent(name: string): AgentProcess {
    const a = this.agents.get(name);
    if (!a) throw new Error(`agent ${name} is not running`);
    return a;
  }

  /** (Re)starts agent `name` on its data folder; `env` adds variables (e.g. a fault point). */
  async startAgent(name: string, env: Record<string, string> = {}): Promise<AgentProcess> {
    const scheme = this.tls ? 'wss' : 'ws';
    const peers = Object.fromEntries(this.names.filter((n) => n !== name).map((n) => [n, `${scheme}://127.0.0.1:${this.ports.get(n)}`]));
    const secret = this.opts.tls?.secret === false ? {} : { secretFile: this.secretFile };
    const extra = this.opts.config?.(name) ?? {};
    // An extra `peer` section adds to the generated one (listen, peers, secret) rather than replacing it.
    const peer = { listen: `127.0.0.1:${this.ports.get(name)}`, peers, ...secret, ...(this.tls ? { tls: this.tls.files(name) } : {}), ...(extra['peer'] as Record<string, unknown> | undefined) };
    const config = {
      mobility: { stepTimeoutMs: 3000, vmTimeoutMs: 10_000, forwardGraceMs: 5000, trust: { mode: 'any-authenticated-peer' } },
      sensors: { host: { intervalMs: 60_000 }, vm: { intervalMs: 60_000 } },
      // Sim VMs whose every page is written, so a copy moves the VM's size (with the default, a fresh
      // VM's zero pages go as indexes and a copy is over before a test can act inside it).
      sim: { startMemory: 'random' },
      ...extra,
      peer,
    };
    const file = join(this.root, `config-${name}.json`);
    writeFileSync(file, JSON.stringify(config, null, 2));
    const a = await AgentProcess.start({ name, dataDir: this.dataDir(name), pluginsDir: this.pluginsDir(name), extraArgs: ['--config', file], env: { ...(this.opts.env?.(name) ?? {}), ...env } });
    this.agents.set(name, a);
    return a;
  }

  /** SIGKILL agent `name`. */
  async kill(name: string): Promise<void> {
    await this.agents.get(name)?.kill();
    this.agents.delete(name);
  }

  /** Waits until no agent of the cluster lists a migration without an outcome (after a restart, recovery settled every one). */
  async untilMigrationsSettled(timeoutMs: number, what = 'every migration settled after the restart'): Promise<void> {
    await waitFor(async () => {
      for (const n of this.names) if ((await this.agent(n).client.listMigrations()).some((m) => m.outcome === null)) return undefined;
      return true;
    }, timeoutMs, what);
  }

  /** The peer port agent `name` listens on. */
  port(name: string): number {
    const p = this.ports.get(name);
    if (p === undefined) throw new Error(`no agent ${name} in this cluster`);
    return p;
  }

  /** Kills every agent and deletes the cluster's folder (data, plugins, secret, TLS files). */
  async stop(): Promise<void> {
    await Promise.all([...this.agents.values()].map((a) => a.kill().catch(() => {})));
    this.agents.clear();
    rmSync(this.root, { recursive: true, force: true });
  }
}

/** Migrates `vm` from agent `a` to peer `to` through the control API and waits for the outcome. */
export async function migrate(a: AgentProcess, vm: string, to: string, options: { readonly thresholdMs?: number; readonly timeoutMs?: number } = {}): Promise<MigrationInfo> {
  const { id } = await a.client.migrate(vm, to, options.thresholdMs === undefined ? {} : { thresholdMs: options.thresholdMs });
  return a.client.waitMigration(id, { timeoutMs: options.timeoutMs ?? 60_000 });
}
