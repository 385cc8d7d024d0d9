import { AsyncLocalStorage } from 'node:async_hooks';
import { pino, type Logger as PinoLogger } from 'pino';
import { prettyFactory } from 'pino-pretty';
import { ConfigError, ErrorCodes } from './errors.ts';

/**
 * The agent's structured logger: pino behind a small interface (levels, child loggers with
 * bindings). JSON lines by default; pino-pretty's format when the stream is a terminal
 * (`format: 'auto'`) or when asked (`pretty`). Both are written synchronously: tests read
 * what was logged right after the call, and a crashing agent loses no line.
 */

export type LogLevel = 'debug' | 'info' | 'warn' | 'error' | 'silent';
/** `auto`: pretty on a terminal, JSON otherwise. */
export type LogFormat = 'auto' | 'pretty' | 'json';
export type LogData = Readonly<Record<string, unknown>>;

export const LOG_LEVELS: readonly LogLevel[] = ['debug', 'info', 'warn', 'error', 'silent'];
export const LOG_FORMATS: readonly LogFormat[] = ['auto', 'pretty', 'json'];

/** `--log-level`: a level, else EMBOT_ERR_CLI_USAGE naming the ones there are (exit 2). */
export function parseLogLevel(raw: string): LogLevel {
  if ((LOG_LEVELS as readonly string[]).includes(raw)) return raw as LogLevel;
  throw new ConfigError(ErrorCodes.CLI_USAGE, `--log-level ${JSON.stringify(raw)} is not a log level; use one of ${LOG_LEVELS.join(', ')}`);
}

/** `--log-format`: a format, else EMBOT_ERR_CLI_USAGE naming the ones there are (exit 2). */
export function parseLogFormat(raw: string): LogFormat {
  if ((LOG_FORMATS as readonly string[]).includes(raw)) return raw as LogFormat;
  throw new ConfigError(ErrorCodes.CLI_USAGE, `--log-format ${JSON.stringify(raw)} is not a log format; use one of ${LOG_FORMATS.join(', ')}`);
}

export interface Logger {
  readonly name: string;
  readonly level: LogLevel;
  debug(msg: string, data?: LogData): void;
  info(msg: string, data?: LogData): void;
  warn(msg: string, data?: LogData): void;
  error(msg: string, data?: LogData): void;
  /** A logger writing to the same stream, named `<parent>.<name>`, adding `bindings` to every line. */
  child(name: string, bindings?: LogData): Logger;
  isLevelEnabled(level: Exclude<LogLevel, 'silent'>): boolean;
}

export interface LogStream {
  write(chunk: string): unknown;
  readonly isTTY?: boolean;
}

export interface LoggerOptions {
  readonly level?: LogLevel;
  readonly format?: LogFormat;
  readonly name?: string;
  /** Defaults to `process.stderr`, so stdout stays free for command output. */
  readonly stream?: LogStream;
  /** Injected clock for tests. */
  readonly now?: () => Date;
}

/**
 * Fields every line logged inside {@link withLogContext} carries (the migration id), also from
 * code that only has the agent's logger: the steps of a migration run in its context.
 */
const context = new AsyncLocalStorage<LogData>();

/**
 * Runs `fn` (and everything asynchronous it starts) with `fields` on every log line.
 *
 * @example
 * ```ts
 * withLogContext({ migrationId: id }, () => actor.start());
 * ```
 */
export function withLogContext<T>(fields: LogData, fn: () => T): T {
  return context.run({ ...context.getStore(), ...fields }, fn);
}

/**
 * Creates a logger. JSON: one object per line with `time` (ISO), `level` (its name), `name`,
 * `msg`, the bindings and the data fields.
 *
 * @example
 * ```ts
 * const log = createLogger({ level: 'debug', format: 'json', name: 'agent' });
 * log.child('mobility', { migrationId: 'm-1' }).info('started', { vm: 'web-1' });
 * ```
 */
export function createLogger(options: LoggerOptions = {}): Logger {
  const level = options.level ?? 'info';
  const stream = options.stream ?? process.stderr;
  const pretty = options.format === 'pretty' || ((options.format ?? 'auto') === 'auto' && stream.isTTY === true);
  const now = options.now;
  const destination = pretty ? prettyStream(stream) : { write: (line: string) => safeWrite(stream, line) };
  const root = pino(
    {
      level,
      base: undefined,
      timestamp: now ? () => `,"time":"${now().toISOString()}"` : pino.stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
      // Values are normalised here (normalise()); pino's own err serializer would reshape them.
      serializers: { err: (e: unknown) => e },
    },
    destination,
  );
  return wrap(root, options.name ?? 'embot', level, {});
}

/** A logger that drops everything (for library use and tests that do not look at logs). */
export const silentLogger: Logger = createLogger({ level: 'silent' });

type Level = Exclude<LogLevel, 'silent'>;

function wrap(p: PinoLogger, name: string, level: LogLevel, bindings: LogData): Logger {
  const write = (lvl: Level, msg: string, data?: LogData): void => {
    if (!p.isLevelEnabled(lvl)) return;
    // One object per line: name, context, bindings, data (later wins), so no key is written twice.
    const ctx = context.getStore();
    const record: Record<string, unknown> = { name };
    if (ctx) Object.assign(record, ctx);
    Object.assign(record, bindings);
    // The line's own keys (and the logger's name) are not overwritten by data, as before pino.
    if (data) for (const k of Object.keys(data)) if (k !== 'msg' && k !== 'time' && k !== 'level' && k !== 'name') record[k] = normalise(data[k]);
    p[lvl](record, msg);
  };
  return {
    name,
    level,
    debug: (msg, data) => write('debug', msg, data),
    info: (msg, data) => write('info', msg, data),
    warn: (msg, data) => write('warn', msg, data),
    error: (msg, data) => write('error', msg, data),
    child: (child, more) => wrap(p, `${name}.${child}`, level, more ? { ...bindings, ...more } : bindings),
    isLevelEnabled: (lvl) => p.isLevelEnabled(lvl),
  };
}

function prettyStream(stream: LogStream): { write(line: string): void } {
  const format = prettyFactory({ colorize: stream.isTTY === true, translateTime: 'SYS:HH:MM:ss.l', ignore: 'hostname,pid', messageKey: 'msg' });
  return { write: (line) => safeWrite(stream, format(line)) };
}

function safeWrite(stream: LogStream, line: string): void {
  try {
    stream.write(line);
  } catch {
    // A closed stderr must not take the agent down; the log line is all we lose.
  }
}

/** Errors do not survive JSON.stringify (message is not enumerable); keep what matters. */
function normalise(v: unknown): unknown {
  if (v instanceof Error) {
    const code = (v as { code?: unknown }).code;
    return code === undefined ? { name: v.name, message: v.message } : { name: v.name, message: v.message, code };
  }
  if (typeof v === 'bigint') return v.toString();
  return v;
}
