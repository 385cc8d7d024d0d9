import { existsSync, readFileSync } from 'node:fs';
import { extname, resolve } from 'node:path';
import { parse as parseYaml } from 'yaml';
import { z } from 'zod';
import { ConfigError, ErrorCodes, describeError } from '../errors.ts';
import { buildTopology } from '../mobility/destination-topology.ts';
import { MIN_PROTOCOL_VERSION, PROTOCOL_VERSION } from '../wire/frames.ts';
import { DEFAULTS, defaultAgentName } from './defaults.ts';
import { peerTransportIssues } from './peer-transport.ts';

export { defaultAgentName };

const LOG_LEVELS = ['debug', 'info', 'warn', 'error', 'silent'] as const;

const AGENT_NAME = /^[a-z0-9][a-z0-9-]{0,62}$/;

const positiveInt = z.number().int().positive();

const ControlSchema = z
  .object({
    host: z.string().min(1).default(DEFAULTS.control.host),
    /** 0 picks a free port (tests). */
    port: z.number().int().min(0).max(65535).default(DEFAULTS.control.port),
    /** Bearer token the control API requires; may come from `EMBOT_CONTROL_TOKEN`. */
    token: z.string().min(8, 'a control token must be at least 8 characters').optional(),
  })
  .strict();

const SensorsSchema = z
  .object({
    host: z
      .object({
        intervalMs: positiveInt.default(DEFAULTS.sensors.host.intervalMs),
        /** `sim` derives load from the sim driver (deterministic); `os` reads the real host. */
        source: z.enum(['sim', 'os']).default(DEFAULTS.sensors.host.source),
      })
      .strict()
      .prefault({}),
    vm: z
      .object({ intervalMs: positiveInt.default(DEFAULTS.sensors.vm.intervalMs) })
      .strict()
      .prefault({}),
  })
  .strict();

const SimSchema = z
  .object({
    pageSize: positiveInt.default(DEFAULTS.sim.pageSize),
    hostCpus: positiveInt.default(DEFAULTS.sim.hostCpus),
    /** Memory this host offers to VMs (bytes); the migration policy refuses VMs that do not fit. */
    hostMemory: positiveInt.default(DEFAULTS.sim.hostMemory),
    defaultMemory: positiveInt.default(DEFAULTS.sim.defaultMemory),
    /** Bytes per second. */
    defaultDirtyRate: z.number().min(0).default(DEFAULTS.sim.defaultDirtyRate),
    /**
     * What a new VM's memory holds: `zero` (a fresh guest; the full round sends its untouched
     * pages as zero-page indexes) or `random` (a guest that has used all its RAM: every page goes in full).
     */
    startMemory: z.enum(['zero', 'random']).default(DEFAULTS.sim.startMemory),
  })
  .strict();

/** Where this agent finds its peers besides `peer.peers` (README "Fleet directory (etcd)"). */
const DirectorySchema = z
  .object({
    /** `static`: the peers in `peer.peers` only. `etcd`: also every agent registered in etcd, and this agent registers itself there. */
    kind: z.enum(['static', 'etcd']).default('static'),
    /** etcd client URLs (http:// or https://). */
    endpoints: z
      .array(z.string().refine((v) => /^https?:\/\/[^/\s]+\/?$/.test(v), 'an etcd client URL is http://HOST:PORT or https://HOST:PORT'))
      .min(1)
      .default(['http://127.0.0.1:2379']),
    /** Key prefix of this fleet; records live under `<prefix>/agents/<name>`. */
    prefix: z
      .string()
      .regex(/^(\/[A-Za-z0-9._-]+)+$/, 'a key prefix like /embot: slash-separated letters, digits, . _ -, no trailing slash')
      .default('/embot'),
    /** Lease TTL of this agent's record (s): how long an agent that died without stopping stays listed. */
    ttlSeconds: z.number().int().min(1).max(3600).default(10),
    /**
     * TLS to etcd (PEM files; every endpoint then https://): `ca` verifies etcd's certificate,
     * `cert` + `key` are this agent's client certificate for an etcd with `--client-cert-auth`
     * (the agent's `peer.tls` files do, when etcd trusts the cluster CA).
     */
    tls: z
      .object({
        ca: z.string({ error: "the CA file that signed etcd's certificate is required with directory.tls" }).min(1),
        cert: z.string().min(1).optional(),
        key: z.string().min(1).optional(),
      })
      .strict()
      .refine((t) => (t.cert === undefined) === (t.key === undefined), 'directory.tls takes cert and key together (a client certificate), or neither')
      .optional(),
    /** etcd's user/password authentication: the password is read from a file, never written in config. */
    auth: z
      .object({
        username: z.string().min(1),
        passwordFile: z.string({ error: "the file holding the etcd user's password is required with directory.auth" }).min(1),
      })
      .strict()
      .optional(),
  })
  .strict()
  .refine((d) => d.tls === undefined || d.endpoints.every((e) => e.startsWith('https://')), { message: 'with directory.tls every etcd endpoint is https://', path: ['endpoints'] });

/** Settings of the `qemu` driver (`driver: qemu`). */
const QemuSchema = z
  .object({
    /** The QEMU binary (Debian: qemu-system-x86). */
    binary: z.string().min(1).default(DEFAULTS.qemu.binary),
    /** One state dir per VM (QMP socket, pidfile, serial log); default `<dataDir>/qemu`. */
    stateDir: z.string().min(1).optional(),
    /** `auto`: KVM when /dev/kvm is usable, else TCG. */
    accel: z.enum(['auto', 'tcg', 'kvm']).default(DEFAULTS.qemu.accel),
    /** Bytes, whole MiB (at least 32 MiB). */
    defaultMemory: positiveInt.default(DEFAULTS.qemu.defaultMemory),
    defaultVcpus: positiveInt.max(64).default(DEFAULTS.qemu.defaultVcpus),
    /** A raw image VMs boot when created without `--boot`; default: the embot test guest. */
    defaultBootImage: z.string().min(1).optional(),
    /** Address incoming migrations listen on (default 127.0.0.1). */
    listenHost: z.string().min(1).optional(),
    /** Auto-converge's first vCPU throttle and its step, percent (QEMU's defaults: 20 and 10). */
    cpuThrottle: z.object({ initial: positiveInt.max(99).optional(), increment: positiveInt.max(99).optional() }).strict().optional(),
    /** Keep a pre-started incoming QEMU (defaultMemory/defaultVcpus/defaultBootImage, then the shape last received), so a migration here does not wait for QEMU to start. */
    spareIncoming: z.boolean().default(DEFAULTS.qemu.spareIncoming),
    /** How long one QEMU step may take (a QMP connect or re-attach, a process start or exit, an incoming stream's end); default 30 s. */
    stepTimeoutMs: positiveInt.optional(),
    /** The stream relay of a migration to several destinations (README "Several destinations", qemu-fan-out.ts). */
    relay: z
      .object({
        /**
         * A destination queued past this many bytes holds the stream (default 64 MiB). At least
         * 1 MiB: one read of QEMU's stream is kept to a quarter of the bound, so a smaller bound
         * shrinks reads below the 256 KiB the relay is tuned for (BENCHMARKS.md), and a queue
         * smaller than a loopback socket's kernel buffers (MiBs) measures scheduling noise, not a
         * slow destination.
         */
        bufferBytes: z.number().int().min(1024 * 1024, "the relay's buffer bound is at least 1 MiB (1048576 bytes)").default(DEFAULTS.qemu.relay.bufferBytes),
        /** How long in all the stream may be held for destinations over their bound before one is dropped as `tooSlow` (default 3 s; 0: dropped at once). */
        stallBudgetMs: z.number().int().min(0).default(DEFAULTS.qemu.relay.stallBudgetMs),
      })
      .strict()
      .prefault({}),
  })
  .strict();

/**
 * Everything an agent can be configured with. Every field has a default that works on one
 * machine, so `{}` is a valid configuration. Unknown keys are rejected (typos must not be
 * silently ignored).
 */
export const AgentConfigSchema = z
  .object({
    name: z
      .string()
      .regex(AGENT_NAME, 'lower-case letters, digits and dashes, starting with a letter or digit, at most 63 characters')
      .default(() => defaultAgentName()),
    dataDir: z.string().min(1).default(DEFAULTS.dataDir),
    pluginsDir: z.string().min(1).default(DEFAULTS.pluginsDir),
    driver: z.enum(['sim', 'qemu']).default(DEFAULTS.driver),
    /** No plugins loaded (recovery mode). */
    safe: z.boolean().default(false),
    control: ControlSchema.prefault({}),
    logLevel: z.enum(LOG_LEVELS).default(DEFAULTS.logLevel),
    logFormat: z.enum(['auto', 'pretty', 'json']).default(DEFAULTS.logFormat),
    sensors: SensorsSchema.prefault({}),
    sim: SimSchema.prefault({}),
    qemu: QemuSchema.prefault({}),
    store: z
      .object({ synchronous: z.enum(['NORMAL', 'FULL', 'OFF']).default(DEFAULTS.store.synchronous) })
      .strict()
      .prefault({}),
    peer: z
      .object({
        /** Where this agent accepts peers (`HOST:PORT`; port 0 picks a free one). */
        listen: z.string().min(1).default(DEFAULTS.peer.listen),
        /** Other agents by name: `{ b: 'ws://127.0.0.1:7402' }`. */
        peers: z.record(z.string(), z.string()).default({}),
        /** File holding the cluster secret (at least 16 bytes); without it (and without `tls`) the peer port stays closed. */
        secretFile: z.string().min(1).optional(),
        /**
         * The newest wire protocol version this agent speaks on its links (default: the latest it
         * knows). A rolling upgrade may pin the old one until every agent runs the new build; links
         * to an older agent settle on its version by themselves.
         */
        protocol: z.number().int().min(MIN_PROTOCOL_VERSION).max(PROTOCOL_VERSION).default(PROTOCOL_VERSION),
        /**
         * Mutual TLS with a cluster CA (`embot ca init` / `embot ca issue`): PEM files. With it the
         * peer and data-path listeners are wss:// and every peer URL must be wss://; without it,
         * peer links are plain ws:// and must stay on loopback.
         */
        tls: z
          .object({
            ca: z.string({ error: 'the cluster CA certificate file (ca.crt) is required with peer.tls' }).min(1),
            cert: z.string({ error: "this agent's certificate file is required with peer.tls" }).min(1),
            key: z.string({ error: "this agent's key file is required with peer.tls" }).min(1),
          })
          .strict()
          .optional(),
      })
      .strict()
      .prefault({}),
    directory: DirectorySchema.prefault({}),
    mobility: z
      .object({
        stepTimeoutMs: positiveInt.default(DEFAULTS.mobility.stepTimeoutMs),
        vmTimeoutMs: positiveInt.default(DEFAULTS.mobility.vmTimeoutMs),
        maxDirtyRounds: z.number().int().min(0).max(100).default(DEFAULTS.mobility.maxDirtyRounds),
        /** How long events that still reach this agent for a moved VM are forwarded to its new owner. */
        forwardGraceMs: positiveInt.default(DEFAULTS.mobility.forwardGraceMs),
        /** Keep pre-dialled, authenticated idle links to each peer so a migration does not dial (core/mobility/warm-connections.ts). */
        warmConnections: z.boolean().default(DEFAULTS.mobility.warmConnections),
        /** A pre-warm's migrate command switches once this share of the selected destinations meets the exit condition (README "Several destinations"). */
        prewarmExitShare: z.number().gt(0).max(1).default(DEFAULTS.mobility.prewarmExitShare),
        /** Peers allowed to migrate VMs here; empty: every authenticated peer. */
        allowedSources: z.array(z.string()).default([]),
        trust: z
          .object({
            mode: z.enum(['signed', 'allowlist', 'any-authenticated-peer']).default('signed'),
            /** ed25519 public keys (PEM text, base64 raw key, or a file path). */
            publicKeys: z.array(z.string()).default([]),
            allowHashes: z.array(z.string()).default([]),
          })
          .strict()
          .prefault({}),
      })
      .strict()
      .prefault({}),
    dataplane: z
      .object({
        /** Stop-and-copy once the remainder is expected to take no longer than this (QEMU's default). */
        downtimeLimitMs: positiveInt.default(DEFAULTS.dataplane.downtimeLimitMs),
        maxRounds: positiveInt.default(DEFAULTS.dataplane.maxRounds),
        /** Throttle a VM's dirty rate when pre-copy rounds do not converge. */
        autoConverge: z.boolean().default(DEFAULTS.dataplane.autoConverge),
        /** Threshold time (seed 000): above it, paths are added. Per VM in `vmThresholds`, per migration with `embot migrate --threshold`. */
        thresholdMs: positiveInt.default(DEFAULTS.dataplane.thresholdMs),
        vmThresholds: z.record(z.string(), positiveInt).default({}),
        /** Second threshold: a path that takes longer than this to set up is not added. */
        addPathThresholdMs: positiveInt.default(DEFAULTS.dataplane.addPathThresholdMs),
        maxPaths: positiveInt.default(DEFAULTS.dataplane.maxPaths),
        /** Share of this host's CPU one extra path needs to reassemble pages (as a target). */
        reassemblyCpuPerPath: z.number().min(0).max(1).default(DEFAULTS.dataplane.reassemblyCpuPerPath),
        /** Bytes sent to measure an uncapped path's bandwidth. */
        probeBytes: positiveInt.default(DEFAULTS.dataplane.probeBytes),
        /** Cap of the primary path (bytes/s); absent: measured. */
        primaryCapBytesPerSec: positiveInt.optional(),
        /** Cap of the primary path to one peer (bytes/s), over `primaryCapBytesPerSec`: a slower link to that peer (e.g. one destination of several). */
        primaryCapBytesPerSecOf: z.record(z.string(), positiveInt).default({}),
        /** Extra peer listeners for data paths (`HOST:PORT`, loopback 127.0.0.x). */
        listen: z.array(z.string()).default([]),
        /** Extra paths to each peer: another local/remote address pair, optionally capped (bytes/s). */
        paths: z
          .record(
            z.string(),
            z.array(z.object({ name: z.string().min(1), url: z.string().min(1), localAddress: z.string().optional(), capBytesPerSec: positiveInt.optional() }).strict()),
          )
          .default({}),
      })
      .strict()
      .prefault({}),
    /** Per-module config overrides, merged over each module manifest's `config`. */
    modules: z.record(z.string(), z.record(z.string(), z.unknown())).default({}),
    /** A folder of base images this agent serves to its group (issue 14; README "Images and placement"). */
    imageLibrary: z.string().min(1).optional(),
    images: z
      .object({
        /** This host's images; default <dataDir>/images. */
        dir: z.string().min(1).optional(),
        blockSize: z.number().int().min(4096).max(16 * 1024 * 1024).default(65536),
        /** The group's global indexer; default: this agent (one level, a small cluster). */
        indexer: z.string().min(1).optional(),
        /** Agents the indexer takes index updates from; empty: any authenticated peer. */
        members: z.array(z.string().min(1)).default([]),
        reindexMs: z.number().int().min(0).default(30000),
        buildTimeoutMs: positiveInt.default(600000),
        /** Cost of moving one MiB between two hosts (`library`: the image library). */
        cost: z
          .object({
            racks: z.record(z.string(), z.array(z.string().min(1))).optional(),
            sameRack: z.number().min(0).optional(),
            crossRack: z.number().min(0).optional(),
            matrix: z.record(z.string(), z.record(z.string(), z.number().min(0))).optional(),
            default: z.number().min(0).optional(),
            /** Measure this agent's links (RTT by Ping, throughput from block fetches): ms per MiB over the configured costs (images/link-probe.ts). */
            measure: z
              .object({
                probeMs: positiveInt.default(10_000),
                maxAgeMs: positiveInt.default(60_000),
                assumeBytesPerSec: z.number().positive().default(100 * 1024 * 1024),
                requestBytes: positiveInt.default(4 * 1024 * 1024),
              })
              .strict()
              .optional(),
          })
          .strict()
          .default({}),
      })
      .strict()
      .prefault({}),
    /**
     * Where hosts are (issue 13 point 5, README "Where destinations are"): a tree of this agent, its
     * peers and the switches/routers between them; `migrate --to auto --count N` picks destinations
     * whose paths from here share no node.
     */
    topology: z
      .object({
        nodes: z.array(z.string().min(1)).default([]),
        links: z.array(z.tuple([z.string().min(1), z.string().min(1)])).min(1),
      })
      .strict()
      .optional(),
  })
  .strict()
  .superRefine((config, ctx) => {
    for (const issue of peerTransportIssues(config)) ctx.addIssue({ code: 'custom', path: [...issue.path], message: issue.message });
    if (config.topology) {
      try {
        buildTopology(config.topology, [config.name, ...Object.keys(config.peer.peers)]);
      } catch (e) {
        ctx.addIssue({ code: 'custom', path: ['topology'], message: e instanceof Error ? e.message : String(e) });
      }
    }
  });

export type AgentConfig = z.output<typeof AgentConfigSchema>;

/** Config as written in a file or given as flags: every field optional, nested objects partial. */
export type AgentConfigInput = DeepPartial<AgentConfig>;

type DeepPartial<T> = T extends readonly unknown[]
  ? T
  : T extends object
    ? { [K in keyof T]?: DeepPartial<T[K]> }
    : T;

export interface LoadConfigOptions {
  /** JSON (`.json`) or YAML (`.yaml`, `.yml`) file; other extensions are tried as YAML (a superset of JSON). */
  readonly file?: string;
  /** Command-line values; they win over the file and the environment. */
  readonly flags?: AgentConfigInput;
  /** Defaults to `process.env`; `EMBOT_CONTROL_TOKEN` supplies `control.token`. */
  readonly env?: NodeJS.ProcessEnv;
}

/**
 * Builds the agent's configuration from defaults, a file, the environment and flags (in
 * increasing precedence) and validates it.
 *
 * @throws ConfigError `EMBOT_ERR_CONFIG_NOT_FOUND` when `file` does not exist;
 *   `EMBOT_ERR_CONFIG_INVALID` for syntax errors and for every schema violation, listed as
 *   `path: message` lines.
 * @example
 * ```ts
 * const config = loadConfig({ file: 'embot.yaml', flags: { control: { port: 0 } } });
 * config.control.host; // '127.0.0.1'
 * ```
 */
export function loadConfig(options: LoadConfigOptions = {}): AgentConfig {
  const env = options.env ?? process.env;
  const fromFile = options.file === undefined ? {} : readConfigFile(options.file);
  const fromEnv: Record<string, unknown> = {};
  const envToken = env['EMBOT_CONTROL_TOKEN'];
  if (envToken !== undefined && envToken !== '') fromEnv['control'] = { token: envToken };
  const merged = deepMerge(deepMerge(fromFile, fromEnv), (options.flags ?? {}) as Record<string, unknown>);
  return validateConfig(merged, options.file);
}

/**
 * Validates an already-parsed config object (e.g. handed over by a test harness).
 *
 * @example
 * ```ts
 * const config = validateConfig({ name: 'a1', control: { port: 0 } });
 * ```
 */
export function validateConfig(input: unknown, source?: string): AgentConfig {
  const result = AgentConfigSchema.safeParse(input);
  if (result.success) return result.data;
  const lines = result.error.issues.map(formatIssue);
  const where = source === undefined ? 'configuration' : `configuration ${source}`;
  throw new ConfigError(ErrorCodes.CONFIG_INVALID, `invalid ${where}:\n  ${lines.join('\n  ')}`, {
    details: { issues: lines, ...(source === undefined ? {} : { file: source }) },
  });
}

function readConfigFile(file: string): Record<string, unknown> {
  const path = resolve(file);
  if (!existsSync(path)) {
    throw new ConfigError(ErrorCodes.CONFIG_NOT_FOUND, `config file ${file} not found (resolved to ${path})`, { details: { file } });
  }
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (cause) {
    throw new ConfigError(ErrorCodes.CONFIG_NOT_FOUND, `config file ${file} cannot be read: ${describeError(cause)}`, { cause, details: { file } });
  }
  let parsed: unknown;
  try {
    parsed = extname(path).toLowerCase() === '.json' ? JSON.parse(text) : parseYaml(text, { prettyErrors: true, uniqueKeys: true });
  } catch (cause) {
    throw new ConfigError(ErrorCodes.CONFIG_INVALID, `invalid configuration ${file}: syntax error: ${describeError(cause)}`, { cause, details: { file } });
  }
  // An empty YAML file parses to null: treat it as "no settings".
  if (parsed === null || parsed === undefined) return {};
  if (!isPlainObject(parsed)) {
    throw new ConfigError(ErrorCodes.CONFIG_INVALID, `invalid configuration ${file}:\n  (root): expected an object of settings, got ${describeKind(parsed)}`, {
      details: { file },
    });
  }
  return parsed;
}

function formatIssue(issue: z.core.$ZodIssue): string {
  const path = issue.path.length === 0 ? '(root)' : issue.path.map(String).join('.');
  if (issue.code === 'unrecognized_keys') {
    const known = knownKeysAt(issue.path);
    const keys = issue.keys.map((k) => JSON.stringify(k)).join(', ');
    return `${path}: unknown key${issue.keys.length > 1 ? 's' : ''} ${keys}${known.length > 0 ? ` (known keys: ${known.join(', ')})` : ''}`;
  }
  return `${path}: ${issue.message}`;
}

/** Keys the schema accepts at `path`, for "unknown key" hints. */
function knownKeysAt(path: readonly PropertyKey[]): string[] {
  let schema: z.core.$ZodType = AgentConfigSchema;
  for (const key of [...path, null]) {
    // Unwrap default/prefault/optional wrappers to reach the object.
    for (;;) {
      const def = schema._zod.def as { type: string; innerType?: z.core.$ZodType };
      if (def.innerType && ['default', 'prefault', 'optional'].includes(def.type)) schema = def.innerType;
      else break;
    }
    const def = schema._zod.def as { type: string; shape?: Record<string, z.core.$ZodType> };
    if (def.type !== 'object' || !def.shape) return [];
    if (key === null) return Object.keys(def.shape);
    const next = def.shape[String(key)];
    if (!next) return [];
    schema = next;
  }
  return [];
}

function deepMerge(base: Record<string, unknown>, over: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = { ...base };
  for (const [key, value] of Object.entries(over)) {
    if (value === undefined) continue;
    const prev = out[key];
    out[key] = isPlainObject(prev) && isPlainObject(value) ? deepMerge(prev, value) : value;
  }
  return out;
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function describeKind(v: unknown): string {
  if (Array.isArray(v)) return 'a list';
  return typeof v === 'string' ? 'a string' : typeof v;
}
