import { readFileSync } from 'node:fs';
import { Command, CommanderError } from 'commander';
import { EmbotError, ErrorCodes, describeError } from '../errors.ts';
import type { ControlErrorBody } from '../control/control-api.ts';
import { registerAgentCommand } from './agent-command.ts';
import { registerCaCommands } from './ca-commands.ts';
import { registerDemoCommand } from './demo-command.ts';
import { createContext, type CliIo } from './context.ts';
import { registerEventCommands } from './event-commands.ts';
import { registerImageCommands } from './image-commands.ts';
import { registerInfoCommands } from './info-commands.ts';
import { registerMigrateCommands } from './migrate-commands.ts';
import { registerModuleCommands } from './module-commands.ts';
import { registerPrewarmCommand } from './prewarm-command.ts';
import { registerVmCommands } from './vm-commands.ts';

export type { CliIo };

/** Exit codes of the `embot` command. */
export const ExitCode = { OK: 0, RUNTIME: 1, USAGE: 2 } as const;

/** Errors that mean "you asked for something wrong", not "something went wrong". */
const USAGE_CODES: ReadonlySet<string> = new Set([ErrorCodes.CLI_USAGE, ErrorCodes.CONFIG_INVALID, ErrorCodes.CONFIG_NOT_FOUND, ErrorCodes.DESTINATIONS_INVALID]);

const VERSION = (JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }).version;

/**
 * Runs the `embot` command line and resolves to its exit code (0 ok, 1 runtime error, 2 usage
 * error). Never calls `process.exit`, so tests can call it in-process.
 *
 * @example
 * ```ts
 * const code = await main(['node', 'embot', 'vm', 'list', '--json'], { stdout, stderr });
 * ```
 */
export async function main(argv: readonly string[], io: CliIo = { stdout: process.stdout, stderr: process.stderr }): Promise<number> {
  const ctx = createContext(io);
  const json = wantsJson(argv);
  let exitCode: number = ExitCode.OK;
  const program = new Command('embot')
    .description('embot: autonomic management of virtualised hosts (agent and control CLI)')
    .version(VERSION, '-V, --version')
    .exitOverride()
    .configureOutput({
      writeOut: (s) => io.stdout.write(s),
      writeErr: (s) => io.stderr.write(s),
      // Commander's own usage errors (an unknown option, a bad argument) carry the stable code as every other error does.
      // With --json, reportJsonError prints the error as one JSON document instead.
      outputError: (s, write) => (json ? undefined : write(withUsageCode(s))),
    })
    .showHelpAfterError(json ? false : '(run with --help for usage)')
    .addHelpText(
      'after',
      '\nThe agent is found by --agent URL or EMBOT_AGENT (default http://127.0.0.1:7400).\nExit codes: 0 ok, 1 runtime error, 2 usage error.',
    );

  registerAgentCommand(program, ctx, (code) => {
    exitCode = code;
  });
  registerInfoCommands(program, ctx);
  registerVmCommands(program, ctx);
  registerEventCommands(program, ctx);
  registerModuleCommands(program, ctx);
  registerCaCommands(program, ctx);
  registerMigrateCommands(program, ctx, (code) => {
    exitCode = code;
  });
  registerPrewarmCommand(program, ctx);
  registerImageCommands(program, ctx, (code) => {
    exitCode = code;
  });
  registerDemoCommand(program, ctx, (code) => {
    exitCode = code;
  });

  try {
    await program.parseAsync([...argv], { from: 'node' });
    return exitCode;
  } catch (e) {
    return json ? reportJsonError(e, io) : reportError(e, io);
  }
}

/**
 * `--json` anywhere before a `--`, whether or not the command took it: `migrate vm --to --json`
 * gives it to --to as a value, and its usage error still goes out as JSON.
 */
function wantsJson(argv: readonly string[]): boolean {
  const end = argv.indexOf('--');
  return (end === -1 ? argv : argv.slice(0, end)).includes('--json');
}

/** `error: …` from commander, with ` [EMBOT_ERR_CLI_USAGE]` on its first line unless it names a code already. */
function withUsageCode(message: string): string {
  if (/\[EMBOT_ERR_[A-Z0-9_]+\]/.test(message)) return message;
  const end = message.indexOf('\n');
  return end === -1 ? `${message} [${ErrorCodes.CLI_USAGE}]` : `${message.slice(0, end)} [${ErrorCodes.CLI_USAGE}]${message.slice(end)}`;
}

/**
 * The error as one JSON document in the control API's error body, so a script reads the CLI's and
 * the API's alike. On stderr, where errors go without --json: stdout carries only a command's
 * answer, so a script that parses stdout never takes an error for data. Exit code as without --json.
 */
function reportJsonError(e: unknown, io: CliIo): number {
  const write = (body: ControlErrorBody): void => void io.stderr.write(`${JSON.stringify(body, null, 2)}\n`);
  if (e instanceof CommanderError) {
    if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version') return ExitCode.OK;
    write({ error: commanderErrorBody(e.message) });
    return ExitCode.USAGE;
  }
  if (e instanceof EmbotError) {
    write({ error: { code: e.code, message: e.message, ...(e.details === undefined ? {} : { details: e.details }) } });
    return USAGE_CODES.has(e.code) ? ExitCode.USAGE : ExitCode.RUNTIME;
  }
  write({ error: { code: ErrorCodes.CLI_UNEXPECTED, message: `unexpected failure: ${describeError(e)}` } });
  return ExitCode.RUNTIME;
}

/**
 * Commander's `error: …` message as code and message: a code it names (a bad --to list's
 * `[EMBOT_ERR_DESTINATIONS_INVALID]`) is the code, else EMBOT_ERR_CLI_USAGE, as withUsageCode prints them.
 */
function commanderErrorBody(raw: string): { readonly code: string; readonly message: string } {
  const named = /\s*\[(EMBOT_ERR_[A-Z0-9_]+)\]/.exec(raw);
  const message = (named ? raw.slice(0, named.index) + raw.slice(named.index + named[0].length) : raw).replace(/^error: /, '').trim();
  return { code: named?.[1] ?? ErrorCodes.CLI_USAGE, message };
}

function reportError(e: unknown, io: CliIo): number {
  if (e instanceof CommanderError) {
    // Commander has already written its message (and the help hint) to stderr.
    if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version') return ExitCode.OK;
    return ExitCode.USAGE;
  }
  if (e instanceof EmbotError) {
    io.stderr.write(`error: ${e.message} [${e.code}]\n`);
    return USAGE_CODES.has(e.code) ? ExitCode.USAGE : ExitCode.RUNTIME;
  }
  io.stderr.write(`error: unexpected failure: ${describeError(e)}\n`);
  return ExitCode.RUNTIME;
}
