/**
 * `embot ca init|issue` through the real CLI entry point, and what the certificates it writes
 * say: chain to the cluster CA, names, validity, file modes; and every bad input gets a coded
 * error with nothing written.
 */
import { X509Certificate, createPrivateKey } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { main } from '../../core/cli/main.ts';
import { ErrorCodes } from '../../core/errors.ts';
import { createClusterCa, issueAgentCertificate } from '../../core/wire/cluster-ca.ts';
import { isIssuedTo, loadPeerTls } from '../../core/wire/peer-tls.ts';

interface Run {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

async function embot(...args: string[]): Promise<Run> {
  let stdout = '';
  let stderr = '';
  const code = await main(['node', 'embot', ...args], { stdout: { write: (s: string) => (stdout += s) }, stderr: { write: (s: string) => (stderr += s) }, env: {} });
  return { code, stdout, stderr };
}

const DAY = 24 * 3600 * 1000;
let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'embot-ca-'));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

describe('embot ca init', () => {
  it('writes a CA key (0600) and a self-signed CA certificate valid for the given days', async () => {
    const r = await embot('ca', 'init', '--out', join(dir, 'ca'), '--days', '30', '--json');
    expect(r.code, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout) as { key: string; cert: string; validTo: string };
    expect(statSync(out.key).mode & 0o777).toBe(0o600);
    const cert = new X509Certificate(readFileSync(out.cert));
    expect(cert.ca).toBe(true);
    expect(cert.verify(cert.publicKey)).toBe(true);
    expect(cert.checkPrivateKey(createPrivateKey(readFileSync(out.key)))).toBe(true);
    const validFor = new Date(cert.validTo).getTime() - Date.now();
    expect(validFor).toBeGreaterThan(29 * DAY);
    expect(validFor).toBeLessThanOrEqual(30 * DAY);
  });

  it('refuses to replace an existing CA without --force (exit 2, CLI_USAGE, files unchanged), and replaces it with --force', async () => {
    expect((await embot('ca', 'init', '--out', dir)).code).toBe(0);
    const before = readFileSync(join(dir, 'ca.crt'), 'utf8');
    const again = await embot('ca', 'init', '--out', dir);
    expect(again.code).toBe(2);
    expect(again.stderr).toContain(ErrorCodes.CLI_USAGE);
    expect(again.stderr).toContain('--force');
    expect(readFileSync(join(dir, 'ca.crt'), 'utf8')).toBe(before);
    expect((await embot('ca', 'init', '--out', dir, '--force')).code).toBe(0);
    expect(readFileSync(join(dir, 'ca.crt'), 'utf8')).not.toBe(before);
    expect(statSync(join(dir, 'ca.key')).mode & 0o777).toBe(0o600);
  });

  it('refuses a validity that is not a whole number of days', async () => {
    const r = await embot('ca', 'init', '--out', dir, '--days', 'soon');
    expect(r.code).toBe(2);
    expect(existsSync(join(dir, 'ca.key'))).toBe(false);
  });
});

describe('embot ca issue', () => {
  async function initCa(): Promise<string> {
    const caDir = join(dir, 'ca');
    expect((await embot('ca', 'init', '--out', caDir)).code).toBe(0);
    return caDir;
  }

  it("issues an agent certificate the CA signed, named after the agent, with the given IP and DNS names, usable by the agent's TLS", async () => {
    const caDir = await initCa();
    const out = join(dir, 'tls-a');
    const r = await embot('ca', 'issue', 'a', '--ca', caDir, '--out', out, '--ip', '127.0.0.1', '--ip', '::1', '--dns', 'a.example.org', '--days', '10', '--json');
    expect(r.code, r.stderr).toBe(0);
    const res = JSON.parse(r.stdout) as { key: string; cert: string; ca: string };
    expect(statSync(res.key).mode & 0o777).toBe(0o600);
    const ca = new X509Certificate(readFileSync(join(caDir, 'ca.crt')));
    const cert = new X509Certificate(readFileSync(res.cert));
    expect(cert.checkIssued(ca)).toBe(true);
    expect(cert.verify(ca.publicKey)).toBe(true);
    expect(cert.ca).toBe(false);
    expect(cert.subject).toContain('CN=a');
    expect(cert.subjectAltName).toBe('DNS:a, DNS:a.example.org, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1');
    // TLS server and client both: mutual TLS needs both purposes.
    expect(cert.keyUsage).toEqual(expect.arrayContaining(['1.3.6.1.5.5.7.3.1', '1.3.6.1.5.5.7.3.2']));
    expect(isIssuedTo(cert, 'a')).toBe(true);
    expect(isIssuedTo(cert, 'b')).toBe(false);
    const validFor = new Date(cert.validTo).getTime() - Date.now();
    expect(validFor).toBeGreaterThan(9 * DAY);
    expect(validFor).toBeLessThanOrEqual(10 * DAY);
    expect(readFileSync(res.ca, 'utf8')).toBe(readFileSync(join(caDir, 'ca.crt'), 'utf8'));
    // What the agent loads at start accepts it.
    expect(() => loadPeerTls({ ca: res.ca, cert: res.cert, key: res.key }, 'a')).not.toThrow();
  });

  it('never issues a certificate that outlives its CA', async () => {
    const now = new Date();
    const ca = await createClusterCa({ days: 5, now });
    const pair = await issueAgentCertificate(ca, { name: 'a', days: 365, now });
    expect(new X509Certificate(pair.certPem).validTo).toBe(new X509Certificate(ca.certPem).validTo);
  });

  it('a certificate issued for a past window is refused by the agent as not valid now', async () => {
    const ca = await createClusterCa();
    const pair = await issueAgentCertificate(ca, { name: 'a', days: 1, now: new Date(Date.now() - 3 * DAY) });
    const files = { ca: join(dir, 'ca.crt'), cert: join(dir, 'a.crt'), key: join(dir, 'a.key') };
    writeFileSync(files.ca, ca.certPem);
    writeFileSync(files.cert, pair.certPem);
    writeFileSync(files.key, pair.keyPem);
    expect(() => loadPeerTls(files, 'a')).toThrow(/not now/);
  });

  it('refuses a missing CA with CONFIG_NOT_FOUND and says how to create one', async () => {
    const r = await embot('ca', 'issue', 'a', '--ca', join(dir, 'nope'), '--out', join(dir, 'out'));
    expect(r.code).toBe(2);
    expect(r.stderr).toContain(ErrorCodes.CONFIG_NOT_FOUND);
    expect(r.stderr).toContain('embot ca init');
    expect(existsSync(join(dir, 'out'))).toBe(false);
  });

  it('refuses a bad agent name, IP or DNS name with CLI_USAGE and writes nothing', async () => {
    const caDir = await initCa();
    for (const args of [['Bad_Name'], ['a', '--ip', '300.1.1.1'], ['a', '--dns', '*.example.org']]) {
      const r = await embot('ca', 'issue', ...args, '--ca', caDir, '--out', join(dir, 'out'));
      expect(r.code, args.join(' ')).toBe(2);
      expect(r.stderr).toContain(ErrorCodes.CLI_USAGE);
    }
    expect(existsSync(join(dir, 'out'))).toBe(false);
  });

  it('refuses to overwrite an agent key without --force, and a ca.crt copy of another CA', async () => {
    const caDir = await initCa();
    const out = join(dir, 'out');
    expect((await embot('ca', 'issue', 'a', '--ca', caDir, '--out', out)).code).toBe(0);
    const key = readFileSync(join(out, 'a.key'), 'utf8');
    const again = await embot('ca', 'issue', 'a', '--ca', caDir, '--out', out);
    expect(again.code).toBe(2);
    expect(again.stderr).toContain('--force');
    expect(readFileSync(join(out, 'a.key'), 'utf8')).toBe(key);
    // Another agent into the same folder is fine: same CA copy.
    expect((await embot('ca', 'issue', 'b', '--ca', caDir, '--out', out)).code).toBe(0);
    const otherCa = join(dir, 'other-ca');
    expect((await embot('ca', 'init', '--out', otherCa)).code).toBe(0);
    const mixed = await embot('ca', 'issue', 'c', '--ca', otherCa, '--out', out);
    expect(mixed.code).toBe(2);
    expect(mixed.stderr).toContain('another CA certificate');
    expect(existsSync(join(out, 'c.key'))).toBe(false);
    expect((await embot('ca', 'issue', 'a', '--ca', caDir, '--out', out, '--force')).code).toBe(0);
    expect(readFileSync(join(out, 'a.key'), 'utf8')).not.toBe(key);
  });

  it('refuses a CA folder whose key is not the key of its certificate', async () => {
    const caDir = await initCa();
    const other = await createClusterCa();
    writeFileSync(join(caDir, 'ca.key'), other.keyPem);
    const r = await embot('ca', 'issue', 'a', '--ca', caDir, '--out', join(dir, 'out'));
    expect(r.code).toBe(2);
    expect(r.stderr).toContain(ErrorCodes.CONFIG_INVALID);
    expect(r.stderr).toContain('is not the key of');
  });

  it('prints the flags that start the agent with its certificate', async () => {
    const caDir = await initCa();
    const r = await embot('ca', 'issue', 'web-host-1', '--ca', caDir, '--out', join(dir, 'out'));
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain(`--tls-cert ${join(dir, 'out', 'web-host-1.crt')}`);
    expect((await embot('ca', '--help')).stdout).toContain('issue');
  });
});
