import { createHash } from 'node:crypto';
import { request as httpRequest } from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ControlClient } from '../../core/control/client.ts';
import type { AgentControl, AgentStatus, DeadLetter, EmbotEvent, EmbotEventInput, EmbotInfo, MigrationInfo, MigrationSummary, PluginInfo } from '../../core/control/control-api.ts';
import { startControlServer, type ControlServer } from '../../core/control/server.ts';
import { ConfigError, ControlError, ErrorCodes, EffectorError, EventError, isEmbotError } from '../../core/errors.ts';
import { createLogger } from '../../core/logger.ts';
import { SimDriver } from '../../effectors/hypervisor/sim/sim-driver.ts';

const logger = createLogger({ level: 'silent' });

/**
 * An AgentControl over the real SimDriver; the event journal, embots and plugins are a test
 * double (plain arrays), since this file tests the HTTP layer, not the agent.
 */
class SimBackedControl implements AgentControl {
  readonly driver = new SimDriver({ tickMs: 1000 });
  readonly events: EmbotEvent[] = [];
  failNext: 'throw' | 'reject' | undefined;
  private seq = 0;

  status(): AgentStatus {
    return {
      name: 'test-agent',
      version: '0.0.0-test',
      pid: process.pid,
      startedAt: 1,
      uptimeMs: 2,
      driver: 'sim',
      safe: false,
      dataDir: '/tmp/x',
      pluginsDir: '/tmp/p',
      control: { host: '127.0.0.1', port: 0 },
      counts: { vms: this.driver.list().length, elements: 0, embots: 1, quarantinedEmbots: 0, modules: 1, modulesWithErrors: 0, queuedEvents: 0, heldEvents: 0, parkedEvents: 0, deadLetters: 0 },
    };
  }
  listVms() {
    return this.driver.list();
  }
  createVm(spec: Parameters<AgentControl['createVm']>[0]) {
    return this.driver.create(spec);
  }
  async vmAction(name: string, action: 'start' | 'stop' | 'crash') {
    return this.driver[action](name);
  }
  async setVmLoad(name: string, load: number) {
    this.driver.setLoad(name, load);
    return this.driver.get(name)!;
  }
  async vmChecksum(name: string) {
    const vm = this.driver.get(name)!;
    return { name, state: vm.state, memory: vm.memory, sha256: createHash('sha256').update(this.driver.pages(name).memory).digest('hex') };
  }
  listEmbots(): EmbotInfo[] {
    if (this.failNext === 'throw') {
      this.failNext = undefined;
      throw new TypeError('boom from a buggy handler');
    }
    return [{ id: 'e1', module: 'vm-watchdog', type: 'watchdog', elementIds: ['vm:web'], status: 'running', policies: [{ name: 'restart', state: { watching: 'idle' }, updatedAt: 5 }] }];
  }
  listPlugins(): PluginInfo[] {
    return [{ name: 'vm-watchdog', version: '1.0.0', hash: 'sha256-abcdef0123456789', status: 'loaded', restarts: 0, embotTypes: ['watchdog'], dir: '/plugins/vm-watchdog' }];
  }
  async emitEvent(input: EmbotEventInput): Promise<EmbotEvent> {
    if (this.failNext === 'reject') {
      this.failNext = undefined;
      throw new Error('journal on fire');
    }
    const id = input.id ?? `test.${this.seq++}`;
    if (this.events.some((e) => e.id === id)) throw new EventError(ErrorCodes.EVENT_DUPLICATE, `event ${id} already journaled`);
    const event: EmbotEvent = { id, ts: input.ts ?? Date.now(), elementId: input.elementId, type: input.type, payload: input.payload ?? null, ...(input.source ? { source: input.source } : {}) };
    this.events.push(event);
    return event;
  }
  listEvents(opts: { limit: number }) {
    return this.events.slice(-opts.limit);
  }
  readonly dead: DeadLetter[] = [];
  listDeadLetters(opts: { limit: number }) {
    return this.dead.slice(-opts.limit);
  }

  // Migrations: a test double that runs until the test calls finishMigration().
  hasSecret = true;
  readonly migrations = new Map<string, MigrationInfo>();
  private readonly ends = new Map<string, { promise: Promise<MigrationSummary>; resolve: (s: MigrationSummary) => void }>();
  migrate(vm: string, to: string | undefined): { readonly id: string } {
    if (!this.hasSecret) throw new ConfigError(ErrorCodes.CONFIG_INVALID, 'this agent has no cluster secret');
    // As the agent answers a body without `to` (a pre-warm's command) for a VM with no pre-warm.
    if (to === undefined) throw new ConfigError(ErrorCodes.DESTINATIONS_INVALID, `VM ${vm} has no pre-warm: name its destination(s)`);
    if (to !== 'b') throw new ConfigError(ErrorCodes.PEER_UNKNOWN, `no peer named '${to}'; known: b`);
    if (!this.driver.get(vm)) throw new EffectorError(ErrorCodes.VM_UNKNOWN, `no VM named ${vm}`);
    if ([...this.migrations.values()].some((m) => m.vm === vm && m.outcome === null)) throw new EffectorError(ErrorCodes.VM_BAD_STATE, `VM ${vm} is already migrating`);
    const id = `mig-${this.migrations.size + 1}`;
    this.migrations.set(id, { id, role: 'source', vm, peer: to, phase: 'requesting', outcome: null, startedAt: 1000, updatedAt: 1000, progress: { phase: 'requesting', bytes: 0, memoryBytes: 0, memoryTotal: 100, percent: 0 } });
    let resolve!: (s: MigrationSummary) => void;
    const promise = new Promise<MigrationSummary>((r) => (resolve = r));
    this.ends.set(id, { promise, resolve });
    return { id };
  }
  finishMigration(id: string): MigrationSummary {
    const m = this.migrations.get(id)!;
    const summary: MigrationSummary = { migrationId: id, vm: m.vm, from: 'a', to: m.peer, outcome: 'completed', totalMs: 42, phases: [{ phase: 'requesting', ms: 42 }], embots: 1, events: 2, modules: [], modulesShipped: 0, dirtyRounds: 1, bytes: 100, memoryBytes: 100, downtimeMs: 5, forwarded: 0, rounds: 2, paths: 1, estimateMs: 40, thresholdMs: 60000 };
    const { progress: _dropped, ...rest } = m;
    this.migrations.set(id, { ...rest, phase: 'completed', outcome: 'completed', updatedAt: 1042, summary });
    this.ends.get(id)!.resolve(summary);
    return summary;
  }
  listMigrations(): MigrationInfo[] {
    return [...this.migrations.values()];
  }
  getMigration(id: string): MigrationInfo | undefined {
    return this.migrations.get(id);
  }
  waitMigration(id: string): Promise<MigrationSummary | undefined> {
    return this.ends.get(id)?.promise ?? Promise.resolve(undefined);
  }
}

let control: SimBackedControl;
let server: ControlServer;

beforeAll(async () => {
  control = new SimBackedControl();
  server = await startControlServer({ host: '127.0.0.1', port: 0, control, logger });
});
afterAll(async () => {
  await server.close();
  control.driver.close();
});

async function call(method: string, path: string, body?: string, headers: Record<string, string> = {}): Promise<{ status: number; json: any }> {
  const res = await fetch(server.url + path, {
    method,
    headers: body === undefined ? headers : { 'Content-Type': 'application/json', ...headers },
    ...(body === undefined ? {} : { body }),
  });
  return { status: res.status, json: await res.json() };
}

describe('control server routes', () => {
  it('binds port 0 to a real port on loopback', () => {
    expect(server.url).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
    expect(server.port).toBeGreaterThan(0);
  });

  it('GET /v1/status returns the status object', async () => {
    const r = await call('GET', '/v1/status');
    expect(r.status).toBe(200);
    expect(r.json).toMatchObject({ name: 'test-agent', driver: 'sim', counts: { embots: 1 } });
  });

  it('creates, lists and drives VMs through the real sim driver', async () => {
    const created = await call('POST', '/v1/vms', JSON.stringify({ name: 'web', memory: 1 << 20, vcpus: 2 }));
    expect(created.status).toBe(201);
    expect(created.json).toMatchObject({ name: 'web', state: 'created', memory: 1 << 20, vcpus: 2 });
    expect((await call('GET', '/v1/vms')).json.map((v: { name: string }) => v.name)).toEqual(['web']);
    expect((await call('POST', '/v1/vms/web/start', '{}')).json.state).toBe('running');
    expect((await call('POST', '/v1/vms/web/crash', '{}')).json).toMatchObject({ state: 'crashed', crashes: 1 });
    expect(control.driver.get('web')!.state).toBe('crashed');
  });

  it('maps driver errors: unknown VM 404, bad state and duplicate 409', async () => {
    const unknown = await call('POST', '/v1/vms/nope/stop', '{}');
    expect(unknown).toMatchObject({ status: 404, json: { error: { code: ErrorCodes.VM_UNKNOWN } } });
    await call('POST', '/v1/vms', JSON.stringify({ name: 'db' }));
    const bad = await call('POST', '/v1/vms/db/stop', '{}');
    expect(bad).toMatchObject({ status: 409, json: { error: { code: ErrorCodes.VM_BAD_STATE } } });
    const dup = await call('POST', '/v1/vms', JSON.stringify({ name: 'db' }));
    expect(dup).toMatchObject({ status: 409, json: { error: { code: ErrorCodes.VM_EXISTS } } });
  });

  it('GET /v1/embots and /v1/plugins pass the agent data through', async () => {
    expect((await call('GET', '/v1/embots')).json[0]).toMatchObject({ id: 'e1', policies: [{ name: 'restart', state: { watching: 'idle' } }] });
    expect((await call('GET', '/v1/plugins')).json[0]).toMatchObject({ name: 'vm-watchdog', status: 'loaded' });
  });

  it('POST /v1/events journals with source=control; GET /v1/events honours limit, newest last', async () => {
    const a = await call('POST', '/v1/events', JSON.stringify({ elementId: 'vm:web', type: 'LOAD_HIGH', payload: { load: 0.9 }, ts: 1000 }));
    expect(a.status).toBe(201);
    expect(a.json).toMatchObject({ elementId: 'vm:web', type: 'LOAD_HIGH', payload: { load: 0.9 }, ts: 1000, source: 'control' });
    await call('POST', '/v1/events', JSON.stringify({ elementId: 'vm:web', type: 'LOAD_LOW', id: 'fixed-1' }));
    const last = await call('GET', '/v1/events?limit=1');
    expect(last.json.map((e: EmbotEvent) => e.type)).toEqual(['LOAD_LOW']);
    expect((await call('GET', '/v1/events')).json).toHaveLength(2);
    const dup = await call('POST', '/v1/events', JSON.stringify({ elementId: 'vm:web', type: 'LOAD_LOW', id: 'fixed-1' }));
    expect(dup).toMatchObject({ status: 409, json: { error: { code: ErrorCodes.EVENT_DUPLICATE } } });
  });
});

describe('control server VM load route', () => {
  it('POST /v1/vms/:name/load sets the load the running VM reports and answers the VM', async () => {
    control.driver.create({ name: 'busy' });
    control.driver.start('busy');
    const r = await call('POST', '/v1/vms/busy/load', JSON.stringify({ load: 0.75 }));
    expect(r).toMatchObject({ status: 200, json: { name: 'busy', state: 'running' } });
    expect(control.driver.counters('busy').load).toBe(0.75);
    expect((await call('POST', '/v1/vms/busy/load', JSON.stringify({ load: 0 }))).status).toBe(200);
    expect(control.driver.counters('busy').load).toBe(0);
    expect((await call('POST', '/v1/vms/busy/load', JSON.stringify({ load: 1 }))).status).toBe(200);
    expect(control.driver.counters('busy').load).toBe(1);
  });

  it.each([
    ['above 1', '{"load": 1.5}', /load: /],
    ['negative', '{"load": -0.1}', /load: /],
    ['a string', '{"load": "0.5"}', /load: /],
    ['missing', '{}', /load: /],
    ['an unknown field', '{"load": 0.5, "cpu": 2}', /unknown field cpu/],
    ['not JSON', '{"load":', /not valid JSON/],
    ['empty', '', /empty/],
  ])('bad load body (%s) → 400, the load unchanged', async (_name, body, message) => {
    const name = `steady-${_name.toLowerCase().replace(/\W+/g, '-')}`;
    control.driver.create({ name });
    control.driver.start(name);
    control.driver.setLoad(name, 0.25);
    const r = await call('POST', `/v1/vms/${name}/load`, body);
    expect(r.status).toBe(400);
    expect(r.json.error.code).toBe(ErrorCodes.CONTROL_BAD_REQUEST);
    expect(r.json.error.message).toMatch(message);
    expect(control.driver.counters(name).load).toBe(0.25);
  });

  it('unknown VM 404, wrong method 405, non-JSON content type 400', async () => {
    expect(await call('POST', '/v1/vms/ghost/load', JSON.stringify({ load: 0.5 }))).toMatchObject({ status: 404, json: { error: { code: ErrorCodes.VM_UNKNOWN } } });
    expect((await call('GET', '/v1/vms/busy/load')).status).toBe(405);
    const form = await call('POST', '/v1/vms/busy/load', 'load=0.9', { 'Content-Type': 'application/x-www-form-urlencoded' });
    expect(form.status).toBe(400);
    expect(form.json.error.message).toContain('Content-Type');
  });

  it('ControlClient.setVmLoad mirrors the route, errors carry the server code', async () => {
    const client = new ControlClient(server.url);
    control.driver.create({ name: 'via-client' });
    control.driver.start('via-client');
    expect(await client.setVmLoad('via-client', 0.4)).toMatchObject({ name: 'via-client', state: 'running' });
    expect(control.driver.counters('via-client').load).toBe(0.4);
    await expect(client.setVmLoad('via-client', 2)).rejects.toMatchObject({ code: ErrorCodes.CONTROL_BAD_REQUEST, details: { status: 400 } });
    await expect(client.setVmLoad('ghost', 0.5)).rejects.toMatchObject({ code: ErrorCodes.VM_UNKNOWN, details: { status: 404 } });
    expect(control.driver.counters('via-client').load).toBe(0.4);
  });
});

describe('control server migration routes', () => {
  function settled(p: Promise<unknown>): Promise<boolean> {
    return Promise.race([p.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 50))]);
  }

  it('POST /v1/migrations answers 202 {id}; GET lists it and shows it by id', async () => {
    control.driver.create({ name: 'mig-a' });
    const started = await call('POST', '/v1/migrations', JSON.stringify({ vm: 'mig-a', to: 'b' }));
    expect(started.status).toBe(202);
    expect(Object.keys(started.json)).toEqual(['id']);
    const id = started.json.id as string;
    const list = await call('GET', '/v1/migrations');
    expect(list.status).toBe(200);
    expect(list.json.find((m: MigrationInfo) => m.id === id)).toMatchObject({ vm: 'mig-a', peer: 'b', role: 'source', outcome: null });
    const one = await call('GET', `/v1/migrations/${id}`);
    expect(one).toMatchObject({ status: 200, json: { id, phase: 'requesting', outcome: null, progress: { percent: 0 } } });
    expect((await call('GET', `/v1/migrations/${id}?wait=0`)).json.outcome).toBeNull();
    control.finishMigration(id);
  });

  it('maps refusals: unknown peer 400, unknown VM 404, already migrating 409, no secret 400 CONFIG_INVALID', async () => {
    control.driver.create({ name: 'mig-busy' });
    const peer = await call('POST', '/v1/migrations', JSON.stringify({ vm: 'mig-busy', to: 'zz' }));
    expect(peer).toMatchObject({ status: 400, json: { error: { code: ErrorCodes.PEER_UNKNOWN } } });
    expect(peer.json.error.message).toContain("no peer named 'zz'");
    expect(await call('POST', '/v1/migrations', JSON.stringify({ vm: 'ghost', to: 'b' }))).toMatchObject({ status: 404, json: { error: { code: ErrorCodes.VM_UNKNOWN } } });
    const first = await call('POST', '/v1/migrations', JSON.stringify({ vm: 'mig-busy', to: 'b' }));
    expect(first.status).toBe(202);
    expect(await call('POST', '/v1/migrations', JSON.stringify({ vm: 'mig-busy', to: 'b' }))).toMatchObject({ status: 409, json: { error: { code: ErrorCodes.VM_BAD_STATE } } });
    control.finishMigration(first.json.id);
    control.hasSecret = false;
    try {
      expect(await call('POST', '/v1/migrations', JSON.stringify({ vm: 'mig-busy', to: 'b' }))).toMatchObject({ status: 400, json: { error: { code: ErrorCodes.CONFIG_INVALID } } });
    } finally {
      control.hasSecret = true;
    }
  });

  it.each([
    ['empty vm', '{"vm": "", "to": "b"}', /vm: /],
    ['unknown field', '{"vm": "mig-a", "to": "b", "force": true}', /unknown field force/],
    ['not JSON', '{"vm":', /not valid JSON/],
    ['a list', '["mig-a", "b"]', /expected object/],
  ])('bad migration body (%s) → 400, nothing started', async (_name, body, message) => {
    const before = control.migrations.size;
    const r = await call('POST', '/v1/migrations', body);
    expect(r.status).toBe(400);
    expect(r.json.error.code).toBe(ErrorCodes.CONTROL_BAD_REQUEST);
    expect(r.json.error.message).toMatch(message);
    expect(control.migrations.size).toBe(before);
  });

  it('a body without `to` is the command of a pre-warm: the agent decides (400 DESTINATIONS_INVALID when there is none), nothing started', async () => {
    const before = control.migrations.size;
    const r = await call('POST', '/v1/migrations', '{"vm": "mig-a"}');
    expect(r).toMatchObject({ status: 400, json: { error: { code: ErrorCodes.DESTINATIONS_INVALID } } });
    expect(control.migrations.size).toBe(before);
  });

  it('POST /v1/prewarms[/cancel]: a bad body 400, GET 405, a control without pre-warm 404', async () => {
    for (const body of ['{"vm": ""}', '{"vm": "mig-a", "to": "b"}', '{"vm": "mig-a", "force": true}', '{"vm":']) {
      const r = await call('POST', '/v1/prewarms', body);
      expect(r, body).toMatchObject({ status: 400, json: { error: { code: ErrorCodes.CONTROL_BAD_REQUEST } } });
    }
    expect((await call('GET', '/v1/prewarms')).status).toBe(405);
    expect((await call('POST', '/v1/prewarms', '{"vm": "mig-a", "to": ["b"]}')).status).toBe(404);
    expect((await call('POST', '/v1/prewarms/cancel', '{"vm": "mig-a"}')).status).toBe(404);
  });

  it('unknown id 404 (also with wait); wrong methods 405; bad wait parameters 400', async () => {
    for (const p of ['/v1/migrations/nope', '/v1/migrations/nope?wait=1']) {
      const r = await call('GET', p);
      expect(r, p).toMatchObject({ status: 404, json: { error: { code: ErrorCodes.CONTROL_NOT_FOUND } } });
      expect(r.json.error.message).toContain('no migration "nope"');
    }
    expect((await call('DELETE', '/v1/migrations')).status).toBe(405);
    expect((await call('POST', '/v1/migrations/x', '{}')).status).toBe(405);
    control.driver.create({ name: 'mig-q' });
    const { id } = (await call('POST', '/v1/migrations', JSON.stringify({ vm: 'mig-q', to: 'b' }))).json;
    for (const q of ['wait=yes', 'wait=1&timeoutMs=0', 'wait=1&timeoutMs=-5', 'wait=1&timeoutMs=1.5', 'wait=1&timeoutMs=abc', 'wait=1&timeoutMs=3600001']) {
      const r = await call('GET', `/v1/migrations/${id}?${q}`);
      expect(r.status, q).toBe(400);
      expect(r.json.error.code).toBe(ErrorCodes.CONTROL_BAD_REQUEST);
    }
    control.finishMigration(id);
  });

  it('?wait=1 answers only once the migration ended, with its summary', async () => {
    control.driver.create({ name: 'mig-w' });
    const { id } = (await call('POST', '/v1/migrations', JSON.stringify({ vm: 'mig-w', to: 'b' }))).json;
    const waiting = call('GET', `/v1/migrations/${id}?wait=1`);
    expect(await settled(waiting)).toBe(false);
    const summary = control.finishMigration(id);
    const r = await waiting;
    expect(r.status).toBe(200);
    expect(r.json).toMatchObject({ id, outcome: 'completed', phase: 'completed' });
    expect(r.json.summary).toEqual(summary);
    // A finished migration answers at once.
    expect((await call('GET', `/v1/migrations/${id}?wait=1`)).json.outcome).toBe('completed');
  });

  it('?wait=1&timeoutMs bounds the wait: a still-running migration comes back with outcome null', async () => {
    control.driver.create({ name: 'mig-t' });
    const { id } = (await call('POST', '/v1/migrations', JSON.stringify({ vm: 'mig-t', to: 'b' }))).json;
    const r = await call('GET', `/v1/migrations/${id}?wait=1&timeoutMs=20`);
    expect(r).toMatchObject({ status: 200, json: { id, outcome: null, phase: 'requesting' } });
    control.finishMigration(id);
  });

  it('ControlClient mirrors the routes', async () => {
    const client = new ControlClient(server.url);
    control.driver.create({ name: 'mig-c' });
    const { id } = await client.migrate('mig-c', 'b');
    expect((await client.getMigration(id)).outcome).toBeNull();
    expect((await client.listMigrations()).map((m) => m.id)).toContain(id);
    expect((await client.waitMigration(id, { timeoutMs: 20 })).outcome).toBeNull();
    const pending = client.waitMigration(id);
    control.finishMigration(id);
    expect(await pending).toMatchObject({ id, outcome: 'completed', summary: { embots: 1, events: 2 } });
    await expect(client.getMigration('nope')).rejects.toMatchObject({ code: ErrorCodes.CONTROL_NOT_FOUND, details: { status: 404 } });
    await expect(client.migrate('mig-c', 'zz')).rejects.toMatchObject({ code: ErrorCodes.PEER_UNKNOWN, details: { status: 400 } });
  });

  it('closing the server ends a pending wait (the client sees the agent gone)', async () => {
    const tmp = await startControlServer({ host: '127.0.0.1', port: 0, control, logger });
    control.driver.create({ name: 'mig-x' });
    const client = new ControlClient(tmp.url);
    const { id } = await client.migrate('mig-x', 'b');
    const pending = client.waitMigration(id).catch((e: unknown) => e);
    expect(await settled(pending)).toBe(false);
    await tmp.close();
    expect(isEmbotError(await pending, ErrorCodes.CONTROL_UNREACHABLE)).toBe(true);
    control.finishMigration(id);
  });
});

describe('control server bad input', () => {
  it.each([
    ['bad JSON', '/v1/vms', '{"name": ', ErrorCodes.CONTROL_BAD_REQUEST, /not valid JSON/],
    ['empty body', '/v1/vms', '', ErrorCodes.CONTROL_BAD_REQUEST, /empty/],
    ['wrong field type', '/v1/vms', '{"name": 5}', ErrorCodes.CONTROL_BAD_REQUEST, /name: /],
    ['unknown field', '/v1/vms', '{"name": "x", "evil": true}', ErrorCodes.CONTROL_BAD_REQUEST, /unknown field evil/],
    ['negative memory', '/v1/vms', '{"name": "x", "memory": -1}', ErrorCodes.CONTROL_BAD_REQUEST, /memory: /],
    ['array body', '/v1/events', '[1,2]', ErrorCodes.CONTROL_BAD_REQUEST, /expected object/],
    ['lower-case event type', '/v1/events', '{"elementId": "vm:web", "type": "oops"}', ErrorCodes.EVENT_INVALID, /SCREAMING_CASE/],
    ['bad element id', '/v1/events', '{"elementId": "has space", "type": "X"}', ErrorCodes.EVENT_INVALID, /element id/],
    ['missing type', '/v1/events', '{"elementId": "vm:web"}', ErrorCodes.CONTROL_BAD_REQUEST, /type: /],
  ])('%s → 400 %s', async (_name, path, body, code, message) => {
    const r = await call('POST', path, body);
    expect(r.status).toBe(400);
    expect(r.json.error.code).toBe(code);
    expect(r.json.error.message).toMatch(message);
  });

  it('refuses a POST that is not declared as JSON (cross-site form posts)', async () => {
    control.driver.create({ name: 'csrf' });
    const r = await call('POST', '/v1/vms/csrf/start', 'x', { 'Content-Type': 'text/plain' });
    expect(r).toMatchObject({ status: 400, json: { error: { code: ErrorCodes.CONTROL_BAD_REQUEST } } });
    expect(r.json.error.message).toContain('Content-Type');
    // A bodiless no-cors fetch from a web page carries no Content-Type at all.
    const bare = await fetch(`${server.url}/v1/vms/csrf/start`, { method: 'POST' });
    expect(bare.status).toBe(400);
    expect(control.driver.get('csrf')!.state).toBe('created');
    // A JSON-typed empty body is fine for actions.
    expect((await call('POST', '/v1/vms/csrf/start', '')).json.state).toBe('running');
  });

  it('refuses a body over 1 MiB with 400 and keeps serving', async () => {
    const big = JSON.stringify({ name: 'huge', pad: 'x'.repeat(1024 * 1024 + 10) });
    const r = await call('POST', '/v1/vms', big);
    expect(r.status).toBe(400);
    expect(r.json.error).toMatchObject({ code: ErrorCodes.CONTROL_BAD_REQUEST });
    expect(r.json.error.message).toMatch(/limit is 1048576 bytes/);
    expect(control.driver.get('huge')).toBeUndefined();
    expect((await call('GET', '/v1/status')).status).toBe(200);
  });

  it('rejects bad limits', async () => {
    for (const q of ['abc', '0', '-1', '100001', '1.5']) {
      const r = await call('GET', `/v1/events?limit=${q}`);
      expect(r.status, q).toBe(400);
      expect(r.json.error.code).toBe(ErrorCodes.CONTROL_BAD_REQUEST);
    }
  });

  it('404 for unknown routes and actions, 405 for a wrong method', async () => {
    for (const p of ['/v1/nope', '/', '/v2/status', '/v1/vms/web/explode', '/v1/vms/web']) {
      const r = await call('GET', p);
      expect(r.status, p).toBe(404);
      expect(r.json.error.code).toBe(ErrorCodes.CONTROL_NOT_FOUND);
    }
    const wrong = await call('DELETE', '/v1/vms');
    expect(wrong.status).toBe(405);
    expect(wrong.json.error.message).toContain('DELETE is not allowed');
  });

  it('a handler that throws or rejects gives 500 and the server keeps answering', async () => {
    control.failNext = 'throw';
    const r = await call('GET', '/v1/embots');
    expect(r).toMatchObject({ status: 500, json: { error: { code: ErrorCodes.CONTROL_INTERNAL } } });
    expect(r.json.error.message).toContain('boom from a buggy handler');
    control.failNext = 'reject';
    expect((await call('POST', '/v1/events', JSON.stringify({ elementId: 'vm:web', type: 'X' }))).status).toBe(500);
    expect((await call('GET', '/v1/status')).status).toBe(200);
    expect((await call('GET', '/v1/embots')).status).toBe(200);
  });

  it('refuses a non-loopback Host header when no token is set (DNS rebinding)', async () => {
    const status = await new Promise<number>((resolve, reject) => {
      const req = httpRequest(`${server.url}/v1/status`, { headers: { Host: 'evil.example:80' } }, (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      });
      req.on('error', reject);
      req.end();
    });
    expect(status).toBe(400);
  });
});

describe('control server with a token', () => {
  let secured: ControlServer;
  const token = 'correct-horse-battery-staple';
  beforeAll(async () => {
    secured = await startControlServer({ host: '127.0.0.1', port: 0, token, control, logger });
  });
  afterAll(() => secured.close());

  it('401 without or with a wrong token, 200 with the right one', async () => {
    const none = await fetch(`${secured.url}/v1/status`);
    expect(none.status).toBe(401);
    expect(none.headers.get('www-authenticate')).toContain('Bearer');
    expect(((await none.json()) as { error: { code: string } }).error.code).toBe(ErrorCodes.CONTROL_UNAUTHORIZED);
    for (const auth of ['Bearer wrong', `Bearer ${token}x`, token, 'Basic abc']) {
      expect((await fetch(`${secured.url}/v1/status`, { headers: { Authorization: auth } })).status, auth).toBe(401);
    }
    expect((await fetch(`${secured.url}/v1/nope`)).status).toBe(401); // no route probing without the token
    expect((await fetch(`${secured.url}/v1/status`, { headers: { Authorization: `Bearer ${token}` } })).status).toBe(200);
  });

  it('the client sends the token and maps 401 to CONTROL_UNAUTHORIZED', async () => {
    expect((await new ControlClient(secured.url, token).status()).name).toBe('test-agent');
    await expect(new ControlClient(secured.url).status()).rejects.toMatchObject({ code: ErrorCodes.CONTROL_UNAUTHORIZED });
  });
});

describe('control server refusals at start', () => {
  it('will not listen beyond loopback without a token', async () => {
    const err = await startControlServer({ host: '0.0.0.0', port: 0, control, logger }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ConfigError);
    expect((err as ConfigError).code).toBe(ErrorCodes.CONFIG_INVALID);
    expect((err as ConfigError).message).toMatch(/not a loopback address.*token/);
  });

  it('reports a port in use as a config error', async () => {
    const err = await startControlServer({ host: '127.0.0.1', port: server.port, control, logger }).catch((e: unknown) => e);
    expect(isEmbotError(err, ErrorCodes.CONFIG_INVALID)).toBe(true);
    expect((err as Error).message).toContain('already in use');
  });
});

describe('ControlClient', () => {
  it('returns typed results and maps error bodies back to ControlError with the server code', async () => {
    const client = new ControlClient(server.url + '/');
    const vm = await client.createVm({ name: 'cli-vm' });
    expect(vm.state).toBe('created');
    expect((await client.vmAction('cli-vm', 'start')).state).toBe('running');
    const err = await client.vmAction('cli-vm', 'start').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ControlError);
    expect(err).toMatchObject({ code: ErrorCodes.VM_BAD_STATE, details: { status: 409 } });
    await client.vmAction('cli-vm', 'stop');
    const ev = await client.emitEvent({ elementId: 'vm:cli-vm', type: 'HELLO' });
    expect((await client.listEvents({ limit: 1 }))[0]).toEqual(ev);
  });

  it('lists dead letters, newest last, bounded by limit; a bad limit is a 400', async () => {
    const client = new ControlClient(server.url);
    const letter = (n: number): DeadLetter => ({ embotId: 'm/t/vm:a', event: { id: `d.${n}`, ts: n, elementId: 'vm:a', type: 'TICK', payload: null }, reason: `reason ${n}`, at: 1000 + n });
    control.dead.push(letter(1), letter(2), letter(3));
    expect(await client.listDeadLetters({ limit: 2 })).toEqual([letter(2), letter(3)]);
    expect(await client.listDeadLetters()).toHaveLength(3);
    for (const bad of ['0', 'x', '-1', '1e3']) {
      const r = await fetch(`${server.url}/v1/events/dead?limit=${bad}`);
      expect(r.status).toBe(400);
      expect(((await r.json()) as { error: { code: string } }).error.code).toBe(ErrorCodes.CONTROL_BAD_REQUEST);
    }
    expect((await fetch(`${server.url}/v1/events/dead`, { method: 'POST' })).status).toBe(405);
  });

  it('an agent that is not running gives CONTROL_UNREACHABLE with a helpful message', async () => {
    const tmp = await startControlServer({ host: '127.0.0.1', port: 0, control, logger });
    const url = tmp.url;
    await tmp.close();
    const err = await new ControlClient(url).status().catch((e: unknown) => e);
    expect(isEmbotError(err, ErrorCodes.CONTROL_UNREACHABLE)).toBe(true);
    expect((err as Error).message).toBe(`no embot agent at ${url} (connection refused; is it running? start one with \`embot agent\`)`);
  });

  it('refuses a malformed agent URL', () => {
    expect(() => new ControlClient('127.0.0.1:7400')).toThrow(/http:\/\//);
    expect(() => new ControlClient('not a url')).toThrow(/not a URL/);
  });
});
