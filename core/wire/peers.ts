/**
 * Peer configuration as users write it: `--peer-listen HOST:PORT` and
 * `--peers b=ws://127.0.0.1:7402,c=ws://127.0.0.1:7403` (or the same as a map in the config file).
 */
import { ConfigError, ErrorCodes } from '../errors.ts';
import { isValidAgentName } from './frame-validate.ts';

export interface PeerListenAddress {
  readonly host: string;
  readonly port: number;
}

export const DEFAULT_PEER_LISTEN = '127.0.0.1:7401';

/** Peer name → WebSocket URL. */
export type PeerMap = ReadonlyMap<string, string>;

function invalid(message: string, details: Record<string, unknown>): ConfigError {
  return new ConfigError(ErrorCodes.CONFIG_INVALID, message, { details });
}

/**
 * Parses `HOST:PORT` (`[::1]:7401` for IPv6; a bare `PORT` listens on 127.0.0.1). Port 0 asks the
 * OS for a free port.
 *
 * @throws ConfigError `EMBOT_ERR_CONFIG_INVALID`
 *
 * @example
 * ```ts
 * parsePeerListen('0.0.0.0:7401'); // { host: '0.0.0.0', port: 7401 }
 * ```
 */
export function parsePeerListen(spec: string = DEFAULT_PEER_LISTEN): PeerListenAddress {
  const s = spec.trim();
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})$/.exec(s) ?? /^()()(\d{1,5})$/.exec(s);
  if (!m) throw invalid(`--peer-listen ${JSON.stringify(spec)} is not HOST:PORT`, { value: spec });
  const host = m[1] || m[2] || '127.0.0.1';
  const port = Number(m[3]);
  if (!Number.isInteger(port) || port > 65535) throw invalid(`--peer-listen port ${m[3]} is out of range 0..65535`, { value: spec });
  return { host, port };
}

/**
 * Normalizes one peer URL: ws:// or wss://, a host, no credentials, no fragment.
 *
 * @throws ConfigError `EMBOT_ERR_CONFIG_INVALID` saying which rule `raw` breaks.
 */
export function parsePeerUrl(name: string, raw: string): string {
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw invalid(`peer ${name}: ${JSON.stringify(raw)} is not a URL`, { peer: name, value: raw });
  }
  if (url.protocol !== 'ws:' && url.protocol !== 'wss:') throw invalid(`peer ${name}: ${raw} must be a ws:// or wss:// URL`, { peer: name, value: raw });
  if (url.hostname === '') throw invalid(`peer ${name}: ${raw} has no host`, { peer: name, value: raw });
  // The cluster secret authenticates peers; credentials in a URL would leak into logs and `ps`.
  if (url.username !== '' || url.password !== '') throw invalid(`peer ${name}: the URL must not carry credentials`, { peer: name });
  if (url.hash !== '') throw invalid(`peer ${name}: ${raw} must not have a #fragment`, { peer: name, value: raw });
  return url.href;
}

/**
 * Parses the peer list into name → normalized URL. Accepts the flag form
 * `b=ws://host:port,c=ws://host:port` or a map from a config file. An empty string is no peers.
 *
 * @throws ConfigError `EMBOT_ERR_CONFIG_INVALID` for a missing `=`, an invalid name, a non-ws URL,
 *   credentials in the URL, or a name given twice.
 *
 * @example
 * ```ts
 * const peers = parsePeers('b=ws://127.0.0.1:7402,c=ws://127.0.0.1:7403');
 * peers.get('b'); // 'ws://127.0.0.1:7402/'
 * ```
 */
export function parsePeers(spec: string | Readonly<Record<string, string>>): PeerMap {
  const entries: [string, string][] = [];
  if (typeof spec === 'string') {
    if (spec.trim() === '') return new Map();
    for (const part of spec.split(',')) {
      const item = part.trim();
      const eq = item.indexOf('=');
      if (eq <= 0) throw invalid(`--peers entry ${JSON.stringify(item)} is not NAME=ws://HOST:PORT`, { value: item });
      entries.push([item.slice(0, eq).trim(), item.slice(eq + 1).trim()]);
    }
  } else {
    if (typeof spec !== 'object' || spec === null || Array.isArray(spec)) throw invalid('peers must be a map of name to ws:// URL', {});
    for (const [name, url] of Object.entries(spec)) {
      if (typeof url !== 'string') throw invalid(`peer ${name}: URL must be a string`, { peer: name });
      entries.push([name, url.trim()]);
    }
  }
  const peers = new Map<string, string>();
  for (const [name, raw] of entries) {
    if (!isValidAgentName(name)) throw invalid(`peer name ${JSON.stringify(name)} must be letters, digits, _ . - (at most 64)`, { peer: name });
    if (peers.has(name)) throw invalid(`peer ${name} is given twice`, { peer: name });
    peers.set(name, parsePeerUrl(name, raw));
  }
  return peers;
}

/**
 * The URL of a named peer.
 *
 * @throws ConfigError `EMBOT_ERR_PEER_UNKNOWN` when the name is not configured.
 */
export function peerUrl(peers: PeerMap, name: string): string {
  const url = peers.get(name);
  if (url === undefined) {
    const known = [...peers.keys()];
    throw new ConfigError(ErrorCodes.PEER_UNKNOWN, `unknown peer ${JSON.stringify(name)}; known peers: ${known.length ? known.join(', ') : '(none)'}`, {
      details: { peer: name, known },
    });
  }
  return url;
}
