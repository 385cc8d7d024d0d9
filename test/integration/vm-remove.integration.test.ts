import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { stringify } from 'yaml';
import { ErrorCodes } from '../../core/errors.ts';
import type { EmbotInfo, RemovedVm } from '../../core/control/control-api.ts';
import { ControlClient } from '../../core/control/client.ts';
import { runningPid } from '../../effectors/hypervisor/qemu/qemu-process.ts';
import { AgentProcess, makeSandbox, runCli, sleep, waitFor } from '../harness/agent-process.ts';
import { Cluster } from '../harness/cluster.ts';
import { counterOf } from '../harness/counter-stream.ts';
import { rejection } from '../harness/expect-code.ts';
import { qemuAgentConfig, qemuProcesses, requireQemu } from '../harness/qemu-processes.ts';

/**
 * `embot vm kill` and `embot vm remove` (README "CLI", "Hypervisor drivers") with real agents on
 * loopback: a running VM is refused without --force, a removed VM leaves no embot, snapshot,
 * queued event, QEMU process or state dir behind, a killed VM is not restarted by the watchdog,
 * and bad input gets a coded error while the agent goes on.
 */

const hasQemu = requireQemu();
const qemus = qemuProcesses();
const agents: AgentProcess[] = [];
let cluster: Cluster | undefined;
afterEach(async () => {
  for (const a of agents.splice(0)) await a.kill().catch(() => {});
  await cluster?.stop();
  cluster = undefined;
  await qemus.killAll();
});

const MiB = 1024 * 1024;
const PLUGINS = [
  { from: 'fixture', name: 'counter' },
  { from: 'shipped', name: 'vm-watchdog' },
] as const;

async function simAgent(): Promise<AgentProcess> {
  const box = makeSandbox(PLUGINS);
  const a = await AgentProcess.start({ name: 's', dataDir: box.dataDir('s'), pluginsDir: box.pluginsDir });
  agents.push(a);
  return a;
}

const embotsOf = (embots: readonly EmbotInfo[], vm: string): string[] =>
  embots.filter((e) => (e.elementIds[0] ?? '') === `vm:${vm}` || (e.elementIds[0] ?? '').startsWith(`vm:${vm}/`)).map((e) => e.id).sort();

const watchdogState = (embots: readonly EmbotInfo[], vm: string): unknown => embots.find((e) => e.id === `vm-watchdog/watchdog/vm:${vm}`)?.policies[0]?.state;

/** Whether `pid` is a live process in /proc (a zombie, state Z, is dead). */
function alive(pid: number): boolean {
  try {
    // "pid (comm) S …": the comm may hold spaces, the state follows its closing parenthesis.
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

async function tick(a: AgentProcess, vm: string, n: number): Promise<void> {
  for (let seq = 0; seq < n; seq++) await a.client.emitEvent({ elementId: `vm:${vm}`, type: 'TICK', payload: { seq } });
  await waitFor(async () => counterOf(await a.client.listEmbots(), vm)?.count === n, 10_000, `${n} ticks counted`);
}

describe('embot vm remove (sim)', () => {
  it('refused while running (API 409 and CLI, naming vm stop / vm kill); after a stop it goes with its embots, their snapshots and its events; the same name is created afresh', { timeout: 120_000 }, async () => {
    const a = await simAgent();
    await a.client.createVm({ name: 'app', memory: MiB });
    await a.client.vmAction('app', 'start');
    await waitFor(async () => embotsOf(await a.client.listEmbots(), 'app').length === 2, 10_000, 'both embots of app');
    await tick(a, 'app', 5);

    const refused = await rejection(a.client.removeVm('app'));
    expect(refused.code).toBe(ErrorCodes.VM_BAD_STATE);
    expect(refused.details).toMatchObject({ status: 409, vm: 'app', state: 'running', problem: 'running' });
    expect(refused.message).toContain('embot vm stop app');
    expect(refused.message).toContain('embot vm kill app');
    const cliRefused = await runCli(['vm', 'remove', 'app', '--agent', a.url]);
    expect(cliRefused.code).toBe(1);
    expect(cliRefused.stderr).toContain(ErrorCodes.VM_BAD_STATE);
    expect(cliRefused.stderr).toContain('--force');
    // Refused, nothing touched.
    expect((await a.client.listVms()).map((v) => [v.name, v.state])).toEqual([['app', 'running']]);
    expect(counterOf(await a.client.listEmbots(), 'app')?.count).toBe(5);

    // A second VM whose management must not be touched by app's removal.
    await a.client.createVm({ name: 'other', memory: MiB });
    await a.client.vmAction('other', 'start');
    await tick(a, 'other', 3);

    await a.client.vmAction('app', 'stop');
    const cli = await runCli(['vm', 'remove', 'app', '--json', '--agent', a.url]);
    expect(cli.stderr).toBe('');
    expect(cli.code).toBe(0);
    const removed = JSON.parse(cli.stdout) as RemovedVm;
    expect(removed).toMatchObject({ name: 'app', removed: true, was: 'stopped', killed: false, embots: 2 });

    expect((await a.client.listVms()).map((v) => v.name)).toEqual(['other']);
    const list = await runCli(['vm', 'list', '--agent', a.url]);
    expect(list.stdout).not.toMatch(/\bapp\b/);
    const embots = await a.client.listEmbots();
    expect(embotsOf(embots, 'app')).toEqual([]);
    expect(counterOf(embots, 'other')?.count).toBe(3);
    expect((await a.client.status()).counts).toMatchObject({ vms: 1, heldEvents: 0 });

    // Re-created with the same name: new embots from their initial state, not the old snapshots.
    await a.client.createVm({ name: 'app', memory: MiB });
    await waitFor(async () => embotsOf(await a.client.listEmbots(), 'app').length === 2, 10_000, 'embots of the new app');
    expect(counterOf(await a.client.listEmbots(), 'app')?.count).toBe(0);
    await a.client.vmAction('app', 'start');
    await tick(a, 'app', 2);
    expect(counterOf(await a.client.listEmbots(), 'other')?.count).toBe(3);
  });

  it('--force kills a running VM first; an unknown VM, a bad force value and an unknown action get coded errors; the agent goes on', { timeout: 120_000 }, async () => {
    const a = await simAgent();
    await a.client.createVm({ name: 'app', memory: MiB });
    await a.client.vmAction('app', 'start');
    await waitFor(async () => embotsOf(await a.client.listEmbots(), 'app').length === 2, 10_000, 'both embots of app');

    const forced = await runCli(['vm', 'remove', 'app', '--force', '--agent', a.url]);
    expect(forced.code).toBe(0);
    expect(forced.stdout).toMatch(/removed vm app \(was running, killed first; 2 embots ended/);
    expect(await a.client.listVms()).toEqual([]);
    expect(embotsOf(await a.client.listEmbots(), 'app')).toEqual([]);

    const unknown = await rejection(a.client.removeVm('nope'));
    expect(unknown.code).toBe(ErrorCodes.VM_UNKNOWN);
    expect(unknown.details).toMatchObject({ status: 404 });
    for (const args of [
      ['vm', 'remove', 'nope'],
      ['vm', 'kill', 'nope'],
    ]) {
      const r = await runCli([...args, '--agent', a.url]);
      expect(r.code, args.join(' ')).toBe(1);
      expect(r.stderr).toContain(ErrorCodes.VM_UNKNOWN);
    }
    const usage = await runCli(['vm', 'remove', '--agent', a.url]);
    expect(usage.code).toBe(2);
    expect(usage.stderr).toMatch(/missing required argument 'name'/);

    await a.client.createVm({ name: 'app', memory: MiB });
    const raw = async (method: string, path: string): Promise<{ status: number; code: string | undefined }> => {
      const res = await fetch(a.url + path, { method, ...(method === 'GET' ? {} : { headers: { 'Content-Type': 'application/json' }, body: '{}' }) });
      const body = (await res.json()) as { error?: { code: string } };
      return { status: res.status, code: body.error?.code };
    };
    expect(await raw('DELETE', '/v1/vms/app?force=yes')).toEqual({ status: 400, code: ErrorCodes.CONTROL_BAD_REQUEST });
    // Not JSON-typed (what a cross-site form could send): refused like every other change.
    expect((await fetch(`${a.url}/v1/vms/app`, { method: 'DELETE' })).status).toBe(400);
    expect(await raw('POST', '/v1/vms/app/explode')).toEqual({ status: 404, code: ErrorCodes.CONTROL_NOT_FOUND });
    expect(await raw('POST', '/v1/vms/app')).toEqual({ status: 405, code: ErrorCodes.CONTROL_BAD_REQUEST });
    expect(await raw('GET', '/v1/vms/app/kill')).toEqual({ status: 405, code: ErrorCodes.CONTROL_BAD_REQUEST });
    // Kill of a VM that does not run: the driver's coded refusal.
    expect((await rejection(a.client.vmAction('app', 'kill'))).code).toBe(ErrorCodes.VM_BAD_STATE);
    // Nothing lost: the VM and its embots are there, and the agent serves.
    expect((await a.client.listVms()).map((v) => [v.name, v.state])).toEqual([['app', 'created']]);
    await waitFor(async () => embotsOf(await a.client.listEmbots(), 'app').length === 2, 10_000, 'embots of app');
    expect((await raw('DELETE', '/v1/vms/app')).status).toBe(200);
  });

  it('the control token holds for kill and remove: without it 401 and nothing changes; with it (API and CLI --token) they run', { timeout: 120_000 }, async () => {
    const box = makeSandbox();
    const token = 'vm-remove-test-token';
    const a = await AgentProcess.start({ name: 't', dataDir: box.dataDir('t'), pluginsDir: box.pluginsDir, env: { EMBOT_CONTROL_TOKEN: token } });
    agents.push(a);
    const client = new ControlClient(a.url, token);
    await client.createVm({ name: 'app', memory: MiB });
    await client.vmAction('app', 'start');
    // One at a time: both made at once, the second's refusal could come before anything awaited it (an unhandled rejection).
    for (const call of [() => a.client.vmAction('app', 'kill'), () => a.client.removeVm('app', { force: true })]) {
      const e = await rejection(call());
      expect(e.code).toBe(ErrorCodes.CONTROL_UNAUTHORIZED);
      expect(e.details).toMatchObject({ status: 401 });
    }
    const cliNoToken = await runCli(['vm', 'remove', 'app', '--force', '--agent', a.url], { EMBOT_CONTROL_TOKEN: '' });
    expect(cliNoToken.code).toBe(1);
    expect(cliNoToken.stderr).toContain(ErrorCodes.CONTROL_UNAUTHORIZED);
    expect((await client.listVms()).map((v) => [v.name, v.state])).toEqual([['app', 'running']]);
    expect((await client.vmAction('app', 'kill')).state).toBe('stopped');
    const cli = await runCli(['vm', 'remove', 'app', '--token', token, '--agent', a.url]);
    expect(cli.code).toBe(0);
    expect(await client.listVms()).toEqual([]);
  });

  it('vm kill: stopped with reason kill, and the watchdog leaves it stopped (a crash it restarts)', { timeout: 120_000 }, async () => {
    const a = await simAgent();
    await a.client.createVm({ name: 'app', memory: MiB });
    await a.client.vmAction('app', 'start');
    await waitFor(async () => watchdogState(await a.client.listEmbots(), 'app'), 10_000, 'watchdog of app');

    // The watchdog is live: a crash is restarted.
    await a.client.vmAction('app', 'crash');
    await waitFor(async () => (await a.client.listVms())[0]?.state === 'running', 10_000, 'the watchdog restarting a crash');

    const cli = await runCli(['vm', 'kill', 'app', '--json', '--agent', a.url]);
    expect(cli.code).toBe(0);
    expect(JSON.parse(cli.stdout)).toMatchObject({ name: 'app', state: 'stopped' });
    await waitFor(async () => watchdogState(await a.client.listEmbots(), 'app') === 'stoppedByOperator', 10_000, 'the watchdog seeing the kill as a stop');
    const stopped = (await a.client.listEvents({ limit: 50 })).filter((e) => e.type === 'VM_STOPPED' && e.elementId === 'vm:app');
    expect(stopped.map((e) => (e.payload as { reason: string }).reason)).toEqual(['kill']);
    // Give a wrong restart time to happen (the one a crash got came at once).
    await sleep(1500);
    expect((await a.client.listVms())[0]?.state).toBe('stopped');
  });

  it('refused during a pre-warm (VM_BAD_STATE, problem migrating, also with --force); once cancelled, removed', { timeout: 120_000 }, async () => {
    cluster = await Cluster.start(['a', 'b'], {
      plugins: [{ from: 'fixture', name: 'counter' }],
      config: () => ({ mobility: { stepTimeoutMs: 5000, vmTimeoutMs: 60_000, forwardGraceMs: 5000, trust: { mode: 'any-authenticated-peer' } } }),
    });
    const a = cluster.agent('a');
    await a.client.createVm({ name: 'app', memory: 4 * MiB, dirtyRate: MiB });
    await a.client.vmAction('app', 'start');
    await waitFor(async () => counterOf(await a.client.listEmbots(), 'app'), 10_000, 'counter of app');
    const { id } = await a.client.prewarm('app', ['b']);
    for (const force of [false, true]) {
      const e = await rejection(a.client.removeVm('app', { force }));
      expect(e.code, `force ${force}`).toBe(ErrorCodes.VM_BAD_STATE);
      expect(e.details).toMatchObject({ status: 409, vm: 'app', problem: 'migrating', migration: id, role: 'source' });
      expect(e.message).toMatch(/pre-warming/);
    }
    const cli = await runCli(['vm', 'remove', 'app', '--force', '--agent', a.url]);
    expect(cli.code).toBe(1);
    expect(cli.stderr).toContain(ErrorCodes.VM_BAD_STATE);
    expect((await a.client.listVms()).map((v) => [v.name, v.state])).toEqual([['app', 'running']]);
    // At the destination the warm copy is no VM of its own to remove.
    const atB = await rejection(cluster.agent('b').client.removeVm('app', { force: true }));
    expect(atB.code).toBe(ErrorCodes.VM_UNKNOWN);
    expect(await cluster.agent('b').client.listVms()).toEqual([]);
    // …and the pre-warm goes on untouched.
    expect((await a.client.listMigrations()).find((m) => m.id === id)?.outcome).toBeNull();

    await a.client.cancelPrewarm('app');
    await waitFor(async () => (await a.client.listMigrations()).every((m) => m.outcome !== null), 20_000, 'the pre-warm ended');
    const r = await a.client.removeVm('app', { force: true });
    expect(r).toMatchObject({ removed: true, killed: true, embots: 1 });
    expect(await a.client.listVms()).toEqual([]);
    expect(await cluster.agent('b').client.listVms()).toEqual([]);
  });
});

describe.skipIf(!hasQemu)('embot vm kill / remove (qemu)', () => {
  it('kill: stopped, reason kill, no QEMU left, not restarted by the watchdog; remove --force: no process in /proc, no state dir', { timeout: 180_000 }, async () => {
    const box = makeSandbox([{ from: 'shipped', name: 'vm-watchdog' }]);
    const root = qemus.root();
    const configFile = join(box.root, 'q.yaml');
    writeFileSync(configFile, stringify(qemuAgentConfig(root, 'q')));
    const a = await AgentProcess.start({ name: 'q', dataDir: box.dataDir('q'), pluginsDir: box.pluginsDir, extraArgs: ['--config', configFile] });
    agents.push(a);
    const stateDir = join(root, 'q', 'g');
    await a.client.createVm({ name: 'g', memory: 32 * MiB });
    await a.client.vmAction('g', 'start');
    await waitFor(async () => watchdogState(await a.client.listEmbots(), 'g'), 20_000, 'watchdog of g');
    const pid = runningPid(stateDir);
    expect(pid).toBeGreaterThan(0);

    expect((await a.client.vmAction('g', 'kill')).state).toBe('stopped');
    expect(alive(pid!)).toBe(false);
    await waitFor(async () => watchdogState(await a.client.listEmbots(), 'g') === 'stoppedByOperator', 20_000, 'the watchdog seeing the kill as a stop');
    const stopped = (await a.client.listEvents({ limit: 50 })).filter((e) => e.type === 'VM_STOPPED' && e.elementId === 'vm:g');
    expect(stopped.map((e) => (e.payload as { reason: string }).reason)).toEqual(['kill']);
    await sleep(1500);
    expect((await a.client.listVms()).map((v) => [v.name, v.state])).toEqual([['g', 'stopped']]);
    expect(qemus.live()).toEqual([]);

    // Running again, then removed with --force.
    await a.client.vmAction('g', 'start');
    const pid2 = runningPid(stateDir);
    expect(pid2).toBeGreaterThan(0);
    expect((await rejection(a.client.removeVm('g'))).code).toBe(ErrorCodes.VM_BAD_STATE);
    expect(runningPid(stateDir)).toBe(pid2);
    const cli = await runCli(['vm', 'remove', 'g', '--force', '--json', '--agent', a.url]);
    expect(cli.code).toBe(0);
    expect(JSON.parse(cli.stdout)).toMatchObject({ name: 'g', removed: true, was: 'running', killed: true, embots: 1 });
    expect(alive(pid2!)).toBe(false);
    expect(existsSync(stateDir)).toBe(false);
    expect(qemus.live()).toEqual([]);
    expect(await a.client.listVms()).toEqual([]);
    expect(embotsOf(await a.client.listEmbots(), 'g')).toEqual([]);

    // The README's way: vm stop, then vm remove (no --force) of the stopped VM.
    const hDir = join(root, 'q', 'h');
    await a.client.createVm({ name: 'h', memory: 32 * MiB });
    await a.client.vmAction('h', 'start');
    expect(runningPid(hDir)).toBeGreaterThan(0);
    await a.client.vmAction('h', 'stop');
    expect(existsSync(hDir)).toBe(true);
    expect(await a.client.removeVm('h')).toMatchObject({ name: 'h', was: 'stopped', killed: false, embots: 1 });
    expect(existsSync(hDir)).toBe(false);
    expect(qemus.live()).toEqual([]);
    expect(await a.client.listVms()).toEqual([]);
    expect((await a.client.status()).driver).toBe('qemu');
  });
});
