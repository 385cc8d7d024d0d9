import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { main } from '../../core/cli/main.ts';
import { parseDestinations, parseFallback, parseRetries, parseThreshold, progressLine, renderMigrationSummary, renderMigrations } from '../../core/cli/migrate-commands.ts';
import type { AgentControl, AgentStatus, MigrationInfo, MigrationSummary } from '../../core/control/control-api.ts';
import { startControlServer, type ControlServer } from '../../core/control/server.ts';
import { ConfigError, EffectorError, ErrorCodes } from '../../core/errors.ts';
import { createLogger } from '../../core/logger.ts';
import type { MigrationOutcome } from '../../core/mobility/mobility-contract.ts';

const MiB = 1024 * 1024;

interface Script {
  readonly phases: readonly string[];
  readonly outcome: MigrationOutcome;
  readonly reason?: string;
  /** Polls that see the same phase: more than one checks that a phase is printed once. */
  readonly pollsPerPhase?: number;
}

/** Which VM does what: every `pollsPerPhase` polls of `getMigration` move the migration one phase on. */
const SCRIPTS: Readonly<Record<string, Script>> = {
  web: { phases: ['requesting', 'holding', 'sendingState', 'sendingEvents', 'migratingVm', 'syncingDirty', 'completing', 'finishing', 'completed'], outcome: 'completed', pollsPerPhase: 2 },
  db: { phases: ['requesting', 'holding', 'sendingState', 'rollingBack', 'aborted'], outcome: 'aborted', reason: 'target replied ManagementStateFailed: embot vm-watchdog/db failed to instantiate' },
  big: { phases: ['requesting', 'denied'], outcome: 'denied', reason: 'not enough memory on b' },
};

function summaryFor(id: string, vm: string, to: string, script: Script): MigrationSummary {
  const completed = script.outcome === 'completed';
  return {
    migrationId: id,
    vm,
    from: 'a',
    to,
    outcome: script.outcome,
    ...(script.reason === undefined ? {} : { reason: script.reason }),
    totalMs: 1234,
    phases: script.phases.slice(0, -1).map((phase, i) => ({ phase, ms: 10 * (i + 1) })),
    embots: completed ? 3 : 0,
    events: completed ? 120 : 0,
    modules: ['vm-watchdog@1.0.0#sha256-aaaa', 'host-load@0.2.0#sha256-bbbb'],
    modulesShipped: completed ? 1 : 0,
    dirtyRounds: completed ? 2 : 0,
    bytes: completed ? 65 * MiB : 2048,
    memoryBytes: completed ? 64 * MiB : 0,
    downtimeMs: completed ? 15 : null,
    rounds: completed ? 3 : 0,
    paths: completed ? 2 : 0,
    estimateMs: completed ? 1100 : null,
    thresholdMs: completed ? 1000 : null,
    forwarded: completed ? 4 : 0,
  };
}

/** AgentControl whose migrations walk through their script one phase per poll. */
class ScriptedControl implements AgentControl {
  migrateCalls = 0;
  private readonly runs = new Map<string, { vm: string; to: string; script: Script; polls: number }>();

  vmChecksum(): never {
    throw new Error('not used by these tests');
  }

  setVmLoad(): never {
    throw new Error('not used by these tests');
  }

  status(): AgentStatus {
    throw new Error('not used');
  }
  listVms() {
    return [];
  }
  createVm(): never {
    throw new Error('not used');
  }
  vmAction(): never {
    throw new Error('not used');
  }
  listEmbots() {
    return [];
  }
  listPlugins() {
    return [];
  }
  async emitEvent(): Promise<never> {
    throw new Error('not used');
  }
  listEvents() {
    return [];
  }
  listDeadLetters() {
    return [];
  }
  migrate(vm: string, to: string | undefined): { readonly id: string } {
    this.migrateCalls++;
    // As the agent answers a migrate without --to for a VM with no pre-warm.
    if (to === undefined) throw new ConfigError(ErrorCodes.DESTINATIONS_INVALID, `VM ${vm} has no pre-warm: name its destination(s)`);
    if (to !== 'b') throw new ConfigError(ErrorCodes.PEER_UNKNOWN, `no peer named '${to}'; known: b`);
    const script = SCRIPTS[vm];
    if (!script) throw new EffectorError(ErrorCodes.VM_UNKNOWN, `no VM named ${vm}`);
    const id = `m-${this.runs.size + 1}`;
    this.runs.set(id, { vm, to, script, polls: 0 });
    return { id };
  }
  private info(id: string): MigrationInfo | undefined {
    const run = this.runs.get(id);
    if (!run) return undefined;
    const { script } = run;
    const step = Math.floor(run.polls / (script.pollsPerPhase ?? 1));
    const last = script.phases.length - 1;
    const done = step >= last;
    const base = { id, role: 'source' as const, vm: run.vm, peer: run.to, phase: script.phases[Math.min(step, last)]!, startedAt: Date.UTC(2025, 0, 2, 3, 4, 5), updatedAt: Date.UTC(2025, 0, 2, 3, 4, 6) };
    if (done) return { ...base, outcome: script.outcome, ...(script.reason === undefined ? {} : { reason: script.reason }), summary: summaryFor(id, run.vm, run.to, script) };
    return { ...base, outcome: null, progress: { phase: base.phase, bytes: step * MiB, memoryBytes: step * MiB, memoryTotal: last * MiB, percent: (step / last) * 100 } };
  }
  listMigrations(): MigrationInfo[] {
    return [...this.runs.keys()].map((id) => this.info(id)!);
  }
  getMigration(id: string): MigrationInfo | undefined {
    const info = this.info(id);
    const run = this.runs.get(id);
    if (run) run.polls++;
    return info;
  }
  async waitMigration(id: string): Promise<MigrationSummary | undefined> {
    const run = this.runs.get(id);
    if (!run) return undefined;
    run.polls = (run.script.phases.length - 1) * (run.script.pollsPerPhase ?? 1);
    return this.info(id)!.summary;
  }
}

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

async function run(args: readonly string[], opts: { tty?: boolean } = {}): Promise<Run> {
  let stdout = '';
  let stderr = '';
  const code = await main(['node', 'embot', ...args, '--agent', server.url], {
    stdout: { write: (s: string) => (stdout += s), ...(opts.tty ? { isTTY: true } : {}) },
    stderr: { write: (s: string) => (stderr += s) },
    env: {},
  });
  return { code, stdout, stderr };
}

let control: ScriptedControl;
let server: ControlServer;

beforeAll(async () => {
  control = new ScriptedControl();
  server = await startControlServer({ host: '127.0.0.1', port: 0, control, logger: createLogger({ level: 'silent' }) });
});
afterAll(() => server.close());

describe('embot migrate: progress and summary', () => {
  it('off a terminal: one line per phase, in order, then the summary; exit 0 when completed', async () => {
    const r = await run(['migrate', 'web', '--to', 'b']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout).not.toContain('\r');
    const lines = r.stdout.split('\n');
    expect(lines[0]).toMatch(/^migrating vm web to b \(migration m-\d+\)$/);
    const phaseLines = lines.filter((l) => /^\[\d+\.\ds\] /.test(l));
    expect(phaseLines.map((l) => l.split('  ')[1])).toEqual(SCRIPTS['web']!.phases);
    expect(phaseLines[0]).toMatch(/^\[\d+\.\ds\]  requesting  0 B  0%$/);
    expect(phaseLines[4]).toMatch(/^\[\d+\.\ds\]  migratingVm  4 MiB  50%$/);
    expect(phaseLines.at(-1)).toMatch(/^\[\d+\.\ds\]  completed$/);

    const summary = r.stdout.slice(r.stdout.indexOf('migration:'));
    expect(summary).toMatch(/^migration:\s+m-\d+ \(vm web: a → b\)$/m);
    expect(summary).toMatch(/^outcome:\s+completed$/m);
    expect(summary).toMatch(/^total time:\s+1\.23 s$/m);
    expect(summary).toMatch(/^phases:\s+requesting\s+10 ms$/m);
    expect(summary).toMatch(/^\s+finishing\s+80 ms$/m);
    expect(summary).toMatch(/^embots moved:\s+3$/m);
    expect(summary).toMatch(/^events moved:\s+120$/m);
    expect(summary).toMatch(/^modules:\s+2, 1 shipped \(vm-watchdog@1\.0\.0, host-load@0\.2\.0\)$/m);
    expect(summary).toMatch(/^dirty rounds:\s+2$/m);
    expect(summary).toMatch(/^bytes:\s+65 MiB \(memory 64 MiB\)$/m);
    expect(summary).toMatch(/^downtime:\s+15 ms$/m);
    expect(summary).toMatch(/^forwarded:\s+4 events$/m);
    expect(summary).not.toMatch(/^reason:/m);
  });

  it('an aborted migration prints its reason and exits 1', async () => {
    const r = await run(['migrate', 'db', '--to', 'b']);
    expect(r.code).toBe(1);
    const phaseLines = r.stdout.split('\n').filter((l) => /^\[\d+\.\ds\] /.test(l));
    expect(phaseLines.map((l) => l.split('  ')[1])).toEqual(['requesting', 'holding', 'sendingState', 'rollingBack', 'aborted']);
    expect(r.stdout).toMatch(/^outcome:\s+aborted$/m);
    expect(r.stdout).toMatch(/^reason:\s+target replied ManagementStateFailed: embot vm-watchdog\/db failed to instantiate$/m);
    expect(r.stdout).toMatch(/^downtime:\s+n\/a/m);
  });

  it('a denied migration exits 1 with the reason', async () => {
    const r = await run(['migrate', 'big', '--to', 'b']);
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/^outcome:\s+denied$/m);
    expect(r.stdout).toMatch(/^reason:\s+not enough memory on b$/m);
  });

  it('on a terminal: one line rewritten in place, ended by a newline before the summary', async () => {
    const r = await run(['migrate', 'web', '--to', 'b'], { tty: true });
    expect(r.code).toBe(0);
    const updates = r.stdout.split('\r\x1b[2K').slice(1);
    // Two polls per phase, each one an update, so the line is rewritten even within a phase.
    expect(updates.length).toBe(2 * (SCRIPTS['web']!.phases.length - 1) + 1);
    // Every update but the last stays on the same line.
    for (const u of updates.slice(0, -1)) expect(u).not.toContain('\n');
    expect(updates.some((u) => /^\[\d+\.\ds\]  syncingDirty  5 MiB  62%$/.test(u))).toBe(true);
    expect(updates.at(-1)).toMatch(/^\[\d+\.\ds\]  completed\nmigration:/);
    expect(r.stdout).toMatch(/^outcome:\s+completed$/m);
  });

  it('--json prints only the final MigrationInfo with its summary, as the API returns it', async () => {
    const ok = await run(['migrate', 'web', '--to', 'b', '--json']);
    expect(ok.code).toBe(0);
    const info = JSON.parse(ok.stdout) as MigrationInfo;
    expect(info).toMatchObject({ vm: 'web', peer: 'b', outcome: 'completed', phase: 'completed', summary: { embots: 3, events: 120, dirtyRounds: 2 } });
    const api = await (await fetch(`${server.url}/v1/migrations/${info.id}`)).json();
    expect(info).toEqual(api);
    const aborted = await run(['migrate', 'db', '--to', 'b', '--json']);
    expect(aborted.code).toBe(1);
    expect(JSON.parse(aborted.stdout)).toMatchObject({ outcome: 'aborted', reason: SCRIPTS['db']!.reason });
  });

  it('--no-wait prints the id and returns at once (exit 0), also as JSON', async () => {
    const r = await run(['migrate', 'web', '--to', 'b', '--no-wait']);
    expect(r.code).toBe(0);
    const m = /^migration (m-\d+) started: vm web → b \(follow it with `embot migrations`\)\n$/.exec(r.stdout);
    expect(m, r.stdout).not.toBeNull();
    const json = await run(['migrate', 'db', '--to', 'b', '--no-wait', '--json']);
    expect(json.code).toBe(0);
    const body = JSON.parse(json.stdout) as { id: string };
    expect(Object.keys(body)).toEqual(['id']);
    // Neither was followed, so both are still running.
    const list = await (await fetch(`${server.url}/v1/migrations`)).json() as MigrationInfo[];
    expect(list.find((x) => x.id === m![1])?.outcome).toBeNull();
    expect(list.find((x) => x.id === body.id)?.outcome).toBeNull();
  });
});

describe('embot migrate: pre-copy progress and --threshold', () => {
  it('shows round, remainder, rates and expected downtime while memory is copied', () => {
    const info: MigrationInfo = {
      id: 'm-1', role: 'source', vm: 'web', peer: 'b', phase: 'migratingVm', outcome: null, startedAt: 0, updatedAt: 0,
      progress: { phase: 'migratingVm', bytes: 3 * MiB, memoryBytes: 3 * MiB, memoryTotal: 4 * MiB, percent: 75, round: 2, remainingBytes: 512 * 1024, rateBytesPerSec: 64 * MiB, dirtyRateBytesPerSec: 4 * MiB, expectedDowntimeMs: 8 },
    };
    const line = progressLine(info, 1500);
    expect(line).toContain('round 2');
    expect(line).toContain('left 512 KiB');
    expect(line).toContain('64 MiB/s');
    expect(line).toContain('dirty 4 MiB/s');
    expect(line).toContain('expected downtime 8 ms');
  });

  it('names the destination whose copy a migration to several shows (the one furthest along)', () => {
    const info: MigrationInfo = {
      id: 'm-3', role: 'source', vm: 'web', peer: 'b,c', phase: 'racing', outcome: null, startedAt: 0, updatedAt: 0,
      progress: { phase: 'migratingVm', bytes: 3 * MiB, memoryBytes: 3 * MiB, memoryTotal: 4 * MiB, percent: 75, leading: 'c' },
    };
    expect(progressLine(info, 1500)).toBe('[1.5s]  racing  c leading  3 MiB  75%');
  });

  it("says where the copy is when the figures stop moving (QEMU's stop-and-copy), and when they are final", () => {
    const at = (copyPhase: string): MigrationInfo => ({
      id: 'm-2', role: 'source', vm: 'web', peer: 'b', phase: 'migratingVm', outcome: null, startedAt: 0, updatedAt: 0,
      progress: { phase: 'migratingVm', bytes: 3 * MiB, memoryBytes: 3 * MiB, memoryTotal: 4 * MiB, percent: 75, round: 2, remainingBytes: MiB, rateBytesPerSec: 64 * MiB, copyPhase, copyPhaseSince: 10_000 },
    });
    expect(progressLine(at('stop-and-copy'), 1500, 11_200)).toContain('stop-and-copy for 1.20 s');
    expect(progressLine(at('pre-switchover'), 1500, 10_040)).toContain('pre-switchover for 40 ms');
    expect(progressLine(at('completed'), 1500, 11_200)).toContain('copy completed');
    expect(progressLine(at('precopy'), 1500, 11_200)).not.toMatch(/precopy|stop-and-copy|completed/);
    expect(renderMigrations([at('stop-and-copy')], 12_000)).toContain('migratingVm (stop-and-copy for 2.00 s)');
    expect(renderMigrations([{ ...at('stop-and-copy'), outcome: 'completed' }], 12_000)).not.toContain('stop-and-copy');
  });

  it('parses --threshold durations and refuses nonsense', () => {
    expect(parseThreshold('1500')).toBe(1500);
    expect(parseThreshold('2s')).toBe(2000);
    expect(parseThreshold('1m')).toBe(60_000);
    expect(() => parseThreshold('soon')).toThrow(/not a duration/);
    expect(() => parseThreshold('0')).toThrow(/at least 1 ms/);
  });
});

describe('embot migrate: bad input', () => {
  it.each([
    [['migrate', 'web', '--to', ' '], /no destination given; expected --to PEER or --to PEER,PEER… \[EMBOT_ERR_DESTINATIONS_INVALID\]/],
    [['migrate', 'web', '--to', ','], /no destination given.*\[EMBOT_ERR_DESTINATIONS_INVALID\]/],
    [['migrate', 'web', '--to', 'b,,c'], /a destination name is empty in "b,,c".*\[EMBOT_ERR_DESTINATIONS_INVALID\]/],
    [['migrate', 'web', '--to', 'b,c,b'], /destination b named more than once \[EMBOT_ERR_DESTINATIONS_INVALID\]/],
    [['migrate', 'web', '--to', 'b, b'], /destination b named more than once/],
    [['migrate', 'web', '--to', 'b,c,d,e,f,g,h,i,j'], /9 destinations; at most 8/],
    [['migrate', '--to', 'b'], /missing required argument 'vm'/],
    [['migrate', 'web', 'db', '--to', 'b'], /too many arguments/],
    [['migrations', 'extra'], /too many arguments/],
  ])('embot %j exits 2 and never asks the agent to migrate', async (args, message) => {
    const before = control.migrateCalls;
    const r = await run(args);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(message);
    expect(r.stdout).toBe('');
    expect(control.migrateCalls).toBe(before);
  });

  it('migrate without --to is the command of a pre-warm: the agent is asked, and with none it is a usage error (exit 2)', async () => {
    const before = control.migrateCalls;
    const r = await run(['migrate', 'web']);
    expect(control.migrateCalls).toBe(before + 1);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/VM web has no pre-warm: name its destination\(s\) \[EMBOT_ERR_DESTINATIONS_INVALID\]/);
  });

  it('refusals from the agent exit 1 with its code', async () => {
    const peer = await run(['migrate', 'web', '--to', 'zz']);
    expect(peer.code).toBe(1);
    expect(peer.stderr).toMatch(/no peer named 'zz'; known: b \[EMBOT_ERR_PEER_UNKNOWN\]/);
    const vm = await run(['migrate', 'ghost', '--to', 'b']);
    expect(vm.code).toBe(1);
    expect(vm.stderr).toContain('EMBOT_ERR_VM_UNKNOWN');
    expect(peer.stdout + vm.stdout).toBe('');
  });

  it('parseDestinations keeps one name a string (the single path as before) and makes a list of several', () => {
    expect(parseDestinations(' b ')).toBe('b');
    expect(parseDestinations('b, c')).toEqual(['b', 'c']);
    expect(() => parseDestinations('b,')).toThrow(/a destination name is empty/);
  });
});

describe('embot migrations', () => {
  it('--json prints exactly the API list', async () => {
    const r = await run(['migrations', '--json']);
    expect(r.code).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual(await (await fetch(`${server.url}/v1/migrations`)).json());
  });

  it('the table shows role, vm, peer, phase, outcome (running for live ones), duration and reason', async () => {
    const { id } = await (await fetch(`${server.url}/v1/migrations`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ vm: 'db', to: 'b' }) })).json() as { id: string };
    const r = await run(['migrations']);
    expect(r.code).toBe(0);
    const lines = r.stdout.trimEnd().split('\n');
    expect(lines[0]).toMatch(/^ID\s+ROLE\s+VM\s+PEER\s+PHASE\s+OUTCOME\s+STARTED\s+DURATION\s+REASON$/);
    const running = lines.find((l) => l.startsWith(`${id} `))!;
    expect(running).toMatch(/^m-\d+\s+source\s+db\s+b\s+requesting\s+running\s+2025-01-02 /);
    const done = lines.find((l) => /\scompleted\s/.test(l))!;
    expect(done).toMatch(/\s+web\s+b\s+completed\s+completed\s+\S+ \S+\s+1\.23 s$/);
    expect(lines.some((l) => /\saborted\s+aborted\s.*1\.23 s\s+target replied ManagementStateFailed/.test(l))).toBe(true);
  });

  it('an agent with no migrations says how to start one', () => {
    expect(renderMigrations([], Date.now())).toBe('no migrations yet (start one with `embot migrate VM --to PEER`)\n');
  });
});

describe('the estimate line of a migration summary', () => {
  const info = (summary: MigrationSummary): MigrationInfo => ({ id: summary.migrationId, role: 'source', vm: summary.vm, peer: 'b', phase: 'completed', outcome: 'completed', startedAt: 0, updatedAt: 1, summary });
  const precopy = { copyMs: 870, copyDowntimeMs: 5, converged: true, throttled: false, throttleSteps: 0, initialDirtyRate: 0, finalDirtyRate: 0, resent: 0, rateBytesPerSec: 80 * MiB, perPath: [] };
  const estimateLine = (text: string): string | undefined => text.split('\n').find((l) => l.startsWith('estimate'));

  it('sets the estimate beside the memory move it estimates, and the whole migration beside that', () => {
    const s = { ...summaryFor('m-1', 'web', 'b', SCRIPTS['web']!), precopy };
    expect(estimateLine(renderMigrationSummary(info(s)))).toMatch(/^estimate:?\s+1\.10 s vs threshold 1\.00 s; actual 870 ms for the memory, 1\.23 s in all$/);
  });

  it('sets the expected downtime beside the actual one, when the hypervisor reported it', () => {
    const downtimeLine = (text: string): string | undefined => text.split('\n').find((l) => l.startsWith('downtime'));
    const s = summaryFor('m-3', 'web', 'b', SCRIPTS['web']!);
    expect(downtimeLine(renderMigrationSummary(info({ ...s, downtimeMs: 16, precopy: { ...precopy, expectedDowntimeMs: 12 } })))).toMatch(/^downtime:?\s+16 ms \(expected 12 ms\)$/);
    expect(downtimeLine(renderMigrationSummary(info({ ...s, downtimeMs: 16, precopy })))).toMatch(/^downtime:?\s+16 ms$/);
  });

  it('says beside the memory bytes how much went as zero-page indexes (an untouched sim VM), nothing when none did', () => {
    const bytesLine = (text: string): string | undefined => text.split('\n').find((l) => l.startsWith('bytes'));
    const s = summaryFor('m-5', 'web', 'b', SCRIPTS['web']!);
    expect(bytesLine(renderMigrationSummary(info({ ...s, bytes: 1200, memoryBytes: 0, precopy: { ...precopy, zeroBytes: 32 * MiB } })))).toMatch(/^bytes:?\s+1\.2 KiB \(memory 0 B, and 32 MiB of zero pages as indexes\)$/);
    expect(bytesLine(renderMigrationSummary(info({ ...s, precopy })))).toMatch(/^bytes:?\s+65 MiB \(memory 64 MiB\)$/);
  });

  it('says on the pre-copy line how a qemu stream went (direct, or through the relay of a fan-out), nothing for a driver that does not say', () => {
    const precopyLine = (text: string): string | undefined => text.split('\n').find((l) => l.startsWith('pre-copy'));
    const s = summaryFor('m-4', 'web', 'b', SCRIPTS['web']!);
    expect(precopyLine(renderMigrationSummary(info({ ...s, precopy: { ...precopy, transport: 'direct' } })))).toMatch(/copy downtime 5 ms, stream direct$/);
    expect(precopyLine(renderMigrationSummary(info({ ...s, precopy: { ...precopy, transport: 'relay' } })))).toMatch(/copy downtime 5 ms, stream through the relay$/);
    // A destination the relay's stream waited for (its queue over the bound): how long.
    expect(precopyLine(renderMigrationSummary(info({ ...s, precopy: { ...precopy, transport: 'relay', relayHeldMs: 1250 } })))).toMatch(/stream through the relay \(which waited 1\.25 s for this destination\)$/);
    expect(precopyLine(renderMigrationSummary(info({ ...s, precopy })))).toMatch(/copy downtime 5 ms$/);
  });

  it("a pre-warm's summary: warm time before the command, and the switch after it", () => {
    const line = (text: string): string | undefined => text.split('\n').find((l) => l.startsWith('pre-warm'));
    const s = { ...summaryFor('m-6', 'web', 'b', SCRIPTS['web']!), totalMs: 2400, winner: 'b', retries: 0, destinations: [] };
    expect(line(renderMigrationSummary(info({ ...s, commandedMs: 2300 })))).toMatch(/^pre-warm:?\s+warm 2\.30 s before the command; switched 100 ms after it$/);
    expect(line(renderMigrationSummary(info({ ...s, commandedMs: null })))).toBeUndefined();
    expect(line(renderMigrationSummary(info(s)))).toBeUndefined();
  });

  it('says how often auto-converge throttled, and the dirty rate at the start and at the stop (qemu measures it: it may be higher at the stop)', () => {
    const line = (text: string): string | undefined => text.split('\n').find((l) => l.startsWith('auto-converge'));
    const s = summaryFor('m-5', 'web', 'b', SCRIPTS['web']!);
    const throttled = { ...precopy, throttled: true, throttleSteps: 1, initialDirtyRate: 54 * MiB, finalDirtyRate: 116 * MiB };
    expect(line(renderMigrationSummary(info({ ...s, precopy: throttled })))).toMatch(/^auto-converge:?\s+throttled 1 step; dirty rate 54 MiB\/s at the start, 116 MiB\/s at the stop$/);
    expect(line(renderMigrationSummary(info({ ...s, precopy })))).toBeUndefined();
  });

  it('falls back to the whole migration for a record without the memory move (an older agent stored it)', () => {
    const { copyMs: _dropped, ...older } = precopy;
    const s = { ...summaryFor('m-2', 'web', 'b', SCRIPTS['web']!), precopy: older as unknown as typeof precopy };
    expect(estimateLine(renderMigrationSummary(info(s)))).toMatch(/; actual 1\.23 s$/);
  });
});

describe('embot migrate to several destinations: flags and summary', () => {
  it('--retries takes 0..5, --fallback a list by the --to rules; anything else is a usage error', () => {
    expect(parseRetries('0')).toBe(0);
    expect(parseRetries('5')).toBe(5);
    for (const bad of ['6', '-1', '1.5', 'x', '']) expect(() => parseRetries(bad), bad).toThrow(/--retries must be a whole number from 0 to 5/);
    expect(parseFallback('d,e')).toEqual(['d', 'e']);
    for (const bad of ['', 'd,d', 'd,,e']) expect(() => parseFallback(bad), bad).toThrow(new RegExp(`--fallback: .*${ErrorCodes.DESTINATIONS_INVALID}`));
  });

  it('the summary names the winner, the retries and every destination of every try with its outcome and why', () => {
    const base = summaryFor('m-1', 'web', 'b,c', SCRIPTS['web']!);
    const s: MigrationSummary = {
      ...base,
      to: 'd',
      winner: 'd',
      retries: 1,
      destinations: [
        { name: 'b', migrationId: 'm-1~b', outcome: 'bootFailed', reason: 'bootIncoming failed: injected fault', phases: [], bootReadyMs: null, bytes: 8 << 20, attempt: 0 },
        { name: 'c', migrationId: 'm-1.f~c', outcome: 'terminated', reason: 'terminated: d booted first (migration m-1.f)', phases: [], bootReadyMs: null, bytes: 1 << 20, attempt: 1 },
        { name: 'd', migrationId: 'm-1.f~d', outcome: 'won', phases: [], bootReadyMs: 380, bytes: 8 << 20, attempt: 1 },
      ],
    };
    const out = renderMigrationSummary({ id: 'm-1', role: 'source', vm: 'web', peer: 'b', phase: 'completed', outcome: 'completed', startedAt: 0, updatedAt: 1, summary: s });
    expect(out).toMatch(/^winner:\s+d$/m);
    expect(out).toMatch(/^retries:\s+1$/m);
    expect(out).toMatch(/^destinations:\s+b \(try 1\): bootFailed, 8 MiB — bootIncoming failed: injected fault$/m);
    expect(out).toMatch(/^\s+c \(try 2\): terminated, 1 MiB — terminated: d booted first \(migration m-1\.f\)$/m);
    expect(out).toMatch(/^\s+d \(try 2\): won, booted at 380 ms, 8 MiB$/m);
    const none = renderMigrationSummary({ id: 'm-2', role: 'source', vm: 'web', peer: 'b,c', phase: 'aborted', outcome: 'aborted', startedAt: 0, updatedAt: 1, summary: { ...summaryFor('m-2', 'web', 'b,c', SCRIPTS['db']!), winner: null, retries: 0, destinations: [] } });
    expect(none).toMatch(/^winner:\s+none \(the VM runs here again, nothing lost\)$/m);
  });
});
