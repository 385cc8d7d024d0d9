import { cpSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { startAgent, type RunningAgent } from '../../core/agent.ts';
import { loadConfig } from '../../core/config/config.ts';
import { createLogger } from '../../core/logger.ts';
import { createDashboard } from '../../core/control/dashboard-routes.ts';
import { startControlServer } from '../../core/control/server.ts';
import type { LiveMessage } from '../../core/control/dashboard-api.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { FIXTURE_PLUGINS } from '../harness/agent-process.ts';

const TOKEN = 'live-channel-token-0123456789';
const cleanups = cleanupsAfterEach();

async function agentWithToken(): Promise<RunningAgent> {
  const root = mkdtempSync(join(tmpdir(), 'embot-dashboard-'));
  cleanups.push(() => rmSync(root, { recursive: true, force: true }));
  cpSync(join(FIXTURE_PLUGINS, 'counter'), join(root, 'plugins', 'counter'), { recursive: true });
  const flags = {
    name: 'a',
    dataDir: join(root, 'data'),
    pluginsDir: join(root, 'plugins'),
    control: { port: 0, token: TOKEN },
    sensors: { host: { intervalMs: 600_000 }, vm: { intervalMs: 600_000 } },
    modules: { counter: { delayMs: 3_600_000 } },
  };
  const agent = await startAgent(loadConfig({ env: {}, flags }), createLogger({ level: 'error', name: 'a' }));
  cleanups.push(() => agent.stop());
  return agent;
}

/** Reads a server-sent event stream message by message (a real HTTP stream, as a browser gets it). */
function liveStream(url: string, headers: Record<string, string>): { next(kind: LiveMessage['kind'], timeoutMs?: number): Promise<LiveMessage>; close(): void } {
  const abort = new AbortController();
  const queue: LiveMessage[] = [];
  let wake: (() => void) | undefined;
  const reading = fetch(url, { headers, signal: abort.signal }).then(async (res) => {
    if (res.status !== 200) throw new Error(`live channel answered ${res.status}`);
    const decoder = new TextDecoder();
    let buf = '';
    for await (const chunk of res.body!) {
      buf += decoder.decode(chunk as Uint8Array, { stream: true });
      let end: number;
      while ((end = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, end);
        buf = buf.slice(end + 2);
        const data = block.split('\n').find((l) => l.startsWith('data: '));
        if (data) {
          queue.push(JSON.parse(data.slice(6)) as LiveMessage);
          wake?.();
        }
      }
    }
  });
  reading.catch(() => {});
  return {
    async next(kind, timeoutMs = 10_000) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const i = queue.findIndex((m) => m.kind === kind);
        if (i >= 0) return queue.splice(0, i + 1).at(-1)!;
        if (Date.now() > deadline) throw new Error(`no ${kind} message within ${timeoutMs} ms`);
        await new Promise<void>((r) => {
          wake = r;
          setTimeout(r, 100);
        });
      }
    },
    close: () => abort.abort(),
  };
}

describe('dashboard routes and live channel (in-process agent, token configured)', () => {
  it('pushes a snapshot, then the processed events and the policy state they changed', async () => {
    const agent = await agentWithToken();
    const auth = { Authorization: `Bearer ${TOKEN}` };
    await fetch(`${agent.controlUrl}/v1/vms`, { method: 'POST', headers: { ...auth, 'Content-Type': 'application/json' }, body: JSON.stringify({ name: 'web-1' }) });
    const live = liveStream(`${agent.controlUrl}/ui/live`, auth);
    cleanups.push(() => live.close());
    const first = await live.next('snapshot');
    if (first.kind !== 'snapshot') throw new Error('unreachable');
    expect(first.snapshot.cluster.self.name).toBe('a');
    expect(first.snapshot.vms.map((v) => v.name)).toEqual(['web-1']);
    // The chart comes from the machine definition: both states, the initial one named.
    const chart = first.snapshot.charts['counter']?.['count'];
    expect(chart?.root.initial).toBe('counting');
    expect(chart?.root.children.map((c) => c.key).sort()).toEqual(['armed', 'counting']);

    await agent.control.emitEvent({ elementId: 'vm:web-1', type: 'ARM', payload: { from: 'test' } });
    const events = await live.next('events');
    if (events.kind !== 'events') throw new Error('unreachable');
    expect(events.events.map((e) => e.type)).toContain('ARM');
    const embots = await live.next('embots');
    if (embots.kind !== 'embots') throw new Error('unreachable');
    expect(embots.embots.find((e) => e.module === 'counter')?.policies[0]?.state).toBe('armed');
  });

  it('takes the cookie the page got for the API and the live channel; a wrong one is refused', async () => {
    const agent = await agentWithToken();
    const ok = await fetch(`${agent.controlUrl}/v1/status`, { headers: { Cookie: `embot_token=${TOKEN}` } });
    expect(ok.status).toBe(200);
    for (const path of ['/v1/status', '/ui/live', '/ui/', '/ui/api/snapshot']) {
      const res = await fetch(`${agent.controlUrl}${path}`, { headers: { Cookie: 'embot_token=not-the-token-at-all' }, redirect: 'manual' });
      expect(res.status, path).toBe(401);
    }
    // ?token= is taken on the page only, never on the API or the live channel (it would end up in logs and history).
    for (const path of ['/v1/status', '/ui/live', '/ui/api/snapshot']) {
      const res = await fetch(`${agent.controlUrl}${path}?token=${TOKEN}`, { redirect: 'manual' });
      expect(res.status, path).toBe(401);
    }
  });

  it('bad requests get coded errors and the agent keeps serving', async () => {
    const agent = await agentWithToken();
    const auth = { Authorization: `Bearer ${TOKEN}` };
    const cases: readonly { path: string; init?: RequestInit; status: number; code: string }[] = [
      { path: '/ui/assets/..%2f..%2f..%2fpackage.json', status: 404, code: 'EMBOT_ERR_CONTROL_NOT_FOUND' },
      { path: '/ui/assets/%2e%2e/%2e%2e/package.json', status: 404, code: 'EMBOT_ERR_CONTROL_NOT_FOUND' },
      { path: '/ui/assets/a%00.js', status: 404, code: 'EMBOT_ERR_CONTROL_NOT_FOUND' },
      { path: '/ui/assets/%E0%A4%A', status: 400, code: 'EMBOT_ERR_CONTROL_BAD_REQUEST' },
      { path: '/ui/nope', status: 404, code: 'EMBOT_ERR_CONTROL_NOT_FOUND' },
      { path: '/ui/', init: { method: 'POST' }, status: 405, code: 'EMBOT_ERR_CONTROL_BAD_REQUEST' },
      { path: '/ui/api/targets', status: 400, code: 'EMBOT_ERR_CONTROL_BAD_REQUEST' },
      { path: `/ui/api/targets?vm=${'x'.repeat(200)}`, status: 400, code: 'EMBOT_ERR_CONTROL_BAD_REQUEST' },
      { path: '/ui/api/migrations/m-1/cancel', init: { method: 'POST', body: '{}' }, status: 400, code: 'EMBOT_ERR_CONTROL_BAD_REQUEST' },
      { path: '/ui/api/migrations/m-none/cancel', init: { method: 'POST', body: '{}', headers: { 'Content-Type': 'application/json' } }, status: 404, code: 'EMBOT_ERR_CONTROL_NOT_FOUND' },
      { path: '/ui/api/migrations/%E0%A4%A/cancel', init: { method: 'POST', body: '{}', headers: { 'Content-Type': 'application/json' } }, status: 400, code: 'EMBOT_ERR_CONTROL_BAD_REQUEST' },
      { path: '/ui/live', init: { method: 'POST' }, status: 405, code: 'EMBOT_ERR_CONTROL_BAD_REQUEST' },
    ];
    for (const c of cases) {
      const res = await fetch(`${agent.controlUrl}${c.path}`, { ...c.init, headers: { ...auth, ...(c.init?.headers as Record<string, string> | undefined) } });
      expect(res.status, c.path).toBe(c.status);
      expect(((await res.json()) as { error: { code: string } }).error.code, c.path).toBe(c.code);
    }
    expect((await fetch(`${agent.controlUrl}/v1/status`, { headers: auth })).status).toBe(200);
  });

  it('without a bundle the page answers EMBOT_ERR_DASHBOARD_NOT_BUILT (503) and the API still works', async () => {
    const agent = await agentWithToken();
    const empty = mkdtempSync(join(tmpdir(), 'embot-no-bundle-'));
    cleanups.push(() => rmSync(empty, { recursive: true, force: true }));
    const dashboard = createDashboard({
      host: { control: agent.control, policyCharts: () => ({}), peers: () => [], hostLoad: async () => 0, cancelMigration: () => false },
      distDir: empty,
      logger: createLogger({ level: 'silent' }),
    });
    const server = await startControlServer({ host: '127.0.0.1', port: 0, control: agent.control, dashboard, logger: createLogger({ level: 'silent' }) });
    cleanups.push(() => server.close());
    cleanups.push(() => dashboard.close());
    const res = await fetch(`${server.url}/ui/`);
    expect(res.status).toBe(503);
    const body = (await res.json()) as { error: { code: string; message: string } };
    expect(body.error.code).toBe('EMBOT_ERR_DASHBOARD_NOT_BUILT');
    expect(body.error.message).toContain('npm run build:ui');
    expect((await fetch(`${server.url}/v1/status`)).status).toBe(200);
  });
});
