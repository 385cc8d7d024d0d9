/**
 * A real etcd (Debian's `etcd-server`, /usr/bin/etcd 3.4) for the fleet-directory tests: one
 * member on free loopback ports with a temp data dir, killed and its dir removed after the test,
 * also when the test fails. Restartable on the same ports and data (an etcd outage, then back).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { get as httpsGet } from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freeLoopbackPort } from '../../core/cli/free-port.ts';
// Type only: the benchmark (bench/directory.bench.ts) uses this harness outside vitest.
import type { Cleanups } from './cleanups.ts';

export const ETCD_BINARY = '/usr/bin/etcd';

export type EtcdAvailability = { readonly ok: true } | { readonly ok: false; readonly reason: string };

export function etcdAvailability(): EtcdAvailability {
  const r = spawnSync(ETCD_BINARY, ['--version'], { encoding: 'utf8' });
  if (r.error || r.status !== 0) return { ok: false, reason: `${ETCD_BINARY} not found: install the Debian package etcd-server` };
  return { ok: true };
}

/** Call at the top of an etcd test file: whether to run; throws under CI (`process.env.CI`), which installs etcd-server and must run these. */
export function requireEtcd(): boolean {
  const a = etcdAvailability();
  if (a.ok) return true;
  if (process.env['CI']) throw new Error(`CI must run the etcd tests: ${a.reason}`);
  process.stderr.write(`etcd tests skipped: ${a.reason}\n`);
  return false;
}

export interface EtcdServer {
  /** Client URL, `http://127.0.0.1:PORT`. */
  readonly url: string;
  readonly clientPort: number;
  /** etcd's own log so far (for a failing test's message). */
  readonly log: () => string;
  /** Whether the process runs now. */
  readonly running: () => boolean;
  /** SIGKILL (an outage); the data dir stays for {@link EtcdServer.start}. */
  kill(): Promise<void>;
  /** (Re)starts on the same ports and data; resolves once it answers /health. */
  start(): Promise<void>;
  /** Kills it and removes its data dir. */
  destroy(): Promise<void>;
}

const READY_TIMEOUT_MS = 20_000;

/**
 * An etcd, not started yet (`await s.start()`), destroyed by `cleanups` (a test's
 * `cleanupsAfterEach()`: after the test, also a failed one). The client port is fixed here so an
 * agent can be pointed at an etcd that comes up later.
 *
 * @example
 * ```ts
 * const run = requireEtcd();
 * const cleanups = cleanupsAfterEach();
 * it.runIf(run)('…', async () => { const etcd = await etcdServer(cleanups); await etcd.start(); … });
 * ```
 */
/** etcd serving its clients over TLS: its certificate and key, and with `clientCa` it asks every client for a certificate that CA signed (`--client-cert-auth`). */
export interface EtcdTlsOptions {
  readonly cert: string;
  readonly key: string;
  readonly clientCa?: string;
  /** The CA that signed `cert` (for this harness's own health probe). */
  readonly ca: string;
}

export async function etcdServer(cleanups: Cleanups, options: { readonly tls?: EtcdTlsOptions } = {}): Promise<EtcdServer> {
  const clientPort = await freeLoopbackPort();
  let peerPort = await freeLoopbackPort();
  while (peerPort === clientPort) peerPort = await freeLoopbackPort();
  const dataDir = mkdtempSync(join(tmpdir(), 'embot-etcd-'));
  const tls = options.tls;
  const url = `${tls ? 'https' : 'http'}://127.0.0.1:${clientPort}`;
  const peerUrl = `http://127.0.0.1:${peerPort}`;
  let child: ChildProcess | undefined;
  let exited: Promise<void> = Promise.resolve();
  let log = '';
  const kill = async (): Promise<void> => {
    if (child && child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await exited;
    child = undefined;
  };
  const server: EtcdServer = {
    url,
    clientPort,
    log: () => log,
    running: () => child !== undefined && child.exitCode === null && child.signalCode === null,
    kill,
    async start() {
      if (server.running()) return;
      const args = [
        '--name', 'embot-test',
        '--data-dir', join(dataDir, 'member'),
        '--listen-client-urls', url,
        '--advertise-client-urls', url,
        '--listen-peer-urls', peerUrl,
        '--initial-advertise-peer-urls', peerUrl,
        '--initial-cluster', `embot-test=${peerUrl}`,
        ...(tls ? ['--cert-file', tls.cert, '--key-file', tls.key] : []),
        ...(tls?.clientCa ? ['--client-cert-auth', '--trusted-ca-file', tls.clientCa] : []),
        '--logger', 'zap',
        '--log-outputs', 'stderr',
      ];
      const c = spawn(ETCD_BINARY, args, { stdio: ['ignore', 'pipe', 'pipe'] });
      child = c;
      exited = new Promise((r) => c.once('exit', () => r()));
      c.stdout!.setEncoding('utf8').on('data', (d: string) => (log += d));
      c.stderr!.setEncoding('utf8').on('data', (d: string) => (log += d));
      const started = Date.now();
      for (;;) {
        if (!server.running()) throw new Error(`etcd exited before it answered:\n${log.slice(-4000)}`);
        if (await healthy(url, tls)) return;
        if (Date.now() - started > READY_TIMEOUT_MS) {
          await kill();
          throw new Error(`etcd did not answer ${url}/health within ${READY_TIMEOUT_MS} ms:\n${log.slice(-4000)}`);
        }
        await new Promise((r) => setTimeout(r, 50));
      }
    },
    async destroy() {
      await kill();
      rmSync(dataDir, { recursive: true, force: true, maxRetries: 3 });
    },
  };
  cleanups.push(() => server.destroy());
  return server;
}

async function healthy(url: string, tls: EtcdTlsOptions | undefined): Promise<boolean> {
  if (tls) return healthyOverTls(url, tls);
  try {
    const res = await fetch(`${url}/health`, { signal: AbortSignal.timeout(1000) });
    const body = (await res.json()) as { health?: unknown };
    return res.ok && body.health === 'true';
  } catch {
    return false;
  }
}

/** /health over TLS, with the harness's CA (and a client certificate when etcd asks for one: its own). */
function healthyOverTls(url: string, tls: EtcdTlsOptions): Promise<boolean> {
  return new Promise((resolve) => {
    const req = httpsGet(`${url}/health`, { ca: readFileSync(tls.ca), ...(tls.clientCa ? { cert: readFileSync(tls.cert), key: readFileSync(tls.key) } : {}), timeout: 1000 }, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (d: string) => (body += d));
      res.on('end', () => resolve(res.statusCode === 200 && body.includes('"health":"true"')));
      res.on('error', () => resolve(false));
    });
    req.on('error', () => resolve(false));
    req.on('timeout', () => req.destroy());
  });
}
