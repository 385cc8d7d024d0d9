import os from 'node:os';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { ErrorCodes, EventError } from '../../core/errors.ts';
import type { EmbotEvent, EmbotEventInput } from '../../core/events.ts';
import { SimDriver } from '../../effectors/hypervisor/sim/sim-driver.ts';
import { HostSensor, SensorService, VmSensor } from '../../sensors/index.ts';
import type { SensorContext } from '../../sensors/index.ts';

const MiB = 1024 * 1024;

function fakeContext(): SensorContext & { readonly emitted: EmbotEventInput[] } {
  const emitted: EmbotEventInput[] = [];
  return { emitted, emit: (input) => void emitted.push(input), now: () => 0 };
}

const cleanups: (() => void)[] = [];
afterEach(() => {
  vi.useRealTimers();
  while (cleanups.length > 0) cleanups.pop()!();
});

function simDriver(): SimDriver {
  const driver = new SimDriver({ defaults: { memory: 1 * MiB, dirtyRate: 0 } });
  cleanups.push(() => driver.close());
  return driver;
}

describe('HostSensor', () => {
  it("'sim' source: load is the sum of VM loads over host CPUs, topVms busiest first, every interval", () => {
    vi.useFakeTimers({ toFake: ['setInterval', 'clearInterval'] });
    let loads = [
      { name: 'a', load: 0.5 },
      { name: 'b', load: 1 },
      { name: 'c', load: 0.25 },
      { name: 'd', load: 0.75 },
    ];
    const sensor = new HostSensor({ agent: 'h1', intervalMs: 1000, source: 'sim', hostCpus: 4, vmLoads: () => loads });
    const ctx = fakeContext();
    sensor.start(ctx);
    expect(ctx.emitted).toHaveLength(1); // a first reading right away
    const first = ctx.emitted[0]!;
    expect(first).toMatchObject({ elementId: 'host:h1', type: 'HOST_LOAD' });
    expect(first.payload).toMatchObject({
      load: 2.5 / 4,
      cpus: 4,
      topVms: [
        { name: 'b', load: 1 },
        { name: 'd', load: 0.75 },
        { name: 'a', load: 0.5 },
      ],
    });
    const p = first.payload as { memFree: number; memTotal: number };
    expect(p.memTotal).toBe(os.totalmem());
    expect(p.memFree).toBeGreaterThan(0);
    loads = [{ name: 'x', load: 6 }];
    vi.advanceTimersByTime(2500);
    expect(ctx.emitted).toHaveLength(3);
    expect(ctx.emitted[2]!.payload).toMatchObject({ load: 1.5, topVms: [{ name: 'x', load: 6 }] });
    sensor.stop();
    vi.advanceTimersByTime(5000);
    expect(ctx.emitted).toHaveLength(3);
    expect(sensor.getPersistedState()).toEqual({ lastLoad: 1.5 });
  });

  it("'os' source reads the load average per CPU", () => {
    const sensor = new HostSensor({ agent: 'h1', intervalMs: 60_000, source: 'os', hostCpus: 2 });
    const ctx = fakeContext();
    sensor.start(ctx);
    sensor.stop();
    const load = (ctx.emitted[0]!.payload as { load: number }).load;
    expect(load).toBeGreaterThanOrEqual(0);
    expect(Math.abs(load - os.loadavg()[0]! / 2)).toBeLessThan(0.5);
  });

  it('a failing vmLoads callback skips the reading instead of throwing into the timer', () => {
    const sensor = new HostSensor({ agent: 'h1', source: 'sim', hostCpus: 1, vmLoads: () => { throw new Error('driver gone'); } });
    const ctx = fakeContext();
    expect(() => sensor.start(ctx)).not.toThrow();
    sensor.stop();
    expect(ctx.emitted).toHaveLength(0);
  });

  it('refuses bad options with EMBOT_ERR_SENSOR_INVALID', () => {
    const bad = [
      { agent: '' },
      { agent: 'h', intervalMs: 0 },
      { agent: 'h', source: 'sim', hostCpus: 2 },
      { agent: 'h', source: 'gpu' },
      { agent: 'h', hostCpus: -1 },
    ];
    for (const options of bad) {
      expect(() => new HostSensor(options as ConstructorParameters<typeof HostSensor>[0])).toThrow(
        expect.objectContaining({ code: ErrorCodes.SENSOR_INVALID }) as unknown as Error,
      );
    }
  });
});

describe('VmSensor', () => {
  it('maps driver transitions to VM_* events for vm:<name>', () => {
    const driver = simDriver();
    const sensor = new VmSensor({ driver, intervalMs: 60_000 });
    const ctx = fakeContext();
    sensor.start(ctx);
    driver.create({ name: 'web' });
    driver.start('web');
    driver.crash('web');
    driver.start('web');
    driver.stop('web');
    driver.remove('web');
    sensor.stop();
    expect(ctx.emitted.map((e) => [e.elementId, e.type])).toEqual([
      ['vm:web', 'VM_CREATED'],
      ['vm:web', 'VM_STARTED'],
      ['vm:web', 'VM_CRASHED'],
      ['vm:web', 'VM_STARTED'],
      ['vm:web', 'VM_STOPPED'],
      ['vm:web', 'VM_REMOVED'],
    ]);
    expect(ctx.emitted[2]!.payload).toEqual({ name: 'web', from: 'running', to: 'crashed', reason: 'crash' });
    expect(ctx.emitted[0]!.payload).toEqual({ name: 'web', from: null, to: 'created', reason: 'create' });
  });

  it('posts VM_LOAD for running VMs only, every interval', async () => {
    vi.useFakeTimers({ toFake: ['setInterval', 'clearInterval'] });
    const driver = simDriver();
    driver.create({ name: 'a' });
    driver.create({ name: 'b' });
    driver.create({ name: 'c' });
    driver.start('a');
    driver.start('b');
    driver.setLoad('a', 0.75);
    driver.setLoad('b', 0.25);
    const sensor = new VmSensor({ driver, intervalMs: 500 });
    const ctx = fakeContext();
    sensor.start(ctx);
    await vi.advanceTimersByTimeAsync(500);
    expect(ctx.emitted.filter((e) => e.type === 'VM_LOAD').map((e) => [e.elementId, e.payload])).toEqual([
      ['vm:a', { name: 'a', load: 0.75 }],
      ['vm:b', { name: 'b', load: 0.25 }],
    ]);
    driver.stop('b');
    ctx.emitted.length = 0;
    await vi.advanceTimersByTimeAsync(500);
    expect(ctx.emitted.filter((e) => e.type === 'VM_LOAD').map((e) => e.elementId)).toEqual(['vm:a']);
    sensor.stop();
  });

  it('stops cleanly: no listeners, no timer, no more events', () => {
    vi.useFakeTimers({ toFake: ['setInterval', 'clearInterval'] });
    const driver = simDriver();
    const before = driver.events.listenerCount('vm-state');
    const sensor = new VmSensor({ driver, intervalMs: 100 });
    const ctx = fakeContext();
    sensor.start(ctx);
    sensor.start(ctx); // restart does not double-subscribe
    expect(driver.events.listenerCount('vm-state')).toBe(before + 1);
    sensor.stop();
    expect(driver.events.listenerCount('vm-state')).toBe(before);
    expect(driver.events.listenerCount('vm-removed')).toBe(0);
    expect(vi.getTimerCount()).toBe(0);
    driver.create({ name: 'late' });
    driver.start('late');
    vi.advanceTimersByTime(1000);
    expect(ctx.emitted).toHaveLength(0);
  });

  it('reports a change that happened while it was stopped, from its persisted state', () => {
    const driver = simDriver();
    const first = new VmSensor({ driver });
    first.start(fakeContext());
    driver.create({ name: 'db' });
    driver.start('db');
    first.stop();
    const saved = first.getPersistedState();
    driver.crash('db');
    const second = new VmSensor({ driver });
    second.restoreState(saved);
    const ctx = fakeContext();
    second.start(ctx);
    second.stop();
    expect(ctx.emitted).toEqual([{ elementId: 'vm:db', type: 'VM_CRASHED', payload: { name: 'db', from: 'running', to: 'crashed', reason: 'observed-at-start' } }]);
  });

  it('refuses a missing driver with EMBOT_ERR_SENSOR_INVALID', () => {
    expect(() => new VmSensor({} as ConstructorParameters<typeof VmSensor>[0])).toThrow(EventError);
  });
});

describe('sensors feeding the SensorService', () => {
  it('VM and host events reach subscribers tagged with their sensor, and stopSensors stops them', async () => {
    const driver = simDriver();
    const sensors = new SensorService({ host: 'h1', onError: () => {} });
    const vmEvents: EmbotEvent[] = [];
    const hostEvents: EmbotEvent[] = [];
    sensors.subscribe('vm:app', { deliver: (e) => void vmEvents.push(e) });
    sensors.subscribe('host:h1', { deliver: (e) => void hostEvents.push(e) });
    const vmLoads = () => driver.list().filter((v) => v.state === 'running').map((v) => ({ name: v.name, load: driver.counters(v.name).load }));
    sensors.addSensor(new VmSensor({ driver, intervalMs: 5 }));
    sensors.addSensor(new HostSensor({ agent: 'h1', intervalMs: 5, source: 'sim', hostCpus: 2, vmLoads }));
    sensors.startSensors();
    driver.create({ name: 'app' });
    driver.start('app');
    driver.setLoad('app', 1);
    await new Promise((r) => setTimeout(r, 40));
    await sensors.idle();
    expect(vmEvents.slice(0, 2).map((e) => [e.type, e.source])).toEqual([['VM_CREATED', 'vm'], ['VM_STARTED', 'vm']]);
    expect(vmEvents.some((e) => e.type === 'VM_LOAD' && (e.payload as { load: number }).load === 1)).toBe(true);
    expect(hostEvents.some((e) => e.source === 'host' && (e.payload as { load: number }).load === 0.5)).toBe(true);
    sensors.stopSensors();
    await sensors.idle();
    const counted = vmEvents.length + hostEvents.length;
    driver.stop('app');
    await new Promise((r) => setTimeout(r, 30));
    await sensors.idle();
    expect(vmEvents.length + hostEvents.length).toBe(counted);
    await sensors.close();
  });
});
