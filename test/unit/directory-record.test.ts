import { describe, expect, it } from 'vitest';
import { agentsPrefix, checkRecord, encodeRecord, recordKey } from '../../core/peers/directory-record.ts';
import type { PeerDirectory } from '../../core/peers/peer-directory.ts';
import { StaticPeerDirectory } from '../../core/peers/static-peer-directory.ts';
import { parsePeers } from '../../core/wire/peers.ts';

const good = { name: 'b', url: 'ws://127.0.0.1:7402', version: '0.1.0', startedAt: 1_700_000_000_000 };
const check = (value: unknown, key = '/embot/agents/b'): ReturnType<typeof checkRecord> => checkRecord('/embot', key, typeof value === 'string' ? value : JSON.stringify(value));

describe('fleet directory records', () => {
  it('a good record is accepted with its URL normalized; the key folder is <prefix>/agents/ whatever the trailing slash', () => {
    expect(check(good)).toEqual({ ok: true, record: { ...good, url: 'ws://127.0.0.1:7402/' } });
    expect(check({ ...good, url: 'wss://b.example:7402' })).toMatchObject({ ok: true, record: { url: 'wss://b.example:7402/' } });
    expect(agentsPrefix('/embot/')).toBe('/embot/agents/');
    expect(recordKey('/fleet', 'a')).toBe('/fleet/agents/a');
    // What an agent writes is what an agent accepts.
    expect(checkRecord('/embot', recordKey('/embot', 'b'), encodeRecord({ ...good, url: 'ws://127.0.0.1:7402/' }))).toMatchObject({ ok: true });
  });

  it.each([
    ['garbage JSON', '{not json', /not JSON/],
    ['a JSON array', [good], /not a JSON object/],
    ['null', 'null', /not a JSON object/],
    ['no name', { ...good, name: undefined }, /name is missing/],
    ['a name that is not the key’s', { ...good, name: 'c' }, /not the key's name/],
    ['no url', { ...good, url: undefined }, /url is missing/],
    ['a numeric url', { ...good, url: 7402 }, /url is missing or not a string/],
    ['an http:// url', { ...good, url: 'http://127.0.0.1:7402' }, /must be a ws:\/\/ or wss:\/\//],
    ['a url that is not one', { ...good, url: 'not a url' }, /is not a URL/],
    ['credentials in the url', { ...good, url: 'ws://u:p@127.0.0.1:7402' }, /credentials/],
    ['no version', { ...good, version: undefined }, /version is missing/],
    ['a string startedAt', { ...good, startedAt: 'yesterday' }, /startedAt/],
    ['a negative startedAt', { ...good, startedAt: -1 }, /startedAt/],
  ])('bad input: %s is refused with a reason naming the record', (_what, value, reason) => {
    const r = check(value);
    expect(r.ok).toBe(false);
    if (!r.ok) {
      expect(r.reason).toMatch(reason);
      expect(r.name).toBe('b');
    }
  });

  it('with the transport rule: a URL this agent may not dial is refused (ws:// off loopback or wss:// without TLS; ws:// with TLS)', () => {
    const at = (url: string, tls: boolean): ReturnType<typeof checkRecord> => checkRecord('/embot', '/embot/agents/b', JSON.stringify({ ...good, url }), { tls });
    expect(at('ws://127.0.0.1:7402', false)).toMatchObject({ ok: true });
    expect(at('ws://localhost:7402', false)).toMatchObject({ ok: true });
    expect(at('ws://10.0.0.5:7402', false)).toMatchObject({ ok: false, name: 'b', reason: expect.stringMatching(/not a loopback address/) });
    expect(at('wss://10.0.0.5:7402', false)).toMatchObject({ ok: false, reason: expect.stringMatching(/needs this agent's certificate/) });
    expect(at('wss://10.0.0.5:7402', true)).toMatchObject({ ok: true, record: { url: 'wss://10.0.0.5:7402/' } });
    expect(at('ws://127.0.0.1:7402', true)).toMatchObject({ ok: false, reason: expect.stringMatching(/must be wss:\/\/ with peer.tls/) });
    // Without the rule (what the record itself must be), an off-loopback ws:// is well formed.
    expect(checkRecord('/embot', '/embot/agents/b', JSON.stringify({ ...good, url: 'ws://10.0.0.5:7402' }))).toMatchObject({ ok: true });
  });

  it('bad input: a key outside the agents folder or not ending in an agent name is refused without a name', () => {
    expect(check(good, '/other/agents/b')).toMatchObject({ ok: false, name: undefined, reason: expect.stringMatching(/not under \/embot\/agents\//) });
    expect(check(good, '/embot/agents/')).toMatchObject({ ok: false, name: undefined });
    expect(check(good, '/embot/agents/b/extra')).toMatchObject({ ok: false, name: undefined });
  });
});

describe('StaticPeerDirectory', () => {
  it('is the config map behind the directory contract: same reads, every peer from config, no start capability', () => {
    const map = parsePeers('b=ws://127.0.0.1:7402,c=ws://127.0.0.1:7403');
    const dir = new StaticPeerDirectory(map);
    expect([...dir]).toEqual([...map]);
    expect([...dir.keys()]).toEqual(['b', 'c']);
    expect(dir.get('b')).toBe('ws://127.0.0.1:7402/');
    expect(dir.has('c') && !dir.has('d')).toBe(true);
    expect(dir.size).toBe(2);
    expect(dir.status()).toEqual({ kind: 'static', state: 'static', peers: [{ name: 'b', url: 'ws://127.0.0.1:7402/', source: 'config' }, { name: 'c', url: 'ws://127.0.0.1:7403/', source: 'config' }] });
    // The capability is declared by its absence, not faked by a method that does nothing.
    expect((dir as PeerDirectory).start).toBeUndefined();
  });
});
