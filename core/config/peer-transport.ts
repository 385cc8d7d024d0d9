/**
 * The transport rule of the peer links: with `peer.tls` every link is wss:// (mutual TLS with the
 * cluster CA); without it links are plain ws://, which carry management state, events and VM
 * memory in clear, so they are allowed only where nothing but this host can read them: loopback.
 */
import { isIP } from 'node:net';

export interface TransportIssue {
  readonly path: readonly (string | number)[];
  readonly message: string;
}

/** The parts of the configuration the rule reads. */
export interface PeerTransportConfig {
  readonly peer: { readonly listen: string; readonly peers: Readonly<Record<string, string>>; readonly tls?: unknown };
  readonly dataplane: { readonly listen: readonly string[]; readonly paths: Readonly<Record<string, readonly { readonly name: string; readonly url: string }[]>> };
}

/** 127.0.0.0/8, ::1 (also IPv4-mapped) and `localhost`. */
export function isLoopbackHost(host: string): boolean {
  const h = host.replace(/^\[|\]$/g, '').toLowerCase();
  if (h === 'localhost' || h === '::1' || h === '0:0:0:0:0:0:0:1') return true;
  const v4 = h.startsWith('::ffff:') ? h.slice('::ffff:'.length) : h;
  return isIP(v4) === 4 && v4.startsWith('127.');
}

/** The host of `HOST:PORT`, `[v6]:PORT` or a bare `PORT` (127.0.0.1); undefined when it is none of these (reported elsewhere). */
function listenHost(spec: string): string | undefined {
  const s = spec.trim();
  if (/^\d{1,5}$/.test(s)) return '127.0.0.1';
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+)):\d{1,5}$/.exec(s);
  return m ? (m[1] ?? m[2]) : undefined;
}

function urlOf(raw: string): URL | undefined {
  try {
    return new URL(raw);
  } catch {
    return undefined;
  }
}

const NO_TLS = 'without peer.tls (--tls-ca/--tls-cert/--tls-key) peer links are plain ws:// and stay on loopback';

/**
 * What is wrong with dialling peer URL `raw` under the rule (undefined: nothing; also for a URL
 * that does not parse, reported elsewhere). Also applied to the URLs the fleet directory reads from etcd.
 */
export function peerUrlIssue(tls: boolean, raw: string): string | undefined {
  const url = urlOf(raw);
  if (url === undefined) return undefined;
  if (tls && url.protocol === 'ws:') return `${raw} must be wss:// with peer.tls (every peer link is TLS then)`;
  if (!tls && url.protocol === 'wss:') return `${raw} is wss://, which needs this agent's certificate (peer.tls)`;
  if (!tls && url.protocol === 'ws:' && !isLoopbackHost(url.hostname)) return `${raw} is not a loopback address; ${NO_TLS}`;
  return undefined;
}

/**
 * What breaks the rule, one issue per listener or URL (with its config path).
 *
 * @example
 * ```ts
 * peerTransportIssues({ peer: { listen: '0.0.0.0:7401', peers: {} }, dataplane: { listen: [], paths: {} } });
 * // [{ path: ['peer', 'listen'], message: '0.0.0.0:7401 is not a loopback address; without peer.tls …' }]
 * ```
 */
export function peerTransportIssues(config: PeerTransportConfig): TransportIssue[] {
  const tls = config.peer.tls !== undefined;
  const issues: TransportIssue[] = [];
  const listener = (path: readonly (string | number)[], spec: string): void => {
    const host = listenHost(spec);
    if (!tls && host !== undefined && !isLoopbackHost(host)) issues.push({ path, message: `${spec} is not a loopback address; ${NO_TLS}` });
  };
  const peerUrl = (path: readonly (string | number)[], raw: string): void => {
    const message = peerUrlIssue(tls, raw);
    if (message !== undefined) issues.push({ path, message });
  };
  listener(['peer', 'listen'], config.peer.listen);
  for (const [name, url] of Object.entries(config.peer.peers)) peerUrl(['peer', 'peers', name], url);
  config.dataplane.listen.forEach((spec, i) => listener(['dataplane', 'listen', i], spec));
  for (const [peer, paths] of Object.entries(config.dataplane.paths)) paths.forEach((p, i) => peerUrl(['dataplane', 'paths', peer, i, 'url'], p.url));
  return issues;
}

/** The start-up log line that says how peer links are protected. */
export function describePeerTransport(config: PeerTransportConfig): string {
  return config.peer.tls !== undefined
    ? 'peer links: wss:// with mutual TLS (cluster CA), peers must present a certificate naming them'
    : 'peer links: plain ws:// without TLS, allowed because every peer listener and peer URL is on loopback (set peer.tls to leave this host)';
}
