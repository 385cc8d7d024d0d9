import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Store } from '../../core/store/store.ts';
import { SensorService } from '../../sensors/sensor-service.ts';
import { EffectorRegistry } from '../../effectors/effector-registry.ts';
import { HypervisorEffector } from '../../effectors/hypervisor/hypervisor-effector.ts';
import { SimDriver } from '../../effectors/hypervisor/sim/sim-driver.ts';
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

  constructor(readonly file: string, config: Record<string, Record<string, unknown>> = {}, options: { readonly maxParkedPerEmbot?: number } = {}) {
    this.store = Store.open({ file });
    this.sensors = new SensorService({ host: 'a', store: this.store });
    this.effectors.register(new HypervisorEffector(this.driver));
    this.runtime = new EmbotRuntime({ store: this.store, sensors: this.sensors, effectors: this.effectors, moduleConfig: (m) => config[m], restartWindowMs: 60_000, maxRestarts: 2, ...options });
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
function rig(file: string, config?: Record<string, Record<string, unknown>>, options?: { readonly maxParkedPerEmbot?: number }): Rig {
  const r = new Rig(file, config, options);
  rigs.push(r);
  return r;
}
afterEach(async () => {
  for (const r of rigs.splice(0)) await r.close().catch(() => {});
});

const tmpDirs: string[] = [];
afterAll(() => {
  for (const d of tmpDirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

function tmpFile(): string {
  const dir = mkdtempSync(join(tmpdir(), 'embot-rt-'));
  tmpDirs.push(dir);
  return join(dir, 'embot.sqlite');
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

  describe('events for an embot whose module is not loaded', () => {
    const COUNTER = 'counter/counter/vm:a';
    const tick = (r: Rig, seq: number): Promise<unknown> => r.sensors.emit({ elementId: 'vm:a', type: 'TICK', payload: { seq }, ts: 1_000_000 + seq });
    const context = async (r: Rig): Promise<{ count: number; lastSeq: number; outOfOrder: number }> => {
      const { unpack } = await import('msgpackr');
      const row = r.store.db.prepare('SELECT snapshot FROM policy_snapshots WHERE embot_id = ?').get(COUNTER) as { snapshot: Buffer };
      return (unpack(row.snapshot) as { context: { count: number; lastSeq: number; outOfOrder: number } }).context;
    };
    /** A store whose counter embot processed TICK 0..n-1, closed: the next rig finds it as 'unloaded'. */
    const seeded = async (n: number): Promise<string> => {
      const file = tmpFile();
      const r = rig(file);
      await r.runtime.loadModule(fixture('counter'));
      await r.runtime.attach(vm('a'));
      await Promise.all(Array.from({ length: n }, (_, i) => tick(r, i)));
      await r.settle();
      await r.close();
      rigs.splice(rigs.indexOf(r), 1);
      return file;
    };

    it('wait, across a restart, and reach it first and in order once it loads, with events that arrive meanwhile', async () => {
      const file = await seeded(10);
      // Safe mode, in effect: the embot is known from the store, its module is not loaded.
      const r1 = rig(file);
      await r1.runtime.attach(vm('a')); // as the agent attaches every element at start, modules or not
      expect(r1.runtime.get(COUNTER)?.status).toBe('unloaded');
      await Promise.all(Array.from({ length: 3000 }, (_, i) => tick(r1, 10 + i)));
      await r1.settle();
      expect(r1.runtime.parkedCount()).toBe(3000);
      expect(r1.runtime.deadLetterCount()).toBe(0);
      expect((r1.store.db.prepare('SELECT count(*) AS n FROM events').get() as { n: number }).n).toBe(0);
      await r1.close();
      rigs.splice(rigs.indexOf(r1), 1);

      const r2 = rig(file);
      await r2.runtime.attach(vm('a'));
      expect(r2.runtime.parkedCount()).toBe(3000);
      await Promise.all(Array.from({ length: 200 }, (_, i) => tick(r2, 3010 + i)));
      // Events that come once the embot runs again, while its 3,200 parked events are still being
      // delivered (1000 per batch): they must queue behind them.
      const during: Promise<unknown>[] = [];
      r2.runtime.once('embot-created', () => {
        for (let i = 0; i < 1000; i++) during.push(tick(r2, 3210 + i));
      });
      await r2.runtime.loadModule(fixture('counter'));
      expect(during).toHaveLength(1000);
      await Promise.all(during);
      await r2.settle();
      expect(r2.runtime.get(COUNTER)?.status).toBe('running');
      expect(await context(r2)).toMatchObject({ count: 4210, lastSeq: 4209, outOfOrder: 0 });
      expect(r2.runtime.parkedCount()).toBe(0);
      expect(r2.runtime.deadLetterCount()).toBe(0);
      expect(r2.runtime.counters.unparked).toBeGreaterThanOrEqual(3200);
      // And afterwards events go straight to the embot again.
      const parkedBefore = r2.runtime.counters.parked;
      await tick(r2, 4210);
      await r2.settle();
      expect((await context(r2)).lastSeq).toBe(4210);
      expect(r2.runtime.counters.parked).toBe(parkedBefore);
    });

    it('become dead letters, with why, when the embot cannot take them', async () => {
      const file = tmpFile();
      const r1 = rig(file);
      await r1.runtime.loadModule(fixture('throwing'));
      await r1.runtime.attach(vm('a'));
      await r1.settle();
      await r1.close();
      rigs.splice(rigs.indexOf(r1), 1);

      const r2 = rig(file, undefined, { maxParkedPerEmbot: 3 });
      await r2.runtime.attach(vm('a'));
      for (const type of ['NOTHING', 'BOOM', 'NOTHING', 'NOTHING', 'NOTHING']) await r2.sensors.emit({ elementId: 'vm:a', type, payload: null });
      await r2.settle();
      // Past the cap, newer events are dead letters at once.
      expect(r2.runtime.parkedCount()).toBe(3);
      const reasons = (): string[] => r2.runtime.deadLetters(10).map((d) => d.reason);
      expect(reasons()).toEqual(['3 events already wait for module throwing to load', '3 events already wait for module throwing to load']);
      // The module loads; the parked BOOM quarantines the embot, and its batch goes to dead letters.
      await r2.runtime.loadModule(fixture('throwing'));
      await r2.settle();
      await waitFor(() => r2.runtime.get('throwing/thrower/vm:a')?.status === 'quarantined', 3000, 'quarantine');
      await r2.settle();
      expect(r2.runtime.parkedCount()).toBe(0);
      expect(r2.runtime.deadLetterCount()).toBe(5);
      expect(reasons().filter((x) => x.includes('boom from plugin'))).toHaveLength(3);
      // Newest last: the parked batch (NOTHING, BOOM, NOTHING) went to dead letters after the two refused at the cap.
      expect(r2.runtime.deadLetters(3).map((d) => d.event.type)).toEqual(['NOTHING', 'BOOM', 'NOTHING']);
      expect(r2.runtime.deadLetters(10).every((d) => d.embotId === 'throwing/thrower/vm:a')).toBe(true);
    });

    it('become dead letters when the embot is removed before its module loads', async () => {
      const file = await seeded(1);
      const r = rig(file);
      await tick(r, 1);
      await tick(r, 2);
      await r.settle();
      expect(r.runtime.parkedCount()).toBe(2);
      await r.runtime.attach(vm('a'));
      await r.runtime.detach('vm:a');
      expect(r.runtime.parkedCount()).toBe(0);
      expect(r.runtime.deadLetterCount()).toBe(2);
      expect(r.runtime.get(COUNTER)).toBeUndefined();
    });
  });
});
