import { createHash, timingSafeEqual } from 'node:crypto';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { z } from 'zod';
import { ConfigError, ControlError, EmbotError, ErrorCodes, EventError, describeError, type ErrorCode } from '../errors.ts';
import { isValidElementId, isValidEventType } from '../events.ts';
import { parsePolicy } from '../../images/index.ts';
import { presentedToken } from './dashboard-auth.ts';
import type { Logger } from '../logger.ts';
import {
  DEFAULT_EVENTS_LIMIT,
  DEFAULT_MIGRATION_WAIT_MS,
  MAX_BODY_BYTES,
  MAX_EVENTS_LIMIT,
  MAX_MIGRATION_WAIT_MS,
  VM_ACTIONS,
  type AgentControl,
  type ControlErrorBody,
  type MigrationInfo,
  type VmAction,
} from './control-api.ts';

export interface ControlServerOptions {
  readonly host: string;
  /** 0 picks a free port; the actual one is in the returned `url`. */
  readonly port: number;
  /** When set, every request needs `Authorization: Bearer <token>`. */
  readonly token?: string;
  readonly control: AgentControl;
  readonly logger: Logger;
  /** Served as `GET /metrics` (Prometheus text), behind the token like every route. */
  readonly metrics?: { readonly contentType: string; text(): Promise<string> };
  /** The web dashboard (`/`, `/ui/…`, live channel `/ui/live`), behind the token like every route (dashboard-routes.ts). */
  readonly dashboard?: { handle(req: IncomingMessage, res: ServerResponse): Promise<boolean> };
}

export interface ControlServer {
  /** `http://host:port` with the port actually bound. */
  readonly url: string;
  readonly port: number;
  close(): Promise<void>;
}

/** A body larger than this is not even drained: the connection is cut. */
const DRAIN_LIMIT = 16 * MAX_BODY_BYTES;

const HTTP_STATUS: Partial<Record<ErrorCode, number>> = {
  [ErrorCodes.CONTROL_BAD_REQUEST]: 400,
  [ErrorCodes.CONTROL_UNAUTHORIZED]: 401,
  [ErrorCodes.CONTROL_NOT_FOUND]: 404,
  [ErrorCodes.VM_UNKNOWN]: 404,
  [ErrorCodes.IMAGE_UNKNOWN]: 404,
  [ErrorCodes.ELEMENT_UNKNOWN]: 404,
  [ErrorCodes.POLICY_UNKNOWN]: 404,
  [ErrorCodes.PEER_UNKNOWN]: 400,
  [ErrorCodes.DESTINATIONS_INVALID]: 400,
  // The list is valid; this agent cannot run a several-destination migration (yet).
  [ErrorCodes.MULTI_DESTINATION_UNSUPPORTED]: 501,
  [ErrorCodes.VM_EXISTS]: 409,
  [ErrorCodes.VM_BAD_STATE]: 409,
  // The VM's running QEMU does not fit a target started now; a restart of the VM clears it.
  [ErrorCodes.VM_RESTART_NEEDED]: 409,
  [ErrorCodes.VM_SPEC_INVALID]: 400,
  // The server understood the request; this agent's hypervisor driver cannot do it.
  [ErrorCodes.DRIVER_UNSUPPORTED]: 501,
  [ErrorCodes.ELEMENT_EXISTS]: 409,
  [ErrorCodes.EVENT_DUPLICATE]: 409,
  // The element lives on another agent now (details.owner); this one will not take its events any more.
  [ErrorCodes.ELEMENT_MOVED]: 410,
  [ErrorCodes.CONTROL_INTERNAL]: 500,
  [ErrorCodes.AGENT_STOPPED]: 503,
  [ErrorCodes.DASHBOARD_NOT_BUILT]: 503,
  // The fleet directory (etcd) is down, or served a record that is not one: an upstream's fault, not the caller's.
  [ErrorCodes.DIRECTORY_UNAVAILABLE]: 503,
  [ErrorCodes.DIRECTORY_RECORD_INVALID]: 502,
  // Two agents configured with one name: a conflict the operator resolves (rename or stop one).
  [ErrorCodes.DIRECTORY_NAME_TAKEN]: 409,
  // A peer that shares no wire protocol version with this agent (a rolling upgrade half done).
  [ErrorCodes.PROTOCOL_UNSUPPORTED]: 502,
};

const BuildImageBody = z.object({ image: z.string().min(1).max(128), on: z.string().min(1).max(64).optional() }).strict();

const PlaceBody = z
  .object({
    vm: z.string().min(1).max(128).optional(),
    image: z.string().min(1).max(128).optional(),
    candidates: z.array(z.string().min(1).max(64)).min(1).max(10_000).optional(),
    policy: z.string().min(1).max(64).default('cheapest'),
  })
  .strict();

const CreateVmBody = z
  .object({
    name: z.string().min(1).max(128),
    memory: z.number().int().positive().optional(),
    dirtyRate: z.number().min(0).optional(),
    vcpus: z.number().int().positive().max(1024).optional(),
    udpPort: z.number().int().min(1).max(65535).optional(),
    image: z.string().min(1).max(4096).optional(),
    boot: z.string().min(1).max(4096).optional(),
  })
  .strict();

const SetVmLoadBody = z
  .object({
    load: z.number().min(0).max(1),
  })
  .strict();

const EmitEventBody = z
  .object({
    elementId: z.string(),
    type: z.string(),
    payload: z.unknown().optional(),
    ts: z.number().int().nonnegative().optional(),
    id: z.string().min(1).max(200).optional(),
  })
  .strict();

/** Body of `POST /v1/prewarms` ({ vm, to }) and `POST /v1/prewarms/cancel` ({ vm }). */
const PrewarmBody = z
  .object({
    vm: z.string().min(1).max(128),
    to: z.array(z.string().max(64)).max(64).optional(),
  })
  .strict();

const StartMigrationBody = z
  .object({
    vm: z.string().min(1).max(128),
    /** One peer name, or several (issue 13): a list is checked whole by the agent (DESTINATIONS_INVALID). */
    to: z.union([z.string().min(1).max(64), z.array(z.string().max(64)).max(64)]).optional(),
    /** Threshold time for this migration (seed 000): above it, data paths are added. */
    thresholdMs: z.number().int().positive().max(86_400_000).optional(),
    /** Several destinations (issue 13): retries of the set, then fallback hosts; the agent checks them. */
    retries: z.number().int().min(0).max(5).optional(),
    fallback: z.array(z.string().max(64)).max(64).optional(),
  })
  .strict();

/**
 * Serves the agent's control API (JSON over HTTP) until `close()`. Refuses a non-loopback host
 * unless a token is configured: the API can create and crash VMs.
 *
 * @throws ConfigError `EMBOT_ERR_CONFIG_INVALID` for a non-loopback host without token or a port in use.
 * @example
 * ```ts
 * const server = await startControlServer({ host: '127.0.0.1', port: 0, control: agent, logger });
 * await fetch(`${server.url}/v1/status`);
 * await server.close();
 * ```
 */
export async function startControlServer(options: ControlServerOptions): Promise<ControlServer> {
  const { host, port, token, control, logger } = options;
  if (!isLoopbackHost(host) && (token === undefined || token === '')) {
    throw new ConfigError(
      ErrorCodes.CONFIG_INVALID,
      `control API host ${host} is not a loopback address; the control API can create, stop and crash VMs, so it listens beyond loopback only with a token (set control.token, EMBOT_CONTROL_TOKEN or --token-file)`,
      { details: { host } },
    );
  }
  const tokenDigest = token ? digest(token) : undefined;

  const server = createServer((req, res) => {
    handle(req, res).catch((e: unknown) => {
      // handle() answers its own errors; this only catches a failure while answering.
      logger.error('control request failed while responding', { error: describeError(e) });
      if (!res.headersSent) sendError(res, 500, ErrorCodes.CONTROL_INTERNAL, 'internal error');
      else res.destroy();
    });
  });
  server.headersTimeout = 10_000;
  server.requestTimeout = 30_000;

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const started = Date.now();
    try {
      if (tokenDigest) {
        if (!authorized(req, tokenDigest)) {
          res.setHeader('WWW-Authenticate', 'Bearer realm="embot"');
          throw new ControlError(ErrorCodes.CONTROL_UNAUTHORIZED, 'missing or wrong control token (send Authorization: Bearer <token>; the CLI takes --token or EMBOT_CONTROL_TOKEN; a browser opens /ui/?token=<token> once)');
        }
      } else if (!allowedHostHeader(req.headers.host, host)) {
        // Without a token, a browser page on a rebinding domain could otherwise drive the API.
        throw badRequest(`Host header ${JSON.stringify(req.headers.host ?? '')} is not a loopback name`);
      }
      // A long-poll (migration wait) must stop waiting when its client goes away.
      const gone = new AbortController();
      res.once('close', () => gone.abort());
      if (options.metrics && (req.url === '/metrics' || req.url?.startsWith('/metrics?'))) {
        if (req.method !== 'GET') throw new ControlError(ErrorCodes.CONTROL_BAD_REQUEST, `${req.method ?? ''} is not allowed on /metrics (use GET)`, { details: { status: 405 } });
        const text = await options.metrics.text();
        res.writeHead(200, { 'Content-Type': options.metrics.contentType, 'Cache-Control': 'no-store' });
        res.end(text);
        return;
      }
      if (options.dashboard && (await options.dashboard.handle(req, res))) return;
      const { status, body } = await route(req, gone.signal);
      send(res, status, body);
    } catch (e) {
      const { status, code, message, details } = toHttpError(e);
      if (status >= 500) logger.error('control handler failed', { method: req.method, url: req.url, error: describeError(e) });
      sendError(res, status, code, message, details);
    } finally {
      logger.debug('control request', { method: req.method, url: req.url, status: res.statusCode, ms: Date.now() - started });
    }
  }

  async function route(req: IncomingMessage, gone: AbortSignal): Promise<{ status: number; body: unknown }> {
    const url = new URL(req.url ?? '/', 'http://control.invalid');
    const parts = url.pathname.split('/').filter((p) => p !== '');
    const method = req.method ?? 'GET';
    if (parts[0] !== 'v1') throw notFound(url.pathname);
    const path = parts.slice(1);

    const only = (allowed: string): void => {
      if (method !== allowed) throw new ControlError(ErrorCodes.CONTROL_BAD_REQUEST, `${method} is not allowed on ${url.pathname} (use ${allowed})`, { details: { status: 405 } });
    };

    if (path.length === 1 && path[0] === 'status') {
      only('GET');
      return ok(control.status());
    }
    if (path.length === 1 && path[0] === 'vms') {
      if (method === 'GET') return ok(control.listVms());
      only('POST');
      const body = CreateVmBody.safeParse(await readJson(req));
      if (!body.success) throw invalidFields(body.error);
      return { status: 201, body: await control.createVm(body.data) };
    }
    if (path.length === 2 && path[0] === 'vms') {
      if (!control.removeVm) throw notFound(url.pathname);
      only('DELETE');
      const force = parseFlag('force', url.searchParams.get('force'));
      await readJson(req, { allowEmpty: true }); // body unused; JSON-typed like every change (see readJson)
      return ok(await control.removeVm(decodeSegment(path[1]!), { force }));
    }
    if (path.length === 3 && path[0] === 'vms' && path[2] === 'checksum') {
      only('GET');
      return ok(await control.vmChecksum(decodeSegment(path[1]!)));
    }
    if (path.length === 3 && path[0] === 'vms' && path[2] === 'load') {
      only('POST');
      const body = SetVmLoadBody.safeParse(await readJson(req));
      if (!body.success) throw invalidFields(body.error);
      return ok(await control.setVmLoad(decodeSegment(path[1]!), body.data.load));
    }
    if (path.length === 3 && path[0] === 'vms') {
      const action = path[2]!;
      if (!(VM_ACTIONS as readonly string[]).includes(action)) throw notFound(url.pathname);
      only('POST');
      await readJson(req, { allowEmpty: true }); // body unused; still bounded and JSON-typed
      return ok(await control.vmAction(decodeSegment(path[1]!), action as VmAction));
    }
    if (path.length === 1 && path[0] === 'embots') {
      only('GET');
      return ok(control.listEmbots());
    }
    if (path.length === 1 && path[0] === 'plugins') {
      only('GET');
      return ok(control.listPlugins());
    }
    if (path.length === 2 && path[0] === 'events' && path[1] === 'dead') {
      only('GET');
      return ok(control.listDeadLetters({ limit: parseLimit(url.searchParams.get('limit')) }));
    }
    if (path.length === 1 && path[0] === 'events') {
      if (method === 'GET') return ok(control.listEvents({ limit: parseLimit(url.searchParams.get('limit')) }));
      only('POST');
      const body = EmitEventBody.safeParse(await readJson(req));
      if (!body.success) throw invalidFields(body.error);
      const input = body.data;
      if (!isValidElementId(input.elementId)) throw new EventError(ErrorCodes.EVENT_INVALID, `elementId ${JSON.stringify(input.elementId)} is not a valid element id`);
      if (!isValidEventType(input.type)) throw new EventError(ErrorCodes.EVENT_INVALID, `event type ${JSON.stringify(input.type)} is invalid (SCREAMING_CASE, e.g. VM_CRASHED)`);
      const event = await control.emitEvent({ ...input, source: 'control' });
      return { status: 201, body: event };
    }
    if (path[0] === 'images' || (path.length === 1 && path[0] === 'place')) {
      const images = control.images;
      if (!images) throw notFound(url.pathname);
      if (path.length === 1 && path[0] === 'images') {
        only('GET');
        return ok(images.report());
      }
      if (path.length === 2 && path[1] === 'builds') {
        only('POST');
        const body = BuildImageBody.safeParse(await readJson(req));
        if (!body.success) throw invalidFields(body.error);
        return { status: 202, body: images.startBuild(body.data.image, body.data.on ?? control.status().name) };
      }
      if (path.length === 3 && path[1] === 'builds') {
        only('GET');
        const job = images.getBuild(decodeSegment(path[2]!));
        if (!job) throw new ControlError(ErrorCodes.CONTROL_NOT_FOUND, `no image build ${JSON.stringify(path[2])} on this agent`);
        return ok(job);
      }
      if (path.length === 1 && path[0] === 'place') {
        only('POST');
        const body = PlaceBody.safeParse(await readJson(req));
        if (!body.success) throw invalidFields(body.error);
        const { vm, policy, candidates } = body.data;
        const image = body.data.image ?? (vm === undefined ? undefined : images.vmImage(vm));
        if (image === undefined) {
          throw new EmbotError(ErrorCodes.IMAGE_UNKNOWN, vm === undefined ? 'place needs a VM or an image' : `VM ${vm} has no image here (create it with --image, or name one with --image)`);
        }
        return ok(await images.place(image, candidates, parsePolicy(policy)));
      }
      throw notFound(url.pathname);
    }
    if (path.length === 1 && path[0] === 'migrations') {
      if (method === 'GET') return ok(control.listMigrations());
      only('POST');
      const body = StartMigrationBody.safeParse(await readJson(req));
      if (!body.success) throw invalidFields(body.error);
      const { vm, to, ...options } = body.data;
      const { id } = control.migrate(vm, to, options);
      return { status: 202, body: { id } };
    }
    if (path[0] === 'prewarms' && (path.length === 1 || (path.length === 2 && path[1] === 'cancel'))) {
      only('POST');
      const body = PrewarmBody.safeParse(await readJson(req));
      if (!body.success) throw invalidFields(body.error);
      if (!control.prewarm || !control.cancelPrewarm) throw notFound(url.pathname);
      if (path.length === 2) return ok(control.cancelPrewarm(body.data.vm));
      if (body.data.to === undefined) throw new ControlError(ErrorCodes.CONTROL_BAD_REQUEST, 'a pre-warm needs its destinations: { "vm": …, "to": ["b", "c"] }');
      return { status: 202, body: control.prewarm(body.data.vm, body.data.to) };
    }
    if (path.length === 2 && path[0] === 'migrations') {
      only('GET');
      const id = decodeSegment(path[1]!);
      const wait = parseWait(url.searchParams.get('wait'));
      const timeoutMs = parseWaitTimeout(url.searchParams.get('timeoutMs'));
      const info = migrationOrThrow(id);
      if (!wait || info.outcome !== null) return ok(info);
      await waitBounded(control.waitMigration(id), timeoutMs, gone);
      // Still running after timeoutMs: the caller sees `outcome: null` and asks again.
      return ok(migrationOrThrow(id));
    }
    throw notFound(url.pathname);
  }

  function migrationOrThrow(id: string): MigrationInfo {
    const info = control.getMigration(id);
    if (info === undefined) throw new ControlError(ErrorCodes.CONTROL_NOT_FOUND, `no migration ${JSON.stringify(id)} on this agent (see GET /v1/migrations)`, { details: { id } });
    return info;
  }

  await new Promise<void>((resolve, reject) => {
    const onError = (e: NodeJS.ErrnoException): void => {
      reject(
        e.code === 'EADDRINUSE'
          ? new ConfigError(ErrorCodes.CONFIG_INVALID, `control address ${host}:${port} is already in use (another agent running? choose another with --control ${host}:PORT)`, { cause: e })
          : new ConfigError(ErrorCodes.CONFIG_INVALID, `cannot listen on ${host}:${port}: ${e.message}`, { cause: e }),
      );
    };
    server.once('error', onError);
    server.listen(port, host, () => {
      server.off('error', onError);
      resolve();
    });
  });
  server.on('error', (e) => logger.error('control server error', { error: describeError(e) }));

  const bound = (server.address() as AddressInfo).port;
  const url = `http://${host.includes(':') ? `[${host}]` : host}:${bound}`;
  logger.debug('control API listening', { url, auth: tokenDigest ? 'token' : 'none' });
  let closing: Promise<void> | undefined;
  return {
    url,
    port: bound,
    close: () => {
      closing ??= new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      });
      return closing;
    },
  };
}

/** 127.0.0.0/8, ::1 and `localhost`. */
export function isLoopbackHost(host: string): boolean {
  const h = host.replace(/^\[|\]$/g, '').toLowerCase();
  if (h === 'localhost' || h === '::1' || h === '0:0:0:0:0:0:0:1') return true;
  const v4 = h.startsWith('::ffff:') ? h.slice(7) : h;
  return /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(v4);
}

function allowedHostHeader(header: string | undefined, listenHost: string): boolean {
  if (header === undefined) return true; // HTTP/1.0 clients; browsers always send one
  const name = header.startsWith('[') ? header.slice(0, header.indexOf(']') + 1) : header.replace(/:\d+$/, '');
  return isLoopbackHost(name) || name.toLowerCase() === listenHost.toLowerCase();
}

function digest(s: string): Buffer {
  return createHash('sha256').update(s, 'utf8').digest();
}

/** Compares digests so the comparison is constant-time whatever the token lengths. Bearer header, or the dashboard's cookie / page `?token=` (dashboard-auth.ts). */
function authorized(req: IncomingMessage, expected: Buffer): boolean {
  const given = presentedToken(req);
  if (given === undefined) return false;
  return timingSafeEqual(digest(given), expected);
}

function ok(body: unknown): { status: number; body: unknown } {
  return { status: 200, body };
}

function badRequest(message: string, details?: Record<string, unknown>): ControlError {
  return new ControlError(ErrorCodes.CONTROL_BAD_REQUEST, message, details ? { details } : undefined);
}

function notFound(path: string): ControlError {
  return new ControlError(ErrorCodes.CONTROL_NOT_FOUND, `no route ${path} (see GET /v1/status, /v1/vms, /v1/embots, /v1/plugins, /v1/events, /v1/events/dead, /v1/migrations)`);
}

function invalidFields(error: z.ZodError): ControlError {
  const issues = error.issues.map((i) => {
    const path = i.path.length === 0 ? '(body)' : i.path.map(String).join('.');
    return i.code === 'unrecognized_keys' ? `${path}: unknown field${i.keys.length > 1 ? 's' : ''} ${i.keys.join(', ')}` : `${path}: ${i.message}`;
  });
  return badRequest(`invalid request body: ${issues.join('; ')}`, { issues });
}

function decodeSegment(s: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    throw badRequest(`bad URL encoding in ${JSON.stringify(s)}`);
  }
}

function parseLimit(raw: string | null): number {
  if (raw === null) return DEFAULT_EVENTS_LIMIT;
  if (!/^\d+$/.test(raw)) throw badRequest(`limit must be a whole number between 1 and ${MAX_EVENTS_LIMIT}, got ${JSON.stringify(raw)}`);
  const n = Number(raw);
  if (n < 1 || n > MAX_EVENTS_LIMIT) throw badRequest(`limit must be between 1 and ${MAX_EVENTS_LIMIT}, got ${n}`);
  return n;
}

/** A yes/no query parameter (`?force=1`); anything but 1/0/true/false is refused, not read as no. */
function parseFlag(name: string, raw: string | null): boolean {
  if (raw === null || raw === '0' || raw === 'false') return false;
  if (raw === '' || raw === '1' || raw === 'true') return true;
  throw badRequest(`${name} must be 1 or 0, got ${JSON.stringify(raw)}`);
}

function parseWait(raw: string | null): boolean {
  if (raw === null || raw === '0' || raw === 'false') return false;
  if (raw === '' || raw === '1' || raw === 'true') return true;
  throw badRequest(`wait must be 1 or 0, got ${JSON.stringify(raw)}`);
}

function parseWaitTimeout(raw: string | null): number {
  if (raw === null) return DEFAULT_MIGRATION_WAIT_MS;
  const n = Number(raw);
  if (!/^\d+$/.test(raw) || n < 1 || n > MAX_MIGRATION_WAIT_MS) {
    throw badRequest(`timeoutMs must be a whole number of milliseconds between 1 and ${MAX_MIGRATION_WAIT_MS}, got ${JSON.stringify(raw)}`);
  }
  return n;
}

/** Waits for `done`, at most `ms`, and no longer than the client stays connected. */
async function waitBounded(done: Promise<unknown>, ms: number, gone: AbortSignal): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  let onGone: (() => void) | undefined;
  const bound = new Promise<void>((resolve) => {
    if (gone.aborted) return resolve();
    timer = setTimeout(resolve, ms);
    onGone = resolve;
    gone.addEventListener('abort', onGone, { once: true });
  });
  try {
    await Promise.race([done, bound]);
  } finally {
    clearTimeout(timer);
    if (onGone) gone.removeEventListener('abort', onGone);
  }
}

/**
 * Reads the body up to MAX_BODY_BYTES. An oversize body is drained (so the client gets to read
 * our answer instead of a reset) unless it is absurdly large, in which case the socket is cut.
 */
function readBody(req: IncomingMessage): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    let overflow = false;
    req.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size > DRAIN_LIMIT) {
        req.destroy();
        reject(badRequest(`request body exceeds ${MAX_BODY_BYTES} bytes`));
        return;
      }
      if (size > MAX_BODY_BYTES) {
        overflow = true;
        chunks.length = 0;
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => {
      if (overflow) reject(badRequest(`request body is ${size} bytes; the limit is ${MAX_BODY_BYTES} bytes`, { limit: MAX_BODY_BYTES }));
      else resolve(Buffer.concat(chunks));
    });
    req.on('error', (e) => reject(badRequest(`request body could not be read: ${e.message}`)));
  });
}

async function readJson(req: IncomingMessage, options: { readonly allowEmpty?: boolean } = {}): Promise<unknown> {
  const type = (req.headers['content-type'] ?? '').split(';')[0]!.trim().toLowerCase();
  // Every POST, even a bodiless action, must say JSON: browsers cannot send that cross-site
  // without a CORS preflight (which we never grant), so a web page cannot crash VMs.
  if (type !== 'application/json') {
    await readBody(req).catch(() => undefined);
    throw badRequest(`Content-Type must be application/json, got ${JSON.stringify(type || '(none)')}`);
  }
  const raw = await readBody(req);
  if (raw.length === 0) {
    if (options.allowEmpty) return undefined;
    throw badRequest('request body is empty; expected a JSON object');
  }
  try {
    return JSON.parse(raw.toString('utf8')) as unknown;
  } catch (e) {
    throw badRequest(`request body is not valid JSON: ${describeError(e)}`);
  }
}

function toHttpError(e: unknown): { status: number; code: string; message: string; details?: Readonly<Record<string, unknown>> } {
  if (e instanceof EmbotError) {
    const forced = e.details?.['status'];
    const status = typeof forced === 'number' ? forced : (HTTP_STATUS[e.code] ?? 400);
    const details = e.details ? Object.fromEntries(Object.entries(e.details).filter(([k]) => k !== 'status')) : undefined;
    return { status, code: e.code, message: e.message, ...(details && Object.keys(details).length > 0 ? { details } : {}) };
  }
  return { status: 500, code: ErrorCodes.CONTROL_INTERNAL, message: `internal error: ${describeError(e)}` };
}

function send(res: ServerResponse, status: number, body: unknown): void {
  let text: string;
  try {
    text = JSON.stringify(body) ?? 'null';
  } catch (e) {
    sendError(res, 500, ErrorCodes.CONTROL_INTERNAL, `response could not be encoded: ${describeError(e)}`);
    return;
  }
  res.writeHead(status, { 'Content-Type': 'application/json; charset=utf-8', 'Cache-Control': 'no-store', 'Content-Length': Buffer.byteLength(text) });
  res.end(text);
}

function sendError(res: ServerResponse, status: number, code: string, message: string, details?: Readonly<Record<string, unknown>>): void {
  const body: ControlErrorBody = { error: details ? { code, message, details } : { code, message } };
  if (res.headersSent) {
    res.destroy();
    return;
  }
  send(res, status, body);
}
