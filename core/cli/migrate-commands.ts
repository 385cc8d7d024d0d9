import { InvalidArgumentError, type Command } from 'commander';
import type { ControlClient } from '../control/client.ts';
import type { Destinations, MigrationInfo } from '../control/control-api.ts';
import { EmbotError, ErrorCodes, isEmbotError } from '../errors.ts';
import { parseDestinationList } from '../mobility/destinations.ts';
import { clientOptions, type CliContext, type ClientFlags } from './context.ts';
import { chooseAuto, parseCount, renderChoice, renderShared, sharedOf } from './destination-choice.ts';
import { autoDestination } from './image-commands.ts';
import { formatBytes, formatDuration, formatTable, formatTime, truncate } from './format.ts';
import { renderPrewarms } from './prewarm-command.ts';

interface MigrateFlags extends ClientFlags {
  /** Absent: the command of the VM's pre-warm, to every destination it keeps warm. */
  readonly to?: Destinations;
  readonly threshold?: number;
  readonly retries?: number;
  readonly fallback?: readonly string[];
  /** With `--to auto`: this many destinations on node-disjoint paths (README "Where destinations are"). */
  readonly count?: number;
  /** False with `--no-wait`. */
  readonly wait: boolean;
}

/** How often `embot migrate` asks the agent for progress. */
export const PROGRESS_POLL_MS = 100;

/**
 * `embot migrate VM --to PEER` and `embot migrations`. `setExitCode` receives 0 when the
 * migration completed and 1 when it was aborted or denied.
 *
 * @example
 * ```ts
 * registerMigrateCommands(program, ctx, (code) => (exitCode = code));
 * ```
 */
export function registerMigrateCommands(program: Command, ctx: CliContext, setExitCode: (code: number) => void): void {
  clientOptions(
    program
      .command('migrate')
      .description('move a VM and its management to a peer agent; shows progress, then a summary')
      .argument('<vm>', 'VM name')
      .option('--to <peer>', "target agent, by its peer name (the agent's --peers); PEER,PEER… for several at once (first to boot wins); auto: the cheapest host to build the VM's image at (embot place), built there first. On a VM being pre-warmed (embot prewarm): optional, one or more of its warmed destinations (default all); the switch happens at once when they are warm", parseDestinations)
      .option('--threshold <ms>', 'threshold time for this migration: above it the planner adds data paths (default: the VM\'s or the agent\'s)', parseThreshold)
      .option('--retries <n>', 'when no destination boots: try the same set again up to N times (0..5; default 0); given at all, a single --to runs as a fan-out too', parseRetries)
      .option('--fallback <peers>', 'PEER,PEER…: when no destination of --to booted (after the retries), try these once', parseFallback)
      .option('--count <n>', 'with --to auto: N destinations at once whose network paths from here share no switch/router (the topology config), best-ranked first; a fan-out', parseCount)
      .option('--no-wait', 'start the migration, print its id and return'),
  ).action(async (vm: string, opts: MigrateFlags) => {
    setExitCode(await runMigrate(vm, opts, ctx));
  });

  clientOptions(program.command('migrations').description('list running and past migrations with their outcome')).action(async (opts: ClientFlags) => {
    const list = await ctx.client(opts).listMigrations();
    if (opts.json) ctx.json(list);
    else ctx.out(renderMigrations(list, Date.now()) + renderPrewarms(list));
  });
}

/**
 * `--to b` stays one peer name, sent as today; `--to b,c,…` becomes a list. What the list alone
 * shows wrong (empty, a blank or repeated name) is refused here, before the agent is asked; the
 * agent checks the rest (itself, unknown peers).
 */
export function parseDestinations(raw: string): Destinations {
  notAFlag(raw);
  try {
    const names = parseDestinationList(raw);
    return raw.includes(',') ? names : names[0]!;
  } catch (e) {
    // Commander prints an InvalidArgumentError as a usage error (exit 2); the code goes along.
    if (isEmbotError(e)) throw new InvalidArgumentError(`${e.message} [${e.code}]`);
    throw e;
  }
}

/** `--retries`: a whole number 0..5. */
export function parseRetries(raw: string): number {
  const n = Number(raw);
  if (!/^\d+$/.test(raw.trim()) || n > MAX_CLI_RETRIES) throw new InvalidArgumentError(`--retries must be a whole number from 0 to ${MAX_CLI_RETRIES}, got '${raw}'`);
  return n;
}

const MAX_CLI_RETRIES = 5;

/**
 * Commander gives a flag that follows a value-less `--to` to it as its value (`--to --json`); no
 * peer name starts with '-' (config AGENT_NAME), so that is the missing value, said here rather
 * than as an unknown peer from the agent, or no agent at all.
 */
function notAFlag(raw: string): void {
  if (raw.startsWith('-')) throw new InvalidArgumentError(`expected PEER[,PEER…], got the flag '${raw}': the value is missing`);
}

/** `--fallback d,e`: a list by the same rules as `--to` (the agent checks it against its peers). */
export function parseFallback(raw: string): readonly string[] {
  notAFlag(raw);
  try {
    return parseDestinationList(raw);
  } catch (e) {
    if (isEmbotError(e)) throw new InvalidArgumentError(`--fallback: ${e.message} [${e.code}]`);
    throw e;
  }
}

function describeDestinations(to: Destinations | undefined): string {
  if (to === undefined) return 'its pre-warmed destinations';
  return typeof to === 'string' ? to : to.join(', ');
}

async function runMigrate(vm: string, flags: MigrateFlags, ctx: CliContext): Promise<number> {
  const client = ctx.client(flags);
  // `--to auto` (issue 14): the host where building the VM's image costs the network least, built there first.
  // `--to auto --count N` (issue 13 point 5): N destinations on node-disjoint paths; `--to b,c`: a warning when they share a node.
  if (flags.count !== undefined && flags.to !== 'auto') throw new EmbotError(ErrorCodes.DESTINATIONS_INVALID, '--count goes with --to auto only', { details: { problem: 'count', names: [] } });
  const choice = flags.to === 'auto' && flags.count !== undefined ? await chooseAuto(client, vm, flags.count) : undefined;
  const shared = Array.isArray(flags.to) ? await sharedOf(client, flags.to as readonly string[]) : [];
  if (!flags.json && choice) ctx.out(renderChoice(choice));
  if (!flags.json && shared.length > 0) ctx.out(renderShared(shared));
  const topologyNote = choice ? { destinationChoice: choice } : shared.length > 0 ? { sharedNodes: shared } : {};
  const opts = choice ? { ...flags, to: choice.chosen } : flags.to === 'auto' ? { ...flags, to: await autoDestination(client, vm, ctx, !flags.json) } : flags;
  const { id } = await client.migrate(vm, opts.to, {
    ...(opts.threshold === undefined ? {} : { thresholdMs: opts.threshold }),
    ...(opts.retries === undefined ? {} : { retries: opts.retries }),
    ...(opts.fallback === undefined ? {} : { fallback: opts.fallback }),
  });
  if (!opts.wait) {
    if (opts.json) ctx.json({ id, ...topologyNote });
    else ctx.out(`migration ${id} started: vm ${vm} → ${describeDestinations(opts.to)} (follow it with \`embot migrations\`)`);
    return 0;
  }
  let final: MigrationInfo;
  if (opts.json) {
    final = await waitForEnd(client, id);
    ctx.json({ ...final, ...topologyNote });
  } else {
    ctx.out(`migrating vm ${vm} to ${describeDestinations(opts.to)} (migration ${id})`);
    final = await followProgress(client, id, ctx);
    ctx.out(renderMigrationSummary(final));
  }
  return final.outcome === 'completed' ? 0 : 1;
}

/** Long-polls the agent; each poll is bounded server-side, so a long migration takes several. */
async function waitForEnd(client: ControlClient, id: string): Promise<MigrationInfo> {
  for (;;) {
    const info = await client.waitMigration(id);
    if (info.outcome !== null) return info;
  }
}

/**
 * Polls the migration until it ends. On a terminal the progress is one line rewritten in place;
 * into a pipe or file, rewriting would leave `\r` litter, so it prints a line per phase instead.
 */
async function followProgress(client: ControlClient, id: string, ctx: CliContext): Promise<MigrationInfo> {
  const tty = isTty(ctx.io.stdout);
  const started = Date.now();
  let lastPhase: string | undefined;
  for (;;) {
    const info = await client.getMigration(id);
    const line = progressLine(info, Date.now() - started);
    if (tty) ctx.io.stdout.write(`\r\x1b[2K${line}`);
    else if (info.phase !== lastPhase) ctx.out(line);
    lastPhase = info.phase;
    if (info.outcome !== null) {
      if (tty) ctx.io.stdout.write('\n');
      return info;
    }
    await new Promise((resolve) => setTimeout(resolve, PROGRESS_POLL_MS));
  }
}

function isTty(stream: CliContext['io']['stdout']): boolean {
  return (stream as { isTTY?: unknown }).isTTY === true;
}

/**
 * One progress line: elapsed time, phase, bytes moved, percent of memory copied.
 *
 * @example
 * ```ts
 * progressLine(info, 1200); // '[1.2s] migratingVm  12.5 MiB  45%'
 * ```
 */
export function progressLine(info: MigrationInfo, elapsedMs: number, now = Date.now()): string {
  const parts = [`[${(elapsedMs / 1000).toFixed(1)}s]`, info.phase];
  const p = info.progress;
  if (p) {
    // Several destinations: whose copy the figures are (the one furthest along).
    if (p.leading !== undefined) parts.push(`${p.leading} leading`);
    const copy = copyNote(p, now);
    if (copy !== undefined) parts.push(copy);
    parts.push(formatBytes(p.bytes), `${Math.floor(p.percent)}%`);
    // Pre-copy: which round, what is left, how fast it goes out and comes back dirty.
    if (p.round !== undefined) parts.push(`round ${p.round}`);
    if (p.remainingBytes !== undefined) parts.push(`left ${formatBytes(p.remainingBytes)}`);
    if (p.rateBytesPerSec !== undefined) parts.push(`${formatBytes(p.rateBytesPerSec)}/s`);
    if (p.dirtyRateBytesPerSec !== undefined) parts.push(`dirty ${formatBytes(p.dirtyRateBytesPerSec)}/s`);
    if (p.expectedDowntimeMs !== undefined) parts.push(`expected downtime ${formatMs(p.expectedDowntimeMs)}`);
  }
  return parts.join('  ');
}

/**
 * The copy's phase where the figures alone would look stuck: paused for the hand-over or in the
 * stop-and-copy (QEMU may report nothing until it completes; the figures are those at the stop),
 * with how long it has been there; `copy completed` once the figures are final.
 */
function copyNote(p: NonNullable<MigrationInfo['progress']>, now: number): string | undefined {
  if (p.copyPhase === 'completed') return 'copy completed';
  if (p.copyPhase !== 'pre-switchover' && p.copyPhase !== 'stop-and-copy') return undefined;
  return `${p.copyPhase} ${p.copyPhaseSince === undefined ? '' : `for ${formatMs(now - p.copyPhaseSince)}`}`.trim();
}

/** The end-of-migration report: outcome, time per phase, what moved, downtime. */
export function renderMigrationSummary(info: MigrationInfo): string {
  const s = info.summary;
  const rows: [string, string][] = [];
  if (s === undefined) {
    rows.push(['migration', `${info.id} (${info.role}, vm ${info.vm}, peer ${info.peer})`]);
    rows.push(['outcome', info.outcome ?? 'running']);
    rows.push(['phase', info.phase]);
    if (info.reason !== undefined) rows.push(['reason', info.reason]);
    return renderRows(rows);
  }
  rows.push(['migration', `${s.migrationId} (vm ${s.vm}: ${s.from} → ${s.to})`]);
  rows.push(['outcome', s.outcome]);
  if (s.reason !== undefined) rows.push(['reason', s.reason]);
  if (s.destinations !== undefined) {
    // Several destinations: who won, and how each of every attempt ended and why.
    rows.push(['winner', s.winner ?? 'none (the VM runs here again, nothing lost)']);
    rows.push(['retries', String(s.retries ?? 0)]);
    // A pre-warm: the total counts the warm time; the switch is what the command waited for.
    if (typeof s.commandedMs === 'number') rows.push(['pre-warm', `warm ${formatMs(s.commandedMs)} before the command; switched ${formatMs(Math.max(0, s.totalMs - s.commandedMs))} after it`]);
    for (const [i, d] of s.destinations.entries()) {
      const boot = d.bootReadyMs === null ? '' : `, booted at ${formatMs(d.bootReadyMs)}`;
      rows.push([i === 0 ? 'destinations' : '', `${d.name} (try ${d.attempt + 1}): ${d.outcome}${boot}, ${formatBytes(d.bytes)}${d.reason ? ` — ${d.reason}` : ''}`]);
    }
  }
  if (s.imageBuild !== undefined) {
    // Issue 14: the VM's image built at the target before anything moved.
    const b = s.imageBuild;
    const from = Object.entries(b.bySource).map(([src, n]) => `${formatBytes(n)} from ${src}`).join(', ');
    rows.push(['image', b.alreadyThere ? `${b.image} already at ${b.host}` : `${b.image} built at ${b.host} in ${formatMs(b.ms)}: ${formatBytes(b.bytesFetched)} fetched${from ? ` (${from})` : ''}, ${formatBytes(b.bytesLocal)} already there`]);
  }
  rows.push(['total time', formatMs(s.totalMs)]);
  const phaseWidth = Math.max(0, ...s.phases.map((p) => p.phase.length));
  s.phases.forEach((p, i) => rows.push([i === 0 ? 'phases' : '', `${p.phase.padEnd(phaseWidth)}  ${formatMs(p.ms)}`]));
  rows.push(['embots moved', String(s.embots)]);
  rows.push(['events moved', String(s.events)]);
  const names = s.modules.map((m) => m.split('#')[0]!);
  rows.push(['modules', `${s.modules.length}, ${s.modulesShipped} shipped${names.length > 0 ? ` (${names.join(', ')})` : ''}`]);
  rows.push(['dirty rounds', String(s.dirtyRounds)]);
  // Zero pages go as indexes (sim): said apart, or an untouched VM reads as "memory 0 B".
  const zeros = typeof s.precopy?.zeroBytes === 'number' && s.precopy.zeroBytes > 0 ? `, and ${formatBytes(s.precopy.zeroBytes)} of zero pages as indexes` : '';
  rows.push(['bytes', `${formatBytes(s.bytes)} (memory ${formatBytes(s.memoryBytes)}${zeros})`]);
  // What the hypervisor expected when it stopped the VM, beside what it was (the --json summary has both).
  const expected = typeof s.precopy?.expectedDowntimeMs === 'number' ? ` (expected ${formatMs(s.precopy.expectedDowntimeMs)})` : '';
  rows.push(['downtime', s.downtimeMs === null ? 'n/a (the VM did not move)' : `${formatMs(s.downtimeMs)}${expected}`]);
  if (s.estimateMs !== null) {
    // The estimate is of the memory move; the connection, state and commit phases come on top.
    // A record stored by an older agent has no copyMs.
    const actual = typeof s.precopy?.copyMs !== 'number' ? `actual ${formatMs(s.totalMs)}` : `actual ${formatMs(s.precopy.copyMs)} for the memory, ${formatMs(s.totalMs)} in all`;
    rows.push(['estimate', `${formatMs(s.estimateMs)} vs threshold ${formatMs(s.thresholdMs ?? 0)}${s.plan ? ` (${s.plan.thresholdFrom})` : ''}; ${actual}`]);
  }
  if (s.plan) {
    rows.push(['paths', `${s.paths}: ${s.plan.paths.join(', ')}`]);
    s.plan.decisions.forEach((d, i) => rows.push([i === 0 ? 'decisions' : '', d]));
  }
  if (s.precopy) {
    const p = s.precopy;
    // qemu: whether the stream went through the source agent's relay (a fan-out to several) or straight to the target.
    const held = p.relayHeldMs ? ` (which waited ${formatMs(p.relayHeldMs)} for this destination)` : '';
    const stream = p.transport === undefined ? '' : p.transport === 'relay' ? `, stream through the relay${held}` : ', stream direct';
    rows.push(['pre-copy', `${s.rounds} round${s.rounds === 1 ? '' : 's'}, ${p.converged ? 'converged' : 'stopped at the round limit'}, ${formatBytes(p.rateBytesPerSec)}/s, copy downtime ${formatMs(p.copyDowntimeMs)}${stream}`]);
    // The two rates are the sim's setting but qemu's measurement (which a throttled guest can still raise): both, as seen, with no arrow that reads as cause and effect.
    if (p.throttled) rows.push(['auto-converge', `throttled ${p.throttleSteps} step${p.throttleSteps === 1 ? '' : 's'}; dirty rate ${formatBytes(p.initialDirtyRate)}/s at the start, ${formatBytes(p.finalDirtyRate)}/s at the stop`]);
    if (p.resent > 0) rows.push(['re-sent', `${p.resent} page batch${p.resent === 1 ? '' : 'es'}`]);
    for (const path of p.perPath) rows.push(['', `path ${path.name}: ${formatBytes(path.bytes)} in ${path.batches} batches${path.failed ? ' (failed, its batches went on the others)' : ''}`]);
  }
  if (s.udp) rows.push(['udp', `${s.udp.handedOver} packets buffered offline and handed over, ${s.udp.dropped} dropped, max added latency ${formatMs(s.udp.maxBufferedLatencyMs)}`]);
  // Counted on while the source forwards (grace period): a later `embot migrations ID` shows more.
  rows.push(['forwarded', `${s.forwarded} event${s.forwarded === 1 ? '' : 's'}${s.deadLettered ? `; ${s.deadLettered} dead letter${s.deadLettered === 1 ? '' : 's'} (the grace period ended first; embot events dead)` : ''}`]);
  return renderRows(rows);
}

export function renderMigrations(list: readonly MigrationInfo[], now: number): string {
  if (list.length === 0) return 'no migrations yet (start one with `embot migrate VM --to PEER`)\n';
  return formatTable(
    ['ID', 'ROLE', 'VM', 'PEER', 'PHASE', 'OUTCOME', 'STARTED', 'DURATION', 'REASON'],
    list.map((m) => [
      m.id,
      m.role,
      m.vm,
      m.peer,
      m.outcome === null && m.progress !== undefined && copyNote(m.progress, now) !== undefined ? `${m.phase} (${copyNote(m.progress, now)})` : m.phase,
      m.outcome ?? 'running',
      formatTime(m.startedAt),
      formatMs(m.summary?.totalMs ?? (m.outcome === null ? now : m.updatedAt) - m.startedAt),
      // Wide enough for a fan-out loser's `terminated: c booted first (migration m-…)`.
      truncate(m.reason ?? '', 100),
    ]),
  );
}

/** `12 ms`, `1.23 s`, then `1m33s`: migrations are short, so milliseconds matter. */
function formatMs(ms: number): string {
  const v = Math.max(0, ms);
  if (v < 1000) return `${Math.round(v)} ms`;
  if (v < 60_000) return `${(v / 1000).toFixed(2)} s`;
  return formatDuration(v);
}

/** `key:` rows aligned like `embot status`; a row with an empty key continues the one above. */
function renderRows(rows: readonly (readonly [string, string])[]): string {
  const width = Math.max(...rows.map(([k]) => k.length)) + 1;
  return rows.map(([k, v]) => `${(k === '' ? '' : `${k}:`).padEnd(width)}  ${v}`).join('\n') + '\n';
}

/** `--threshold`: milliseconds, or with a unit (`500ms`, `2s`, `1m`). */
export function parseThreshold(raw: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*(ms|s|m)?$/.exec(raw.trim());
  if (!m) throw new InvalidArgumentError(`'${raw}' is not a duration (e.g. 1500, 500ms, 2s, 1m)`);
  const ms = Number(m[1]) * (m[2] === 's' ? 1000 : m[2] === 'm' ? 60_000 : 1);
  if (!(ms >= 1)) throw new InvalidArgumentError(`threshold must be at least 1 ms`);
  return Math.round(ms);
}
