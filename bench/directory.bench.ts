/**
 * The fleet directory on etcd (core/peers): what it costs to be found, and what a peer lookup costs.
 *
 * - start → seen: from an EtcdPeerDirectory's `start()` (a new etcd client, a lease, the record's
 *   put, the list and the watch) to the moment another agent's directory, already watching, lists
 *   it. Limit, same run and same observer: the bare etcd3 calls that make a record visible (a new
 *   client, a lease, the put on it). Alternated pairs (the order flips each pair), medians; ratio =
 *   limit / value (1 = no cost over the bare calls).
 * - agent start → seen: an `embot agent --etcd` child process from its spawn to the watching
 *   directory listing it. Limit, same process: spawn to its ready line (what a script waits for);
 *   ratio = limit / value (above 1: peers see the agent before it says it is ready).
 * - lookup: `directory.get(name)` (what mobility calls at each `migrate --to`) against a plain
 *   `Map.get` of the same 100 names, rounds alternated, medians; ratio = value / limit.
 *
 * etcd is Debian's /usr/bin/etcd on loopback ports (test/harness/etcd-server.ts), started and removed here.
 *
 * @example
 * ```sh
 * npx tsx bench/directory.bench.ts [--quick]
 * npm run bench -- --only directory
 * ```
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Etcd3 } from 'etcd3';
import { createLogger } from '../core/logger.ts';
import { encodeRecord, recordKey } from '../core/peers/directory-record.ts';
import { EtcdPeerDirectory } from '../core/peers/etcd-peer-directory.ts';
import { etcdAvailability, etcdServer, type EtcdServer } from '../test/harness/etcd-server.ts';
import { measureRate, renderTable, type BenchRow, type BenchTable } from './table.ts';

// The agents' default prefix: this etcd is the bench's own.
const PREFIX = '/embot';
const BIN = fileURLToPath(new URL('../bin/embot.mjs', import.meta.url));
const AGENT_TIMEOUT_MS = 60_000;
const LOOKUP_PEERS = 100;
const log = createLogger({ level: 'silent', name: 'bench' });

export interface DirectoryBenchOptions {
  readonly quick?: boolean;
}

function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

function directory(etcd: EtcdServer, self: string): EtcdPeerDirectory {
  return new EtcdPeerDirectory({ self, endpoints: [etcd.url], prefix: PREFIX, ttlSeconds: 10, tls: false, staticPeers: new Map(), version: 'bench', startedAt: Date.now(), log });
}

/** Resolves with the ms from `t0` to the observer listing `name`. */
function seen(observer: EtcdPeerDirectory, name: string, t0: bigint): Promise<number> {
  return new Promise((done) => {
    const on = (c: { name: string; url: string | undefined }): void => {
      if (c.name !== name || c.url === undefined) return;
      observer.off('change', on);
      done(Number(process.hrtime.bigint() - t0) / 1e6);
    };
    observer.on('change', on);
  });
}

/** Waits until the observer no longer lists `name` (the previous sample's record gone). */
async function gone(observer: EtcdPeerDirectory, name: string): Promise<void> {
  while (observer.has(name)) await new Promise((r) => setTimeout(r, 5));
}

async function viaDirectory(etcd: EtcdServer, observer: EtcdPeerDirectory, name: string): Promise<number> {
  const d = directory(etcd, name);
  const t0 = process.hrtime.bigint();
  const ms = seen(observer, name, t0);
  d.start({ url: 'ws://127.0.0.1:7999/' });
  const result = await ms;
  await d.close();
  await gone(observer, name);
  return result;
}

async function viaBareEtcd(etcd: EtcdServer, observer: EtcdPeerDirectory, name: string): Promise<number> {
  const t0 = process.hrtime.bigint();
  const ms = seen(observer, name, t0);
  const client = new Etcd3({ hosts: etcd.url });
  const lease = client.lease(10);
  await lease.put(recordKey(PREFIX, name)).value(encodeRecord({ name, url: 'ws://127.0.0.1:7999/', version: 'bench', startedAt: Date.now() }));
  const result = await ms;
  await lease.revoke();
  client.close();
  await gone(observer, name);
  return result;
}

/** One `embot agent --etcd` from spawn to ready and to seen by `observer`; stopped (SIGTERM, lease revoked) after. */
async function agentSample(etcd: EtcdServer, observer: EtcdPeerDirectory, root: string, name: string): Promise<{ readonly readyMs: number; readonly seenMs: number }> {
  const t0 = process.hrtime.bigint();
  const seenMs = seen(observer, name, t0);
  const args = [BIN, 'agent', '--name', name, '--data', join(root, name), '--plugins', join(root, 'plugins'), '--control', '127.0.0.1:0', '--peer-listen', '127.0.0.1:0', '--secret-file', join(root, 'cluster.secret'), '--etcd', etcd.url, '--log-level', 'warn'];
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  let out = '';
  let err = '';
  child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
  try {
    const readyMs = await new Promise<number>((done, fail) => {
      const timer = setTimeout(() => fail(new Error(`agent ${name} not ready in ${AGENT_TIMEOUT_MS} ms: ${err.slice(-2000)}`)), AGENT_TIMEOUT_MS);
      child.stdout.setEncoding('utf8').on('data', (d: string) => {
        out += d;
        if (/ready: control /.test(out)) {
          clearTimeout(timer);
          done(Number(process.hrtime.bigint() - t0) / 1e6);
        }
      });
      child.once('exit', (code) => fail(new Error(`agent ${name} exited with ${code}: ${err.slice(-2000)}`)));
    });
    return { readyMs, seenMs: await seenMs };
  } finally {
    child.kill('SIGTERM');
    await exited;
    await gone(observer, name);
  }
}

export async function run(opts: DirectoryBenchOptions = {}): Promise<BenchTable> {
  const available = etcdAvailability();
  if (!available.ok) throw new Error(`directory bench needs etcd: ${available.reason}`);
  const cleanups: (() => void | Promise<void>)[] = [];
  const etcd = await etcdServer({ push: (c) => void cleanups.push(c) });
  const observer = directory(etcd, 'observer');
  try {
    await etcd.start();
    observer.start({ url: 'ws://127.0.0.1:7998/' });
    while (observer.status().state !== 'connected') await new Promise((r) => setTimeout(r, 10));

    const pairs = opts.quick ? 4 : 15;
    // One of each first, not counted: etcd3's module load and the first gRPC connection.
    await viaDirectory(etcd, observer, 'warm-d');
    await viaBareEtcd(etcd, observer, 'warm-b');
    const dir: number[] = [];
    const bare: number[] = [];
    for (let i = 0; i < pairs; i++) {
      if (i % 2 === 0) {
        dir.push(await viaDirectory(etcd, observer, `d${i}`));
        bare.push(await viaBareEtcd(etcd, observer, `b${i}`));
      } else {
        bare.push(await viaBareEtcd(etcd, observer, `b${i}`));
        dir.push(await viaDirectory(etcd, observer, `d${i}`));
      }
    }

    // Lookups: 100 peers known through etcd (plain puts), read as mobility reads them.
    const writer = new Etcd3({ hosts: etcd.url });
    const names = Array.from({ length: LOOKUP_PEERS }, (_, i) => `peer-${i}`);
    try {
      for (const n of names) await writer.put(recordKey(PREFIX, n)).value(encodeRecord({ name: n, url: `ws://127.0.0.1:${20000 + names.indexOf(n)}/`, version: 'bench', startedAt: 1 }));
    } finally {
      writer.close();
    }
    while (!names.every((n) => observer.has(n))) await new Promise((r) => setTimeout(r, 10));
    const plain = new Map<string, string>(observer);
    let sink = 0;
    const lookups = (get: (n: string) => string | undefined) => (): void => {
      for (const n of names) sink += get(n)!.length;
    };
    const rounds = opts.quick ? 3 : 7;
    const minMs = opts.quick ? 100 : 300;
    const viaDir: number[] = [];
    const viaMap: number[] = [];
    for (let i = 0; i < rounds; i++) {
      const d = (): number => measureRate(names.length, lookups((n) => observer.get(n)), minMs);
      const m = (): number => measureRate(names.length, lookups((n) => plain.get(n)), minMs);
      if (i % 2 === 0) {
        viaDir.push(d());
        viaMap.push(m());
      } else {
        viaMap.push(m());
        viaDir.push(d());
      }
    }
    if (sink === 0) throw new Error('lookups returned nothing');

    const agentRuns = opts.quick ? 2 : 5;
    const readyMs: number[] = [];
    const agentSeenMs: number[] = [];
    const root = mkdtempSync(join(tmpdir(), 'embot-bench-directory-'));
    cleanups.push(() => rmSync(root, { recursive: true, force: true }));
    mkdirSync(join(root, 'plugins'));
    writeFileSync(join(root, 'cluster.secret'), randomBytes(32).toString('base64'));
    for (let i = 0; i < agentRuns; i++) {
      const r = await agentSample(etcd, observer, root, `agent-${i}`);
      readyMs.push(r.readyMs);
      agentSeenMs.push(r.seenMs);
    }

    const dirMs = median(dir);
    const bareMs = median(bare);
    const dirRate = median(viaDir);
    const mapRate = median(viaMap);
    const agentSeen = median(agentSeenMs);
    const agentReady = median(readyMs);
    const rows: BenchRow[] = [
      { name: 'agent start → seen by a watching peer (embot agent --etcd)', value: agentSeen, unit: 'ms', limitName: 'spawn → ready line, same process', limit: agentReady, ratio: agentReady / agentSeen },
      { name: 'start → seen by a watching peer (EtcdPeerDirectory)', value: dirMs, unit: 'ms', limitName: 'bare etcd3 client + lease + put → seen', limit: bareMs, ratio: bareMs / dirMs },
      { name: `peer lookup, ${LOOKUP_PEERS} peers (directory.get)`, value: dirRate, unit: 'lookups/s', limitName: 'Map.get, same names', limit: mapRate, ratio: dirRate / mapRate },
    ];
    return {
      title: 'Fleet directory on etcd',
      rows,
      notes: [
        `start → seen: median of ${pairs} alternated pairs (directory ${dir.map((x) => x.toFixed(1)).join(' ')} ms; bare ${bare.map((x) => x.toFixed(1)).join(' ')} ms); ratio = limit / value`,
        `agent start: median of ${agentRuns} agents (seen ${agentSeenMs.map((x) => x.toFixed(0)).join(' ')} ms; ready ${readyMs.map((x) => x.toFixed(0)).join(' ')} ms)`,
        `lookup: median of ${rounds} alternated rounds; ratio = value / limit`,
        'no target set; etcd 3.4 on loopback, one member, fresh data dir',
      ],
    };
  } finally {
    await observer.close();
    for (const c of cleanups.reverse()) await c();
  }
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) {
  console.log(renderTable(await run({ quick: process.argv.includes('--quick') })));
  process.exit(0);
}
