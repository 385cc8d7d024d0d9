/**
 * A small structured logger. Hand-written rather than pino: the agent logs little (state
 * changes, errors, not per-event traffic), tests need to capture output synchronously, and
 * the two formats below are all the project needs.
 */

export type LogLevel = 'debug' | 'info' | 'warn' | 'error' | 'silent';
export type LogFormat = 'pretty' | 'json';
export type LogData = Readonly<Record<string, unknown>>;

export interface Logger {
  readonly name: string;
  readonly level: LogLevel;
  debug(msg: string, data?: LogData): void;
  info(msg: string, data?: LogData): void;
  warn(msg: string, data?: LogData): void;
  error(msg: string, data?: LogData): void;
  /** A logger writing to the same stream, named `<parent>.<name>`. */
  child(name: string): Logger;
  isLevelEnabled(level: Exclude<LogLevel, 'silent'>): boolean;
}

export interface LoggerOptions {
  readonly level?: LogLevel;
  readonly format?: LogFormat;
  readonly name?: string;
  /** Defaults to `process.stderr`, so stdout stays free for command output. */
  readonly stream?: { write(chunk: string): unknown };
  /** Injected clock for tests. */
  readonly now?: () => Date;
}

const RANK: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40, silent: 100 };
const LABEL: Record<Exclude<LogLevel, 'silent'>, string> = { debug: 'DEBUG', info: 'INFO ', warn: 'WARN ', error: 'ERROR' };

/**
 * Creates a logger. `pretty`: `HH:MM:SS.mmm LEVEL [name] msg k=v`; `json`: one object per line
 * with `time`, `level`, `name`, `msg` and the data fields.
 *
 * @example
 * ```ts
 * const log = createLogger({ level: 'debug', format: 'json', name: 'agent' });
 * log.child('sensors').info('queue drained', { events: 12 });
 * ```
 */
export function createLogger(options: LoggerOptions = {}): Logger {
  const level = options.level ?? 'info';
  const format = options.format ?? 'pretty';
  const stream = options.stream ?? process.stderr;
  const now = options.now ?? (() => new Date());
  return makeLogger(options.name ?? 'embot', level, format, stream, now);
}

/** A logger that drops everything (for library use and tests that do not look at logs). */
export const silentLogger: Logger = createLogger({ level: 'silent' });

function makeLogger(
  name: string,
  level: LogLevel,
  format: LogFormat,
  stream: { write(chunk: string): unknown },
  now: () => Date,
): Logger {
  const threshold = RANK[level];
  const write = (lvl: Exclude<LogLevel, 'silent'>, msg: string, data?: LogData): void => {
    if (RANK[lvl] < threshold) return;
    const line = format === 'json' ? jsonLine(now(), lvl, name, msg, data) : prettyLine(now(), lvl, name, msg, data);
    try {
      stream.write(line + '\n');
    } catch {
      // A closed stderr must not take the agent down; the log line is all we lose.
    }
  };
  return {
    name,
    level,
    debug: (msg, data) => write('debug', msg, data),
    info: (msg, data) => write('info', msg, data),
    warn: (msg, data) => write('warn', msg, data),
    error: (msg, data) => write('error', msg, data),
    child: (child) => makeLogger(`${name}.${child}`, level, format, stream, now),
    isLevelEnabled: (lvl) => RANK[lvl] >= threshold,
  };
}

function prettyLine(time: Date, level: Exclude<LogLevel, 'silent'>, name: string, msg: string, data?: LogData): string {
  const hh = String(time.getHours()).padStart(2, '0');
  const mm = String(time.getMinutes()).padStart(2, '0');
  const ss = String(time.getSeconds()).padStart(2, '0');
  const ms = String(time.getMilliseconds()).padStart(3, '0');
  let line = `${hh}:${mm}:${ss}.${ms} ${LABEL[level]} [${name}] ${msg}`;
  if (data) for (const [k, v] of Object.entries(data)) line += ` ${k}=${prettyValue(v)}`;
  return line;
}

function prettyValue(v: unknown): string {
  if (typeof v === 'string') return /^[^\s"=]+$/.test(v) ? v : JSON.stringify(v);
  if (typeof v === 'number' || typeof v === 'boolean' || typeof v === 'bigint' || v === null || v === undefined) return String(v);
  return safeStringify(normalise(v));
}

function jsonLine(time: Date, level: Exclude<LogLevel, 'silent'>, name: string, msg: string, data?: LogData): string {
  const record: Record<string, unknown> = { time: time.toISOString(), level, name, msg };
  if (data) for (const [k, v] of Object.entries(data)) if (!(k in record)) record[k] = normalise(v);
  return safeStringify(record);
}

/** Errors do not survive JSON.stringify (message is not enumerable); keep what matters. */
function normalise(v: unknown): unknown {
  if (v instanceof Error) {
    const code = (v as { code?: unknown }).code;
    return code === undefined ? { name: v.name, message: v.message } : { name: v.name, message: v.message, code };
  }
  return v;
}

function safeStringify(v: unknown): string {
  try {
    return JSON.stringify(v, (_k, x: unknown) => (typeof x === 'bigint' ? x.toString() : x instanceof Error ? normalise(x) : x)) ?? 'undefined';
  } catch {
    return '"[unserialisable]"';
  }
}
