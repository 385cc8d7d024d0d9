import { readFileSync } from 'node:fs';
import { Option, type Command } from 'commander';
import { loadConfig, type AgentConfigInput } from '../config/config.ts';
import { ConfigError, ErrorCodes, describeError } from '../errors.ts';
import { createLogger } from '../logger.ts';
import type { CliContext } from './context.ts';
import { parseHostPort } from './parse.ts';

interface AgentFlags {
  readonly config?: string;
  readonly name?: string;
  readonly control?: { host?: string; port: number };
  readonly data?: string;
  readonly plugins?: string;
  readonly driver?: 'sim';
  readonly safe?: boolean;
  readonly logLevel?: 'debug' | 'info' | 'warn' | 'error' | 'silent';
  readonly logFormat?: 'pretty' | 'json';
  readonly tokenFile?: string;
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
    .addOption(new Option('--driver <driver>', 'hypervisor driver').choices(['sim']))
    .option('--safe', 'safe mode: load no plugins')
    .addOption(new Option('--log-level <level>', 'log level').choices(['debug', 'info', 'warn', 'error', 'silent']))
    .addOption(new Option('--log-format <format>', 'log format').choices(['pretty', 'json']))
    .option('--token-file <file>', 'file holding the control API token (or set EMBOT_CONTROL_TOKEN)')
    .action(async (opts: AgentFlags) => {
      setExitCode(await runAgent(opts, ctx));
    });
}

async function runAgent(opts: AgentFlags, ctx: CliContext): Promise<number> {
  const config = loadConfig({ ...(opts.config === undefined ? {} : { file: opts.config }), flags: toConfigFlags(opts), env: ctx.env });
  const logger = createLogger({ level: config.logLevel, format: config.logFormat, name: config.name, stream: ctx.io.stderr });
  // Imported lazily: client commands must not pay for loading the whole agent.
  const { startAgent } = await import('../agent.ts');
  const agent = await startAgent(config, logger);
  ctx.out(`embot agent ${config.name} ready: control ${agent.controlUrl}`);

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
