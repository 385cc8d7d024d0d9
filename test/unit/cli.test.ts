import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { formatReadyLine } from '../../core/cli/agent-command.ts';
import { renderVms } from '../../core/cli/vm-commands.ts';
import { main } from '../../core/cli/main.ts';
import type { AgentControl, AgentStatus, EmbotEvent, EmbotEventInput } from '../../core/control/control-api.ts';
import { startControlServer, type ControlServer } from '../../core/control/server.ts';
import { ConfigError, ErrorCodes } from '../../core/errors.ts';
import { createLogger } from '../../core/logger.ts';
import { SimDriver } from '../../effectors/hypervisor/sim/sim-driver.ts';

/** Control over the real SimDriver; events, embots and plugins are in-test doubles. */
function simControl(driver: SimDriver, events: EmbotEvent[]): AgentControl {
  let seq = 0;
  const status = (): AgentStatus => ({
    name: 'cli-test',
    version: '0.0.0-test',
    pid: 1,
    startedAt: 0,
    uptimeMs: 93_000,
    driver: 'sim',
    safe: false,
    dataDir: './data',
    pluginsDir: './plugins',
    control: { host: '127.0.0.1', port: 1 },
    counts: { vms: driver.list().length, elements: 0, embots: 1, quarantinedEmbots: 1, modules: 1, modulesWithErrors: 0, queuedEvents: 0, heldEvents: 0, parkedEvents: 0, deadLetters: 0 },
  });
  return {
    status,
    listVms: () => driver.list(),
    createVm: (spec) => driver.create(spec),
    vmAction: async (name, action) => driver[action](name),
    vmChecksum: async (name) => ({ name, state: driver.get(name)!.state, memory: driver.get(name)!.memory, sha256: '0'.repeat(64) }),
    setVmLoad: async (name, load) => {
      driver.setLoad(name, load);
      return driver.get(name)!;
    },
    listEmbots: () => [{ id: 'vm-watchdog/web', module: 'vm-watchdog', type: 'watchdog', elementIds: ['vm:web'], status: 'quarantined', error: 'threw in an action', policies: [{ name: 'restart', state: { backoff: 'waiting' }, updatedAt: 1 }] }],
    listPlugins: () => [{ name: 'vm-watchdog', version: '1.2.3', hash: 'sha256-0123456789abcdef', status: 'loaded', restarts: 0, embotTypes: ['watchdog'], dir: '/p' }],
    emitEvent: async (input: EmbotEventInput) => {
      const e: EmbotEvent = { id: input.id ?? `cli.${seq++}`, ts: input.ts ?? 1_700_000_000_000, elementId: input.elementId, type: input.type, payload: input.payload ?? null, source: 'control' };
      events.push(e);
      return e;
    },
    listEvents: ({ limit }) => events.slice(-limit),
    listDeadLetters: ({ limit }) =>
      [{ embotId: 'vm-watchdog/watchdog/vm:web', event: { id: 'cli.dead', ts: 1_700_000_000_000, elementId: 'vm:web', type: 'VM_CRASHED', payload: null }, reason: 'EMBOT_ERR_PLUGIN_THREW: threw in an action', at: 1_700_000_000_500 }].slice(-limit),
    migrate: (_vm, to) => {
      throw new ConfigError(ErrorCodes.PEER_UNKNOWN, `no peer named '${to}'`);
    },
    listMigrations: () => [],
    getMigration: () => undefined,
    waitMigration: async () => undefined,
  };
}

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

async function run(args: readonly string[], env: NodeJS.ProcessEnv = {}, signal?: AbortSignal): Promise<Run> {
  let stdout = '';
  let stderr = '';
  const code = await main(['node', 'embot', ...args], {
    stdout: { write: (s: string) => (stdout += s) },
    stderr: { write: (s: string) => (stderr += s) },
    env,
    ...(signal ? { signal } : {}),
  });
  return { code, stdout, stderr };
}

const driver = new SimDriver({ tickMs: 1000 });
const events: EmbotEvent[] = [];
let server: ControlServer;
let agent: string[];
let closedUrl: string;
const tmp = mkdtempSync(join(tmpdir(), 'embot-cli-'));

beforeAll(async () => {
  server = await startControlServer({ host: '127.0.0.1', port: 0, control: simControl(driver, events), logger: createLogger({ level: 'silent' }) });
  agent = ['--agent', server.url];
  const closed = await startControlServer({ host: '127.0.0.1', port: 0, control: simControl(driver, []), logger: createLogger({ level: 'silent' }) });
  closedUrl = closed.url;
  await closed.close();
});
afterAll(async () => {
  await server.close();
  driver.close();
  rmSync(tmp, { recursive: true, force: true });
});

describe('cli usage errors exit 2 with a message', () => {
  it.each([
    [['frobnicate'], /unknown command 'frobnicate'/],
    [['status', '--bogus'], /unknown option '--bogus'/],
    [['vm', 'explode'], /unknown command 'explode'/],
    [['vm', 'start'], /missing required argument 'name'/],
    [['vm', 'list', 'extra'], /too many arguments/],
    [['events', 'emit', '--type', 'X'], /required option '--element <id>' not specified/],
    [['events', 'emit', '--element', 'vm:web', '--type', 'X', '--payload', '{oops'], /--payload <json>.*not valid JSON.*quote it/],
    [['events', 'list', '--limit', 'lots'], /expected a whole number/],
    [['vm', 'create', 'x', '--memory', '12Q'], /expected a size like/],
    [['agent', '--driver', 'xen'], /Allowed choices are sim, qemu/],
    [['agent', '--control', 'localhost'], /expected HOST:PORT/],
    [['vm', 'load', 'web'], /missing required argument 'load'/],
    [['vm', 'load', 'web', '90%'], /expected a load between 0 and 1.*not a percentage/],
    [['vm', 'load', 'web', '1.5'], /expected a load between 0 and 1/],
    [['vm', 'load', 'web', '-0.1'], /unknown option '-0.1'|expected a load/],
    [['vm', 'load', 'web', 'high'], /expected a load between 0 and 1/],
    [['demo', '--time-limit', '0'], /--time-limit <seconds>.*expected a whole number/],
    [['demo', '--bogus'], /unknown option '--bogus'/],
  ])('embot %j', async (args, message) => {
    const r = await run([...args, ...agent]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(message);
    // Every usage error carries a stable code, commander's own ones too.
    expect(r.stderr).toMatch(/\[EMBOT_ERR_[A-Z_]+\]/);
    expect(r.stdout).toBe('');
  });

  it("commander's usage errors get EMBOT_ERR_CLI_USAGE on their first line, once", async () => {
    const r = await run(['migrate', 'web', '--to', 'b,c', '--retries', '9', ...agent]);
    expect(r.code).toBe(2);
    expect(r.stderr.split('\n')[0]).toMatch(/--retries must be a whole number from 0 to 5, got '9' \[EMBOT_ERR_CLI_USAGE\]$/);
    const dup = await run(['migrate', 'web', '--to', 'b,b', ...agent]);
    expect(dup.stderr.match(/\[EMBOT_ERR_/g)).toHaveLength(1);
    expect(dup.stderr).toContain('[EMBOT_ERR_DESTINATIONS_INVALID]');
  });

  it.each([
    [['agent', '--peers', 'b'], /--peers <list>.*is invalid.*not NAME=ws:\/\/HOST:PORT/],
    [['agent', '--peers', 'b=http://127.0.0.1:7402'], /must be a ws:\/\/ or wss:\/\/ URL/],
    [['agent', '--peers', 'b=ws://127.0.0.1:1,b=ws://127.0.0.1:2'], /peer b is given twice/],
    [['agent', '--peers', 'b=ws://user:pw@127.0.0.1:1'], /must not carry credentials/],
    [['agent', '--peer-listen', 'nowhere'], /--peer-listen <host:port>.*is invalid.*not HOST:PORT/],
    [['agent', '--peer-listen', '127.0.0.1:70000'], /out of range/],
  ])('embot %j (peer flags are checked before anything starts)', async (args, message) => {
    const r = await run([...args, '--data', join(tmp, 'never'), '--log-level', 'silent']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(message);
    expect(r.stdout).toBe('');
  });

  it('a missing or short --secret-file is a usage error naming the file', async () => {
    const missing = await run(['agent', '--secret-file', join(tmp, 'no-secret'), '--data', join(tmp, 'never'), '--log-level', 'silent']);
    expect(missing.code).toBe(2);
    expect(missing.stderr).toMatch(/cannot read secret file .*no-secret.*EMBOT_ERR_CONFIG_NOT_FOUND/);
    const short = join(tmp, 'short-secret');
    writeFileSync(short, 'tooshort\n');
    const weak = await run(['agent', '--secret-file', short, '--data', join(tmp, 'never'), '--log-level', 'silent']);
    expect(weak.code).toBe(2);
    expect(weak.stderr).toMatch(/secret file .*short-secret is 8 bytes; at least 16 are required/);
    expect(missing.stdout + weak.stdout).toBe('');
  });

  it('a bad --payload never reaches the agent', async () => {
    const before = events.length;
    expect((await run(['events', 'emit', '--element', 'vm:web', '--type', 'X', '--payload', 'not-json', ...agent])).code).toBe(2);
    expect(events.length).toBe(before);
  });

  it('bad agent config is a usage error naming the problem', async () => {
    const missing = await run(['agent', '--config', join(tmp, 'nope.yaml')]);
    expect(missing.code).toBe(2);
    expect(missing.stderr).toMatch(/config file .*nope\.yaml not found.*EMBOT_ERR_CONFIG_NOT_FOUND/);
    const bad = join(tmp, 'bad.yaml');
    writeFileSync(bad, 'control:\n  prot: 1\n');
    const invalid = await run(['agent', '--config', bad]);
    expect(invalid.code).toBe(2);
    expect(invalid.stderr).toContain('control: unknown key "prot"');
    const noToken = await run(['agent', '--token-file', join(tmp, 'no-token')]);
    expect(noToken.code).toBe(2);
    expect(noToken.stderr).toContain('token file');
  });
});

describe('vm list rendering', () => {
  it('shows the sim fields where the driver has them and a dash where it has none (qemu)', () => {
    const out = renderVms([
      { name: 'sim-vm', state: 'running', memory: 64 * 1024 * 1024, vcpus: 1, crashes: 0, dirtyRate: 4 * 1024 * 1024, udpPort: 9000 },
      { name: 'qemu-vm', state: 'paused', memory: 128 * 1024 * 1024, vcpus: 2, crashes: 1 },
    ]);
    const [, sim, qemu] = out.trim().split('\n');
    expect(sim).toMatch(/sim-vm\s+running\s+64(\.0)? ?MiB\s+4(\.0)? ?MiB\/s\s+1\s+0\s+9000/);
    expect(qemu).toMatch(/qemu-vm\s+paused\s+128(\.0)? ?MiB\s+-\s+2\s+1\s+-/);
  });

  it('says a VM still arriving in a migration is incoming (a qemu target lists its held incoming QEMU)', () => {
    const out = renderVms([
      { name: 'arriving', state: 'created', memory: 64 * 1024 * 1024, vcpus: 1, crashes: 0, incoming: true },
      { name: 'made-here', state: 'created', memory: 64 * 1024 * 1024, vcpus: 1, crashes: 0 },
    ]);
    expect(out).toMatch(/arriving\s+created \(incoming\)\s+64/);
    expect(out).toMatch(/made-here\s+created\s+64/);
  });
});

describe('cli --help', () => {
  it('lists the commands at the top level and in every group', async () => {
    const top = await run(['--help']);
    expect(top.code).toBe(0);
    for (const verb of ['agent', 'status', 'vm', 'embots', 'plugins', 'events', 'migrate', 'migrations', 'demo']) expect(top.stdout).toMatch(new RegExp(`^  ${verb}\\b`, 'm'));
    const vm = await run(['vm', '--help']);
    expect(vm.code).toBe(0);
    for (const verb of ['list', 'create', 'start', 'stop', 'crash', 'load']) expect(vm.stdout).toMatch(new RegExp(`^  ${verb}\\b`, 'm'));
    const demo = await run(['demo', '--help']);
    for (const flag of ['--keep', '--json', '--time-limit']) expect(demo.stdout).toContain(flag);
    const create = await run(['vm', 'create', '--help']);
    expect(create.stdout).toContain('--memory <size>');
    expect(create.stdout).toContain('--agent <url>');
    expect(create.stdout).toContain('--json');
    const emit = await run(['events', 'emit', '--help']);
    expect(emit.stdout).toContain('--payload <json>');
    const agentHelp = await run(['agent', '--help']);
    for (const flag of ['--config', '--name', '--control', '--data', '--plugins', '--driver', '--safe', '--log-level', '--log-format', '--token-file', '--peer-listen', '--peers', '--secret-file']) {
      expect(agentHelp.stdout).toContain(flag);
    }
  });
});

describe('cli against an agent', () => {
  it('an agent that is not running: UNREACHABLE message, exit 1 (flag and EMBOT_AGENT)', async () => {
    const viaFlag = await run(['status', '--agent', closedUrl]);
    expect(viaFlag.code).toBe(1);
    expect(viaFlag.stderr).toContain(`no embot agent at ${closedUrl}`);
    expect(viaFlag.stderr).toContain('start one with `embot agent`');
    expect(viaFlag.stderr).toContain('EMBOT_ERR_CONTROL_UNREACHABLE');
    const viaEnv = await run(['vm', 'list'], { EMBOT_AGENT: closedUrl });
    expect(viaEnv.code).toBe(1);
    expect(viaEnv.stderr).toContain(`no embot agent at ${closedUrl}`);
  });

  it('with --json, a runtime error is one JSON document on stderr too (the API error shape), exit 1', async () => {
    const r = await run(['status', '--json', '--agent', closedUrl]);
    expect(r.code).toBe(1);
    expect(r.stdout).toBe('');
    expect(JSON.parse(r.stderr)).toEqual({ error: { code: ErrorCodes.CONTROL_UNREACHABLE, message: expect.stringContaining(`no embot agent at ${closedUrl}`), details: { url: closedUrl } } });
  });

  it('--json prints exactly the API JSON', async () => {
    driver.create({ name: 'web', memory: 1 << 20 });
    for (const [args, path] of [
      [['status'], '/v1/status'],
      [['vm', 'list'], '/v1/vms'],
      [['embots'], '/v1/embots'],
      [['plugins'], '/v1/plugins'],
      [['events', 'list', '--limit', '2'], '/v1/events?limit=2'],
    ] as const) {
      const r = await run([...args, '--json', ...agent]);
      expect(r.code, args.join(' ')).toBe(0);
      const api = await (await fetch(server.url + path)).json();
      expect(JSON.parse(r.stdout)).toEqual(api);
    }
  });

  it('vm create parses sizes and vm actions drive the VM', async () => {
    const created = await run(['vm', 'create', 'db', '--memory', '2M', '--dirty-rate', '10K', '--vcpus', '2', '--json', ...agent]);
    expect(created.code).toBe(0);
    expect(JSON.parse(created.stdout)).toMatchObject({ name: 'db', memory: 2 * 1024 * 1024, dirtyRate: 10 * 1024, vcpus: 2, state: 'created' });
    const started = await run(['vm', 'start', 'db', ...agent]);
    expect(started).toMatchObject({ code: 0, stdout: 'vm db: running\n' });
    expect(driver.get('db')!.state).toBe('running');
    const crashed = await run(['vm', 'crash', 'db', ...agent]);
    expect(crashed.stdout).toBe('vm db: crashed\n');
  });

  it('vm load sets the load the VM reports; --json prints the VM', async () => {
    driver.create({ name: 'hot' });
    driver.start('hot');
    const r = await run(['vm', 'load', 'hot', '0.85', ...agent]);
    expect(r).toMatchObject({ code: 0, stdout: 'vm hot: load 0.85\n' });
    expect(driver.counters('hot').load).toBe(0.85);
    const json = await run(['vm', 'load', 'hot', '.5', '--json', ...agent]);
    expect(json.code).toBe(0);
    expect(JSON.parse(json.stdout)).toMatchObject({ name: 'hot', state: 'running' });
    expect(driver.counters('hot').load).toBe(0.5);
    driver.create({ name: 'cold' });
    const idle = await run(['vm', 'load', 'cold', '1', ...agent]);
    expect(idle.stdout).toBe('vm cold: load 1 (reported once it runs; it is created)\n');
  });

  it('vm load refuses a bad load before it reaches the agent, and an unknown VM with the server code', async () => {
    driver.create({ name: 'kept' });
    driver.start('kept');
    driver.setLoad('kept', 0.3);
    for (const bad of ['2', '90%', 'NaN', '1e0', '']) {
      const r = await run(['vm', 'load', 'kept', bad, ...agent]);
      expect(r.code, bad).toBe(2);
    }
    expect(driver.counters('kept').load).toBe(0.3);
    const ghost = await run(['vm', 'load', 'ghost', '0.5', ...agent]);
    expect(ghost.code).toBe(1);
    expect(ghost.stderr).toContain('EMBOT_ERR_VM_UNKNOWN');
  });

  it('errors from the agent exit 1 with the server code', async () => {
    const r = await run(['vm', 'stop', 'nope', ...agent]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/EMBOT_ERR_VM_UNKNOWN/);
    const dup = await run(['vm', 'create', 'web', ...agent]);
    expect(dup.code).toBe(1);
    expect(dup.stderr).toMatch(/EMBOT_ERR_VM_EXISTS/);
    const badType = await run(['events', 'emit', '--element', 'vm:web', '--type', 'lower', ...agent]);
    expect(badType.code).toBe(1);
    expect(badType.stderr).toContain('EMBOT_ERR_EVENT_INVALID');
  });

  it('prints readable aligned tables without --json', async () => {
    const vms = await run(['vm', 'list', ...agent]);
    const lines = vms.stdout.trimEnd().split('\n');
    expect(lines[0]).toMatch(/^NAME\s+STATE\s+MEMORY\s+DIRTY RATE\s+VCPUS\s+CRASHES\s+UDP$/);
    const web = lines.find((l) => l.startsWith('web '))!;
    expect(web).toMatch(/^web\s+created\s+1 MiB\s+/);
    expect(web.indexOf('created')).toBe(lines[0]!.indexOf('STATE'));

    const status = await run(['status', ...agent]);
    expect(status.stdout).toMatch(/^agent:\s+cli-test/m);
    expect(status.stdout).toMatch(/^uptime:\s+1m33s$/m);
    expect(status.stdout).toMatch(/^embots:\s+1 \(1 quarantined\)$/m);

    const embots = await run(['embots', ...agent]);
    expect(embots.stdout).toMatch(/vm-watchdog\/web\s+vm-watchdog\s+watchdog\s+vm:web\s+quarantined\s+restart=\{"backoff":"waiting"\}\s+threw in an action/);
    const plugins = await run(['plugins', ...agent]);
    expect(plugins.stdout).toMatch(/vm-watchdog\s+1\.2\.3\s+loaded\s+watchdog\s+0\s+sha256-0123…/);
  });

  it('events emit journals the payload; events list shows it', async () => {
    const r = await run(['events', 'emit', '--element', 'vm:web', '--type', 'LOAD_HIGH', '--payload', '{"load":0.95}', ...agent]);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^journaled event cli\.\d+ \(LOAD_HIGH for vm:web\)\n$/);
    expect(events.at(-1)).toMatchObject({ elementId: 'vm:web', type: 'LOAD_HIGH', payload: { load: 0.95 } });
    const list = await run(['events', 'list', '--limit', '1', ...agent]);
    expect(list.stdout).toMatch(/LOAD_HIGH\s+control\s+\{"load":0\.95\}/);
  });

  it('events dead shows each dead letter with its reason, and --json the records', async () => {
    const table = await run(['events', 'dead', ...agent]);
    expect(table.code).toBe(0);
    expect(table.stdout).toMatch(/^AT\s+EMBOT\s+EVENT\s+TYPE\s+ELEMENT\s+REASON\n/);
    expect(table.stdout).toMatch(/vm-watchdog\/watchdog\/vm:web\s+cli\.dead\s+VM_CRASHED\s+vm:web\s+EMBOT_ERR_PLUGIN_THREW: threw in an action/);
    const json = await run(['events', 'dead', '--json', ...agent]);
    expect(JSON.parse(json.stdout)).toEqual([expect.objectContaining({ embotId: 'vm-watchdog/watchdog/vm:web', reason: 'EMBOT_ERR_PLUGIN_THREW: threw in an action' })]);
    const bad = await run(['events', 'dead', '--limit', 'zero', ...agent]);
    expect(bad.code).toBe(2);
  });
});

describe('cli with a token', () => {
  it('sends --token or EMBOT_CONTROL_TOKEN; a missing token is a clear 401 error', async () => {
    const token = 'cli-token-abcdef';
    const secured = await startControlServer({ host: '127.0.0.1', port: 0, token, control: simControl(driver, []), logger: createLogger({ level: 'silent' }) });
    try {
      expect((await run(['status', '--json', '--agent', secured.url, '--token', token])).code).toBe(0);
      expect((await run(['status', '--json'], { EMBOT_AGENT: secured.url, EMBOT_CONTROL_TOKEN: token })).code).toBe(0);
      const denied = await run(['status', '--agent', secured.url]);
      expect(denied.code).toBe(1);
      expect(denied.stderr).toContain('EMBOT_ERR_CONTROL_UNAUTHORIZED');
    } finally {
      await secured.close();
    }
  });
});

describe('embot agent', () => {
  it('runs the agent, prints the ready line, answers the CLI and stops cleanly on abort', async () => {
    const stop = new AbortController();
    let stdout = '';
    const exit = main(
      ['node', 'embot', 'agent', '--name', 'cli-agent', '--control', '127.0.0.1:0', '--data', join(tmp, 'data'), '--plugins', join(tmp, 'plugins'), '--safe', '--log-level', 'silent'],
      { stdout: { write: (s: string) => (stdout += s) }, stderr: { write: () => true }, env: {}, signal: stop.signal },
    );
    const deadline = Date.now() + 20_000;
    while (!stdout.includes('ready') && Date.now() < deadline) await new Promise((r) => setTimeout(r, 25));
    const m = /^embot agent cli-agent ready: control (http:\/\/127\.0\.0\.1:\d+)\n$/.exec(stdout);
    expect(m, stdout).not.toBeNull();
    const status = await run(['status', '--json', '--agent', m![1]!]);
    expect(status.code).toBe(0);
    expect(JSON.parse(status.stdout)).toMatchObject({ name: 'cli-agent', safe: true, driver: 'sim' });
    // Without --secret-file the agent cannot migrate: the refusal names the missing secret.
    const noSecret = await run(['migrate', 'web', '--to', 'b', '--agent', m![1]!]);
    expect(noSecret.code).toBe(2);
    expect(noSecret.stderr).toMatch(/no cluster secret.*EMBOT_ERR_CONFIG_INVALID/);
    stop.abort();
    expect(await exit).toBe(0);
    expect((await run(['status', '--agent', m![1]!])).code).toBe(1);
  });
});

describe('embot agent with peers', () => {
  it('--peers, --peer-listen and --secret-file reach the agent: it knows peer b and refuses unknown ones', async () => {
    const secret = join(tmp, 'cluster-secret');
    writeFileSync(secret, 'a-cluster-secret-of-enough-bytes\n');
    const stop = new AbortController();
    let stdout = '';
    const exit = main(
      [
        'node', 'embot', 'agent', '--name', 'cli-peer', '--control', '127.0.0.1:0', '--data', join(tmp, 'data-peer'), '--plugins', join(tmp, 'plugins'),
        '--safe', '--log-level', 'silent', '--peer-listen', '127.0.0.1:0', '--secret-file', secret, '--peers', 'b=ws://127.0.0.1:9,c2=ws://127.0.0.1:10',
      ],
      { stdout: { write: (s: string) => (stdout += s) }, stderr: { write: () => true }, env: {}, signal: stop.signal },
    );
    try {
      const deadline = Date.now() + 20_000;
      while (!stdout.includes('ready') && Date.now() < deadline) await new Promise((r) => setTimeout(r, 25));
      const m = /^embot agent cli-peer ready: control (http:\/\/127\.0\.0\.1:\d+)(?:, peer ws:\/\/127\.0\.0\.1:\d+\S*)?\n$/.exec(stdout);
      expect(m, stdout).not.toBeNull();
      const url = m![1]!;
      // Peer b is known (the secret is loaded too), so the refusal is about the VM, not the peer.
      const ghost = await run(['migrate', 'ghost', '--to', 'b', '--agent', url]);
      expect(ghost.code).toBe(1);
      expect(ghost.stderr).toContain('EMBOT_ERR_VM_UNKNOWN');
      const unknownPeer = await run(['migrate', 'ghost', '--to', 'zz', '--agent', url]);
      expect(unknownPeer.code).toBe(1);
      expect(unknownPeer.stderr).toMatch(/no peer named 'zz'; known: b, c2.*EMBOT_ERR_PEER_UNKNOWN/);
    } finally {
      stop.abort();
      expect(await exit).toBe(0);
    }
  });

  it('the ready line names the peer endpoint only when the agent has one', () => {
    expect(formatReadyLine('a', { controlUrl: 'http://127.0.0.1:7400' })).toBe('embot agent a ready: control http://127.0.0.1:7400');
    expect(formatReadyLine('a', { controlUrl: 'http://127.0.0.1:7400', peerUrl: undefined })).toBe('embot agent a ready: control http://127.0.0.1:7400');
    expect(formatReadyLine('a', { controlUrl: 'http://127.0.0.1:7400', peerUrl: 'ws://127.0.0.1:7401' })).toBe(
      'embot agent a ready: control http://127.0.0.1:7400, peer ws://127.0.0.1:7401',
    );
  });
});
