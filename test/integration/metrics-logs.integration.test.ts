import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ParsedFamily } from 'parse-prometheus-text-format';
import { ControlClient } from '../../core/control/client.ts';
import { ErrorCodes } from '../../core/errors.ts';
import type { MigrationInfo } from '../../core/mobility/migration-record.ts';
import { Cluster } from '../harness/cluster.ts';
import { runCli, waitFor } from '../harness/agent-process.ts';
import { parseExposition, type Exposition } from '../harness/prometheus.ts';

/**
 * Issue 15, part 1, on two real agents (child processes) with a control token: `GET /metrics`
 * parsed by a real Prometheus text parser, its counters moving as a sim migration runs, checked
 * against what `embot migrate --json` prints; refused without the token; every JSON log line
 * that names the migration carries its id, on both agents.
 */
const TOKEN = 'metrics-test-token-0123';
const CAP = 2 << 20;
/** The sim guest dirties this many bytes per second. */
const DIRTY = 256 << 10;
let cluster: Cluster;
const clients = new Map<string, ControlClient>();
const client = (n: string): ControlClient => clients.get(n)!;
const url = (n: string): string => cluster.agent(n).url;

beforeAll(async () => {
  cluster = await Cluster.start(['a', 'b'], {
    plugins: [{ from: 'shipped', name: 'vm-watchdog' }],
    env: () => ({ EMBOT_CONTROL_TOKEN: TOKEN }),
    // b's primary path to a is capped: the migration back (a running one to scrape) takes seconds.
    // b offers 32 MiB to VMs: a bigger one is denied.
    config: (n) => ({ logLevel: 'debug', ...(n === 'b' ? { dataplane: { primaryCapBytesPerSecOf: { a: CAP } }, sim: { hostMemory: 32 << 20 } } : {}) }),
  });
  for (const n of ['a', 'b']) clients.set(n, new ControlClient(url(n), TOKEN));
  await client('a').createVm({ name: 'web', memory: 4 << 20, dirtyRate: DIRTY });
  await client('a').vmAction('web', 'start');
  await waitFor(async () => (await client('a').listEmbots()).some((e) => e.elementIds.includes('vm:web')), 10_000, 'watchdog of web on a');
}, 60_000);
afterAll(() => cluster?.stop());

/** A scrape: the parsed families (an array, so the helpers below take it) and its histograms. */
type Scrape = ParsedFamily[] & { readonly exposition: Exposition };

async function scrape(n: string): Promise<Scrape> {
  const res = await fetch(`${url(n)}/metrics`, { headers: { Authorization: `Bearer ${TOKEN}` } });
  expect(res.status).toBe(200);
  expect(res.headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
  const exposition = parseExposition(await res.text());
  return Object.assign([...exposition.families], { exposition });
}

function family(fams: readonly ParsedFamily[], name: string): ParsedFamily {
  const f = fams.find((x) => x.name === name);
  if (!f) throw new Error(`no metric ${name} in the scrape (have: ${fams.map((x) => x.name).join(', ')})`);
  return f;
}

/** The value of the sample of `name` whose labels include `labels` (0 when there is none yet). */
function value(fams: readonly ParsedFamily[], name: string, labels: Record<string, string> = {}): number {
  const s = family(fams, name).metrics.find((m) => Object.entries(labels).every(([k, v]) => m.labels?.[k] === v));
  return s?.value === undefined ? 0 : Number(s.value);
}

function histogram(fams: Scrape, name: string, labels: Record<string, string>): { count: number; sum: number } {
  expect(family(fams, name).type).toBe('HISTOGRAM');
  return fams.exposition.histogram(name, labels);
}

describe('GET /metrics', () => {
  it('refuses a request without the token, or with a wrong one, with the coded 401', async () => {
    const variants: Record<string, string>[] = [{}, { Authorization: 'Bearer not-the-token-at-all' }];
    for (const headers of variants) {
      const res = await fetch(`${url('a')}/metrics`, { headers });
      expect(res.status).toBe(401);
      const body = (await res.json()) as { error: { code: string } };
      expect(body.error.code).toBe(ErrorCodes.CONTROL_UNAUTHORIZED);
    }
  });

  it('answers other methods and near-miss paths with coded errors, and keeps serving', async () => {
    const auth = { Authorization: `Bearer ${TOKEN}` };
    const post = await fetch(`${url('a')}/metrics`, { method: 'POST', headers: auth, body: 'x' });
    expect(post.status).toBe(405);
    expect(((await post.json()) as { error: { code: string } }).error.code).toBe(ErrorCodes.CONTROL_BAD_REQUEST);
    for (const path of ['/metricsx', '/metrics/', '/v1/metrics']) {
      const res = await fetch(`${url('a')}${path}`, { headers: auth });
      expect(res.status, path).toBe(404);
      expect(((await res.json()) as { error: { code: string } }).error.code).toBe(ErrorCodes.CONTROL_NOT_FOUND);
    }
    const withQuery = await fetch(`${url('a')}/metrics?name[]=embot_vms`, { headers: auth });
    expect(withQuery.status).toBe(200);
    expect(await withQuery.text()).toContain('# TYPE embot_vms gauge');
  });

  it('parses as Prometheus text; every family has help, a type, and a name after the conventions', async () => {
    const fams = await scrape('a');
    expect(fams.length).toBeGreaterThan(20);
    for (const f of fams) {
      expect(f.name).toMatch(/^embot_[a-z0-9_]+$/);
      expect(f.help.length).toBeGreaterThan(10);
      // Counters end in _total; nothing else does; a rate is not a bare _bytes.
      expect(f.type === 'COUNTER').toBe(f.name.endsWith('_total'));
      if (f.name.includes('rate')) expect(f.name).toMatch(/_bytes_per_second$/);
      if (f.type === 'HISTOGRAM') expect(f.name).toMatch(/_seconds$/);
    }
    expect(value(fams, 'embot_agent_info', { agent: 'a', driver: 'sim' })).toBe(1);
    expect(value(fams, 'embot_vms', { state: 'running' })).toBe(1);
    expect(value(fams, 'embot_embots', { status: 'running' })).toBeGreaterThanOrEqual(1);
    expect(family(fams, 'embot_policies').metrics.some((m) => m.labels?.['module'] === 'vm-watchdog' && Number(m.value) >= 1)).toBe(true);
    expect(value(fams, 'embot_plugins', { status: 'loaded' })).toBe(1);
  });

  it('counts events in and dispatched as they are emitted', async () => {
    const before = await scrape('a');
    for (let i = 0; i < 5; i++) await client('a').emitEvent({ elementId: 'vm:web', type: 'METRICS_PROBE', payload: { i } });
    await waitFor(async () => value(await scrape('a'), 'embot_events_dispatched_total') >= value(before, 'embot_events_dispatched_total') + 5, 10_000, 'five more dispatched');
    const after = await scrape('a');
    expect(value(after, 'embot_events_in_total') - value(before, 'embot_events_in_total')).toBeGreaterThanOrEqual(5);
    expect(value(after, 'embot_events_queued')).toBeGreaterThanOrEqual(0);
  });
});

describe('a sim migration a → b', () => {
  let migration: MigrationInfo;
  let before: { a: Scrape; b: Scrape };
  let after: { a: Scrape; b: Scrape };
  let targetView: MigrationInfo;

  beforeAll(async () => {
    before = { a: await scrape('a'), b: await scrape('b') };
    const r = await runCli(['migrate', 'web', '--to', 'b', '--json', '--agent', url('a'), '--token', TOKEN]);
    expect(r.code, r.stderr).toBe(0);
    migration = JSON.parse(r.stdout) as MigrationInfo;
    targetView = await waitFor(async () => {
      const m = await client('b').getMigration(migration.id);
      return m.outcome !== null ? m : undefined;
    }, 20_000, 'the target to finish');
    after = { a: await scrape('a'), b: await scrape('b') };
  }, 60_000);

  const delta = (side: 'a' | 'b', name: string, labels: Record<string, string> = {}): number => value(after[side], name, labels) - value(before[side], name, labels);

  it('moved the VM (what the rest checks against)', () => {
    expect(migration.outcome).toBe('completed');
    expect(migration.summary?.memoryBytes).toBeGreaterThanOrEqual(4 << 20);
    expect(targetView.outcome).toBe('completed');
  });

  it('counts it started and succeeded once, by role, on each side', () => {
    expect(delta('a', 'embot_migrations_started_total', { role: 'source' })).toBe(1);
    expect(delta('a', 'embot_migrations_succeeded_total', { role: 'source' })).toBe(1);
    expect(delta('b', 'embot_migrations_started_total', { role: 'target' })).toBe(1);
    expect(delta('b', 'embot_migrations_succeeded_total', { role: 'target' })).toBe(1);
    expect(delta('a', 'embot_migrations_started_total', { role: 'target' })).toBe(0);
    for (const n of ['a', 'b'] as const) {
      expect(value(after[n], 'embot_migrations_running', { role: 'source' }) + value(after[n], 'embot_migrations_running', { role: 'target' })).toBe(0);
      expect(family(after[n], 'embot_migrations_aborted_total').metrics).toEqual([]);
    }
  });

  it('bytes in bytes: the memory and management bytes equal what `embot migrate --json` printed', () => {
    const s = migration.summary!;
    expect(delta('a', 'embot_migration_data_processed_bytes_total', { role: 'source', phase: 'memory' })).toBe(s.memoryBytes);
    expect(delta('a', 'embot_migration_data_processed_bytes_total', { role: 'source', phase: 'management' })).toBe(s.bytes - s.memoryBytes);
    const t = targetView.summary!;
    expect(delta('b', 'embot_migration_data_processed_bytes_total', { role: 'target', phase: 'memory' })).toBe(t.memoryBytes);
    // Per path: the paths' bytes add up to the memory the source sent on them.
    const perPath = s.precopy?.perPath ?? [];
    for (const p of perPath) expect(delta('a', 'embot_migration_path_bytes_total', { path: p.name })).toBe(p.bytes);
  });

  it('seconds in seconds: the duration and downtime histograms took totalMs and downtimeMs / 1000', () => {
    const s = migration.summary!;
    const hb = { a: histogram(before.a, 'embot_migration_duration_seconds', { role: 'source', outcome: 'completed' }), b: histogram(after.a, 'embot_migration_duration_seconds', { role: 'source', outcome: 'completed' }) };
    expect(hb.b.count - hb.a.count).toBe(1);
    expect(hb.b.sum - hb.a.sum).toBeCloseTo(s.totalMs / 1000, 6);
    expect(s.downtimeMs).not.toBeNull();
    const db = { a: histogram(before.a, 'embot_migration_downtime_seconds', { role: 'source' }), b: histogram(after.a, 'embot_migration_downtime_seconds', { role: 'source' }) };
    expect(db.b.count - db.a.count).toBe(1);
    expect(db.b.sum - db.a.sum).toBeCloseTo(s.downtimeMs! / 1000, 6);
    const tb = histogram(after.b, 'embot_migration_duration_seconds', { role: 'target', outcome: 'completed' });
    expect(tb.sum).toBeCloseTo(targetView.summary!.totalMs / 1000, 6);
  });

  it('every JSON log line that names the migration carries its id, on both agents, and none carries another', () => {
    for (const n of ['a', 'b']) {
      const lines = cluster
        .agent(n)
        .stderr.split('\n')
        .filter((l) => l.trim() !== '')
        .map((l) => JSON.parse(l) as { msg: string; migrationId?: string; level: string; name: string; time: string });
      const tagged = lines.filter((l) => l.migrationId !== undefined);
      for (const l of tagged) expect(l.migrationId).toBe(migration.id);
      for (const l of lines.filter((x) => x.msg.includes(migration.id))) expect(l.migrationId, `${n}: ${l.msg}`).toBe(migration.id);
      // The start and the outcome are logged on both sides, with the id as a field.
      expect(tagged.some((l) => / started \((source|target)\)/.test(l.msg))).toBe(true);
      expect(tagged.some((l) => /: completed$/.test(l.msg))).toBe(true);
      // Phase lines are logged without an id field: it comes from the migration's log context, across its async steps.
      expect(tagged.filter((l) => l.level === 'debug' && l.msg.startsWith(`migration ${migration.id} (`)).length).toBeGreaterThanOrEqual(3);
      for (const l of lines) {
        expect(['debug', 'info', 'warn', 'error']).toContain(l.level);
        expect(Number.isNaN(Date.parse(l.time))).toBe(false);
      }
    }
  });
});

describe('a running migration b → a (b\'s path to a capped at 2 MiB/s)', () => {
  it('shows its bytes and rates while it runs, in bytes and bytes per second, and is gone once it ends', async () => {
    const { id } = await client('b').migrate('web', 'a');
    const samples: { total: number; processed: number; remaining: number | undefined; rate: number | undefined; dirty: number | undefined }[] = [];
    for (;;) {
      const s = await scrape('b');
      const l = { migration_id: id, vm: 'web', role: 'source' };
      const total = value(s, 'embot_migration_data_total_bytes', l);
      if (total > 0) {
        expect(value(s, 'embot_migrations_running', { role: 'source' })).toBe(1);
        const has = (name: string): boolean => family(s, name).metrics.some((m) => m.labels?.['migration_id'] === id);
        samples.push({
          total,
          processed: value(s, 'embot_migration_data_processed_bytes', l),
          remaining: has('embot_migration_data_remaining_bytes') ? value(s, 'embot_migration_data_remaining_bytes', l) : undefined,
          rate: has('embot_migration_memory_transfer_rate_bytes_per_second') ? value(s, 'embot_migration_memory_transfer_rate_bytes_per_second', l) : undefined,
          dirty: has('embot_migration_dirty_memory_rate_bytes_per_second') ? value(s, 'embot_migration_dirty_memory_rate_bytes_per_second', l) : undefined,
        });
      }
      if ((await client('b').getMigration(id)).outcome !== null) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    const done = await client('b').getMigration(id);
    expect(done.outcome).toBe('completed');
    expect(samples.length).toBeGreaterThanOrEqual(2);
    for (const x of samples) {
      // Bytes: the VM's memory (4 MiB), not pages; a rate in bytes per second near the cap, not bits or pages.
      expect(x.total).toBe(4 << 20);
      expect(x.processed).toBeLessThanOrEqual(done.summary!.bytes);
      if (x.remaining !== undefined) expect(x.remaining).toBeLessThanOrEqual(x.total);
      if (x.rate !== undefined) {
        // The path sends 2 MiB/s: a rate in bytes per second reads about 2,097,152 (bits would be 8×, pages 1/4096).
        expect(x.rate).toBeGreaterThan(CAP / 2);
        expect(x.rate).toBeLessThan(CAP * 1.5);
      }
    }
    expect(samples.some((x) => x.rate !== undefined)).toBe(true);
    // The guest dirties 256 KiB/s: the dirty rate reads that in bytes per second (not pages per second, KubeVirt's unit bug).
    const dirty = samples.map((x) => x.dirty).filter((x): x is number => x !== undefined && x > 0);
    expect(dirty.length).toBeGreaterThan(0);
    for (const d of dirty) {
      expect(d).toBeGreaterThan(DIRTY / 2);
      expect(d).toBeLessThan(DIRTY * 2);
    }
    const after = await scrape('b');
    expect(value(after, 'embot_migrations_running', { role: 'source' })).toBe(0);
    expect(family(after, 'embot_migration_data_total_bytes').metrics).toEqual([]);
    expect(value(after, 'embot_migrations_succeeded_total', { role: 'source' })).toBe(1);
  }, 60_000);
});

describe('a migration the target denies', () => {
  it('counts as failed with reason denied on both sides, not as succeeded, and its log lines carry its id on both agents', async () => {
    await client('a').createVm({ name: 'big', memory: 48 << 20 });
    const before = { a: await scrape('a'), b: await scrape('b') };
    const r = await runCli(['migrate', 'big', '--to', 'b', '--json', '--agent', url('a'), '--token', TOKEN]);
    expect(r.code).toBe(1);
    const m = JSON.parse(r.stdout) as MigrationInfo;
    expect(m.outcome).toBe('denied');
    await waitFor(async () => value(await scrape('b'), 'embot_migrations_failed_total', { role: 'target', reason: 'denied' }) > value(before.b, 'embot_migrations_failed_total', { role: 'target', reason: 'denied' }), 10_000, 'the target to count it');
    const after = { a: await scrape('a'), b: await scrape('b') };
    const d = (n: 'a' | 'b', name: string, labels: Record<string, string>): number => value(after[n], name, labels) - value(before[n], name, labels);
    expect(d('a', 'embot_migrations_failed_total', { role: 'source', reason: 'denied' })).toBe(1);
    expect(d('a', 'embot_migrations_started_total', { role: 'source' })).toBe(1);
    expect(d('a', 'embot_migrations_succeeded_total', { role: 'source' })).toBe(0);
    expect(d('b', 'embot_migrations_failed_total', { role: 'target', reason: 'denied' })).toBe(1);
    expect(d('b', 'embot_migrations_started_total', { role: 'target' })).toBe(1);
    expect(histogram(after.a, 'embot_migration_duration_seconds', { role: 'source', outcome: 'denied' }).count).toBe(1);
    expect(histogram(after.a, 'embot_migration_downtime_seconds', { role: 'source' }).count).toBe(histogram(before.a, 'embot_migration_downtime_seconds', { role: 'source' }).count);
    for (const n of ['a', 'b']) {
      const lines = cluster.agent(n).stderr.split('\n').filter((l) => l.includes(m.id)).map((l) => JSON.parse(l) as { msg: string; migrationId?: string; url?: string });
      expect(lines.length, n).toBeGreaterThan(0);
      // Control requests name the id only in their URL; every other line carries it as a field.
      for (const l of lines) if (!l.url?.includes(m.id)) expect(l.migrationId, `${n}: ${l.msg}`).toBe(m.id);
      expect(lines.some((l) => l.msg.endsWith(': denied') && l.migrationId === m.id), n).toBe(true);
    }
  });
});

describe("a VM's UDP relay", () => {
  it('counts the packets it buffers while the VM is not running', async () => {
    const { createSocket } = await import('node:dgram');
    const { freePort } = await import('../harness/cluster.ts');
    const port = await freePort();
    await client('a').createVm({ name: 'udp1', memory: 1 << 20, udpPort: port });
    const socket = createSocket('udp4');
    try {
      await waitFor(async () => family(await scrape('a'), 'embot_udp_packets_buffered_total').metrics.some((m) => m.labels?.['vm'] === 'udp1'), 10_000, 'the relay of udp1');
      for (let i = 0; i < 3; i++) await new Promise<void>((resolve, reject) => socket.send(`ping ${i}`, port, '127.0.0.1', (e) => (e ? reject(e) : resolve())));
      await waitFor(async () => value(await scrape('a'), 'embot_udp_packets_buffered_total', { vm: 'udp1' }) === 3, 10_000, 'three packets buffered');
    } finally {
      socket.close();
    }
  });
});

describe('plugins that fail', () => {
  it('a plugin that does not compile counts an error; an embot whose policy throws counts a quarantine of its module', async () => {
    const { cpSync } = await import('node:fs');
    const { join } = await import('node:path');
    const { FIXTURE_PLUGINS } = await import('../harness/agent-process.ts');
    await client('a').createVm({ name: 'other', memory: 1 << 20 });
    const before = await scrape('a');
    for (const name of ['syntax-error', 'throwing']) cpSync(join(FIXTURE_PLUGINS, name), join(cluster.pluginsDir('a'), name), { recursive: true });
    await waitFor(async () => (await client('a').listEmbots()).some((e) => e.id === 'throwing/thrower/vm:other'), 15_000, 'the thrower on vm:other');
    await client('a').emitEvent({ elementId: 'vm:other', type: 'BOOM', payload: null });
    const after = await waitFor(async () => {
      const s = await scrape('a');
      return value(s, 'embot_embot_quarantines_total', { module: 'throwing' }) === 1 ? s : undefined;
    }, 15_000, 'the quarantine counted');
    expect(value(after, 'embot_plugin_errors_total', { plugin: 'syntax-error' }) - value(before, 'embot_plugin_errors_total', { plugin: 'syntax-error' })).toBeGreaterThanOrEqual(1);
    expect(value(after, 'embot_embots', { status: 'quarantined' })).toBe(1);
    expect(value(after, 'embot_plugins', { status: 'error' })).toBe(1);
    expect(family(after, 'embot_policies').metrics.some((m) => m.labels?.['module'] === 'throwing' && m.labels?.['state'] === 'armed')).toBe(true);
  });
});

describe('bad log options', () => {
  it.each([
    [['--log-level', 'loud'], /--log-level "loud" is not a log level; use one of debug, info, warn, error, silent \[EMBOT_ERR_CLI_USAGE\]/],
    [['--log-format', 'fancy'], /--log-format "fancy" is not a log format; use one of auto, pretty, json \[EMBOT_ERR_CLI_USAGE\]/],
  ])('embot agent %j exits 2 with the code', async (flags, message) => {
    const r = await runCli(['agent', ...flags, '--control', '127.0.0.1:0']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(message);
    expect(r.stdout).toBe('');
  });

  it('a config with a bad logLevel is refused with EMBOT_ERR_CONFIG_INVALID (exit 2), naming the key', async () => {
    const { writeFileSync } = await import('node:fs');
    const { join } = await import('node:path');
    const file = join(cluster.root, 'bad-log.json');
    writeFileSync(file, JSON.stringify({ logLevel: 'loud' }));
    const r = await runCli(['agent', '--config', file, '--control', '127.0.0.1:0']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/logLevel: .*"debug"\|"info"\|"warn"\|"error"\|"silent" \[EMBOT_ERR_CONFIG_INVALID\]/);
  });

  it('the running agents are unaffected', async () => {
    for (const n of ['a', 'b']) expect((await client(n).status()).name).toBe(n);
  });
});
