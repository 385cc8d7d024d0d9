/**
 * Images from their cheapest holders with real agents on loopback (issue 14): four agent processes,
 * `a` the group's indexer serving the image library; builds through the CLI, a holder SIGKILLed
 * mid-build, a corrupt block on the wire (fault injection), placement, and bad input at the peer
 * endpoint.
 */
import { once } from 'node:events';
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../core/errors.ts';
import { loadClusterSecret } from '../../core/wire/index.ts';
import { encodeIndexUpdate, hashBlock, type BuildSummary } from '../../images/index.ts';
import { runCli, waitFor } from '../harness/agent-process.ts';
import { Cluster } from '../harness/cluster.ts';
import { derivedImage, randomImage, writeImage } from '../harness/image-files.ts';
import { RawPeer } from '../harness/raw-peer.ts';

const BS = 4096;
const BLOCKS = 2048; // 8 MiB: two 4 MiB fetch batches from one holder
const NAMES = ['a', 'b', 'c', 'd'] as const;

let cluster: Cluster;
let root: string;
const dirs: Record<string, string> = {};
let web: Buffer;
let base: Buffer;
let db: Buffer;

const blockSet = (img: Buffer): Set<string> => {
  const s = new Set<string>();
  for (let o = 0; o < img.byteLength; o += BS) s.add(hashBlock(img.subarray(o, o + BS)));
  return s;
};

async function groupMembers(): Promise<readonly string[]> {
  return (await cluster.agent('a').client.images()).group?.members ?? [];
}

beforeAll(async () => {
  root = mkdtempSync(path.join(tmpdir(), 'embot-images-it-'));
  for (const n of [...NAMES, 'library']) mkdirSync((dirs[n] = path.join(root, n)));
  base = randomImage(BLOCKS, BS);
  web = derivedImage(base, BS, BLOCKS / 2, 5).image; // half of web's blocks are base's
  db = randomImage(BLOCKS / 4, BS, 1234);
  writeImage(path.join(dirs.library!, 'web.img'), web);
  writeImage(path.join(dirs.library!, 'db.img'), db);
  writeImage(path.join(dirs.b!, 'base.img'), base);
  writeImage(path.join(dirs.c!, 'web-head.img'), web.subarray(0, (BLOCKS * 3 * BS) / 4)); // web's first three quarters
  writeImage(path.join(dirs.c!, 'db.img'), db);
  cluster = await Cluster.start(NAMES, {
    config: (n) => ({
      images: {
        dir: dirs[n],
        blockSize: BS,
        indexer: 'a',
        members: ['b', 'c', 'd'],
        reindexMs: 300,
        // c is next to b and d; the library (behind a) is far from everyone.
        cost: { matrix: { c: { b: 1, d: 1 }, b: { d: 2 }, library: { b: 5, c: 5, d: 5 } }, default: 10 },
      },
      ...(n === 'a' ? { imageLibrary: dirs.library } : {}),
    }),
  });
  await waitFor(async () => (await groupMembers()).filter((m) => m !== 'a').length === 3 || undefined, 15_000, 'b, c and d in the index').catch(async (e: unknown) => {
    throw new Error(`${String(e)}\n${JSON.stringify(await cluster.agent('a').client.images())}\n${NAMES.map((x) => cluster.agent(x).stdout.split('\n').filter((l) => l.includes('image')).join('\n')).join('\n')}`);
  });
}, 60_000);

afterAll(async () => {
  await cluster?.stop();
  rmSync(root, { recursive: true, force: true });
});

describe('images across real agents', () => {
  it('image build --on b through a: blocks b has stay local, c (near) before the library (far); byte-identical', async () => {
    const r = await runCli(['image', 'build', 'web.img', '--on', 'b', '--json', '--agent', cluster.agent('a').url]);
    expect(r.code, r.stderr).toBe(0);
    const s = JSON.parse(r.stdout) as BuildSummary;
    const atB = blockSet(base);
    const atC = blockSet(web.subarray(0, (BLOCKS * 3 * BS) / 4));
    const wanted = [...blockSet(web)];
    const local = wanted.filter((h) => atB.has(h)).length;
    const fromC = wanted.filter((h) => !atB.has(h) && atC.has(h)).length;
    expect(s.bytesLocal).toBe(local * BS);
    expect(s.bytesFetched).toBe((wanted.length - local) * BS);
    expect(s.bySource).toEqual({ c: fromC * BS, library: (wanted.length - local - fromC) * BS });
    expect(s.costPaid).toBeCloseTo(((fromC * BS) / 2 ** 20) * 1 + (((wanted.length - local - fromC) * BS) / 2 ** 20) * 5);
    expect(s.wholeImageCost).toBeCloseTo(((BLOCKS * BS) / 2 ** 20) * 5);
    expect(Buffer.compare(readFileSync(path.join(dirs.b!, 'web.img')), web)).toBe(0);
    const listed = await runCli(['images', '--json', '--agent', cluster.agent('b').url]);
    expect((JSON.parse(listed.stdout) as { images: { name: string }[] }).images.map((i) => i.name)).toEqual(['base.img', 'web.img']);
  }, 60_000);

  it('place ranks by build cost with CPU and free memory beside it; --json is the candidates in rank order', async () => {
    // b has web.img whole now; c has three quarters and is near b; d has none of it.
    await waitFor(async () => ((await cluster.agent('a').client.images()).group?.images.find((i) => i.name === 'web.img')?.hosts.includes('b') ? true : undefined), 10_000, 'b holds web.img');
    const r = await runCli(['place', 'any-vm', '--image', 'web.img', '--candidates', 'd,c,b', '--json', '--agent', cluster.agent('a').url]);
    expect(r.code, r.stderr).toBe(0);
    const ranked = JSON.parse(r.stdout) as { host: string; cost: number; cpu: number; freeMemory: number }[];
    expect(ranked.map((c) => c.host)).toEqual(['b', 'c', 'd']);
    expect(ranked[0]!.cost).toBe(0);
    expect(ranked[1]!.cost).toBeCloseTo(((BLOCKS / 4) * BS) / 2 ** 20); // c's missing quarter from b at cost 1
    expect(ranked.every((c) => typeof c.cpu === 'number' && c.freeMemory > 0)).toBe(true);
    const text = await runCli(['place', 'any-vm', '--image', 'web.img', '--candidates', 'd,c,b', '--policy', 'top:2:memory', '--agent', cluster.agent('a').url]);
    expect(text.stdout).toMatch(/RANK\s+HOST\s+COST\s+CPU\s+FREE MEMORY/);
    // An image alone is enough; neither a VM nor an image is a usage error.
    const imageOnly = await runCli(['place', '--image', 'web.img', '--candidates', 'd,c,b', '--json', '--agent', cluster.agent('a').url]);
    expect(imageOnly.code, imageOnly.stderr).toBe(0);
    expect((JSON.parse(imageOnly.stdout) as { host: string }[]).map((c) => c.host)).toEqual(['b', 'c', 'd']);
    const nothing = await runCli(['place', '--agent', cluster.agent('a').url]);
    expect(nothing.code).toBe(2);
    expect(nothing.stderr).toContain('EMBOT_ERR_CLI_USAGE');
  }, 30_000);

  it('a holder SIGKILLed mid-build (real process, killed at its second block request): its blocks come from the next holder; the indexer stops offering it', async () => {
    await cluster.kill('c');
    await cluster.startAgent('c', { EMBOT_FAULT_BLOCK_KILL_AFTER: '1' });
    await waitFor(async () => ((await groupMembers()).includes('c') ? true : undefined), 15_000, 'c back in the index');
    const job = await cluster.agent('a').client.startImageBuild('web.img', 'd');
    const done = await waitFor(async () => {
      const j = await cluster.agent('a').client.getImageBuild(job.id);
      return j.state === 'running' ? undefined : j;
    }, 60_000, 'the build at d');
    expect(done.state, JSON.stringify(done.error)).toBe('done');
    const s = done.summary!;
    expect(s.retries).toEqual([expect.objectContaining({ via: 'c', problem: 'failed' })]);
    expect(s.bySource['c']).toBe(1024 * BS); // its first batch, before it died
    expect(s.bytesFetched).toBe(blockSet(web).size * BS);
    expect(Buffer.compare(readFileSync(path.join(dirs.d!, 'web.img')), web)).toBe(0);
    await waitFor(async () => (!(await groupMembers()).includes('c') ? true : undefined), 10_000, 'c dropped from the index');
  }, 90_000);

  it('FAULT INJECTION (corrupt block on the wire): every block that does not hash right is fetched again from the next holder', async () => {
    await cluster.kill('c');
    await cluster.startAgent('c', { EMBOT_FAULT_BLOCK_CORRUPT: '1' });
    await waitFor(async () => ((await groupMembers()).includes('c') ? true : undefined), 15_000, 'c back in the index');
    const r = await runCli(['image', 'build', 'db.img', '--on', 'b', '--json', '--agent', cluster.agent('b').url]);
    expect(r.code, r.stderr).toBe(0);
    const s = JSON.parse(r.stdout) as BuildSummary;
    expect(s.retries).toEqual([expect.objectContaining({ via: 'c', problem: 'corrupt', blocks: 1, reason: expect.stringContaining(ErrorCodes.BLOCK_HASH_MISMATCH) })]);
    expect(s.blocksBySource).toEqual({ c: BLOCKS / 4 - 1, library: 1 });
    expect(Buffer.compare(readFileSync(path.join(dirs.b!, 'db.img')), db)).toBe(0);
  }, 60_000);

  it('vm create --image NAME gives a VM an image of the index; migrate --to auto goes where building it costs least (a serves it from its library, d has it whole: both 0, a first by name)', async () => {
    const b = cluster.agent('b').url;
    const missing = await runCli(['vm', 'create', 'web-0', '--image', 'nope.img', '--agent', b]);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toContain(ErrorCodes.IMAGE_UNKNOWN);
    expect((await runCli(['vm', 'create', 'web-1', '--image', 'web.img', '--memory', '16M', '--agent', b])).code).toBe(0);
    expect((await runCli(['vm', 'start', 'web-1', '--agent', b])).code).toBe(0);
    const ranked = JSON.parse((await runCli(['place', 'web-1', '--json', '--agent', b])).stdout) as { host: string; cost: number }[];
    expect(ranked.map((c) => c.host).sort()).toEqual(['a', 'c', 'd']);
    expect(ranked.map((c) => [c.host, c.cost])).toEqual([['a', 0], ['d', 0], ['c', expect.any(Number)]]);
    expect(ranked[2]!.cost).toBeGreaterThan(0);
    const moved = await runCli(['migrate', 'web-1', '--to', 'auto', '--json', '--agent', b]);
    expect(moved.code, moved.stderr).toBe(0);
    const info = JSON.parse(moved.stdout) as { outcome: string; peer: string; reason?: string };
    expect(info.outcome, info.reason).toBe('completed');
    expect(info.peer).toBe('a');

    // A removed VM's image is forgotten: the same name created again without --image has none to place.
    expect((await runCli(['vm', 'create', 'web-2', '--image', 'web.img', '--memory', '16M', '--agent', b])).code).toBe(0);
    const placed = await runCli(['place', 'web-2', '--json', '--agent', b]);
    expect(placed.code, placed.stderr).toBe(0);
    const removed = await runCli(['vm', 'remove', 'web-2', '--agent', b]);
    expect(removed.code, removed.stderr).toBe(0);
    expect((await runCli(['vm', 'create', 'web-2', '--memory', '16M', '--agent', b])).code).toBe(0);
    const unplaced = await runCli(['place', 'web-2', '--json', '--agent', b]);
    expect(unplaced.code).toBe(1);
    expect(unplaced.stderr).toMatch(/EMBOT_ERR_\w+/);
    expect(unplaced.stderr).not.toContain('web.img');
  }, 60_000);

  it('bad input: an unknown image, a BlockFetch that is not hashes, an index update unauthenticated or from a non-member; the agent keeps serving', async () => {
    const unknown = await runCli(['image', 'build', 'nope.img', '--agent', cluster.agent('b').url]);
    expect(unknown.code).toBe(1);
    expect(unknown.stderr).toContain(ErrorCodes.IMAGE_UNKNOWN);

    const policy = await runCli(['place', 'web-1', '--image', 'web.img', '--policy', 'best', '--agent', cluster.agent('a').url]);
    expect(policy.code).toBe(1);
    expect(policy.stderr).toContain(ErrorCodes.PLACEMENT_INPUT_INVALID);
    const badName = await runCli(['image', 'build', '..', '--agent', cluster.agent('a').url]);
    expect(badName.code).toBe(1);
    expect(badName.stderr).toContain(ErrorCodes.IMAGE_INVALID);
    const noImage = await runCli(['place', 'no-such-vm', '--agent', cluster.agent('a').url]);
    expect(noImage.code).toBe(1);
    expect(noImage.stderr).toContain(ErrorCodes.IMAGE_UNKNOWN);

    const url = `ws://127.0.0.1:${cluster.port('a')}`;
    const update = encodeIndexUpdate({ seq: 1, full: true, added: [hashBlock(Buffer.from('x'))], removed: [], changed: [], dropped: [] });
    const anon = new RawPeer(url);
    await once(anon.ws, 'open');
    const refused = await anon.request({ type: 'IndexUpdate', reqId: 1, body: update });
    expect(refused.kind).toBe('closed');
    expect(JSON.stringify(refused)).toContain(ErrorCodes.PEER_UNAUTHENTICATED);

    const secret = loadClusterSecret(cluster.secretFile);
    const mallory = await RawPeer.connect(url, 'mallory', secret);
    const notMember = await mallory.request({ type: 'IndexUpdate', reqId: 1, body: update });
    expect(notMember).toMatchObject({ kind: 'frame', frame: { type: 'Error', code: ErrorCodes.INDEX_UPDATE_REFUSED } });
    const badFetch = await mallory.request({ type: 'BlockFetch', reqId: 2, hashes: Buffer.alloc(5) });
    expect(badFetch).toMatchObject({ kind: 'frame', frame: { type: 'Error', code: ErrorCodes.FRAME_MALFORMED } });
    const unknownImage = await mallory.request({ type: 'IndexQuery', reqId: 3, image: 'nope.img' });
    expect(unknownImage).toMatchObject({ kind: 'frame', frame: { type: 'Error', code: ErrorCodes.IMAGE_UNKNOWN } });
    // Nothing of mallory's made it into the index, and a still answers.
    const answer = await mallory.request({ type: 'IndexQuery', reqId: 4, image: 'db.img' });
    expect(answer).toMatchObject({ kind: 'frame', frame: { type: 'IndexAnswer' } });
    await mallory.close();
    expect(await groupMembers()).not.toContain('mallory');
  }, 30_000);
});
