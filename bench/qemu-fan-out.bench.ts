/**
 * Issue 13 with the qemu driver: one QEMU stream relayed to several destinations
 * (effectors/hypervisor/qemu/stream-relay.ts, qemu-fan-out.ts). Driver level (no agents), the
 * same 64 MiB guest each time, real QEMU under TCG:
 *
 *   direct: prepareIncoming, then migrateOut straight to the target's QEMU → its bootIncoming
 *           (the target at its last reversible point) — the limit, measured in the same run;
 *   relay n: the fanOut session to n = 1, 2, 3 targets (prepared beforehand like the direct one)
 *           → the first target's bootIncoming; n = 1 with `relayAlways` (the relay's own cost:
 *           a session of one destination migrates straight to it since issue 13's direct path);
 *   fan-out n=1: the driver's fanOut session to one target as the product runs it (`prewarm --to b`,
 *           a retry set of one): QEMU straight to it, no relay — should equal direct.
 *
 * Runs alternate (direct, 1, 2, 3, direct, …; each rep starting one variant later) so load on this
 * shared machine falls on all alike; medians. A note gives each variant's CPU (the source QEMU, the
 * target QEMUs, this process with the relay) and the wall time that much CPU needs on this
 * machine's cores at the least: what separates the 2-destination figure from its target here. Rows: the relay's cost (n = 1 against direct), and time to first boot with
 * 2 and 3 destinations against direct (issue target ≤ 1.2× with 2). `--candidates` adds to the
 * same loop the ways of relaying that were measured against it: the relay with QEMU writing into
 * a unix socket (as it was before its loopback TCP source), and QEMU's `exec:` into a shell `cat` / `tee` (no JS on
 * the byte path; plaintext and without a bound per destination, so measured, not shipped). `--tls`:
 * every QEMU and the relay with agent certificates, as with `peer.tls` (QEMU's own TLS direct, the
 * relay's per destination; no `exec:` rows). Called from qemu.bench.ts
 * (its section "(f)") and runnable alone: `npx tsx bench/qemu-fan-out.bench.ts [--quick | --reps N] [--candidates] [--tls]`.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import path, { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { QemuDriver } from '../effectors/hypervisor/qemu/qemu-driver.ts';
import { QemuFanOutSession } from '../effectors/hypervisor/qemu/qemu-fan-out.ts';
import type { QemuVmSpec } from '../effectors/hypervisor/qemu/vm-spec.ts';
import { cpuMs } from './process-cpu.ts';
import { killQemusUnder, median, qemuMissing, waitSerial } from './qemu-bench-support.ts';
import { renderTable, type BenchRow, type BenchTable } from './table.ts';
import type { QemuTlsFiles } from '../effectors/hypervisor/qemu/migration-tls.ts';
import { makeTlsFixture, type TlsFixture } from '../test/harness/cluster-tls.ts';

const MiB = 1024 * 1024;

interface FanOutRun {
  readonly ms: number;
  readonly bytes: number;
  /** CPU ms over the timed part (process-cpu.ts): the source QEMU, the target QEMUs together, this process (the driver and the relay; not an `exec:` shell). */
  readonly cpu: { readonly source: number; readonly targets: number; readonly node: number };
}


/** How the stream reaches the targets: QEMU straight to one; the agent's relay to n; or QEMU's `exec:` into a shell `tee` to n (no JS on the byte path; plaintext, no bound per destination: a candidate measured, not shipped). */
export type FanOutVariant = { readonly kind: 'direct' } | { readonly kind: 'relay' | 'relayUnix' | 'exec' | 'fanOut'; readonly n: number };

/** `exec:` URI duplicating the stream to every `tcp:HOST:PORT` with bash's /dev/tcp: `cat` for one, `tee` with one `cat` per extra target. */
export function teeExecUri(uris: readonly string[]): string {
  const dev = (u: string): string => {
    const m = /^tcp:([0-9.]+):(\d+)$/.exec(u);
    if (!m) throw new Error(`not tcp:HOST:PORT: ${u}`);
    return `/dev/tcp/${m[1]}/${m[2]}`;
  };
  const [first, ...rest] = uris.map(dev);
  const script = rest.length === 0 ? `exec cat > ${first}` : `exec tee ${rest.map((d) => `>(exec cat > ${d})`).join(' ')} > ${first}`;
  return `exec:exec bash -c '${script}'`;
}

/** One migration of `spec` per `variant`; time from migrate to the first bootIncoming. With `tls`, as agents with `peer.tls` do: QEMU's own TLS direct, the relay's per destination. */
async function once(root: string, spec: QemuVmSpec, variant: FanOutVariant, tls?: TlsFixture): Promise<FanOutRun> {
  const n = variant.kind === 'direct' ? 1 : variant.n;
  const dir = mkdtempSync(join(root, 'r-'));
  const certs = (name: string): { readonly tls?: QemuTlsFiles } => (tls ? { tls: tls.files(name) } : {});
  const source = new QemuDriver({ root: join(dir, 's'), accel: 'tcg', ...certs('s') });
  const targets = Array.from({ length: n }, (_, i) => new QemuDriver({ root: join(dir, `t${i}`), accel: 'tcg', ...certs(`t${i}`) }));
  try {
    await source.create(spec);
    await source.start(spec.name);
    await waitSerial(source.stateDir(spec.name), 2);
    const endpoints = await Promise.all(targets.map((t) => t.prepareIncoming(spec, tls ? { sourceName: 's' } : {})));
    const boot = (i: number): Promise<unknown> => targets[i]!.capabilities.incomingBoot!.bootIncoming(spec.name, { timeoutMs: 60_000 });
    const pids = { source: source.pid(spec.name), targets: targets.map((t) => t.pid(spec.name)) };
    const cpuOf = (pid: number | undefined): number => (pid === undefined ? 0 : cpuMs(pid));
    const cpuNow = () => ({ source: cpuOf(pids.source), targets: pids.targets.reduce<number>((sum, p) => sum + cpuOf(p), 0), node: process.cpuUsage() });
    const cpu0 = cpuNow();
    const started = performance.now();
    let bytes = 0;
    if (variant.kind === 'direct') {
      bytes = (await source.migrateOut(spec.name, { endpoint: endpoints[0]!.endpoint, ...(tls ? { targetName: 't0' } : {}) })).bytes;
      await boot(0);
    } else if (variant.kind === 'exec') {
      bytes = (await source.migrateOut(spec.name, { endpoint: { uri: teeExecUri(endpoints.map((e) => e.endpoint.uri)) } })).bytes;
      await Promise.any(targets.map((_, i) => boot(i)));
    } else {
      const names = targets.map((_, i) => `t${i}`);
      // relayUnix: the relay as it was, QEMU writing into a unix socket (the A/B of its loopback TCP source).
      // relay n=1: relayed although alone (relayAlways), the relay's cost; fanOut: the driver's session as the product runs it.
      const session =
        variant.kind === 'relayUnix' || (variant.kind === 'relay' && n === 1)
          ? new QemuFanOutSession(source, spec.name, names, { ...(variant.kind === 'relayUnix' ? { relaySource: 'unix' as const } : {}), relayAlways: true, ...certs('s') })
          : source.capabilities.fanOut!.begin(spec.name, names);
      // Each destination boots as soon as its own copy is in: the first to be ready wins.
      await Promise.any(
        names.map(async (name, i) => {
          const r = await session.migrateOut(name, { endpoint: endpoints[i]!.endpoint });
          // The row must measure what it names: the product's one-destination session goes direct, the rest through the relay.
          const want = variant.kind === 'fanOut' ? 'direct' : 'relay';
          if (r.transport !== want) throw new Error(`qemu fan-out bench: ${variant.kind} n=${n} went ${r.transport ?? '?'}, not ${want}`);
          bytes = r.bytes;
          return boot(i);
        }),
      );
      session.close();
    }
    const ms = performance.now() - started;
    const cpu1 = cpuNow();
    const nodeUs = process.cpuUsage(cpu0.node);
    return { ms, bytes, cpu: { source: cpu1.source - cpu0.source, targets: cpu1.targets - cpu0.targets, node: (nodeUs.user + nodeUs.system) / 1000 } };
  } finally {
    await source.close();
    for (const t of targets) await t.close();
    await killQemusUnder(dir);
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * The rows: relay with 1, 2, 3 targets against a direct migration, all alternated in one loop.
 * With `candidates`, QEMU's `exec:` into a shell tee with 1 and 2 targets joins the loop: the same
 * copy without Node on the byte path, to see what taking JS off it would buy.
 */
export async function fanOutRows(root: string, reps: number, o: { readonly candidates?: boolean; readonly tls?: boolean } = {}): Promise<{ rows: BenchRow[]; notes: string[] }> {
  // Agents' certificates, as `embot ca init` makes them: s the source, t0… the targets.
  const tls = o.tls ? await makeTlsFixture(join(root, 'ca'), ['s', 't0', 't1', 't2']) : undefined;
  // Idle after one pass: static memory, so every run moves the same bytes and the rounds do not vary.
  const spec: QemuVmSpec = { name: 'fo', memory: 64 * MiB, vcpus: 1, testGuest: { passes: 1, delayLoops: 0 } };
  const variants: readonly (readonly [string, FanOutVariant])[] = [
    ['direct', { kind: 'direct' }],
    ['fan-out n=1', { kind: 'fanOut', n: 1 }],
    ['relay n=1', { kind: 'relay', n: 1 }],
    ['relay n=2', { kind: 'relay', n: 2 }],
    ['relay n=3', { kind: 'relay', n: 3 }],
    ...(o.candidates
      ? ([
          ['relayUnix n=1', { kind: 'relayUnix', n: 1 }],
          ['relayUnix n=2', { kind: 'relayUnix', n: 2 }],
          // Plaintext, so not beside a TLS run.
          ...(o.tls
            ? []
            : ([
                ['exec tee n=1', { kind: 'exec', n: 1 }],
                ['exec tee n=2', { kind: 'exec', n: 2 }],
              ] as const)),
        ] as const)
      : []),
  ];
  const runs = new Map<string, FanOutRun[]>(variants.map(([k]) => [k, []]));
  // Each rep starts one variant later: a variant that always ran right after the heaviest one (exec tee n=2, whose
  // shells outlive their QEMUs for a moment) measured 1.8x slower than the same path in the next slot.
  for (let i = 0; i < reps; i++) {
    for (let j = 0; j < variants.length; j++) {
      const [k, v] = variants[(i + j) % variants.length]!;
      runs.get(k)!.push(await once(root, spec, v, tls));
    }
  }
  const med = (k: string): number => median(runs.get(k)!.map((r) => r.ms));
  const direct = med('direct');
  const row = (k: string, name: string, target?: { readonly text: string; readonly max: number }): BenchRow => ({
    name: tls ? `${name}, TLS (QEMU's direct, the relay's per destination)` : name,
    value: med(k),
    unit: 'ms',
    limitName: 'direct migrateOut → bootIncoming, same guest',
    limit: direct,
    ratio: direct / med(k),
    ...(target ? { target: target.text, met: med(k) <= target.max * direct } : {}),
  });
  const rows = [
    row('fan-out n=1', 'qemu fan-out to 1 destination (prewarm --to b, a retry set of one): QEMU straight to it, no relay → bootIncoming', { text: '= direct (ratio ~1)', max: 1.2 }),
    row('relay n=1', 'qemu relay cost: 1 destination through the relay (relayAlways) → bootIncoming (64 MiB idle guest)'),
    row('relay n=2', 'qemu time to first boot, 2 destinations (relay)', { text: '≤ 1.2 × single destination', max: 1.2 }),
    row('relay n=3', 'qemu time to first boot, 3 destinations (relay)'),
    ...(o.candidates
      ? [
          row('relayUnix n=1', 'candidate (the relay before): QEMU into a unix socket, 1 destination'),
          row('relayUnix n=2', 'candidate (the relay before): QEMU into a unix socket, first boot of 2 destinations'),
          ...(o.tls
            ? []
            : [
                row('exec tee n=1', 'candidate: QEMU exec: into cat, 1 destination (no JS on the byte path, plaintext)'),
                row('exec tee n=2', 'candidate: QEMU exec: into tee, first boot of 2 destinations (plaintext, no bound)'),
              ]),
        ]
      : []),
  ];
  const list = (k: string): string => runs.get(k)!.map((r) => r.ms.toFixed(0)).join(', ');
  const cores = cpus().length;
  const cpuOf = (k: string): string => {
    const xs = runs.get(k)!;
    const s = median(xs.map((r) => r.cpu.source));
    const t = median(xs.map((r) => r.cpu.targets));
    const n = median(xs.map((r) => r.cpu.node));
    return `${k}: source QEMU ${s.toFixed(0)}, target QEMUs ${t.toFixed(0)}, this process ${n.toFixed(0)} ms → ≥ ${((s + t + n) / cores).toFixed(0)} ms of wall on ${cores} cores`;
  };
  const notes = [
    `CPU over the timed part (medians; an exec: shell's own not counted): ${variants.map(([k]) => cpuOf(k)).join('; ')}. Against the 2-destination target (1.2 × direct = ${(1.2 * direct).toFixed(0)} ms).`,
    `(f) medians of ${reps}, runs alternated (each rep starting one variant later): ${variants.map(([k]) => `${k} [${list(k)}]`).join(', ')} ms; bytes per destination ${(runs.get('relay n=1')![0]!.bytes / MiB).toFixed(1)} MiB (direct ${(runs.get('direct')![0]!.bytes / MiB).toFixed(1)} MiB). Driver level, targets prepared before the clock starts; ratio = direct / value (below 1: slower than direct).`,
  ];
  return { rows, notes };
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) {
  const missing = qemuMissing();
  if (missing) {
    process.stdout.write(`qemu fan-out bench skipped: ${missing}\n`);
    process.exit(0);
  }
  const root = mkdtempSync(join(tmpdir(), 'embot-qfo-'));
  try {
    const repsAt = process.argv.indexOf('--reps');
    const reps = repsAt > 0 ? Number(process.argv[repsAt + 1]) : process.argv.includes('--quick') ? 2 : 5;
    if (!Number.isInteger(reps) || reps < 1) throw new Error(`--reps takes a whole number of runs per variant, not ${process.argv[repsAt + 1]}`);
    const { rows, notes } = await fanOutRows(root, reps, { candidates: process.argv.includes('--candidates'), tls: process.argv.includes('--tls') });
    const table: BenchTable = { title: 'qemu driver: one stream to several destinations (issue 13)', rows, notes };
    process.stdout.write(`${renderTable(table)}\n`);
  } finally {
    await killQemusUnder(root);
    rmSync(root, { recursive: true, force: true });
  }
  process.exit(0);
}
