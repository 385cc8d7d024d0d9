import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { pack, unpack } from 'msgpackr';
import { ErrorCodes, EffectorError } from '../../core/errors.ts';
import { SimDriver } from '../../effectors/index.ts';
import type { VmState } from '../../effectors/index.ts';

type StateEvent = { name: string; from: VmState | null; to: VmState; reason: string };

const PAGE = 1024;
const tiny = (name: string, extra: Record<string, number> = {}) => ({ name, memory: 64 * PAGE, dirtyRate: 0, ...extra });

/** The code of what `fn` throws or rejects with (the driver's lifecycle is async; pages and takeDirty are not). */
async function codeOf(fn: () => unknown): Promise<string | undefined> {
  try {
    await fn();
  } catch (e) {
    expect(e).toBeInstanceOf(EffectorError);
    return (e as EffectorError).code;
  }
  return undefined;
}

describe('SimDriver', () => {
  let driver: SimDriver;
  let seen: StateEvent[];

  beforeEach(() => {
    vi.useFakeTimers();
    driver = new SimDriver({ pageSize: PAGE });
    seen = [];
    driver.events.on('vm-state', (e) => seen.push({ ...e }));
  });

  afterEach(async () => {
    await driver.close();
    vi.useRealTimers();
  });

  describe('lifecycle', () => {
    it('creates a VM from defaults merged with the given spec and reports it', async () => {
      const d = new SimDriver({ defaults: { vcpus: 2 } });
      const info = await d.create({ name: 'web-1', memory: 8192 });
      expect(info).toEqual({ name: 'web-1', memory: 8192, dirtyRate: 4 * 1024 * 1024, vcpus: 2, state: 'created', crashes: 0 });
      expect(d.list()).toEqual([info]);
      expect(d.get('web-1')).toEqual(info);
      expect(d.get('nope')).toBeUndefined();
      expect(d.name).toBe('sim');
    });

    it('walks every allowed transition and emits vm-state with from, to and reason for each', async () => {
      await driver.create(tiny('a'));
      expect((await driver.start('a')).state).toBe('running'); // created → running
      expect((await driver.stop('a')).state).toBe('stopped'); // running → stopped
      expect((await driver.start('a')).state).toBe('running'); // stopped → running
      expect(driver.crash('a')).toMatchObject({ state: 'crashed', crashes: 1 }); // running → crashed
      expect((await driver.start('a')).state).toBe('running'); // crashed → running
      expect(seen).toEqual([
        { name: 'a', from: null, to: 'created', reason: 'create' },
        { name: 'a', from: 'created', to: 'running', reason: 'start' },
        { name: 'a', from: 'running', to: 'stopped', reason: 'stop' },
        { name: 'a', from: 'stopped', to: 'running', reason: 'start' },
        { name: 'a', from: 'running', to: 'crashed', reason: 'crash' },
        { name: 'a', from: 'crashed', to: 'running', reason: 'start' },
      ]);
    });

    it('sets startedAt while running only', async () => {
      vi.setSystemTime(1_000_000);
      await driver.create(tiny('a'));
      expect(driver.get('a')?.startedAt).toBeUndefined();
      expect((await driver.start('a')).startedAt).toBe(1_000_000);
      expect((await driver.stop('a')).startedAt).toBeUndefined();
    });

    it.each<[string, VmState[], (d: SimDriver) => unknown]>([
      ['start a running VM', ['running'], (d) => d.start('a')],
      ['stop a created VM', [], (d) => d.stop('a')],
      ['stop a stopped VM', ['running', 'stopped'], (d) => d.stop('a')],
      ['stop a crashed VM', ['running', 'crashed'], (d) => d.stop('a')],
      ['crash a created VM', [], (d) => d.crash('a')],
      ['crash a stopped VM', ['running', 'stopped'], (d) => d.crash('a')],
      ['crash a crashed VM', ['running', 'crashed'], (d) => d.crash('a')],
      ['remove a running VM', ['running'], (d) => d.remove('a')],
    ])('refuses to %s with EMBOT_ERR_VM_BAD_STATE and changes nothing', async (_what, path, act) => {
      await driver.create(tiny('a'));
      const ops: Record<VmState, (n: string) => unknown> = {
        running: (n) => driver.start(n),
        stopped: (n) => driver.stop(n),
        crashed: (n) => driver.crash(n),
        created: () => undefined,
        paused: () => undefined,
        migrated: () => undefined,
      };
      for (const s of path) await ops[s]('a');
      const before = driver.get('a');
      const events = seen.length;
      expect(await codeOf(() => act(driver))).toBe(ErrorCodes.VM_BAD_STATE);
      expect(driver.get('a')).toEqual(before);
      expect(seen.length).toBe(events);
    });

    it('refuses unknown VMs with EMBOT_ERR_VM_UNKNOWN on every operation', async () => {
      for (const op of [
        () => driver.start('ghost'),
        () => driver.stop('ghost'),
        () => driver.crash('ghost'),
        () => driver.remove('ghost'),
        () => driver.stats('ghost'),
        () => driver.pages('ghost'),
        () => driver.takeDirty('ghost'),
        () => driver.setDirtyRate('ghost', 1),
        () => driver.setLoad('ghost', 0.5),
      ]) {
        expect(await codeOf(op)).toBe(ErrorCodes.VM_UNKNOWN);
      }
    });

    it('refuses a duplicate create with EMBOT_ERR_VM_EXISTS and keeps the first VM', async () => {
      await driver.create(tiny('a', { vcpus: 2 }));
      expect(await codeOf(() => driver.create(tiny('a', { vcpus: 4 })))).toBe(ErrorCodes.VM_EXISTS);
      expect(driver.get('a')?.vcpus).toBe(2);
      expect(seen).toHaveLength(1);
    });

    it.each([
      ['an upper-case name', { name: 'Web' }],
      ['an empty name', { name: '' }],
      ['a name starting with a dash', { name: '-a' }],
      ['a name of 64 characters', { name: 'a'.repeat(64) }],
      ['a name with a slash', { name: 'a/b' }],
      ['negative memory', { name: 'a', memory: -1 }],
      ['zero memory', { name: 'a', memory: 0 }],
      ['fractional memory', { name: 'a', memory: 1.5 }],
      ['memory above the limit', { name: 'a', memory: 2 * 1024 ** 3 }],
      ['a negative dirty rate', { name: 'a', dirtyRate: -5 }],
      ['an infinite dirty rate', { name: 'a', dirtyRate: Infinity }],
      ['zero vcpus', { name: 'a', vcpus: 0 }],
      ['a string for memory', { name: 'a', memory: '64' }],
      ['a UDP port out of range', { name: 'a', udpPort: 70000 }],
    ])('rejects a spec with %s (EMBOT_ERR_VM_SPEC_INVALID) and creates nothing', async (_what, spec) => {
      expect(await codeOf(() => driver.create(spec as never))).toBe(ErrorCodes.VM_SPEC_INVALID);
      expect(driver.list()).toEqual([]);
      expect(seen).toEqual([]);
    });

    it('rejects a spec that is not an object', async () => {
      expect(await codeOf(() => driver.create(null as never))).toBe(ErrorCodes.VM_SPEC_INVALID);
    });

    it('accepts a name of 63 characters and a UDP port', async () => {
      expect((await driver.create({ ...tiny('a'.repeat(63)), udpPort: 5353 })).udpPort).toBe(5353);
    });

    it('rejects bad driver options', async () => {
      expect(await codeOf(() => new SimDriver({ pageSize: 0 }))).toBe(ErrorCodes.VM_SPEC_INVALID);
      expect(await codeOf(() => new SimDriver({ defaults: { memory: -1 } }))).toBe(ErrorCodes.VM_SPEC_INVALID);
    });

    it('removes a VM that is not running and emits vm-removed', async () => {
      const removed: string[] = [];
      driver.events.on('vm-removed', (e) => removed.push(e.name));
      await driver.create(tiny('a'));
      await driver.create(tiny('b'));
      await driver.start('b');
      driver.crash('b');
      await driver.remove('a'); // created
      await driver.remove('b'); // crashed
      await driver.create(tiny('c'));
      await driver.start('c');
      await driver.stop('c');
      await driver.remove('c'); // stopped
      expect(removed).toEqual(['a', 'b', 'c']);
      expect(driver.list()).toEqual([]);
    });
  });

  describe('memory and dirty pages', () => {
    it('allocates memory lazily: on start, or on the first pages() call', async () => {
      await driver.create(tiny('a', { memory: 10 * PAGE + 100 }));
      const pages = driver.pages('a');
      expect(pages.pageSize).toBe(PAGE);
      expect(pages.pageCount).toBe(11);
      expect(pages.memory.length).toBe(10 * PAGE + 100);
      expect(pages.page(0).length).toBe(PAGE);
      expect(pages.page(10).length).toBe(100); // the short last page
      expect(await codeOf(() => pages.page(11))).toBe(ErrorCodes.EFFECTOR_ARGS_INVALID);
      expect(await codeOf(() => pages.page(-1))).toBe(ErrorCodes.EFFECTOR_ARGS_INVALID);
      // A view, not a copy: a migration target writes pages through it.
      pages.page(3)[0] = 42;
      expect(driver.pages('a').memory[3 * PAGE]).toBe(42);
    });

    it('dirties pages at the configured rate while running, and only while running', async () => {
      // 10 pages/s: 200 page writes in 20 s, on 4096 pages so collisions stay rare.
      await driver.create({ name: 'a', memory: 4096 * PAGE, dirtyRate: 10 * PAGE });
      await driver.start('a');
      vi.advanceTimersByTime(20_000);
      const s = await driver.stats('a');
      expect(s.pagesWritten).toBe(200);
      expect(s.dirtyPages).toBeGreaterThan(180);
      expect(s.dirtyPages).toBeLessThanOrEqual(200);
      expect(s.dirtyRate).toBe(10 * PAGE);
      await driver.stop('a');
      vi.advanceTimersByTime(20_000);
      expect(driver.counters('a').pagesWritten).toBe(200);
    });

    it('carries fractions over ticks, so a rate below one page per tick still dirties pages', async () => {
      // 0.5 page per 50 ms tick → 10 pages per second.
      await driver.create({ name: 'a', memory: 1024 * PAGE, dirtyRate: 10 * PAGE });
      await driver.start('a');
      vi.advanceTimersByTime(50);
      expect(driver.counters('a').pagesWritten).toBe(0);
      vi.advanceTimersByTime(50);
      expect(driver.counters('a').pagesWritten).toBe(1);
      vi.advanceTimersByTime(900);
      expect(driver.counters('a').pagesWritten).toBe(10);
    });

    it('takeDirty returns the dirty page indexes, ascending, and clears them', async () => {
      const picks = [0.5, 0.5, 0.5, 0.1, 0.1, 0.1, 0.9, 0.9, 0.9];
      let i = 0;
      const d = new SimDriver({ pageSize: PAGE, random: () => picks[i++ % picks.length] });
      await d.create({ name: 'a', memory: 10 * PAGE, dirtyRate: 60 * PAGE }); // 3 pages per 50 ms tick
      await d.start('a');
      vi.advanceTimersByTime(50);
      expect(d.counters('a').dirtyPages).toBe(3);
      expect([...d.takeDirty('a')]).toEqual([1, 5, 9]);
      expect(d.counters('a').dirtyPages).toBe(0);
      expect(d.takeDirty('a')).toEqual(new Uint32Array(0));
      // The writes really changed the memory the migration will copy.
      expect(d.pages('a').page(5).some((b) => b !== 0)).toBe(true);
      await d.close();
    });

    it('caps one tick at every page dirty', async () => {
      await driver.create({ name: 'a', memory: 8 * PAGE, dirtyRate: 1000 * PAGE });
      await driver.start('a');
      vi.advanceTimersByTime(50);
      expect(driver.counters('a').pagesWritten).toBe(8);
      expect(driver.takeDirty('a').length).toBeLessThanOrEqual(8);
    });

    it('setDirtyRate changes the rate of a running VM and validates it', async () => {
      await driver.create({ name: 'a', memory: 4096 * PAGE, dirtyRate: 0 });
      await driver.start('a');
      vi.advanceTimersByTime(1000);
      expect(driver.counters('a').pagesWritten).toBe(0);
      driver.setDirtyRate('a', 20 * PAGE);
      vi.advanceTimersByTime(1000);
      expect(driver.counters('a').pagesWritten).toBe(20);
      expect(driver.get('a')?.dirtyRate).toBe(20 * PAGE);
      expect(await codeOf(() => driver.setDirtyRate('a', -1))).toBe(ErrorCodes.VM_SPEC_INVALID);
      expect(driver.get('a')?.dirtyRate).toBe(20 * PAGE);
    });

    it('takeDirty on a VM never started returns nothing', async () => {
      await driver.create(tiny('a'));
      expect(driver.takeDirty('a').length).toBe(0);
    });
  });

  describe('load', () => {
    it('reports the set load while running and 0 otherwise; rejects loads outside 0..1', async () => {
      await driver.create(tiny('a'));
      driver.setLoad('a', 0.7);
      expect(driver.counters('a').load).toBe(0);
      await driver.start('a');
      expect(driver.counters('a').load).toBe(0.7);
      for (const bad of [-0.1, 1.1, NaN, '0.5']) expect(await codeOf(() => driver.setLoad('a', bad as number))).toBe(ErrorCodes.VM_SPEC_INVALID);
      expect(driver.counters('a').load).toBe(0.7);
      driver.crash('a');
      expect(await driver.stats('a')).toMatchObject({ state: 'crashed', load: 0 });
    });
  });

  describe('persistence', () => {
    it('round-trips specs, states, crash counts and loads through msgpackr; running VMs run again', async () => {
      await driver.create(tiny('idle'));
      await driver.create({ ...tiny('up', { dirtyRate: 20 * PAGE, vcpus: 2 }), udpPort: 9000 });
      await driver.create(tiny('down'));
      await driver.start('up');
      driver.crash('up');
      await driver.start('up');
      driver.setLoad('up', 0.4);
      await driver.start('down');
      await driver.stop('down');
      const bytes = pack(driver.getPersistedState());
      await driver.close();

      const restored = new SimDriver({ pageSize: PAGE });
      const events: StateEvent[] = [];
      restored.events.on('vm-state', (e) => events.push({ ...e }));
      await restored.restoreState(unpack(bytes));
      expect(restored.list().map(({ startedAt: _s, ...rest }) => rest)).toEqual(driver.list().map(({ startedAt: _s, ...rest }) => rest));
      expect(restored.get('up')).toMatchObject({ state: 'running', crashes: 1, vcpus: 2, udpPort: 9000 });
      expect(restored.counters('up').load).toBe(0.4);
      expect(events).toEqual([
        { name: 'idle', from: null, to: 'created', reason: 'restore' },
        { name: 'up', from: null, to: 'running', reason: 'restore' },
        { name: 'down', from: null, to: 'stopped', reason: 'restore' },
      ]);
      // The restored running VM dirties pages again; pages themselves are not persisted.
      vi.advanceTimersByTime(1000);
      expect(restored.counters('up').pagesWritten).toBe(20);
      await restored.close();
    });

    it.each([
      ['null', null],
      ['a wrong version', { version: 2, vms: [] }],
      ['vms not an array', { version: 1, vms: {} }],
      ['a VM without spec', { version: 1, vms: [{ state: 'running' }] }],
      ['an invalid spec', { version: 1, vms: [{ spec: { name: 'A', memory: 1, dirtyRate: 0, vcpus: 1 }, state: 'created', crashes: 0 }] }],
      ['an unknown state', { version: 1, vms: [{ spec: tiny('a', { vcpus: 1 }), state: 'paused', crashes: 0 }] }],
      ['negative crashes', { version: 1, vms: [{ spec: tiny('a', { vcpus: 1 }), state: 'created', crashes: -1 }] }],
      ['a load above 1', { version: 1, vms: [{ spec: tiny('a', { vcpus: 1 }), state: 'created', crashes: 0, load: 2 }] }],
      ['a duplicate VM', { version: 1, vms: [{ spec: tiny('a', { vcpus: 1 }), state: 'created' }, { spec: tiny('a', { vcpus: 1 }), state: 'created' }] }],
    ])('refuses persisted state with %s and keeps its VMs', async (_what, state) => {
      await driver.create(tiny('keep'));
      expect(await codeOf(() => driver.restoreState(state))).toBe(ErrorCodes.VM_SPEC_INVALID);
      expect(driver.list().map((v) => v.name)).toEqual(['keep']);
    });
  });

  it('close() stops every dirtying timer', async () => {
    await driver.create({ name: 'a', memory: 1024 * PAGE, dirtyRate: 100 * PAGE });
    await driver.create({ name: 'b', memory: 1024 * PAGE, dirtyRate: 100 * PAGE });
    await driver.start('a');
    await driver.start('b');
    expect(vi.getTimerCount()).toBe(2);
    await driver.close();
    expect(vi.getTimerCount()).toBe(0);
    vi.advanceTimersByTime(1000);
    expect(driver.counters('a').pagesWritten).toBe(0);
  });

  it('uses the injected clock to measure elapsed time', async () => {
    let t = 0;
    const d = new SimDriver({ pageSize: PAGE, now: () => t });
    await d.create({ name: 'a', memory: 4096 * PAGE, dirtyRate: 10 * PAGE });
    await d.start('a');
    // Timers fire but the injected clock has not moved: nothing is dirtied.
    vi.advanceTimersByTime(500);
    expect(d.counters('a').pagesWritten).toBe(0);
    t = 2000;
    vi.advanceTimersByTime(50);
    expect(d.counters('a').pagesWritten).toBe(20);
    await d.close();
  });
});
