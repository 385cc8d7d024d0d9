import { InvalidArgumentError } from 'commander';

const MULTIPLIER: Record<string, number> = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 };

/**
 * Sizes as users type them: `67108864`, `64M`, `64MiB`, `1G`, `1.5g`, `512k`. Units are binary
 * (M = MiB) because memory is. A trailing `/s` is allowed for rates.
 *
 * @example
 * ```ts
 * parseSize('64M'); // 67108864
 * ```
 */
export function parseSize(raw: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?(?:\/s)?\s*$/i.exec(raw);
  if (!m) throw new InvalidArgumentError('expected a size like 67108864, 64M, 512K or 1G');
  const bytes = Math.round(Number(m[1]) * MULTIPLIER[m[2]!.toLowerCase()]!);
  if (!Number.isSafeInteger(bytes)) throw new InvalidArgumentError('size is too large');
  return bytes;
}

export function parsePositiveInt(raw: string): number {
  if (!/^\d+$/.test(raw.trim()) || Number(raw) < 1 || !Number.isSafeInteger(Number(raw))) {
    throw new InvalidArgumentError('expected a whole number ≥ 1');
  }
  return Number(raw);
}

export function parsePort(raw: string): number {
  const n = Number(raw);
  if (!/^\d+$/.test(raw.trim()) || n > 65535) throw new InvalidArgumentError('expected a port number 0-65535');
  return n;
}

/** `--payload` must be JSON; a bare word is the usual mistake, so say how to quote it. */
export function parseJson(raw: string): unknown {
  try {
    return JSON.parse(raw) as unknown;
  } catch (e) {
    throw new InvalidArgumentError(`not valid JSON (${(e as Error).message}); quote it for the shell, e.g. --payload '{"load":0.9}'`);
  }
}

/** `HOST:PORT`, `[::1]:PORT` or `:PORT` (host defaults). */
export function parseHostPort(raw: string): { host?: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:[\]]*)):(\d{1,5})$/.exec(raw.trim());
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) throw new InvalidArgumentError('expected HOST:PORT, e.g. 127.0.0.1:7400 or [::1]:7400');
  const host = m[1] ?? m[2];
  return host ? { host, port } : { port };
}
