/** The directory the config asks for (`directory.kind`), so the agent wires one object whatever it is. */
import { join } from 'node:path';
import type { Logger } from '../logger.ts';
import { parsePeers } from '../wire/peers.ts';
import { loadEtcdCredentials, type EtcdAuthConfig, type EtcdTlsFiles } from './etcd-client-credentials.ts';
import { EtcdPeerDirectory } from './etcd-peer-directory.ts';
import type { PeerDirectory } from './peer-directory.ts';
import { StaticPeerDirectory } from './static-peer-directory.ts';

/** In the data dir: the id of the etcd lease this agent's record was last written on (how a restart knows its own record). */
const LEASE_FILE = 'directory-lease';

export interface PeerDirectoryConfig {
  readonly name: string;
  readonly dataDir: string;
  readonly peer: { readonly peers: Readonly<Record<string, string>>; readonly tls?: unknown };
  readonly directory: {
    readonly kind: 'static' | 'etcd';
    readonly endpoints: readonly string[];
    readonly prefix: string;
    readonly ttlSeconds: number;
    readonly tls?: EtcdTlsFiles | undefined;
    readonly auth?: EtcdAuthConfig | undefined;
  };
}

/**
 * @throws ConfigError `EMBOT_ERR_CONFIG_INVALID` for a bad `peer.peers` (as before the directory),
 *   and for etcd TLS or password files that cannot be read or used (`EMBOT_ERR_CONFIG_NOT_FOUND` /
 *   `EMBOT_ERR_CONFIG_INVALID`).
 */
export function createPeerDirectory(config: PeerDirectoryConfig, self: { readonly version: string; readonly startedAt: number }, log: Logger): PeerDirectory {
  const staticPeers = parsePeers(config.peer.peers);
  if (config.directory.kind === 'static') return new StaticPeerDirectory(staticPeers);
  const d = config.directory;
  return new EtcdPeerDirectory({
    self: config.name,
    endpoints: d.endpoints,
    prefix: d.prefix,
    ttlSeconds: d.ttlSeconds,
    tls: config.peer.tls !== undefined,
    staticPeers,
    version: self.version,
    startedAt: self.startedAt,
    log,
    leaseFile: join(config.dataDir, LEASE_FILE),
    ...loadEtcdCredentials(d.tls, d.auth),
  });
}
