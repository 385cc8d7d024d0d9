import { Worker } from 'node:worker_threads';
import { fileURLToPath } from 'node:url';
import { bundleModule } from '../core/plugins/module-bundle.ts';
import { ErrorCodes, PluginError } from '../core/errors.ts';
import type { BatchItem, EmbotSpawn, HostToWorker, Outcome, PolicyState, WorkerToHost } from './worker/worker-protocol.ts';
import { PROGRESS_ITEM, PROGRESS_REQ, PROGRESS_SLOTS } from './worker/worker-protocol.ts';
import type { PolicyChart } from './policy-chart.ts';

// From the TypeScript sources the worker registers tsx first; from a build (`npm run build`) it is plain JS.
const WORKER_ENTRY = fileURLToPath(new URL(import.meta.url.endsWith('.ts') ? './worker/worker-entry.mjs' : './worker/module-worker.js', import.meta.url));

export interface ModuleHostOptions {
  readonly module: string;
  readonly entryPath: string;
  readonly config: Readonly<Record<string, unknown>>;
  /** Time one request may take before the worker is declared hung. */
  readonly batchTimeoutMs: number;
  readonly initTimeoutMs?: number;
  /** Restarts allowed within `restartWindowMs` before the module is disabled. */
  readonly maxRestarts?: number;
  readonly restartWindowMs?: number;
  readonly backoffBaseMs?: number;
  /** A delayed transition fired in the worker: commit its outcome. */
  readonly onTimer: (outcome: Outcome) => void;
  /** The embot whose event hung the worker; the host stops feeding it. */
  readonly onHang: (embotId: string, message: string) => void;
  readonly onRestart: (restarts: number, reason: string) => void;
  readonly onDisabled: (reason: string) => void;
  readonly onLog: (msg: Extract<WorkerToHost, { t: 'log' }>) => void;
}

type Request = Extract<HostToWorker, { reqId: number }>;
type RequestBody = Request extends infer R ? (R extends Request ? Omit<R, 'reqId'> : never) : never;

interface Pending {
  readonly body: RequestBody;
  readonly resolve: (o: Outcome) => void;
  readonly reject: (e: Error) => void;
}

/**
 * The agent's side of one module worker: requests go out one at a time, each under a watchdog.
 * A hang or crash restarts the worker with back-off, restores every embot from the last state it
 * reported and replays the unanswered request, minus the embot that hung it; past the restart
 * budget the module is disabled.
 */
export class ModuleHost {
  private worker: Worker | undefined;
  private code = '';
  private readonly progress = new SharedArrayBuffer(PROGRESS_SLOTS * 4);
  private readonly progressView = new Int32Array(this.progress);
  private readonly specs = new Map<string, EmbotSpawn>();
  private readonly latest = new Map<string, Record<string, PolicyState>>();
  private readonly excluded = new Set<string>();
  private readonly queue: Pending[] = [];
  private inFlight: { pending: Pending; reqId: number; timer: NodeJS.Timeout } | undefined;
  private reqSeq = 1;
  private restartTimes: number[] = [];
  private restarting = false;
  private closed = false;
  disabled: string | undefined;
  restarts = 0;
  policies: readonly string[] = [];
  /** Each policy's statechart as the worker read it from the machine definition (dashboard). */
  charts: Readonly<Record<string, PolicyChart>> = {};

  constructor(private readonly opts: ModuleHostOptions) {}

  /** Starts the worker and imports the module entry; rejects with PLUGIN_LOAD_FAILED if it does not load. */
  async start(): Promise<readonly string[]> {
    this.code = (await bundleModule(this.opts.entryPath)).code;
    this.policies = await this.boot();
    return this.policies;
  }

  spawn(embots: readonly EmbotSpawn[]): Promise<Outcome> {
    for (const e of embots) {
      this.specs.set(e.embotId, e);
      this.excluded.delete(e.embotId);
      if (e.restore) this.latest.set(e.embotId, { ...e.restore });
    }
    return this.request({ t: 'spawn', embots });
  }

  batch(items: readonly BatchItem[]): Promise<Outcome> {
    return this.request({ t: 'batch', items });
  }

  async stopEmbots(embotIds: readonly string[]): Promise<void> {
    this.forget(embotIds);
    await this.request({ t: 'stop', embotIds });
  }

  /** Stops feeding embots (quarantined) and leaves them out of restarts. */
  forget(embotIds: readonly string[]): void {
    for (const id of embotIds) {
      this.specs.delete(id);
      this.latest.delete(id);
      this.excluded.add(id);
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.inFlight) clearTimeout(this.inFlight.timer);
    const err = new PluginError(ErrorCodes.AGENT_STOPPED, `module ${this.opts.module} is shutting down`);
    for (const p of this.queue.splice(0)) p.reject(err);
    if (this.inFlight) this.inFlight.pending.reject(err);
    this.inFlight = undefined;
    await this.worker?.terminate();
    this.worker = undefined;
  }

  private request(body: RequestBody): Promise<Outcome> {
    if (this.disabled) return Promise.reject(new PluginError(ErrorCodes.PLUGIN_DISABLED, `module ${this.opts.module} is disabled: ${this.disabled}`));
    return new Promise((resolve, reject) => {
      this.queue.push({ body, resolve, reject });
      this.pump();
    });
  }

  private pump(): void {
    if (this.inFlight || this.restarting || !this.worker || this.closed) return;
    const pending = this.queue.shift();
    if (!pending) return;
    const reqId = this.reqSeq++;
    const body = this.withoutExcluded(pending.body);
    const timer = setTimeout(() => this.onHung(reqId), this.opts.batchTimeoutMs);
    this.inFlight = { pending: { ...pending, body }, reqId, timer };
    this.worker.postMessage({ ...body, reqId } as HostToWorker);
  }

  private withoutExcluded(body: RequestBody): RequestBody {
    if (body.t !== 'batch' || this.excluded.size === 0) return body;
    return { t: 'batch', items: body.items.filter((i) => !this.excluded.has(i.embotId)) };
  }

  private boot(): Promise<readonly string[]> {
    // No inherited execArgv: flags meant for the agent's own entry (e.g. --input-type) are not valid for a worker.
    const worker = new Worker(WORKER_ENTRY, { stdout: false, stderr: false, execArgv: [] });
    this.worker = worker;
    return new Promise((resolve, reject) => {
      let ready = false;
      const initTimer = setTimeout(() => {
        reject(new PluginError(ErrorCodes.PLUGIN_LOAD_FAILED, `module ${this.opts.module} did not load within ${this.opts.initTimeoutMs ?? 10_000} ms`));
        void worker.terminate();
      }, this.opts.initTimeoutMs ?? 10_000);
      worker.on('message', (msg: WorkerToHost) => {
        if (msg.t === 'ready') {
          ready = true;
          clearTimeout(initTimer);
          this.charts = msg.charts ?? {};
          resolve(msg.policies);
        } else if (msg.t === 'init-failed') {
          clearTimeout(initTimer);
          reject(new PluginError(ErrorCodes.PLUGIN_LOAD_FAILED, `module ${this.opts.module} failed to load: ${msg.error.message}`));
          void worker.terminate();
        } else this.onMessage(worker, msg);
      });
      worker.on('error', (err) => {
        if (!ready) {
          clearTimeout(initTimer);
          reject(new PluginError(ErrorCodes.PLUGIN_LOAD_FAILED, `module ${this.opts.module} failed to load: ${err.message}`, { cause: err }));
          return;
        }
        if (this.worker === worker) void this.restart(`worker crashed: ${err.message}`);
      });
      worker.on('exit', (code) => {
        if (ready && this.worker === worker && !this.closed && !this.restarting) void this.restart(`worker exited with code ${code}`);
      });
      worker.postMessage({ t: 'init', module: this.opts.module, code: this.code, config: this.opts.config, progress: this.progress } satisfies HostToWorker);
    });
  }

  private onMessage(worker: Worker, msg: WorkerToHost): void {
    if (worker !== this.worker) return;
    switch (msg.t) {
      case 'done': {
        const f = this.inFlight;
        if (!f || f.reqId !== msg.reqId) return;
        clearTimeout(f.timer);
        this.inFlight = undefined;
        this.remember(msg);
        f.pending.resolve(msg);
        this.pump();
        return;
      }
      case 'timer':
        this.remember(msg);
        this.opts.onTimer(msg);
        return;
      case 'log':
        this.opts.onLog(msg);
        return;
      default:
        return;
    }
  }

  private remember(o: Outcome): void {
    for (const u of o.updates) {
      if (this.excluded.has(u.embotId)) continue;
      const states = this.latest.get(u.embotId) ?? {};
      states[u.policy] = u.state;
      this.latest.set(u.embotId, states);
    }
    for (const f of o.failures) this.forget([f.embotId]);
  }

  private onHung(reqId: number): void {
    const f = this.inFlight;
    if (!f || f.reqId !== reqId) return;
    const body = f.pending.body;
    let culprit: string | undefined;
    if (body.t === 'batch' && Atomics.load(this.progressView, PROGRESS_REQ) === reqId) {
      culprit = body.items[Atomics.load(this.progressView, PROGRESS_ITEM)]?.embotId;
    } else if (body.t === 'spawn' && body.embots.length === 1) {
      culprit = body.embots[0]!.embotId;
    }
    const message = `no answer within ${this.opts.batchTimeoutMs} ms (infinite loop?)`;
    if (culprit) {
      this.forget([culprit]);
      this.opts.onHang(culprit, message);
    }
    void this.restart(`request hung: ${message}`);
  }

  private async restart(reason: string): Promise<void> {
    if (this.closed || this.restarting) return;
    this.restarting = true;
    const old = this.worker;
    this.worker = undefined;
    if (this.inFlight) {
      clearTimeout(this.inFlight.timer);
      this.queue.unshift(this.inFlight.pending);
      this.inFlight = undefined;
    }
    await old?.terminate();
    const now = Date.now();
    const window = this.opts.restartWindowMs ?? 60_000;
    this.restartTimes = this.restartTimes.filter((t) => now - t < window);
    this.restartTimes.push(now);
    this.restarts++;
    if (this.restartTimes.length > (this.opts.maxRestarts ?? 3)) {
      this.disable(`${this.restartTimes.length} restarts within ${window} ms; last: ${reason}`);
      return;
    }
    this.opts.onRestart(this.restarts, reason);
    await new Promise((r) => setTimeout(r, (this.opts.backoffBaseMs ?? 100) * 2 ** (this.restartTimes.length - 1)));
    if (this.closed) return;
    try {
      await this.boot();
    } catch (e) {
      this.restarting = false;
      return this.restart(`restart failed: ${(e as Error).message}`);
    }
    // Restore every embot from its last reported state before replaying what was unanswered.
    const respawn: EmbotSpawn[] = [...this.specs.values()].map((s) => {
      const restore = this.latest.get(s.embotId);
      return restore ? { embotId: s.embotId, elementId: s.elementId, policies: s.policies, restore } : { embotId: s.embotId, elementId: s.elementId, policies: s.policies };
    });
    this.restarting = false;
    if (respawn.length) this.queue.unshift({ body: { t: 'spawn', embots: respawn }, resolve: (o) => this.opts.onTimer(o), reject: () => {} });
    this.pump();
  }

  private disable(reason: string): void {
    this.disabled = reason;
    this.restarting = false;
    const err = new PluginError(ErrorCodes.PLUGIN_DISABLED, `module ${this.opts.module} is disabled: ${reason}`);
    for (const p of this.queue.splice(0)) p.reject(err);
    this.opts.onDisabled(reason);
  }
}
