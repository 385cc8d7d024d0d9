import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { BIN, REPO } from '../harness/agent-process.ts';

interface Exit {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

/** `embot demo …` as a child process, exactly as `npm run demo` runs it. */
function demo(args: readonly string[], timeoutMs: number): Promise<Exit> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BIN, 'demo', ...args], { cwd: REPO, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`embot demo did not exit within ${timeoutMs} ms:\n${stdout}\n${stderr}`));
    }, timeoutMs);
    child.on('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

const agentPids = (out: string): number[] => [...out.matchAll(/agent [abc] ready \(pid (\d+)\)/g)].map((m) => Number(m[1]));

describe.concurrent('embot demo', () => {
  it('moves a VM from a to b or c by itself, prints the summary and per-agent tables, and leaves nothing running', async () => {
    const r = await demo([], 75_000);
    expect(r.code, `${r.stdout}\n${r.stderr}`).toBe(0);

    const pids = agentPids(r.stdout);
    expect(pids).toHaveLength(3);
    for (const pid of pids) expect(alive(pid), `agent pid ${pid} still running`).toBe(false);
    const workspace = /workspace (\S+)/.exec(r.stdout)?.[1];
    expect(workspace).toBeDefined();
    expect(existsSync(workspace!)).toBe(false);

    // The story, in order: the recommendation, the migration's progress, its completion.
    const recommended = r.stdout.search(/a: MIGRATION_RECOMMENDED vm (web-1|web-2|db-1)/);
    const completed = r.stdout.search(/migration \S+: vm \S+ a → [bc] completed/);
    expect(recommended).toBeGreaterThan(-1);
    expect(completed).toBeGreaterThan(recommended);
    expect(r.stdout).toMatch(/ → [bc] {2}\[\d+\.\ds\] {2}\w+/);

    // The summary names a completed move off a, and the per-agent table shows the VM at its new home.
    const summary = /^migration: +\S+ \(vm (\S+): a → ([bc])\)$/m.exec(r.stdout);
    expect(summary, r.stdout).not.toBeNull();
    const [, vm, to] = summary!;
    expect(r.stdout).toMatch(/^outcome: +completed$/m);
    expect(r.stdout).toMatch(/^embots moved: +[1-9]/m);
    const row = (name: string) => new RegExp(`^${name} +(.*)$`, 'm').exec(r.stdout.slice(r.stdout.indexOf('AGENT  VMS')))?.[1] ?? '';
    expect(row(to!)).toContain(vm!);
    expect(row('a')).not.toContain(vm!);
    expect(r.stdout).toMatch(/demo finished: \S+ moved from a to [bc]/);
  }, 90_000);

  it('exits 1 with a clear message when nothing moves within the time limit, and stops its agents', async () => {
    const r = await demo(['--time-limit', '1', '--json'], 60_000);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/^error: no VM was moved within 1 s: /);
    const report = JSON.parse(r.stdout) as { ok: boolean; error: string; workspace: string; agents: unknown[]; steps: { text: string }[] };
    expect(report).toMatchObject({ ok: false, error: expect.stringContaining('no VM was moved within 1 s') });
    const pids = agentPids(report.steps.map((s) => s.text).join('\n'));
    expect(pids).toHaveLength(3);
    for (const pid of pids) expect(alive(pid), `agent pid ${pid} still running`).toBe(false);
    expect(existsSync(report.workspace)).toBe(false);
  }, 70_000);
});
