import { existsSync } from 'node:fs';
import { resolve } from 'node:path';
import { InvalidArgumentError, type Command } from 'commander';
import type { CreateVmRequest, VmAction, VmInfo } from '../control/control-api.ts';
import { clientOptions, type CliContext, type ClientFlags } from './context.ts';
import { formatBytes, formatTable } from './format.ts';
import { parsePort, parsePositiveInt, parseSize } from './parse.ts';

interface CreateFlags extends ClientFlags {
  readonly memory?: number;
  readonly dirtyRate?: number;
  readonly vcpus?: number;
  readonly udpPort?: number;
  readonly image?: string;
  readonly boot?: string;
}

/** `embot vm list|create|start|stop|crash|kill|remove|checksum|load`. */
export function registerVmCommands(program: Command, ctx: CliContext): void {
  const vm = program.command('vm').description('list, create, start, stop, crash, kill and remove VMs; set their simulated load');

  clientOptions(vm.command('list').description('list VMs')).action(async (opts: ClientFlags) => {
    const vms = await ctx.client(opts).listVms();
    if (opts.json) ctx.json(vms);
    else ctx.out(renderVms(vms));
  });

  clientOptions(
    vm
      .command('create')
      .description('create a VM (it gets the embots that loaded modules attach to VMs)')
      .argument('<name>', 'VM name (lower-case letters, digits, dashes)')
      .option('--memory <size>', 'memory, e.g. 64M, 1G or bytes', parseSize)
      .option('--dirty-rate <rate>', 'memory dirtied per second while running, e.g. 10M (sim)', parseSize)
      .option('--vcpus <n>', 'virtual CPUs', parsePositiveInt)
      .option('--udp-port <port>', 'UDP service port of the VM (sim)', parsePort)
      .option('--image <file|name>', 'disk image: a file, raw or .qcow2 (qemu), or the name of an image in the agent\'s index (embot images; both drivers)')
      .option('--boot <file>', 'raw image to boot instead of the embot test guest (qemu)'),
  ).action(async (name: string, opts: CreateFlags) => {
    const spec: CreateVmRequest = {
      name,
      ...(opts.memory === undefined ? {} : { memory: opts.memory }),
      ...(opts.dirtyRate === undefined ? {} : { dirtyRate: opts.dirtyRate }),
      ...(opts.vcpus === undefined ? {} : { vcpus: opts.vcpus }),
      ...(opts.udpPort === undefined ? {} : { udpPort: opts.udpPort }),
      // The agent runs on this host, maybe from another directory: it gets absolute paths.
      // A bare name that is no file here is an image of the agent's index (embot images).
      ...(opts.image === undefined ? {} : { image: !opts.image.includes('/') && !existsSync(opts.image) ? opts.image : resolve(opts.image) }),
      ...(opts.boot === undefined ? {} : { boot: resolve(opts.boot) }),
    };
    const info = await ctx.client(opts).createVm(spec);
    if (opts.json) ctx.json(info);
    else ctx.out(`created vm ${info.name}: ${describeVm(info)}`);
  });

  const actions: readonly [VmAction, string][] = [
    ['start', 'start (or restart) a VM'],
    ['stop', 'stop a running VM'],
    ['crash', 'inject a VM crash (drivers with the faults capability: sim, qemu)'],
    ['kill', 'stop a VM at once (kill -9 of its QEMU; the sim stops it): state stopped, reason kill; the watchdog does not restart it'],
  ];
  for (const [action, description] of actions) {
    clientOptions(vm.command(action).description(description).argument('<name>', 'VM name')).action(async (name: string, opts: ClientFlags) => {
      const info = await ctx.client(opts).vmAction(name, action);
      if (opts.json) ctx.json(info);
      else ctx.out(`vm ${info.name}: ${info.state}`);
    });
  }

  clientOptions(
    vm
      .command('remove')
      .description("forget a VM: its driver state (qemu: process, disk overlay, QMP socket dir), its embots and their snapshots, its queued and held events")
      .argument('<name>', 'VM name')
      .option('--force', 'kill a running VM first (without it a running VM is refused: stop or kill it first)')
      .addHelpText('after', '\nA VM in a migration or pre-warm is refused; remove it once that has ended.'),
  ).action(async (name: string, opts: ClientFlags & { readonly force?: boolean }) => {
    const r = await ctx.client(opts).removeVm(name, { force: opts.force === true });
    if (opts.json) ctx.json(r);
    else ctx.out(`removed vm ${r.name} (was ${r.was}${r.killed ? ', killed first' : ''}; ${r.embots} embot${r.embots === 1 ? '' : 's'} ended, ${r.events} event${r.events === 1 ? '' : 's'} discarded)`);
  });

  clientOptions(
    vm
      .command('checksum')
      .description("sha256 of a VM's memory: the same before and after a migration (stop the VM first for a stable value)")
      .argument('<name>', 'VM name'),
  ).action(async (name: string, opts: ClientFlags) => {
    const c = await ctx.client(opts).vmChecksum(name);
    if (opts.json) ctx.json(c);
    else ctx.out(`vm ${c.name} (${c.state}, ${c.memory} bytes): sha256 ${c.sha256}`);
  });

  clientOptions(
    vm
      .command('load')
      .description('set the CPU load (0..1) a sim VM reports while running; the host load follows')
      .argument('<name>', 'VM name')
      .argument('<load>', 'load between 0 and 1, e.g. 0.9', parseLoad),
  ).action(async (name: string, load: number, opts: ClientFlags) => {
    const info = await ctx.client(opts).setVmLoad(name, load);
    if (opts.json) ctx.json(info);
    else ctx.out(`vm ${info.name}: load ${load}${info.state === 'running' ? '' : ` (reported once it runs; it is ${info.state})`}`);
  });
}

export function renderVms(vms: readonly VmInfo[]): string {
  if (vms.length === 0) return 'no VMs (create one with `embot vm create NAME`)\n';
  return formatTable(
    ['NAME', 'STATE', 'MEMORY', 'DIRTY RATE', 'VCPUS', 'CRASHES', 'UDP'],
    vms.map((v) => [v.name, stateOf(v), formatBytes(v.memory), v.dirtyRate === undefined ? '-' : `${formatBytes(v.dirtyRate)}/s`, String(v.vcpus), String(v.crashes), v.udpPort === undefined ? '-' : String(v.udpPort)]),
  );
}

/** A VM still arriving in a migration reads as such, not as one created here and never started. */
function stateOf(v: VmInfo): string {
  return v.incoming === true ? `${v.state} (incoming)` : v.state;
}

function describeVm(v: VmInfo): string {
  const dirty = v.dirtyRate === undefined ? '' : `, dirty rate ${formatBytes(v.dirtyRate)}/s`;
  return `${stateOf(v)}, ${formatBytes(v.memory)}${dirty}, ${v.vcpus} vcpu${v.vcpus === 1 ? '' : 's'}`;
}

/**
 * A VM load as users type it: a number between 0 and 1 (`0.9`, `1`, `.5`); a percentage such
 * as `90%` is the usual mistake, so the message says which form is expected.
 *
 * @example
 * ```ts
 * parseLoad('0.9'); // 0.9
 * ```
 */
export function parseLoad(raw: string): number {
  const s = raw.trim();
  const n = Number(s);
  if (!/^(?:\d+(?:\.\d*)?|\.\d+)$/.test(s) || !(n >= 0 && n <= 1)) throw new InvalidArgumentError('expected a load between 0 and 1, e.g. 0.9 (not a percentage)');
  return n;
}
