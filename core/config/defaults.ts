import { hostname } from 'node:os';

/** Defaults that work on one machine; `AgentConfigSchema` fills every missing field from here. */
export const DEFAULTS = {
  dataDir: './data',
  pluginsDir: './plugins',
  driver: 'sim',
  control: { host: '127.0.0.1', port: 7400 },
  logLevel: 'info',
  logFormat: 'auto',
  sensors: { host: { intervalMs: 1000, source: 'sim' }, vm: { intervalMs: 1000 } },
  sim: { pageSize: 4096, hostCpus: 4, hostMemory: 16 * 1024 * 1024 * 1024, defaultMemory: 64 * 1024 * 1024, defaultDirtyRate: 0, startMemory: 'zero' },
  qemu: {
    binary: 'qemu-system-x86_64',
    accel: 'auto',
    defaultMemory: 64 * 1024 * 1024,
    defaultVcpus: 1,
    spareIncoming: true,
    // The stream relay's own defaults (stream-relay.ts DEFAULT_RELAY_*; core may not import a feature, a test keeps them equal).
    relay: { bufferBytes: 64 * 1024 * 1024, stallBudgetMs: 3000 },
  },
  store: { synchronous: 'NORMAL' },
  peer: { listen: '127.0.0.1:7401' },
  mobility: { stepTimeoutMs: 10_000, vmTimeoutMs: 120_000, maxDirtyRounds: 5, forwardGraceMs: 30_000, warmConnections: true, prewarmExitShare: 1 },
  dataplane: { downtimeLimitMs: 300, maxRounds: 30, autoConverge: true, thresholdMs: 60_000, addPathThresholdMs: 500, maxPaths: 4, reassemblyCpuPerPath: 0.1, probeBytes: 8 * 1024 * 1024 },
} as const;

/** Where the CLI looks for an agent when neither `--agent` nor `EMBOT_AGENT` is given. */
export const DEFAULT_AGENT_URL = `http://${DEFAULTS.control.host}:${DEFAULTS.control.port}`;

/**
 * The host name reduced to a valid agent name (`^[a-z0-9][a-z0-9-]*`, at most 63 characters):
 * lower-cased, the domain part dropped, other characters turned into dashes. Falls back to
 * `agent` when nothing usable is left.
 *
 * @example
 * ```ts
 * defaultAgentName('Build_Box.example.org'); // 'build-box'
 * ```
 */
export function defaultAgentName(host: string = hostname()): string {
  const name = host
    .split('.')[0]!
    .toLowerCase()
    .replace(/[^a-z0-9-]+/g, '-')
    .replace(/^[^a-z0-9]+/, '')
    .slice(0, 63)
    .replace(/-+$/, '');
  return name === '' ? 'agent' : name;
}
