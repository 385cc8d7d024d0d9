import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { connect } from 'node:net';
import { extname, join, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ControlError, ErrorCodes } from '../errors.ts';
import type { PeerStatusReply } from '../wire/frames.ts';
import type { Logger } from '../logger.ts';
import type { PolicyChart } from '../../embots/index.ts';
import type { AgentControl } from './control-api.ts';
import type { CancelResponse, ClusterView, DashboardSnapshot, LiveMessage, PeerStatusView, PeerView, TargetChoice } from './dashboard-api.ts';
import { TOKEN_PARAM } from './dashboard-api.ts';
import { isPagePath, tokenCookie } from './dashboard-auth.ts';
import { LiveHub, type LiveTopic } from './live-hub.ts';

/** What the dashboard needs from the agent beyond the control API. */
export interface DashboardHost {
  readonly control: AgentControl;
  policyCharts(): Readonly<Record<string, Readonly<Record<string, PolicyChart>>>>;
  /** Configured peers (name → peer URL). */
  peers(): readonly { readonly name: string; readonly url: string; readonly source: 'config' | 'etcd' }[];
  /** 0..1 */
  hostLoad(): Promise<number>;
  /** Asks a running outgoing migration to stop; false when there is none with that id here. */
  cancelMigration(id: string): boolean;
  /**
   * The placement seam: orders migration targets for `vm`, best first. Without it the UI offers
   * the configured peers, reachable first (`rankedBy: 'configured-order'`).
   */
  rankTargets?(vm: string, candidates: readonly TargetChoice[]): Promise<readonly TargetChoice[]>;
  /** Asks a configured peer for its health and load over an authenticated peer link (`PeerStatus`). */
  peerStatus?(peer: string): Promise<PeerStatusCounts>;
}

/** What a peer's `PeerStatusReply` carries that the cluster view shows: the reply less its framing. */
export type PeerStatusCounts = Omit<PeerStatusReply, 'type' | 'replyTo' | 'name'>;

/** Health problems from the counts the cluster view judges an agent by. */
function healthOf(c: { readonly quarantined: number; readonly modulesWithErrors: number; readonly deadLetters: number }): { ok: boolean; problems: string[] } {
  const problems: string[] = [];
  if (c.quarantined > 0) problems.push(`${c.quarantined} quarantined embot(s)`);
  if (c.modulesWithErrors > 0) problems.push(`${c.modulesWithErrors} module(s) with errors`);
  if (c.deadLetters > 0) problems.push(`${c.deadLetters} dead letter(s)`);
  return { ok: problems.length === 0, problems };
}

async function askStatus(host: DashboardHost, peer: string): Promise<PeerStatusView | undefined> {
  if (!host.peerStatus) return undefined;
  try {
    const r = await host.peerStatus(peer);
    return { uptimeMs: r.uptimeMs, load: r.load, vms: r.vms, embots: r.embots, health: healthOf(r) };
  } catch {
    // Reachable but not answering (not trusting us, an older agent, a timeout): shown without status.
    return undefined;
  }
}

export interface DashboardOptions {
  readonly host: DashboardHost;
  /** The control token, when one is configured (the page's `?token=` becomes this cookie). */
  readonly token?: string;
  /** Folder of the built front-end; default dashboard/dist next to the sources (or the build). */
  readonly distDir?: string;
  readonly logger: Logger;
  /** Passed to the live hub (tests and the bench shorten them). */
  readonly flushMs?: number;
  readonly heartbeatMs?: number;
}

export interface Dashboard {
  /** The agent's event sources publish here (see live-sources.ts). */
  readonly hub: LiveHub;
  /** Serves `/`, `/ui/…`; false for a path that is not the dashboard's (the control API's then). */
  handle(req: IncomingMessage, res: ServerResponse): Promise<boolean>;
  close(): void;
}

const PEER_CHECK_MS = 1000;
/** A peer's reachability is checked at most this often, however many pages ask. */
const PEER_CHECK_EVERY_MS = 5000;
const RECENT_EVENTS = 200;

const TYPES: Readonly<Record<string, string>> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.svg': 'image/svg+xml',
  '.png': 'image/png',
  '.ico': 'image/x-icon',
  '.json': 'application/json; charset=utf-8',
};

/**
 * Page, assets and data routes of the web dashboard, plus its live channel. Every header that
 * keeps data from becoming markup is set here: a strict CSP (no inline script), nosniff, no
 * framing, and no Referer (the first URL may carry the token).
 */
const SECURITY_HEADERS: Readonly<Record<string, string>> = {
  'Content-Security-Policy': "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
  'X-Content-Type-Options': 'nosniff',
  'X-Frame-Options': 'DENY',
  'Referrer-Policy': 'no-referrer',
};

/** Where `npm run build:ui` writes the bundle: dashboard/dist beside core/ (sources) or dist/core/ (build). */
export function defaultDistDir(): string {
  const here = fileURLToPath(new URL('.', import.meta.url));
  const candidates = [resolve(here, '../../dashboard/dist'), resolve(here, '../../../dashboard/dist')];
  return candidates.find((d) => existsSync(join(d, 'index.html'))) ?? candidates[0]!;
}

export function createDashboard(options: DashboardOptions): Dashboard {
  const { host, token, logger } = options;
  const control = host.control;
  const distDir = resolve(options.distDir ?? defaultDistDir());
  const peerState = new Map<string, PeerView>();
  let peerCheck: Promise<void> | undefined;
  let lastPeerCheck = 0;

  async function checkPeers(): Promise<readonly PeerView[]> {
    if (Date.now() - lastPeerCheck >= PEER_CHECK_EVERY_MS) {
      peerCheck ??= Promise.all(
        host.peers().map(async (p) => {
          const reachable = await tcpReachable(p.url, PEER_CHECK_MS);
          const status = reachable ? await askStatus(host, p.name) : undefined;
          peerState.set(p.name, { name: p.name, url: p.url, source: p.source, reachable, checkedAt: Date.now(), ...(status ? { status } : {}) });
        }),
      ).then(() => {
        lastPeerCheck = Date.now();
        peerCheck = undefined;
      });
      await peerCheck;
    }
    // A peer that moved (a new etcd record) or joined since the last check shows as it is now, not yet checked.
    return host.peers().map((p) => {
      const known = peerState.get(p.name);
      return known && known.url === p.url ? known : { name: p.name, url: p.url, source: p.source, reachable: false, checkedAt: 0 };
    });
  }

  async function cluster(): Promise<ClusterView> {
    const self = control.status();
    const health = healthOf({ quarantined: self.counts.quarantinedEmbots, modulesWithErrors: self.counts.modulesWithErrors, deadLetters: self.counts.deadLetters });
    const [load, peers] = await Promise.all([host.hostLoad().catch(() => 0), checkPeers()]);
    return { self, health, load, peers };
  }

  const hub = new LiveHub({
    state: {
      async snapshot(): Promise<DashboardSnapshot> {
        return {
          cluster: await cluster(),
          vms: control.listVms(),
          embots: control.listEmbots(),
          plugins: control.listPlugins(),
          migrations: control.listMigrations(),
          events: control.listEvents({ limit: RECENT_EVENTS }),
          charts: host.policyCharts(),
        };
      },
      async message(topic: LiveTopic): Promise<LiveMessage> {
        switch (topic) {
          case 'embots':
            return { kind: 'embots', embots: control.listEmbots() };
          case 'plugins':
            return { kind: 'plugins', plugins: control.listPlugins(), charts: host.policyCharts() };
          case 'vms':
            return { kind: 'vms', vms: control.listVms() };
          case 'cluster':
            return { kind: 'cluster', cluster: await cluster() };
        }
      },
    },
    ...(options.flushMs === undefined ? {} : { flushMs: options.flushMs }),
    ...(options.heartbeatMs === undefined ? {} : { heartbeatMs: options.heartbeatMs }),
    onError: (e) => logger.warn('dashboard live channel', { error: e instanceof Error ? e.message : String(e) }),
  });

  async function targets(vm: string): Promise<readonly TargetChoice[]> {
    const peers = await checkPeers();
    const configured = [...peers].sort((a, b) => Number(b.reachable) - Number(a.reachable)).map((p) => ({ name: p.name, reachable: p.reachable, rankedBy: 'configured-order' }));
    return host.rankTargets ? host.rankTargets(vm, configured) : configured;
  }

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<boolean> {
    const url = new URL(req.url ?? '/', 'http://control.invalid');
    const path = url.pathname;
    const method = req.method ?? 'GET';
    if (!isPagePath(path) && !path.startsWith('/ui/')) return false;

    if (isPagePath(path)) {
      onlyMethod(method, 'GET', path);
      if (token !== undefined && url.searchParams.has(TOKEN_PARAM)) {
        // The server already checked this token; the page gets it as a cookie and a clean URL
        // (no token in history, bookmarks or the address bar).
        url.searchParams.delete(TOKEN_PARAM);
        res.writeHead(303, { ...SECURITY_HEADERS, Location: `/ui/${url.search}`, 'Set-Cookie': tokenCookie(token), 'Cache-Control': 'no-store' });
        res.end();
        return true;
      }
      if (path === '/' || path === '/ui') {
        res.writeHead(308, { ...SECURITY_HEADERS, Location: `/ui/${url.search}` });
        res.end();
        return true;
      }
      await sendFile(res, 'index.html', 'no-store');
      return true;
    }
    if (path === '/ui/live') {
      onlyMethod(method, 'GET', path);
      await hub.attach(res);
      return true;
    }
    if (path === '/ui/api/snapshot') {
      onlyMethod(method, 'GET', path);
      sendJson(res, 200, await hub.snapshotNow());
      return true;
    }
    if (path === '/ui/api/targets') {
      onlyMethod(method, 'GET', path);
      const vm = url.searchParams.get('vm');
      if (vm === null || vm === '' || vm.length > 128) throw new ControlError(ErrorCodes.CONTROL_BAD_REQUEST, 'targets needs ?vm=NAME (1 to 128 characters)');
      sendJson(res, 200, await targets(vm));
      return true;
    }
    const cancel = /^\/ui\/api\/migrations\/([^/]+)\/cancel$/.exec(path);
    if (cancel) {
      onlyMethod(method, 'POST', path);
      requireJson(req);
      req.resume();
      let id: string;
      try {
        id = decodeURIComponent(cancel[1]!);
      } catch {
        throw new ControlError(ErrorCodes.CONTROL_BAD_REQUEST, `bad URL encoding in ${JSON.stringify(cancel[1])}`);
      }
      if (control.getMigration(id) === undefined) throw new ControlError(ErrorCodes.CONTROL_NOT_FOUND, `no migration ${JSON.stringify(id)} on this agent`, { details: { id } });
      const body: CancelResponse = { id, cancelled: host.cancelMigration(id) };
      sendJson(res, 200, body);
      return true;
    }
    if (path.startsWith('/ui/assets/')) {
      onlyMethod(method, 'GET', path);
      await sendFile(res, path.slice('/ui/'.length), 'public, max-age=31536000, immutable');
      return true;
    }
    throw new ControlError(ErrorCodes.CONTROL_NOT_FOUND, `no dashboard route ${path} (the page is /ui/, its live channel /ui/live)`);
  }

  async function sendFile(res: ServerResponse, rel: string, cache: string): Promise<void> {
    let decoded: string;
    try {
      decoded = decodeURIComponent(rel);
    } catch {
      throw new ControlError(ErrorCodes.CONTROL_BAD_REQUEST, `bad URL encoding in ${JSON.stringify(rel)}`);
    }
    const file = resolve(distDir, decoded);
    // Encoded `..` or a NUL must not reach a file outside the bundle.
    if (!file.startsWith(distDir + sep) || decoded.includes('\0')) throw new ControlError(ErrorCodes.CONTROL_NOT_FOUND, `no dashboard file ${JSON.stringify(rel)}`);
    let body: Buffer;
    try {
      body = await readFile(file);
    } catch {
      if (rel === 'index.html') {
        throw new ControlError(ErrorCodes.DASHBOARD_NOT_BUILT, `the dashboard is not built (no ${join(distDir, 'index.html')}); run \`npm run build:ui\` (npm install does it)`, { details: { distDir } });
      }
      throw new ControlError(ErrorCodes.CONTROL_NOT_FOUND, `no dashboard file ${JSON.stringify(rel)}`);
    }
    res.writeHead(200, { ...SECURITY_HEADERS, 'Content-Type': TYPES[extname(file)] ?? 'application/octet-stream', 'Cache-Control': cache, 'Content-Length': body.length });
    res.end(body);
  }

  return {
    hub,
    handle,
    close: () => hub.close(),
  };
}

function onlyMethod(method: string, allowed: string, path: string): void {
  if (method !== allowed && !(allowed === 'GET' && method === 'HEAD')) {
    throw new ControlError(ErrorCodes.CONTROL_BAD_REQUEST, `${method} is not allowed on ${path} (use ${allowed})`, { details: { status: 405 } });
  }
}

/** Same rule as the control API: a cross-site form cannot send JSON without a preflight we never grant. */
function requireJson(req: IncomingMessage): void {
  const type = (req.headers['content-type'] ?? '').split(';')[0]!.trim().toLowerCase();
  if (type !== 'application/json') throw new ControlError(ErrorCodes.CONTROL_BAD_REQUEST, `Content-Type must be application/json, got ${JSON.stringify(type || '(none)')}`);
}

function sendJson(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { ...SECURITY_HEADERS, 'Content-Type': 'application/json; charset=utf-8', 'Cache-Control': 'no-store', 'Content-Length': Buffer.byteLength(text) });
  res.end(text);
}

/** Whether something accepts a TCP connection at the host and port of `url` within `ms`. */
function tcpReachable(url: string, ms: number): Promise<boolean> {
  let target: URL;
  try {
    target = new URL(url);
  } catch {
    return Promise.resolve(false);
  }
  const port = Number(target.port || (target.protocol === 'wss:' ? 443 : 80));
  return new Promise((done) => {
    const socket = connect({ host: target.hostname.replace(/^\[|\]$/g, ''), port });
    const finish = (ok: boolean): void => {
      socket.destroy();
      done(ok);
    };
    socket.setTimeout(ms, () => finish(false));
    socket.once('connect', () => finish(true));
    socket.once('error', () => finish(false));
  });
}
