/**
 * A migration to a host that lacks the VM's image builds it there first, for any `--to` (issue 14),
 * on three real agents (sim driver): `a` the group's indexer serving the library, `b` the VM's host,
 * `c` the target holding half of the image's blocks. Also the wiring around it: the target's
 * `embot_block_fetched_bytes_total` and the dashboard's target list ranked by placement.
 */
import { mkdirSync, mkdtempSync, readFileSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../core/errors.ts';
import type { MigrationInfo } from '../../core/mobility/migration-record.ts';
import { RANKED_BY_PLACEMENT } from '../../images/index.ts';
import { runCli, waitFor } from '../harness/agent-process.ts';
import { Cluster } from '../harness/cluster.ts';
import { derivedImage, randomImage, writeImage } from '../harness/image-files.ts';

const BS = 4096;
const BLOCKS = 512; // 2 MiB
const NAMES = ['a', 'b', 'c', 'd'] as const;

let cluster: Cluster;
let root: string;
const dirs: Record<string, string> = {};
let web: Buffer;
let base: Buffer;
let fan: Buffer;

async function catalogue(): Promise<readonly { name: string; size: number; hosts: readonly string[] }[]> {
  return (await cluster.agent('a').client.images()).group?.images ?? [];
}

beforeAll(async () => {
  root = mkdtempSync(path.join(tmpdir(), 'embot-images-mig-it-'));
  for (const n of [...NAMES, 'library']) mkdirSync((dirs[n] = path.join(root, n)));
  base = randomImage(BLOCKS, BS);
  web = derivedImage(base, BS, BLOCKS / 2, 7).image; // exactly half of web's blocks are base's
  writeImage(path.join(dirs.library!, 'web.img'), web);
  writeImage(path.join(dirs.b!, 'web.img'), web);
  writeImage(path.join(dirs.b!, 'gone.img'), randomImage(16, BS));
  writeImage(path.join(dirs.b!, 'chg.img'), randomImage(16, BS));
  fan = randomImage(32, BS);
  writeImage(path.join(dirs.b!, 'fan.img'), fan);
  writeImage(path.join(dirs.c!, 'base.img'), base);
  cluster = await Cluster.start(NAMES, {
    config: (n) => ({
      images: {
        dir: dirs[n],
        blockSize: BS,
        indexer: 'a',
        members: ['b', 'c', 'd'],
        reindexMs: 300,
        // b is next to c, c next to d; the library (behind a) is far from everyone.
        cost: { matrix: { b: { c: 1 }, c: { d: 2 }, library: { a: 5, b: 5, c: 5, d: 5 } }, default: 10 },
      },
      ...(n === 'a' ? { imageLibrary: dirs.library } : {}),
    }),
  });
  await waitFor(
    async () => {
      const c = await catalogue();
      return (c.find((i) => i.name === 'gone.img')?.hosts.includes('b') && c.find((i) => i.name === 'fan.img')?.hosts.includes('b') && c.find((i) => i.name === 'base.img')?.hosts.includes('c')) || undefined;
    },
    15_000,
    'b and c in the index',
  );
}, 60_000);

afterAll(async () => {
  await cluster?.stop();
  rmSync(root, { recursive: true, force: true });
});

const unique = (img: Buffer): number => new Set(Array.from({ length: img.byteLength / BS }, (_, i) => img.subarray(i * BS, (i + 1) * BS).toString('hex'))).size;

describe('a migration builds the VM image at its target first', () => {
  it('--to c (not auto): c builds web.img from b (near) before the memory moves, fetching exactly the blocks it lacked; the summary says what came from where; c counts it in its metrics', async () => {
    const b = cluster.agent('b').url;
    expect((await runCli(['vm', 'create', 'w1', '--image', 'web.img', '--memory', '16M', '--agent', b])).code).toBe(0);
    expect((await runCli(['vm', 'start', 'w1', '--agent', b])).code).toBe(0);
    const r = await runCli(['migrate', 'w1', '--to', 'c', '--json', '--agent', b]);
    expect(r.code, r.stderr).toBe(0);
    const info = JSON.parse(r.stdout) as MigrationInfo;
    expect(info.outcome, info.reason).toBe('completed');
    const built = info.summary?.imageBuild;
    const distinct = unique(web);
    expect(built).toMatchObject({ image: 'web.img', host: 'c', alreadyThere: false });
    // c had half of web's blocks (base's); the other half came from b, the cheapest holder.
    expect(built!.bytesLocal + built!.bytesFetched).toBe(distinct * BS);
    expect(built!.bytesFetched).toBe((BLOCKS / 2) * BS);
    expect(built!.bytesLocal).toBe((BLOCKS / 2) * BS);
    expect(built!.bySource).toEqual({ b: (BLOCKS / 2) * BS });
    expect(Buffer.compare(readFileSync(path.join(dirs.c!, 'web.img')), web)).toBe(0);
    const metrics = await (await fetch(`${cluster.agent('c').url}/metrics`)).text();
    expect(metrics).toMatch(new RegExp(`embot_block_fetched_bytes_total\\{source="b"\\} ${(BLOCKS / 2) * BS}\\b`));
  }, 90_000);

  it('onward b -> c -> d: c learned w1\'s image with the VM, so moving it on builds web.img at d from its cheapest holder (c) the same way', async () => {
    // w1 moved b -> c in the test before; only the VM carried its image name to c.
    const c = cluster.agent('c').url;
    const r = await runCli(['migrate', 'w1', '--to', 'd', '--json', '--agent', c]);
    expect(r.code, r.stderr).toBe(0);
    const info = JSON.parse(r.stdout) as MigrationInfo;
    expect(info.outcome, info.reason).toBe('completed');
    const distinct = unique(web);
    expect(info.summary?.imageBuild).toMatchObject({ image: 'web.img', host: 'd', alreadyThere: false, bytesLocal: 0, bytesFetched: distinct * BS, bySource: { c: distinct * BS } });
    expect(Buffer.compare(readFileSync(path.join(dirs.d!, 'web.img')), web)).toBe(0);
    expect((await cluster.agent('d').client.listVms()).find((v) => v.name === 'w1')?.state).toBe('running');
    // And d knows it too: placement of w1 asked at d ranks by web.img.
    const placed = JSON.parse((await runCli(['place', 'w1', '--candidates', 'b,c', '--json', '--agent', cluster.agent('d').url])).stdout) as { host: string; cost: number }[];
    expect(placed.map((p) => p.cost)).toEqual([0, 0]);
  }, 90_000);

  it('a VM whose image changed under its name since it was created is not moved: EMBOT_ERR_IMAGE_CHANGED, nothing built, the VM runs on', async () => {
    const b = cluster.agent('b').url;
    expect((await runCli(['vm', 'create', 'w6', '--image', 'chg.img', '--memory', '16M', '--agent', b])).code).toBe(0);
    expect((await runCli(['vm', 'start', 'w6', '--agent', b])).code).toBe(0);
    const before = (await catalogue()).find((i) => i.name === 'chg.img');
    // Same name, other bytes (one block longer, so the indexer's catalogue shows the change).
    writeImage(path.join(dirs.b!, 'chg.img'), randomImage(17, BS));
    await waitFor(async () => ((await catalogue()).find((i) => i.name === 'chg.img')?.size ?? -1) !== before?.size || undefined, 15_000, 'chg.img re-indexed');
    const r = await runCli(['migrate', 'w6', '--to', 'c', '--json', '--agent', b]);
    expect(r.code).toBe(1);
    const info = JSON.parse(r.stdout) as MigrationInfo;
    expect(info.reason).toContain(ErrorCodes.IMAGE_CHANGED);
    expect(info.summary?.memoryBytes ?? 0).toBe(0);
    expect((await cluster.agent('b').client.listVms()).find((v) => v.name === 'w6')?.state).toBe('running');
    expect(existsSync(path.join(dirs.c!, 'chg.img'))).toBe(false);
  }, 90_000);

  it('to several destinations (--to c,d): each destination builds the image before its copy, the winner runs the VM on it', async () => {
    const b = cluster.agent('b').url;
    expect((await runCli(['vm', 'create', 'w7', '--image', 'fan.img', '--memory', '16M', '--agent', b])).code).toBe(0);
    expect((await runCli(['vm', 'start', 'w7', '--agent', b])).code).toBe(0);
    const r = await runCli(['migrate', 'w7', '--to', 'c,d', '--json', '--agent', b]);
    expect(r.code, r.stderr).toBe(0);
    const info = JSON.parse(r.stdout) as MigrationInfo;
    expect(info.outcome, info.reason).toBe('completed');
    const winner = info.summary?.winner;
    expect(['c', 'd']).toContain(winner);
    // Both built it (the loser keeps the image it built, as any host keeps a built image).
    for (const n of ['c', 'd']) expect(Buffer.compare(readFileSync(path.join(dirs[n]!, 'fan.img')), fan), n).toBe(0);
    expect((await cluster.agent(winner!).client.listVms()).find((v) => v.name === 'w7')?.state).toBe('running');
    // And the winner knows the VM's image for the next move: placement asked there ranks by fan.img.
    const placed = JSON.parse((await runCli(['place', 'w7', '--candidates', 'c,d', '--json', '--agent', cluster.agent(winner!).url])).stdout) as { host: string; cost: number }[];
    expect(placed.map((p) => p.cost)).toEqual([0, 0]);
  }, 90_000);

  it('a target that holds the image already fetches nothing and rewrites nothing; the summary says so', async () => {
    const b = cluster.agent('b').url;
    expect((await runCli(['vm', 'create', 'w3', '--image', 'web.img', '--memory', '16M', '--agent', b])).code).toBe(0);
    const r = await runCli(['migrate', 'w3', '--to', 'c', '--agent', b]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/image:\s+web\.img already at c/);
  }, 90_000);

  it('a build that fails (nobody holds the image any more) fails the migration before anything moved: coded reason, the VM still runs at b, c has no trace of it', async () => {
    const b = cluster.agent('b').url;
    expect((await runCli(['vm', 'create', 'w2', '--image', 'gone.img', '--memory', '16M', '--agent', b])).code).toBe(0);
    expect((await runCli(['vm', 'start', 'w2', '--agent', b])).code).toBe(0);
    rmSync(path.join(dirs.b!, 'gone.img'));
    await waitFor(async () => !(await catalogue()).some((i) => i.name === 'gone.img') || undefined, 15_000, 'gone.img out of the index');
    const r = await runCli(['migrate', 'w2', '--to', 'c', '--json', '--agent', b]);
    expect(r.code).toBe(1);
    const info = JSON.parse(r.stdout) as MigrationInfo;
    expect(info.outcome).not.toBe('completed');
    expect(info.reason).toContain(ErrorCodes.IMAGE_UNKNOWN);
    expect(info.summary?.memoryBytes ?? 0).toBe(0);
    const atB = await cluster.agent('b').client.listVms();
    expect(atB.find((v) => v.name === 'w2')?.state).toBe('running');
    expect((await cluster.agent('c').client.listVms()).some((v) => v.name === 'w2')).toBe(false);
    expect(existsSync(path.join(dirs.c!, 'gone.img'))).toBe(false);
  }, 90_000);

  it("the dashboard's target list is the placement ranking: the order `place` gives, each with its cost as score", async () => {
    const b = cluster.agent('b').url;
    expect((await runCli(['vm', 'create', 'w4', '--image', 'web.img', '--memory', '16M', '--agent', b])).code).toBe(0);
    const placed = JSON.parse((await runCli(['place', 'w4', '--candidates', 'a,c,d', '--json', '--agent', b])).stdout) as { host: string; cost: number }[];
    const res = await fetch(`${b}/ui/api/targets?vm=w4`);
    expect(res.status).toBe(200);
    const targets = (await res.json()) as { name: string; reachable: boolean; score?: number; rankedBy: string; why?: string }[];
    expect(targets.map((t) => t.name)).toEqual(placed.map((p) => p.host));
    expect(targets.map((t) => t.score)).toEqual(placed.map((p) => p.cost));
    expect(targets.every((t) => t.rankedBy === RANKED_BY_PLACEMENT && t.reachable)).toBe(true);
    // A VM without an image keeps the configured order.
    expect((await runCli(['vm', 'create', 'plain', '--memory', '16M', '--agent', b])).code).toBe(0);
    const plain = (await (await fetch(`${b}/ui/api/targets?vm=plain`)).json()) as { rankedBy: string }[];
    expect(plain.every((t) => t.rankedBy === 'configured-order')).toBe(true);
  }, 90_000);
});
