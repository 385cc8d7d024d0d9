import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { promisify } from 'node:util';
import { mkdtempSync, cpSync, mkdirSync, rmSync } from 'node:fs';
import { afterAll } from 'vitest';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ControlClient } from '../../core/control/client.ts';

export const REPO = resolve(fileURLToPath(new URL('../..', import.meta.url)));
export const BIN = join(REPO, 'bin', 'embot.mjs');
export const FIXTURE_PLUGINS = join(REPO, 'test', 'fixtures', 'plugins');
export const SHIPPED_PLUGINS = join(REPO, 'plugins');

export interface AgentProcessOptions {
  readonly name: string;
  /** Reused across restarts of "the same host". */
  readonly dataDir: string;
  readonly pluginsDir: string;
  readonly extraArgs?: readonly string[];
  readonly env?: Readonly<Record<string, string>>;
}

/**
 * A real agent: `embot agent` as a child process on loopback with its own SQLite file. Starts on
 * a free control port and resolves once the agent prints its ready line (60 s by default: at load 17+ on 2 cores a start took over 20 s; the test's own timeout is the backstop).
 */
export class AgentProcess {
  readonly child: ChildProcess;
  url = '';
  client!: ControlClient;
  stdout = '';
  stderr = '';
  private exited: Promise<number | null>;

  private constructor(readonly opts: AgentProcessOptions) {
    const args = [BIN, 'agent', '--name', opts.name, '--data', opts.dataDir, '--plugins', opts.pluginsDir, '--control', '127.0.0.1:0', '--log-format', 'json', ...(opts.extraArgs ?? [])];
    this.child = spawn(process.execPath, args, { cwd: REPO, env: { ...process.env, ...opts.env }, stdio: ['ignore', 'pipe', 'pipe'] });
    this.child.stdout!.setEncoding('utf8').on('data', (d: string) => (this.stdout += d));
    this.child.stderr!.setEncoding('utf8').on('data', (d: string) => (this.stderr += d));
    this.exited = new Promise((r) => this.child.on('exit', (code) => r(code)));
  }

  static async start(opts: AgentProcessOptions, timeoutMs = 60_000): Promise<AgentProcess> {
    const a = new AgentProcess(opts);
    const started = Date.now();
    for (;;) {
      const m = /ready: control (http:\/\/[^\s,]+)/.exec(a.stdout);
      if (m) {
        a.url = m[1]!;
        a.client = new ControlClient(a.url);
        return a;
      }
      if (a.child.exitCode !== null) throw new Error(`agent ${opts.name} exited with ${a.child.exitCode} before it was ready:\n${a.stderr}`);
      if (Date.now() - started > timeoutMs) {
        a.child.kill('SIGKILL');
        throw new Error(`agent ${opts.name} not ready within ${timeoutMs} ms:\n${a.stderr}`);
      }
      await sleep(25);
    }
  }

  /** SIGKILL: no shutdown code runs, like a power cut of the process. */
  async kill(): Promise<void> {
    this.child.kill('SIGKILL');
    await this.exited;
  }

  /** SIGTERM: orderly shutdown; resolves with the exit code. */
  async stop(): Promise<number | null> {
    if (this.child.exitCode !== null) return this.child.exitCode;
    this.child.kill('SIGTERM');
    return this.exited;
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Polls `check` until it returns a truthy value or the time is up. */
export async function waitFor<T>(check: () => T | Promise<T>, timeoutMs = 10_000, what = 'condition'): Promise<NonNullable<T>> {
  const started = Date.now();
  let last: unknown;
  for (;;) {
    try {
      const v = await check();
      if (v) return v as NonNullable<T>;
      last = v;
    } catch (e) {
      last = e;
    }
    if (Date.now() - started > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; last: ${last instanceof Error ? last.message : JSON.stringify(last)}`);
    await sleep(50);
  }
}

const sandboxes: string[] = [];
// Registered on the test file that imports this harness: its sandboxes go when the file is done,
// after its own afterEach/afterAll hooks have killed the agents that used them.
afterAll(() => {
  for (const root of sandboxes.splice(0)) rmSync(root, { recursive: true, force: true, maxRetries: 3 });
});

/** A temp folder for one test's agents, plus a plugins folder filled with the named fixture/shipped modules; deleted after the test file. */
export function makeSandbox(plugins: readonly { from: 'fixture' | 'shipped'; name: string }[] = []): { root: string; dataDir: (name: string) => string; pluginsDir: string } {
  const root = mkdtempSync(join(tmpdir(), 'embot-test-'));
  sandboxes.push(root);
  const pluginsDir = join(root, 'plugins');
  mkdirSync(pluginsDir, { recursive: true });
  for (const p of plugins) cpSync(join(p.from === 'fixture' ? FIXTURE_PLUGINS : SHIPPED_PLUGINS, p.name), join(pluginsDir, p.name), { recursive: true });
  return { root, dataDir: (name) => join(root, `data-${name}`), pluginsDir };
}

const execFileP = promisify(execFile);

/** Runs the `embot` CLI (bin/embot.mjs) to its end: its exit code and output, whatever the code. */
export async function runCli(args: readonly string[], env: Readonly<Record<string, string>> = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const r = await execFileP(process.execPath, [BIN, ...args], { cwd: REPO, env: { ...process.env, ...env }, timeout: 20_000 });
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (e) {
    const err = e as { code: number; stdout: string; stderr: string };
    return { code: err.code, stdout: err.stdout, stderr: err.stderr };
  }
}
