import { InvalidArgumentError, type Command } from 'commander';
import { chmodSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { ConfigError, ErrorCodes, describeError } from '../errors.ts';
import type { CliContext } from './context.ts';

interface InitFlags {
  readonly out: string;
  readonly days?: number;
  readonly commonName?: string;
  readonly force?: boolean;
  readonly json?: boolean;
}

interface IssueFlags {
  readonly ca: string;
  readonly out: string;
  readonly ip?: readonly string[];
  readonly dns?: readonly string[];
  readonly days?: number;
  readonly force?: boolean;
  readonly json?: boolean;
}

const collect = (value: string, previous: readonly string[] = []): string[] => [...previous, value];

function parseDays(raw: string): number {
  const n = Number(raw);
  if (!/^\d+$/.test(raw.trim()) || !Number.isSafeInteger(n) || n < 1) throw new InvalidArgumentError('expected a whole number of days, at least 1');
  return n;
}

/**
 * `embot ca init|issue`: the cluster CA and the agents' certificates for mutual TLS on peer links.
 * Local files only, no agent needed.
 */
export function registerCaCommands(program: Command, ctx: CliContext): void {
  const group = program
    .command('ca')
    .description('the cluster CA for mutual TLS between agents: create it, issue agent certificates (works on local files)')
    .addHelpText(
      'after',
      '\nTypical use: `embot ca init --out ./ca` once per cluster (keep ca.key off the agents), then for each agent\n' +
        '`embot ca issue NAME --ca ./ca --out ./tls-NAME --ip ADDRESS`, copy ./tls-NAME to that host and start it with\n' +
        '--tls-ca tls-NAME/ca.crt --tls-cert tls-NAME/NAME.crt --tls-key tls-NAME/NAME.key (or peer.tls in its config).',
    );

  group
    .command('init')
    .description('create the cluster CA: ca.key (ECDSA P-256, PKCS8 PEM, mode 0600) and ca.crt (self-signed, signs agent certificates only)')
    .requiredOption('--out <dir>', 'folder to write the CA into (created if missing)')
    .option('--days <n>', 'validity in days (default 3650)', parseDays)
    .option('--common-name <cn>', 'subject CN of the CA (default "embot cluster CA")')
    .option('--force', 'replace an existing CA (certificates it issued stop being accepted)')
    .option('--json', 'print the result as JSON')
    .action(async (opts: InitFlags) => {
      const { CA_CERT_FILE, CA_KEY_FILE, createClusterCa } = await import('../wire/cluster-ca.ts');
      const dir = resolve(opts.out);
      const keyPath = join(dir, CA_KEY_FILE);
      const certPath = join(dir, CA_CERT_FILE);
      refuseExisting([keyPath, certPath], opts.force, 'the cluster CA (every agent certificate it issued would stop being accepted)');
      const ca = await createClusterCa({ ...(opts.days !== undefined ? { days: opts.days } : {}), ...(opts.commonName !== undefined ? { commonName: opts.commonName } : {}) });
      writeFiles(dir, [
        { path: keyPath, text: ca.keyPem, secret: true },
        { path: certPath, text: ca.certPem, secret: false },
      ]);
      const { X509Certificate } = await import('node:crypto');
      const cert = new X509Certificate(ca.certPem);
      if (opts.json) ctx.json({ key: keyPath, cert: certPath, subject: cert.subject, validTo: new Date(cert.validTo).toISOString(), fingerprint256: cert.fingerprint256 });
      else {
        ctx.out(
          `wrote ${keyPath} (private: keep it off the agents; only \`embot ca issue\` needs it)\n` +
            `wrote ${certPath} (the trust anchor every agent gets as --tls-ca)\n` +
            `valid until ${new Date(cert.validTo).toISOString()}, SHA-256 ${cert.fingerprint256}`,
        );
      }
    });

  group
    .command('issue')
    .description("issue an agent's certificate signed by the cluster CA: CN and a DNS name = NAME (what peers check), plus --ip/--dns names")
    .argument('<name>', 'the agent name (as in --name / name:)')
    .requiredOption('--ca <dir>', 'folder of the cluster CA (ca.key, ca.crt from `embot ca init`)')
    .requiredOption('--out <dir>', 'folder to write NAME.key (0600), NAME.crt and a copy of ca.crt into (created if missing)')
    .option('--ip <address>', 'an IP address the agent is reached at, added as a subjectAltName; repeat for several', collect)
    .option('--dns <name>', 'a DNS name the agent is reached at, added as a subjectAltName; repeat for several', collect)
    .option('--days <n>', 'validity in days (default 365, never past the CA)', parseDays)
    .option('--force', "replace this agent's existing key and certificate")
    .option('--json', 'print the result as JSON')
    .action(async (name: string, opts: IssueFlags) => {
      const { CA_CERT_FILE, CA_KEY_FILE, issueAgentCertificate } = await import('../wire/cluster-ca.ts');
      const caDir = resolve(opts.ca);
      const caKeyPath = join(caDir, CA_KEY_FILE);
      const caCertPath = join(caDir, CA_CERT_FILE);
      const missing = [caKeyPath, caCertPath].filter((p) => !existsSync(p));
      if (missing.length > 0) {
        throw new ConfigError(ErrorCodes.CONFIG_NOT_FOUND, `no cluster CA in ${caDir}: ${missing.join(' and ')} missing; create one with \`embot ca init --out ${opts.ca}\``, {
          details: { missing },
        });
      }
      const ca = { keyPem: readText(caKeyPath), certPem: readText(caCertPath) };
      const dir = resolve(opts.out);
      const keyPath = join(dir, `${name}.key`);
      const certPath = join(dir, `${name}.crt`);
      const caCopy = join(dir, CA_CERT_FILE);
      // Name, IPs and DNS names are checked first, so a bad one is reported before anything is written.
      const pair = await issueAgentCertificate(ca, { name, ...(opts.ip ? { ips: opts.ip } : {}), ...(opts.dns ? { dns: opts.dns } : {}), ...(opts.days !== undefined ? { days: opts.days } : {}) });
      refuseExisting([keyPath, certPath], opts.force, `${name}'s key and certificate`);
      if (!opts.force && caCopy !== caCertPath && existsSync(caCopy) && readText(caCopy) !== ca.certPem) {
        throw new ConfigError(ErrorCodes.CLI_USAGE, `${caCopy} holds another CA certificate; pass --force to replace it (the agent would then trust ${caCertPath})`, { details: { existing: [caCopy] } });
      }
      writeFiles(dir, [
        { path: keyPath, text: pair.keyPem, secret: true },
        { path: certPath, text: pair.certPem, secret: false },
        ...(caCopy === caCertPath ? [] : [{ path: caCopy, text: ca.certPem, secret: false }]),
      ]);
      const { X509Certificate } = await import('node:crypto');
      const cert = new X509Certificate(pair.certPem);
      const validTo = new Date(cert.validTo).toISOString();
      if (opts.json) ctx.json({ name, key: keyPath, cert: certPath, ca: caCopy, subjectAltName: cert.subjectAltName ?? '', validTo, fingerprint256: cert.fingerprint256 });
      else {
        ctx.out(
          `wrote ${keyPath} (private, 0600) and ${certPath} (${cert.subjectAltName ?? ''}, valid until ${validTo})\n` +
            `start agent ${name} with: --tls-ca ${caCopy} --tls-cert ${certPath} --tls-key ${keyPath}\n` +
            `or in its config: peer: { tls: { ca: ${caCopy}, cert: ${certPath}, key: ${keyPath} } }`,
        );
      }
    });
}

function refuseExisting(paths: readonly string[], force: boolean | undefined, what: string): void {
  if (force) return;
  const there = paths.filter((p) => existsSync(p));
  if (there.length > 0) throw new ConfigError(ErrorCodes.CLI_USAGE, `${there.join(' and ')} already exist; pass --force to replace ${what}`, { details: { existing: there } });
}

function readText(path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch (e) {
    throw new ConfigError(ErrorCodes.CONFIG_NOT_FOUND, `cannot read ${path}: ${describeError(e)}`, { cause: e });
  }
}

function writeFiles(dir: string, files: readonly { readonly path: string; readonly text: string; readonly secret: boolean }[]): void {
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    for (const f of files) {
      writeFileSync(f.path, f.text, { mode: f.secret ? 0o600 : 0o644 });
      // writeFileSync keeps the mode of a file it overwrites (--force).
      chmodSync(f.path, f.secret ? 0o600 : 0o644);
    }
  } catch (e) {
    throw new ConfigError(ErrorCodes.CONFIG_INVALID, `cannot write into ${dir}: ${describeError(e)}`, { cause: e });
  }
}
