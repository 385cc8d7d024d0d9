/**
 * A migration's dirty rounds each carry the elements changed since the round before, so an element
 * that changed in two rounds arrives twice; `applyDeltas` takes one delta per element (a list with
 * an element twice is malformed). The target keeps the latest of each: the higher version, or the
 * later round at equal versions. Entries that are not elements are kept as they are, for
 * `applyDeltas` to refuse with its coded error.
 */
import type { ManagedElement } from './managed-element.ts';

export function mergeDeltaRounds(earlier: readonly ManagedElement[], later: readonly unknown[]): ManagedElement[] {
  const out = [...earlier] as unknown[];
  const at = new Map<string, number>();
  out.forEach((e, i) => {
    const id = idOf(e);
    if (id !== undefined) at.set(id, i);
  });
  for (const e of later) {
    const id = idOf(e);
    const i = id === undefined ? undefined : at.get(id);
    if (id === undefined || i === undefined) {
      if (id !== undefined) at.set(id, out.length);
      out.push(e);
      continue;
    }
    const was = versionOf(out[i]);
    const now = versionOf(e);
    if (was === undefined || now === undefined || now >= was) out[i] = e;
  }
  return out as ManagedElement[];
}

function idOf(e: unknown): string | undefined {
  const id = typeof e === 'object' && e !== null ? (e as { id?: unknown }).id : undefined;
  return typeof id === 'string' ? id : undefined;
}

function versionOf(e: unknown): number | undefined {
  const v = typeof e === 'object' && e !== null ? (e as { version?: unknown }).version : undefined;
  return typeof v === 'number' ? v : undefined;
}
