import { readFileSync } from 'node:fs';
import { InvalidArgumentError, Option, type Command } from 'commander';
import { loadConfig, type AgentConfigInput } from '../config/config.ts';
import { ConfigError, ErrorCodes, describeError, isEmbotError } from '../errors.ts';
import { createLogger, LOG_FORMATS, LOG_LEVELS, parseLogFormat, parseLogLevel } from '../logger.ts';
// Deep imports on purpose: the wire index pulls in ws and msgpackr, which every CLI command would then load.
import { loadClusterSecret } from '../wire/auth.ts';
import { parsePeerListen, parsePeers } from '../wire/peers.ts';
import { loadPeerTls } from '../wire/peer-tls.ts';
import type { CliContext } from './context.ts';
import { parseHostPort } from './parse.ts';

interface AgentFlags {
  readonly config?: string;
  readonly name?: string;
  readonly control?: { host?: string; port: number };
  readonly data?: string;
  readonly plugins?: string;
  readonly driver?: 'sim' | 'qemu';
  readonly safe?: boolean;
  readonly logLevel?: 'debug' | 'info' | 'warn' | 'error' | 'silent';
  readonly logFormat?: 'auto' | 'pretty' | 'json';
  readonly tokenFile?: string;
  readonly peerListen?: string;
  readonly peers?: Readonly<Record<string, string>>;
  readonly etcd?: readonly string[];
  readonly secretFile?: string;
  readonly tlsCa?: string;
  readonly tlsCert?: string;
  readonly tlsKey?: string;
}

/** `embot agent`: runs an agent in the foreground until SIGINT/SIGTERM. */
export function registerAgentCommand(program: Command, ctx: CliContext, setExitCode: (code: number) => void): void {
  program
    .command('agent')
    .description('run an agent on this host (foreground; stop with Ctrl-C)')
    .option('--config <file>', 'JSON or YAML config file')
    .option('--name <name>', 'agent name (default: the host name)')
    .option('--control <host:port>', 'control API address (default 127.0.0.1:7400)', parseHostPort)
    .option('--data <dir>', 'data directory (SQLite store), default ./data')
    .option('--plugins <dir>', 'plugins directory, default ./plugins')
    .addOption(new Option('--driver <driver>', 'hypervisor driver: sim (embedded, simulated VMs) or qemu (real QEMU VMs)').choices(['sim', 'qemu']))
    .option('--safe', 'safe mode: load no plugins')
    .addOption(new Option('--log-level <level>', 'log level (default info; config logLevel)').choices(LOG_LEVELS).argParser(parseLogLevel))
    .addOption(new Option('--log-format <format>', 'log format: auto (pretty on a terminal, else JSON lines), pretty or json').choices(LOG_FORMATS).argParser(parseLogFormat))
    .option('--token-file <file>', 'file holding the control API token (or set EMBOT_CONTROL_TOKEN)')
    .option('--peer-listen <host:port>', 'where this agent accepts peers (default 127.0.0.1:7401; only with a secret or TLS; off loopback only with TLS)', parsePeerListenFlag)
    .option('--peers <list>', 'peer agents by name, e.g. b=ws://127.0.0.1:7402,c=ws://127.0.0.1:7403', parsePeersFlag)
    .option('--etcd <urls>', 'find peers in etcd too and register there (directory.kind etcd), e.g. http://127.0.0.1:2379[,http://…]', parseEtcdFlag)
    .option('--secret-file <file>', 'file holding the cluster secret (at least 16 bytes) peers authenticate with')
    .option('--tls-ca <file>', 'cluster CA certificate (embot ca init): peer links become wss:// with mutual TLS; with --tls-cert and --tls-key')
    .option('--tls-cert <file>', "this agent's certificate, issued by the cluster CA (embot ca issue NAME)")
    .option('--tls-key <file>', "this agent's private key")
    .action(async (opts: AgentFlags) => {
      setExitCode(await runAgent(opts, ctx));
    });
}

async function runAgent(opts: AgentFlags, ctx: CliContext): Promise<number> {
  const config = loadConfig({ ...(opts.config === undefined ? {} : { file: opts.config }), flags: toConfigFlags(opts), env: ctx.env });
  // Checked now, like the secret, so an unusable certificate is reported before the store is opened.
  if (config.peer.tls) loadPeerTls(config.peer.tls, config.name);
  const logger = createLogger({ level: config.logLevel, format: config.logFormat, name: config.name, stream: ctx.io.stderr });
  // Imported lazily: client commands must not pay for loading the whole agent.
  const { startAgent } = await import('../agent.ts');
  const agent = await startAgent(config, logger);
  ctx.out(formatReadyLine(config.name, agent));

  await waitForShutdown(ctx.io.signal, (sig) => logger.info('stopping', { signal: sig }));
  try {
    await agent.stop();
    logger.info('stopped');
    return 0;
  } catch (e) {
    logger.error('agent did not stop cleanly', { error: describeError(e) });
    return 1;
  }
}

/**
 * The line scripts wait for before talking to the agent; it names every endpoint it listens on.
 *
 * @example
 * ```ts
 * formatReadyLine('a', { controlUrl: 'http://127.0.0.1:7400', peerUrl: 'ws://127.0.0.1:7401' });
 * // 'embot agent a ready: control http://127.0.0.1:7400, peer ws://127.0.0.1:7401'
 * ```
 */
export function formatReadyLine(name: string, agent: { readonly controlUrl: string; readonly peerUrl?: string | undefined }): string {
  const peer = agent.peerUrl ? `, peer ${agent.peerUrl}` : '';
  return `embot agent ${name} ready: control ${agent.controlUrl}${peer}`;
}

/** Commander turns InvalidArgumentError into `option '--x' argument … is invalid. <message>` and exit 2. */
function asArgumentError<T>(parse: () => T): T {
  try {
    return parse();
  } catch (e) {
    if (isEmbotError(e)) throw new InvalidArgumentError(e.message);
    throw e;
  }
}

function parsePeerListenFlag(raw: string): string {
  asArgumentError(() => parsePeerListen(raw));
  return raw.trim();
}

/** `--etcd URL[,URL]`: the URLs themselves are checked with the config (`directory.endpoints`). */
function parseEtcdFlag(raw: string): string[] {
  const urls = raw.split(',').map((u) => u.trim()).filter((u) => u !== '');
  if (urls.length === 0) throw new InvalidArgumentError('give at least one etcd client URL, e.g. http://127.0.0.1:2379');
  return urls;
}

function parsePeersFlag(raw: string): Record<string, string> {
  return Object.fromEntries(asArgumentError(() => parsePeers(raw)));
}

function toConfigFlags(opts: AgentFlags): AgentConfigInput {
  const flags: { -readonly [K in keyof AgentConfigInput]: AgentConfigInput[K] } = {};
  if (opts.name !== undefined) flags.name = opts.name;
  if (opts.data !== undefined) flags.dataDir = opts.data;
  if (opts.plugins !== undefined) flags.pluginsDir = opts.plugins;
  if (opts.driver !== undefined) flags.driver = opts.driver;
  if (opts.safe) flags.safe = true;
  if (opts.logLevel !== undefined) flags.logLevel = opts.logLevel;
  if (opts.logFormat !== undefined) flags.logFormat = opts.logFormat;
  const control: { host?: string; port?: number; token?: string } = {};
  if (opts.control) {
    control.port = opts.control.port;
    if (opts.control.host !== undefined) control.host = opts.control.host;
  }
  if (opts.tokenFile !== undefined) control.token = readToken(opts.tokenFile);
  if (Object.keys(control).length > 0) flags.control = control;
  const peer: { listen?: string; peers?: Record<string, string>; secretFile?: string; tls?: { ca?: string; cert?: string; key?: string } } = {};
  if (opts.peerListen !== undefined) peer.listen = opts.peerListen;
  if (opts.peers !== undefined) peer.peers = { ...opts.peers };
  if (opts.secretFile !== undefined) {
    // Read now so a missing or short secret is reported before the store is opened.
    loadClusterSecret(opts.secretFile);
    peer.secretFile = opts.secretFile;
  }
  const tls = { ...(opts.tlsCa !== undefined ? { ca: opts.tlsCa } : {}), ...(opts.tlsCert !== undefined ? { cert: opts.tlsCert } : {}), ...(opts.tlsKey !== undefined ? { key: opts.tlsKey } : {}) };
  if (Object.keys(tls).length > 0) peer.tls = tls;
  if (Object.keys(peer).length > 0) flags.peer = peer;
  if (opts.etcd !== undefined) flags.directory = { kind: 'etcd', endpoints: [...opts.etcd] };
  return flags;
}

function readToken(file: string): string {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (cause) {
    throw new ConfigError(ErrorCodes.CONFIG_NOT_FOUND, `token file ${file} cannot be read: ${describeError(cause)}`, { cause, details: { file } });
  }
  const token = text.trim();
  if (token === '') throw new ConfigError(ErrorCodes.CONFIG_INVALID, `token file ${file} is empty`, { details: { file } });
  return token;
}

function waitForShutdown(signal: AbortSignal | undefined, onStop: (reason: string) => void): Promise<void> {
  return new Promise((resolve) => {
    const finish = (reason: string): void => {
      process.off('SIGINT', onSigint);
      process.off('SIGTERM', onSigterm);
      signal?.removeEventListener('abort', onAbort);
      onStop(reason);
      resolve();
    };
    const onSigint = (): void => finish('SIGINT');
    const onSigterm = (): void => finish('SIGTERM');
    const onAbort = (): void => finish('abort');
    process.once('SIGINT', onSigint);
    process.once('SIGTERM', onSigterm);
    if (signal?.aborted) return finish('abort');
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}
