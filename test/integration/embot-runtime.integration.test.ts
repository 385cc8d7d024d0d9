import { afterEach, describe, expect, it } from 'vitest';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Store } from '../../core/store/store.ts';
import { SensorService } from '../../sensors/sensor-service.ts';
import { EffectorRegistry } from '../../effectors/effector-registry.ts';
import { HypervisorEffector } from '../../effectors/hypervisor/hypervisor-effector.ts';
import { SimDriver } from '../../effectors/hypervisor/sim-driver.ts';
import { EmbotRuntime, type RuntimeModule } from '../../embots/embot-runtime.ts';
import { checkModuleDir } from '../../core/plugins/catalogue.ts';
import { EMBOT_API_VERSION } from '../../embots/policy-api.ts';
import { ErrorCodes } from '../../core/errors.ts';
import { FIXTURE_PLUGINS, waitFor } from '../harness/agent-process.ts';

/** In-process runtime over real parts: SQLite file, sensor service, sim driver, worker threads. */
class Rig {
  readonly store: Store;
  readonly sensors: SensorService;
  readonly driver = new SimDriver();
  readonly effectors = new EffectorRegistry();
  readonly runtime: EmbotRuntime;

  constructor(readonly file: string, config: Record<string, Record<string, unknown>> = {}) {
    this.store = Store.open({ file });
    this.sensors = new SensorService({ host: 'a', store: this.store });
    this.effectors.register(new HypervisorEffector(this.driver));
    this.runtime = new EmbotRuntime({ store: this.store, sensors: this.sensors, effectors: this.effectors, moduleConfig: (m) => config[m], restartWindowMs: 60_000, maxRestarts: 2 });
  }

  async close(): Promise<void> {
    await this.sensors.idle();
    await this.runtime.close();
    await this.sensors.close();
    this.driver.close();
    this.store.close();
  }

  async settle(): Promise<void> {
    await this.sensors.idle();
    await this.runtime.idle();
    await this.sensors.idle();
    await this.runtime.idle();
  }

  policy(embotId: string) {
    return this.runtime.get(embotId)?.policies[0];
  }
}

function fixture(name: string): RuntimeModule {
  const c = checkModuleDir(join(FIXTURE_PLUGINS, name), EMBOT_API_VERSION);
  if (!('record' in c) || !c.record) throw new Error(`fixture ${name} invalid: ${JSON.stringify(c)}`);
  return c.record as RuntimeModule;
}

const vm = (name: string) => ({ id: `vm:${name}`, kind: 'vm', scope: [`vm:${name}`] });
const rigs: Rig[] = [];
function rig(file: string, config?: Record<string, Record<string, unknown>>): Rig {
  const r = new Rig(file, config);
  rigs.push(r);
  return r;
}
afterEach(async () => {
  for (const r of rigs.splice(0)) await r.close().catch(() => {});
});

function tmpFile(): string {
  return join(mkdtempSync(join(tmpdir(), 'embot-rt-')), 'embot.sqlite');
}

describe('embot runtime', () => {
  it('delivers every event of an element to its policy once and in order, and journals until committed', async () => {
    const r = rig(tmpFile());
    await r.runtime.loadModule(fixture('counter'));
    await r.runtime.attach(vm('a'));
    const id = 'counter/counter/vm:a';
    const N = 3000;
    const emits = [];
    for (let i = 0; i < N; i++) emits.push(r.sensors.emit({ elementId: 'vm:a', type: 'TICK', payload: { seq: i }, ts: 1_000_000 + i }));
    await Promise.all(emits);
    await r.settle();
    const ctx = (r.store.db.prepare('SELECT snapshot FROM policy_snapshots WHERE embot_id = ?').get(id) as { snapshot: Buffer } | undefined);
    expect(ctx).toBeDefined();
    const { unpack } = await import('msgpackr');
    const snap = unpack(ctx!.snapshot) as { context: { count: number; lastSeq: number; outOfOrder: number } };
    expect(snap.context.count).toBe(N);
    expect(snap.context.lastSeq).toBe(N - 1);
    expect(snap.context.outOfOrder).toBe(0);
    expect((r.store.db.prepare('SELECT count(*) AS n FROM events').get() as { n: number }).n).toBe(0);
  });

  it('restores policy state and re-arms a pending delayed transition at its original deadline', async () => {
    const file = tmpFile();
    const r1 = rig(file, { counter: { delayMs: 1500 } });
    await r1.runtime.loadModule(fixture('counter'));
    await r1.runtime.attach(vm('a'));
    await r1.sensors.emit({ elementId: 'vm:a', type: 'TICK', payload: { seq: 0 } });
    const armedAt = Date.now();
    await r1.sensors.emit({ elementId: 'vm:a', type: 'ARM', payload: null });
    await r1.settle();
    expect(r1.policy('counter/counter/vm:a')?.state).toBe('armed');
    await r1.close();
    rigs.splice(rigs.indexOf(r1), 1);

    const r2 = rig(file, { counter: { delayMs: 1500 } });
    const fired: number[] = [];
    r2.sensors.subscribe('vm:a', { deliver: (e) => { if (e.type === 'COUNTER_FIRED') fired.push(Date.now()); } });
    await r2.runtime.loadModule(fixture('counter'));
    await r2.runtime.attach(vm('a'));
    expect(r2.policy('counter/counter/vm:a')?.state).toBe('armed');
    await waitFor(() => fired.length > 0, 5000, 'the re-armed delay to fire');
    // Fires at the original deadline (armedAt + 1500), not 1500 ms after the restart.
    expect(fired[0]! - armedAt).toBeGreaterThanOrEqual(1400);
    expect(fired[0]! - armedAt).toBeLessThan(2600);
    await waitFor(() => r2.policy('counter/counter/vm:a')?.state === 'counting', 2000, 'back to counting');
  });

  it('quarantines an embot whose action throws; other embots keep working; its events are dead-lettered', async () => {
    const r = rig(tmpFile());
    await r.runtime.loadModule(fixture('throwing'));
    await r.runtime.loadModule(fixture('counter'));
    await r.runtime.attach(vm('a'));
    await r.sensors.emit({ elementId: 'vm:a', type: 'BOOM', payload: null });
    await r.sensors.emit({ elementId: 'vm:a', type: 'TICK', payload: { seq: 1 } });
    await r.settle();
    await waitFor(() => r.runtime.get('throwing/thrower/vm:a')?.status === 'quarantined', 3000, 'quarantine');
    expect(r.runtime.get('throwing/thrower/vm:a')?.error).toContain('boom from plugin');
    await r.sensors.emit({ elementId: 'vm:a', type: 'TICK', payload: { seq: 2 } });
    await r.settle();
    expect(r.runtime.get('counter/counter/vm:a')?.status).toBe('running');
    expect(r.runtime.deadLetterCount()).toBeGreaterThanOrEqual(1);
    const row = r.store.db.prepare("SELECT status FROM embots WHERE id = 'throwing/thrower/vm:a'").get() as { status: string };
    expect(row.status).toBe('quarantined');
  });

  it('detects a plugin stuck in a loop, quarantines that embot, restarts its worker and keeps the others', async () => {
    const r = rig(tmpFile());
    await r.runtime.loadModule(fixture('looping'));
    await r.runtime.attach(vm('a'));
    await r.runtime.attach(vm('b'));
    await r.sensors.emit({ elementId: 'vm:a', type: 'HANG', payload: null });
    await waitFor(() => r.runtime.get('looping/looper/vm:a')?.status === 'quarantined', 8000, 'hang quarantine');
    expect(r.runtime.get('looping/looper/vm:a')?.error).toContain(ErrorCodes.PLUGIN_TIMEOUT);
    // The restarted worker still serves the other embot of the module.
    await r.sensors.emit({ elementId: 'vm:b', type: 'NOTHING', payload: null });
    await r.settle();
    expect(r.runtime.get('looping/looper/vm:b')?.status).toBe('running');
    expect(r.runtime.loadedModules().find((m) => m.name === 'looping')?.restarts).toBe(1);
  });

  it('quarantines an embot that floods the queue with its own events', async () => {
    const r = rig(tmpFile());
    await r.runtime.loadModule(fixture('flooding'));
    await r.runtime.loadModule(fixture('counter'));
    await r.runtime.attach(vm('a'));
    await r.sensors.emit({ elementId: 'vm:a', type: 'ECHO', payload: null });
    await waitFor(() => r.runtime.get('flooding/flooder/vm:a')?.status === 'quarantined', 8000, 'flood quarantine');
    expect(r.runtime.get('flooding/flooder/vm:a')?.error).toContain(ErrorCodes.EMBOT_FLOOD);
    await r.sensors.emit({ elementId: 'vm:a', type: 'TICK', payload: { seq: 7 } });
    await r.settle();
    expect(r.runtime.get('counter/counter/vm:a')?.status).toBe('running');
  });

  it('refuses a module whose entry does not parse, and stays usable', async () => {
    const r = rig(tmpFile());
    await expect(r.runtime.loadModule(fixture('syntax-error'))).rejects.toMatchObject({ code: ErrorCodes.PLUGIN_LOAD_FAILED });
    await r.runtime.loadModule(fixture('counter'));
    await r.runtime.attach(vm('a'));
    await r.sensors.emit({ elementId: 'vm:a', type: 'TICK', payload: { seq: 0 } });
    await r.settle();
    expect(r.runtime.get('counter/counter/vm:a')?.status).toBe('running');
  });

  it('performs effects after commit and reports their outcome as events', async () => {
    const r = rig(tmpFile());
    r.driver.create({ name: 'a', memory: 1 << 20 });
    r.driver.start('a');
    r.driver.crash('a');
    const outcomes: string[] = [];
    r.sensors.subscribe('vm:a', { deliver: (e) => { if (e.type.startsWith('EFFECT_')) outcomes.push(e.type); } });
    await r.runtime.loadModule(fixture('counter'));
    await r.runtime.attach(vm('a'));
    await r.sensors.emit({ elementId: 'vm:a', type: 'VM_CRASHED', payload: null });
    await waitFor(() => outcomes.length > 0, 3000, 'effect outcome');
    expect(outcomes[0]).toBe('EFFECT_DONE');
    expect(r.driver.get('a')?.state).toBe('running');
  });
});
