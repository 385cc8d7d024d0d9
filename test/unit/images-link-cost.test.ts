/**
 * Measured network cost (issue 14 point 3): round trips probed with a Ping over real authenticated
 * peer links, throughput from real block fetches, cached with an age; a bad probe answer is a coded
 * error and the link's cost falls back to the config.
 */
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { validateConfig } from '../../core/config/config.ts';
import { ErrorCodes } from '../../core/errors.ts';
import { Store } from '../../core/store/store.ts';
import { PeerServer, connectPeer, peerEndpoint, type PeerConnection } from '../../core/wire/index.ts';
import { DEFAULT_MEASURE, ImageService, LinkMeasurements, MAX_LINKS, MIB, costFromMeasurement, costTable, decodeIndexAnswer, decodeIndexUpdate, encodeIndexAnswer, encodeIndexUpdate, groupMeasuredTable, type Probeable } from '../../images/index.ts';
import { Packr } from 'msgpackr';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { rejection } from '../harness/expect-code.ts';
import { randomImage, writeImage } from '../harness/image-files.ts';

const SECRET = randomBytes(32);
const cleanups = cleanupsAfterEach();
const configured = costTable({ matrix: { a: { b: 3, c: 7 } }, default: 10 });

async function server(name: string): Promise<PeerServer> {
  const s = await PeerServer.listen({ agent: name, secret: SECRET, listen: '127.0.0.1:0', requestTimeoutMs: 10_000 });
  cleanups.push(() => s.close());
  return s;
}

async function link(from: string, to: PeerServer, toName: string): Promise<PeerConnection> {
  const c = await connectPeer({ url: to.url, agent: from, secret: SECRET, expectedPeer: toName, requestTimeoutMs: 10_000 });
  cleanups.push(async () => void (await c.close()));
  return c;
}

describe('measured link cost', () => {
  it('a Ping over a real link gives the round trip; the cost of the link (both ways) is then transfer time + one round trip per request, others stay configured; stale after maxAgeMs', async () => {
    let now = 1_000_000;
    const m = new LinkMeasurements('a', { ...DEFAULT_MEASURE, maxAgeMs: 5_000 }, () => now);
    const conn = await link('a', await server('b'), 'b');
    const rtt = await m.probe('b', conn, 5_000);
    expect(rtt).toBeGreaterThan(0);
    const table = m.table(configured);
    const expected = costFromMeasurement({ rttMs: rtt, bytesPerSec: DEFAULT_MEASURE.assumeBytesPerSec }, DEFAULT_MEASURE.requestBytes);
    expect(table.cost('b', 'a')).toBeCloseTo(expected, 9);
    expect(table.cost('a', 'b')).toBeCloseTo(expected, 9);
    expect(table.cost('c', 'a')).toBe(7);
    expect(table.cost('b', 'c')).toBe(10);
    expect(table.cost('a', 'a')).toBe(0);
    // A block fetch of 2 MiB in 40 ms: 50 MiB/s measured.
    m.recordTransfer('b', 2 * MIB, 40);
    expect(table.cost('b', 'a')).toBeCloseTo(costFromMeasurement({ rttMs: rtt, bytesPerSec: 50 * MIB }, DEFAULT_MEASURE.requestBytes), 9);
    // Small replies say nothing about bandwidth.
    m.recordTransfer('b', 1024, 0.01);
    expect(m.report()).toMatchObject([{ peer: 'b', bytesPerSec: 50 * MIB, ageMs: 0 }]);
    now += 5_001;
    expect(table.cost('b', 'a')).toBe(3);
    expect(m.report()).toEqual([]);
  });

  it('bad input: a probe answer that is not the Pong asked for (FAKE peer link: a real agent answers Ping itself and its codec checks the frame) is EMBOT_ERR_COST_PROBE_INVALID, and the link falls back to its configured cost', async () => {
    const m = new LinkMeasurements('a', DEFAULT_MEASURE);
    const real = await link('a', await server('b'), 'b');
    await m.probe('b', real, 5_000);
    expect(m.table(configured).cost('b', 'a')).not.toBe(3);
    const answers: unknown[] = [{ type: 'Pong', ts: 1 }, { type: 'Pong', ts: 'now' }, { type: 'Error', code: 'x' }, 'garbage', null, { ts: 5 }];
    for (const answer of answers) {
      await m.probe('b', real, 5_000);
      const fake: Probeable = { request: async () => answer };
      expect(await rejection(m.probe('b', fake, 5_000)), JSON.stringify(answer)).toMatchObject({ code: ErrorCodes.COST_PROBE_INVALID });
      expect(m.table(configured).cost('b', 'a')).toBe(3);
    }
  });

  it('config: images.cost.measure takes defaults; a bad value is refused', () => {
    expect(validateConfig({ images: { cost: { measure: {} } } }).images.cost.measure).toEqual(DEFAULT_MEASURE);
    expect(() => validateConfig({ images: { cost: { measure: { probeMs: -5 } } } })).toThrow();
    expect(() => validateConfig({ images: { cost: { measure: { every: 5 } } } })).toThrow();
  });

  it('an ImageService measuring its links probes its peers over the peer link, records the throughput of its block fetches, reports them, and a peer it cannot reach keeps its configured cost', async () => {
    const root = mkdtempSync(path.join(tmpdir(), 'embot-linkcost-'));
    cleanups.push(() => rmSync(root, { recursive: true, force: true }));
    const servers = new Map<string, PeerServer>();
    const node = async (name: string, probe: readonly string[] = ['b', 'c']): Promise<ImageService> => {
      const s = await server(name);
      servers.set(name, s);
      mkdirSync(path.join(root, name));
      const store = Store.open({ file: path.join(root, `${name}.sqlite`) });
      cleanups.push(() => store.close());
      const service = new ImageService({
        agent: name,
        db: store.db,
        imagesDir: path.join(root, name),
        blockSize: 65536,
        indexer: 'a',
        costs: configured,
        connect: (peer) => {
          const to = servers.get(peer);
          return to ? connectPeer({ url: to.url, agent: name, secret: SECRET, expectedPeer: peer, requestTimeoutMs: 10_000 }) : Promise.reject(new Error(`no peer ${peer}`));
        },
        hostLoad: async () => ({ cpu: 0, freeMemory: 1 << 30 }),
        reindexMs: 0,
        requestTimeoutMs: 10_000,
        buildTimeoutMs: 60_000,
        measure: { ...DEFAULT_MEASURE, probeMs: 60_000 },
        probePeers: () => probe,
      });
      cleanups.push(() => service.close());
      peerEndpoint(s).register(service.peerService());
      return service;
    };
    const a = await node('a');
    const b = await node('b');
    writeImage(path.join(root, 'b', 'big.img'), randomImage(16, 65536));
    await b.start();
    await a.start();
    await a.probeLinks();
    const links = a.report().links ?? [];
    expect(links.map((l) => l.peer)).toEqual(['b']); // c is not reachable: configured cost
    expect(links[0]!.bytesPerSec).toBeUndefined();
    await a.build('big.img');
    const after = a.report().links![0]!;
    expect(after.bytesPerSec).toBeGreaterThan(0);
    expect(after.cost).toBeCloseTo(costFromMeasurement({ rttMs: after.rttMs, bytesPerSec: after.bytesPerSec! }, DEFAULT_MEASURE.requestBytes), 3);

    // b's measured links travel to the indexer (a) with b's updates: placement asked at a ranks the
    // pair c -> b (neither end a) by b's measurement, not by the config's default of 10.
    const c = await node('c', []);
    writeImage(path.join(root, 'c', 'only-c.img'), randomImage(16, 65536));
    await c.start();
    await b.probeLinks();
    await b.reindex();
    const measured = b.report().links!.find((l) => l.peer === 'c')!.cost;
    expect(measured).not.toBe(10);
    const placed = await a.place('only-c.img', ['b'], { kind: 'cheapest' });
    expect(placed.candidates[0]!.cost).toBeCloseTo(1 * measured, 6);
  });

  it('measured links on the wire: a member update and the indexer answer carry them; bad ones are refused with a code', () => {
    const body = { seq: 1, full: true, added: [], removed: [], changed: [], dropped: [], links: [{ peer: 'c', cost: 12.5 }] };
    expect(decodeIndexUpdate(encodeIndexUpdate(body)).links).toEqual([{ peer: 'c', cost: 12.5 }]);
    expect(decodeIndexUpdate(encodeIndexUpdate({ ...body, links: [] })).links).toBeUndefined();
    const raw = new Packr({ useRecords: false, moreTypes: false });
    const base = { seq: 1, full: true, added: new Uint8Array(0), removed: new Uint8Array(0), changed: [], dropped: [] };
    for (const links of ['x', [['c']], [['c', -1]], [['c', Number.NaN]], [[5, 1]], [['', 1]], Array.from({ length: MAX_LINKS + 1 }, (_, i) => [`h${i}`, 1])]) {
      let code: unknown;
      try {
        decodeIndexUpdate(raw.pack({ ...base, links }));
      } catch (e) {
        code = (e as { code?: unknown }).code;
      }
      expect(code, JSON.stringify(links).slice(0, 40)).toBe(ErrorCodes.INDEX_UPDATE_REFUSED);
    }
    const manifest = { name: 'x.img', size: 0, blockSize: 65536, hashes: [] };
    const answer = { manifest, holders: new Map(), loads: new Map(), members: ['b'], links: [['b', 'c', 4] as const] };
    expect(decodeIndexAnswer(encodeIndexAnswer(answer)).links).toEqual([['b', 'c', 4]]);
  });

  it('the group table: a pair measured from both ends costs the mean, either direction; others the base', () => {
    const t = groupMeasuredTable([['b', 'c', 4], ['c', 'b', 6], ['b', 'd', 2]], configured);
    expect(t.cost('b', 'c')).toBe(5);
    expect(t.cost('c', 'b')).toBe(5);
    expect(t.cost('d', 'b')).toBe(2);
    expect(t.cost('a', 'c')).toBe(7);
    expect(t.cost('c', 'c')).toBe(0);
  });
});
