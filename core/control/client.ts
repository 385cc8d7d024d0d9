import { ControlError, ErrorCodes, describeError, type ErrorCode } from '../errors.ts';
import type { BuildJob, ImagesReport, PlacementReport } from '../../images/index.ts';
import {
  type MigrateOptions,
  DEFAULT_MIGRATION_WAIT_MS,
  type AgentStatus,
  type CreateVmRequest,
  type DeadLetter,
  type Destinations,
  type EmbotEvent,
  type EmbotEventInput,
  type EmittedEvent,
  type EmbotInfo,
  type MigrationInfo,
  type PluginInfo,
  type RemovedVm,
  type RemoveVmOptions,
  type SetVmLoadRequest,
  type VmChecksum,
  type StartMigrationResponse,
  type VmAction,
  type VmInfo,
} from './control-api.ts';

const KNOWN_CODES = new Set<string>(Object.values(ErrorCodes));

/** `path` with `?limit=N` when a limit is given (the server applies its default otherwise). */
const withLimit = (path: string, limit: number | undefined): string => (limit === undefined ? path : `${path}?limit=${limit}`);

/** Extra time a long-poll gets beyond the server's own bound before the client gives up. */
const WAIT_SLACK_MS = 5_000;

export interface ControlClientOptions {
  /** Per-request timeout; default 15 s. */
  readonly timeoutMs?: number;
}

/**
 * Typed client of the control API (global `fetch`). Failed requests throw `ControlError` with
 * the server's code (`EMBOT_ERR_VM_UNKNOWN`, …); `details.status` holds the HTTP status. An
 * agent that does not answer gives `EMBOT_ERR_CONTROL_UNREACHABLE`.
 *
 * @example
 * ```ts
 * const client = new ControlClient('http://127.0.0.1:7400', process.env.EMBOT_CONTROL_TOKEN);
 * const vm = await client.createVm({ name: 'web', memory: 64 << 20 });
 * await client.vmAction('web', 'start');
 * ```
 */
export class ControlClient {
  readonly baseUrl: string;
  private readonly token: string | undefined;
  private readonly timeoutMs: number;

  constructor(baseUrl: string, token?: string, options: ControlClientOptions = {}) {
    let parsed: URL;
    try {
      parsed = new URL(baseUrl);
    } catch {
      throw new ControlError(ErrorCodes.CLI_USAGE, `agent URL ${JSON.stringify(baseUrl)} is not a URL (expected e.g. http://127.0.0.1:7400)`);
    }
    if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') {
      throw new ControlError(ErrorCodes.CLI_USAGE, `agent URL ${baseUrl} must start with http:// or https://`);
    }
    this.baseUrl = baseUrl.replace(/\/+$/, '');
    this.token = token === '' ? undefined : token;
    this.timeoutMs = options.timeoutMs ?? 15_000;
  }

  status(): Promise<AgentStatus> {
    return this.request('GET', '/v1/status');
  }

  listVms(): Promise<VmInfo[]> {
    return this.request('GET', '/v1/vms');
  }

  createVm(spec: CreateVmRequest): Promise<VmInfo> {
    return this.request('POST', '/v1/vms', spec);
  }

  vmAction(name: string, action: VmAction): Promise<VmInfo> {
    return this.request('POST', `/v1/vms/${encodeURIComponent(name)}/${action}`, {});
  }

  /** Forgets a VM (`force`: a running one is killed first); see AgentControl.removeVm. */
  removeVm(name: string, options: RemoveVmOptions = {}): Promise<RemovedVm> {
    // A body, so the request says JSON like every other change (the server refuses any other type).
    return this.request('DELETE', `/v1/vms/${encodeURIComponent(name)}${options.force ? '?force=1' : ''}`, {});
  }

  vmChecksum(name: string): Promise<VmChecksum> {
    return this.request('GET', `/v1/vms/${encodeURIComponent(name)}/checksum`);
  }

  /** Sets the CPU load (0..1) the sim VM reports while running. */
  setVmLoad(name: string, load: number): Promise<VmInfo> {
    const body: SetVmLoadRequest = { load };
    return this.request('POST', `/v1/vms/${encodeURIComponent(name)}/load`, body);
  }

  listEmbots(): Promise<EmbotInfo[]> {
    return this.request('GET', '/v1/embots');
  }

  listPlugins(): Promise<PluginInfo[]> {
    return this.request('GET', '/v1/plugins');
  }

  emitEvent(input: Omit<EmbotEventInput, 'source'>): Promise<EmittedEvent> {
    return this.request('POST', '/v1/events', input);
  }

  listEvents(opts: { readonly limit?: number } = {}): Promise<EmbotEvent[]> {
    return this.request('GET', withLimit('/v1/events', opts.limit));
  }

  listDeadLetters(opts: { readonly limit?: number } = {}): Promise<DeadLetter[]> {
    return this.request('GET', withLimit('/v1/events/dead', opts.limit));
  }

  /** Starts a migration of `vm` to peer `to` (or peers); resolves with its id as soon as it is under way. */
  migrate(vm: string, to: Destinations | undefined, options: MigrateOptions = {}): Promise<StartMigrationResponse> {
    return this.request('POST', '/v1/migrations', { vm, ...(to === undefined ? {} : { to }), ...options });
  }

  /** Starts a pre-warm of `vm` to `to`; `migrate(vm)` later is its command (README "Several destinations"). */
  prewarm(vm: string, to: readonly string[]): Promise<StartMigrationResponse> {
    return this.request('POST', '/v1/prewarms', { vm, to });
  }

  /** Cancels the pre-warm of `vm`: every destination discards, the VM runs on. */
  cancelPrewarm(vm: string): Promise<StartMigrationResponse> {
    return this.request('POST', '/v1/prewarms/cancel', { vm });
  }

  listMigrations(): Promise<MigrationInfo[]> {
    return this.request('GET', '/v1/migrations');
  }

  /** @throws ControlError `EMBOT_ERR_CONTROL_NOT_FOUND` (status 404) for an unknown id. */
  getMigration(id: string): Promise<MigrationInfo> {
    return this.request('GET', `/v1/migrations/${encodeURIComponent(id)}`);
  }

  /**
   * Long-polls until migration `id` has ended or `timeoutMs` (default 10 min) passed; check
   * `outcome`: `null` means it is still running and the caller may ask again.
   */
  waitMigration(id: string, opts: { readonly timeoutMs?: number } = {}): Promise<MigrationInfo> {
    const timeoutMs = opts.timeoutMs ?? DEFAULT_MIGRATION_WAIT_MS;
    return this.request('GET', `/v1/migrations/${encodeURIComponent(id)}?wait=1&timeoutMs=${timeoutMs}`, undefined, timeoutMs + WAIT_SLACK_MS);
  }

  /** The agent's images (and, on the group's indexer, the group's). */
  images(): Promise<ImagesReport> {
    return this.request('GET', '/v1/images');
  }

  /** Starts building `image` at `on` (default: this agent); poll with getImageBuild. */
  startImageBuild(image: string, on?: string): Promise<{ id: string }> {
    return this.request('POST', '/v1/images/builds', on === undefined ? { image } : { image, on });
  }

  getImageBuild(id: string): Promise<BuildJob> {
    return this.request('GET', `/v1/images/builds/${encodeURIComponent(id)}`);
  }

  /** Ranks candidate hosts for a VM (or an image) by the network cost of building its image there. */
  place(request: { readonly vm?: string; readonly image?: string; readonly candidates?: readonly string[]; readonly policy?: string }): Promise<PlacementReport> {
    return this.request('POST', '/v1/place', request);
  }

  private async request<T>(method: 'GET' | 'POST' | 'DELETE', path: string, body?: unknown, timeoutMs = this.timeoutMs): Promise<T> {
    const headers: Record<string, string> = { Accept: 'application/json' };
    if (this.token !== undefined) headers['Authorization'] = `Bearer ${this.token}`;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const send = (): Promise<Response> =>
      fetch(this.baseUrl + path, {
        method,
        headers,
        ...(body === undefined ? {} : { body: JSON.stringify(body) }),
        signal: AbortSignal.timeout(timeoutMs),
      });
    let res: Response;
    try {
      res = await send().catch((cause: unknown) => {
        // fetch reuses a kept-alive connection, which the agent may close at the moment a request
        // goes out on it (its idle timeout ran out while its event loop was busy): the request never
        // reached it. A GET is safe to send again, once; anything else may have been acted on.
        if (method === 'GET' && droppedConnection(cause)) return send();
        throw cause;
      });
    } catch (cause) {
      throw this.unreachable(cause);
    }
    let text: string;
    try {
      text = await res.text();
    } catch (cause) {
      throw this.unreachable(cause);
    }
    let parsed: unknown;
    try {
      parsed = text === '' ? undefined : JSON.parse(text);
    } catch {
      throw new ControlError(ErrorCodes.CONTROL_BAD_REQUEST, `${this.baseUrl} answered ${res.status} with a body that is not JSON; is it an embot agent?`, {
        details: { status: res.status },
      });
    }
    if (res.ok) return parsed as T;
    const err = (parsed as { error?: { code?: unknown; message?: unknown; details?: unknown } } | undefined)?.error;
    const code: ErrorCode = typeof err?.code === 'string' && KNOWN_CODES.has(err.code) ? (err.code as ErrorCode) : fallbackCode(res.status);
    const message = typeof err?.message === 'string' ? err.message : `${method} ${path} failed with HTTP ${res.status}`;
    const details = typeof err?.details === 'object' && err.details !== null ? (err.details as Record<string, unknown>) : {};
    throw new ControlError(code, message, { details: { ...details, status: res.status } });
  }

  private unreachable(cause: unknown): ControlError {
    const reason = networkReason(cause);
    return new ControlError(
      ErrorCodes.CONTROL_UNREACHABLE,
      `no embot agent at ${this.baseUrl} (${reason}; is it running? start one with \`embot agent\`)`,
      { cause, details: { url: this.baseUrl } },
    );
  }
}

function fallbackCode(status: number): ErrorCode {
  if (status === 401) return ErrorCodes.CONTROL_UNAUTHORIZED;
  if (status === 404) return ErrorCodes.CONTROL_NOT_FOUND;
  if (status >= 500) return ErrorCodes.CONTROL_INTERNAL;
  return ErrorCodes.CONTROL_BAD_REQUEST;
}

/** A connection reset or closed under a request (fetch's `cause`: ECONNRESET, EPIPE, or undici's socket error). */
function droppedConnection(e: unknown): boolean {
  const code = (e as { cause?: { code?: unknown } } | undefined)?.cause?.code;
  return code === 'ECONNRESET' || code === 'EPIPE' || code === 'UND_ERR_SOCKET';
}

/** fetch hides the socket error in `cause`; surface the useful part. */
function networkReason(e: unknown): string {
  if (e instanceof Error && (e.name === 'TimeoutError' || e.name === 'AbortError')) return 'no answer in time';
  const cause = (e as { cause?: { code?: unknown } } | undefined)?.cause;
  if (cause && typeof cause.code === 'string') {
    if (cause.code === 'ECONNREFUSED') return 'connection refused';
    return cause.code;
  }
  return describeError(e);
}
