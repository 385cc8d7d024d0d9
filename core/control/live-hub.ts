import type { ServerResponse } from 'node:http';
import type { EmbotEvent } from '../events.ts';
import type { DashboardSnapshot, LiveMessage } from './dashboard-api.ts';
import type { MigrationInfo } from './control-api.ts';

/** What the hub reads when it has something to push (the agent's current state). */
export interface LiveState {
  snapshot(): Promise<DashboardSnapshot>;
  message(topic: LiveTopic): Promise<LiveMessage>;
}

/** Parts of the state that are pushed whole when they change (small, and simpler to apply than diffs). */
export type LiveTopic = 'embots' | 'plugins' | 'vms' | 'cluster';

export interface LiveHubOptions {
  readonly state: LiveState;
  /** Changes within this window go out as one message per topic. */
  readonly flushMs?: number;
  /** A client further behind than this many unsent bytes is cut; its EventSource reconnects and gets a fresh snapshot. */
  readonly maxBufferedBytes?: number;
  /** Comment line that keeps idle proxies and the browser from closing the stream. */
  readonly heartbeatMs?: number;
  /** Events kept between two flushes; older ones in a burst are counted, not sent (the snapshot has the recent ones). */
  readonly maxPendingEvents?: number;
  readonly onError?: (e: unknown) => void;
}

const DEFAULT_FLUSH_MS = 50;
const DEFAULT_MAX_BUFFERED = 4 * 1024 * 1024;
const DEFAULT_HEARTBEAT_MS = 15_000;
const DEFAULT_MAX_PENDING_EVENTS = 500;

/**
 * The dashboard's live channel (server-sent events). The agent's event sources call `events`,
 * `changed` and `migration`; with no client connected each call returns at its first line, so
 * the event path pays one branch. With clients, changes are coalesced for `flushMs` and each
 * topic is read once per flush, however many events touched it.
 */
export class LiveHub {
  private readonly clients = new Set<ServerResponse>();
  private readonly dirty = new Set<LiveTopic>();
  private readonly migrations = new Map<string, MigrationInfo>();
  private pendingEvents: EmbotEvent[] = [];
  private droppedEvents = 0;
  private timer: NodeJS.Timeout | undefined;
  private heartbeat: NodeJS.Timeout | undefined;
  private closed = false;
  private readonly flushMs: number;
  private readonly maxBuffered: number;
  private readonly maxPendingEvents: number;

  constructor(private readonly o: LiveHubOptions) {
    this.flushMs = o.flushMs ?? DEFAULT_FLUSH_MS;
    this.maxBuffered = o.maxBufferedBytes ?? DEFAULT_MAX_BUFFERED;
    this.maxPendingEvents = o.maxPendingEvents ?? DEFAULT_MAX_PENDING_EVENTS;
  }

  /** Connected live clients. */
  get size(): number {
    return this.clients.size;
  }

  /** Events processed by the policies (newest last). */
  events(batch: readonly EmbotEvent[]): void {
    if (this.clients.size === 0) return;
    for (const e of batch) this.pendingEvents.push(e);
    if (this.pendingEvents.length > this.maxPendingEvents) {
      const extra = this.pendingEvents.length - this.maxPendingEvents;
      this.droppedEvents += extra;
      this.pendingEvents.splice(0, extra);
    }
    this.dirty.add('embots');
    this.schedule();
  }

  changed(topic: LiveTopic): void {
    if (this.clients.size === 0) return;
    this.dirty.add(topic);
    this.schedule();
  }

  migration(info: MigrationInfo): void {
    if (this.clients.size === 0) return;
    this.migrations.set(`${info.role}:${info.id}`, info);
    this.schedule();
  }

  /** Takes over an HTTP response as an event stream: headers, a snapshot, then changes until either side closes. */
  async attach(res: ServerResponse): Promise<void> {
    if (this.closed) {
      res.writeHead(503).end();
      return;
    }
    res.writeHead(200, {
      'Content-Type': 'text/event-stream; charset=utf-8',
      'Cache-Control': 'no-store',
      Connection: 'keep-alive',
      // Tells a reverse proxy not to hold the stream back in its buffer.
      'X-Accel-Buffering': 'no',
    });
    res.socket?.setNoDelay(true);
    // Reconnect quickly after a cut (the browser's EventSource does this by itself).
    res.write('retry: 1000\n\n');
    this.clients.add(res);
    res.once('close', () => {
      this.clients.delete(res);
      if (this.clients.size === 0) this.stopHeartbeat();
    });
    this.startHeartbeat();
    try {
      const snapshot = await this.o.state.snapshot();
      this.write(res, { kind: 'snapshot', snapshot });
    } catch (e) {
      this.o.onError?.(e);
      res.destroy();
    }
  }

  /** The state a new client would get first (`GET /ui/api/snapshot`). */
  snapshotNow(): Promise<DashboardSnapshot> {
    return this.o.state.snapshot();
  }

  /** Ends every stream (agent shutdown). */
  close(): void {
    this.closed = true;
    clearTimeout(this.timer);
    this.stopHeartbeat();
    for (const c of this.clients) c.end();
    this.clients.clear();
  }

  private schedule(): void {
    if (this.timer || this.closed) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.flush().catch((e: unknown) => this.o.onError?.(e));
    }, this.flushMs);
    this.timer.unref();
  }

  private async flush(): Promise<void> {
    const out: LiveMessage[] = [];
    if (this.pendingEvents.length > 0) {
      out.push({ kind: 'events', events: this.pendingEvents, dropped: this.droppedEvents });
      this.pendingEvents = [];
      this.droppedEvents = 0;
    }
    for (const m of this.migrations.values()) out.push({ kind: 'migration', migration: m });
    this.migrations.clear();
    const topics = [...this.dirty];
    this.dirty.clear();
    for (const t of topics) out.push(await this.o.state.message(t));
    for (const c of this.clients) for (const m of out) this.write(c, m);
  }

  private write(res: ServerResponse, m: LiveMessage): void {
    if (res.writableLength > this.maxBuffered) {
      res.destroy();
      this.clients.delete(res);
      return;
    }
    // JSON has no raw newlines, so one data line per message.
    res.write(`event: ${m.kind}\ndata: ${JSON.stringify(m)}\n\n`);
  }

  private startHeartbeat(): void {
    if (this.heartbeat) return;
    this.heartbeat = setInterval(() => {
      for (const c of this.clients) c.write(': ping\n\n');
      // The cluster view's peer reachability and host load change without an event: refresh them with the heartbeat.
      this.changed('cluster');
    }, this.o.heartbeatMs ?? DEFAULT_HEARTBEAT_MS);
    this.heartbeat.unref();
  }

  private stopHeartbeat(): void {
    clearInterval(this.heartbeat);
    this.heartbeat = undefined;
  }
}
