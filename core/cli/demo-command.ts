import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Command } from 'commander';
import { describeError } from '../errors.ts';
import type { EmbotEvent, EmbotInfo, MigrationInfo, VmInfo } from '../control/control-api.ts';
import type { CliContext } from './context.ts';
import { DemoCluster, tail, type DemoAgent } from './demo-cluster.ts';
import { formatBytes, formatTable, formatValue } from './format.ts';
import { progressLine, renderMigrationSummary } from './migrate-commands.ts';
import { parsePositiveInt } from './parse.ts';

interface DemoFlags {
  readonly keep?: boolean;
  readonly json?: boolean;
  /** Seconds. */
  readonly timeLimit: number;
}

/** The cluster the demo builds. `a` gets the VMs and the load; `b` and `c` are where they can go. */
export const DEMO_AGENTS = ['a', 'b', 'c'] as const;
const SOURCE = 'a';
/** Loads chosen so that a's host load (sum / CPUs) is above the threshold, and below it once the busiest VM left. */
export const DEMO_VMS: readonly { readonly name: string; readonly load: number }[] = [
  { name: 'web-1', load: 0.9 },
  { name: 'web-2', load: 0.6 },
  { name: 'db-1', load: 0.3 },
];
const HOST_CPUS = 2;
const VM_MEMORY = 4 * 1024 * 1024;
const VM_DIRTY_RATE = 256 * 1024;
const SENSOR_INTERVAL_MS = 250;
const HOST_LOAD = { threshold: 0.8, durationMs: 2000, cooldownMs: 60_000 } as const;
const POLL_MS = 150;
/** While a migration runs or is imminent (progress only). */
const PROGRESS_POLL_MS = 15;
/** After the move: how long to wait for the balancer to settle and a's load to drop, for the narration. */
const SETTLE_MS = 4000;
export const DEMO_PLUGINS = ['host-load', 'vm-watchdog', 'load-balancer'] as const;

/** Exit code after Ctrl-C, as shells report a SIGINT death. */
const EXIT_INTERRUPTED = 130;

/**
 * `embot demo [--keep] [--json] [--time-limit S]`: three agents on loopback, sim VMs on `a`, the
 * host-load policy recommends a move and the load-balancer policy carries it out; the demo
 * narrates it, prints the migration summary and a table per agent, stops the agents and removes
 * its temp folder. `setExitCode` gets 0 when a VM moved, 1 when nothing moved in time, 130 on Ctrl-C.
 *
 * @example
 * ```ts
 * registerDemoCommand(program, ctx, (code) => (exitCode = code));
 * ```
 */
export function registerDemoCommand(program: Command, ctx: CliContext, setExitCode: (code: number) => void): void {
  program
    .command('demo')
    .description('three agents on loopback: a loaded host, a policy that moves a VM away, a summary at the end (exits by itself)')
    .option('--keep', 'keep the temp folder (configs, data, agent logs) instead of removing it')
    .option('--json', 'print one JSON report at the end instead of the narration')
    .option('--time-limit <seconds>', 'give up when no VM moved within this time', parsePositiveInt, 60)
    .action(async (opts: DemoFlags) => {
      setExitCode(await runDemo(opts, ctx));
    });
}

/** One narrated step; `atMs` counts from the start of the demo. */
export interface DemoStep {
  readonly atMs: number;
  readonly text: string;
}

/** One agent at the end of the demo. */
export interface DemoAgentReport {
  readonly name: string;
  readonly pid: number;
  readonly controlUrl: string;
  readonly peerUrl: string;
  readonly vms: readonly VmInfo[];
  readonly embots: readonly { readonly id: string; readonly type: string; readonly elementIds: readonly string[]; readonly status: string }[];
  /** Last HOST_LOAD reading. */
  readonly hostLoad: number | null;
}

/** What `embot demo --json` prints. */
export interface DemoReport {
  readonly ok: boolean;
  readonly error?: string;
  readonly workspace: string;
  readonly kept: boolean;
  readonly recommendation: EmbotEvent | null;
  readonly migration: MigrationInfo | null;
  readonly agents: readonly DemoAgentReport[];
  readonly steps: readonly DemoStep[];
}

class Narrator {
  readonly steps: DemoStep[] = [];
  private readonly started = Date.now();
  constructor(private readonly ctx: CliContext, private readonly quiet: boolean) {}

  say(text: string): void {
    const atMs = Date.now() - this.started;
    this.steps.push({ atMs, text });
    if (!this.quiet) this.ctx.out(`[${(atMs / 1000).toFixed(1).padStart(5)}s] ${text}`);
  }

  print(text: string): void {
    if (!this.quiet) this.ctx.out(text);
  }
}

/** How the demo ended. */
type DemoOutcome =
  | { readonly kind: 'moved'; readonly recommendation: EmbotEvent | null; readonly migration: MigrationInfo; readonly agents: readonly DemoAgentReport[] }
  | { readonly kind: 'time-limit'; readonly message: string }
  | { readonly kind: 'interrupted' }
  | { readonly kind: 'failed'; readonly error: unknown };

const INTERRUPTED: DemoOutcome = { kind: 'interrupted' };

async function runDemo(opts: DemoFlags, ctx: CliContext): Promise<number> {
  const say = new Narrator(ctx, opts.json === true);
  const stop = new AbortController();
  const onSignal = (): void => stop.abort();
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  ctx.io.signal?.addEventListener('abort', onSignal, { once: true });
  if (ctx.io.signal?.aborted) stop.abort();

  const root = mkdtempSync(join(tmpdir(), 'embot-demo-'));
  let cluster: DemoCluster | undefined;
  let outcome: DemoOutcome;
  say.print('embot demo: three agents on loopback; host-load recommends moving a VM off the loaded host, load-balancer moves it with its management');
  say.say(`workspace ${root}${opts.keep ? ' (kept)' : ' (removed at the end; --keep keeps it)'}`);
  try {
    cluster = await DemoCluster.start({ names: DEMO_AGENTS, root, plugins: DEMO_PLUGINS, config: agentConfig, signal: stop.signal });
    for (const name of DEMO_AGENTS) {
      const a = cluster.agent(name);
      say.say(`agent ${a.name} ready (pid ${a.pid}): control ${a.controlUrl}, peer ${a.peerUrl}`);
    }
    outcome = await play(cluster, say, stop.signal, opts.timeLimit * 1000);
  } catch (e) {
    outcome = stop.signal.aborted ? INTERRUPTED : { kind: 'failed', error: e };
  }

  if (cluster) {
    say.say('stopping the agents');
    await cluster.stop();
    const left = cluster.running();
    say.say(left.length === 0 ? 'agents stopped' : `agents still running: pids ${left.join(', ')}`);
  }
  const logs = `agent logs: ${DEMO_AGENTS.map((n) => join(root, n, 'agent.log')).join(', ')}`;
  const failureLog =
    outcome.kind === 'moved' ? '' : `\nlast lines of agent ${SOURCE}'s log${opts.keep ? '' : ' (run with --keep to keep every agent log)'}:\n${tail(join(root, SOURCE, 'agent.log'), 8)}`;
  if (opts.keep) say.say(`kept ${root} (${logs})`);
  else rmSync(root, { recursive: true, force: true });
  process.off('SIGINT', onSignal);
  process.off('SIGTERM', onSignal);
  ctx.io.signal?.removeEventListener('abort', onSignal);

  const moved = outcome.kind === 'moved' ? outcome : undefined;
  const error =
    outcome.kind === 'moved' ? undefined : outcome.kind === 'time-limit' ? outcome.message : outcome.kind === 'interrupted' ? 'interrupted' : `the demo failed: ${describeError(outcome.error)}`;
  if (opts.json) {
    const report: DemoReport = {
      ok: moved !== undefined,
      ...(error === undefined ? {} : { error }),
      workspace: root,
      kept: opts.keep === true,
      recommendation: moved?.recommendation ?? null,
      migration: moved?.migration ?? null,
      agents: moved?.agents ?? [],
      steps: say.steps,
    };
    ctx.json(report);
  }
  if (moved) {
    const m = moved.migration;
    say.print(`demo finished: ${m.vm} moved from ${m.summary?.from ?? SOURCE} to ${m.summary?.to ?? m.peer} with its management`);
    return 0;
  }
  if (outcome.kind === 'interrupted') {
    ctx.io.stderr.write('error: interrupted; agents stopped\n');
    return EXIT_INTERRUPTED;
  }
  ctx.io.stderr.write(`error: ${error}${failureLog}\n`);
  return 1;
}

/** The same for every agent: only `a` gets load, so only `a` recommends a move. */
function agentConfig(): Record<string, unknown> {
  return {
    logLevel: 'info',
    sensors: { host: { intervalMs: SENSOR_INTERVAL_MS, source: 'sim' }, vm: { intervalMs: SENSOR_INTERVAL_MS } },
    sim: { hostCpus: HOST_CPUS },
    mobility: { stepTimeoutMs: 5000, vmTimeoutMs: 20_000 },
    modules: { 'host-load': { ...HOST_LOAD }, 'load-balancer': { cooldownMs: 30_000 } },
  };
}

/** Follows agent a through events, embot states and migrations, narrating each change once. */
class Watcher {
  private readonly seen = new Set<string>();
  private loadBand: 'above' | 'below' | undefined;
  private readonly policyStates = new Map<string, string>();
  private readonly migrations = new Map<string, { phase: string; percent: number; ended: boolean }>();
  recommendation: EmbotEvent | null = null;
  completed: MigrationInfo | undefined;
  lastLoad: number | undefined;
  balancerState: string | undefined;
  hostLoadState: string | undefined;
  readonly failures: string[] = [];

  constructor(private readonly a: DemoAgent, private readonly say: Narrator) {}

  /**
   * A migration runs, or is about to (host-load is counting down, the balancer is moving a VM):
   * a sim VM of a few MiB moves in a few hundred milliseconds, so its phases need quick polls.
   */
  get expectingMigration(): boolean {
    return this.hostLoadState === 'elevated' || this.balancerState === 'migrating' || [...this.migrations.values()].some((m) => !m.ended);
  }

  /**
   * Reads a's migrations and, when `full` or when a new migration appeared, its events and
   * embot states first, so the recommendation is told before the move it caused.
   */
  async tick(full: boolean): Promise<void> {
    const migrations = (await this.a.client.listMigrations()).filter((m) => m.role === 'source');
    if (full || migrations.some((m) => !this.migrations.has(m.id))) {
      const [events, embots] = await Promise.all([this.a.client.listEvents({ limit: 500 }), this.a.client.listEmbots()]);
      for (const e of events) {
        if (this.seen.has(e.id)) continue;
        this.seen.add(e.id);
        this.onEvent(e);
      }
      for (const e of embots) this.onEmbot(e);
    }
    for (const m of migrations) this.onMigration(m);
  }

  private onEvent(e: EmbotEvent): void {
    const p = (e.payload ?? {}) as Record<string, unknown>;
    if (e.type === 'HOST_LOAD' && e.elementId === `host:${this.a.name}` && typeof p['load'] === 'number') {
      const load = p['load'];
      this.lastLoad = load;
      const band = load > HOST_LOAD.threshold ? 'above' : 'below';
      if (band === this.loadBand) return;
      this.loadBand = band;
      const top = Array.isArray(p['topVms']) ? (p['topVms'] as { name: string; load: number }[]).map((v) => `${v.name} ${v.load}`).join(', ') : '';
      this.say.say(
        `${this.a.name}: host load ${load.toFixed(2)} (${band} the threshold ${HOST_LOAD.threshold})${top ? `; VMs: ${top}` : ''}${band === 'above' ? `; host-load waits ${HOST_LOAD.durationMs / 1000} s before it recommends a move` : ''}`,
      );
    } else if (e.type === 'MIGRATION_RECOMMENDED') {
      this.recommendation ??= e;
      this.say.say(`${this.a.name}: MIGRATION_RECOMMENDED vm ${formatValue(p['vm'])}: ${formatValue(p['reason'])}`);
    } else if (e.type === 'EFFECT_FAILED' && p['effector'] === 'mobility') {
      const message = formatValue((p['error'] as { message?: unknown } | undefined)?.message);
      this.failures.push(message);
      this.say.say(`${this.a.name}: load-balancer could not move the VM: ${message}`);
    } else if (e.type === 'ALERT') {
      this.say.say(`${this.a.name}: ALERT ${formatValue(p['reason'])}`);
    }
  }

  private onEmbot(e: EmbotInfo): void {
    if (e.type !== 'load-monitor' && e.type !== 'balancer') return;
    for (const policy of e.policies) {
      const state = formatValue(policy.state);
      const key = `${e.id}/${policy.name}`;
      const before = this.policyStates.get(key);
      this.policyStates.set(key, state);
      if (e.type === 'balancer') this.balancerState = state;
      else this.hostLoadState = state;
      if (before === undefined || before === state) continue;
      const what = e.type === 'balancer' ? 'load-balancer' : 'host-load';
      this.say.say(`${this.a.name}: ${what} policy ${before} → ${state}`);
    }
  }

  private onMigration(m: MigrationInfo): void {
    let known = this.migrations.get(m.id);
    if (!known) {
      known = { phase: '', percent: -1, ended: false };
      this.migrations.set(m.id, known);
      this.say.say(`${this.a.name}: migration ${m.id} started: vm ${m.vm} → ${m.peer}`);
    }
    if (known.ended) return;
    const percent = m.progress?.percent ?? 0;
    // A line per phase, and within the memory copy a line per quarter.
    if (m.phase !== known.phase || Math.floor(percent / 25) > Math.floor(known.percent / 25)) {
      this.say.say(`  ${m.vm} → ${m.peer}  ${progressLine(m, Math.max(0, Date.now() - m.startedAt))}`);
      known.phase = m.phase;
      known.percent = percent;
    }
    if (m.outcome === null) return;
    known.ended = true;
    if (m.outcome === 'completed') {
      this.completed ??= m;
      this.say.say(`migration ${m.id}: vm ${m.vm} ${m.summary?.from ?? this.a.name} → ${m.summary?.to ?? m.peer} completed`);
    } else {
      this.say.say(`migration ${m.id}: vm ${m.vm} → ${m.peer} ${m.outcome}${m.reason ? `: ${m.reason}` : ''}`);
    }
  }
}

async function play(cluster: DemoCluster, say: Narrator, signal: AbortSignal, limitMs: number): Promise<DemoOutcome> {
  const a = cluster.agent(SOURCE);
  for (const vm of DEMO_VMS) {
    await a.client.createVm({ name: vm.name, memory: VM_MEMORY, dirtyRate: VM_DIRTY_RATE });
    await a.client.vmAction(vm.name, 'start');
  }
  say.say(`${SOURCE}: created and started ${DEMO_VMS.map((v) => v.name).join(', ')} (${formatBytes(VM_MEMORY)} each, each watched by a vm-watchdog embot)`);
  for (const vm of DEMO_VMS) await a.client.setVmLoad(vm.name, vm.load);
  const sum = DEMO_VMS.reduce((s, v) => s + v.load, 0);
  say.say(
    `${SOURCE}: raised the VM loads to ${DEMO_VMS.map((v) => `${v.name} ${v.load}`).join(', ')} on ${HOST_CPUS} CPUs: host load ${(sum / HOST_CPUS).toFixed(2)}, threshold ${HOST_LOAD.threshold}`,
  );

  const watch = new Watcher(a, say);
  const deadline = Date.now() + limitMs;
  let nextFullTick = 0;
  while (!watch.completed) {
    if (signal.aborted) return INTERRUPTED;
    if (Date.now() > deadline) return { kind: 'time-limit', message: timeLimitMessage(watch, limitMs) };
    const full = Date.now() >= nextFullTick;
    await watch.tick(full);
    if (full) nextFullTick = Date.now() + POLL_MS;
    if (!watch.completed) await sleep(watch.expectingMigration ? PROGRESS_POLL_MS : Math.max(0, nextFullTick - Date.now()), signal);
  }
  const migration = watch.completed;
  const to = migration.summary?.to ?? migration.peer;

  // The sim driver keeps a VM's load where it was set: give the moved VM its load at its new host.
  const target = cluster.agents.get(to);
  const moved = DEMO_VMS.find((v) => v.name === migration.vm);
  if (target && moved) {
    const applied = await target.client.setVmLoad(moved.name, moved.load).then(
      () => true,
      () => false,
    );
    if (applied) say.say(`${to}: set ${moved.name}'s load to ${moved.load} again (a sim VM's load is not part of its memory, so it does not travel)`);
  }

  // Let the narration catch up: the balancer's outcome and a's first reading without the VM.
  const settleBy = Date.now() + SETTLE_MS;
  const loadBefore = watch.lastLoad;
  while (Date.now() < settleBy && !signal.aborted) {
    await watch.tick(true);
    if (watch.balancerState === 'coolingDown' && watch.lastLoad !== undefined && watch.lastLoad !== loadBefore) break;
    await sleep(POLL_MS, signal);
  }
  if (signal.aborted) return INTERRUPTED;

  const agents = await Promise.all(DEMO_AGENTS.map((n) => reportAgent(cluster.agent(n))));
  const home = agents.find((r) => r.vms.some((v) => v.name === migration.vm));
  const stayed = agents.find((r) => r.name === SOURCE)?.vms.map((v) => v.name) ?? [];
  say.say(`vm ${migration.vm} now lives on ${home?.name ?? '?'} (${home?.vms.find((v) => v.name === migration.vm)?.state ?? 'unknown'}); ${SOURCE} keeps ${stayed.join(', ') || 'no VMs'}`);

  say.print('');
  say.print('migration summary');
  say.print(renderMigrationSummary(migration).trimEnd());
  say.print('');
  say.print('agents');
  say.print(renderAgents(agents).trimEnd());
  say.print('');
  return { kind: 'moved', recommendation: watch.recommendation, migration, agents };
}

function timeLimitMessage(watch: Watcher, limitMs: number): string {
  const seen = watch.recommendation
    ? `host-load recommended moving ${formatValue((watch.recommendation.payload as { vm?: unknown } | null)?.vm)}, but no migration completed${watch.failures.length ? ` (${watch.failures.join('; ')})` : ''}`
    : `host-load made no recommendation (last host load ${watch.lastLoad?.toFixed(2) ?? 'unknown'})`;
  return `no VM was moved within ${limitMs / 1000} s: ${seen}`;
}

async function reportAgent(a: DemoAgent): Promise<DemoAgentReport> {
  const [vms, embots, events] = await Promise.all([a.client.listVms(), a.client.listEmbots(), a.client.listEvents({ limit: 200 })]);
  const reading = [...events].reverse().find((e) => e.type === 'HOST_LOAD' && e.elementId === `host:${a.name}`);
  const load = (reading?.payload as { load?: unknown } | undefined)?.load;
  return {
    name: a.name,
    pid: a.pid,
    controlUrl: a.controlUrl,
    peerUrl: a.peerUrl,
    vms,
    embots: embots.map((e) => ({ id: e.id, type: e.type, elementIds: e.elementIds, status: e.status })),
    hostLoad: typeof load === 'number' ? load : null,
  };
}

/**
 * Per-agent table: its VMs, its embots by type, its last host load.
 *
 * @example
 * ```ts
 * renderAgents([{ name: 'b', vms: [web1], embots: [...], hostLoad: 0.45, … }]);
 * // 'AGENT  VMS    EMBOTS                                  HOST LOAD\nb      web-1  3: load-monitor, balancer, watchdog  0.45\n'
 * ```
 */
export function renderAgents(agents: readonly DemoAgentReport[]): string {
  return formatTable(
    ['AGENT', 'VMS', 'EMBOTS', 'HOST LOAD'],
    agents.map((r) => {
      const byType = new Map<string, number>();
      for (const e of r.embots) byType.set(e.type, (byType.get(e.type) ?? 0) + 1);
      const types = [...byType].map(([t, n]) => (n > 1 ? `${t} ×${n}` : t)).join(', ');
      return [r.name, r.vms.map((v) => v.name).join(', ') || '-', `${r.embots.length}${types ? `: ${types}` : ''}`, r.hostLoad === null ? '-' : r.hostLoad.toFixed(2)];
    }),
  );
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const done = (): void => {
      clearTimeout(timer);
      signal.removeEventListener('abort', done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal.addEventListener('abort', done, { once: true });
  });
}
