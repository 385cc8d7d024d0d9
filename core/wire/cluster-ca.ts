/**
 * The cluster CA: a self-signed CA certificate and key, and the agent certificates it issues for
 * mutual TLS between agents (peer-tls.ts). Node's crypto verifies X.509 but cannot build it;
 * @peculiar/x509 builds it over Node's webcrypto, so keys (ECDSA P-256) are made and used natively.
 *
 * Not exported from the wire index: only `embot ca` and tests load it (and its reflect polyfill).
 */
import 'reflect-metadata';
import * as x509 from '@peculiar/x509';
import { X509Certificate, createPrivateKey, randomBytes, webcrypto, type KeyObject } from 'node:crypto';
import { isIP } from 'node:net';
import { ConfigError, ErrorCodes, describeError } from '../errors.ts';

x509.cryptoProvider.set(webcrypto);

/** File names in a CA folder (`embot ca init --out DIR`). */
export const CA_KEY_FILE = 'ca.key';
export const CA_CERT_FILE = 'ca.crt';

export const DEFAULT_CA_DAYS = 3650;
export const DEFAULT_AGENT_CERT_DAYS = 365;

const ALGORITHM = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' } as const;
const DAY_MS = 24 * 60 * 60 * 1000;
/** Certificates start a little in the past, so a peer whose clock is slightly behind accepts them. */
const BACKDATE_MS = 5 * 60 * 1000;

/** A key and its certificate, PEM-encoded. */
export interface PemPair {
  readonly keyPem: string;
  readonly certPem: string;
}

export interface CreateCaOptions {
  /** Subject CN; default `embot cluster CA`. */
  readonly commonName?: string;
  readonly days?: number;
  readonly now?: Date;
}

export interface IssueOptions {
  /** The agent name: the certificate's CN and a DNS subjectAltName. */
  readonly name: string;
  /** Extra IP subjectAltNames (where the agent is reached), for tools that check hosts. */
  readonly ips?: readonly string[];
  /** Extra DNS subjectAltNames. */
  readonly dns?: readonly string[];
  readonly days?: number;
  readonly now?: Date;
}

/** Agent names as the config accepts them; they are DNS labels too, so they fit a DNS subjectAltName. */
const AGENT_NAME = /^[a-z0-9][a-z0-9-]{0,62}$/;
const DNS_NAME = /^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/;

function usage(message: string, details: Record<string, unknown> = {}): ConfigError {
  return new ConfigError(ErrorCodes.CLI_USAGE, message, { details });
}

function checkDays(days: number): void {
  if (!Number.isInteger(days) || days < 1 || days > 36500) throw usage(`--days ${days} must be a whole number of days from 1 to 36500`, { days });
}

/** A positive serial of 16 random bytes (RFC 5280 §4.1.2.2: at most 20, unique per CA). */
function serialNumber(): string {
  const b = randomBytes(16);
  b[0] = b[0]! & 0x7f;
  return b.toString('hex');
}

function pkcs8Pem(der: ArrayBuffer): string {
  return createPrivateKey({ key: Buffer.from(der), format: 'der', type: 'pkcs8' }).export({ format: 'pem', type: 'pkcs8' }).toString();
}

/**
 * Creates a cluster CA: an ECDSA P-256 key and a self-signed CA certificate that may sign agent
 * certificates only (path length 0).
 *
 * @example
 * ```ts
 * const ca = await createClusterCa({ days: 3650 });
 * writeFileSync('tls/ca.key', ca.keyPem, { mode: 0o600 });
 * ```
 */
export async function createClusterCa(options: CreateCaOptions = {}): Promise<PemPair> {
  const days = options.days ?? DEFAULT_CA_DAYS;
  checkDays(days);
  const now = options.now ?? new Date();
  const keys = await webcrypto.subtle.generateKey(ALGORITHM, true, ['sign', 'verify']);
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: serialNumber(),
    name: [{ CN: [options.commonName ?? 'embot cluster CA'] }, { O: ['embot'] }],
    notBefore: new Date(now.getTime() - BACKDATE_MS),
    notAfter: new Date(now.getTime() + days * DAY_MS),
    signingAlgorithm: ALGORITHM,
    keys: keys,
    extensions: [
      new x509.BasicConstraintsExtension(true, 0, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ],
  });
  return { keyPem: pkcs8Pem(await webcrypto.subtle.exportKey('pkcs8', keys.privateKey)), certPem: cert.toString('pem') };
}

/**
 * Checks that `ca` is a CA certificate with its key, usable to issue certificates now.
 *
 * @throws ConfigError `EMBOT_ERR_CONFIG_INVALID` naming what is wrong.
 */
export function checkClusterCa(ca: PemPair, where: string): { readonly certificate: X509Certificate; readonly key: KeyObject } {
  let certificate: X509Certificate;
  let key: KeyObject;
  try {
    certificate = new X509Certificate(ca.certPem);
    key = createPrivateKey(ca.keyPem);
  } catch (e) {
    throw new ConfigError(ErrorCodes.CONFIG_INVALID, `${where} does not hold a PEM CA certificate and key: ${describeError(e)}`, { cause: e });
  }
  if (!certificate.ca) throw new ConfigError(ErrorCodes.CONFIG_INVALID, `${where}: ${CA_CERT_FILE} is not a CA certificate`);
  if (!certificate.checkPrivateKey(key)) throw new ConfigError(ErrorCodes.CONFIG_INVALID, `${where}: ${CA_KEY_FILE} is not the key of ${CA_CERT_FILE}`);
  if (key.asymmetricKeyType !== 'ec' || key.asymmetricKeyDetails?.namedCurve !== 'prime256v1') {
    throw new ConfigError(ErrorCodes.CONFIG_INVALID, `${where}: the CA key must be ECDSA P-256 (as \`embot ca init\` makes it)`);
  }
  if (new Date(certificate.validTo) <= new Date()) throw new ConfigError(ErrorCodes.CONFIG_INVALID, `${where}: the CA certificate expired on ${certificate.validTo}`);
  return { certificate, key };
}

/**
 * Issues an agent certificate signed by the cluster CA: CN and a DNS subjectAltName equal to the
 * agent name (what peers check), plus the given IP/DNS names; usable as TLS server and client.
 * It never outlives the CA.
 *
 * @throws ConfigError `EMBOT_ERR_CLI_USAGE` for a bad name, IP, DNS name or validity,
 *   `EMBOT_ERR_CONFIG_INVALID` for an unusable CA.
 *
 * @example
 * ```ts
 * const a = await issueAgentCertificate(ca, { name: 'a', ips: ['127.0.0.1'] });
 * ```
 */
export async function issueAgentCertificate(ca: PemPair, options: IssueOptions): Promise<PemPair> {
  if (!AGENT_NAME.test(options.name)) {
    throw usage(`agent name ${JSON.stringify(options.name)} must be lower-case letters, digits and dashes, starting with a letter or digit, at most 63 characters`, {
      name: options.name,
    });
  }
  for (const ip of options.ips ?? []) if (isIP(ip) === 0) throw usage(`--ip ${JSON.stringify(ip)} is not an IPv4 or IPv6 address`, { ip });
  for (const dns of options.dns ?? []) if (!DNS_NAME.test(dns)) throw usage(`--dns ${JSON.stringify(dns)} is not a DNS name (no wildcards)`, { dns });
  const days = options.days ?? DEFAULT_AGENT_CERT_DAYS;
  checkDays(days);
  const { certificate: caCert, key: caKey } = checkClusterCa(ca, 'the cluster CA');
  const now = options.now ?? new Date();
  const caSigningKey = await webcrypto.subtle.importKey('pkcs8', caKey.export({ format: 'der', type: 'pkcs8' }), ALGORITHM, false, ['sign']);
  const issuer = new x509.X509Certificate(ca.certPem);
  const keys = await webcrypto.subtle.generateKey(ALGORITHM, true, ['sign', 'verify']);
  const notAfter = new Date(Math.min(now.getTime() + days * DAY_MS, new Date(caCert.validTo).getTime()));
  const dnsNames = [options.name, ...(options.dns ?? []).filter((d) => d !== options.name)];
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: serialNumber(),
    subject: [{ CN: [options.name] }, { O: ['embot'] }],
    issuer: issuer.subject,
    notBefore: new Date(now.getTime() - BACKDATE_MS),
    notAfter,
    signingAlgorithm: ALGORITHM,
    publicKey: keys.publicKey,
    signingKey: caSigningKey,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth, x509.ExtendedKeyUsage.clientAuth]),
      new x509.SubjectAlternativeNameExtension([
        ...dnsNames.map((value) => ({ type: 'dns' as const, value })),
        ...(options.ips ?? []).map((value) => ({ type: 'ip' as const, value })),
      ]),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
      await x509.AuthorityKeyIdentifierExtension.create(issuer),
    ],
  });
  return { keyPem: pkcs8Pem(await webcrypto.subtle.exportKey('pkcs8', keys.privateKey)), certPem: cert.toString('pem') };
}
