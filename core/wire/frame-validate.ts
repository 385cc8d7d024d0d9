/**
 * Hand-written guards for every frame, driven by one field table. Hand-written rather than zod:
 * they run on every frame in both directions, and a table of small checks costs a few `typeof`s
 * per field, which keeps validation far below the msgpackr decode itself (see bench/wire.bench.ts).
 *
 * Binary fields are only type-checked, never scanned, so a 64 MiB payload validates in O(fields).
 */
import { ErrorCodes, ProtocolError } from '../errors.ts';
import { isValidElementId } from '../events.ts';
import { FRAME_KINDS, PROTOCOL_FEATURES, PROTOCOL_FEATURE_FIELDS, type Frame, type FrameType, type ProtocolFeature } from './frames.ts';

/** Returns what is wrong with the value, or undefined when it is fine. */
type Check = (v: unknown) => string | undefined;

interface FieldSpec {
  readonly name: string;
  readonly check: Check;
  readonly optional?: boolean;
}

const AGENT_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
// '~' joins a fan-out's id and a destination (`<id>~<peer>`, core/mobility/fan-out.ts).
const MIGRATION_ID = /^[A-Za-z0-9][A-Za-z0-9_.:~-]{0,127}$/;
const MODULE_NAME = /^[a-z][a-z0-9-]{0,63}$/;
const MODULE_VERSION = /^[0-9A-Za-z.+-]{1,64}$/;
const MODULE_HASH = /^[A-Za-z0-9:_+/=-]{1,200}$/;
const MODULE_REF = /^[a-z][a-z0-9-]{0,63}@[0-9A-Za-z.+-]{1,64}#[A-Za-z0-9:_+/=-]{1,200}$/;
/** Reasons and messages are for humans and logs; anything longer is abuse. */
const MAX_TEXT = 64 * 1024;
const MAX_MODULES = 10_000;
export const NONCE_BYTES = 32;

const ERROR_CODES: ReadonlySet<string> = new Set(Object.values(ErrorCodes));

/** Agent names as they appear in `--peers name=url`, handshakes and logs. */
export function isValidAgentName(v: unknown): v is string {
  return typeof v === 'string' && AGENT_NAME.test(v);
}

export function isValidModuleRef(v: unknown): v is string {
  return typeof v === 'string' && MODULE_REF.test(v);
}

const regexString =
  (re: RegExp, what: string): Check =>
  (v) =>
    typeof v === 'string' && re.test(v) ? undefined : `must be ${what}`;

const id: Check = (v) => (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0 ? undefined : 'must be a non-negative integer');
const count = id;
const finite: Check = (v) => (typeof v === 'number' && Number.isFinite(v) ? undefined : 'must be a finite number');
const bool: Check = (v) => (typeof v === 'boolean' ? undefined : 'must be a boolean');
const text: Check = (v) => (typeof v === 'string' && v.length <= MAX_TEXT ? undefined : `must be a string of at most ${MAX_TEXT} characters`);
const bin: Check = (v) => (v instanceof Uint8Array ? undefined : 'must be binary (Uint8Array)');
const nonce: Check = (v) => (v instanceof Uint8Array && v.byteLength === NONCE_BYTES ? undefined : `must be ${NONCE_BYTES} bytes`);
const agent = regexString(AGENT_NAME, 'an agent name');
const migrationId = regexString(MIGRATION_ID, 'a migration id');
const moduleName = regexString(MODULE_NAME, 'a module name');
const moduleVersion = regexString(MODULE_VERSION, 'a module version');
const moduleHash = regexString(MODULE_HASH, 'a module hash');
/** Data path names come from configuration; bounded so a report line stays a line. */
const pathName: Check = (v) => (typeof v === 'string' && v.length > 0 && v.length <= 128 ? undefined : 'must be a string of 1..128 characters');
const vm: Check = (v) => (isValidElementId(v) ? undefined : 'must be a VM element id');
const load: Check = (v) => (typeof v === 'number' && Number.isFinite(v) && v >= 0 ? undefined : 'must be a finite number >= 0');
const errorCode: Check = (v) => (typeof v === 'string' && ERROR_CODES.has(v) ? undefined : 'must be a known EMBOT_ERR_* code');

const modules: Check = (v) => {
  if (!Array.isArray(v)) return 'must be an array of name@version#hash';
  if (v.length > MAX_MODULES) return `must hold at most ${MAX_MODULES} entries`;
  for (let i = 0; i < v.length; i++) {
    if (!isValidModuleRef(v[i])) return `[${i}] must be name@version#hash`;
  }
  return undefined;
};

const NBD_HOST = /^[A-Za-z0-9.:-]{1,253}$/;
const NBD_NAME = /^[A-Za-z0-9_.-]{1,128}$/;
/** IncomingReady's `disks`: where the source's QEMU dials, so host and names are plain tokens, the port a TCP port. */
const diskExport: Check = (v) => {
  if (!isPlainObject(v)) return 'must be a map {host, port, exports}';
  if (typeof v.host !== 'string' || !NBD_HOST.test(v.host)) return '.host must be a host name or address';
  if (typeof v.port !== 'number' || !Number.isInteger(v.port) || v.port < 1 || v.port > 65535) return '.port must be a TCP port 1..65535';
  if (!Array.isArray(v.exports) || v.exports.length === 0 || v.exports.length > 64) return '.exports must be a list of 1..64 {device, exportName}';
  for (const [i, e] of (v.exports as unknown[]).entries()) {
    if (!isPlainObject(e) || typeof e.device !== 'string' || !NBD_NAME.test(e.device) || typeof e.exportName !== 'string' || !NBD_NAME.test(e.exportName)) {
      return `.exports[${i}] must be {device, exportName} (plain names)`;
    }
  }
  return undefined;
};

const resources: Check = (v) => {
  if (!isPlainObject(v)) return 'must be a map {memory, vcpus}';
  const keys = Object.keys(v);
  if (keys.length !== 2 || !('memory' in v) || !('vcpus' in v)) return 'must hold exactly memory and vcpus';
  if (id(v.memory) !== undefined) return '.memory must be a non-negative integer (bytes)';
  if (id(v.vcpus) !== undefined) return '.vcpus must be a non-negative integer';
  return undefined;
};

/** Streams of one migration: the planner adds at most a few paths; QEMU's multifd takes up to 255. */
const MAX_CHANNELS = 64;
const channels: Check = (v) => (typeof v === 'number' && Number.isInteger(v) && v >= 1 && v <= MAX_CHANNELS ? undefined : `must be an integer in 1..${MAX_CHANNELS}`);
/** Fields of a driver's VM spec; a spec is a handful (sim 5, qemu 7), so anything near this is abuse. */
const MAX_SPEC_FIELDS = 64;
/** A driver's VM spec: a map with the VM's name; its fields are the target driver's to validate. */
const vmSpec: Check = (v) => {
  if (!isPlainObject(v)) return 'must be a map (a driver VM spec)';
  if (Object.keys(v).length > MAX_SPEC_FIELDS) return `must hold at most ${MAX_SPEC_FIELDS} fields`;
  if (typeof v.name !== 'string' || v.name.length === 0) return '.name must be the VM name';
  return undefined;
};

const f = (name: string, check: Check, optional = false): FieldSpec => ({ name, check, optional });
const reqId = f('reqId', id);
const replyTo = f('replyTo', id);
const mid = f('migrationId', migrationId);
const reason = f('reason', text);
/** A target step's name (target-machine.ts), as MigrationStateFailed.failedStep names it. */
const stepName: Check = (v) => (typeof v === 'string' && /^[A-Za-z][A-Za-z0-9]{0,63}$/.test(v) ? undefined : 'must be a step name (letters and digits, at most 64)');

const SPECS: { readonly [K in FrameType]: readonly FieldSpec[] } = {
  Hello: [f('protocol', id), f('agent', agent), f('nonce', nonce)],
  Challenge: [f('agent', agent), f('nonce', nonce), f('proof', nonce)],
  Auth: [f('proof', nonce)],
  AuthOk: [],
  StartMigration: [reqId, mid, f('vm', vm), f('elements', bin), f('resources', resources), f('modules', modules)],
  ManagementState: [reqId, mid, f('elements', bin), f('embots', bin)],
  ModuleRequest: [reqId, mid, f('name', moduleName), f('hash', moduleHash)],
  ManagementEventState: [reqId, mid, f('holdQueues', bin)],
  VmMemory: [reqId, mid, f('vm', vm), f('round', count), f('seq', count), f('last', bool), f('pages', bin)],
  PageBatch: [
    reqId,
    mid,
    f('path', pathName),
    f('round', count),
    f('final', bool),
    f('pageSize', count),
    f('indexes', bin),
    f('pages', bin),
    f('checksum', count),
    f('cpu', bin, true),
    f('zeros', bin, true),
  ],
  DirtyObjects: [reqId, mid, f('round', count), f('deltas', bin), f('events', bin), f('embots', bin, true), f('boot', bool, true)],
  MigrationComplete: [reqId, mid, f('memoryBytes', count, true)],
  ForwardedEvents: [reqId, mid, f('events', bin), f('handOver', bool, true)],
  MigrationStatusQuery: [reqId, mid],
  PathOffer: [reqId, mid, f('paths', count)],
  PrepareIncoming: [reqId, mid, f('vm', vm), f('spec', vmSpec), f('channels', channels), f('prewarm', bool, true)],
  BootIncoming: [reqId, mid],
  UdpHandover: [reqId, mid, f('vm', vm), f('served', count), f('packets', bin)],
  BlockFetch: [reqId, f('hashes', bin)],
  IndexUpdate: [reqId, f('body', bin)],
  IndexQuery: [reqId, f('image', text)],
  ImageBuild: [reqId, f('image', text)],
  PeerStatus: [reqId],
  Ping: [reqId, f('ts', finite)],
  MigrationPermitted: [replyTo, mid],
  MigrationDenied: [replyTo, mid, reason],
  ManagementStateSuccess: [replyTo, mid],
  ManagementStateFailed: [replyTo, mid, reason],
  ManagedObjectInstantiationError: [replyTo, mid, reason, f('object', text, true)],
  ModuleBundle: [replyTo, f('name', moduleName), f('version', moduleVersion), f('hash', moduleHash), f('code', bin), f('signature', bin, true)],
  ManagementEventStateSuccess: [replyTo, mid],
  ManagementEventStateFailed: [replyTo, mid, reason],
  VmMemoryAck: [replyTo, mid, f('seq', count)],
  PageBatchAck: [replyTo, mid, f('ok', bool), f('reason', text, true)],
  MigrationStateSuccess: [replyTo, mid, f('round', count)],
  MigrationStateFailed: [replyTo, mid, reason, f('failedStep', stepName, true)],
  MigrationCompleteAck: [replyTo, mid],
  ForwardedEventsAck: [replyTo, mid, f('accepted', count), f('duplicates', count)],
  MigrationStatus: [replyTo, mid, f('committed', bool)],
  PathAccept: [replyTo, mid, f('canReassemble', bool), f('cpuFree', finite), f('reason', text, true)],
  IncomingReady: [replyTo, mid, f('endpoint', text), f('disks', diskExport, true)],
  BootReady: [replyTo, mid, f('bootMs', finite)],
  UdpHandoverAck: [replyTo, mid, f('host', text), f('port', count)],
  BlockData: [replyTo, f('sizes', bin), f('data', bin)],
  IndexUpdateAck: [replyTo, f('seq', count)],
  IndexAnswer: [replyTo, f('body', bin)],
  ImageBuilt: [replyTo, f('summary', bin)],
  PeerStatusReply: [
    replyTo,
    f('name', agent),
    f('uptimeMs', count),
    f('load', load),
    f('vms', count),
    f('embots', count),
    f('quarantined', count),
    f('modulesWithErrors', count),
    f('deadLetters', count),
  ],
  Pong: [replyTo, f('ts', finite)],
  Abort: [mid, reason],
  Error: [f('replyTo', id, true), f('code', errorCode), f('message', text)],
};

function isPlainObject(v: unknown): v is Record<string, unknown> {
  if (typeof v !== 'object' || v === null) return false;
  const proto: unknown = Object.getPrototypeOf(v);
  return proto === Object.prototype || proto === null;
}

function malformed(message: string, details?: Record<string, unknown>): ProtocolError {
  return new ProtocolError(ErrorCodes.FRAME_MALFORMED, message, details === undefined ? undefined : { details });
}

/** Whether `type` names a frame this build knows (own property of the table, so `toString` is not one). */
export function isKnownFrameType(type: unknown): type is FrameType {
  return typeof type === 'string' && Object.hasOwn(FRAME_KINDS, type);
}

/**
 * Checks that a decoded value is a well-formed frame: a map with a known `type`, every required
 * field present with the right type, no unknown fields. Returns it typed, without copying.
 * Fields whose value is `undefined` count as absent.
 *
 * @throws ProtocolError `EMBOT_ERR_FRAME_UNKNOWN_TYPE` for a `type` this build does not know,
 *   `EMBOT_ERR_FRAME_MALFORMED` for anything else.
 *
 * @example
 * ```ts
 * const frame = validateFrame(unpack(bytes)); // frame.type narrows the union
 * ```
 */
export function validateFrame(value: unknown): Frame {
  if (!isPlainObject(value)) throw malformed('a frame must be a map');
  const type = value.type;
  if (typeof type !== 'string') throw malformed('a frame must have a string field "type"');
  if (!isKnownFrameType(type)) {
    throw new ProtocolError(ErrorCodes.FRAME_UNKNOWN_TYPE, `unknown frame type ${JSON.stringify(type.slice(0, 64))}`, { details: { type: type.slice(0, 64) } });
  }
  const spec = SPECS[type];
  let present = 1; // "type"
  for (let i = 0; i < spec.length; i++) {
    const field = spec[i]!;
    const v = value[field.name];
    if (v === undefined) {
      if (!field.optional) throw malformed(`${type}.${field.name} is missing`, { type, field: field.name });
      continue;
    }
    const problem = field.check(v);
    if (problem !== undefined) throw malformed(`${type}.${field.name} ${problem}`, { type, field: field.name });
    present++;
  }
  let defined = 0;
  for (const k in value) if (value[k] !== undefined) defined++;
  if (defined !== present) {
    const known = new Set(['type', ...spec.map((s) => s.name)]);
    const extra = Object.keys(value).find((k) => !known.has(k)) ?? '?';
    throw malformed(`${type} has an unknown field ${JSON.stringify(extra.slice(0, 64))}`, { type, field: extra.slice(0, 64) });
  }
  return value as unknown as Frame;
}

/** PROTOCOL_FEATURE_FIELDS with each one's version, listed once (checked per frame on an older link). */
const FEATURE_FIELDS = (Object.keys(PROTOCOL_FEATURE_FIELDS) as ProtocolFeature[]).map((f) => ({ type: PROTOCOL_FEATURE_FIELDS[f].frame, field: PROTOCOL_FEATURE_FIELDS[f].field, since: PROTOCOL_FEATURES[f] }));

/**
 * The first field of `frame` that a link of `protocol` does not have (frames.ts
 * PROTOCOL_FEATURE_FIELDS), with the version that added it; undefined when it has none.
 */
export function fieldNewerThan(frame: Frame, protocol: number): { readonly field: string; readonly since: number } | undefined {
  for (const { type, field, since } of FEATURE_FIELDS) {
    if (since > protocol && frame.type === type && field in frame) return { field: `${type}.${field}`, since };
  }
  return undefined;
}

