import { pack } from 'msgpackr';
import { describe, expect, it } from 'vitest';
import { ErrorCodes, isEmbotError } from '../../core/errors.ts';
import { ManagedObjectService } from '../../core/objects/object-service.ts';
import type { ManagedElement } from '../../core/objects/managed-element.ts';
import { Store } from '../../core/store/store.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { tempStores } from '../harness/temp-store.ts';

function vmTree(svc: ManagedObjectService, name = 'web'): ManagedElement {
  return svc.registerTree({ id: `vm:${name}`, kind: 'vm', state: { memory: 64 }, dependents: [`disk:${name}-0`, `nic:${name}-0`] }, [
    { id: `disk:${name}-0`, kind: 'disk', state: { size: 10 }, dependents: [`svc:${name}-fs`] },
    { id: `svc:${name}-fs`, kind: 'service', state: { port: 2049 } },
    { id: `nic:${name}-0`, kind: 'nic', state: { mac: '52:54:00:00:00:01' } },
  ]);
}

function oneVm(): ManagedObjectService {
  const s = new ManagedObjectService();
  s.register({ id: 'vm:a', kind: 'vm' });
  return s;
}

function expectCode(fn: () => unknown, code: string): void {
  let thrown: unknown;
  try {
    fn();
  } catch (e) {
    thrown = e;
  }
  expect(isEmbotError(thrown), `expected an EmbotError, got ${String(thrown)}`).toBe(true);
  expect((thrown as { code: string }).code).toBe(code);
}

describe('ManagedObjectService — registration', () => {
  it('registers a tree with links and emits registered for each element', () => {
    const svc = new ManagedObjectService();
    const seen: string[] = [];
    svc.on('registered', (e) => seen.push(e.id));
    const root = vmTree(svc);
    expect(root).toMatchObject({ id: 'vm:web', kind: 'vm', version: 1, dirty: true, dependents: ['disk:web-0', 'nic:web-0'] });
    expect(svc.get('disk:web-0')!.dependents).toEqual(['svc:web-fs']);
    expect(seen.sort()).toEqual(['disk:web-0', 'nic:web-0', 'svc:web-fs', 'vm:web']);
    expect(svc.list('disk').map((e) => e.id)).toEqual(['disk:web-0']);
    expect(svc.list()).toHaveLength(4);
  });

  it('refuses a duplicate id, an unknown dependent and invalid input, registering nothing', () => {
    const svc = new ManagedObjectService();
    vmTree(svc);
    expectCode(() => svc.register({ id: 'vm:web', kind: 'vm' }), ErrorCodes.ELEMENT_EXISTS);
    expectCode(() => svc.register({ id: 'vm:db', kind: 'vm', dependents: ['disk:nope'] }), ErrorCodes.ELEMENT_UNKNOWN);
    expectCode(() => svc.register({ id: 'bad id!', kind: 'vm' }), ErrorCodes.ELEMENT_INVALID);
    expectCode(() => svc.register({ id: 'vm:x', kind: '' }), ErrorCodes.ELEMENT_INVALID);
    expectCode(() => svc.register({ id: 'vm:x', kind: 'vm', state: [] as unknown as Record<string, unknown> }), ErrorCodes.ELEMENT_INVALID);
    // A tree whose last element is bad registers none of the others.
    expectCode(() => svc.registerTree({ id: 'vm:db', kind: 'vm', dependents: ['disk:db'] }, [{ id: 'disk:db', kind: 'disk', dependents: ['disk:db'] }]), ErrorCodes.ELEMENT_INVALID);
    expect(svc.has('vm:db')).toBe(false);
    expect(svc.has('disk:db')).toBe(false);
    expect(svc.size).toBe(4);
  });

  it('returns frozen snapshots that do not change under later updates', () => {
    const svc = new ManagedObjectService();
    const before = vmTree(svc);
    expect(Object.isFrozen(before.state)).toBe(true);
    svc.update('vm:web', { memory: 128 });
    expect(before.state['memory']).toBe(64);
    expect(svc.get('vm:web')!.state['memory']).toBe(128);
  });
});

describe('ManagedObjectService — update and deregister', () => {
  it('update merges state, removes undefined keys, bumps version and marks dirty', () => {
    const svc = new ManagedObjectService();
    vmTree(svc);
    svc.collectDirty('vm:web');
    const updates: Array<[number, number]> = [];
    svc.on('updated', (e, prev) => updates.push([prev.version, e.version]));
    const next = svc.update('disk:web-0', { size: 20, label: 'root' });
    expect(next).toMatchObject({ version: 2, dirty: true, state: { size: 20, label: 'root' } });
    expect(svc.update('disk:web-0', { label: undefined }).state).toEqual({ size: 20 });
    expect(updates).toEqual([
      [1, 2],
      [2, 3],
    ]);
    expectCode(() => svc.update('disk:none', { a: 1 }), ErrorCodes.ELEMENT_UNKNOWN);
  });

  it('deregister removes the link from the parent; withDependents removes the subtree', () => {
    const svc = new ManagedObjectService();
    vmTree(svc);
    const removed = svc.deregister('nic:web-0');
    expect(removed.map((e) => e.id)).toEqual(['nic:web-0']);
    expect(svc.get('vm:web')!.dependents).toEqual(['disk:web-0']);
    expect(svc.get('vm:web')!.version).toBe(2);
    const gone: string[] = [];
    svc.on('deregistered', (e) => gone.push(e.id));
    svc.deregister('vm:web', { withDependents: true });
    expect(gone).toEqual(['vm:web', 'disk:web-0', 'svc:web-fs']);
    expect(svc.size).toBe(0);
    expectCode(() => svc.deregister('vm:web'), ErrorCodes.ELEMENT_UNKNOWN);
  });
});

describe('ManagedObjectService — serialize / deserialize / instantiate', () => {
  it('round-trips an element with all dependents and rebuilds the links on another service', () => {
    const source = new ManagedObjectService();
    vmTree(source);
    source.register({ id: 'vm:other', kind: 'vm' });
    source.update('svc:web-fs', { port: 2050, nested: { a: [1, 2, { b: 'c' }] } });
    const bytes = source.serialize('vm:web');
    expect(bytes).toBeInstanceOf(Uint8Array);

    const decoded = source.deserialize(bytes);
    expect(decoded.map((e) => e.id)).toEqual(['vm:web', 'disk:web-0', 'svc:web-fs', 'nic:web-0']);

    const target = new ManagedObjectService();
    const made = target.instantiate(bytes);
    expect(made).toHaveLength(4);
    expect(target.has('vm:other')).toBe(false);
    for (const e of source.subtree('vm:web')) {
      expect(target.get(e.id)).toEqual({ ...e, dirty: false });
    }
    expect(target.subtree('vm:web').map((e) => e.id)).toEqual(['vm:web', 'disk:web-0', 'svc:web-fs', 'nic:web-0']);
    expect(target.get('svc:web-fs')!.state).toEqual({ port: 2050, nested: { a: [1, 2, { b: 'c' }] } });
  });

  it('rejects garbage bytes, foreign msgpack, dangling links and bad elements with ELEMENT_DECODE, registering nothing', () => {
    const target = new ManagedObjectService();
    const element = (over: Record<string, unknown>) => ({ id: 'vm:a', kind: 'vm', state: {}, version: 1, dirty: false, dependents: [], ...over });
    const bundle = (elements: unknown[], root = 'vm:a') => pack({ format: 'embot/elements', v: 1, root, elements });
    const cases: Array<[string, Uint8Array]> = [
      ['empty', new Uint8Array(0)],
      ['garbage', new Uint8Array([0xc1, 0xff, 0x00, 0x13, 0x37])],
      ['truncated', oneVm().serialize('vm:a').subarray(0, 10)],
      ['foreign msgpack', pack({ hello: 'world' })],
      ['a number', pack(42)],
      ['wrong version', pack({ format: 'embot/elements', v: 99, root: 'vm:a', elements: [element({})] })],
      ['dangling link', bundle([element({ dependents: ['disk:missing'] })])],
      ['root missing', bundle([element({})], 'vm:zzz')],
      ['duplicate id', bundle([element({}), element({})])],
      ['bad version', bundle([element({ version: -1 })])],
      ['bad state', bundle([element({ state: 'x' })])],
      ['extra field', bundle([element({ evil: true })])],
      ['second element dangling', bundle([element({ dependents: ['disk:b'] }), element({ id: 'disk:b', kind: 'disk', dependents: ['nic:gone'] })])],
    ];
    for (const [name, bytes] of cases) {
      let thrown: unknown;
      try {
        target.instantiate(bytes);
      } catch (e) {
        thrown = e;
      }
      expect(isEmbotError(thrown, ErrorCodes.ELEMENT_DECODE), `${name}: ${String(thrown)}`).toBe(true);
    }
    expect(target.size).toBe(0);
  });

  it('instantiate refuses an id already present and registers none of the bundle', () => {
    const source = new ManagedObjectService();
    vmTree(source);
    const target = new ManagedObjectService();
    target.register({ id: 'nic:web-0', kind: 'nic' });
    expectCode(() => target.instantiate(source.serialize('vm:web')), ErrorCodes.ELEMENT_EXISTS);
    expect(target.list().map((e) => e.id)).toEqual(['nic:web-0']);
  });
});

describe('ManagedObjectService — dirty tracking', () => {
  it('collectDirty walks dependents recursively and resets the flags it collected', () => {
    const svc = new ManagedObjectService();
    vmTree(svc);
    svc.register({ id: 'vm:other', kind: 'vm' });
    expect(svc.collectDirty('vm:web').map((e) => e.id).sort()).toEqual(['disk:web-0', 'nic:web-0', 'svc:web-fs', 'vm:web']);
    expect(svc.collectDirty('vm:web')).toEqual([]);
    expect(svc.get('vm:other')!.dirty).toBe(true); // outside the tree: untouched

    svc.update('svc:web-fs', { port: 1 });
    const dirty = svc.collectDirty('vm:web');
    expect(dirty.map((e) => [e.id, e.version, e.dirty])).toEqual([['svc:web-fs', 2, true]]);
    expect(svc.get('svc:web-fs')!.dirty).toBe(false);
    expect(svc.get('svc:web-fs')!.version).toBe(2);
  });

  it('applyDeltas brings a copy up to date, registers new dependents, skips stale ones, refuses dangling links', () => {
    const source = new ManagedObjectService();
    vmTree(source);
    source.collectDirty('vm:web');
    const target = new ManagedObjectService();
    target.instantiate(source.serialize('vm:web'));

    source.register({ id: 'disk:web-1', kind: 'disk' });
    source.link('vm:web', 'disk:web-1');
    source.update('nic:web-0', { mac: 'changed' });
    const deltas = source.collectDirty('vm:web');
    expect(deltas.map((e) => e.id).sort()).toEqual(['disk:web-1', 'nic:web-0', 'vm:web']);

    const applied = target.applyDeltas(deltas);
    expect(applied).toHaveLength(3);
    for (const e of source.subtree('vm:web')) expect(target.get(e.id)).toEqual(e);

    // Stale: an older version never overwrites a newer one.
    expect(target.applyDeltas([{ ...deltas.find((e) => e.id === 'nic:web-0')!, version: 1, state: { mac: 'old' } }])).toEqual([]);
    expect(target.get('nic:web-0')!.state['mac']).toBe('changed');

    let thrown: unknown;
    try {
      target.applyDeltas([{ id: 'nic:web-0', kind: 'nic', state: {}, version: 9, dirty: true, dependents: ['svc:nowhere'] }]);
    } catch (e) {
      thrown = e;
    }
    expect(isEmbotError(thrown, ErrorCodes.ELEMENT_DECODE)).toBe(true);
    expect(target.get('nic:web-0')!.version).toBe(2);
  });
});

describe('ManagedObjectService — persistence', () => {
  const { tmpStoreFile } = tempStores(cleanupsAfterEach(), 'embot-objects-');

  it('writes through to a real SQLite file and loads everything back on reopen', () => {
    const file = tmpStoreFile();

    let store = Store.open({ file });
    const first = new ManagedObjectService({ store });
    vmTree(first);
    first.register({ id: 'vm:gone', kind: 'vm' });
    first.update('disk:web-0', { size: 99, when: new Date(5) });
    first.collectDirty('vm:web');
    first.update('nic:web-0', { mac: 'x' });
    first.deregister('vm:gone');
    const expected = first.list();
    store.close();

    store = Store.open({ file });
    const second = new ManagedObjectService({ store });
    expect(new Set(second.list())).toEqual(new Set(expected));
    expect(second.get('nic:web-0')).toMatchObject({ dirty: true, version: 2 });
    expect(second.get('disk:web-0')).toMatchObject({ dirty: false, version: 2 });
    expect(second.has('vm:gone')).toBe(false);
    expect(second.collectDirty('vm:web').map((e) => e.id)).toEqual(['nic:web-0']);
    store.close();

    // The reset flags were persisted as well.
    store = Store.open({ file });
    expect(new ManagedObjectService({ store }).collectDirty('vm:web')).toEqual([]);
    store.close();
  });

  it('reports a corrupt row with STORE_CORRUPT instead of loading half the elements silently', () => {
    const file = tmpStoreFile();
    const store = Store.open({ file });
    store.db.prepare("INSERT INTO elements(id, kind, state, version, dirty, dependents) VALUES ('vm:x', 'vm', NULL, 1, 0, 'not json')").run();
    expectCode(() => new ManagedObjectService({ store }), ErrorCodes.STORE_CORRUPT);
    store.close();
  });
});
