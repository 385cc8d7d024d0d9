import { generateKeyPairSync } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { main } from '../../core/cli/main.ts';
import { ErrorCodes, isEmbotError } from '../../core/errors.ts';
import {
  createTrustPolicy,
  decodeSignatureFile,
  encodeSignatureFile,
  generateSigningKeys,
  moduleSigningPayload,
  parsePrivateKey,
  parsePublicKey,
  signModule,
  verifyModuleSignature,
  type TrustDecision,
} from '../../core/mobility/trust-policy.ts';
import { hashModuleDir } from '../../core/plugins/content-hash.ts';

const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const c of cleanups.splice(0).reverse()) c();
});

function tmp(): string {
  const dir = mkdtempSync(join(tmpdir(), 'embot-trust-'));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

const HASH = 'a'.repeat(64);
const OTHER_HASH = 'b'.repeat(64);
const ID = { name: 'vm-watchdog', version: '1.2.0', hash: HASH } as const;

function reasonOf(d: TrustDecision): string {
  if (d.trusted) throw new Error('expected a refusal');
  return d.reason;
}

function expectConfigError(f: () => unknown, pattern: RegExp): void {
  try {
    f();
  } catch (e) {
    expect(isEmbotError(e, ErrorCodes.CONFIG_INVALID)).toBe(true);
    expect((e as Error).message).toMatch(pattern);
    return;
  }
  throw new Error('expected a ConfigError');
}

describe('module signatures', () => {
  it('sign over embot-module:v1:<ref> and verify only for that identity and key', () => {
    const keys = generateSigningKeys();
    const priv = parsePrivateKey(keys.privatePem);
    const pub = parsePublicKey(keys.publicPem);
    expect(moduleSigningPayload(ID).toString('utf8')).toBe(`embot-module:v1:vm-watchdog@1.2.0#${HASH}`);
    const sig = signModule(ID, priv);
    expect(sig.byteLength).toBe(64);
    expect(verifyModuleSignature(ID, sig, [pub])).toBe(true);
    expect(verifyModuleSignature({ ...ID, hash: OTHER_HASH }, sig, [pub])).toBe(false);
    expect(verifyModuleSignature({ ...ID, version: '1.2.1' }, sig, [pub])).toBe(false);
    expect(verifyModuleSignature({ ...ID, name: 'vm-watchdoge' }, sig, [pub])).toBe(false);
    expect(verifyModuleSignature(ID, sig, [parsePublicKey(generateSigningKeys().publicPem)])).toBe(false);
    expect(verifyModuleSignature(ID, sig.subarray(0, 63), [pub])).toBe(false);
    expect(verifyModuleSignature(ID, new Uint8Array(64), [pub])).toBe(false);
  });

  it('module.sig text round-trips and garbage decodes to nothing', () => {
    const sig = new Uint8Array(64).map((_, i) => i * 3);
    expect(decodeSignatureFile(encodeSignatureFile(sig))).toEqual(sig);
    expect(decodeSignatureFile('not base64 !!')).toBeUndefined();
    expect(decodeSignatureFile(Buffer.alloc(32).toString('base64'))).toBeUndefined();
    expect(decodeSignatureFile('')).toBeUndefined();
  });
});

describe('public key formats', () => {
  const keys = generateSigningKeys();
  const sig = signModule(ID, parsePrivateKey(keys.privatePem));
  const spkiBase64 = parsePublicKey(keys.publicPem).export({ type: 'spki', format: 'der' }).toString('base64');

  it.each([
    ['PEM', keys.publicPem],
    ['raw base64', keys.publicRawBase64],
    ['DER SPKI base64', spkiBase64],
    ['private PEM (public half used)', keys.privatePem],
  ])('accepts %s', (_label, spec) => {
    const policy = createTrustPolicy({ publicKeys: [spec] });
    expect(policy.check({ ...ID, signature: sig })).toEqual({ trusted: true });
  });

  it('reads key files, relative ones against baseDir', () => {
    const dir = tmp();
    mkdirSync(join(dir, 'keys'));
    writeFileSync(join(dir, 'keys', 'a.pub'), keys.publicPem);
    writeFileSync(join(dir, 'keys', 'b.pub'), `${keys.publicRawBase64}\n`);
    expect(createTrustPolicy({ publicKeys: [join(dir, 'keys', 'a.pub')] }).check({ ...ID, signature: sig }).trusted).toBe(true);
    expect(createTrustPolicy({ publicKeys: ['keys/b.pub'] }, { baseDir: dir }).check({ ...ID, signature: sig }).trusted).toBe(true);
  });

  it('refuses what is not an ed25519 public key, naming the setting', () => {
    const dir = tmp();
    const rsa = generateKeyPairSync('rsa', { modulusLength: 1024 }).publicKey.export({ type: 'spki', format: 'pem' }).toString();
    writeFileSync(join(dir, 'garbage.pub'), 'hello');
    expectConfigError(() => createTrustPolicy({ publicKeys: [rsa] }), /trust\.publicKeys\[0\].*rsa.*ed25519/);
    expectConfigError(() => createTrustPolicy({ publicKeys: [keys.publicPem, join(dir, 'missing.pub')] }), /trust\.publicKeys\[1\].*not a readable key file/);
    expectConfigError(() => createTrustPolicy({ publicKeys: [join(dir, 'garbage.pub')] }), /does not hold a PEM or base64 ed25519 public key/);
    expectConfigError(() => createTrustPolicy({ publicKeys: ['-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----'] }), /unreadable PEM key/);
    expectConfigError(() => parsePrivateKey(keys.publicPem), /not a PEM private key/);
    expectConfigError(() => parsePrivateKey(generateKeyPairSync('rsa', { modulusLength: 1024 }).privateKey.export({ type: 'pkcs8', format: 'pem' }).toString()), /ed25519/);
  });
});

describe('createTrustPolicy', () => {
  const keys = generateSigningKeys();
  const other = generateSigningKeys();
  const sig = signModule(ID, parsePrivateKey(keys.privatePem));

  it("defaults to 'signed' and, without keys, refuses everything with a how-to", () => {
    const policy = createTrustPolicy();
    expect(policy.mode).toBe('signed');
    const reason = reasonOf(policy.check({ ...ID, signature: sig }));
    expect(reason).toContain('vm-watchdog@1.2.0#');
    expect(reason).toContain('embot module keygen');
    expect(reason).toContain('trust.publicKeys');
  });

  it('signed: trusts a valid signature by any configured key, refuses unsigned, wrong key and tampered identity', () => {
    const policy = createTrustPolicy({ mode: 'signed', publicKeys: [other.publicPem, keys.publicPem] });
    expect(policy.check({ ...ID, signature: sig })).toEqual({ trusted: true });
    expect(reasonOf(policy.check(ID))).toMatch(/not signed.*module\.sig.*embot module sign/);
    expect(reasonOf(createTrustPolicy({ publicKeys: [other.publicPem] }).check({ ...ID, signature: sig }))).toMatch(/does not verify against any of the 1 configured/);
    expect(reasonOf(policy.check({ ...ID, hash: OTHER_HASH, signature: sig }))).toMatch(/does not verify/);
    expect(reasonOf(policy.check({ ...ID, signature: new Uint8Array(3) }))).toMatch(/does not verify/);
  });

  it('signed: an allowlisted hash is not enough', () => {
    expect(createTrustPolicy({ mode: 'signed', publicKeys: [keys.publicPem], allowHashes: [HASH] }).check(ID).trusted).toBe(false);
  });

  it('allowlist: hit by hash (any case) or exact ref, miss otherwise, empty list explains itself', () => {
    const byHash = createTrustPolicy({ mode: 'allowlist', allowHashes: [HASH.toUpperCase()] });
    expect(byHash.check(ID)).toEqual({ trusted: true });
    expect(byHash.check({ ...ID, name: 'other', version: '9.9.9' })).toEqual({ trusted: true });
    expect(reasonOf(byHash.check({ ...ID, hash: OTHER_HASH }))).toMatch(/not in trust\.allowHashes.*embot module hash/);

    const byRef = createTrustPolicy({ mode: 'allowlist', allowHashes: [`vm-watchdog@1.2.0#${HASH}`] });
    expect(byRef.check(ID).trusted).toBe(true);
    expect(byRef.check({ ...ID, version: '1.2.1' }).trusted).toBe(false);

    expect(reasonOf(createTrustPolicy({ mode: 'allowlist' }).check(ID))).toMatch(/allowHashes is empty/);
  });

  it('any-authenticated-peer trusts every module', () => {
    expect(createTrustPolicy({ mode: 'any-authenticated-peer' }).check(ID)).toEqual({ trusted: true });
  });

  it('refuses bad configuration with CONFIG_INVALID', () => {
    expectConfigError(() => createTrustPolicy({ mode: 'yolo' as 'signed' }), /trust\.mode.*"yolo"/);
    expectConfigError(() => createTrustPolicy({ mode: 'allowlist', allowHashes: [HASH, 'abc'] }), /trust\.allowHashes\[1\]/);
    expectConfigError(() => createTrustPolicy({ mode: 'allowlist', allowHashes: [`Bad@1#${HASH}`] }), /trust\.allowHashes\[0\]/);
  });
});

interface Run {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

async function run(...args: string[]): Promise<Run> {
  let stdout = '';
  let stderr = '';
  const code = await main(['node', 'embot', ...args], {
    stdout: { write: (s: string) => (stdout += s) },
    stderr: { write: (s: string) => (stderr += s) },
    env: {},
  });
  return { code, stdout, stderr };
}

function writeModule(root: string): string {
  const dir = join(root, 'mod');
  mkdirSync(join(dir, 'lib'), { recursive: true });
  writeFileSync(
    join(dir, 'manifest.json'),
    JSON.stringify({ name: 'demo-mod', version: '0.3.1', embotApi: 1, entry: 'index.mjs', embots: [{ type: 'demo', attachTo: { kind: 'vm' }, policies: ['p'] }] }),
  );
  writeFileSync(join(dir, 'index.mjs'), 'export default {}\n');
  writeFileSync(join(dir, 'lib', 'util.mjs'), 'export const x = 1;\n');
  return dir;
}

describe('embot module CLI', () => {
  it('keygen → sign → verify → hash, and the agent trust policy accepts the result', async () => {
    const root = tmp();
    const keysDir = join(root, 'keys');
    const mod = writeModule(root);
    const hashBefore = hashModuleDir(mod);

    const keygen = await run('module', 'keygen', '--out', keysDir);
    expect(keygen).toMatchObject({ code: 0, stderr: '' });
    expect(keygen.stdout).toContain('cluster-signing.pub');
    expect(statSync(join(keysDir, 'cluster-signing.key')).mode & 0o777).toBe(0o600);
    expect(readFileSync(join(keysDir, 'cluster-signing.key'), 'utf8')).toMatch(/^-----BEGIN PRIVATE KEY-----/);
    expect(readFileSync(join(keysDir, 'cluster-signing.pub'), 'utf8')).toMatch(/^-----BEGIN PUBLIC KEY-----/);

    const sign = await run('module', 'sign', mod, '--key', join(keysDir, 'cluster-signing.key'));
    expect(sign).toMatchObject({ code: 0, stderr: '' });
    const ref = `demo-mod@0.3.1#${hashBefore}`;
    expect(sign.stdout.split('\n')[0]).toBe(ref);
    expect(decodeSignatureFile(readFileSync(join(mod, 'module.sig'), 'utf8'))).toBeDefined();
    // The signature is not content: signing keeps the hash.
    expect(hashModuleDir(mod)).toBe(hashBefore);

    const verify = await run('module', 'verify', mod, '--pub', join(keysDir, 'cluster-signing.pub'));
    expect(verify).toMatchObject({ code: 0, stderr: '' });
    expect(verify.stdout).toContain('signature ok');

    const verifyJson = await run('module', 'verify', mod, '--pub', join(keysDir, 'cluster-signing.pub'), '--json');
    expect(verifyJson.code).toBe(0);
    expect(JSON.parse(verifyJson.stdout)).toEqual({ name: 'demo-mod', version: '0.3.1', hash: hashBefore, ref, signed: true, valid: true });

    const hash = await run('module', 'hash', mod);
    expect(hash).toEqual({ code: 0, stdout: `${ref}\n`, stderr: '' });
    const hashJson = await run('module', 'hash', mod, '--json');
    expect(JSON.parse(hashJson.stdout)).toEqual({ name: 'demo-mod', version: '0.3.1', hash: hashBefore, ref, signed: true });

    const sig = decodeSignatureFile(readFileSync(join(mod, 'module.sig'), 'utf8'))!;
    const policy = createTrustPolicy({ mode: 'signed', publicKeys: ['keys/cluster-signing.pub'] }, { baseDir: root });
    expect(policy.check({ name: 'demo-mod', version: '0.3.1', hash: hashBefore, signature: sig })).toEqual({ trusted: true });
  });

  it('verify fails with exit 1 for a changed module, another key, or no signature', async () => {
    const root = tmp();
    const mod = writeModule(root);
    expect((await run('module', 'keygen', '--out', join(root, 'a'))).code).toBe(0);
    expect((await run('module', 'keygen', '--out', join(root, 'b'))).code).toBe(0);

    const unsigned = await run('module', 'verify', mod, '--pub', join(root, 'a', 'cluster-signing.pub'));
    expect(unsigned.code).toBe(1);
    expect(unsigned.stderr).toMatch(/not signed.*\[EMBOT_ERR_MODULE_UNTRUSTED\]/);

    expect((await run('module', 'sign', mod, '--key', join(root, 'a', 'cluster-signing.key'))).code).toBe(0);
    const wrongKey = await run('module', 'verify', mod, '--pub', join(root, 'b', 'cluster-signing.pub'), '--json');
    expect(wrongKey.code).toBe(1);
    expect(JSON.parse(wrongKey.stdout)).toMatchObject({ signed: true, valid: false });
    expect(wrongKey.stderr).toContain('EMBOT_ERR_MODULE_UNTRUSTED');
    // Either of several keys will do.
    expect((await run('module', 'verify', mod, '--pub', join(root, 'b', 'cluster-signing.pub'), '--pub', join(root, 'a', 'cluster-signing.pub'))).code).toBe(0);

    writeFileSync(join(mod, 'lib', 'util.mjs'), 'export const x = 2;\n');
    const tampered = await run('module', 'verify', mod, '--pub', join(root, 'a', 'cluster-signing.pub'));
    expect(tampered.code).toBe(1);
    expect(tampered.stderr).toMatch(/does not verify/);
  });

  it('usage errors exit 2, bad modules exit 1, --help exits 0', async () => {
    const root = tmp();
    const mod = writeModule(root);
    expect((await run('module', 'keygen', '--out', root)).code).toBe(0);
    const key = join(root, 'cluster-signing.key');

    const again = await run('module', 'keygen', '--out', root);
    expect(again.code).toBe(2);
    expect(again.stderr).toContain('--force');
    const before = readFileSync(key, 'utf8');
    expect((await run('module', 'keygen', '--out', root, '--force')).code).toBe(0);
    expect(readFileSync(key, 'utf8')).not.toBe(before);
    expect(statSync(key).mode & 0o777).toBe(0o600);

    expect((await run('module', 'sign', mod)).code).toBe(2); // --key missing
    expect((await run('module', 'keygen')).code).toBe(2); // --out missing
    expect((await run('module', 'sign', join(root, 'nope'), '--key', key)).code).toBe(2);
    expect((await run('module', 'sign', mod, '--key', join(root, 'nope.key'))).code).toBe(2);
    const pubAsKey = await run('module', 'sign', mod, '--key', join(root, 'cluster-signing.pub'));
    expect(pubAsKey.code).toBe(2);
    expect(pubAsKey.stderr).toContain('EMBOT_ERR_CONFIG_INVALID');
    expect((await run('module', 'verify', mod, '--pub', join(root, 'nope.pub'))).code).toBe(2);
    expect((await run('module', 'frobnicate')).code).toBe(2);

    writeFileSync(join(mod, 'manifest.json'), '{ not json');
    const badManifest = await run('module', 'hash', mod);
    expect(badManifest.code).toBe(1);
    expect(badManifest.stderr).toContain('EMBOT_ERR_PLUGIN_MANIFEST_INVALID');

    const help = await run('module', '--help');
    expect(help.code).toBe(0);
    expect(help.stdout).toMatch(/keygen[\s\S]*sign[\s\S]*verify[\s\S]*hash/);
  });
});
