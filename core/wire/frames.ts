/**
 * Every frame two agents exchange on the peer link, as one discriminated union on `type`.
 *
 * Four kinds: handshake frames (before authentication, strictly sequential, no ids), requests
 * (carry `reqId`, chosen by the sender, unique per connection and direction), replies (carry
 * `replyTo` = the request's `reqId`) and notifications (`Abort`, and `Error` without `replyTo`).
 *
 * Bulk state (elements, embots, hold queues, deltas, module code, VM pages) travels as opaque
 * `Uint8Array`s produced by the owning service (objects, embots, sensors, plugins); msgpackr encodes
 * them as `bin`, so they cross the wire without re-encoding and arrive as views of the received
 * buffer (no second copy).
 */
import type { ErrorCode } from '../errors.ts';

/**
 * The newest wire protocol this agent speaks, bumped when a frame changes shape. A link runs at
 * the client's version (Hello.protocol) when the server speaks it; a client an older server turns
 * away dials again at that server's version (peer-client.ts), and `peer.protocol` pins an older
 * one for a rolling upgrade.
 */
export const PROTOCOL_VERSION = 4;
/** The oldest version this agent still speaks. */
export const MIN_PROTOCOL_VERSION = 1;

/** The version that added each optional field: a sender uses it only on a link of that version or newer. */
export const PROTOCOL_FEATURES = {
  /** PageBatch.zeros: all-zero pages named by index, no data. */
  zeroPages: 2,
  /** DirtyObjects.boot: the final round asks the destination to boot too (answered BootReady). */
  bootWithFinalRound: 2,
  /** MigrationStateFailed.failedStep: the target's step that failed, so the source need not read it from the reason's wording. */
  failedStep: 3,
  /** PrepareIncoming.prewarm: the copy is a pre-warm's, so the target may ready its VM more thoroughly first. */
  prewarmPrepare: 4,
  /** MigrationComplete.memoryBytes: what the source sent, for a target that cannot count it (qemu). */
  completeMemoryBytes: 4,
} as const satisfies Readonly<Record<string, number>>;

export type ProtocolFeature = keyof typeof PROTOCOL_FEATURES;

/** The optional field each feature added, by frame: a link of an older version refuses it as its own build would (PeerConnection). */
export const PROTOCOL_FEATURE_FIELDS: { readonly [F in ProtocolFeature]: { readonly frame: 'PageBatch' | 'DirtyObjects' | 'MigrationStateFailed' | 'PrepareIncoming' | 'MigrationComplete'; readonly field: string } } = {
  zeroPages: { frame: 'PageBatch', field: 'zeros' },
  bootWithFinalRound: { frame: 'DirtyObjects', field: 'boot' },
  failedStep: { frame: 'MigrationStateFailed', field: 'failedStep' },
  prewarmPrepare: { frame: 'PrepareIncoming', field: 'prewarm' },
  completeMemoryBytes: { frame: 'MigrationComplete', field: 'memoryBytes' },
};

/** Resources the VM needs at the target, checked by the target's migration policy. */
export interface MigrationResources {
  /** Bytes of memory. */
  readonly memory: number;
  readonly vcpus: number;
}

// ---------------------------------------------------------------------------------------------
// handshake (mutual challenge–response, see auth.ts)

/** Client → server, first frame on a new connection. */
export interface Hello {
  readonly type: 'Hello';
  readonly protocol: number;
  readonly agent: string;
  /** 32 random bytes. */
  readonly nonce: Uint8Array;
}

/** Server → client: the server's nonce and its proof of the cluster secret (the server proves first). */
export interface Challenge {
  readonly type: 'Challenge';
  readonly agent: string;
  readonly nonce: Uint8Array;
  readonly proof: Uint8Array;
}

/** Client → server, sent only after the client verified the server's proof. */
export interface Auth {
  readonly type: 'Auth';
  readonly proof: Uint8Array;
}

/** Server → client: authenticated; from now on any frame may flow in both directions. */
export interface AuthOk {
  readonly type: 'AuthOk';
}

// ---------------------------------------------------------------------------------------------
// requests

/** Step 1, source → target. */
export interface StartMigration {
  readonly type: 'StartMigration';
  readonly reqId: number;
  readonly migrationId: string;
  readonly vm: string;
  /** Serialized managed elements (VM element and dependents), for the target's policy to inspect. */
  readonly elements: Uint8Array;
  readonly resources: MigrationResources;
  /** Modules the embots need, each `name@version#hash`. */
  readonly modules: readonly string[];
}

/** Step 2, source → target: elements and embots with their policy snapshots. */
export interface ManagementState {
  readonly type: 'ManagementState';
  readonly reqId: number;
  readonly migrationId: string;
  readonly elements: Uint8Array;
  readonly embots: Uint8Array;
}

/** Step 2, target → source, while the target stages a ManagementState and lacks a module. */
export interface ModuleRequest {
  readonly type: 'ModuleRequest';
  readonly reqId: number;
  readonly migrationId: string;
  readonly name: string;
  readonly hash: string;
}

/** Step 3, source → target: the held events, in the sensor service's byte form. */
export interface ManagementEventState {
  readonly type: 'ManagementEventState';
  readonly reqId: number;
  readonly migrationId: string;
  readonly holdQueues: Uint8Array;
}

/** Step 4 for the `sim` driver: VM memory pages over the peer link (not in the design table). */
export interface VmMemory {
  readonly type: 'VmMemory';
  readonly reqId: number;
  readonly migrationId: string;
  readonly vm: string;
  /** Pre-copy round (0 = first full copy); the stop-and-copy round has `last: true`. */
  readonly round: number;
  /** Chunk number within the round. */
  readonly seq: number;
  readonly last: boolean;
  readonly pages: Uint8Array;
}

/**
 * Pre-copy data plane, source → target on a data channel (a PeerConnection separate from the
 * control link): a batch of VM memory pages. Every batch of a round is acknowledged before the
 * next round starts; the one batch with `final: true` ends the stop-and-copy round.
 */
export interface PageBatch {
  readonly type: 'PageBatch';
  readonly reqId: number;
  readonly migrationId: string;
  /** Name of the data path the batch travelled on (for reports). */
  readonly path: string;
  readonly round: number;
  readonly final: boolean;
  readonly pageSize: number;
  /** Page indexes, Uint32 little-endian. */
  readonly indexes: Uint8Array;
  /** The pages, concatenated in index order; the VM's last page may be short. */
  readonly pages: Uint8Array;
  /** zlib crc32 over `indexes`, then `pages`, then `zeros` when present. */
  readonly checksum: number;
  /** CPU state, only on the final batch. */
  readonly cpu?: Uint8Array;
  /**
   * Page indexes (Uint32 little-endian) of pages that are all zero: written as zeros at the
   * target, their bytes not in `pages` (QEMU's zero-page flag; a fresh VM's memory is mostly zero).
   */
  readonly zeros?: Uint8Array;
}

/** Step 5, source → target, repeated until nothing changed. */
export interface DirtyObjects {
  readonly type: 'DirtyObjects';
  readonly reqId: number;
  readonly migrationId: string;
  readonly round: number;
  /** Serialized changed managed objects. */
  readonly deltas: Uint8Array;
  /** Events held since the previous round, in the sensor service's byte form. */
  readonly events: Uint8Array;
  /** A pre-warm's first round after the command: the embots as frozen then (they ran at the source meanwhile); replaces the staged ones. */
  readonly embots?: Uint8Array;
  /**
   * A fan-out child's final round: once it is applied, boot the incoming VM as BootIncoming does
   * and answer BootReady (one round trip less inside the switch's downtime).
   */
  readonly boot?: boolean;
}

/** Step 6, source → target. */
export interface MigrationComplete {
  readonly type: 'MigrationComplete';
  readonly reqId: number;
  readonly migrationId: string;
  /**
   * Memory bytes the source sent: for a target whose driver moves memory by a stream of its own
   * (qemu), which counts none itself, so that its record says what moved. Protocol 4.
   */
  readonly memoryBytes?: number;
}

/** After the switch, source → new owner: events that still reached the source (not in the design table). */
export interface ForwardedEvents {
  readonly type: 'ForwardedEvents';
  readonly reqId: number;
  readonly migrationId: string;
  readonly events: Uint8Array;
  /**
   * The source's first batch after the switch: the events it held after its last dirty round (sent
   * even when there are none). The new owner holds the moved elements' events until it has it.
   */
  readonly handOver?: boolean;
}

/** Liveness and round-trip measurement. */
/**
 * Asked by a source restarted after sending MigrationComplete: did the target commit? A target
 * that has not committed discards the migration before answering, so the answer is final.
 */
export interface MigrationStatusQuery {
  readonly type: 'MigrationStatusQuery';
  readonly reqId: number;
  readonly migrationId: string;
}

/**
 * Source → one destination of a migration to several (issue 13), after its final round: take the
 * incoming VM to its last reversible point (booted, not running) and say so. The first BootReady
 * to reach the source wins (README "Several destinations"); the others get Abort. A target that
 * cannot boot answers MigrationStateFailed (or, without a handler, an Error): it counts as failed.
 */
export interface BootIncoming {
  readonly type: 'BootIncoming';
  readonly reqId: number;
  readonly migrationId: string;
}

/** Source → target before adding a data path: can the target reassemble pages from `paths` paths? */
export interface PathOffer {
  readonly type: 'PathOffer';
  readonly reqId: number;
  readonly migrationId: string;
  readonly paths: number;
}

/**
 * Source → target once the planner chose the data paths, before the memory moves: ready an
 * incoming VM of this driver spec (`HypervisorDriver.prepareIncoming`) for `channels` streams.
 * The target answers where the source's hypervisor sends the memory (IncomingReady).
 */
export interface PrepareIncoming {
  readonly type: 'PrepareIncoming';
  readonly reqId: number;
  readonly migrationId: string;
  readonly vm: string;
  /** The source driver's spec of the VM (`HypervisorDriver.spec`); the target's driver validates it. */
  readonly spec: Readonly<Record<string, unknown>>;
  /** Parallel streams: the planner's paths (QEMU multifd channels). */
  readonly channels: number;
  /**
   * The copy is a pre-warm's (its switch waits for a command): the target may take longer to ready
   * its VM so that less work falls in the switch (qemu faults the guest RAM in). Protocol 4.
   */
  readonly prewarm?: boolean;
}

/** Source → target after the switch: the VM's UDP service state and the packets buffered while it was offline. */
export interface UdpHandover {
  readonly type: 'UdpHandover';
  readonly reqId: number;
  readonly migrationId: string;
  readonly vm: string;
  /** Requests the VM's service had served (its state, carried like memory). */
  readonly served: number;
  /** encodePackets() of the buffered packets, in arrival order. */
  readonly packets: Uint8Array;
}

export interface Ping {
  readonly type: 'Ping';
  readonly reqId: number;
  /** Sender's clock, ms; echoed back. */
  readonly ts: number;
}

// ---------------------------------------------------------------------------------------------
// images (issue 14): served by the images service, registered on the peer endpoint
// (peer-services.ts); they never pass through the mobility service.

/** Any agent → a holder: send the blocks with these hashes (raw 32-byte sha256s, concatenated). */
export interface BlockFetch {
  readonly type: 'BlockFetch';
  readonly reqId: number;
  readonly hashes: Uint8Array;
}

/** A member → its group's global indexer: its index, whole or as the change since its last update (images/index-update.ts). */
export interface IndexUpdate {
  readonly type: 'IndexUpdate';
  readonly reqId: number;
  readonly body: Uint8Array;
}

/** Any agent → the global indexer: an image's manifest, who holds each of its blocks, the members' load. */
export interface IndexQuery {
  readonly type: 'IndexQuery';
  readonly reqId: number;
  readonly image: string;
}

/** Any agent → a peer: its health and load, for the dashboard's cluster view. */
export interface PeerStatus {
  readonly type: 'PeerStatus';
  readonly reqId: number;
}

/** Any agent → the host an image is to be built at: build it there from the cheapest holders. */
export interface ImageBuild {
  readonly type: 'ImageBuild';
  readonly reqId: number;
  readonly image: string;
}

// ---------------------------------------------------------------------------------------------
// replies

export interface MigrationPermitted {
  readonly type: 'MigrationPermitted';
  readonly replyTo: number;
  readonly migrationId: string;
}

export interface MigrationDenied {
  readonly type: 'MigrationDenied';
  readonly replyTo: number;
  readonly migrationId: string;
  readonly reason: string;
}

export interface ManagementStateSuccess {
  readonly type: 'ManagementStateSuccess';
  readonly replyTo: number;
  readonly migrationId: string;
}

export interface ManagementStateFailed {
  readonly type: 'ManagementStateFailed';
  readonly replyTo: number;
  readonly migrationId: string;
  readonly reason: string;
}

/** The target could not instantiate a managed object, embot or module (wrong hash, untrusted...). */
export interface ManagedObjectInstantiationError {
  readonly type: 'ManagedObjectInstantiationError';
  readonly replyTo: number;
  readonly migrationId: string;
  readonly reason: string;
  /** Element id, embot id or module ref that failed, when known. */
  readonly object?: string;
}

export interface ModuleBundle {
  readonly type: 'ModuleBundle';
  readonly replyTo: number;
  readonly name: string;
  readonly version: string;
  readonly hash: string;
  /** The module folder packed by the plugin loader. */
  readonly code: Uint8Array;
  /** Detached ed25519 signature of the module (its `module.sig`), when the module is signed. */
  readonly signature?: Uint8Array;
}

export interface ManagementEventStateSuccess {
  readonly type: 'ManagementEventStateSuccess';
  readonly replyTo: number;
  readonly migrationId: string;
}

export interface ManagementEventStateFailed {
  readonly type: 'ManagementEventStateFailed';
  readonly replyTo: number;
  readonly migrationId: string;
  readonly reason: string;
}

export interface VmMemoryAck {
  readonly type: 'VmMemoryAck';
  readonly replyTo: number;
  readonly migrationId: string;
  readonly seq: number;
}

export interface PageBatchAck {
  readonly type: 'PageBatchAck';
  readonly replyTo: number;
  readonly migrationId: string;
  /** false: the batch was refused (bad checksum, bounds, sizes) and nothing of it was written. */
  readonly ok: boolean;
  readonly reason?: string;
}

export interface MigrationStateSuccess {
  readonly type: 'MigrationStateSuccess';
  readonly replyTo: number;
  readonly migrationId: string;
  readonly round: number;
}

export interface MigrationStateFailed {
  readonly type: 'MigrationStateFailed';
  readonly replyTo: number;
  readonly migrationId: string;
  readonly reason: string;
  /** Protocol 3: the target's step that failed (`bootIncoming`: it could not boot the VM), when a step failed rather than a timeout, an abort or an unexpected request. */
  readonly failedStep?: string;
}

export interface MigrationCompleteAck {
  readonly type: 'MigrationCompleteAck';
  readonly replyTo: number;
  readonly migrationId: string;
}

export interface ForwardedEventsAck {
  readonly type: 'ForwardedEventsAck';
  readonly replyTo: number;
  readonly migrationId: string;
  /** Events accepted as new. */
  readonly accepted: number;
  /** Events dropped because the target already had their id. */
  readonly duplicates: number;
}

export interface MigrationStatus {
  readonly type: 'MigrationStatus';
  readonly replyTo: number;
  readonly migrationId: string;
  readonly committed: boolean;
}

export interface PathAccept {
  readonly type: 'PathAccept';
  readonly replyTo: number;
  readonly migrationId: string;
  readonly canReassemble: boolean;
  /** 0..1 share of the target's CPU that is free. */
  readonly cpuFree: number;
  readonly reason?: string;
}

/** The destination's VM is booted to its last reversible point; `bootMs` is what it took there. */
export interface BootReady {
  readonly type: 'BootReady';
  readonly replyTo: number;
  readonly migrationId: string;
  readonly bootMs: number;
}

/** The target's incoming VM is ready: the source's hypervisor sends the memory to `endpoint`. */
export interface IncomingReady {
  readonly type: 'IncomingReady';
  readonly replyTo: number;
  readonly migrationId: string;
  /** `MigrationEndpoint.uri`: `tcp:HOST:PORT` (qemu), `sim:data-paths` (the sim's memory rides the data paths). */
  readonly endpoint: string;
  /** qemu: the target's NBD export of the VM's image disks, which the source mirrors before the memory moves (issue 14). */
  readonly disks?: { readonly host: string; readonly port: number; readonly exports: readonly { readonly device: string; readonly exportName: string }[] };
}

/** The target's relay for the VM's UDP service: the source relay re-points there. */
export interface UdpHandoverAck {
  readonly type: 'UdpHandoverAck';
  readonly replyTo: number;
  readonly migrationId: string;
  readonly host: string;
  readonly port: number;
}

export interface Pong {
  readonly type: 'Pong';
  readonly replyTo: number;
  readonly ts: number;
}

/** The blocks asked, in order: `sizes` holds one u32 LE length per hash (0xFFFFFFFF: not held here), `data` the blocks held, concatenated. */
export interface BlockData {
  readonly type: 'BlockData';
  readonly replyTo: number;
  readonly sizes: Uint8Array;
  readonly data: Uint8Array;
}

export interface IndexUpdateAck {
  readonly type: 'IndexUpdateAck';
  readonly replyTo: number;
  readonly seq: number;
}

/** msgpack of the manifest, the holders of each distinct block and the members' load (images/index-answer.ts). */
export interface IndexAnswer {
  readonly type: 'IndexAnswer';
  readonly replyTo: number;
  readonly body: Uint8Array;
}

/** A peer's health and load as its own control API counts them (the dashboard's cluster view). */
export interface PeerStatusReply {
  readonly type: 'PeerStatusReply';
  readonly replyTo: number;
  readonly name: string;
  readonly uptimeMs: number;
  /** 0..1: the host's CPU load as the agent itself reports it. */
  readonly load: number;
  readonly vms: number;
  readonly embots: number;
  readonly quarantined: number;
  readonly modulesWithErrors: number;
  readonly deadLetters: number;
}

/** msgpack of the build summary (images/image-builder.ts BuildSummary). */
export interface ImageBuilt {
  readonly type: 'ImageBuilt';
  readonly replyTo: number;
  readonly summary: Uint8Array;
}

// ---------------------------------------------------------------------------------------------
// notifications and errors

/** Either side, any time: both sides clean up the migration. Not acknowledged. */
export interface Abort {
  readonly type: 'Abort';
  readonly migrationId: string;
  readonly reason: string;
}

/**
 * With `replyTo`: the request failed at the peer (no handler, handler threw). Without: a
 * connection-level protocol error, sent just before the sender closes the connection.
 */
export interface ErrorFrame {
  readonly type: 'Error';
  readonly replyTo?: number;
  readonly code: ErrorCode;
  readonly message: string;
}

// ---------------------------------------------------------------------------------------------
// unions and the request → reply table

export type HandshakeFrame = Hello | Challenge | Auth | AuthOk;
export type RequestFrame =
  | StartMigration
  | ManagementState
  | ModuleRequest
  | ManagementEventState
  | VmMemory
  | PageBatch
  | DirtyObjects
  | MigrationComplete
  | ForwardedEvents
  | MigrationStatusQuery
  | PathOffer
  | PrepareIncoming
  | BootIncoming
  | UdpHandover
  | BlockFetch
  | IndexUpdate
  | IndexQuery
  | ImageBuild
  | PeerStatus
  | Ping;
export type ReplyFrame =
  | MigrationPermitted
  | MigrationDenied
  | ManagementStateSuccess
  | ManagementStateFailed
  | ManagedObjectInstantiationError
  | ModuleBundle
  | ManagementEventStateSuccess
  | ManagementEventStateFailed
  | VmMemoryAck
  | PageBatchAck
  | MigrationStateSuccess
  | MigrationStateFailed
  | MigrationCompleteAck
  | ForwardedEventsAck
  | MigrationStatus
  | PathAccept
  | IncomingReady
  | BootReady
  | UdpHandoverAck
  | BlockData
  | IndexUpdateAck
  | IndexAnswer
  | ImageBuilt
  | PeerStatusReply
  | Pong;
export type NotificationFrame = Abort;

export type Frame = HandshakeFrame | RequestFrame | ReplyFrame | NotificationFrame | ErrorFrame;
export type FrameType = Frame['type'];
export type RequestType = RequestFrame['type'];
export type ReplyType = ReplyFrame['type'];

/** Which replies answer which request. An `Error` frame may answer any request (it rejects it). */
export interface ReplyMap {
  StartMigration: MigrationPermitted | MigrationDenied;
  ManagementState: ManagementStateSuccess | ManagementStateFailed | ManagedObjectInstantiationError;
  ModuleRequest: ModuleBundle;
  ManagementEventState: ManagementEventStateSuccess | ManagementEventStateFailed | ManagedObjectInstantiationError;
  VmMemory: VmMemoryAck | MigrationStateFailed;
  PageBatch: PageBatchAck;
  DirtyObjects: MigrationStateSuccess | MigrationStateFailed | ManagedObjectInstantiationError | BootReady;
  MigrationComplete: MigrationCompleteAck | MigrationStateFailed;
  ForwardedEvents: ForwardedEventsAck;
  MigrationStatusQuery: MigrationStatus;
  PathOffer: PathAccept;
  PrepareIncoming: IncomingReady | MigrationStateFailed;
  BootIncoming: BootReady | MigrationStateFailed;
  UdpHandover: UdpHandoverAck;
  BlockFetch: BlockData;
  IndexUpdate: IndexUpdateAck;
  IndexQuery: IndexAnswer;
  ImageBuild: ImageBuilt;
  PeerStatus: PeerStatusReply;
  Ping: Pong;
}

export type RequestOf<T extends RequestType> = Extract<RequestFrame, { readonly type: T }>;
export type ReplyOf<T extends RequestType> = ReplyMap[T];

/** Omit over each member of a union, keeping the union discriminated. */
export type DistributiveOmit<U, K extends PropertyKey> = U extends unknown ? Omit<U, K> : never;
/** A request as the caller writes it; PeerConnection assigns `reqId`. */
export type RequestBody<T extends RequestType> = Omit<RequestOf<T>, 'reqId'>;
/** Any request as the caller writes it. */
export type AnyRequestBody = DistributiveOmit<RequestFrame, 'reqId'>;
/** A reply as a handler returns it; PeerConnection fills in `replyTo`. */
export type ReplyBody<T extends RequestType> = DistributiveOmit<ReplyOf<T>, 'replyTo'>;

export const REPLY_TYPES: { readonly [K in RequestType]: readonly ReplyMap[K]['type'][] } = {
  StartMigration: ['MigrationPermitted', 'MigrationDenied'],
  ManagementState: ['ManagementStateSuccess', 'ManagementStateFailed', 'ManagedObjectInstantiationError'],
  ModuleRequest: ['ModuleBundle'],
  ManagementEventState: ['ManagementEventStateSuccess', 'ManagementEventStateFailed', 'ManagedObjectInstantiationError'],
  VmMemory: ['VmMemoryAck', 'MigrationStateFailed'],
  PageBatch: ['PageBatchAck'],
  DirtyObjects: ['MigrationStateSuccess', 'MigrationStateFailed', 'ManagedObjectInstantiationError', 'BootReady'],
  MigrationComplete: ['MigrationCompleteAck', 'MigrationStateFailed'],
  ForwardedEvents: ['ForwardedEventsAck'],
  MigrationStatusQuery: ['MigrationStatus'],
  PathOffer: ['PathAccept'],
  PrepareIncoming: ['IncomingReady', 'MigrationStateFailed'],
  BootIncoming: ['BootReady', 'MigrationStateFailed'],
  UdpHandover: ['UdpHandoverAck'],
  BlockFetch: ['BlockData'],
  IndexUpdate: ['IndexUpdateAck'],
  IndexQuery: ['IndexAnswer'],
  ImageBuild: ['ImageBuilt'],
  PeerStatus: ['PeerStatusReply'],
  Ping: ['Pong'],
};

export type FrameKind = 'handshake' | 'request' | 'reply' | 'notification' | 'error';

/** The kind of every frame type; also the list of known types. */
export const FRAME_KINDS: { readonly [K in FrameType]: FrameKind } = {
  Hello: 'handshake',
  Challenge: 'handshake',
  Auth: 'handshake',
  AuthOk: 'handshake',
  StartMigration: 'request',
  ManagementState: 'request',
  ModuleRequest: 'request',
  ManagementEventState: 'request',
  VmMemory: 'request',
  PageBatch: 'request',
  DirtyObjects: 'request',
  MigrationComplete: 'request',
  ForwardedEvents: 'request',
  MigrationStatusQuery: 'request',
  PathOffer: 'request',
  PrepareIncoming: 'request',
  BootIncoming: 'request',
  UdpHandover: 'request',
  BlockFetch: 'request',
  IndexUpdate: 'request',
  IndexQuery: 'request',
  ImageBuild: 'request',
  PeerStatus: 'request',
  Ping: 'request',
  MigrationPermitted: 'reply',
  MigrationDenied: 'reply',
  ManagementStateSuccess: 'reply',
  ManagementStateFailed: 'reply',
  ManagedObjectInstantiationError: 'reply',
  ModuleBundle: 'reply',
  ManagementEventStateSuccess: 'reply',
  ManagementEventStateFailed: 'reply',
  VmMemoryAck: 'reply',
  PageBatchAck: 'reply',
  MigrationStateSuccess: 'reply',
  MigrationStateFailed: 'reply',
  MigrationCompleteAck: 'reply',
  ForwardedEventsAck: 'reply',
  MigrationStatus: 'reply',
  PathAccept: 'reply',
  IncomingReady: 'reply',
  BootReady: 'reply',
  UdpHandoverAck: 'reply',
  BlockData: 'reply',
  IndexUpdateAck: 'reply',
  IndexAnswer: 'reply',
  ImageBuilt: 'reply',
  PeerStatusReply: 'reply',
  Pong: 'reply',
  Abort: 'notification',
  Error: 'error',
};

export function isRequestFrame(f: Frame): f is RequestFrame {
  return FRAME_KINDS[f.type] === 'request';
}

export function isReplyFrame(f: Frame): f is ReplyFrame {
  return FRAME_KINDS[f.type] === 'reply';
}

export function isHandshakeFrame(f: Frame): f is HandshakeFrame {
  return FRAME_KINDS[f.type] === 'handshake';
}
