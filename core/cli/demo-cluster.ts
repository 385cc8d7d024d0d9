import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, cpSync, mkdirSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { freeLoopbackPort } from './free-port.ts';
import { ControlError, ErrorCodes } from '../errors.ts';
import { ControlClient } from '../control/client.ts';

const BIN = fileURLToPath(new URL('../../bin/embot.mjs', import.meta.url));
/** The modules shipped with the project (`plugins/` at the repository root). */
export const SHIPPED_PLUGINS_DIR = fileURLToPath(new URL('../../plugins/', import.meta.url));
/** Whatever happens, the demo listens on loopback only. */
const LOOPBACK = '127.0.0.1';

/** One agent of the demo cluster, running as a child process. */
export interface DemoAgent {
  readonly name: string;
  readonly pid: number;
  readonly controlUrl: string;
  readonly peerUrl: string;
  readonly client: ControlClient;
  /** The agent's log (its stderr). */
  readonly logFile: string;
}

export interface DemoClusterOptions {
  /** Agent names; each gets the others as peers. */
  readonly names: readonly string[];
  /** Folder for configs, data, plugins and logs (the caller creates and removes it). */
  readonly root: string;
  /** Module folders (under `plugins/`) copied into every agent's plugins folder. */
  readonly plugins: readonly string[];
  /** Config merged into each agent's generated one (modules, sensors, …). */
  readonly config: (name: string) => Readonly<Record<string, unknown>>;
  /** Longest wait for an agent's ready line. */
  readonly readyTimeoutMs?: number;
  /** Stops waiting for ready lines when it aborts. */
  readonly signal?: AbortSignal;
}

/**
 * A cluster of real agents (`embot agent --config …`) on loopback: one cluster secret, every
 * agent a peer of every other, each with its own data, plugins folder and log file. Children
 * run in their own process group, so a terminal's Ctrl-C reaches the demo only and the demo
 * stops them in order; if the demo process exits anyway, they are killed with it.
 *
 * @example
 * ```ts
 * const cluster = await DemoCluster.start({ names: ['a', 'b'], root, plugins: ['host-load'], config: () => ({}) });
 * await cluster.agent('a').client.status();
 * await cluster.stop();
 * ```
 */
export class DemoCluster {
  private readonly children = new Map<string, ChildProcess>();
  private readonly exits = new Map<string, Promise<void>>();
  readonly agents = new Map<string, DemoAgent>();
  private readonly killOnExit = (): void => {
    for (const c of this.children.values()) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  };

  private constructor(private readonly opts: DemoClusterOptions) {
    process.on('exit', this.killOnExit);
  }

  static async start(opts: DemoClusterOptions): Promise<DemoCluster> {
    const cluster = new DemoCluster(opts);
    try {
      await cluster.launch();
    } catch (e) {
      await cluster.stop();
      throw e;
    }
    return cluster;
  }

  agent(name: string): DemoAgent {
    const a = this.agents.get(name);
    if (!a) throw new ControlError(ErrorCodes.CLI_USAGE, `no demo agent named ${name}`);
    return a;
  }

  /** Pids of agents that have not exited yet. */
  running(): number[] {
    return [...this.children.values()].filter((c) => c.exitCode === null && c.signalCode === null && c.pid !== undefined).map((c) => c.pid!);
  }

  /** SIGTERM to every agent (an orderly stop), SIGKILL to any still running after `graceMs`. */
  async stop(graceMs = 10_000): Promise<void> {
    await Promise.all(
      [...this.children.entries()].map(async ([name, child]) => {
        const exited = this.exits.get(name)!;
        if (child.exitCode !== null || child.signalCode !== null) return;
        child.kill('SIGTERM');
        let timer: NodeJS.Timeout | undefined;
        const late = new Promise<'late'>((r) => (timer = setTimeout(() => r('late'), graceMs)));
        if ((await Promise.race([exited, late])) === 'late') {
          child.kill('SIGKILL');
          await exited;
        }
        clearTimeout(timer);
      }),
    );
    process.off('exit', this.killOnExit);
  }

  private async launch(): Promise<void> {
    const { names, root, plugins } = this.opts;
    const secretFile = join(root, 'cluster.secret');
    writeFileSync(secretFile, `${randomBytes(32).toString('base64')}\n`, { mode: 0o600 });
    const ports = new Map<string, number>();
    for (const n of names) ports.set(n, await freeLoopbackPort());
    await Promise.all(
      names.map((name) => {
        const dir = join(root, name);
        const pluginsDir = join(dir, 'plugins');
        mkdirSync(pluginsDir, { recursive: true });
        for (const p of plugins) cpSync(join(SHIPPED_PLUGINS_DIR, p), join(pluginsDir, p), { recursive: true });
        const config = {
          name,
          dataDir: join(dir, 'data'),
          pluginsDir,
          control: { host: LOOPBACK, port: 0 },
          logFormat: 'json',
          peer: {
            listen: `${LOOPBACK}:${ports.get(name)}`,
            peers: Object.fromEntries(names.filter((n) => n !== name).map((n) => [n, `ws://${LOOPBACK}:${ports.get(n)}`])),
            secretFile,
          },
          ...this.opts.config(name),
        };
        const file = join(dir, 'config.json');
        writeFileSync(file, `${JSON.stringify(config, null, 2)}\n`);
        return this.spawnAgent(name, file, join(dir, 'agent.log'));
      }),
    );
  }

  private async spawnAgent(name: string, configFile: string, logFile: string): Promise<void> {
    const log = openSync(logFile, 'a');
    let child: ChildProcess;
    try {
      child = spawn(process.execPath, [BIN, 'agent', '--config', configFile], { stdio: ['ignore', 'pipe', log], detached: true, env: { ...process.env, EMBOT_CONTROL_TOKEN: '' } });
    } finally {
      closeSync(log); // the child holds its own descriptor
    }
    this.children.set(name, child);
    this.exits.set(name, new Promise((resolve) => child.once('exit', () => resolve())));
    const spawnError = new Promise<Error>((resolve) => child.once('error', resolve));
    let stdout = '';
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));

    const timeoutMs = this.opts.readyTimeoutMs ?? 30_000;
    const started = Date.now();
    for (;;) {
      const m = /ready: control (http:\/\/[^\s,]+)(?:, peer (ws:\/\/[^\s,]+))?/.exec(stdout);
      if (m) {
        this.agents.set(name, { name, pid: child.pid!, controlUrl: m[1]!, peerUrl: m[2] ?? '', client: new ControlClient(m[1]!), logFile });
        return;
      }
      const failure = await Promise.race([spawnError, new Promise<undefined>((r) => setTimeout(() => r(undefined), 25))]);
      if (failure) throw new ControlError(ErrorCodes.CONTROL_UNREACHABLE, `agent ${name} could not be started: ${failure.message}`);
      if (child.exitCode !== null || child.signalCode !== null) {
        throw new ControlError(ErrorCodes.CONTROL_UNREACHABLE, `agent ${name} exited (${child.exitCode ?? child.signalCode}) before it was ready; its log:\n${tail(logFile)}`);
      }
      if (this.opts.signal?.aborted) throw new ControlError(ErrorCodes.CONTROL_UNREACHABLE, `interrupted while agent ${name} was starting`);
      if (Date.now() - started > timeoutMs) throw new ControlError(ErrorCodes.CONTROL_UNREACHABLE, `agent ${name} was not ready within ${timeoutMs} ms; its log:\n${tail(logFile)}`);
    }
  }
}

/** The last lines of a log file, for error messages. */
export function tail(file: string, lines = 15): string {
  try {
    return readFileSync(file, 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
  } catch {
    return '(no log)';
  }
}
