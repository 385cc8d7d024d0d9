import { describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../core/errors.ts';
import { FRAME_RULES, checkFrame, guardHandlers, stateName, type GuardContext, type GuardedFrame, type JournalView, type LiveView, type MigrationLookup } from '../../core/mobility/frame-guard.ts';
import { FRAME_KINDS } from '../../core/wire/frames.ts';
import type { MigrationRole } from '../../core/mobility/migration-journal.ts';
import type { PeerConnection } from '../../core/wire/peer-connection.ts';

/** Migrations as plain data: the guard reads nothing else. */
function lookupOf(live: Record<string, LiveView>, journal: Record<string, JournalView> = {}): MigrationLookup {
  return {
    live: (role: MigrationRole, id: string) => live[`${role}:${id}`],
    journaled: (role: MigrationRole, id: string) => journal[`${role}:${id}`],
  };
}

const NOW = 1_000_000;
const ctx = (lookup: MigrationLookup, peer = 'a'): GuardContext => ({ lookup, peer, now: NOW, settledForMs: 10_000 });
const bin = new Uint8Array(4);

const frames = {
  ms: (migrationId: string): GuardedFrame => ({ type: 'ManagementState', reqId: 1, migrationId, elements: bin, embots: bin }),
  mem: (migrationId: string, vm: string): GuardedFrame => ({ type: 'VmMemory', reqId: 1, migrationId, vm, round: 0, seq: 0, last: true, pages: bin }),
  batch: (migrationId: string): GuardedFrame => ({ type: 'PageBatch', reqId: 1, migrationId, path: 'direct', round: 0, final: false, pageSize: 4096, indexes: bin, pages: bin, checksum: 0 }),
  udp: (migrationId: string, vm: string): GuardedFrame => ({ type: 'UdpHandover', reqId: 1, migrationId, vm, served: 0, packets: bin }),
  fwd: (migrationId: string): GuardedFrame => ({ type: 'ForwardedEvents', reqId: 1, migrationId, events: bin }),
  status: (migrationId: string): GuardedFrame => ({ type: 'MigrationStatusQuery', reqId: 1, migrationId }),
  abort: (migrationId: string): GuardedFrame => ({ type: 'Abort', migrationId, reason: 'x' }),
  mod: (migrationId: string): GuardedFrame => ({ type: 'ModuleRequest', reqId: 1, migrationId, name: 'm', hash: 'h' }),
  prepare: (migrationId: string, vm: string): GuardedFrame => ({ type: 'PrepareIncoming', reqId: 1, migrationId, vm, spec: { name: vm }, channels: 1 }),
};

function codeOf(v: ReturnType<typeof checkFrame>): string | undefined {
  return v.ok ? undefined : v.error.code;
}

describe('frame guard', () => {
  it('has a rule for every request type and for Abort, and for nothing else', () => {
    const requests = Object.entries(FRAME_KINDS)
      .filter(([, kind]) => kind === 'request')
      .map(([t]) => t);
    expect(Object.keys(FRAME_RULES).sort()).toEqual([...requests, 'Abort'].sort());
  });

  it('passes a frame for a live migration of the same peer, role, VM and phase', () => {
    const lookup = lookupOf({ 'target:m1': { vm: 'web', peer: 'a', state: 'permitted' } });
    expect(checkFrame(frames.ms('m1'), ctx(lookup))).toEqual({ ok: true, migrationId: 'm1', probe: false });
  });

  it('refuses an unknown id, and a migration of another peer the same way', () => {
    const lookup = lookupOf({ 'target:m1': { vm: 'web', peer: 'a', state: 'permitted' } });
    expect(codeOf(checkFrame(frames.ms('no-such'), ctx(lookup)))).toBe(ErrorCodes.MIGRATION_UNKNOWN);
    const other = checkFrame(frames.ms('m1'), ctx(lookup, 'mallory'));
    expect(codeOf(other)).toBe(ErrorCodes.MIGRATION_UNKNOWN);
    // Nothing in the message tells mallory that m1 exists with someone else.
    expect(other.ok ? '' : other.error.message).not.toContain("'a'");
  });

  it('refuses a frame in the wrong phase with MIGRATION_PHASE', () => {
    const lookup = lookupOf({ 'target:m1': { vm: 'web', peer: 'a', state: 'stagingState' } });
    const v = checkFrame(frames.ms('m1'), ctx(lookup));
    expect(codeOf(v)).toBe(ErrorCodes.MIGRATION_PHASE);
    expect(v.ok ? '' : v.error.message).toContain('stagingState');
  });

  it('refuses a frame naming another VM with MIGRATION_MISMATCH', () => {
    const lookup = lookupOf({ 'target:m1': { vm: 'web', peer: 'a', state: 'eventsStaged' } });
    expect(codeOf(checkFrame(frames.mem('m1', 'ghost'), ctx(lookup)))).toBe(ErrorCodes.MIGRATION_MISMATCH);
    expect(checkFrame(frames.mem('m1', 'web'), ctx(lookup)).ok).toBe(true);
  });

  it("takes PrepareIncoming only from the migration's own source, for its VM, before the memory moves", () => {
    const lookup = lookupOf({ 'target:m1': { vm: 'web', peer: 'a', state: 'eventsStaged' }, 'target:m2': { vm: 'db', peer: 'a', state: 'receivingMemory.waiting' } });
    expect(checkFrame(frames.prepare('m1', 'web'), ctx(lookup))).toEqual({ ok: true, migrationId: 'm1', probe: false });
    expect(codeOf(checkFrame(frames.prepare('m1', 'web'), ctx(lookup, 'mallory')))).toBe(ErrorCodes.MIGRATION_UNKNOWN);
    expect(codeOf(checkFrame(frames.prepare('m1', 'db'), ctx(lookup)))).toBe(ErrorCodes.MIGRATION_MISMATCH);
    expect(codeOf(checkFrame(frames.prepare('m2', 'db'), ctx(lookup)))).toBe(ErrorCodes.MIGRATION_PHASE);
    expect(codeOf(checkFrame(frames.prepare('m3', 'web'), ctx(lookup)))).toBe(ErrorCodes.MIGRATION_UNKNOWN);
  });

  it('takes an early PrepareIncoming from the permit until the events are staged, and in no state after or before', () => {
    const early = ['permitted', 'stagingState', 'stateStaged', 'stagingEvents', 'eventsStaged'];
    const others = ['evaluating', 'receivingMemory.applying', 'receivingMemory.waiting', 'vmReceived', 'applyingDirty', 'syncing', 'booting', 'booted', 'committing', 'discarding'];
    for (const state of early) expect(checkFrame(frames.prepare('m1', 'web'), ctx(lookupOf({ 'target:m1': { vm: 'web', peer: 'a', state } }))).ok, state).toBe(true);
    for (const state of others) expect(codeOf(checkFrame(frames.prepare('m1', 'web'), ctx(lookupOf({ 'target:m1': { vm: 'web', peer: 'a', state } })))), state).toBe(ErrorCodes.MIGRATION_PHASE);
    // Still only the migration's own source, for its VM, in every state it is taken in.
    const permitted = lookupOf({ 'target:m1': { vm: 'web', peer: 'a', state: 'permitted' } });
    expect(codeOf(checkFrame(frames.prepare('m1', 'web'), ctx(permitted, 'mallory')))).toBe(ErrorCodes.MIGRATION_UNKNOWN);
    expect(codeOf(checkFrame(frames.prepare('m1', 'db'), ctx(permitted)))).toBe(ErrorCodes.MIGRATION_MISMATCH);
  });

  it('looks the role up: a source migration does not take target frames, nor the reverse', () => {
    const lookup = lookupOf({ 'source:m1': { vm: 'web', peer: 'a', state: 'sendingState' }, 'target:m2': { vm: 'db', peer: 'a', state: 'permitted' } });
    expect(codeOf(checkFrame(frames.ms('m1'), ctx(lookup)))).toBe(ErrorCodes.MIGRATION_UNKNOWN);
    expect(checkFrame(frames.mod('m1'), ctx(lookup)).ok).toBe(true);
    expect(codeOf(checkFrame(frames.mod('m2'), ctx(lookup)))).toBe(ErrorCodes.MIGRATION_UNKNOWN);
  });

  it('maps a probe batch to its migration and marks it', () => {
    const lookup = lookupOf({ 'target:m1': { vm: 'web', peer: 'a', state: 'eventsStaged' } });
    expect(checkFrame(frames.batch('m1.probe'), ctx(lookup))).toEqual({ ok: true, migrationId: 'm1', probe: true });
    expect(codeOf(checkFrame(frames.batch('m2.probe'), ctx(lookup)))).toBe(ErrorCodes.MIGRATION_UNKNOWN);
    expect(codeOf(checkFrame(frames.batch('.probe'), ctx(lookup)))).toBe(ErrorCodes.MIGRATION_UNKNOWN);
    // Only PageBatch knows probes.
    expect(codeOf(checkFrame({ type: 'PathOffer', reqId: 1, migrationId: 'm1.probe', paths: 2 }, ctx(lookup)))).toBe(ErrorCodes.MIGRATION_UNKNOWN);
  });

  it('takes UdpHandover and ForwardedEvents only after the commit, from the source, for its VM; UdpHandover only within the grace period', () => {
    const committed: JournalView = { vm: 'web', peer: 'a', phase: 'committed', updatedAt: NOW - 5_000 };
    const lookup = lookupOf({}, { 'target:m1': committed, 'target:m2': { ...committed, phase: 'syncing' }, 'target:m3': { ...committed, updatedAt: NOW - 20_000 } });
    expect(checkFrame(frames.udp('m1', 'web'), ctx(lookup)).ok).toBe(true);
    expect(checkFrame(frames.fwd('m1'), ctx(lookup)).ok).toBe(true);
    expect(codeOf(checkFrame(frames.udp('no-such', 'ghost'), ctx(lookup)))).toBe(ErrorCodes.MIGRATION_UNKNOWN);
    expect(codeOf(checkFrame(frames.udp('m1', 'ghost'), ctx(lookup)))).toBe(ErrorCodes.MIGRATION_MISMATCH);
    expect(codeOf(checkFrame(frames.udp('m1', 'web'), ctx(lookup, 'b')))).toBe(ErrorCodes.MIGRATION_UNKNOWN);
    expect(codeOf(checkFrame(frames.udp('m2', 'web'), ctx(lookup)))).toBe(ErrorCodes.MIGRATION_PHASE);
    expect(codeOf(checkFrame(frames.udp('m3', 'web'), ctx(lookup)))).toBe(ErrorCodes.MIGRATION_PHASE);
    // A source restarted long after the commit still forwards what it held: taken, not lost.
    expect(checkFrame(frames.fwd('m3'), ctx(lookup)).ok).toBe(true);
    expect(codeOf(checkFrame(frames.fwd('m2'), ctx(lookup)))).toBe(ErrorCodes.MIGRATION_PHASE);
    expect(codeOf(checkFrame(frames.fwd('m1'), ctx(lookup, 'b')))).toBe(ErrorCodes.MIGRATION_UNKNOWN);
  });

  it('answers status queries for any journaled migration of the asking peer', () => {
    const lookup = lookupOf({}, { 'target:m1': { vm: 'web', peer: 'a', phase: 'aborted', updatedAt: 0 } });
    expect(checkFrame(frames.status('m1'), ctx(lookup)).ok).toBe(true);
    expect(codeOf(checkFrame(frames.status('m1'), ctx(lookup, 'b')))).toBe(ErrorCodes.MIGRATION_UNKNOWN);
  });

  it('lets only the source abort, and only while the migration runs', () => {
    const lookup = lookupOf({ 'target:m1': { vm: 'web', peer: 'a', state: 'receivingMemory.waiting' } });
    expect(checkFrame(frames.abort('m1'), ctx(lookup)).ok).toBe(true);
    expect(codeOf(checkFrame(frames.abort('m1'), ctx(lookup, 'b')))).toBe(ErrorCodes.MIGRATION_UNKNOWN);
  });

  it('passes frames that name no migration', () => {
    expect(checkFrame({ type: 'Ping', reqId: 1, ts: 1 }, ctx(lookupOf({}))).ok).toBe(true);
  });

  it('renders nested machine states as parent.child', () => {
    expect(stateName('permitted')).toBe('permitted');
    expect(stateName({ receivingMemory: 'waiting' })).toBe('receivingMemory.waiting');
    expect(stateName({})).toBe('');
  });

  it('keeps a refused frame from its handler', async () => {
    const lookup = lookupOf({ 'target:m1': { vm: 'web', peer: 'a', state: 'permitted' } });
    const reached: string[] = [];
    const table = guardHandlers(
      {
        ManagementState: (f) => {
          reached.push(f.migrationId);
          return { type: 'ManagementStateSuccess', migrationId: f.migrationId };
        },
      },
      (frame, conn) => checkFrame(frame, ctx(lookup, conn.remoteAgent)),
    );
    const conn = (peer: string) => ({ remoteAgent: peer }) as PeerConnection;
    const ms = frames.ms('m1') as Extract<GuardedFrame, { type: 'ManagementState' }>;
    expect(() => table.ManagementState!(ms, conn('mallory'))).toThrow(expect.objectContaining({ code: ErrorCodes.MIGRATION_UNKNOWN }));
    expect(reached).toEqual([]);
    expect(await table.ManagementState!(ms, conn('a'))).toMatchObject({ type: 'ManagementStateSuccess' });
    expect(reached).toEqual(['m1']);
  });
});
