import { afterEach, describe, expect, it } from 'vitest';
import { rejection } from '../harness/expect-code.ts';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { AgentProcess, runCli, makeSandbox, waitFor } from '../harness/agent-process.ts';
import { qemuAgentConfig, qemuProcesses, requireQemu } from '../harness/qemu-processes.ts';
import { runningPid } from '../../effectors/hypervisor/qemu/qemu-process.ts';
import { ErrorCodes } from '../../core/errors.ts';

const hasQemu = requireQemu();
const qemus = qemuProcesses();
const agents: AgentProcess[] = [];
afterEach(async () => {
  for (const a of agents.splice(0)) await a.kill().catch(() => {});
  await qemus.killAll();
});

const MiB = 1024 * 1024;



describe('agent --driver', () => {
  it('sim: refuses what only qemu does with VM_SPEC_INVALID naming the flag, creates nothing, keeps running', async () => {
    const box = makeSandbox();
    const a = await AgentProcess.start({ name: 's', dataDir: box.dataDir('s'), pluginsDir: box.pluginsDir });
    agents.push(a);
    expect((await a.client.status()).driver).toBe('sim');
    const e = await rejection(a.client.createVm({ name: 'v', image: '/tmp/disk.qcow2' }));
    expect(e.code).toBe(ErrorCodes.VM_SPEC_INVALID);
    expect(e.details).toMatchObject({ status: 400 });
    expect(e.message).toMatch(/sim driver .* image/);
    const cli = await runCli(['vm', 'create', 'w', '--boot', 'boot.img', '--agent', a.url]);
    expect(cli.code).toBe(1);
    expect(cli.stderr).toContain(ErrorCodes.VM_SPEC_INVALID);
    expect(cli.stderr).toMatch(/boot/);
    expect(await a.client.listVms()).toEqual([]);
    // The sim's capabilities answer as before.
    await a.client.createVm({ name: 'ok', memory: MiB });
    expect((await a.client.setVmLoad('ok', 0.5)).name).toBe('ok');
    expect((await a.client.vmChecksum('ok')).sha256).toMatch(/^[0-9a-f]{64}$/);
  });

  it.skipIf(!hasQemu)(
    'qemu: no load knob, no checksum (DRIVER_UNSUPPORTED, HTTP 501, CLI exit 1); sim-only fields refused; a SIGKILLed agent re-attaches to its running QEMU at start',
    { timeout: 120_000 },
    async () => {
      const box = makeSandbox();
      const root = qemus.root();
      const configFile = join(box.root, 'q.yaml');
      writeFileSync(configFile, stringify(qemuAgentConfig(root, 'q')));
      const opts = { name: 'q', dataDir: box.dataDir('q'), pluginsDir: box.pluginsDir, extraArgs: ['--config', configFile] };
      let a = await AgentProcess.start(opts);
      agents.push(a);
      expect((await a.client.status()).driver).toBe('qemu');

      const spec = await rejection(a.client.createVm({ name: 'v', dirtyRate: MiB }));
      expect(spec.code).toBe(ErrorCodes.VM_SPEC_INVALID);
      expect(spec.message).toMatch(/qemu driver .* dirtyRate/);

      const created = await a.client.createVm({ name: 'v', memory: 32 * MiB });
      expect(created).toMatchObject({ name: 'v', state: 'created', memory: 32 * MiB, vcpus: 1 });
      expect((await a.client.vmAction('v', 'start')).state).toBe('running');
      const pid = runningPid(join(root, 'q', 'v'));
      expect(pid).toBeGreaterThan(0);

      for (const [call, capability] of [
        [a.client.setVmLoad('v', 0.5), 'loadKnob'],
        [a.client.vmChecksum('v'), 'memoryChecksum'],
      ] as const) {
        const e = await rejection(call);
        expect(e.code).toBe(ErrorCodes.DRIVER_UNSUPPORTED);
        expect(e.details).toMatchObject({ status: 501, driver: 'qemu', capability });
      }
      const cli = await runCli(['vm', 'load', 'v', '0.5', '--agent', a.url]);
      expect(cli.code).toBe(1);
      expect(cli.stderr).toContain(ErrorCodes.DRIVER_UNSUPPORTED);
      // Refused, not broken: the agent and the VM go on.
      expect((await a.client.listVms()).map((v) => [v.name, v.state])).toEqual([['v', 'running']]);

      // VMs outlive the agent: after a SIGKILL the next agent takes the same QEMU back.
      await a.kill();
      agents.splice(agents.indexOf(a), 1);
      expect(runningPid(join(root, 'q', 'v'))).toBe(pid);
      a = await AgentProcess.start(opts);
      agents.push(a);
      // restoreState is awaited before the control API opens: the VM is there at the first answer.
      expect((await a.client.listVms()).map((v) => [v.name, v.state])).toEqual([['v', 'running']]);
      expect(runningPid(join(root, 'q', 'v'))).toBe(pid);
      // Its element came back with it, and the driver still acts on it.
      expect((await a.client.vmAction('v', 'stop')).state).toBe('stopped');
      await waitFor(() => runningPid(join(root, 'q', 'v')) === undefined, 20_000, 'the QEMU of v to exit after stop');
    },
  );
});
