import net from 'node:net';
import { EventEmitter } from 'eventemitter3';
import { EffectorError, ErrorCodes, type EmbotError } from '../../../core/errors.ts';

/** What QEMU says first on a QMP socket. */
export interface QmpGreeting {
  readonly version: { readonly qemu: { readonly major: number; readonly minor: number; readonly micro: number }; readonly package: string };
  readonly capabilities: readonly string[];
}

/** An asynchronous QMP event (STOP, RESUME, SHUTDOWN, MIGRATION, …). */
export interface QmpEvent {
  readonly event: string;
  readonly data: Readonly<Record<string, unknown>>;
  readonly timestamp: { readonly seconds: number; readonly microseconds: number };
}

export type RunState =
  | 'running'
  | 'paused'
  | 'prelaunch'
  | 'inmigrate'
  | 'postmigrate'
  | 'finish-migrate'
  | 'shutdown'
  | 'guest-panicked'
  | 'internal-error'
  | 'io-error'
  | 'restore-vm'
  | 'save-vm'
  | 'suspended'
  | 'watchdog'
  | 'colo'
  | 'debug';

export type MigrationStatus =
  | 'none'
  | 'setup'
  | 'active'
  | 'pre-switchover'
  | 'device'
  | 'postcopy-active'
  | 'completed'
  | 'failed'
  | 'cancelling'
  | 'cancelled'
  | 'wait-unplug'
  | 'colo'
  | 'postcopy-paused'
  | 'postcopy-recover';

/** The part of `query-migrate` the driver reads (QEMU 7.2 field names). */
export interface MigrationInfo {
  readonly status?: MigrationStatus;
  readonly ram?: {
    readonly transferred: number;
    readonly remaining: number;
    readonly total: number;
    readonly duplicate: number;
    readonly normal: number;
    readonly 'normal-bytes': number;
    readonly 'dirty-pages-rate': number;
    readonly mbps: number;
    readonly 'dirty-sync-count': number;
    readonly 'page-size': number;
  };
  readonly 'total-time'?: number;
  readonly 'expected-downtime'?: number;
  readonly downtime?: number;
  readonly 'setup-time'?: number;
  readonly 'cpu-throttle-percentage'?: number;
  readonly 'error-desc'?: string;
  readonly 'socket-address'?: readonly { readonly type: string; readonly host?: string; readonly port?: string }[];
}

export interface DirtyRateInfo {
  readonly status: 'unstarted' | 'measuring' | 'measured';
  /** MiB/s, present once measured. */
  readonly 'dirty-rate'?: number;
  readonly 'calc-time': number;
}

/**
 * The commands the driver sends, their arguments and what they return. Anything else goes
 * through {@link QmpClient.executeRaw}.
 */
export interface QmpCommands {
  'qmp_capabilities': { args: undefined; ret: Record<string, never> };
  'query-status': { args: undefined; ret: { readonly status: RunState; readonly running: boolean } };
  'query-migrate': { args: undefined; ret: MigrationInfo };
  'migrate-set-capabilities': { args: { readonly capabilities: readonly { readonly capability: string; readonly state: boolean }[] }; ret: Record<string, never> };
  'migrate-set-parameters': { args: Readonly<Record<string, number | string | boolean>>; ret: Record<string, never> };
  'migrate': { args: { readonly uri: string }; ret: Record<string, never> };
  'migrate-incoming': { args: { readonly uri: string }; ret: Record<string, never> };
  'migrate-continue': { args: { readonly state: MigrationStatus }; ret: Record<string, never> };
  'migrate_cancel': { args: undefined; ret: Record<string, never> };
  'calc-dirty-rate': { args: { readonly 'calc-time': number }; ret: Record<string, never> };
  'query-dirty-rate': { args: undefined; ret: DirtyRateInfo };
  'qom-set': { args: { readonly path: string; readonly property: string; readonly value: string | number | boolean }; ret: Record<string, never> };
  'pmemsave': { args: { readonly val: number; readonly size: number; readonly filename: string }; ret: Record<string, never> };
  'stop': { args: undefined; ret: Record<string, never> };
  'cont': { args: undefined; ret: Record<string, never> };
  'system_powerdown': { args: undefined; ret: Record<string, never> };
  'quit': { args: undefined; ret: Record<string, never> };
}

type NoArgs = { [K in keyof QmpCommands]: QmpCommands[K]['args'] extends undefined ? K : never }[keyof QmpCommands];
type WithArgs = Exclude<keyof QmpCommands, NoArgs>;

export interface QmpClientEvents {
  event: (e: QmpEvent) => void;
  /** The socket closed; `error` says why when it was not {@link QmpClient.close}. */
  close: (error: EmbotError | undefined) => void;
}

export interface QmpConnectOptions {
  /** Wait for the greeting and `qmp_capabilities` (default 10 s). */
  readonly connectTimeoutMs?: number;
  /** Default reply timeout of a command (default 30 s: TCG guests can be slow to answer under load). */
  readonly commandTimeoutMs?: number;
  /** A line longer than this is not QMP (default 16 MiB). */
  readonly maxLineBytes?: number;
}

interface Pending {
  readonly command: string;
  readonly resolve: (value: unknown) => void;
  readonly reject: (e: EmbotError) => void;
  readonly timer: ReturnType<typeof setTimeout>;
}

const protocolError = (message: string, details?: Record<string, unknown>, cause?: unknown): EffectorError =>
  new EffectorError(ErrorCodes.QMP_PROTOCOL, message, { ...(details ? { details } : {}), ...(cause === undefined ? {} : { cause }) });

const isRecord = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

/**
 * A QMP client over a unix socket: reads the greeting, negotiates capabilities, sends commands
 * with ids and matches their replies, and emits QEMU's asynchronous events. Anything on the
 * socket that is not QMP ends the connection with a coded {@link ErrorCodes.QMP_PROTOCOL} error;
 * it never throws out of a socket callback.
 *
 * @example
 * ```ts
 * const qmp = await QmpClient.connect('/var/lib/embot/vms/web-1/qmp.sock');
 * qmp.events.on('event', (e) => console.log(e.event));
 * const { status } = await qmp.execute('query-status');
 * await qmp.close();
 * ```
 */
export class QmpClient {
  readonly events = new EventEmitter<QmpClientEvents>();
  private readonly pending = new Map<string, Pending>();
  private nextId = 1;
  private buffer = '';
  private closedWith: EmbotError | null | undefined = undefined;
  private greetingValue: QmpGreeting | undefined;
  private onGreeting: ((g: QmpGreeting) => void) | undefined;

  private constructor(
    private readonly socket: net.Socket,
    readonly socketPath: string,
    private readonly commandTimeoutMs: number,
    private readonly maxLineBytes: number,
  ) {
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.receive(chunk));
    socket.on('error', (e) => this.fail(protocolError(`QMP socket ${socketPath}: ${e.message}`, { socket: socketPath }, e)));
    socket.on('close', () => this.fail(protocolError(`QMP socket ${socketPath} closed`, { socket: socketPath })));
  }

  /** Connects, reads the greeting and leaves capabilities negotiation mode. */
  static async connect(socketPath: string, options: QmpConnectOptions = {}): Promise<QmpClient> {
    const connectTimeoutMs = options.connectTimeoutMs ?? 10_000;
    const socket = net.createConnection({ path: socketPath });
    const client = new QmpClient(socket, socketPath, options.commandTimeoutMs ?? 30_000, options.maxLineBytes ?? 16 * 1024 * 1024);
    const greeting = new Promise<QmpGreeting>((resolve, reject) => {
      const timer = setTimeout(() => {
        const e = new EffectorError(ErrorCodes.QMP_TIMEOUT, `no QMP greeting on ${socketPath} within ${connectTimeoutMs} ms`, { details: { socket: socketPath } });
        client.fail(e);
        reject(e);
      }, connectTimeoutMs);
      client.onGreeting = (g) => {
        clearTimeout(timer);
        resolve(g);
      };
      client.events.once('close', (e) => {
        clearTimeout(timer);
        reject(e ?? protocolError(`QMP socket ${socketPath} closed before its greeting`, { socket: socketPath }));
      });
    });
    client.greetingValue = await greeting;
    await client.execute('qmp_capabilities', undefined, { timeoutMs: connectTimeoutMs });
    return client;
  }

  get greeting(): QmpGreeting {
    return this.greetingValue!;
  }

  get closed(): boolean {
    return this.closedWith !== undefined;
  }

  execute<K extends NoArgs>(command: K, args?: undefined, options?: { readonly timeoutMs?: number }): Promise<QmpCommands[K]['ret']>;
  execute<K extends WithArgs>(command: K, args: QmpCommands[K]['args'], options?: { readonly timeoutMs?: number }): Promise<QmpCommands[K]['ret']>;
  execute(command: keyof QmpCommands, args?: Readonly<Record<string, unknown>>, options?: { readonly timeoutMs?: number }): Promise<unknown> {
    return this.executeRaw(command, args, options);
  }

  /** Any QMP command; the reply's `return` unchecked. */
  executeRaw(command: string, args?: Readonly<Record<string, unknown>>, options: { readonly timeoutMs?: number } = {}): Promise<unknown> {
    if (this.closedWith !== undefined) {
      return Promise.reject(this.closedWith ?? protocolError(`QMP connection to ${this.socketPath} is closed`, { socket: this.socketPath, command }));
    }
    const id = `embot-${this.nextId++}`;
    const timeoutMs = options.timeoutMs ?? this.commandTimeoutMs;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new EffectorError(ErrorCodes.QMP_TIMEOUT, `QMP ${command} got no reply within ${timeoutMs} ms`, { details: { socket: this.socketPath, command } }));
      }, timeoutMs);
      this.pending.set(id, { command, resolve, reject, timer });
      this.socket.write(`${JSON.stringify(args === undefined ? { execute: command, id } : { execute: command, arguments: args, id })}\n`);
    });
  }

  /** Closes the socket; pending commands fail with QMP_PROTOCOL. */
  async close(): Promise<void> {
    if (this.closedWith !== undefined) return;
    this.fail(null);
    await new Promise<void>((resolve) => {
      if (this.socket.destroyed) resolve();
      else this.socket.once('close', () => resolve()).end();
      setTimeout(() => {
        this.socket.destroy();
        resolve();
      }, 1000).unref();
    });
  }

  private receive(chunk: string): void {
    if (this.closedWith !== undefined) return;
    this.buffer += chunk;
    let newline: number;
    while ((newline = this.buffer.indexOf('\n')) >= 0) {
      const line = this.buffer.slice(0, newline).trim();
      this.buffer = this.buffer.slice(newline + 1);
      if (line.length > 0) this.handleLine(line);
      if (this.closedWith !== undefined) return;
    }
    if (this.buffer.length > this.maxLineBytes) {
      this.fail(protocolError(`QMP peer ${this.socketPath} sent a line longer than ${this.maxLineBytes} bytes`, { socket: this.socketPath }));
    }
  }

  private handleLine(line: string): void {
    let message: unknown;
    try {
      message = JSON.parse(line);
    } catch (e) {
      this.fail(protocolError(`QMP peer ${this.socketPath} sent a line that is not JSON: ${JSON.stringify(line.slice(0, 80))}`, { socket: this.socketPath }, e));
      return;
    }
    if (!isRecord(message)) return this.fail(protocolError(`QMP peer ${this.socketPath} sent a non-object message`, { socket: this.socketPath }));
    if (this.greetingValue === undefined && this.onGreeting !== undefined) {
      const qmp = message['QMP'];
      if (!isRecord(qmp) || !isRecord(qmp['version']) || !Array.isArray(qmp['capabilities'])) {
        return this.fail(protocolError(`QMP peer ${this.socketPath} did not start with a QMP greeting`, { socket: this.socketPath }));
      }
      const onGreeting = this.onGreeting;
      this.onGreeting = undefined;
      onGreeting(qmp as unknown as QmpGreeting);
      return;
    }
    if (typeof message['event'] === 'string') {
      const event: QmpEvent = {
        event: message['event'],
        data: isRecord(message['data']) ? message['data'] : {},
        timestamp: isRecord(message['timestamp']) ? (message['timestamp'] as unknown as QmpEvent['timestamp']) : { seconds: 0, microseconds: 0 },
      };
      this.events.emit('event', event);
      return;
    }
    const id = message['id'];
    const pending = typeof id === 'string' ? this.pending.get(id) : undefined;
    if (pending === undefined) {
      return this.fail(protocolError(`QMP peer ${this.socketPath} replied to no request (id ${JSON.stringify(id)})`, { socket: this.socketPath }));
    }
    this.pending.delete(id as string);
    clearTimeout(pending.timer);
    if ('return' in message) {
      pending.resolve(message['return']);
    } else if (isRecord(message['error'])) {
      const error = message['error'];
      const errorClass = typeof error['class'] === 'string' ? error['class'] : 'GenericError';
      const desc = typeof error['desc'] === 'string' ? error['desc'] : 'no description';
      pending.reject(new EffectorError(ErrorCodes.QMP_COMMAND, `QMP ${pending.command} failed: ${desc}`, { details: { command: pending.command, class: errorClass, desc } }));
    } else {
      const e = protocolError(`QMP peer ${this.socketPath} sent a reply with neither return nor error`, { socket: this.socketPath, command: pending.command });
      pending.reject(e);
      this.fail(e);
    }
  }

  /** Ends the connection: every pending command fails; `error` null means close() asked for it. */
  private fail(error: EmbotError | null): void {
    if (this.closedWith !== undefined) return;
    this.closedWith = error;
    const reason = error ?? protocolError(`QMP connection to ${this.socketPath} was closed`, { socket: this.socketPath });
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(reason);
    }
    this.pending.clear();
    if (error !== null) this.socket.destroy();
    this.events.emit('close', error ?? undefined);
  }
}
