import { EventEmitter } from 'eventemitter3';
import type { Statement } from 'better-sqlite3';
import { ElementError, ErrorCodes, StoreError, describeError } from '../errors.ts';
import type { Store } from '../store/store.ts';
import {
  checkElement,
  checkInput,
  decodeBundle,
  decodeError,
  elementPackr,
  encodeBundle,
  freezeElement,
  isPlainRecord,
  type ElementInput,
  type ManagedElement,
} from './managed-element.ts';

export interface ObjectServiceEvents {
  registered: (element: ManagedElement) => void;
  updated: (element: ManagedElement, previous: ManagedElement) => void;
  deregistered: (element: ManagedElement) => void;
}

export interface ObjectServiceOptions {
  /** When given, elements are written through to its `elements` table and loaded from it at construction. */
  readonly store?: Store;
}

interface ElementRow {
  id: string;
  kind: string;
  state: Buffer | null;
  version: number;
  dirty: number;
  dependents: string;
}

/**
 * The managed object service: elements with kind, state, version, dirty flag and dependent
 * elements. Every change is atomic: a call that fails (bad input, dangling link, store error)
 * leaves memory and store as they were.
 *
 * @example
 * ```ts
 * const objects = new ManagedObjectService({ store });
 * objects.registerTree({ id: 'vm:web', kind: 'vm', dependents: ['disk:web-0'] }, [{ id: 'disk:web-0', kind: 'disk' }]);
 * const bytes = objects.serialize('vm:web');        // VM + disk, links included
 * other.instantiate(bytes);                          // on the target: links rebuilt
 * objects.update('disk:web-0', { size: 1 << 30 });
 * objects.collectDirty('vm:web');                    // [disk:web-0 …], flags reset
 * ```
 */
export class ManagedObjectService {
  readonly events = new EventEmitter<ObjectServiceEvents>();
  private readonly elements = new Map<string, ManagedElement>();
  private readonly store: Store | undefined;
  private readonly upsertStmt: Statement<[string, string, Buffer, number, number, string]> | undefined;
  private readonly deleteStmt: Statement<[string]> | undefined;

  constructor(options: ObjectServiceOptions = {}) {
    this.store = options.store;
    if (this.store) {
      this.upsertStmt = this.store.db.prepare(
        `INSERT INTO elements(id, kind, state, version, dirty, dependents) VALUES (?, ?, ?, ?, ?, ?)
         ON CONFLICT(id) DO UPDATE SET kind = excluded.kind, state = excluded.state, version = excluded.version,
           dirty = excluded.dirty, dependents = excluded.dependents`,
      );
      this.deleteStmt = this.store.db.prepare('DELETE FROM elements WHERE id = ?');
      this.load();
    }
  }

  /** Typed subscription shortcut (`objects.on('updated', …)`). */
  on<E extends keyof ObjectServiceEvents>(event: E, fn: ObjectServiceEvents[E]): this {
    this.events.on(event, fn as never);
    return this;
  }

  off<E extends keyof ObjectServiceEvents>(event: E, fn: ObjectServiceEvents[E]): this {
    this.events.off(event, fn as never);
    return this;
  }

  /**
   * (Re)reads every element from the store, replacing what is in memory. Called by the
   * constructor; emits no events.
   *
   * @throws StoreError `EMBOT_ERR_STORE_CORRUPT` naming the first unreadable row.
   */
  load(): void {
    if (!this.store) return;
    const rows = this.store.db.prepare('SELECT id, kind, state, version, dirty, dependents FROM elements').all() as ElementRow[];
    const loaded = new Map<string, ManagedElement>();
    for (const row of rows) {
      try {
        const candidate = {
          id: row.id,
          kind: row.kind,
          state: row.state === null ? {} : (elementPackr.unpack(row.state) as unknown),
          version: row.version,
          dirty: row.dirty !== 0,
          dependents: JSON.parse(row.dependents) as unknown,
        };
        checkElement(candidate);
        loaded.set(row.id, freezeElement(candidate));
      } catch (cause) {
        throw new StoreError(ErrorCodes.STORE_CORRUPT, `elements table: row ${row.id} is unreadable (${describeError(cause)})`, { cause, details: { id: row.id } });
      }
    }
    // Links to rows that vanished would break serialize; drop them rather than refuse to start.
    this.elements.clear();
    for (const [id, e] of loaded) {
      const deps = e.dependents.filter((d) => loaded.has(d));
      this.elements.set(id, deps.length === e.dependents.length ? e : freezeElement({ ...e, dependents: deps }));
    }
  }

  get size(): number {
    return this.elements.size;
  }

  has(id: string): boolean {
    return this.elements.has(id);
  }

  get(id: string): ManagedElement | undefined {
    return this.elements.get(id);
  }

  /** @throws ElementError `EMBOT_ERR_ELEMENT_UNKNOWN` */
  require(id: string): ManagedElement {
    const e = this.elements.get(id);
    if (!e) throw new ElementError(ErrorCodes.ELEMENT_UNKNOWN, `no managed element ${id}`, { details: { id } });
    return e;
  }

  list(kind?: string): readonly ManagedElement[] {
    const all = [...this.elements.values()];
    return kind === undefined ? all : all.filter((e) => e.kind === kind);
  }

  /**
   * Registers one element. Its dependents must already be registered (use
   * {@link registerTree} or {@link registerAll} to register a tree in one call). New elements
   * are dirty (nobody has collected them yet) at version 1.
   *
   * @throws ElementError `EMBOT_ERR_ELEMENT_EXISTS`, `EMBOT_ERR_ELEMENT_INVALID`,
   *   `EMBOT_ERR_ELEMENT_UNKNOWN` (a dependent that does not exist).
   */
  register(input: ElementInput): ManagedElement {
    return this.registerAll([input])[0]!;
  }

  /** Registers `root` and its dependents (given in any order) atomically; returns the root. */
  registerTree(root: ElementInput, dependents: readonly ElementInput[]): ManagedElement {
    const all = this.registerAll([...dependents, root]);
    return all[all.length - 1]!;
  }

  /** Registers several elements atomically; links may point to existing elements or to others in the call. */
  registerAll(inputs: readonly ElementInput[]): ManagedElement[] {
    const batch = new Map<string, ElementInput>();
    for (const input of inputs) {
      checkInput(input);
      if (this.elements.has(input.id) || batch.has(input.id)) {
        throw new ElementError(ErrorCodes.ELEMENT_EXISTS, `managed element ${input.id} is already registered`, { details: { id: input.id } });
      }
      batch.set(input.id, input);
    }
    for (const input of batch.values()) {
      for (const d of input.dependents ?? []) {
        if (!this.elements.has(d) && !batch.has(d)) {
          throw new ElementError(ErrorCodes.ELEMENT_UNKNOWN, `element ${input.id} lists dependent ${d}, which is neither registered nor in this call`, {
            details: { id: input.id, dependent: d },
          });
        }
      }
    }
    const created = [...batch.values()].map((i) =>
      freezeElement({ id: i.id, kind: i.kind, state: i.state ?? {}, version: 1, dirty: true, dependents: i.dependents ?? [] }),
    );
    this.commit(created, []);
    for (const e of created) this.events.emit('registered', e);
    return created;
  }

  /**
   * Removes an element (and, with `withDependents`, everything it owns, recursively). Links
   * from other elements to removed ones are removed too (those elements' versions go up).
   *
   * @throws ElementError `EMBOT_ERR_ELEMENT_UNKNOWN`
   */
  deregister(id: string, options: { readonly withDependents?: boolean } = {}): ManagedElement[] {
    const root = this.require(id);
    const removed = options.withDependents ? this.subtree(root.id) : [root];
    const gone = new Set(removed.map((e) => e.id));
    const relinked: ManagedElement[] = [];
    for (const e of this.elements.values()) {
      if (gone.has(e.id) || !e.dependents.some((d) => gone.has(d))) continue;
      relinked.push(bump(e, { dependents: e.dependents.filter((d) => !gone.has(d)) }));
    }
    const previous = relinked.map((e) => this.elements.get(e.id)!);
    this.commit(relinked, [...gone]);
    relinked.forEach((e, i) => this.events.emit('updated', e, previous[i]!));
    for (const e of removed) this.events.emit('deregistered', e);
    return removed;
  }

  /**
   * Merges `patch` into the element's state (a key set to `undefined` is removed), increments
   * its version and marks it dirty.
   *
   * @throws ElementError `EMBOT_ERR_ELEMENT_UNKNOWN`, `EMBOT_ERR_ELEMENT_INVALID` (patch not a plain object)
   */
  update(id: string, patch: Readonly<Record<string, unknown>>): ManagedElement {
    const prev = this.require(id);
    if (!isPlainRecord(patch)) throw new ElementError(ErrorCodes.ELEMENT_INVALID, `update of ${id}: patch must be a plain object`);
    const state: Record<string, unknown> = { ...prev.state };
    for (const [k, v] of Object.entries(patch)) {
      if (v === undefined) delete state[k];
      else state[k] = v;
    }
    const next = bump(prev, { state });
    this.commit([next], []);
    this.events.emit('updated', next, prev);
    return next;
  }

  /** Makes `childId` a dependent of `parentId` (e.g. a disk attached to a running VM). */
  link(parentId: string, childId: string): ManagedElement {
    const parent = this.require(parentId);
    this.require(childId);
    if (parentId === childId) throw new ElementError(ErrorCodes.ELEMENT_INVALID, `element ${parentId} cannot depend on itself`);
    if (parent.dependents.includes(childId)) return parent;
    const next = bump(parent, { dependents: [...parent.dependents, childId] });
    this.commit([next], []);
    this.events.emit('updated', next, parent);
    return next;
  }

  unlink(parentId: string, childId: string): ManagedElement {
    const parent = this.require(parentId);
    if (!parent.dependents.includes(childId)) return parent;
    const next = bump(parent, { dependents: parent.dependents.filter((d) => d !== childId) });
    this.commit([next], []);
    this.events.emit('updated', next, parent);
    return next;
  }

  /** The element and all its dependents, recursively, root first (each once, even if shared). */
  subtree(id: string): ManagedElement[] {
    const out: ManagedElement[] = [];
    const seen = new Set<string>();
    const walk = (eid: string): void => {
      if (seen.has(eid)) return;
      seen.add(eid);
      const e = this.elements.get(eid);
      if (!e) return;
      out.push(e);
      for (const d of e.dependents) walk(d);
    };
    this.require(id);
    walk(id);
    return out;
  }

  /**
   * msgpackr bytes of the element and all its dependents, recursively, with their links.
   * Does not touch dirty flags.
   *
   * @throws ElementError `EMBOT_ERR_ELEMENT_UNKNOWN`
   */
  serialize(id: string): Uint8Array {
    return encodeBundle(id, this.subtree(id));
  }

  /**
   * Decodes bytes from {@link serialize} into elements (root first) without registering them.
   *
   * @throws ElementError `EMBOT_ERR_ELEMENT_DECODE` on garbage, a foreign msgpack value, an
   *   invalid element or a link to an element missing from the bytes.
   */
  deserialize(bytes: Uint8Array): ManagedElement[] {
    return decodeBundle(bytes).elements;
  }

  /**
   * Registers the elements of {@link serialize}d bytes with their dependency links, keeping
   * their versions; they arrive clean (they equal the sender's copy). All or nothing.
   *
   * @throws ElementError `EMBOT_ERR_ELEMENT_DECODE`, `EMBOT_ERR_ELEMENT_EXISTS` (one of them is already here)
   */
  instantiate(bytes: Uint8Array): ManagedElement[] {
    const elements = decodeBundle(bytes).elements.map((e) => freezeElement({ ...e, dirty: false }));
    for (const e of elements) {
      if (this.elements.has(e.id)) throw new ElementError(ErrorCodes.ELEMENT_EXISTS, `cannot instantiate ${e.id}: already registered here`, { details: { id: e.id } });
    }
    this.commit(elements, []);
    for (const e of elements) this.events.emit('registered', e);
    return elements;
  }

  /**
   * The dirty elements among `id` and its dependents (recursively), as they are now; their
   * flags are reset. The returned snapshots still say `dirty: true`.
   *
   * @throws ElementError `EMBOT_ERR_ELEMENT_UNKNOWN`
   */
  collectDirty(id: string): ManagedElement[] {
    const dirty = this.subtree(id).filter((e) => e.dirty);
    if (dirty.length === 0) return [];
    this.commit(
      dirty.map((e) => freezeElement({ ...e, dirty: false })),
      [],
    );
    return dirty;
  }

  /**
   * Applies elements collected with {@link collectDirty} on another agent: unknown ones are
   * registered, known ones replaced unless the local copy is newer (a stale delta is skipped).
   * Applied elements are clean. All or nothing; returns what was applied.
   *
   * @throws ElementError `EMBOT_ERR_ELEMENT_DECODE` for a malformed element or a link to an
   *   element that is neither here nor in `elements`.
   */
  applyDeltas(elements: readonly ManagedElement[]): ManagedElement[] {
    const batch = new Map<string, ManagedElement>();
    for (const e of elements as readonly unknown[]) {
      checkElement(e);
      if (batch.has(e.id)) throw decodeError(`delta for ${e.id} appears twice`);
      batch.set(e.id, e);
    }
    for (const e of batch.values()) {
      for (const d of e.dependents) {
        if (!this.elements.has(d) && !batch.has(d)) throw decodeError(`delta for ${e.id} links to dependent ${d}, which is unknown here (dangling link)`);
      }
    }
    const applied: ManagedElement[] = [];
    for (const e of batch.values()) {
      const current = this.elements.get(e.id);
      if (current && current.version > e.version) continue;
      applied.push(freezeElement({ ...e, dirty: false }));
    }
    const previous = applied.map((e) => this.elements.get(e.id));
    this.commit(applied, []);
    applied.forEach((e, i) => {
      const prev = previous[i];
      if (prev) this.events.emit('updated', e, prev);
      else this.events.emit('registered', e);
    });
    return applied;
  }

  /** Store first (one transaction), memory second: a store failure leaves both unchanged. */
  private commit(upserts: readonly ManagedElement[], deletes: readonly string[]): void {
    if (this.store && (upserts.length > 0 || deletes.length > 0)) {
      const upsert = this.upsertStmt!;
      const del = this.deleteStmt!;
      this.store.transaction(() => {
        for (const e of upserts) {
          const state = elementPackr.pack(e.state);
          upsert.run(e.id, e.kind, Buffer.from(state.buffer, state.byteOffset, state.byteLength), e.version, e.dirty ? 1 : 0, JSON.stringify(e.dependents));
        }
        for (const id of deletes) del.run(id);
      });
    }
    for (const id of deletes) this.elements.delete(id);
    for (const e of upserts) this.elements.set(e.id, e);
  }
}

function bump(e: ManagedElement, change: { state?: Record<string, unknown>; dependents?: readonly string[] }): ManagedElement {
  return freezeElement({
    id: e.id,
    kind: e.kind,
    state: change.state ?? e.state,
    version: e.version + 1,
    dirty: true,
    dependents: change.dependents ?? e.dependents,
  });
}
