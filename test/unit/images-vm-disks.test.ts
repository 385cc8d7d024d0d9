/**
 * The running VMs' disks in the index (issue 14 point 2): a qcow2 overlay's own blocks (those the
 * VM wrote) are indexed from where they lie in the overlay, re-checked cheaply, shared with the
 * global indexer as hashes gained and lost, dropped when the VM goes, and kept across restarts.
 * Real parts: overlays made and written by qemu-img/qemu-io, a real QEMU holding one open while it
 * is written (QMP human-monitor `qemu-io`), real SQLite stores, ImageServices over real
 * authenticated PeerServer links on loopback.
 */
import { execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../core/errors.ts';
import { Store } from '../../core/store/store.ts';
import { PeerServer, connectPeer, peerEndpoint, type PeerConnection } from '../../core/wire/index.ts';
import { QmpClient } from '../../effectors/hypervisor/qemu/qmp-client.ts';
import { ImageService, LocalImageIndex, costTable, hashBlock, overlayBlocks, parseMap, type MapExtent, type VmDisk } from '../../images/index.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { rejection } from '../harness/expect-code.ts';
import { randomImage, writeImage } from '../harness/image-files.ts';
import { QEMU_BINARY, qemuAvailability } from '../harness/qemu-processes.ts';
import { waitFor } from '../harness/agent-process.ts';

const BS = 65536; // = the overlays' qcow2 cluster size
const SECRET = randomBytes(32);
const cleanups = cleanupsAfterEach();
const hasQemu = qemuAvailability().ok;

function tmpDir(): string {
  const d = mkdtempSync(path.join(tmpdir(), 'embot-vmdisk-'));
  cleanups.push(() => rmSync(d, { recursive: true, force: true }));
  return d;
}

function openStore(file: string): Store {
  const s = Store.open({ file });
  cleanups.push(() => s.close());
  return s;
}

/** A 1 MiB raw base in `imagesDir` and a qcow2 overlay on it in `dir`/vm, as disk-migration.ts makes a VM's disk. */
function overlay(dir: string, imagesDir = path.join(dir, 'images')): { base: string; disk: string; baseBytes: Buffer } {
  mkdirSync(imagesDir, { recursive: true });
  mkdirSync(path.join(dir, 'vm'), { recursive: true });
  const baseBytes = randomImage(16, BS);
  const base = writeImage(path.join(imagesDir, 'base.img'), baseBytes);
  const disk = path.join(dir, 'vm', 'disk0.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', disk]);
  return { base, disk, baseBytes };
}

/** Writes through qemu-io (no QEMU holds the file): what a guest's write does to the overlay. */
function qemuIo(disk: string, ...cmds: string[]): void {
  execFileSync('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), disk], { stdio: 'ignore' });
}

/** The guest's view of one block (qemu-img reads overlay over base). */
function guestBlock(disk: string, idx: number): Buffer {
  const out = path.join(path.dirname(disk), `view-${idx}.raw`);
  execFileSync('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', disk, out]);
  const b = readFileSync(out).subarray(idx * BS, (idx + 1) * BS);
  rmSync(out);
  return Buffer.from(b);
}

const ext = (start: number, length: number, depth: number, offset?: number, zero = false): MapExtent => ({ start, length, depth, zero, data: !zero, ...(offset === undefined ? {} : { offset }) });

describe('which blocks of an overlay are indexed (qemu-img map)', () => {
  it('whole blocks the overlay holds in one range are placed where they lie; zero blocks as -1; a block half base, half overlay is skipped', () => {
    const extents = [
      ext(0, BS, 1, 0),
      ext(BS, BS, 0, 5 * BS), // block 1: one range at 5*BS
      ext(2 * BS, BS / 2, 0, 9 * BS), // block 2: two ranges, contiguous in the file
      ext(2 * BS + BS / 2, BS / 2, 0, 9 * BS + BS / 2),
      { start: 3 * BS, length: BS, depth: 0, zero: true, data: false }, // block 3: zeros
      ext(4 * BS, BS / 2, 0, 12 * BS), // block 4: half overlay, half base
      ext(4 * BS + BS / 2, BS / 2, 1, 4 * BS + BS / 2),
      ext(5 * BS, BS / 2, 0, 20 * BS), // block 5: two ranges not contiguous in the file
      ext(5 * BS + BS / 2, BS / 2, 0, 30 * BS),
      ext(6 * BS, 10 * BS, 1, 6 * BS),
    ];
    const { placed, skipped } = overlayBlocks(extents, 16 * BS, BS);
    expect([...placed]).toEqual([
      [1, 5 * BS],
      [2, 9 * BS],
      [3, -1],
    ]);
    expect(skipped).toBe(2);
  });

  it('bad input: a map that is not JSON, not a list, or has a bad extent is EMBOT_ERR_IMAGE_INVALID', () => {
    for (const text of ['garbage', '{"start":0}', '[{"start":-1,"length":1,"depth":0,"zero":false,"data":true}]', '[{"start":0,"length":1,"depth":0,"zero":"no","data":true}]', '[null]']) {
      let code: unknown;
      try {
        parseMap(text, 'test');
      } catch (e) {
        code = (e as { code?: unknown }).code;
      }
      expect(code, text).toBe(ErrorCodes.IMAGE_INVALID);
    }
  });
});

describe('a VM disk in the local index', () => {
  it('indexes the blocks the VM wrote as the guest sees them, serves them from the overlay, re-hashes only on change, survives a restart without hashing, and drops them when the VM goes', async () => {
    const dir = tmpDir();
    const { disk, baseBytes } = overlay(dir);
    const d: VmDisk = { vm: 'v1', disk: 0, path: disk, format: 'qcow2' };
    const storeFile = path.join(dir, 'a.sqlite');
    const s1 = openStore(storeFile);
    const idx = new LocalImageIndex(s1.db);
    await idx.indexFolder(path.join(dir, 'images'), 'local', BS);
    // A 4 KiB write: QEMU allocates the whole 64 KiB cluster, the rest copied from the base.
    qemuIo(disk, 'write -P 0x5a 69632 4096', 'write -P 0x11 196608 65536');
    let delta = await idx.indexVmDisk(d, BS);
    const b1 = guestBlock(disk, 1);
    const b3 = guestBlock(disk, 3);
    expect(Buffer.compare(b1.subarray(0, 4096), baseBytes.subarray(BS, BS + 4096))).toBe(0);
    expect(b1.subarray(4096, 8192).every((x) => x === 0x5a)).toBe(true);
    expect(new Set(delta.added)).toEqual(new Set([hashBlock(b1), hashBlock(b3)]));
    expect(delta.removed).toEqual([]);
    expect(delta.changed).toEqual([]);
    expect(idx.hashedBlocks - 16).toBe(2);
    expect(idx.vmDisks()).toMatchObject([{ vm: 'v1', disk: 0, format: 'qcow2', blocks: 2, size: 16 * BS }]);
    // Served from the overlay file where QEMU put it.
    const loc = idx.locate(hashBlock(b1))!;
    expect(loc.origin).toBe('vm');
    expect(Buffer.compare(await idx.readBlock(loc), b1)).toBe(0);

    // Nothing changed: nothing read. Then one block rewritten and one gained: only those reported.
    const before = idx.hashedBlocks;
    expect(await idx.indexVmDisk(d, BS)).toMatchObject({ added: [], removed: [] });
    expect(idx.hashedBlocks).toBe(before);
    qemuIo(disk, 'write -P 0x22 196608 65536', 'write -P 0x33 655360 65536');
    delta = await idx.indexVmDisk(d, BS);
    expect(new Set(delta.added)).toEqual(new Set([hashBlock(guestBlock(disk, 3)), hashBlock(guestBlock(disk, 10))]));
    expect(delta.removed).toEqual([hashBlock(b3)]);
    expect(idx.holds(hashBlock(b3))).toBe(false);
    s1.close();

    // Restart: the entries are still there and nothing is hashed again.
    const s2 = openStore(storeFile);
    const again = new LocalImageIndex(s2.db);
    expect(again.holds(hashBlock(b1))).toBe(true);
    expect(await again.indexVmDisks([d], BS)).toMatchObject({ delta: { added: [], removed: [] }, failed: [] });
    expect(again.hashedBlocks).toBe(0);

    // The VM is gone (removed, or moved away): its disk's hashes are lost, the base's stay.
    const gone = await again.indexVmDisks([], BS);
    expect(new Set(gone.delta.removed)).toEqual(new Set([hashBlock(b1), hashBlock(guestBlock(disk, 3)), hashBlock(guestBlock(disk, 10))]));
    expect(again.vmDisks()).toEqual([]);
    expect(again.locate(hashBlock(b1))).toBeUndefined();
    expect(again.holds(hashBlock(baseBytes.subarray(0, BS)))).toBe(true);
  });

  it('adjacent blocks written in one go (read together) each hash to the guest\'s view of that block', async () => {
    const dir = tmpDir();
    const { disk } = overlay(dir);
    const src = writeImage(path.join(dir, 'src.bin'), randomImage(5, BS));
    qemuIo(disk, `write -s ${src} ${4 * BS} ${5 * BS}`, 'write -P 0x44 0 65536');
    const idx = new LocalImageIndex(openStore(path.join(dir, 'a.sqlite')).db);
    const delta = await idx.indexVmDisk({ vm: 'v4', disk: 0, path: disk, format: 'qcow2' }, BS);
    const expected = [0, 4, 5, 6, 7, 8].map((i) => hashBlock(guestBlock(disk, i)));
    expect(new Set(delta.added)).toEqual(new Set(expected));
    for (const h of expected) expect(hashBlock(await idx.readBlock(idx.locate(h)!))).toBe(h);
    // The whole disk written (1 MiB: hashed on the worker threads, in order).
    const all = writeImage(path.join(dir, 'all.bin'), randomImage(16, BS));
    qemuIo(disk, `write -s ${all} 0 ${16 * BS}`);
    await idx.indexVmDisk({ vm: 'v4', disk: 0, path: disk, format: 'qcow2' }, BS);
    const view = Array.from({ length: 16 }, (_, i) => hashBlock(guestBlock(disk, i)));
    for (const [i, h] of view.entries()) expect(hashBlock(await idx.readBlock(idx.locate(h)!)), `block ${i}`).toBe(h);
    expect(idx.vmDisks()[0]!.blocks).toBe(16);
  });

  it('blocks rewritten in place are found by a round of re-hashing a budget at a time (here one block per re-check); the round over, an unchanged disk costs nothing', async () => {
    const dir = tmpDir();
    const { disk } = overlay(dir);
    const src = writeImage(path.join(dir, 'src.bin'), randomImage(4, BS));
    qemuIo(disk, `write -s ${src} 0 ${4 * BS}`);
    const idx = new LocalImageIndex(openStore(path.join(dir, 'a.sqlite')).db, { vmRecheckBytes: BS });
    const d: VmDisk = { vm: 'v5', disk: 0, path: disk, format: 'qcow2' };
    expect((await idx.indexVmDisk(d, BS)).added).toHaveLength(4);
    expect(idx.hashedBlocks).toBe(4);
    const before = hashBlock(guestBlock(disk, 2));
    qemuIo(disk, 'write -P 0x66 131072 65536'); // block 2, where it already lies in the overlay
    const after = hashBlock(guestBlock(disk, 2));
    const found: number[] = [];
    for (let check = 1; check <= 4; check++) {
      const hashed = idx.hashedBlocks;
      const delta = await idx.indexVmDisk(d, BS);
      expect(idx.hashedBlocks - hashed, `re-check ${check}`).toBe(1);
      if (delta.added.length > 0) {
        expect(delta).toMatchObject({ added: [after], removed: [before] });
        found.push(check);
      }
    }
    expect(found).toHaveLength(1);
    expect(idx.holds(after)).toBe(true);
    // The round is over and the file unchanged since: nothing read.
    const hashed = idx.hashedBlocks;
    expect(await idx.indexVmDisk(d, BS)).toMatchObject({ added: [], removed: [] });
    expect(idx.hashedBlocks).toBe(hashed);
  });

  it('a raw VM disk is indexed whole; a disk whose file is gone fails alone (coded) and the others are indexed', async () => {
    const dir = tmpDir();
    const bytes = randomImage(3, BS);
    const raw = writeImage(path.join(dir, 'raw-disk'), bytes);
    const idx = new LocalImageIndex(openStore(path.join(dir, 'a.sqlite')).db);
    const r = await idx.indexVmDisks(
      [
        { vm: 'v2', disk: 0, path: raw, format: 'raw' },
        { vm: 'v2', disk: 1, path: path.join(dir, 'missing.qcow2'), format: 'qcow2' },
      ],
      BS,
    );
    expect(r.delta.added).toHaveLength(3);
    expect(r.failed.map((f) => (f.error as { code?: string }).code)).toEqual([ErrorCodes.IMAGE_UNKNOWN]);
    expect(Buffer.compare(await idx.readBlock(idx.locate(hashBlock(bytes.subarray(2 * BS)))!), bytes.subarray(2 * BS))).toBe(0);
  });

  it('bad input: a qcow2 disk that is not a qcow2 file is EMBOT_ERR_IMAGE_INVALID', async () => {
    const dir = tmpDir();
    const idx = new LocalImageIndex(openStore(path.join(dir, 'a.sqlite')).db);
    const junk = writeImage(path.join(dir, 'junk.qcow2'), randomImage(1, 4096));
    expect(await rejection(idx.indexVmDisk({ vm: 'v3', disk: 0, path: junk, format: 'qcow2' }, BS))).toMatchObject({ code: ErrorCodes.IMAGE_INVALID });
  });
});

describe.runIf(hasQemu)('a running QEMU\'s disk through the global indexer', () => {
  it('blocks a running VM writes (after QEMU flushes them) make the indexer offer its host for the new hashes; another host builds an image from them there; the VM gone, the host is no longer offered', async () => {
    const root = tmpDir();
    const servers = new Map<string, PeerServer>();
    let disks: VmDisk[] = [];
    const node = async (name: string, imagesDir: string, vmDisks?: () => readonly VmDisk[]): Promise<ImageService> => {
      const server = await PeerServer.listen({ agent: name, secret: SECRET, listen: '127.0.0.1:0', requestTimeoutMs: 30_000 });
      cleanups.push(() => server.close());
      servers.set(name, server);
      const service = new ImageService({
        agent: name,
        db: openStore(path.join(root, `${name}.sqlite`)).db,
        imagesDir,
        blockSize: BS,
        indexer: 'a',
        // b (the VM's host) is near a; c is far.
        costs: costTable({ matrix: { b: { a: 1 }, c: { a: 10 } }, default: 10 }),
        connect: (peer): Promise<PeerConnection> => connectPeer({ url: servers.get(peer)!.url, agent: name, secret: SECRET, expectedPeer: peer, requestTimeoutMs: 30_000 }),
        hostLoad: async () => ({ cpu: 0, freeMemory: 1 << 30 }),
        reindexMs: 0,
        requestTimeoutMs: 30_000,
        buildTimeoutMs: 60_000,
        ...(vmDisks ? { vmDisks } : {}),
      });
      cleanups.push(() => service.close());
      peerEndpoint(server).register(service.peerService());
      return service;
    };
    const dirB = path.join(root, 'b');
    const dirC = path.join(root, 'c');
    mkdirSync(dirB);
    mkdirSync(dirC);
    const { disk } = overlay(root, dirB);
    const a = await node('a', path.join(root, 'a'));
    const b = await node('b', dirB, () => disks);
    const c = await node('c', dirC);

    // The VM: a QEMU holding the overlay open (paused; its disk written through QEMU's block layer).
    const sock = path.join(root, 'qmp.sock');
    const qemu = spawn(QEMU_BINARY, ['-M', 'q35', '-S', '-nodefaults', '-display', 'none', '-accel', 'tcg', '-drive', `file=${disk},format=qcow2,if=none,id=d0`, '-qmp', `unix:${sock},server=on,wait=off`], { stdio: 'ignore' });
    const exited = new Promise((r) => qemu.once('exit', r));
    cleanups.push(async () => {
      qemu.kill('SIGKILL');
      await exited;
    });
    // QEMU binds the socket file before it listens: a connect in between is refused, so retry.
    const qmp = await waitFor(async () => (existsSync(sock) ? await QmpClient.connect(sock).catch(() => undefined) : undefined), 20_000, 'QMP socket');
    cleanups.push(() => qmp.close());
    const io = (cmd: string): Promise<unknown> => qmp.executeRaw('human-monitor-command', { 'command-line': `qemu-io d0 "${cmd}"` });
    disks = [{ vm: 'v1', disk: 0, path: disk, format: 'qcow2' }];

    await a.start();
    await b.start();
    await c.start();
    await io('write -P 0x7e 327680 65536'); // block 5
    await io('flush');
    await b.reindex();
    const written = Buffer.alloc(BS, 0x7e);
    expect(b.index.holds(hashBlock(written))).toBe(true);
    expect(a.global!.holders(hashBlock(written))).toEqual([{ source: 'b', via: 'b' }]);
    expect(b.report().vmDisks).toMatchObject([{ vm: 'v1', blocks: 1 }]);

    // An image with that block: c holds it too, but b (the VM's host) is cheaper to a.
    const img = Buffer.concat([randomImage(1, BS), written]);
    writeImage(path.join(dirC, 'snap.img'), img);
    await c.reindex();
    const built = await a.build('snap.img');
    expect(built.bySource).toEqual({ b: BS, c: BS });
    expect(Buffer.compare(readFileSync(path.join(root, 'a', 'snap.img')), img)).toBe(0);

    // The VM goes: b stops being offered for its disk's blocks.
    disks = [];
    await b.reindex();
    expect(a.global!.holders(hashBlock(written)).map((h) => h.source).sort()).toEqual(['a', 'c']);
    expect(b.index.vmDisks()).toEqual([]);
  }, 60_000);
});
