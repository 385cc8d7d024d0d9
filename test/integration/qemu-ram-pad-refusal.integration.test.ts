import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../core/errors.ts';
import { writeGuestImage } from '../../effectors/hypervisor/qemu/guest/guest-image.ts';
import { QemuDriver } from '../../effectors/hypervisor/qemu/qemu-driver.ts';
import { pidAlive, qemuArgs, runningPid, vmFiles } from '../../effectors/hypervisor/qemu/qemu-process.ts';
import { RAM_PAD_BYTES } from '../../effectors/hypervisor/qemu/ram-size.ts';
import type { QemuVmSpec } from '../../effectors/hypervisor/qemu/vm-spec.ts';
import { runCli, waitFor } from '../harness/agent-process.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { Cluster, migrate } from '../harness/cluster.ts';
import { rejection } from '../harness/expect-code.ts';
import { QEMU_BINARY, heartbeat, qemuAgentConfig, qemuTestFile } from '../harness/qemu-processes.ts';

/**
 * A VM whose QEMU an older agent started before the RAM pad (ram-size.ts: its RAM exactly the
 * spec's) is re-attached by a driver that pads: its migration out is refused before anything
 * moves, with VM_RESTART_NEEDED, instead of QEMU's broken pipe once the padded target's incoming
 * QEMU refuses the stream. The VM keeps running; after a restart it migrates.
 */
const MiB = 1024 * 1024;
let cluster: Cluster | undefined;
const { run, qemus } = qemuTestFile(async () => {
  await cluster?.stop();
  cluster = undefined;
});
const cleanups = cleanupsAfterEach();

const spec = (name: string): QemuVmSpec => ({ name, memory: 32 * MiB, vcpus: 1, testGuest: { delayLoops: 2000 } });

function driver(root: string): QemuDriver {
  const d = new QemuDriver({ root, accel: 'tcg' });
  cleanups.push(() => d.close());
  return d;
}

/**
 * What an agent before the pad did: the driver's own command line for the spec, but `-m` the spec's
 * memory exactly. Daemonized like the driver's QEMUs; the parent exits once the daemon runs.
 */
function startUnpadded(stateDir: string, s: QemuVmSpec): void {
  writeGuestImage(vmFiles(stateDir).boot, s.testGuest);
  const args = qemuArgs({ stateDir, spec: s, accel: 'tcg', incoming: false });
  const m = args.indexOf('-m');
  expect(args[m + 1]).toBe(`${(s.memory + RAM_PAD_BYTES) / 1024}k`);
  args[m + 1] = `${s.memory / 1024}k`;
  const r = spawnSync(QEMU_BINARY, args, { cwd: stateDir, encoding: 'utf8', timeout: 30_000 });
  expect(r.status, r.stderr).toBe(0);
}

describe.skipIf(!run)('a QEMU started before the RAM pad (TCG)', () => {
  it('its migration out is refused with VM_RESTART_NEEDED before anything moves; the VM keeps running; restarted, it migrates', async () => {
    const root = qemus.root();
    const sourceRoot = join(root, 'src');
    const target = driver(join(root, 'dst'));
    // The VM as an older agent left it: created (spec.json), its QEMU started without the pad.
    const before = driver(sourceRoot);
    await before.create(spec('old-1'));
    await before.close();
    startUnpadded(before.stateDir('old-1'), spec('old-1'));

    const source = driver(sourceRoot);
    await source.restoreState(undefined);
    expect(source.get('old-1')).toMatchObject({ state: 'running' });
    const pid = source.pid('old-1')!;
    expect(await source.qmp('old-1')!.executeRaw('query-memory-size-summary')).toMatchObject({ 'base-memory': 32 * MiB });

    // A real padded target: without the check, this migration would start and fail on QEMU's broken pipe.
    const { endpoint } = await target.prepareIncoming(spec('old-1'));
    let beforeSwitchover = false;
    const refused = await rejection(source.migrateOut('old-1', { endpoint, downtimeLimitMs: 300, beforeSwitchover: async () => void (beforeSwitchover = true) }));
    expect(refused.code).toBe(ErrorCodes.VM_RESTART_NEEDED);
    expect(refused.message).toMatch(/started before the RAM pad/);
    expect(refused.message).toMatch(/embot vm stop old-1, embot vm start old-1/);
    expect(refused.details).toMatchObject({ vm: 'old-1', runningRamBytes: 32 * MiB, targetRamBytes: 32 * MiB + RAM_PAD_BYTES, accel: 'tcg' });
    expect(beforeSwitchover).toBe(false);
    // Nothing started in QEMU, the VM runs on in the same process, and the driver still takes commands.
    expect(await source.qmp('old-1')!.execute('query-migrate')).not.toHaveProperty('status');
    expect(source.get('old-1')).toMatchObject({ state: 'running' });
    expect(source.pid('old-1')).toBe(pid);
    expect(pidAlive(pid)).toBe(true);
    await heartbeat(source.stateDir('old-1'), 2);
    // The target's incoming QEMU saw no stream: still waiting, aborted as a refused migration's rollback would.
    expect(target.get('old-1')).toMatchObject({ state: 'created' });
    await target.abortIncoming('old-1');

    // The fix the message names: one restart here gives a padded QEMU, which migrates.
    await source.stop('old-1');
    await source.start('old-1');
    expect(source.pid('old-1')).not.toBe(pid);
    expect(await source.qmp('old-1')!.executeRaw('query-memory-size-summary')).toMatchObject({ 'base-memory': 32 * MiB + RAM_PAD_BYTES });
    await heartbeat(source.stateDir('old-1'), 2);
    const again = await target.prepareIncoming(spec('old-1'));
    const result = await source.migrateOut('old-1', { endpoint: again.endpoint, downtimeLimitMs: 300 });
    expect(result.bytes).toBeGreaterThan(0);
    expect((await target.commitIncoming('old-1')).state).toBe('running');
    await heartbeat(target.stateDir('old-1'), 2);
  }, 120_000);

  it('a padded QEMU re-attached after an agent restart is not refused: it migrates', async () => {
    const root = qemus.root();
    const sourceRoot = join(root, 'src');
    const target = driver(join(root, 'dst'));
    const first = driver(sourceRoot);
    await first.create(spec('new-1'));
    await first.start('new-1');
    await first.close();
    const source = driver(sourceRoot);
    await source.restoreState(undefined);
    expect(source.get('new-1')).toMatchObject({ state: 'running' });
    await heartbeat(source.stateDir('new-1'), 2);
    const { endpoint } = await target.prepareIncoming(spec('new-1'));
    await source.migrateOut('new-1', { endpoint, downtimeLimitMs: 300 });
    expect((await target.commitIncoming('new-1')).state).toBe('running');
    await heartbeat(target.stateDir('new-1'), 2);
  }, 120_000);

  it('through the agents: a re-attached unpadded VM\'s migration ends aborted with the restart named, the VM runs on at a, nothing at b, the agent serves on', async () => {
    const root = qemus.root();
    cluster = await Cluster.start(['a', 'b'], {
      config: (n) => ({
        ...qemuAgentConfig(root, n),
        mobility: { stepTimeoutMs: 20_000, vmTimeoutMs: 120_000, forwardGraceMs: 10_000, trust: { mode: 'any-authenticated-peer' } },
      }),
    });
    await cluster.agent('a').client.createVm({ name: 'old-2', memory: 32 * MiB });
    await cluster.agent('a').client.vmAction('old-2', 'start');
    const stateA = join(root, 'a', 'old-2');
    await heartbeat(stateA, 1);
    // An agent before the pad: it dies, its QEMU is replaced by one of the bare size, and an agent
    // that pads starts on the same data and re-attaches to it.
    await cluster.kill('a');
    const padded = runningPid(stateA)!;
    process.kill(padded, 'SIGKILL');
    await waitFor(() => !pidAlive(padded), 10_000, 'the padded QEMU gone');
    startUnpadded(stateA, (JSON.parse(readFileSync(vmFiles(stateA).spec, 'utf8')) as { spec: QemuVmSpec }).spec);
    const bare = runningPid(stateA)!;
    const a = await cluster.startAgent('a');
    await waitFor(async () => (await a.client.listVms()).find((v) => v.name === 'old-2' && v.state === 'running'), 20_000, 'old-2 re-attached at a');

    const info = await migrate(a, 'old-2', 'b', { timeoutMs: 120_000 });
    expect(info.outcome).toBe('aborted');
    expect(info.reason).toMatch(/VM old-2 cannot migrate: it was started before the RAM pad/);
    expect(info.reason).toMatch(/Restart the VM once here \(embot vm stop old-2, embot vm start old-2\)/);
    // The CLI says the same and fails.
    const cli = await runCli(['migrate', 'old-2', '--to', 'b', '--agent', a.url]);
    expect(cli.code).toBe(1);
    expect(cli.stdout + cli.stderr).toMatch(/Restart the VM once here/);
    // Nothing moved: the same QEMU runs the guest at a, b has no VM and no QEMU for it, a serves on.
    expect((await a.client.listVms()).map((v) => `${v.name}:${v.state}`)).toEqual(['old-2:running']);
    expect(runningPid(stateA)).toBe(bare);
    await heartbeat(stateA, 2);
    expect((await cluster.agent('b').client.listVms()).map((v) => v.name)).toEqual([]);
    await waitFor(() => runningPid(join(root, 'b', 'old-2')) === undefined, 10_000, "b's incoming QEMU gone");
    expect((await a.client.status()).driver).toBe('qemu');
  }, 240_000);
});
