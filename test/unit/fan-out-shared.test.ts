/**
 * What the children of one fan-out share at the source: the management state is serialized and
 * packed once for all of them, and an element that changes between two children taking it reaches
 * the later child's dirty rounds, once, and the earlier child's too, once.
 */
import { unpack } from 'msgpackr';
import { describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../core/errors.ts';
import { FanOutShared } from '../../core/mobility/fan-out-shared.ts';
import type { MobilityHost } from '../../core/mobility/mobility-host.ts';
import { ManagedObjectService } from '../../core/objects/object-service.ts';

/** A real object service; these methods of FanOutShared use nothing else of the host (the switch does, and is not called here). */
function sharedOver(objects: ManagedObjectService, children: readonly string[]): FanOutShared {
  return new FanOutShared({ objects } as Pick<MobilityHost, 'objects'> as MobilityHost, 'v', children);
}

describe('FanOutShared', () => {
  it('one snapshot for every child; a change between two children taking it is shipped once to each, in its dirty rounds', () => {
    const objects = new ManagedObjectService();
    objects.registerTree({ id: 'vm:v', kind: 'vm', state: { state: 'running', n: 0 }, dependents: ['disk:v.0'] }, [{ id: 'disk:v.0', kind: 'disk', state: {} }]);
    const shared = sharedOver(objects, ['m~b', 'm~c']);
    let exports = 0;
    const exportEmbots = () => (exports++, { embots: new Uint8Array([0x90]), count: 0 });

    // Changed before anyone took the state: it is in the snapshot, in nobody's dirty rounds.
    objects.update('vm:v', { n: 1 });
    const forB = shared.managementStateFor('m~b', exportEmbots);
    objects.update('disk:v.0', { written: 1 });
    const forC = shared.managementStateFor('m~c', exportEmbots);
    expect(forC).toBe(forB);
    expect(exports).toBe(1);
    const target = new ManagedObjectService();
    target.instantiate(forB.elements);
    expect(target.get('vm:v')!.state).toMatchObject({ n: 1 });
    expect(unpack(forB.embots)).toEqual([]);

    // The disk changed after the snapshot: each child ships it once, in its own dirty round.
    expect(shared.collectDirtyFor('m~b').map((e) => e.id)).toEqual(['disk:v.0']);
    expect(shared.collectDirtyFor('m~b')).toEqual([]);
    expect(shared.collectDirtyFor('m~c').map((e) => e.id)).toEqual(['disk:v.0']);
    expect(shared.collectDirtyFor('m~c')).toEqual([]);
    // StartMigration's elements are serialized once as well.
    expect(shared.elementsForStart()).toBe(shared.elementsForStart());
  });

  it("a pre-warm's embots: packed once at the command, shipped once to each child after it, none before it", () => {
    const objects = new ManagedObjectService();
    objects.registerTree({ id: 'vm:v', kind: 'vm', state: {}, dependents: [] }, []);
    const shared = new FanOutShared({ objects } as Pick<MobilityHost, 'objects'> as MobilityHost, 'v', ['m~b', 'm~c'], { prewarm: true });
    let exports = 0;
    const exportPacked = () => (exports++, new Uint8Array([0x91, 0x01]));
    // Before the command the embots run here: nothing to re-ship.
    expect(shared.takeEmbotsResend('m~b', exportPacked)).toBeUndefined();
    shared.eventsHeld = true;
    const frozen = new Uint8Array([0x90]);
    shared.freezeEmbots(frozen);
    expect(shared.takeEmbotsResend('m~b', exportPacked)).toBe(frozen);
    expect(shared.takeEmbotsResend('m~b', exportPacked)).toBeUndefined();
    expect(shared.takeEmbotsResend('m~c', exportPacked)).toBe(frozen);
    expect(exports).toBe(0);
    // Without the command's pack (a path that did not freeze them), the child exports them itself.
    const other = new FanOutShared({ objects } as Pick<MobilityHost, 'objects'> as MobilityHost, 'v', ['m~b'], { prewarm: true });
    other.eventsHeld = true;
    expect(other.takeEmbotsResend('m~b', exportPacked)).toEqual(new Uint8Array([0x91, 0x01]));
    expect(exports).toBe(1);
  });

  it('bad input: a child that is not one of the fan-out is refused', () => {
    const objects = new ManagedObjectService();
    objects.registerTree({ id: 'vm:v', kind: 'vm', state: {}, dependents: [] }, []);
    const shared = sharedOver(objects, ['m~b']);
    expect(() => shared.managementStateFor('m~z', () => ({ embots: new Uint8Array(0), count: 0 }))).toThrow(expect.objectContaining({ code: ErrorCodes.MIGRATION_MISMATCH }));
  });
});
