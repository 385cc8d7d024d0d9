import type { Command } from 'commander';
import { DEFAULT_AGENT_URL } from '../config/defaults.ts';
import { ControlClient } from '../control/client.ts';

/** Where the CLI writes, and what it reads from its environment; injected so `main` is testable. */
export interface CliIo {
  readonly stdout: { write(chunk: string): unknown };
  readonly stderr: { write(chunk: string): unknown };
  /** Defaults to `process.env`. */
  readonly env?: NodeJS.ProcessEnv;
  /** `embot agent` stops when this aborts (besides SIGINT/SIGTERM). */
  readonly signal?: AbortSignal;
}

/** Shared by every command module. */
export interface CliContext {
  readonly io: CliIo;
  readonly env: NodeJS.ProcessEnv;
  out(text: string): void;
  /** Exactly the API's JSON, pretty-printed, one document. */
  json(value: unknown): void;
  client(opts: ClientFlags): ControlClient;
}

export interface ClientFlags {
  readonly agent?: string;
  readonly token?: string;
  readonly json?: boolean;
}

export function createContext(io: CliIo): CliContext {
  const env = io.env ?? process.env;
  return {
    io,
    env,
    out: (text) => io.stdout.write(text.endsWith('\n') ? text : `${text}\n`),
    json: (value) => io.stdout.write(`${JSON.stringify(value, null, 2)}\n`),
    client: (opts) => {
      const url = opts.agent ?? nonEmpty(env['EMBOT_AGENT']) ?? DEFAULT_AGENT_URL;
      const token = opts.token ?? nonEmpty(env['EMBOT_CONTROL_TOKEN']);
      return new ControlClient(url, token);
    },
  };
}

/** Adds `--agent`, `--token` and (for commands that print data) `--json`. */
export function clientOptions(cmd: Command, withJson = true): Command {
  cmd
    .option('--agent <url>', `control URL of the agent (env EMBOT_AGENT, default ${DEFAULT_AGENT_URL})`)
    .option('--token <token>', 'control API token (env EMBOT_CONTROL_TOKEN)');
  if (withJson) cmd.option('--json', 'print the API response as JSON');
  return cmd;
}

function nonEmpty(s: string | undefined): string | undefined {
  return s === undefined || s === '' ? undefined : s;
}
