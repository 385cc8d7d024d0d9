import { rejection } from '../harness/expect-code.ts';
import { writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { stringify } from 'yaml';
import { ErrorCodes } from '../../core/errors.ts';
import { runningPid, vmFiles } from '../../effectors/hypervisor/qemu/qemu-process.ts';
import { AgentProcess, runCli, makeSandbox, waitFor } from '../harness/agent-process.ts';
import { qemuAgentConfig, qemuProcesses, requireQemu, type QemuAgentSettings } from '../harness/qemu-processes.ts';

const run = requireQemu();
const qemus = qemuProcesses();
const agents: AgentProcess[] = [];
afterEach(async () => {
  for (const a of agents.splice(0)) await a.kill().catch(() => {});
  await qemus.killAll();
});

const MiB = 1024 * 1024;



/** One agent --driver qemu with its VM dirs under a tracked root. */
async function qemuAgent(settings: QemuAgentSettings = {}): Promise<{ a: AgentProcess; root: string; box: ReturnType<typeof makeSandbox> }> {
  const box = makeSandbox();
  const root = qemus.root();
  const configFile = join(box.root, 'q.yaml');
  writeFileSync(configFile, stringify(qemuAgentConfig(root, 'q', settings)));
  const a = await AgentProcess.start({ name: 'q', dataDir: box.dataDir('q'), pluginsDir: box.pluginsDir, extraArgs: ['--config', configFile] });
  agents.push(a);
  return { a, root, box };
}

describe.skipIf(!run)('bad input to an agent --driver qemu: a coded error, nothing started, the agent keeps running', () => {
  it('a VM spec with a missing or corrupt disk or boot image: VM_IMAGE (API and CLI), no VM, no QEMU', { timeout: 120_000 }, async () => {
    const { a, root, box } = await qemuAgent();
    const torn = join(box.root, 'torn.img');
    writeFileSync(torn, Buffer.alloc(1000, 1)); // not whole 512-byte sectors
    const fakeQcow2 = join(box.root, 'fake.qcow2');
    writeFileSync(fakeQcow2, Buffer.alloc(4096, 7)); // no qcow2 header
    for (const bad of [{ image: join(box.root, 'missing.img') }, { image: torn }, { image: fakeQcow2 }, { boot: join(box.root, 'missing-boot.img') }]) {
      const e = await rejection(a.client.createVm({ name: 'bad', memory: 32 * MiB, ...bad }));
      expect(e.code, JSON.stringify(bad)).toBe(ErrorCodes.VM_IMAGE);
      expect(e.message).toContain(Object.values(bad)[0]);
      expect((e.details as { status: number }).status).toBeGreaterThanOrEqual(400);
      expect((e.details as { status: number }).status).toBeLessThan(500);
    }
    const cli = await runCli(['vm', 'create', 'bad', '--image', torn, '--agent', a.url]);
    expect(cli.code).toBe(1);
    expect(cli.stderr).toContain(ErrorCodes.VM_IMAGE);
    expect(await a.client.listVms()).toEqual([]);
    expect(qemus.live()).toEqual([]);
    // Still serving, and a good VM still runs.
    expect((await a.client.status()).driver).toBe('qemu');
    await a.client.createVm({ name: 'good', memory: 32 * MiB });
    expect((await a.client.vmAction('good', 'start')).state).toBe('running');
    expect(runningPid(join(root, 'q', 'good'))).toBeGreaterThan(0);
  });

  it('an image that becomes corrupt after create: start is refused with VM_IMAGE, the VM stays stopped', { timeout: 120_000 }, async () => {
    const { a, box } = await qemuAgent();
    const disk = join(box.root, 'disk.img');
    writeFileSync(disk, Buffer.alloc(1 * MiB));
    await a.client.createVm({ name: 'd', memory: 32 * MiB, image: disk });
    writeFileSync(disk, Buffer.alloc(777)); // truncated under the VM
    const e = await rejection(a.client.vmAction('d', 'start'));
    expect(e.code).toBe(ErrorCodes.VM_IMAGE);
    expect((await a.client.listVms()).map((v) => `${v.name}:${v.state}`)).toEqual(['d:created']);
    expect(qemus.live()).toEqual([]);
    expect((await a.client.status()).driver).toBe('qemu');
  });

  it('a QEMU binary that is missing (qemu.binary): start is QEMU_MISSING naming the package, the agent keeps running', { timeout: 120_000 }, async () => {
    const { a } = await qemuAgent({ binary: '/nonexistent/qemu-system-x86_64' });
    await a.client.createVm({ name: 'nb', memory: 32 * MiB });
    const e = await rejection(a.client.vmAction('nb', 'start'));
    expect(e.code).toBe(ErrorCodes.QEMU_MISSING);
    expect(e.message).toMatch(/qemu-system-x86/);
    const cli = await runCli(['vm', 'start', 'nb', '--agent', a.url]);
    expect(cli.code).toBe(1);
    expect(cli.stderr).toContain(ErrorCodes.QEMU_MISSING);
    expect((await a.client.listVms()).map((v) => `${v.name}:${v.state}`)).toEqual(['nb:created']);
    expect(qemus.live()).toEqual([]);
    expect((await a.client.status()).driver).toBe('qemu');
  });

  it('a QEMU whose monitor does not answer at the restart (another client holds it): REATTACH_FAILED logged, the agent runs, and the VM is listed again, same QEMU, once it answers', { timeout: 120_000 }, async () => {
    const { a, root, box } = await qemuAgent({ stepTimeoutMs: 1000 });
    await a.client.createVm({ name: 'h', memory: 32 * MiB });
    await a.client.vmAction('h', 'start');
    const pid = runningPid(join(root, 'q', 'h'))!;
    await a.kill();
    // QEMU serves one QMP client at a time: this one gets the monitor once the dead agent's is gone.
    const squatter = net.createConnection({ path: vmFiles(join(root, 'q', 'h')).qmp });
    await new Promise<void>((resolve, reject) => squatter.once('data', () => resolve()).once('error', reject));
    const configFile = join(box.root, 'q.yaml');
    const a2 = await AgentProcess.start({ name: 'q', dataDir: box.dataDir('q'), pluginsDir: box.pluginsDir, extraArgs: ['--config', configFile] });
    agents.push(a2);
    try {
      expect(a2.stderr).toContain('REATTACH_FAILED');
      expect((await a2.client.listVms()).map((v) => v.name)).toEqual([]);
      expect((await a2.client.status()).driver).toBe('qemu');
    } finally {
      squatter.destroy();
    }
    await waitFor(async () => ((await a2.client.listVms()).find((v) => v.name === 'h')?.state === 'running' ? true : undefined), 30_000, 'h listed running');
    expect(runningPid(join(root, 'q', 'h'))).toBe(pid);
    expect(qemus.live()).toEqual([pid]);
    // Driven through the new connection.
    expect((await a2.client.vmAction('h', 'stop')).state).toBe('stopped');
  });
});
