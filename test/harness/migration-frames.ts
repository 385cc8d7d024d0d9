import { ManagedObjectService } from '../../core/objects/object-service.ts';

/**
 * The bytes a real source ships as a VM's elements (the VM and its disk), made by a real
 * ManagedObjectService (in memory), so a hand-driven peer can open migrations an agent admits.
 */
export function vmElementBytes(vm: string, memory: number): Uint8Array {
  const objects = new ManagedObjectService();
  objects.registerTree(
    { id: `vm:${vm}`, kind: 'vm', state: { name: vm, state: 'stopped', memory, vcpus: 1 }, dependents: [`disk:${vm}.0`] },
    [{ id: `disk:${vm}.0`, kind: 'disk', state: { vm } }],
  );
  return objects.serialize(`vm:${vm}`);
}

/** A StartMigration frame for `vm`, as a source would send it (no modules, so no module shipping). */
export function startMigration(reqId: number, migrationId: string, vm: string, memory = 1 << 20): Record<string, unknown> & { readonly reqId: number } {
  return { type: 'StartMigration', reqId, migrationId, vm, elements: vmElementBytes(vm, memory), resources: { memory, vcpus: 1 }, modules: [] };
}
