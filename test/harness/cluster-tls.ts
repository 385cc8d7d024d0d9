import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { CA_CERT_FILE, CA_KEY_FILE, createClusterCa, issueAgentCertificate, type PemPair } from '../../core/wire/cluster-ca.ts';
import type { PeerTlsFiles } from '../../core/wire/peer-tls.ts';

/** A cluster CA written into a folder, and the agent certificates it issued there. */
export interface TlsFixture {
  readonly dir: string;
  readonly ca: PemPair;
  /** `peer.tls` of an agent issued by {@link TlsFixture.issue}. */
  files(name: string): PeerTlsFiles;
  /** Issues `name`'s certificate (CN/SAN `name`, IP 127.0.0.1) into the folder; `as` names the files differently (a stolen or misfiled cert). */
  issue(name: string, options?: { readonly as?: string; readonly days?: number; readonly now?: Date }): Promise<PeerTlsFiles>;
}

/**
 * Makes a cluster CA in `dir` (created; the caller deletes it) the way `embot ca init` does, for
 * tests and benches that need TLS peers without going through the CLI.
 */
export async function makeTlsFixture(dir: string, names: readonly string[] = []): Promise<TlsFixture> {
  mkdirSync(dir, { recursive: true });
  const ca = await createClusterCa();
  writeFileSync(join(dir, CA_KEY_FILE), ca.keyPem, { mode: 0o600 });
  writeFileSync(join(dir, CA_CERT_FILE), ca.certPem);
  const files = (name: string): PeerTlsFiles => ({ ca: join(dir, CA_CERT_FILE), cert: join(dir, `${name}.crt`), key: join(dir, `${name}.key`) });
  const fixture: TlsFixture = {
    dir,
    ca,
    files,
    issue: async (name, options = {}) => {
      const pair = await issueAgentCertificate(ca, { name, ips: ['127.0.0.1'], ...(options.days ? { days: options.days } : {}), ...(options.now ? { now: options.now } : {}) });
      const f = files(options.as ?? name);
      writeFileSync(f.key, pair.keyPem, { mode: 0o600 });
      writeFileSync(f.cert, pair.certPem);
      return f;
    },
  };
  for (const n of names) await fixture.issue(n);
  return fixture;
}
