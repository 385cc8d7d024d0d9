import { Packr } from 'msgpackr';
import { ElementError, ErrorCodes, type ErrorCode } from '../errors.ts';
import { isValidElementId } from '../events.ts';

/**
 * An object that represents a managed resource (a VM, a disk, a NIC, a service in a VM).
 * Instances handed out by the object service are frozen snapshots: a change produces a new
 * object with a higher `version`.
 */
export interface ManagedElement {
  readonly id: string;
  /** `vm`, `disk`, `nic`, `service`, …: what embot types attach to (manifest `attachTo.kind`). */
  readonly kind: string;
  readonly state: Readonly<Record<string, unknown>>;
  /** Starts at 1, incremented by every change (state or links). */
  readonly version: number;
  /** Changed since the last `collectDirty` that covered it (new elements start dirty). */
  readonly dirty: boolean;
  /** Ids of the elements this one owns (a VM's disks, NICs, services). */
  readonly dependents: readonly string[];
}

/** What callers hand to `register`. */
export interface ElementInput {
  readonly id: string;
  readonly kind: string;
  readonly state?: Readonly<Record<string, unknown>>;
  readonly dependents?: readonly string[];
}

const KIND = /^[a-z][a-z0-9_.-]{0,63}$/;

/** Binary form of elements, shared by `serialize`, the `elements.state` column and dirty deltas. */
export const elementPackr = new Packr({ useRecords: false, moreTypes: false });

/** Tag of a serialized element bundle, so other msgpack values are refused early. */
export const BUNDLE_FORMAT = 'embot/elements';
export const BUNDLE_VERSION = 1;

export interface ElementBundle {
  readonly format: typeof BUNDLE_FORMAT;
  readonly v: typeof BUNDLE_VERSION;
  readonly root: string;
  readonly elements: readonly ManagedElement[];
}

export function isPlainRecord(v: unknown): v is Record<string, unknown> {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return false;
  const proto = Object.getPrototypeOf(v) as unknown;
  return proto === Object.prototype || proto === null;
}

/** Freezes a copy, so snapshots handed out can be kept without defensive copies. */
export function freezeElement(e: ManagedElement): ManagedElement {
  return Object.freeze({
    id: e.id,
    kind: e.kind,
    state: Object.freeze({ ...e.state }),
    version: e.version,
    dirty: e.dirty,
    dependents: Object.freeze([...e.dependents]),
  });
}

/** Checks one input of `register`; throws `ElementError` with `code` on the first problem. */
export function checkInput(input: unknown, code: ErrorCode = ErrorCodes.ELEMENT_INVALID): asserts input is ElementInput {
  if (!isPlainRecord(input)) throw new ElementError(code, `an element must be an object, got ${typeOf(input)}`);
  const { id, kind, state, dependents } = input;
  if (!isValidElementId(id)) throw new ElementError(code, `element id ${JSON.stringify(id)} is invalid (letters, digits and _.:/@- , at most 128 characters, starting with a letter or digit)`);
  if (typeof kind !== 'string' || !KIND.test(kind)) throw new ElementError(code, `element ${id}: kind ${JSON.stringify(kind)} is invalid (lower-case word, e.g. vm, disk)`);
  if (state !== undefined && !isPlainRecord(state)) throw new ElementError(code, `element ${id}: state must be a plain object, got ${typeOf(state)}`);
  if (dependents !== undefined) {
    if (!Array.isArray(dependents)) throw new ElementError(code, `element ${id}: dependents must be a list of element ids`);
    const seen = new Set<string>();
    for (const d of dependents as unknown[]) {
      if (!isValidElementId(d)) throw new ElementError(code, `element ${id}: dependent ${JSON.stringify(d)} is not a valid element id`);
      if (d === id) throw new ElementError(code, `element ${id} cannot depend on itself`);
      if (seen.has(d)) throw new ElementError(code, `element ${id}: dependent ${d} listed twice`);
      seen.add(d);
    }
  }
}

/** Checks a full element as it arrives from bytes or a peer (all fields present). */
export function checkElement(v: unknown): asserts v is ManagedElement {
  checkInput(v, ErrorCodes.ELEMENT_DECODE);
  const e = v as unknown as Record<string, unknown>;
  if (!isPlainRecord(e['state'])) throw decodeError(`element ${String(e['id'])}: state missing`);
  if (!Array.isArray(e['dependents'])) throw decodeError(`element ${String(e['id'])}: dependents missing`);
  const version = e['version'];
  if (typeof version !== 'number' || !Number.isSafeInteger(version) || version < 1) throw decodeError(`element ${String(e['id'])}: version must be a positive integer`);
  if (typeof e['dirty'] !== 'boolean') throw decodeError(`element ${String(e['id'])}: dirty must be a boolean`);
  const extra = Object.keys(e).filter((k) => !['id', 'kind', 'state', 'version', 'dirty', 'dependents'].includes(k));
  if (extra.length > 0) throw decodeError(`element ${String(e['id'])}: unknown field(s) ${extra.join(', ')}`);
}

/** Encodes the bundle of `serialize`. */
export function encodeBundle(root: string, elements: readonly ManagedElement[]): Uint8Array {
  const bundle: ElementBundle = { format: BUNDLE_FORMAT, v: BUNDLE_VERSION, root, elements: elements.map(plain) };
  return elementPackr.pack(bundle);
}

/**
 * Decodes and validates a bundle: every element well-formed, ids unique, every dependency link
 * pointing inside the bundle. Throws `ElementError EMBOT_ERR_ELEMENT_DECODE` otherwise.
 */
export function decodeBundle(bytes: Uint8Array): { readonly root: string; readonly elements: ManagedElement[] } {
  if (!(bytes instanceof Uint8Array) || bytes.byteLength === 0) throw decodeError('element bundle is empty or not bytes');
  let raw: unknown;
  try {
    raw = elementPackr.unpack(bytes);
  } catch (cause) {
    throw decodeError(`element bundle is not valid msgpack (${cause instanceof Error ? cause.message : String(cause)})`, cause);
  }
  if (!isPlainRecord(raw) || raw['format'] !== BUNDLE_FORMAT) throw decodeError('bytes are not an embot element bundle');
  if (raw['v'] !== BUNDLE_VERSION) throw decodeError(`element bundle version ${String(raw['v'])} is not supported (expected ${BUNDLE_VERSION})`);
  const list = raw['elements'];
  if (!Array.isArray(list) || list.length === 0) throw decodeError('element bundle holds no elements');
  const root = raw['root'];
  const elements: ManagedElement[] = [];
  const ids = new Set<string>();
  for (const item of list as unknown[]) {
    checkElement(item);
    if (ids.has(item.id)) throw decodeError(`element ${item.id} appears twice in the bundle`);
    ids.add(item.id);
    elements.push(freezeElement(item));
  }
  if (typeof root !== 'string' || !ids.has(root)) throw decodeError(`element bundle root ${JSON.stringify(root)} is not among its elements`);
  for (const e of elements) {
    for (const d of e.dependents) if (!ids.has(d)) throw decodeError(`element ${e.id} links to dependent ${d}, which is not in the bundle (dangling link)`);
  }
  return { root, elements };
}

export function decodeError(message: string, cause?: unknown): ElementError {
  return new ElementError(ErrorCodes.ELEMENT_DECODE, message, cause === undefined ? undefined : { cause });
}

function plain(e: ManagedElement): ManagedElement {
  return { id: e.id, kind: e.kind, state: { ...e.state }, version: e.version, dirty: e.dirty, dependents: [...e.dependents] };
}

function typeOf(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'a list';
  return typeof v;
}
