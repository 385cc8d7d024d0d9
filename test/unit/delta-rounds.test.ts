/**
 * A migration's dirty rounds: an element that changed in two rounds arrives in both; the target
 * applies its latest version once (seen under load in the qemu TLS disk-migration test: the commit
 * failed with "delta for vm:d2 appears twice").
 */
import { describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../core/errors.ts';
import { mergeDeltaRounds } from '../../core/objects/delta-rounds.ts';
import { ManagedObjectService } from '../../core/objects/object-service.ts';

describe('dirty rounds merged at the target', () => {
  it('an element in two rounds: the later, newer delta is the one applied, once; elements of one round only are kept', () => {
    const source = new ManagedObjectService();
    source.registerTree({ id: 'vm:v', kind: 'vm', state: { state: 'running' }, dependents: ['disk:v.0'] }, [{ id: 'disk:v.0', kind: 'disk', state: {} }]);
    const bundle = source.serialize('vm:v');
    source.collectDirty('vm:v');
    source.update('vm:v', { state: 'paused' });
    const round1 = source.collectDirty('vm:v');
    source.update('vm:v', { state: 'migrated' });
    source.update('disk:v.0', { written: 1 });
    const round2 = source.collectDirty('vm:v');
    expect(round1.map((e) => e.id)).toEqual(['vm:v']);
    expect(round2.map((e) => e.id).sort()).toEqual(['disk:v.0', 'vm:v']);

    const target = new ManagedObjectService();
    target.instantiate(bundle);
    // Both rounds as they were: refused (the failure seen before the merge).
    expect(() => target.applyDeltas([...round1, ...round2])).toThrow(/appears twice/);
    const merged = mergeDeltaRounds(mergeDeltaRounds([], round1), round2);
    expect(merged.map((e) => e.id).sort()).toEqual(['disk:v.0', 'vm:v']);
    target.applyDeltas(merged);
    expect(target.get('vm:v')!.state).toMatchObject({ state: 'migrated' });
    expect(target.get('disk:v.0')!.state).toMatchObject({ written: 1 });
    // An older version arriving later does not win.
    expect(mergeDeltaRounds(round2, round1).find((e) => e.id === 'vm:v')!.state).toMatchObject({ state: 'migrated' });
  });

  it('bad input: entries that are not elements are kept for applyDeltas to refuse with its coded error', () => {
    const target = new ManagedObjectService();
    const merged = mergeDeltaRounds([], [null, 'x', { id: 5 }]);
    expect(merged).toHaveLength(3);
    let code: unknown;
    try {
      target.applyDeltas(merged);
    } catch (e) {
      code = (e as { code?: unknown }).code;
    }
    expect(code).toBe(ErrorCodes.ELEMENT_DECODE);
  });
});
