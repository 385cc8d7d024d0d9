/**
 * Which VM a restarted agent must not adopt again: the decision over the VM's journaled moves (a
 * real SQLite journal), the one that makes the agent remove a VM.
 */
import { describe, expect, it } from 'vitest';
import { MigrationJournal } from '../../core/mobility/migration-journal.ts';
import { movedAway } from '../../core/mobility/moved-away.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { tempStores } from '../harness/temp-store.ts';

const cleanups = cleanupsAfterEach();
const { openStore } = tempStores(cleanups, 'embot-moved-away-');
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

async function journal(): Promise<{ j: MigrationJournal; out: (id: string, vm?: string) => Promise<void>; into: (id: string, vm?: string) => Promise<void> }> {
  const j = new MigrationJournal(openStore());
  // Rows apart in time: the latest first is by when they ended.
  const out = async (id: string, vm = 'x'): Promise<void> => {
    j.begin(id, 'source', vm, 'b', 'requesting');
    await sleep(3);
    j.finish(id, 'source', 'completed', 'completed', undefined);
  };
  const into = async (id: string, vm = 'x'): Promise<void> => {
    j.begin(id, 'target', vm, 'b', 'evaluating');
    await sleep(3);
    j.finish(id, 'target', 'committed', 'completed', undefined);
  };
  return { j, out, into };
}

const none = (): boolean => false;

describe('movedAway', () => {
  it('a VM whose latest move went out of here left; one that came back since did not', async () => {
    const { j, out, into } = await journal();
    await out('m-1');
    expect(movedAway(j.movesOf('x'), none)).toBe(true);
    await into('m-2');
    expect(movedAway(j.movesOf('x'), none)).toBe(false);
    await out('m-3');
    expect(movedAway(j.movesOf('x'), none)).toBe(true);
    // Another VM's moves say nothing about this one.
    expect(movedAway(j.movesOf('y'), none)).toBe(false);
  });

  it('a migration out cut by the restart counts as out only once its drop was journaled (its forwarding)', async () => {
    const { j, into } = await journal();
    await into('m-1');
    j.begin('m-2', 'source', 'x', 'b', 'finishing');
    expect(movedAway(j.movesOf('x'), none)).toBe(false);
    expect(movedAway(j.movesOf('x'), (id) => id === 'm-2')).toBe(true);
  });

  it('aborted and denied migrations and a fan-out parent without a drop of its own decide nothing', async () => {
    const { j, into } = await journal();
    await into('m-1');
    j.begin('m-2', 'source', 'x', 'b,c', 'migratingVm', { fanOut: true });
    j.begin('m-2~b', 'source', 'x', 'b', 'rollingBack');
    j.finish('m-2~b', 'source', 'aborted', 'aborted', 'terminated');
    j.begin('m-3', 'source', 'x', 'b', 'requesting');
    j.finish('m-3', 'source', 'denied', 'denied', 'no');
    expect(movedAway(j.movesOf('x'), none)).toBe(false);
    // The winner child's drop (its forwarding) decides for the parent still open.
    j.begin('m-2~c', 'source', 'x', 'c', 'finishing');
    expect(movedAway(j.movesOf('x'), (id) => id === 'm-2~c')).toBe(true);
  });
});
