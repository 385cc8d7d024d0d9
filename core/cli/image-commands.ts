/**
 * `embot images`, `embot image build IMG --on HOST`, `embot place VM --candidates …` (issue 14),
 * and the destination `embot migrate VM --to auto` picks through placement.
 */
import { InvalidArgumentError, type Command } from 'commander';
import type { BuildJob, BuildSummary, ImagesReport, PlacementReport } from '../../images/index.ts';
import type { ControlClient } from '../control/client.ts';
import { ConfigError, EmbotError, ErrorCodes } from '../errors.ts';
import { clientOptions, type CliContext, type ClientFlags } from './context.ts';
import { formatBytes, formatTable } from './format.ts';

const POLL_MS = 200;

interface BuildFlags extends ClientFlags {
  readonly on?: string;
}

interface PlaceFlags extends ClientFlags {
  readonly candidates?: readonly string[];
  readonly policy: string;
  readonly image?: string;
}

function parseHosts(raw: string): string[] {
  const hosts = raw.split(',').map((h) => h.trim());
  if (hosts.some((h) => h === '') || new Set(hosts).size !== hosts.length) throw new InvalidArgumentError(`--candidates must be HOST,HOST… without blanks or repeats, got '${raw}'`);
  return hosts;
}

export function registerImageCommands(program: Command, ctx: CliContext, setExitCode: (code: number) => void): void {
  clientOptions(program.command('images').description("list the images this agent holds (and, on its group's indexer, the group's)")).action(async (opts: ClientFlags) => {
    const report = await ctx.client(opts).images();
    if (opts.json) ctx.json(report);
    else ctx.out(renderImages(report));
  });

  const image = program.command('image').description('image commands');
  clientOptions(
    image
      .command('build <image>')
      .description('build IMAGE at HOST from its cheapest holders (blocks HOST has first); progress, then bytes per source and cost')
      .option('--on <host>', "where to build it, by agent name (default: the agent --agent reaches)"),
  ).action(async (name: string, opts: BuildFlags) => {
    const client = ctx.client(opts);
    const job = await followBuild(client, (await client.startImageBuild(name, opts.on)).id, ctx, !opts.json);
    if (opts.json) ctx.json(job.summary ?? { error: job.error });
    else if (job.summary) ctx.out(renderBuild(job.summary));
    if (job.state === 'failed') {
      if (!opts.json) ctx.io.stderr.write(`error: ${job.error?.code ?? ''}: ${job.error?.message ?? 'build failed'}\n`);
      setExitCode(1);
    }
  });

  clientOptions(
    program
      .command('place [vm]')
      .description("rank candidate hosts for VM (or for --image IMG alone) by the network cost of building its image there, with CPU and free memory beside it")
      .option('--candidates <hosts>', "HOST,HOST… (default: the index group's members but this agent)", parseHosts)
      .option('--policy <policy>', 'cheapest | top:X[:cpu|memory] (best by the metric among the X cheapest) | within:PERCENT[:cpu|memory] (best by the metric among those at most PERCENT % costlier)', 'cheapest')
      .option('--image <name>', "rank for this image instead of the VM's"),
  ).action(async (vm: string | undefined, opts: PlaceFlags) => {
    if (vm === undefined && !opts.image) throw new ConfigError(ErrorCodes.CLI_USAGE, 'place needs a VM or --image IMG: what should be built at the candidates?');
    const report = await ctx.client(opts).place({ ...(vm === undefined ? {} : { vm }), policy: opts.policy, ...(opts.image ? { image: opts.image } : {}), ...(opts.candidates ? { candidates: opts.candidates } : {}) });
    if (opts.json) ctx.json(report.candidates);
    else ctx.out(renderPlacement(report));
  });
}

/** Polls a build until it ends; on a terminal the progress is one line rewritten in place. */
async function followBuild(client: ControlClient, id: string, ctx: CliContext, show: boolean): Promise<BuildJob> {
  const tty = (ctx.io.stderr as { isTTY?: unknown }).isTTY === true;
  for (;;) {
    const job = await client.getImageBuild(id);
    if (show && tty) {
      const p = job.progress;
      const line = p ? `building ${job.image} at ${job.on}: ${formatBytes(p.bytesDone)} / ${formatBytes(p.bytesTotal)} (${p.blocksDone}/${p.blocksTotal} blocks)` : `building ${job.image} at ${job.on}…`;
      ctx.io.stderr.write(`\r\x1b[2K${line}`);
    }
    if (job.state !== 'running') {
      if (show && tty) ctx.io.stderr.write('\n');
      return job;
    }
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

/**
 * `migrate --to auto`: the cheapest host by placement (the group's members but this agent); when
 * the VM has an image, it is built there first, so the VM finds its disk on arrival.
 */
export async function autoDestination(client: ControlClient, vm: string, ctx: CliContext, show: boolean): Promise<string> {
  const ranked = await client.place({ vm });
  const best = ranked.candidates.find((c) => Number.isFinite(c.cost));
  if (!best) throw new EmbotError(ErrorCodes.PLACEMENT_INPUT_INVALID, `no host can build ${ranked.image} (no holder for some of its blocks)`);
  if (show) ctx.out(`auto: ${best.host} (build cost ${best.cost.toFixed(2)}; ${ranked.candidates.length} candidates)`);
  const job = await followBuild(client, (await client.startImageBuild(ranked.image, best.host)).id, ctx, show);
  if (job.state === 'failed') throw new EmbotError(ErrorCodes.BLOCK_UNAVAILABLE, `building ${ranked.image} at ${best.host} failed: ${job.error?.message ?? ''}`);
  if (show && job.summary) ctx.out(`image ${ranked.image} at ${best.host}: ${formatBytes(job.summary.bytesFetched)} fetched, ${formatBytes(job.summary.bytesLocal)} already there`);
  return best.host;
}

export function renderImages(r: ImagesReport): string {
  let out = `host ${r.host} (indexer ${r.indexer}, blocks of ${formatBytes(r.blockSize)})\n`;
  out += r.images.length === 0 ? 'no images (put raw images in the images folder, or build one with `embot image build IMG`)\n' : formatTable(['IMAGE', 'ORIGIN', 'SIZE', 'BLOCKS', 'PATH'], r.images.map((i) => [i.name, i.origin, formatBytes(i.size), String(i.blocks), i.path]));
  const vmDisks = r.vmDisks ?? [];
  if (vmDisks.length > 0) {
    out += `\nVM disks (a qcow2 overlay: the blocks its VM wrote)\n`;
    out += formatTable(['VM', 'DISK', 'FORMAT', 'SIZE', 'BLOCKS', 'PATH'], vmDisks.map((d) => [d.vm, String(d.disk), d.format, formatBytes(d.size), String(d.blocks), d.path]));
  }
  if (r.links !== undefined) {
    out += `\nmeasured links (cost: ms per MiB to here)\n`;
    out += r.links.length === 0 ? 'none fresh (configured costs in use)\n' : formatTable(['PEER', 'RTT', 'THROUGHPUT', 'AGE', 'COST'], r.links.map((l) => [l.peer, `${l.rttMs.toFixed(2)} ms`, l.bytesPerSec === undefined ? 'assumed' : `${formatBytes(l.bytesPerSec)}/s`, `${(l.ageMs / 1000).toFixed(1)} s`, l.cost.toFixed(2)]));
  }
  if (r.group) {
    out += `\ngroup: ${r.group.members.join(', ') || 'no members yet'}\n`;
    if (r.group.images.length > 0) out += formatTable(['IMAGE', 'SIZE', 'HOSTS', 'LIBRARY'], r.group.images.map((i) => [i.name, formatBytes(i.size), i.hosts.join(',') || '-', i.library ? 'yes' : 'no']));
  }
  return out;
}

export function renderBuild(s: BuildSummary): string {
  const rows: string[][] = [['(local)', formatBytes(s.bytesLocal), String(s.blocksLocal)]];
  for (const [src, bytes] of Object.entries(s.bySource)) rows.push([src, formatBytes(bytes), String(s.blocksBySource[src] ?? 0)]);
  let out = `built ${s.image} at ${s.host}: ${formatBytes(s.size)}, ${s.blocks} blocks (${s.distinctBlocks} distinct) in ${s.ms} ms\n`;
  out += formatTable(['SOURCE', 'BYTES', 'BLOCKS'], rows);
  out += `fetched ${formatBytes(s.bytesFetched)} over the network, cost ${s.costPaid.toFixed(2)} (whole image from the library: ${s.wholeImageCost.toFixed(2)})\n`;
  for (const r of s.retries) out += `retried ${r.blocks} block${r.blocks === 1 ? '' : 's'} from ${r.via} elsewhere: ${r.problem} (${r.reason})\n`;
  return out;
}

export function renderPlacement(r: PlacementReport): string {
  const policy = r.policy.kind === 'cheapest' ? 'cheapest' : r.policy.kind === 'top' ? `top ${r.policy.x} by ${r.policy.by}` : `within ${r.policy.percent}% by ${r.policy.by}`;
  return (
    `placement of ${r.image} (${policy}):\n` +
    formatTable(
      ['RANK', 'HOST', 'COST', 'CPU', 'FREE MEMORY', ''],
      r.candidates.map((c, i) => [String(i + 1), c.host, Number.isFinite(c.cost) ? c.cost.toFixed(2) : 'unbuildable', `${Math.round(c.cpu * 100)}%`, formatBytes(c.freeMemory), c.indexed ? '' : '(not in the index)']),
    )
  );
}
