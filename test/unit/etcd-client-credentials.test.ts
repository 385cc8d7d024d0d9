import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadConfig } from '../../core/config/config.ts';
import { ConfigError, ErrorCodes } from '../../core/errors.ts';
import { loadEtcdCredentials } from '../../core/peers/etcd-client-credentials.ts';
import { makeTlsFixture, type TlsFixture } from '../harness/cluster-tls.ts';
import { thrown } from '../harness/expect-code.ts';

let dir: string;
let tls: TlsFixture;
beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'embot-etcd-credentials-'));
  tls = await makeTlsFixture(join(dir, 'ca'), ['a', 'b']);
  writeFileSync(join(dir, 'password'), 's3cret\n');
  writeFileSync(join(dir, 'empty'), '\n');
  writeFileSync(join(dir, 'garbage.pem'), 'not a certificate');
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const etcdFlags = (directory: Record<string, unknown>) => ({ flags: { directory: { kind: 'etcd', endpoints: ['https://127.0.0.1:2379'], ...directory } }, env: {} }) as Parameters<typeof loadConfig>[0];

describe('etcd client credentials (directory.tls, directory.auth)', () => {
  it('reads the CA, the client certificate and key, and the password (its trailing newline dropped)', () => {
    const a = tls.files('a');
    const c = loadEtcdCredentials({ ca: a.ca, cert: a.cert, key: a.key }, { username: 'embot', passwordFile: join(dir, 'password') });
    expect(c.credentials?.rootCertificate.toString()).toContain('BEGIN CERTIFICATE');
    expect(c.credentials?.certChain?.toString()).toContain('BEGIN CERTIFICATE');
    expect(c.credentials?.privateKey?.toString()).toContain('PRIVATE KEY');
    expect(c.auth).toEqual({ username: 'embot', password: 's3cret' });
    expect(loadEtcdCredentials({ ca: a.ca }, undefined)).toEqual({ credentials: { rootCertificate: expect.any(Buffer) } });
    expect(loadEtcdCredentials(undefined, undefined)).toEqual({});
  });

  it.each([
    ['a CA file that is not there', () => ({ tls: { ca: join(dir, 'nope.crt') } }), ErrorCodes.CONFIG_NOT_FOUND, /cannot read directory.tls.ca/],
    ['a CA file that is no certificate', () => ({ tls: { ca: join(dir, 'garbage.pem') } }), ErrorCodes.CONFIG_INVALID, /directory.tls.ca .* is not a PEM certificate/],
    ['a key that is not the certificate’s', () => ({ tls: { ca: tls.files('a').ca, cert: tls.files('a').cert, key: tls.files('b').key } }), ErrorCodes.CONFIG_INVALID, /is not the key of directory.tls.cert/],
    ['a key file that is no key', () => ({ tls: { ca: tls.files('a').ca, cert: tls.files('a').cert, key: join(dir, 'garbage.pem') } }), ErrorCodes.CONFIG_INVALID, /is not a PEM private key/],
    ['a password file that is not there', () => ({ auth: { username: 'embot', passwordFile: join(dir, 'nope') } }), ErrorCodes.CONFIG_NOT_FOUND, /cannot read directory.auth.passwordFile/],
    ['an empty password file', () => ({ auth: { username: 'embot', passwordFile: join(dir, 'empty') } }), ErrorCodes.CONFIG_INVALID, /is empty/],
  ])('bad input: %s is a coded config error', (_what, input, code, message) => {
    const { tls: t, auth } = input() as { tls?: { ca: string; cert?: string; key?: string }; auth?: { username: string; passwordFile: string } };
    const e = thrown(() => loadEtcdCredentials(t, auth), ConfigError);
    expect(e.code).toBe(code);
    expect(e.message).toMatch(message);
  });

  it.each([
    ['directory.tls with an http:// endpoint', { endpoints: ['http://127.0.0.1:2379'], tls: { ca: 'ca.crt' } }, /every etcd endpoint is https:\/\//],
    ['a client certificate without its key', { tls: { ca: 'ca.crt', cert: 'a.crt' } }, /cert and key together/],
    ['directory.tls without a CA', { tls: { cert: 'a.crt', key: 'a.key' } }, /CA file that signed etcd's certificate is required/],
    ['directory.auth without a password file', { auth: { username: 'embot' } }, /password is required|passwordFile/],
    ['a password written in config', { auth: { username: 'embot', password: 'x', passwordFile: 'p' } }, /password/],
  ])('bad config: %s is refused with EMBOT_ERR_CONFIG_INVALID', (_what, directory, message) => {
    const e = thrown(() => loadConfig(etcdFlags(directory)), ConfigError);
    expect(e.code).toBe(ErrorCodes.CONFIG_INVALID);
    expect(e.message).toMatch(message);
  });

  it('a good directory.tls and directory.auth pass the config check with https:// endpoints', () => {
    const c = loadConfig(etcdFlags({ tls: { ca: 'ca.crt', cert: 'a.crt', key: 'a.key' }, auth: { username: 'embot', passwordFile: 'p' } }));
    expect(c.directory).toMatchObject({ kind: 'etcd', tls: { ca: 'ca.crt', cert: 'a.crt', key: 'a.key' }, auth: { username: 'embot', passwordFile: 'p' } });
  });
});
