/**
 * Whether a VM the driver still holds after a restart, with no element managing it here, is one
 * that left this host. The drop of a moved VM deregisters its element in the transaction that
 * journals the move, while the driver's removal (qemu: the QEMU process, its state dir) follows
 * it; an agent killed in between finds the VM again and must finish the removal, not adopt it
 * (two owners).
 */
import type { MigrationRow } from './migration-journal.ts';

/**
 * `moves`: the VM's migrations that completed or have no outcome yet, the latest first
 * (`MigrationJournal.movesOf`); `dropped(id)`: the source journaled that migration's drop (its
 * forwarding record, written in the drop's transaction). The latest completed move decides: out of
 * here (source) or in (target); a source migration cut by the restart after its drop counts as out.
 *
 * @example
 * ```ts
 * if (!objects.has(`vm:${vm}`) && movedAway(journal.movesOf(vm), (id) => forwarding.journal.get(id) !== undefined)) await driver.remove(vm);
 * ```
 */
export function movedAway(moves: readonly MigrationRow[], dropped: (migrationId: string) => boolean): boolean {
  for (const row of moves) {
    if (row.outcome === 'completed') return row.role === 'source';
    if (row.role === 'source' && dropped(row.id)) return true;
  }
  return false;
}
