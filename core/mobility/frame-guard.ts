/**
 * Every authenticated frame that names a migration is checked against the migration it names
 * before any handler runs: the id must belong to a migration this agent has with the sending peer
 * (conn.remoteAgent), in the role the frame is addressed to, for the same VM, in a phase where the
 * frame belongs. A frame that fails gets a coded Error reply and changes nothing: a peer that is
 * authenticated is still not allowed to open sockets, stage state or abort migrations that are
 * not its own (issue 11, defect 3).
 *
 * One table, `FRAME_RULES`, says for each request type (and Abort) what it must match; it is
 * exhaustive over the frame union like the tables of core/wire/frames.ts, so a new frame type does
 * not compile until someone decided what it may touch.
 */
import { ErrorCodes, ProtocolError } from '../errors.ts';
import type { Abort, RequestFrame, RequestType } from '../wire/frames.ts';
import type { HandlerTable, PeerConnection, RequestHandler } from '../wire/peer-connection.ts';
import type { MigrationRole } from './migration-journal.ts';

/**
 * States of the target machine as `stateName` renders them (nested ones as `parent.child`).
 * Waiting states are where a request is expected; while a step runs (`stagingState`…) none is.
 */
export type TargetStateName =
  | 'evaluating'
  | 'permitted'
  | 'stagingState'
  | 'stateStaged'
  | 'stagingEvents'
  | 'eventsStaged'
  | 'receivingMemory.applying'
  | 'receivingMemory.waiting'
  | 'vmReceived'
  | 'applyingDirty'
  | 'syncing'
  | 'booting'
  | 'booted'
  | 'committing'
  | 'discarding';

/** States of the source machine in which the target may ask it something. */
export type SourceStateName = 'sendingState';

/** Frames the guard checks: every request, and the one notification that acts on a migration. */
export type GuardedFrame = RequestFrame | Abort;
export type GuardedType = GuardedFrame['type'];

/**
 * What a frame must match.
 * - `free`: names no existing migration (Ping; StartMigration opens one and is admitted apart).
 * - `live`: a migration in progress here, in one of `states`.
 * - `settled`: a migration this agent committed as the target (ForwardedEvents and UdpHandover come
 *   after the commit); with `graceBound`, no longer ago than the forwarding grace period.
 * - `journaled`: any migration in the journal, finished or not (a restarted source asks how one ended).
 * - `service`: not a mobility frame: a feature service serves it through the peer endpoint
 *   (core/wire/peer-services.ts); mobility's handler table has none, and the guard refuses one.
 * `vm: true`: the frame's own `vm` field must be the migration's VM.
 */
export type FrameRule =
  | { readonly kind: 'free' }
  | { readonly kind: 'service' }
  | { readonly kind: 'live'; readonly role: 'target'; readonly states: readonly TargetStateName[]; readonly vm?: true }
  | { readonly kind: 'live'; readonly role: 'source'; readonly states: readonly SourceStateName[] }
  | { readonly kind: 'settled'; readonly role: 'target'; readonly graceBound: boolean; readonly vm?: true }
  | { readonly kind: 'journaled'; readonly role: 'target' };

const ACTIVE_TARGET: readonly TargetStateName[] = [
  'evaluating',
  'permitted',
  'stagingState',
  'stateStaged',
  'stagingEvents',
  'eventsStaged',
  'receivingMemory.applying',
  'receivingMemory.waiting',
  'vmReceived',
  'applyingDirty',
  'syncing',
  'booting',
  'booted',
  'committing',
  'discarding',
];

/** Pages (and the path probe's batches) flow while the target waits for the end-of-memory mark. */
const RECEIVING: readonly TargetStateName[] = ['eventsStaged', 'receivingMemory.waiting'];

export const FRAME_RULES: { readonly [K in GuardedType]: FrameRule } = {
  Ping: { kind: 'free' },
  StartMigration: { kind: 'free' },
  ManagementState: { kind: 'live', role: 'target', states: ['permitted'] },
  ManagementEventState: { kind: 'live', role: 'target', states: ['stateStaged'] },
  VmMemory: { kind: 'live', role: 'target', states: RECEIVING, vm: true },
  PageBatch: { kind: 'live', role: 'target', states: RECEIVING },
  PathOffer: { kind: 'live', role: 'target', states: ['eventsStaged'] },
  // From the permit until the memory moves: a source whose channel count is known at the permit
  // sends it right away, so the incoming VM (a QEMU process) starts while the management state is
  // staged. It starts a process, so only the migration's own source, naming its VM.
  PrepareIncoming: { kind: 'live', role: 'target', states: ['permitted', 'stagingState', 'stateStaged', 'stagingEvents', 'eventsStaged'], vm: true },
  DirtyObjects: { kind: 'live', role: 'target', states: ['vmReceived', 'syncing'] },
  MigrationComplete: { kind: 'live', role: 'target', states: ['vmReceived', 'syncing', 'booted'] },
  // Several destinations (issue 13): only once the final round is in, from the migration's own source.
  BootIncoming: { kind: 'live', role: 'target', states: ['syncing'] },
  ModuleRequest: { kind: 'live', role: 'source', states: ['sendingState'] },
  // Not bound to our clock: a source restarted long after the commit forwards the events it held
  // for a grace period from its restart (MobilityService.settleMoved); refusing them would lose
  // acknowledged events. The handler takes only events of elements the migration moved.
  ForwardedEvents: { kind: 'settled', role: 'target', graceBound: false },
  // Opens sockets, and is sent once, right after the commit.
  UdpHandover: { kind: 'settled', role: 'target', graceBound: true, vm: true },
  MigrationStatusQuery: { kind: 'journaled', role: 'target' },
  // Images (issue 14): the images service's, registered on the peer endpoint.
  BlockFetch: { kind: 'service' },
  IndexUpdate: { kind: 'service' },
  IndexQuery: { kind: 'service' },
  ImageBuild: { kind: 'service' },
  // The dashboard's cluster view (issue 15): the agent's status service, registered on the peer endpoint.
  PeerStatus: { kind: 'service' },
  // Either side may abort while the migration runs; the commit itself decides once it started.
  Abort: { kind: 'live', role: 'target', states: ACTIVE_TARGET },
};

/** A migration in progress, as the guard needs to see it. */
export interface LiveView {
  readonly vm: string;
  readonly peer: string;
  /** The machine's state, `parent.child` for nested ones; a final state counts as not live. */
  readonly state: string;
}

/** A migration in the journal, as the guard needs to see it. */
export interface JournalView {
  readonly vm: string;
  readonly peer: string;
  readonly phase: string;
  /** When the row last changed: for a committed target, the commit (ms since the epoch). */
  readonly updatedAt: number;
}

/** Where the guard looks migrations up; MobilityService gives its live map and its journal. */
export interface MigrationLookup {
  live(role: MigrationRole, id: string): LiveView | undefined;
  journaled(role: MigrationRole, id: string): JournalView | undefined;
}

export interface GuardContext {
  readonly lookup: MigrationLookup;
  /** Name the peer authenticated with (conn.remoteAgent). */
  readonly peer: string;
  readonly now: number;
  /** How long after a commit the frames of `graceBound` rules (UdpHandover) are still taken. */
  readonly settledForMs: number;
}

export type GuardVerdict =
  | { readonly ok: true; readonly migrationId: string | undefined; readonly probe: boolean }
  | { readonly ok: false; readonly error: ProtocolError };

/** The path probe sends its batches under `${migrationId}.probe` (core/mobility/source-side.ts). */
export const PROBE_SUFFIX = '.probe';

function refuse(code: (typeof ErrorCodes)['MIGRATION_UNKNOWN' | 'MIGRATION_PHASE' | 'MIGRATION_MISMATCH'], message: string, frame: GuardedFrame, peer: string): GuardVerdict {
  return { ok: false, error: new ProtocolError(code, message, { details: { type: frame.type, peer } }) };
}

/**
 * Checks one frame against the migration it names. Pure: the lookup is read, nothing is changed.
 *
 * A migration of another peer answers exactly like one that does not exist, so a peer cannot
 * probe for the ids of others.
 *
 * @example
 * ```ts
 * const v = checkFrame(frame, { lookup, peer: conn.remoteAgent, now: Date.now(), settledForMs: 30_000 });
 * if (!v.ok) throw v.error; // the connection sends it back as a coded Error reply
 * ```
 */
export function checkFrame(frame: GuardedFrame, ctx: GuardContext): GuardVerdict {
  const rule = FRAME_RULES[frame.type];
  if (rule.kind === 'free') return { ok: true, migrationId: undefined, probe: false };
  if (rule.kind === 'service') return { ok: false, error: new ProtocolError(ErrorCodes.REQUEST_FAILED, `${frame.type} is not a mobility frame`) };
  const named = (frame as { readonly migrationId: string }).migrationId;
  const probe = frame.type === 'PageBatch' && named.endsWith(PROBE_SUFFIX) && named.length > PROBE_SUFFIX.length;
  const id = probe ? named.slice(0, -PROBE_SUFFIX.length) : named;
  const unknown = (): GuardVerdict =>
    refuse(ErrorCodes.MIGRATION_UNKNOWN, `${frame.type}: no migration ${JSON.stringify(named)} with ${ctx.peer} ${rule.kind === 'settled' ? 'committed here' : rule.kind === 'journaled' ? 'on record here' : 'in progress here'} as the ${rule.role === 'target' ? 'target' : 'source'}`, frame, ctx.peer);
  const frameVm = 'vm' in frame && 'vm' in rule && rule.vm === true ? frame.vm : undefined;
  const vmMismatch = (vm: string): GuardVerdict | undefined =>
    frameVm !== undefined && frameVm !== vm ? refuse(ErrorCodes.MIGRATION_MISMATCH, `${frame.type} names VM ${JSON.stringify(frameVm)}, migration ${id} moves ${vm}`, frame, ctx.peer) : undefined;

  switch (rule.kind) {
    case 'live': {
      const m = ctx.lookup.live(rule.role, id);
      if (!m || m.peer !== ctx.peer) return unknown();
      const mismatch = vmMismatch(m.vm);
      if (mismatch) return mismatch;
      if (!(rule.states as readonly string[]).includes(m.state)) {
        return refuse(ErrorCodes.MIGRATION_PHASE, `${frame.type} is not accepted while migration ${id} is in ${m.state} (only in ${rule.states.join(', ')})`, frame, ctx.peer);
      }
      return { ok: true, migrationId: id, probe };
    }
    case 'settled': {
      const row = ctx.lookup.journaled(rule.role, id);
      if (!row || row.peer !== ctx.peer) return unknown();
      const mismatch = vmMismatch(row.vm);
      if (mismatch) return mismatch;
      if (row.phase !== 'committed') return refuse(ErrorCodes.MIGRATION_PHASE, `${frame.type} comes after the commit; migration ${id} is in ${row.phase}`, frame, ctx.peer);
      if (rule.graceBound && ctx.now - row.updatedAt > ctx.settledForMs) {
        return refuse(ErrorCodes.MIGRATION_PHASE, `${frame.type} for migration ${id}: its grace period ended ${ctx.now - row.updatedAt - ctx.settledForMs} ms ago`, frame, ctx.peer);
      }
      return { ok: true, migrationId: id, probe };
    }
    case 'journaled': {
      const row = ctx.lookup.journaled(rule.role, id);
      if (!row || row.peer !== ctx.peer) return unknown();
      return { ok: true, migrationId: id, probe };
    }
  }
}

/** The state of an xstate snapshot value as one name: `a` or `a.b` (first branch of parallel states). */
export function stateName(value: unknown): string {
  const parts: string[] = [];
  let v = value;
  while (typeof v === 'object' && v !== null) {
    const k = Object.keys(v)[0];
    if (k === undefined) break;
    parts.push(k);
    v = (v as Record<string, unknown>)[k];
  }
  if (typeof v === 'string') parts.push(v);
  return parts.join('.');
}

/**
 * The same handlers, each behind `check`: a frame `check` refuses never reaches its handler, and
 * the connection answers it with the error's code (PeerConnection.handlerFailed).
 */
export function guardHandlers(table: HandlerTable, check: (frame: RequestFrame, conn: PeerConnection) => GuardVerdict): HandlerTable {
  const out: Partial<Record<RequestType, RequestHandler<RequestType>>> = {};
  for (const [type, handler] of Object.entries(table) as [RequestType, RequestHandler<RequestType> | undefined][]) {
    if (!handler) continue;
    out[type] = (frame, conn) => {
      const v = check(frame, conn);
      if (!v.ok) throw v.error;
      return handler(frame, conn);
    };
  }
  return out as HandlerTable;
}
