import { chmodSync, copyFileSync, mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { EffectorError, ErrorCodes, isEmbotError } from '../../../core/errors.ts';
import type { QmpClient } from './qmp-client.ts';

/** The agent's `peer.tls` files (PEM): the cluster CA, its own certificate and key. */
export interface QemuTlsFiles {
  readonly ca: string;
  readonly cert: string;
  readonly key: string;
}

export type TlsEndpoint = 'server' | 'client';

/** QOM ids of the objects the driver adds to a QEMU for its migration stream. */
export const TLS_CREDS_ID = 'embot-migration-tls';
export const TLS_AUTHZ_ID = 'embot-migration-authz';

/**
 * Copies the agent's certificate files into `<stateDir>/tls-<endpoint>/` under the names QEMU's
 * `tls-creds-x509` reads (ca-cert.pem, server-|client-cert.pem, server-|client-key.pem). A copy,
 * not a symlink: QEMU reads the dir when the object is added, and a dir of 0700 with the key at
 * 0600 keeps the key as private as the agent's own. Unreadable files are VM_IMAGE-like config
 * faults of the agent, reported as CONFIG_INVALID with the file.
 */
export function writeTlsCredsDir(stateDir: string, endpoint: TlsEndpoint, files: QemuTlsFiles): string {
  const dir = join(stateDir, `tls-${endpoint}`);
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  chmodSync(dir, 0o700);
  const copies: readonly [string, string, number][] = [
    [files.ca, 'ca-cert.pem', 0o600],
    [files.cert, `${endpoint}-cert.pem`, 0o600],
    [files.key, `${endpoint}-key.pem`, 0o600],
  ];
  for (const [from, to, mode] of copies) {
    const target = join(dir, to);
    try {
      copyFileSync(from, target);
      chmodSync(target, mode);
    } catch (e) {
      throw new EffectorError(ErrorCodes.CONFIG_INVALID, `cannot read the TLS file ${from} for QEMU's migration stream: ${(e as Error).message}`, {
        details: { file: from },
        cause: e,
      });
    }
  }
  return dir;
}

/**
 * The `authz-list` rules that admit a client certificate whose CN is `name`, wherever the CN sits
 * in the distinguished name QEMU compares (GnuTLS prints RFC 4514, last RDN first: `O=embot,CN=a`
 * for a certificate of `embot ca issue`). Agent names are `[a-z0-9-]`, so no glob character.
 */
export function clientNameRules(name: string): readonly { readonly match: string; readonly policy: 'allow'; readonly format: 'exact' | 'glob' }[] {
  return [
    { match: `CN=${name}`, policy: 'allow', format: 'exact' },
    { match: `CN=${name},*`, policy: 'allow', format: 'glob' },
    { match: `*,CN=${name}`, policy: 'allow', format: 'glob' },
    { match: `*,CN=${name},*`, policy: 'allow', format: 'glob' },
  ];
}

/**
 * Adds the `tls-creds-x509` object (and for a server with `clientName`, an `authz-list` object
 * that admits only that agent's certificate) to a QEMU, replacing earlier ones: certificates may have been
 * renewed since the last migration. Returns the `migrate-set-parameters` that use them.
 */
export async function addTlsObjects(
  qmp: QmpClient,
  o: { readonly dir: string; readonly endpoint: TlsEndpoint; readonly hostname?: string; readonly clientName?: string },
): Promise<Readonly<Record<string, string>>> {
  // A parameter still naming an old object keeps it in use; reset before replacing.
  await qmp.execute('migrate-set-parameters', { 'tls-creds': '', 'tls-authz': '' }).catch(() => {});
  for (const id of [TLS_CREDS_ID, TLS_AUTHZ_ID]) {
    await qmp.executeRaw('object-del', { id }).catch((e: unknown) => {
      // Not there yet is the usual case.
      if (!isEmbotError(e, ErrorCodes.QMP_COMMAND)) throw e;
    });
  }
  await qmp.executeRaw('object-add', { 'qom-type': 'tls-creds-x509', id: TLS_CREDS_ID, dir: o.dir, endpoint: o.endpoint, 'verify-peer': true });
  if (o.clientName !== undefined) {
    await qmp.executeRaw('object-add', { 'qom-type': 'authz-list', id: TLS_AUTHZ_ID, policy: 'deny', rules: clientNameRules(o.clientName) });
  }
  return {
    'tls-creds': TLS_CREDS_ID,
    ...(o.hostname === undefined ? {} : { 'tls-hostname': o.hostname }),
    ...(o.clientName === undefined ? {} : { 'tls-authz': TLS_AUTHZ_ID }),
  };
}
