/**
 * Every error embot raises carries a stable `code` (like ws/fastify), so callers, the control
 * API and the CLI can branch on it without parsing messages. Keep all codes here.
 */
export const ErrorCodes = {
  // configuration and CLI
  CONFIG_INVALID: 'EMBOT_ERR_CONFIG_INVALID',
  CONFIG_NOT_FOUND: 'EMBOT_ERR_CONFIG_NOT_FOUND',
  CLI_USAGE: 'EMBOT_ERR_CLI_USAGE',
  /** A CLI command failed with an error that carries no code of its own (a bug): `--json` still needs one to print. */
  CLI_UNEXPECTED: 'EMBOT_ERR_CLI_UNEXPECTED',
  // store
  STORE_CORRUPT: 'EMBOT_ERR_STORE_CORRUPT',
  STORE_SCHEMA_TOO_NEW: 'EMBOT_ERR_STORE_SCHEMA_TOO_NEW',
  // events and sensors
  EVENT_INVALID: 'EMBOT_ERR_EVENT_INVALID',
  EVENT_DUPLICATE: 'EMBOT_ERR_EVENT_DUPLICATE',
  ELEMENT_NOT_HELD: 'EMBOT_ERR_ELEMENT_NOT_HELD',
  HOLD_DECODE: 'EMBOT_ERR_HOLD_DECODE',
  /** The event's element moved to another agent (a migration) and its grace period is over: post it to `details.owner`. */
  ELEMENT_MOVED: 'EMBOT_ERR_ELEMENT_MOVED',
  SENSOR_INVALID: 'EMBOT_ERR_SENSOR_INVALID',
  SENSOR_EXISTS: 'EMBOT_ERR_SENSOR_EXISTS',
  // managed objects
  ELEMENT_UNKNOWN: 'EMBOT_ERR_ELEMENT_UNKNOWN',
  ELEMENT_EXISTS: 'EMBOT_ERR_ELEMENT_EXISTS',
  ELEMENT_DECODE: 'EMBOT_ERR_ELEMENT_DECODE',
  ELEMENT_INVALID: 'EMBOT_ERR_ELEMENT_INVALID',
  // service registry
  SERVICE_UNKNOWN: 'EMBOT_ERR_SERVICE_UNKNOWN',
  SERVICE_EXISTS: 'EMBOT_ERR_SERVICE_EXISTS',
  // effectors / hypervisor
  EFFECTOR_UNKNOWN: 'EMBOT_ERR_EFFECTOR_UNKNOWN',
  EFFECTOR_OP_UNKNOWN: 'EMBOT_ERR_EFFECTOR_OP_UNKNOWN',
  EFFECTOR_FAILED: 'EMBOT_ERR_EFFECTOR_FAILED',
  VM_UNKNOWN: 'EMBOT_ERR_VM_UNKNOWN',
  VM_EXISTS: 'EMBOT_ERR_VM_EXISTS',
  VM_BAD_STATE: 'EMBOT_ERR_VM_BAD_STATE',
  VM_SPEC_INVALID: 'EMBOT_ERR_VM_SPEC_INVALID',
  EFFECTOR_ARGS_INVALID: 'EMBOT_ERR_EFFECTOR_ARGS_INVALID',
  EFFECTOR_EXISTS: 'EMBOT_ERR_EFFECTOR_EXISTS',
  DRIVER_UNKNOWN: 'EMBOT_ERR_DRIVER_UNKNOWN',
  /** The running hypervisor driver does not declare the capability an operation needs (e.g. `vm load` on qemu). */
  DRIVER_UNSUPPORTED: 'EMBOT_ERR_DRIVER_UNSUPPORTED',
  /** A migration estimate or path plan got a size, rate, threshold or path it cannot use. */
  PLAN_INPUT_INVALID: 'EMBOT_ERR_PLAN_INPUT_INVALID',
  /** The primary data path of a migration could not be set up (connect, auth or probe failed). */
  PATH_SETUP_FAILED: 'EMBOT_ERR_PATH_SETUP_FAILED',
  // plugins / modules
  PLUGIN_MANIFEST_INVALID: 'EMBOT_ERR_PLUGIN_MANIFEST_INVALID',
  PLUGIN_LOAD_FAILED: 'EMBOT_ERR_PLUGIN_LOAD_FAILED',
  PLUGIN_API_MISMATCH: 'EMBOT_ERR_PLUGIN_API_MISMATCH',
  PLUGIN_DEPENDENCY_MISSING: 'EMBOT_ERR_PLUGIN_DEPENDENCY_MISSING',
  PLUGIN_CRASHED: 'EMBOT_ERR_PLUGIN_CRASHED',
  PLUGIN_TIMEOUT: 'EMBOT_ERR_PLUGIN_TIMEOUT',
  PLUGIN_DISABLED: 'EMBOT_ERR_PLUGIN_DISABLED',
  EMBOT_QUARANTINED: 'EMBOT_ERR_EMBOT_QUARANTINED',
  EMBOT_FLOOD: 'EMBOT_ERR_EMBOT_FLOOD',
  POLICY_UNKNOWN: 'EMBOT_ERR_POLICY_UNKNOWN',
  /** A shipped module bundle cannot be decoded, or holds paths, counts or sizes it must not. */
  MODULE_BUNDLE_INVALID: 'EMBOT_ERR_MODULE_BUNDLE_INVALID',
  /** A module's content does not hash to what was announced for it. */
  MODULE_HASH_MISMATCH: 'EMBOT_ERR_MODULE_HASH_MISMATCH',
  /** The trust policy refused a module (unsigned, bad signature, not allowlisted). */
  MODULE_UNTRUSTED: 'EMBOT_ERR_MODULE_UNTRUSTED',
  // control API
  CONTROL_UNREACHABLE: 'EMBOT_ERR_CONTROL_UNREACHABLE',
  CONTROL_UNAUTHORIZED: 'EMBOT_ERR_CONTROL_UNAUTHORIZED',
  CONTROL_BAD_REQUEST: 'EMBOT_ERR_CONTROL_BAD_REQUEST',
  CONTROL_NOT_FOUND: 'EMBOT_ERR_CONTROL_NOT_FOUND',
  CONTROL_INTERNAL: 'EMBOT_ERR_CONTROL_INTERNAL',
  /** The dashboard's front-end bundle (dashboard/dist) is missing: run `npm run build:ui` (npm install does it). */
  DASHBOARD_NOT_BUILT: 'EMBOT_ERR_DASHBOARD_NOT_BUILT',
  // peer wire
  FRAME_TOO_LARGE: 'EMBOT_ERR_FRAME_TOO_LARGE',
  FRAME_MALFORMED: 'EMBOT_ERR_FRAME_MALFORMED',
  FRAME_UNKNOWN_TYPE: 'EMBOT_ERR_FRAME_UNKNOWN_TYPE',
  PEER_UNAUTHENTICATED: 'EMBOT_ERR_PEER_UNAUTHENTICATED',
  PEER_UNKNOWN: 'EMBOT_ERR_PEER_UNKNOWN',
  /** The two agents share no wire protocol version (frames.ts PROTOCOL_VERSION, MIN_PROTOCOL_VERSION; peer.protocol). */
  PROTOCOL_UNSUPPORTED: 'EMBOT_ERR_PROTOCOL_UNSUPPORTED',
  REQUEST_TIMEOUT: 'EMBOT_ERR_REQUEST_TIMEOUT',
  CONNECTION_CLOSED: 'EMBOT_ERR_CONNECTION_CLOSED',
  /** The peer could not serve a request: no handler for its type, or the handler failed without a code. */
  REQUEST_FAILED: 'EMBOT_ERR_REQUEST_FAILED',
  /** A TLS peer presented no certificate, or one the cluster CA did not sign (or expired); or refused ours. */
  PEER_CERT_UNTRUSTED: 'EMBOT_ERR_PEER_CERT_UNTRUSTED',
  /** A TLS peer's certificate is valid but names another agent than the one it claims to be. */
  PEER_CERT_NAME_MISMATCH: 'EMBOT_ERR_PEER_CERT_NAME_MISMATCH',
  /** A TLS handshake failed for another reason than a certificate (e.g. plain ws:// to a wss:// listener). */
  PEER_TLS_FAILED: 'EMBOT_ERR_PEER_TLS_FAILED',
  // agent
  AGENT_STOPPED: 'EMBOT_ERR_AGENT_STOPPED',
  // migration data plane
  /** Every data path of a migration failed; no path is left to carry the pages. */
  DATAPLANE_NO_PATH: 'EMBOT_ERR_DATAPLANE_NO_PATH',
  /** The target refused a page batch (bad checksum, bounds, sizes) on every attempt. */
  PAGE_BATCH_REJECTED: 'EMBOT_ERR_PAGE_BATCH_REJECTED',
  /** A migration was cancelled through its AbortSignal. */
  MIGRATION_ABORTED: 'EMBOT_ERR_MIGRATION_ABORTED',
  /** A peer's frame names a migration this agent has no live record of with that peer (or no such id at all). */
  MIGRATION_UNKNOWN: 'EMBOT_ERR_MIGRATION_UNKNOWN',
  /** A peer's frame names a migration that is not in a phase where that frame is allowed. */
  MIGRATION_PHASE: 'EMBOT_ERR_MIGRATION_PHASE',
  /** A peer's frame names a migration but another VM, or elements the migration did not move. */
  MIGRATION_MISMATCH: 'EMBOT_ERR_MIGRATION_MISMATCH',
  /** A peer asked for more than its share: connections, concurrent incoming migrations, UDP handovers. */
  PEER_LIMIT: 'EMBOT_ERR_PEER_LIMIT',
  // UDP relay (seed 002)
  /** A handed-over UDP packet list (or a relay envelope) cannot be decoded. */
  UDP_PACKETS_DECODE: 'EMBOT_ERR_UDP_PACKETS_DECODE',
  /** A UDP relay was asked for an operation its mode does not allow (e.g. handOver while forwarding). */
  UDP_RELAY_BAD_STATE: 'EMBOT_ERR_UDP_RELAY_BAD_STATE',
  /** A request to a sim VM's UDP service is not `{"seq": <integer>}`. */
  UDP_REQUEST_INVALID: 'EMBOT_ERR_UDP_REQUEST_INVALID',
  // qemu driver
  /** A QMP peer sent something that is not QMP (no greeting, bad JSON, a reply to no request), or the socket closed under a request. */
  QMP_PROTOCOL: 'EMBOT_ERR_QMP_PROTOCOL',
  /** QEMU answered a QMP command with an error (its class and desc are in details). */
  QMP_COMMAND: 'EMBOT_ERR_QMP_COMMAND',
  /** A QMP command got no reply in time. */
  QMP_TIMEOUT: 'EMBOT_ERR_QMP_TIMEOUT',
  /** The qemu-system binary is not installed (Debian: qemu-system-x86) or cannot be run. */
  QEMU_MISSING: 'EMBOT_ERR_QEMU_MISSING',
  /** A QEMU process did not come up, or died while the driver needed it. */
  QEMU_FAILED: 'EMBOT_ERR_QEMU_FAILED',
  /** A VM's disk or boot image is missing, unreadable or not an image QEMU accepts. */
  VM_IMAGE: 'EMBOT_ERR_VM_IMAGE',
  /** A migration did not converge within its time budget and was cancelled. */
  MIGRATION_NOT_CONVERGED: 'EMBOT_ERR_MIGRATION_NOT_CONVERGED',
  /** A hypervisor migration failed (QEMU reported failure, or the target died). */
  MIGRATION_FAILED: 'EMBOT_ERR_MIGRATION_FAILED',
  /** The VM's running hypervisor process cannot migrate to a target started now (a QEMU started before the RAM pad): restart the VM once. */
  VM_RESTART_NEEDED: 'EMBOT_ERR_VM_RESTART_NEEDED',
  /** `migrate --to` names no destination, a blank or repeated one, the source itself or an unknown peer (`details.problem`). */
  DESTINATIONS_INVALID: 'EMBOT_ERR_DESTINATIONS_INVALID',
  /** A migration to several destinations at once (issue 13): the list is valid but this agent does not run the fan-out yet. */
  MULTI_DESTINATION_UNSUPPORTED: 'EMBOT_ERR_MULTI_DESTINATION_UNSUPPORTED',
  /** No host, library or index knows an image of that name (issue 14). */
  IMAGE_UNKNOWN: 'EMBOT_ERR_IMAGE_UNKNOWN',
  /** An image manifest, image name, block size or index entry is not valid (issue 14). */
  IMAGE_INVALID: 'EMBOT_ERR_IMAGE_INVALID',
  /** An image file is shorter than its index says: a block of it cannot be read whole. */
  IMAGE_TRUNCATED: 'EMBOT_ERR_IMAGE_TRUNCATED',
  /** A block arrived whose bytes do not hash to the hash it was asked for. */
  BLOCK_HASH_MISMATCH: 'EMBOT_ERR_BLOCK_HASH_MISMATCH',
  /** A block could be fetched from no holder (every holder failed or served it corrupt). */
  BLOCK_UNAVAILABLE: 'EMBOT_ERR_BLOCK_UNAVAILABLE',
  /** An index update was refused: not the group's indexer, sender not a member, out of sequence, or bad shape. */
  INDEX_UPDATE_REFUSED: 'EMBOT_ERR_INDEX_UPDATE_REFUSED',
  /** Placement got candidates, costs or a policy it cannot use. */
  PLACEMENT_INPUT_INVALID: 'EMBOT_ERR_PLACEMENT_INPUT_INVALID',
  /** A VM's image is no longer the one it was created on (its manifest id differs): an overlay on the new one would be corrupt. */
  IMAGE_CHANGED: 'EMBOT_ERR_IMAGE_CHANGED',
  /** A peer's answer to a link-cost probe is not one (wrong type, echo or timing): the cost falls back to config. */
  COST_PROBE_INVALID: 'EMBOT_ERR_COST_PROBE_INVALID',
  // fleet directory (etcd)
  /** The fleet directory (etcd) cannot be reached: the agent runs on the peers it knows and retries in the background. */
  DIRECTORY_UNAVAILABLE: 'EMBOT_ERR_DIRECTORY_UNAVAILABLE',
  /** A record in the fleet directory is not one (not JSON, a field missing or mistyped, its name not its key's, a URL not ws:// or wss://): it is ignored. */
  DIRECTORY_RECORD_INVALID: 'EMBOT_ERR_DIRECTORY_RECORD_INVALID',
  /** Another live agent's record holds this agent's name in the fleet directory: this one does not overwrite it (it still reads its peers) and registers once that record goes. */
  DIRECTORY_NAME_TAKEN: 'EMBOT_ERR_DIRECTORY_NAME_TAKEN',
} as const;

export type ErrorCode = (typeof ErrorCodes)[keyof typeof ErrorCodes];

/**
 * Base class of every error embot raises on purpose.
 *
 * @example
 * ```ts
 * try { await client.get('/vms/nope') }
 * catch (e) { if (isEmbotError(e, ErrorCodes.VM_UNKNOWN)) console.log('no such VM') }
 * ```
 */
export class EmbotError extends Error {
  readonly code: ErrorCode;
  readonly details: Readonly<Record<string, unknown>> | undefined;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown; details?: Record<string, unknown> }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.details = options?.details;
  }

  /** A plain object that survives JSON, msgpackr and worker postMessage. */
  toJSON(): { code: ErrorCode; message: string; details?: Record<string, unknown> } {
    return this.details ? { code: this.code, message: this.message, details: { ...this.details } } : { code: this.code, message: this.message };
  }
}

export class ConfigError extends EmbotError {
  override readonly name = 'ConfigError';
}
export class StoreError extends EmbotError {
  override readonly name = 'StoreError';
}
export class EventError extends EmbotError {
  override readonly name = 'EventError';
}
export class ElementError extends EmbotError {
  override readonly name = 'ElementError';
}
export class EffectorError extends EmbotError {
  override readonly name = 'EffectorError';
}
export class PluginError extends EmbotError {
  override readonly name = 'PluginError';
}
export class ControlError extends EmbotError {
  override readonly name = 'ControlError';
}
export class ProtocolError extends EmbotError {
  override readonly name = 'ProtocolError';
}

export function isEmbotError(e: unknown, code?: ErrorCode): e is EmbotError {
  return e instanceof EmbotError && (code === undefined || e.code === code);
}

/** Message of any thrown value, for reports (plugins may throw non-Errors). */
export function describeError(e: unknown): string {
  if (e instanceof Error) return e.message;
  try {
    return typeof e === 'string' ? e : JSON.stringify(e);
  } catch {
    return String(e);
  }
}
