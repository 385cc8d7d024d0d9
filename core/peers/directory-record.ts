/**
 * The record an agent keeps in etcd under `<prefix>/agents/<name>` while it runs, and the check
 * every record read from etcd goes through: etcd is shared, so anything may be written there.
 */
import { peerUrlIssue } from '../config/peer-transport.ts';
import { describeError } from '../errors.ts';
import { isValidAgentName } from '../wire/frame-validate.ts';
import { parsePeerUrl } from '../wire/peers.ts';

export interface DirectoryRecord {
  readonly name: string;
  /** The agent's peer URL (ws:// or wss://), normalized. */
  readonly url: string;
  /** embot version of the agent. */
  readonly version: string;
  /** ms since epoch. */
  readonly startedAt: number;
}

export type RecordCheck = { readonly ok: true; readonly record: DirectoryRecord } | { readonly ok: false; readonly name: string | undefined; readonly reason: string };

/** `<prefix>/agents/`: the folder of agent records, a key prefix in etcd. */
export function agentsPrefix(prefix: string): string {
  return `${prefix.replace(/\/+$/, '')}/agents/`;
}

/** The key of agent `name`'s record. */
export function recordKey(prefix: string, name: string): string {
  return `${agentsPrefix(prefix)}${name}`;
}

export function encodeRecord(record: DirectoryRecord): string {
  return JSON.stringify({ name: record.name, url: record.url, version: record.version, startedAt: record.startedAt });
}

/**
 * Checks one record read from etcd: its key names an agent, its value is JSON with `name` (the
 * key's name), `url` (ws:// or wss://), `version` (string) and `startedAt` (a time). With
 * `transport`, the URL must also be one this agent may dial (config/peer-transport.ts: wss:// with
 * TLS, else ws:// on loopback), as a URL in config must: etcd must not be a way around that rule.
 *
 * @example
 * ```ts
 * checkRecord('/embot', '/embot/agents/b', '{"name":"b","url":"ws://127.0.0.1:7402","version":"0.1.0","startedAt":1}');
 * // { ok: true, record: { name: 'b', url: 'ws://127.0.0.1:7402/', … } }
 * ```
 */
export function checkRecord(prefix: string, key: string, value: string, transport?: { readonly tls: boolean }): RecordCheck {
  const folder = agentsPrefix(prefix);
  if (!key.startsWith(folder)) return { ok: false, name: undefined, reason: `key ${JSON.stringify(key)} is not under ${folder}` };
  const name = key.slice(folder.length);
  if (!isValidAgentName(name)) return { ok: false, name: undefined, reason: `key ${JSON.stringify(key)} does not end in an agent name` };
  const bad = (reason: string): RecordCheck => ({ ok: false, name, reason });
  let parsed: unknown;
  try {
    parsed = JSON.parse(value);
  } catch (e) {
    return bad(`value is not JSON (${describeError(e)})`);
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) return bad('value is not a JSON object');
  const r = parsed as Record<string, unknown>;
  if (typeof r['name'] !== 'string') return bad('name is missing or not a string');
  if (r['name'] !== name) return bad(`record name ${JSON.stringify(r['name'])} is not the key's name ${JSON.stringify(name)}`);
  if (typeof r['url'] !== 'string') return bad('url is missing or not a string');
  if (typeof r['version'] !== 'string') return bad('version is missing or not a string');
  if (typeof r['startedAt'] !== 'number' || !Number.isFinite(r['startedAt']) || r['startedAt'] < 0) return bad('startedAt is missing or not a time (ms since epoch)');
  let url: string;
  try {
    url = parsePeerUrl(name, r['url']);
  } catch (e) {
    return bad(describeError(e));
  }
  const refused = transport === undefined ? undefined : peerUrlIssue(transport.tls, url);
  if (refused !== undefined) return bad(refused);
  return { ok: true, record: { name, url, version: r['version'], startedAt: r['startedAt'] } };
}
