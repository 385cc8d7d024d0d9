import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { ConfigError, ErrorCodes } from '../../core/errors.ts';
import { loadConfig, validateConfig } from '../../core/config/config.ts';
import { defaultAgentName } from '../../core/config/defaults.ts';
import { thrown } from '../harness/expect-code.ts';

const dir = mkdtempSync(join(tmpdir(), 'embot-config-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function file(name: string, text: string): string {
  const p = join(dir, name);
  writeFileSync(p, text);
  return p;
}

describe('config defaults', () => {
  it('fills every field with a default that works on one machine', () => {
    const c = loadConfig({ env: {} });
    expect(c).toEqual({
      name: defaultAgentName(),
      dataDir: './data',
      pluginsDir: './plugins',
      driver: 'sim',
      safe: false,
      control: { host: '127.0.0.1', port: 7400 },
      logLevel: 'info',
      logFormat: 'auto',
      sensors: { host: { intervalMs: 1000, source: 'sim' }, vm: { intervalMs: 1000 } },
      sim: { pageSize: 4096, hostCpus: 4, hostMemory: 17179869184, defaultMemory: 67108864, defaultDirtyRate: 0, startMemory: 'zero' },
      qemu: { binary: 'qemu-system-x86_64', accel: 'auto', defaultMemory: 67108864, defaultVcpus: 1, spareIncoming: true, relay: { bufferBytes: 67108864, stallBudgetMs: 3000 } },
      store: { synchronous: 'NORMAL' },
      directory: { kind: 'static', endpoints: ['http://127.0.0.1:2379'], prefix: '/embot', ttlSeconds: 10 },
      peer: { listen: '127.0.0.1:7401', peers: {}, protocol: 4 },
      mobility: {
        stepTimeoutMs: 10000,
        vmTimeoutMs: 120000,
        maxDirtyRounds: 5,
        forwardGraceMs: 30000,
        warmConnections: true,
        prewarmExitShare: 1,
        allowedSources: [],
        trust: { mode: 'signed', publicKeys: [], allowHashes: [] },
      },
      dataplane: {
        downtimeLimitMs: 300,
        maxRounds: 30,
        autoConverge: true,
        thresholdMs: 60000,
        vmThresholds: {},
        addPathThresholdMs: 500,
        maxPaths: 4,
        reassemblyCpuPerPath: 0.1,
        probeBytes: 8388608,
        primaryCapBytesPerSecOf: {},
        listen: [],
        paths: {},
      },
      modules: {},
      images: { blockSize: 65536, members: [], reindexMs: 30000, buildTimeoutMs: 600000, cost: {} },
    });
    expect(c.name).toMatch(/^[a-z0-9][a-z0-9-]*$/);
  });

  it('derives a valid agent name from any host name', () => {
    expect(defaultAgentName('Build_Box.example.org')).toBe('build-box');
    expect(defaultAgentName('--weird--')).toBe('weird');
    expect(defaultAgentName('___')).toBe('agent');
    expect(defaultAgentName('')).toBe('agent');
    expect(defaultAgentName('x'.repeat(100))).toHaveLength(63);
  });
});

describe('config files and flags', () => {
  it('reads YAML, keeps defaults for what it leaves out', () => {
    const c = loadConfig({
      env: {},
      file: file('a.yaml', 'name: host-a\ncontrol:\n  port: 7401\nsim:\n  hostCpus: 8\nmodules:\n  vm-watchdog:\n    maxCrashes: 5\n'),
    });
    expect(c.name).toBe('host-a');
    expect(c.control).toEqual({ host: '127.0.0.1', port: 7401 });
    expect(c.sim.hostCpus).toBe(8);
    expect(c.sim.pageSize).toBe(4096);
    expect(c.modules).toEqual({ 'vm-watchdog': { maxCrashes: 5 } });
  });

  it('reads JSON by extension and treats an empty YAML file as no settings', () => {
    expect(loadConfig({ env: {}, file: file('b.json', '{"safe": true, "store": {"synchronous": "FULL"}}') })).toMatchObject({
      safe: true,
      store: { synchronous: 'FULL' },
    });
    expect(loadConfig({ env: {}, file: file('empty.yml', '') }).dataDir).toBe('./data');
  });

  it('flags override the file, the environment supplies the token, flags beat the environment', () => {
    const f = file('c.yaml', 'name: from-file\ndataDir: /var/embot\ncontrol:\n  host: 127.0.0.2\n  port: 7000\n');
    const c = loadConfig({ env: { EMBOT_CONTROL_TOKEN: 'env-token-123' }, file: f, flags: { name: 'from-flag', control: { port: 0 } } });
    expect(c.name).toBe('from-flag');
    expect(c.dataDir).toBe('/var/embot');
    expect(c.control).toEqual({ host: '127.0.0.2', port: 0, token: 'env-token-123' });
    const d = loadConfig({ env: { EMBOT_CONTROL_TOKEN: 'env-token-123' }, flags: { control: { token: 'flag-token-456' } } });
    expect(d.control.token).toBe('flag-token-456');
  });
});

describe('config errors', () => {
  it('a missing file is CONFIG_NOT_FOUND naming the file', () => {
    const e = thrown(() => loadConfig({ env: {}, file: join(dir, 'nope.yaml') }), ConfigError);
    expect(e.code).toBe(ErrorCodes.CONFIG_NOT_FOUND);
    expect(e.message).toContain('nope.yaml');
  });

  it('bad YAML and bad JSON syntax are CONFIG_INVALID with the parser position', () => {
    const y = thrown(() => loadConfig({ env: {}, file: file('bad.yaml', 'name: a\n  control: [\n') }), ConfigError);
    expect(y.code).toBe(ErrorCodes.CONFIG_INVALID);
    expect(y.message).toMatch(/bad\.yaml: syntax error: .*line/s);
    const j = thrown(() => loadConfig({ env: {}, file: file('bad.json', '{"name": "a",}') }), ConfigError);
    expect(j.code).toBe(ErrorCodes.CONFIG_INVALID);
    expect(j.message).toContain('bad.json: syntax error');
    const dup = thrown(() => loadConfig({ env: {}, file: file('dup.yaml', 'name: a\nname: b\n') }), ConfigError);
    expect(dup.code).toBe(ErrorCodes.CONFIG_INVALID);
  });

  it('a file that is not a mapping is CONFIG_INVALID', () => {
    const e = thrown(() => loadConfig({ env: {}, file: file('list.yaml', '- a\n- b\n') }), ConfigError);
    expect(e.code).toBe(ErrorCodes.CONFIG_INVALID);
    expect(e.message).toContain('expected an object of settings, got a list');
  });

  it('unknown keys are rejected at any depth, with the known keys as a hint', () => {
    const e = thrown(() => loadConfig({ env: {}, file: file('typo.yaml', 'dataDirr: x\ncontrol:\n  prot: 1\n') }), ConfigError);
    expect(e.code).toBe(ErrorCodes.CONFIG_INVALID);
    expect(e.message).toContain('(root): unknown key "dataDirr" (known keys: name, dataDir,');
    expect(e.message).toContain('control: unknown key "prot" (known keys: host, port, token)');
  });

  it('lists every wrong type as path: message', () => {
    const e = thrown(() =>
      validateConfig({ name: 'Bad Name', control: { port: 70000 }, driver: 'xen', sensors: { host: { intervalMs: -5 } }, safe: 'yes', logLevel: 'loud' }), ConfigError,
    );
    expect(e.code).toBe(ErrorCodes.CONFIG_INVALID);
    const issues = e.details!['issues'] as string[];
    expect(issues.map((i) => i.split(':')[0]).sort()).toEqual(['control.port', 'driver', 'logLevel', 'name', 'safe', 'sensors.host.intervalMs']);
    expect(e.message).toContain('name: lower-case letters, digits and dashes');
    expect(e.message).toMatch(/driver: .*"sim".*"qemu"/);
  });

  it('takes driver: qemu with a qemu: section, and refuses bad qemu settings by path', () => {
    const c = validateConfig({ driver: 'qemu', qemu: { binary: '/opt/qemu/bin/qemu-system-x86_64', stateDir: '/var/lib/embot/qemu', accel: 'tcg', defaultMemory: 128 * 2 ** 20, defaultVcpus: 2, spareIncoming: false, stepTimeoutMs: 5000 } });
    expect(c.driver).toBe('qemu');
    expect(c.qemu).toEqual({
      binary: '/opt/qemu/bin/qemu-system-x86_64',
      stateDir: '/var/lib/embot/qemu',
      accel: 'tcg',
      defaultMemory: 128 * 2 ** 20,
      defaultVcpus: 2,
      spareIncoming: false,
      stepTimeoutMs: 5000,
      relay: { bufferBytes: 64 * 2 ** 20, stallBudgetMs: 3000 },
    });
    const e = thrown(() => validateConfig({ driver: 'qemu', qemu: { accel: 'hvf', defaultVcpus: 0, bootImage: 'x', spareIncoming: 'yes', stepTimeoutMs: -1 } }), ConfigError);
    expect(e.code).toBe(ErrorCodes.CONFIG_INVALID);
    const issues = (e.details!['issues'] as string[]).map((i) => i.split(':')[0]).sort();
    expect(issues).toEqual(['qemu', 'qemu.accel', 'qemu.defaultVcpus', 'qemu.spareIncoming', 'qemu.stepTimeoutMs']);
  });

  it('takes qemu.relay (the several-destinations relay: bound from 1 MiB, stall budget from 0 ms), a partial one keeping the other default, and refuses bad values by path', () => {
    expect(validateConfig({ qemu: { relay: { bufferBytes: 2 ** 20, stallBudgetMs: 0 } } }).qemu.relay).toEqual({ bufferBytes: 2 ** 20, stallBudgetMs: 0 });
    expect(validateConfig({ qemu: { relay: { bufferBytes: 256 * 2 ** 20, stallBudgetMs: 10_000 } } }).qemu.relay).toEqual({ bufferBytes: 256 * 2 ** 20, stallBudgetMs: 10_000 });
    expect(validateConfig({ qemu: { relay: { stallBudgetMs: 500 } } }).qemu.relay).toEqual({ bufferBytes: 64 * 2 ** 20, stallBudgetMs: 500 });
    expect(validateConfig({ qemu: { relay: { bufferBytes: 8 * 2 ** 20 } } }).qemu.relay).toEqual({ bufferBytes: 8 * 2 ** 20, stallBudgetMs: 3000 });
    expect(validateConfig({ qemu: { relay: {} } }).qemu.relay).toEqual({ bufferBytes: 64 * 2 ** 20, stallBudgetMs: 3000 });
    const refused = (relay: unknown): string[] => {
      const e = thrown(() => validateConfig({ qemu: { relay } }), ConfigError);
      expect(e.code).toBe(ErrorCodes.CONFIG_INVALID);
      return e.details!['issues'] as string[];
    };
    for (const bad of [-1, 0, 2 ** 20 - 1, 2 ** 20 + 0.5, '64M', null]) {
      expect(refused({ bufferBytes: bad }).map((i) => i.split(':')[0]), String(bad)).toEqual(['qemu.relay.bufferBytes']);
    }
    expect(refused({ bufferBytes: 2 ** 20 - 1 })[0]).toBe("qemu.relay.bufferBytes: the relay's buffer bound is at least 1 MiB (1048576 bytes)");
    for (const bad of [-1, 0.5, '3000', true, Number.POSITIVE_INFINITY]) {
      expect(refused({ stallBudgetMs: bad }).map((i) => i.split(':')[0]), String(bad)).toEqual(['qemu.relay.stallBudgetMs']);
    }
    expect(refused({ bufferBytes: 2 ** 20, stallBudgetMs: 0, bufferLimitBytes: 2 ** 20 })).toEqual(['qemu.relay: unknown key "bufferLimitBytes" (known keys: bufferBytes, stallBudgetMs)']);
    expect(refused(65536).map((i) => i.split(':')[0])).toEqual(['qemu.relay']);
    // The driver's option name written under qemu: is refused as well, the hint pointing at relay.
    const e = thrown(() => validateConfig({ qemu: { relayBufferBytes: 2 ** 20 } }), ConfigError);
    expect(e.message).toMatch(/qemu: unknown key "relayBufferBytes" \(known keys: .*relay\)/);
  });

  it('takes an etcd fleet directory and refuses bad directory values by path', () => {
    expect(validateConfig({ directory: { kind: 'etcd', endpoints: ['http://127.0.0.1:2379', 'https://etcd.example:2379'], prefix: '/fleet/a', ttlSeconds: 2 } }).directory).toEqual({
      kind: 'etcd',
      endpoints: ['http://127.0.0.1:2379', 'https://etcd.example:2379'],
      prefix: '/fleet/a',
      ttlSeconds: 2,
    });
    const e = thrown(() => validateConfig({ directory: { kind: 'consul', endpoints: ['127.0.0.1:2379'], prefix: 'embot/', ttlSeconds: 0, extra: 1 } }), ConfigError);
    expect(e.code).toBe(ErrorCodes.CONFIG_INVALID);
    expect((e.details!['issues'] as string[]).map((i) => i.split(':')[0]).sort()).toEqual(['directory', 'directory.endpoints.0', 'directory.kind', 'directory.prefix', 'directory.ttlSeconds']);
    for (const bad of [[], ['ftp://127.0.0.1:2379'], ['http://127.0.0.1:2379/v3/kv'], 'http://127.0.0.1:2379']) {
      const err = thrown(() => validateConfig({ directory: { endpoints: bad } }), ConfigError);
      expect((err.details!['issues'] as string[])[0], JSON.stringify(bad)).toMatch(/^directory\.endpoints/);
    }
    for (const bad of ['/', '/embot/', '/a//b', '/a b', 7]) {
      const err = thrown(() => validateConfig({ directory: { prefix: bad } }), ConfigError);
      expect((err.details!['issues'] as string[]).map((i) => i.split(':')[0]), String(bad)).toEqual(['directory.prefix']);
    }
  });

  it("takes sim.startMemory 'random' and refuses another value by path", () => {
    expect(validateConfig({ sim: { startMemory: 'random' } }).sim.startMemory).toBe('random');
    const e = thrown(() => validateConfig({ sim: { startMemory: 'full' } }), ConfigError);
    expect(e.code).toBe(ErrorCodes.CONFIG_INVALID);
    expect((e.details!['issues'] as string[]).map((i) => i.split(':')[0])).toEqual(['sim.startMemory']);
  });

  it('takes peer.protocol 1, 2 or 3 (a rolling upgrade pinning an old wire protocol) and refuses versions it does not speak by path', () => {
    for (const v of [1, 2, 3]) expect(validateConfig({ peer: { protocol: v } }).peer.protocol).toBe(v);
    for (const bad of [0, 5, 1.5, '2']) {
      const e = thrown(() => validateConfig({ peer: { protocol: bad } }), ConfigError);
      expect((e.details!['issues'] as string[]).map((i) => i.split(':')[0]), String(bad)).toEqual(['peer.protocol']);
    }
  });

  it('bad flags are rejected like bad file values', () => {
    const e = thrown(() => loadConfig({ env: {}, flags: { control: { port: -1 } } }), ConfigError);
    expect(e.code).toBe(ErrorCodes.CONFIG_INVALID);
    expect(e.message).toContain('control.port:');
    const t = thrown(() => loadConfig({ env: { EMBOT_CONTROL_TOKEN: 'short' } }), ConfigError);
    expect(t.message).toContain('control.token: a control token must be at least 8 characters');
  });
});

describe('the README', () => {
  it('shows a configuration example the agent accepts, with the values it says', () => {
    const readme = readFileSync(fileURLToPath(new URL('../../README.md', import.meta.url)), 'utf8');
    const section = readme.slice(readme.indexOf('## Configuration'));
    const start = section.indexOf('```yaml\n') + '```yaml\n'.length;
    const yaml = section.slice(start, section.indexOf('```', start));
    const dir = mkdtempSync(join(tmpdir(), 'embot-readme-config-'));
    try {
      const file = join(dir, 'embot.yaml');
      writeFileSync(file, yaml);
      const config = loadConfig({ file, env: {} });
      expect(config.name).toBe('a');
      expect(config.control).toMatchObject({ host: '127.0.0.1', port: 7400 });
      expect(config.dataplane).toMatchObject({ downtimeLimitMs: 300, maxPaths: 4, probeBytes: 8 * 1024 * 1024 });
      expect(config.modules['host-load']).toEqual({ threshold: 0.8, durationMs: 10000 });
      expect(config.qemu.relay).toEqual({ bufferBytes: 64 * 1024 * 1024, stallBudgetMs: 3000 });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
