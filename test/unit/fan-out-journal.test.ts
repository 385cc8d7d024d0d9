import { describe, expect, it } from 'vitest';
import { ErrorCodes, ProtocolError } from '../../core/errors.ts';
import { FanOutJournal } from '../../core/mobility/fan-out-journal.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { expectThrownCode } from '../harness/expect-code.ts';
import { tempStores } from '../harness/temp-store.ts';

const { tmpStoreFile, openStore } = tempStores(cleanupsAfterEach(), 'embot-fanout-');

describe('fan-out journal', () => {
  it('the first claim stands, also across a reopen of the store file (a restarted source reads it)', () => {
    const file = tmpStoreFile();
    const store = openStore(file);
    const j = new FanOutJournal(store);
    j.begin('m-1', 'web', ['b', 'c', 'd']);
    expect(j.get('m-1')).toMatchObject({ vm: 'web', destinations: ['b', 'c', 'd'], winner: undefined, outcome: undefined });
    expect(j.claimWinner('m-1', 'c')).toBe('c');
    expect(j.claimWinner('m-1', 'b')).toBe('c');
    expect(j.claimWinner('m-1', 'c')).toBe('c');
    store.close();

    const again = new FanOutJournal(openStore(file));
    expect(again.unfinished().map((r) => [r.id, r.winner])).toEqual([['m-1', 'c']]);
    again.finish('m-1', 'completed');
    expect(again.unfinished()).toEqual([]);
    expect(again.get('m-1')).toMatchObject({ winner: 'c', outcome: 'completed' });
    expect(again.claimWinner('m-1', 'd')).toBe('c');
  });

  it('the store itself refuses a second winner, whatever code tries', () => {
    const store = openStore();
    const j = new FanOutJournal(store);
    j.begin('m-2', 'web', ['b', 'c']);
    j.claimWinner('m-2', 'b');
    expect(() => store.db.prepare("UPDATE fan_outs SET winner = 'c' WHERE id = 'm-2'").run()).toThrow(/fan-out winner already journaled/);
    expect(() => store.db.prepare("UPDATE fan_outs SET winner = NULL WHERE id = 'm-2'").run()).toThrow(/fan-out winner already journaled/);
    expect(j.get('m-2')?.winner).toBe('b');
  });

  it('refuses claims it cannot honour with codes, changing nothing', () => {
    const j = new FanOutJournal(openStore());
    j.begin('m-3', 'web', ['b', 'c']);
    expectThrownCode(() => j.claimWinner('nope', 'b'), ErrorCodes.MIGRATION_UNKNOWN, ProtocolError);
    expectThrownCode(() => j.claimWinner('m-3', 'a'), ErrorCodes.MIGRATION_MISMATCH, ProtocolError);
    expect(j.get('m-3')?.winner).toBeUndefined();
    j.finish('m-3', 'aborted', 'no destination booted');
    // Ended without a winner (the source took its VM back): a late BootReady cannot make one.
    expectThrownCode(() => j.claimWinner('m-3', 'b'), ErrorCodes.MIGRATION_PHASE, ProtocolError);
    expect(j.get('m-3')).toMatchObject({ winner: undefined, outcome: 'aborted', reason: 'no destination booted' });
  });
});
