/**
 * Issue 14's migration test through the agents: three real agents `--driver qemu` (TCG) on
 * loopback, each with its own state and images folders (no shared storage). `a` serves an image
 * library with a small raw image and runs the VM, created with `--image`: its disk is a qcow2
 * overlay on the image. `b` and `c` lack the image; a migration builds it there first, the target's
 * incoming QEMU gets its own overlay on it and exports that over NBD, and a's QEMU mirrors its disk
 * into it while the memory moves.
 *
 * The writes to a's disk go through QEMU's qemu-io on the agent's own QMP connection (the driver's
 * TEST HOOK `EMBOT_TEST_HOOK_MIRROR_WRITES`: before the mirror, after READY, during the memory
 * move, paused at the switch). `c` runs with the FAULT INJECTION `EMBOT_FAULT_NBD_EXPORT_REFUSED=1`:
 * its QEMU's NBD server stops right after exporting, so a's connection is refused for real.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../core/errors.ts';
import { runningPid } from '../../effectors/hypervisor/qemu/qemu-process.ts';
import { waitFor } from '../harness/agent-process.ts';
import { Cluster, migrate } from '../harness/cluster.ts';
import { heartbeat, qemuAgentConfig, qemuTestFile, sparesIn } from '../harness/qemu-processes.ts';

const MiB = 1024 * 1024;
const IMAGE = 4 * MiB;
let cluster: Cluster | undefined;
const { run, qemus } = qemuTestFile(async () => { await cluster?.stop(); cluster = undefined; });

/** The writes the hook makes on a's disk, as qemu-io commands and as the bytes they leave. */
const WRITES = [
  { point: 'beforeMirror', offset: 1 * MiB, length: 128 * 1024, pattern: 0x11 },
  { point: 'afterReady', offset: 0, length: 64 * 1024, pattern: 0x5a },
  { point: 'duringMemory', offset: 3 * MiB, length: 64 * 1024, pattern: 0x77 },
  { point: 'atSwitch', offset: 2 * MiB + 4096, length: 4096, pattern: 0x33 },
] as const;
const hookEnv = JSON.stringify(Object.fromEntries(WRITES.map((w) => [w.point, `write -P 0x${w.pattern.toString(16)} ${w.offset} ${w.length}`])));

/** The disk as the guest sees it (overlay over its base), as raw bytes. */
function guestView(overlay: string, out: string): Buffer {
  execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', overlay, out]);
  return readFileSync(out);
}

function backingOf(overlay: string): string {
  const info = JSON.parse(execFileSync('qemu-img', ['info', '--output', 'json', '-U', overlay], { encoding: 'utf8' })) as { 'backing-filename'?: string };
  return info['backing-filename'] ?? '';
}

describe.skipIf(!run)('a QEMU VM migrated to hosts without its image and without shared storage (four agents, TCG)', () => {
  it('a mirror refused by the target fails before the switch with a coded reason, the VM runs on at a; then a -> b -> d: the image built at each target first, the disk arrives byte-exact with the writes made during the first move, the VM runs at d and its disk is in d\'s index, no QEMU left', async () => {
    const root = qemus.root();
    const library = join(root, 'library');
    mkdirSync(library);
    const base = randomBytes(IMAGE);
    writeFileSync(join(library, 'disk.img'), base);
    // One block as the VM writes it (afterReady: 64 KiB of 0x5a at 0): who holds it is who has that VM's disk.
    writeFileSync(join(library, 'probe.img'), Buffer.alloc(64 * 1024, 0x5a));
    const imagesDir = (n: string): string => join(root, `images-${n}`);
    cluster = await Cluster.start(['a', 'b', 'c', 'd'], {
      env: (n): Record<string, string> => (n === 'a' ? { EMBOT_TEST_HOOK_MIRROR_WRITES: hookEnv } : n === 'c' ? { EMBOT_FAULT_NBD_EXPORT_REFUSED: '1' } : {}),
      config: (n) => ({
        ...qemuAgentConfig(root, n),
        images: { dir: imagesDir(n), blockSize: 65536, indexer: 'a', reindexMs: 300 },
        ...(n === 'a' ? { imageLibrary: library } : {}),
        mobility: { stepTimeoutMs: 30_000, vmTimeoutMs: 180_000, forwardGraceMs: 10_000, trust: { mode: 'any-authenticated-peer' } },
      }),
    });
    const a = cluster.agent('a');
    const b = cluster.agent('b');
    const c = cluster.agent('c');
    const d = cluster.agent('d');
    await waitFor(async () => (await a.client.images()).images.find((i) => i.name === 'disk.img'), 15_000, 'disk.img indexed at a');
    await waitFor(async () => {
      const members = (await a.client.images()).group?.members ?? [];
      return (members.includes('b') && members.includes('c') && members.includes('d')) || undefined;
    }, 15_000, 'b, c and d known to the indexer');

    await a.client.createVm({ name: 'd1', memory: 64 * MiB, image: 'disk.img' });
    const stateA = join(root, 'a', 'd1');
    const overlayA = join(stateA, 'disk0.qcow2');
    // The VM's disk is its own overlay on the library's image, not the image itself.
    expect(backingOf(overlayA)).toBe(join(library, 'disk.img'));
    await a.client.vmAction('d1', 'start');
    await heartbeat(stateA, 1);
    const sourcePid = runningPid(stateA);
    expect(sourcePid).toBeDefined();

    // c builds the image, then refuses the mirror: failed before the switch, nothing moved.
    const refused = await migrate(a, 'd1', 'c', { timeoutMs: 240_000 });
    expect(refused.outcome, JSON.stringify(refused)).not.toBe('completed');
    expect(refused.reason).toContain('disk mirror');
    expect(refused.reason).toContain(ErrorCodes.QEMU_FAILED);
    expect((await a.client.listVms()).map((v) => `${v.name}:${v.state}`)).toEqual(['d1:running']);
    expect(runningPid(stateA)).toBe(sourcePid);
    await heartbeat(stateA, 2);
    expect((await c.client.listVms()).map((v) => v.name)).toEqual([]);
    await waitFor(() => runningPid(join(root, 'c', 'd1')) === undefined, 10_000, "c's incoming QEMU gone");
    // The source holds no mirror job or NBD node after the roll-back (its disk is its own again).
    expect(existsSync(overlayA)).toBe(true);

    // b keeps a spare incoming QEMU of its default shape: without d1's disk, so not adopted for it.
    const bSpare = await waitFor(() => sparesIn(join(root, 'b'))[0], 30_000, "b's spare incoming QEMU");
    const info = await migrate(a, 'd1', 'b', { timeoutMs: 240_000 });
    expect(info.outcome, JSON.stringify(info)).toBe('completed');
    expect(info.summary?.imageBuild).toMatchObject({ image: 'disk.img', host: 'b', alreadyThere: false });
    // The mirror carried what the VM wrote, not the 4 MiB image, which b built itself.
    const mirrored = info.summary?.precopy?.diskMirror;
    expect(mirrored, JSON.stringify(info.summary?.precopy)).toMatchObject({ disks: 1 });
    // Exactly the guest's writes: the one before the mirror as the overlay's clusters (64 KiB-aligned
    // here), the later ones as write-blocking mirrors them.
    expect(mirrored!.bytes).toBe(WRITES.reduce((n, w) => n + w.length, 0));
    const stateB = join(root, 'b', 'd1');
    const overlayB = join(stateB, 'disk0.qcow2');
    expect((await b.client.listVms()).map((v) => `${v.name}:${v.state}`)).toEqual(['d1:running']);
    const targetPid = runningPid(stateB);
    expect(targetPid).toBeDefined();
    expect(targetPid).not.toBe(sourcePid);
    expect(targetPid).not.toBe(bSpare);
    // After the commit b still keeps a spare of the shape without d1's image disk (one with it could
    // not start: the VM holds its overlay's lock), and it is not the VM's QEMU.
    await sleep(1500);
    const spares = await waitFor(() => (sparesIn(join(root, 'b')).length > 0 ? sparesIn(join(root, 'b')) : undefined), 30_000, "b's spare after the commit");
    expect(spares).not.toContain(targetPid);
    await heartbeat(stateB, 2);
    // b's disk is an overlay on b's own copy of the image (built there), not on a's or the library's.
    expect(backingOf(overlayB)).toBe(join(imagesDir('b'), 'disk.img'));
    expect(readFileSync(join(imagesDir('b'), 'disk.img')).equals(base)).toBe(true);
    await waitFor(() => runningPid(stateA) === undefined, 20_000, 'source QEMU gone');

    // Onward b -> d (issue 14 point 2): b learned d1's image with the VM, so d builds disk.img
    // first and b mirrors its own overlay (the five clusters a's writes allocated) into d's.
    const onward = await migrate(b, 'd1', 'd', { timeoutMs: 240_000 });
    expect(onward.outcome, JSON.stringify(onward)).toBe('completed');
    expect(onward.summary?.imageBuild).toMatchObject({ image: 'disk.img', host: 'd', alreadyThere: false });
    expect(onward.summary?.precopy?.diskMirror).toMatchObject({ disks: 1, bytes: 5 * 64 * 1024 });
    const stateD = join(root, 'd', 'd1');
    const overlayD = join(stateD, 'disk0.qcow2');
    expect(backingOf(overlayD)).toBe(join(imagesDir('d'), 'disk.img'));
    await heartbeat(stateD, 2);
    await waitFor(() => runningPid(stateB) === undefined, 20_000, "b's QEMU gone");

    // Stopped at d: the disk d has is the image with every write a's guest disk got.
    await d.client.vmAction('d1', 'stop');
    await waitFor(() => runningPid(stateD) === undefined, 20_000, "d's QEMU stopped");
    // The VM's disk is in d's index now (its overlay's five clusters, QEMU's metadata flushed at
    // its exit); a and b dropped it when the VM left; the indexer offers d for them.
    const atDIndex = await waitFor(async () => (await d.client.images()).vmDisks?.find((x) => x.vm === 'd1' && x.blocks === 5), 15_000, "d1's disk indexed at d");
    expect(atDIndex).toMatchObject({ disk: 0, format: 'qcow2', path: overlayD });
    expect((await a.client.images()).vmDisks ?? []).toEqual([]);
    await waitFor(async () => ((await b.client.images()).vmDisks ?? []).length === 0 || undefined, 15_000, "d1's disk dropped at b");
    const placed = await waitFor(async () => {
      const r = await a.client.place({ image: 'probe.img', candidates: ['c', 'd'] });
      return r.candidates[0]?.host === 'd' && r.candidates[0].cost === 0 ? r : undefined;
    }, 15_000, 'd offered as a holder of the block its VM wrote');
    expect(placed.candidates.find((x) => x.host === 'c')?.cost).toBeGreaterThan(0);
    await cluster.stop();
    cluster = undefined;
    expect(qemus.live()).toEqual([]);
    const expected = Buffer.from(base);
    for (const w of WRITES) expected.fill(w.pattern, w.offset, w.offset + w.length);
    const atD = guestView(overlayD, join(root, 'd.raw'));
    expect(atD.byteLength).toBe(IMAGE);
    for (const w of WRITES) expect(atD.subarray(w.offset, w.offset + w.length).every((x) => x === w.pattern), `write ${w.point} at d`).toBe(true);
    expect(Buffer.compare(atD, expected)).toBe(0);
    // a's and b's overlays, where the sources kept them, read the same.
    if (existsSync(overlayA)) expect(Buffer.compare(guestView(overlayA, join(root, 'a.raw')), atD)).toBe(0);
    if (existsSync(overlayB)) expect(Buffer.compare(guestView(overlayB, join(root, 'b.raw')), atD)).toBe(0);
  }, 600_000);
});

describe.skipIf(!run)("a QEMU VM's disk mirrored over the cluster's TLS (two agents, TCG)", () => {
  it('a -> b with peer.tls: the NBD link uses the agents’ certificates (the target named, only the source admitted); the disk arrives byte-exact', async () => {
    const root = qemus.root();
    const library = join(root, 'library');
    mkdirSync(library);
    const base = randomBytes(IMAGE);
    writeFileSync(join(library, 'disk.img'), base);
    const imagesDir = (n: string): string => join(root, `images-${n}`);
    cluster = await Cluster.start(['a', 'b'], {
      tls: {},
      env: (n): Record<string, string> => (n === 'a' ? { EMBOT_TEST_HOOK_MIRROR_WRITES: hookEnv } : {}),
      config: (n) => ({
        ...qemuAgentConfig(root, n),
        images: { dir: imagesDir(n), blockSize: 65536, indexer: 'a', reindexMs: 300 },
        ...(n === 'a' ? { imageLibrary: library } : {}),
        mobility: { stepTimeoutMs: 30_000, vmTimeoutMs: 180_000, forwardGraceMs: 10_000, trust: { mode: 'any-authenticated-peer' } },
      }),
    });
    const a = cluster.agent('a');
    const b = cluster.agent('b');
    await waitFor(async () => (await a.client.images()).images.find((i) => i.name === 'disk.img'), 15_000, 'disk.img indexed at a');
    await waitFor(async () => ((await a.client.images()).group?.members ?? []).includes('b') || undefined, 15_000, 'b known to the indexer');
    await a.client.createVm({ name: 'd2', memory: 64 * MiB, image: 'disk.img' });
    await a.client.vmAction('d2', 'start');
    const stateA = join(root, 'a', 'd2');
    await heartbeat(stateA, 1);
    const info = await migrate(a, 'd2', 'b', { timeoutMs: 240_000 }).catch((e: unknown) => {
      // Twice (of ten runs, under load) this migration hung until the control request closed at 60 s; not reproduced since: what the agents logged.
      process.stderr.write(`agent a (exit ${a.child.exitCode}): ${a.stderr.split('\n').filter((l) => /error|warn|fatal|mirror|disk/i.test(l)).slice(-30).join('\n')}\nagent b: ${b.stderr.split('\n').filter((l) => /error|warn|fatal|mirror|disk/i.test(l)).slice(-30).join('\n')}\n`);
      throw e;
    });
    expect(info.outcome, JSON.stringify(info)).toBe('completed');
    const stateB = join(root, 'b', 'd2');
    await heartbeat(stateB, 2);
    await waitFor(() => runningPid(stateA) === undefined, 20_000, 'source QEMU gone');
    await b.client.vmAction('d2', 'stop');
    await waitFor(() => runningPid(stateB) === undefined, 20_000, "b's QEMU stopped");
    await cluster.stop();
    cluster = undefined;
    expect(qemus.live()).toEqual([]);
    const expected = Buffer.from(base);
    for (const w of WRITES) expected.fill(w.pattern, w.offset, w.offset + w.length);
    expect(Buffer.compare(guestView(join(stateB, 'disk0.qcow2'), join(root, 'b.raw')), expected)).toBe(0);
  }, 600_000);
});
