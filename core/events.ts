/**
 * The unit of information a sensor produces. Ids are unique across the cluster
 * (host-prefixed sequence), so a target can de-duplicate events forwarded after a move.
 */
export interface EmbotEvent {
  /** Cluster-unique id: `<host>.<epoch36>.<seq36>`. */
  readonly id: string;
  /** Producer timestamp, ms since epoch; dispatch order is by `ts`, then arrival. */
  readonly ts: number;
  readonly elementId: string;
  /** SCREAMING_CASE, e.g. `VM_CRASHED`. */
  readonly type: string;
  readonly payload: unknown;
  /** Name of the sensor (or `control`, `embot:<id>`) that produced the event. */
  readonly source?: string;
}

/** What a producer hands to the sensor service; id and ts are filled in when absent. */
export interface EmbotEventInput {
  readonly id?: string;
  readonly ts?: number;
  readonly elementId: string;
  readonly type: string;
  readonly payload?: unknown;
  readonly source?: string;
}

const EVENT_TYPE = /^[A-Z][A-Z0-9_.]{0,63}$/;
const ELEMENT_ID = /^[A-Za-z0-9][A-Za-z0-9_.:/@-]{0,127}$/;

export function isValidEventType(t: unknown): t is string {
  return typeof t === 'string' && EVENT_TYPE.test(t);
}

export function isValidElementId(id: unknown): id is string {
  return typeof id === 'string' && ELEMENT_ID.test(id);
}

/**
 * Host-prefixed ids: `host.<start-time base36>.<counter base36>`. The start time makes ids from
 * two runs of the same host distinct without persisting a counter.
 */
export class EventIdSource {
  private counter = 0;
  private readonly prefix: string;

  constructor(host: string, startedAt: number = Date.now()) {
    this.prefix = `${host}.${startedAt.toString(36)}.`;
  }

  next(): string {
    return this.prefix + (this.counter++).toString(36);
  }
}
