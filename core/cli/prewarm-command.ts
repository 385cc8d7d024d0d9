/**
 * `embot prewarm VM --to b,c` and `embot prewarm VM --cancel` (issue 13 point 3, README "Several
 * destinations"): the copy to the destinations starts now and keeps them current; `embot migrate
 * VM [--to b]` is the command that switches; `embot migrations` shows each destination's warmth.
 */
import { InvalidArgumentError, type Command } from 'commander';
import type { MigrationInfo } from '../control/control-api.ts';
import type { PrewarmInfo } from '../mobility/prewarm.ts';
import { ConfigError, ErrorCodes, isEmbotError } from '../errors.ts';
import { parseDestinationList } from '../mobility/destinations.ts';
import { clientOptions, type CliContext, type ClientFlags } from './context.ts';
import { formatBytes, formatTable } from './format.ts';

interface PrewarmFlags extends ClientFlags {
  readonly to?: readonly string[];
  readonly cancel?: boolean;
}

/**
 * @example
 * ```ts
 * registerPrewarmCommand(program, ctx);
 * ```
 */
export function registerPrewarmCommand(program: Command, ctx: CliContext): void {
  clientOptions(
    program
      .command('prewarm')
      .description('start copying a VM to its destinations now, without stopping it, until `embot migrate VM [--to PEER]` switches at once (or --cancel)')
      .argument('<vm>', 'VM name')
      .option('--to <peers>', 'PEER,PEER…: the destinations to keep warm', parsePrewarmDestinations)
      .option('--cancel', 'stop the pre-warm of VM: every destination discards what it got, the VM runs on here'),
  ).action(async (vm: string, opts: PrewarmFlags) => {
    if (opts.cancel === true && opts.to !== undefined) throw new ConfigError(ErrorCodes.CLI_USAGE, '--cancel takes no --to');
    if (opts.cancel !== true && opts.to === undefined) throw new ConfigError(ErrorCodes.CLI_USAGE, 'give the destinations with --to PEER,PEER… (or --cancel)');
    const client = ctx.client(opts);
    if (opts.cancel === true) {
      const { id } = await client.cancelPrewarm(vm);
      if (opts.json) ctx.json({ id, cancelled: true });
      else ctx.out(`pre-warm ${id} of vm ${vm} cancelled: the destinations discard, the VM runs on here`);
      return;
    }
    const { id } = await client.prewarm(vm, opts.to!);
    if (opts.json) ctx.json({ id });
    else ctx.out(`pre-warm ${id} started: vm ${vm} → ${opts.to!.join(', ')}; switch with \`embot migrate ${vm}\` (or --to one of them), follow with \`embot migrations\``);
  });
}

/** `--to b,c`: a list by the rules of `embot migrate --to` (empty, blank, repeated names refused here). */
export function parsePrewarmDestinations(raw: string): readonly string[] {
  try {
    return parseDestinationList(raw);
  } catch (e) {
    if (isEmbotError(e)) throw new InvalidArgumentError(`${e.message} [${e.code}]`);
    throw e;
  }
}

/**
 * The pre-warm lines of `embot migrations`: per destination what was copied, what is left, the
 * rates and whether the exit condition holds.
 *
 * @example
 * ```ts
 * renderPrewarms(list); // 'pre-warm m-…: b warming  copied 80 MiB  left 12 KiB  …  exit condition met'
 * ```
 */
export function renderPrewarms(list: readonly MigrationInfo[]): string {
  const rows: string[][] = [];
  for (const m of list) {
    const pw = (m as MigrationInfo & { readonly prewarm?: PrewarmInfo }).prewarm;
    if (!pw) continue;
    for (const d of pw.destinations) {
      rows.push([m.id, d.name, d.status, formatBytes(d.copiedBytes), formatBytes(d.remainingBytes), `${formatBytes(d.rateBytesPerSec)}/s`, `${formatBytes(d.dirtyRateBytesPerSec)}/s`, String(d.rounds), d.exitConditionMet ? 'met' : 'not met']);
    }
  }
  if (rows.length === 0) return '';
  return '\n' + formatTable(['PRE-WARM', 'DESTINATION', 'STATUS', 'COPIED', 'REMAINING', 'RATE', 'DIRTY RATE', 'ROUNDS', 'EXIT CONDITION'], rows);
}
