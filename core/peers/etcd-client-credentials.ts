/**
 * What an agent shows etcd besides its requests: TLS files (the CA that signed etcd's certificate,
 * and optionally a client certificate) and a user/password, read and checked once at start so a
 * bad file is a config error at the agent's start, not a gRPC failure retried in the background.
 */
import { createPrivateKey, X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { ConfigError, describeError, ErrorCodes } from '../errors.ts';

export interface EtcdTlsFiles {
  readonly ca: string;
  readonly cert?: string;
  readonly key?: string;
}

export interface EtcdAuthConfig {
  readonly username: string;
  readonly passwordFile: string;
}

/** The shape etcd3's `Etcd3` options take. */
export interface EtcdClientCredentials {
  readonly credentials?: { readonly rootCertificate: Buffer; readonly privateKey?: Buffer; readonly certChain?: Buffer };
  readonly auth?: { readonly username: string; readonly password: string };
}

/**
 * @throws ConfigError `EMBOT_ERR_CONFIG_NOT_FOUND` for a file that cannot be read,
 *   `EMBOT_ERR_CONFIG_INVALID` for one that is not PEM of the right kind, an empty password, or a
 *   client certificate and key that do not belong together.
 *
 * @example
 * ```ts
 * const c = loadEtcdCredentials({ ca: 'tls/ca.crt', cert: 'tls/a.crt', key: 'tls/a.key' }, { username: 'embot', passwordFile: 'etcd.password' });
 * new Etcd3({ hosts, ...c });
 * ```
 */
export function loadEtcdCredentials(tls: EtcdTlsFiles | undefined, auth: EtcdAuthConfig | undefined): EtcdClientCredentials {
  const out: { credentials?: EtcdClientCredentials['credentials']; auth?: EtcdClientCredentials['auth'] } = {};
  if (tls !== undefined) {
    const rootCertificate = read(tls.ca, 'directory.tls.ca');
    certificate(rootCertificate, tls.ca, 'directory.tls.ca');
    if (tls.cert !== undefined && tls.key !== undefined) {
      const certChain = read(tls.cert, 'directory.tls.cert');
      const privateKey = read(tls.key, 'directory.tls.key');
      const cert = certificate(certChain, tls.cert, 'directory.tls.cert');
      let key;
      try {
        key = createPrivateKey(privateKey);
      } catch (e) {
        throw invalid(`directory.tls.key ${tls.key} is not a PEM private key: ${describeError(e)}`, tls.key, e);
      }
      if (!cert.checkPrivateKey(key)) throw invalid(`directory.tls.key ${tls.key} is not the key of directory.tls.cert ${tls.cert}`, tls.key);
      out.credentials = { rootCertificate, certChain, privateKey };
    } else out.credentials = { rootCertificate };
  }
  if (auth !== undefined) {
    // A trailing newline is the editor's, not the password's.
    const password = read(auth.passwordFile, 'directory.auth.passwordFile').toString('utf8').replace(/\r?\n$/, '');
    if (password === '') throw invalid(`directory.auth.passwordFile ${auth.passwordFile} is empty`, auth.passwordFile);
    out.auth = { username: auth.username, password };
  }
  return out;
}

function read(file: string, what: string): Buffer {
  try {
    return readFileSync(file);
  } catch (e) {
    throw new ConfigError(ErrorCodes.CONFIG_NOT_FOUND, `cannot read ${what} ${file}: ${describeError(e)}`, { cause: e, details: { file } });
  }
}

function certificate(pem: Buffer, file: string, what: string): X509Certificate {
  try {
    return new X509Certificate(pem);
  } catch (e) {
    throw invalid(`${what} ${file} is not a PEM certificate: ${describeError(e)}`, file, e);
  }
}

function invalid(message: string, file: string, cause?: unknown): ConfigError {
  return new ConfigError(ErrorCodes.CONFIG_INVALID, message, { details: { file }, ...(cause === undefined ? {} : { cause }) });
}
