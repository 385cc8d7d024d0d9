/**
 * The fleet directory at the CLI: `--etcd` refused when bad (before anything starts), and
 * `embot peers` / `embot status` on a real in-process agent with the static directory. The etcd
 * side with real agents is in test/integration/etcd-directory.integration.test.ts.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { startAgent } from '../../core/agent.ts';
import { loadConfig } from '../../core/config/config.ts';
import { createLogger } from '../../core/logger.ts';
import { renderPeers } from '../../core/cli/info-commands.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { cliHere } from '../harness/cli-in-process.ts';

const cleanups = cleanupsAfterEach();

function tempDir(): string {
  const root = mkdtempSync(join(tmpdir(), 'embot-directory-cli-'));
  cleanups.push(() => rmSync(root, { recursive: true, force: true }));
  return root;
}

describe('--etcd and embot peers', () => {
  it.each([
    [[','], /--etcd <urls>.*is invalid.*at least one etcd client URL/s],
    [['ftp://127.0.0.1:2379'], /directory\.endpoints\.0: an etcd client URL is http:\/\/HOST:PORT/],
    [['http://127.0.0.1:2379,127.0.0.1:2380'], /directory\.endpoints\.1/],
  ])('bad input: agent --etcd %j is a usage error (exit 2) naming the problem; no agent starts', async (args, message) => {
    const root = tempDir();
    const r = await cliHere(['agent', '--data', join(root, 'data'), '--control', '127.0.0.1:0', '--etcd', ...args]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(message);
  });

  it('--etcd shows in agent --help', async () => {
    const r = await cliHere(['agent', '--help']);
    expect(r.stdout).toMatch(/--etcd <urls>\s+find peers in etcd too/);
  });

  it('embot peers and embot status on an agent with static peers: kind static, each peer from config', async () => {
    const root = tempDir();
    const flags = { name: 'a', dataDir: join(root, 'data'), pluginsDir: join(root, 'plugins'), logLevel: 'error' as const, control: { port: 0 }, peer: { peers: { b: 'ws://127.0.0.1:7402', c: 'ws://127.0.0.1:7403' } }, sensors: { host: { intervalMs: 600_000 }, vm: { intervalMs: 600_000 } } };
    const agent = await startAgent(loadConfig({ env: {}, flags }), createLogger({ level: 'error', name: 'a' }));
    cleanups.push(() => agent.stop());
    const json = await cliHere(['peers', '--json', '--agent', agent.controlUrl]);
    expect(json.code, json.stderr).toBe(0);
    expect(JSON.parse(json.stdout)).toEqual({
      kind: 'static',
      state: 'static',
      peers: [
        { name: 'b', url: 'ws://127.0.0.1:7402/', source: 'config' },
        { name: 'c', url: 'ws://127.0.0.1:7403/', source: 'config' },
      ],
    });
    const table = await cliHere(['peers', '--agent', agent.controlUrl]);
    expect(table.stdout).toMatch(/^directory: static \(config\)\nNAME\s+URL\s+SOURCE\nb\s+ws:\/\/127\.0\.0\.1:7402\/\s+config\nc\s+ws:\/\/127\.0\.0\.1:7403\/\s+config\n$/);
    const status = await cliHere(['status', '--agent', agent.controlUrl]);
    expect(status.stdout).toMatch(/directory:\s+static \(config\), 2 peer\(s\)\n/);
  });

  it('renders an etcd directory that is down with its coded error, and no peers with a hint', () => {
    const down = renderPeers({ kind: 'etcd', state: 'unavailable', peers: [], lastError: { code: 'EMBOT_ERR_DIRECTORY_UNAVAILABLE', message: 'etcd http://127.0.0.1:2379 unreachable' } });
    expect(down).toBe('directory: etcd, unavailable — etcd http://127.0.0.1:2379 unreachable [EMBOT_ERR_DIRECTORY_UNAVAILABLE]\nno peers (--peers, or --etcd to find them in etcd)\n');
  });
});
