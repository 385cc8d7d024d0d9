/**
 * The configuration's transport rule: plain ws:// only on loopback, wss:// only (and always)
 * with peer.tls; and the peer.tls section itself, as file, flags and errors see it.
 */
import { describe, expect, it } from 'vitest';
import { loadConfig, validateConfig } from '../../core/config/config.ts';
import { isLoopbackHost, peerTransportIssues } from '../../core/config/peer-transport.ts';
import { ConfigError, ErrorCodes } from '../../core/errors.ts';

const TLS = { ca: 'tls/ca.crt', cert: 'tls/a.crt', key: 'tls/a.key' };

function issuesOf(input: unknown): string[] {
  try {
    validateConfig(input);
  } catch (e) {
    expect(e).toBeInstanceOf(ConfigError);
    expect((e as ConfigError).code).toBe(ErrorCodes.CONFIG_INVALID);
    return (e as ConfigError).details!['issues'] as string[];
  }
  return [];
}

describe('loopback', () => {
  it.each([
    ['127.0.0.1', true],
    ['127.3.4.5', true],
    ['localhost', true],
    ['::1', true],
    ['[::1]', true],
    ['::ffff:127.0.0.1', true],
    ['0.0.0.0', false],
    ['10.0.0.1', false],
    ['::', false],
    ['agent-b.example.org', false],
    ['128.0.0.1', false],
  ])('%s is loopback: %s', (host, loopback) => {
    expect(isLoopbackHost(host)).toBe(loopback);
  });
});

describe('peer transport rule', () => {
  it('accepts plain ws:// between loopback addresses, the default and the README example', () => {
    expect(issuesOf({})).toEqual([]);
    expect(issuesOf({ peer: { listen: '127.0.0.1:7401', peers: { b: 'ws://127.0.0.1:7402' } }, dataplane: { listen: ['127.0.0.2:7501'], paths: { b: [{ name: 'p2', url: 'ws://127.0.0.2:7501' }] } } })).toEqual([]);
    expect(issuesOf({ peer: { listen: '[::1]:7401', peers: { b: 'ws://localhost:7402' } } })).toEqual([]);
  });

  it('refuses a non-loopback listener or peer without TLS, naming each one and the way out', () => {
    const issues = issuesOf({
      peer: { listen: '0.0.0.0:7401', peers: { b: 'ws://10.0.0.2:7402', c: 'ws://127.0.0.1:7403' } },
      dataplane: { listen: ['192.168.1.5:7501'], paths: { b: [{ name: 'p2', url: 'ws://10.0.1.2:7501' }] } },
    });
    expect(issues).toEqual([
      expect.stringMatching(/^peer\.listen: 0\.0\.0\.0:7401 is not a loopback address; without peer\.tls/),
      expect.stringMatching(/^peer\.peers\.b: ws:\/\/10\.0\.0\.2:7402 is not a loopback address/),
      expect.stringMatching(/^dataplane\.listen\.0: 192\.168\.1\.5:7501 is not a loopback address/),
      expect.stringMatching(/^dataplane\.paths\.b\.0\.url: ws:\/\/10\.0\.1\.2:7501 is not a loopback address/),
    ]);
  });

  it('refuses wss:// URLs without TLS (no certificate to present)', () => {
    expect(issuesOf({ peer: { peers: { b: 'wss://127.0.0.1:7402' } } })).toEqual([expect.stringMatching(/^peer\.peers\.b: .* needs this agent's certificate \(peer\.tls\)/)]);
  });

  it('with peer.tls accepts any address and requires wss:// everywhere', () => {
    expect(issuesOf({ peer: { listen: '0.0.0.0:7401', peers: { b: 'wss://10.0.0.2:7402' }, tls: TLS } })).toEqual([]);
    expect(issuesOf({ peer: { peers: { b: 'ws://127.0.0.1:7402' }, tls: TLS }, dataplane: { paths: { b: [{ name: 'p2', url: 'ws://127.0.0.2:7501' }] } } })).toEqual([
      expect.stringMatching(/^peer\.peers\.b: ws:\/\/127\.0\.0\.1:7402 must be wss:\/\//),
      expect.stringMatching(/^dataplane\.paths\.b\.0\.url: .* must be wss:\/\//),
    ]);
  });

  it('peer.tls needs all three files and no other keys', () => {
    expect(issuesOf({ peer: { tls: { ca: 'ca.crt', cert: 'a.crt' } } })).toEqual([expect.stringMatching(/^peer\.tls\.key: this agent's key file is required/)]);
    expect(issuesOf({ peer: { tls: { ...TLS, pass: 'x' } } })).toEqual([expect.stringMatching(/^peer\.tls: unknown key "pass" \(known keys: ca, cert, key\)/)]);
  });

  it('flags --tls-ca/--tls-cert/--tls-key merge over the file as peer.tls', () => {
    const c = loadConfig({ env: {}, flags: { peer: { tls: TLS, peers: { b: 'wss://127.0.0.1:7402' } } } });
    expect(c.peer.tls).toEqual(TLS);
    expect(peerTransportIssues(c)).toEqual([]);
  });
});
