import type { Command } from 'commander';
import type { AgentStatus, EmbotInfo, PluginInfo } from '../control/control-api.ts';
import type { DirectoryStatus } from '../peers/peer-directory.ts';
import { clientOptions, type CliContext, type ClientFlags } from './context.ts';
import { formatDuration, formatTable, formatValue, truncate } from './format.ts';

/** `embot status`, `embot embots`, `embot plugins`. */
export function registerInfoCommands(program: Command, ctx: CliContext): void {
  clientOptions(program.command('status').description("show the agent's identity, uptime and counters")).action(async (opts: ClientFlags) => {
    const status = await ctx.client(opts).status();
    if (opts.json) ctx.json(status);
    else ctx.out(renderStatus(status));
  });

  clientOptions(program.command('peers').description('list the peer agents this agent knows, with where each came from (config or etcd)')).action(async (opts: ClientFlags) => {
    const status = await ctx.client(opts).status();
    const directory = status.directory ?? { kind: 'static' as const, state: 'static' as const, peers: (status.destinations?.peers ?? []).map((name) => ({ name, url: '', source: 'config' as const })) };
    if (opts.json) ctx.json(directory);
    else ctx.out(renderPeers(directory));
  });

  clientOptions(program.command('embots').description('list embots with their policies and states')).action(async (opts: ClientFlags) => {
    const embots = await ctx.client(opts).listEmbots();
    if (opts.json) ctx.json(embots);
    else ctx.out(renderEmbots(embots));
  });

  clientOptions(program.command('plugins').description('list management modules (plugins) and their status')).action(async (opts: ClientFlags) => {
    const plugins = await ctx.client(opts).listPlugins();
    if (opts.json) ctx.json(plugins);
    else ctx.out(renderPlugins(plugins));
  });
}

export function renderStatus(s: AgentStatus): string {
  const c = s.counts;
  const rows: [string, string][] = [
    ['agent', `${s.name} (embot ${s.version}, pid ${s.pid})`],
    ['uptime', formatDuration(s.uptimeMs)],
    ['control', `http://${s.control.host.includes(':') ? `[${s.control.host}]` : s.control.host}:${s.control.port}`],
    ['driver', s.driver],
    ['mode', s.safe ? 'safe (no plugins loaded)' : 'normal'],
    ['data dir', s.dataDir],
    ['plugins dir', s.pluginsDir],
    ['vms', String(c.vms)],
    ['elements', String(c.elements)],
    ['embots', `${c.embots}${c.quarantinedEmbots > 0 ? ` (${c.quarantinedEmbots} quarantined)` : ''}`],
    ['modules', `${c.modules}${c.modulesWithErrors > 0 ? ` (${c.modulesWithErrors} with errors)` : ''}`],
    ['events', `${c.queuedEvents} queued, ${c.heldEvents} held, ${c.parkedEvents} waiting for a module, ${c.deadLetters} dead letters`],
    ...(s.directory ? [['directory', describeDirectory(s.directory)] as [string, string]] : []),
  ];
  const width = Math.max(...rows.map(([k]) => k.length));
  return rows.map(([k, v]) => `${`${k}:`.padEnd(width + 1)}  ${v}`).join('\n') + '\n';
}

function describeDirectory(d: DirectoryStatus): string {
  const etcd = d.peers.filter((p) => p.source === 'etcd').length;
  const counts = `${d.peers.length} peer(s)${d.kind === 'etcd' ? `, ${etcd} from etcd` : ''}`;
  return d.kind === 'static' ? `static (config), ${counts}` : `etcd, ${d.state}, ${counts}${d.lastError ? ` (${d.lastError.code})` : ''}`;
}

export function renderPeers(d: DirectoryStatus): string {
  const head = d.kind === 'static' ? 'directory: static (config)\n' : `directory: etcd, ${d.state}${d.lastError ? ` — ${d.lastError.message} [${d.lastError.code}]` : ''}\n`;
  if (d.peers.length === 0) return `${head}no peers (--peers, or --etcd to find them in etcd)\n`;
  return head + formatTable(['NAME', 'URL', 'SOURCE'], d.peers.map((p) => [p.name, p.url, p.source]));
}

export function renderEmbots(embots: readonly EmbotInfo[]): string {
  if (embots.length === 0) return 'no embots (create a VM, or check `embot plugins`)\n';
  return formatTable(
    ['ID', 'MODULE', 'TYPE', 'ELEMENTS', 'STATUS', 'POLICIES', 'ERROR'],
    embots.map((e) => [
      e.id,
      e.module,
      e.type,
      e.elementIds.join(','),
      e.status,
      e.policies.map((p) => `${p.name}=${truncate(formatValue(p.state), 40)}`).join(' '),
      truncate(e.error ?? '', 80),
    ]),
  );
}

export function renderPlugins(plugins: readonly PluginInfo[]): string {
  if (plugins.length === 0) return 'no plugins loaded (drop a module folder into the plugins dir)\n';
  return formatTable(
    ['NAME', 'VERSION', 'STATUS', 'EMBOT TYPES', 'RESTARTS', 'HASH', 'ERROR'],
    plugins.map((p) => [p.name, p.version, p.status, p.embotTypes.join(','), String(p.restarts), truncate(p.hash, 12), truncate(p.error ?? '', 80)]),
  );
}
