import { describe, expect, it } from 'vitest';
import { createLogger, parseLogFormat, parseLogLevel, withLogContext, type LogStream } from '../../core/logger.ts';
import { ErrorCodes, EmbotError } from '../../core/errors.ts';

/** A stream that keeps what was written, as a terminal or not. */
function capture(isTTY = false): LogStream & { readonly lines: string[] } {
  const lines: string[] = [];
  return { isTTY, lines, write: (chunk: string) => lines.push(...chunk.split('\n').filter((l) => l !== '')) };
}
const NOW = new Date('2026-01-02T03:04:05.678Z');
const json = (s: { lines: string[] }): Record<string, unknown>[] => s.lines.map((l) => JSON.parse(l) as Record<string, unknown>);

describe('logger (pino)', () => {
  it('writes one JSON object per line: level by name, ISO time, name, msg, then the data', () => {
    const out = capture();
    const err = Object.assign(new Error('disk gone'), { code: 'EMBOT_ERR_STORE_CORRUPT' });
    createLogger({ format: 'json', name: 'a', stream: out, now: () => NOW }).warn('store trouble', { error: err, n: 3, big: 10n });
    expect(json(out)).toEqual([{ level: 'warn', time: NOW.toISOString(), name: 'a', msg: 'store trouble', error: { name: 'Error', message: 'disk gone', code: 'EMBOT_ERR_STORE_CORRUPT' }, n: 3, big: '10' }]);
  });

  it('drops what is below its level; silent drops everything', () => {
    const out = capture();
    const log = createLogger({ format: 'json', level: 'warn', stream: out });
    log.debug('d');
    log.info('i');
    log.warn('w');
    log.error('e');
    expect(json(out).map((l) => l['level'])).toEqual(['warn', 'error']);
    expect(log.isLevelEnabled('info')).toBe(false);
    expect(log.isLevelEnabled('error')).toBe(true);
    const quiet = capture();
    createLogger({ format: 'json', level: 'silent', stream: quiet }).error('nothing');
    expect(quiet.lines).toEqual([]);
  });

  it('children are named parent.child and carry their bindings (and their parents\'), data wins over a binding', () => {
    const out = capture();
    const log = createLogger({ format: 'json', name: 'a', stream: out }).child('mobility', { migrationId: 'm-1', role: 'source' }).child('paths', { path: 'p0' });
    log.info('sent', { role: 'override' });
    const [line] = json(out);
    expect(line).toMatchObject({ name: 'a.mobility.paths', migrationId: 'm-1', path: 'p0', role: 'override', msg: 'sent' });
    // No key twice in the raw line.
    expect(out.lines[0]!.match(/"role"/g)).toHaveLength(1);
  });

  it('withLogContext puts its fields on every line logged inside it, across awaits and timers, and only there', async () => {
    const out = capture();
    const log = createLogger({ format: 'json', stream: out });
    await withLogContext({ migrationId: 'm-7' }, async () => {
      log.info('at once');
      await new Promise((r) => setTimeout(r, 5));
      log.child('deep').info('after a timer');
    });
    log.info('outside');
    expect(json(out).map((l) => [l['msg'], l['migrationId']])).toEqual([
      ['at once', 'm-7'],
      ['after a timer', 'm-7'],
      ['outside', undefined],
    ]);
  });

  it('format auto: pretty on a terminal, JSON lines into a pipe or file', () => {
    const tty = capture(true);
    createLogger({ name: 'a', stream: tty }).info('hello there', { vm: 'web' });
    expect(() => JSON.parse(tty.lines[0]!)).toThrow();
    expect(tty.lines.join('\n')).toContain('hello there');
    expect(tty.lines.join('\n')).toContain('web');
    const pipe = capture(false);
    createLogger({ name: 'a', stream: pipe }).info('hello there');
    expect(json(pipe)[0]).toMatchObject({ msg: 'hello there', name: 'a' });
  });

  it('a stream that throws costs the line, not the caller', () => {
    const log = createLogger({ format: 'json', stream: { write: () => { throw new Error('EPIPE'); } } });
    expect(() => log.error('lost')).not.toThrow();
  });

  it('--log-level and --log-format values are checked with a coded usage error', () => {
    expect(parseLogLevel('debug')).toBe('debug');
    expect(parseLogFormat('auto')).toBe('auto');
    for (const bad of [() => parseLogLevel('loud'), () => parseLogLevel(''), () => parseLogFormat('yaml')]) {
      try {
        bad();
        expect.unreachable('accepted a bad value');
      } catch (e) {
        expect(e).toBeInstanceOf(EmbotError);
        expect((e as EmbotError).code).toBe(ErrorCodes.CLI_USAGE);
      }
    }
  });
});
