/** The peers listed in config (`peer.peers`, `--peers`): today's behaviour behind the directory contract. */
import type { PeerMap } from '../wire/peers.ts';
import { PeerDirectoryView, type DirectoryStatus, type PeerChange, type PeerDirectory, type PeerEntry } from './peer-directory.ts';

/**
 * A fixed directory: what config says, never changes, so `change` never fires.
 *
 * @example
 * ```ts
 * const dir = new StaticPeerDirectory(parsePeers('b=ws://127.0.0.1:7402'));
 * dir.get('b'); // 'ws://127.0.0.1:7402/'
 * ```
 */
export class StaticPeerDirectory extends PeerDirectoryView implements PeerDirectory {
  readonly kind = 'static';

  constructor(peers: PeerMap) {
    super();
    for (const [name, url] of peers) this.current.set(name, url);
  }

  list(): readonly PeerEntry[] {
    return [...this.current].map(([name, url]) => ({ name, url, source: 'config' as const }));
  }

  status(): DirectoryStatus {
    return { kind: 'static', state: 'static', peers: this.list() };
  }

  override on(event: 'change', listener: (change: PeerChange) => void): this {
    return super.on(event, listener);
  }

  override off(event: 'change', listener: (change: PeerChange) => void): this {
    return super.off(event, listener);
  }

  async close(): Promise<void> {}
}
