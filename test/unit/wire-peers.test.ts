import { describe, expect, it } from 'vitest';
import { ConfigError, ErrorCodes } from '../../core/errors.ts';
import { parsePeerListen, parsePeers, peerUrl } from '../../core/wire/index.ts';

function codeOf(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(ConfigError);
    return (e as ConfigError).code;
  }
  return undefined;
}

describe('parsePeers', () => {
  it('parses the flag form into name → URL', () => {
    const peers = parsePeers('b=ws://127.0.0.1:7402, c=ws://127.0.0.2:7403/peer');
    expect([...peers]).toEqual([
      ['b', 'ws://127.0.0.1:7402/'],
      ['c', 'ws://127.0.0.2:7403/peer'],
    ]);
  });

  it('parses the config-file map form', () => {
    expect(parsePeers({ b: 'wss://host-b.example:7401' }).get('b')).toBe('wss://host-b.example:7401/');
  });

  it('treats an empty list as no peers', () => {
    expect(parsePeers('').size).toBe(0);
    expect(parsePeers({}).size).toBe(0);
  });

  it.each([
    ['missing =', 'b'],
    ['empty name', '=ws://127.0.0.1:1'],
    ['trailing comma', 'b=ws://127.0.0.1:1,'],
    ['bad name', 'b c=ws://127.0.0.1:1'],
    ['name too long', `${'x'.repeat(65)}=ws://127.0.0.1:1`],
    ['http URL', 'b=http://127.0.0.1:1'],
    ['not a URL', 'b=127.0.0.1:7402'],
    ['credentials in URL', 'b=ws://u:p@127.0.0.1:1'],
    ['fragment', 'b=ws://127.0.0.1:1/#x'],
    ['duplicate name', 'b=ws://127.0.0.1:1,b=ws://127.0.0.1:2'],
  ])('refuses %s with CONFIG_INVALID', (_what, spec) => {
    expect(codeOf(() => parsePeers(spec))).toBe(ErrorCodes.CONFIG_INVALID);
  });

  it('refuses a non-string URL in the map form', () => {
    expect(codeOf(() => parsePeers({ b: 7402 } as unknown as Record<string, string>))).toBe(ErrorCodes.CONFIG_INVALID);
  });

  it('looks up peers by name and reports unknown names with the known ones', () => {
    const peers = parsePeers('b=ws://127.0.0.1:7402');
    expect(peerUrl(peers, 'b')).toBe('ws://127.0.0.1:7402/');
    expect(codeOf(() => peerUrl(peers, 'z'))).toBe(ErrorCodes.PEER_UNKNOWN);
    expect(() => peerUrl(peers, 'z')).toThrow(/known peers: b/);
  });
});

describe('parsePeerListen', () => {
  it.each([
    ['127.0.0.1:7401', { host: '127.0.0.1', port: 7401 }],
    ['localhost:0', { host: 'localhost', port: 0 }],
    ['[::1]:7401', { host: '::1', port: 7401 }],
    ['7405', { host: '127.0.0.1', port: 7405 }],
  ])('parses %s', (spec, expected) => {
    expect(parsePeerListen(spec)).toEqual(expected);
  });

  it('defaults to 127.0.0.1:7401', () => {
    expect(parsePeerListen()).toEqual({ host: '127.0.0.1', port: 7401 });
  });

  it.each(['', 'host', 'host:', ':7401x', '127.0.0.1:70000', 'a b:1', 'ws://127.0.0.1:1'])('refuses %j with CONFIG_INVALID', (spec) => {
    expect(codeOf(() => parsePeerListen(spec))).toBe(ErrorCodes.CONFIG_INVALID);
  });
});
