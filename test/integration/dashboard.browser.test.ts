import { existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { chromium, type Browser, type Page } from 'playwright-core';
import { Cluster } from '../harness/cluster.ts';
import { REPO, runCli, waitFor } from '../harness/agent-process.ts';
import { ControlClient } from '../../core/control/client.ts';
import { HOSTILE } from '../fixtures/plugins/hostile/index.ts';

/**
 * The dashboard in a real browser (Debian's chromium, driven by playwright-core) against two real
 * agents on loopback with a control token. Screenshots of every view land in ARTIFACTS
 * (git-ignored) for a person to look at.
 */
const CHROMIUM = '/usr/bin/chromium';
const ARTIFACTS = join(REPO, 'test', 'artifacts', 'dashboard');
const TOKEN = 'dashboard-test-token-0123456789';
const missing = !existsSync(CHROMIUM);
/** The little of the page's globals a predicate run in the page uses (this file is compiled without the DOM library). */
interface PageGlobals {
  readonly document: { querySelector(selector: string): { getAttribute(name: string): string | null } | null };
}
if (missing && process.env['CI']) throw new Error(`${CHROMIUM} is missing: .ci/run installs Debian's chromium for the dashboard tests`);

describe.skipIf(missing)('dashboard in Chromium, three agents, token configured', () => {
  let cluster: Cluster;
  let browser: Browser;
  let page: Page;
  let a: ControlClient;
  let b: ControlClient;
  let c: ControlClient;
  let urlA = '';

  beforeAll(async () => {
    mkdirSync(ARTIFACTS, { recursive: true });
    cluster = await Cluster.start(['a', 'b', 'c'], {
      plugins: [
        { from: 'fixture', name: 'counter' },
        { from: 'fixture', name: 'throwing' },
        { from: 'fixture', name: 'hostile' },
        { from: 'fixture', name: 'syntax-error' },
      ],
      env: () => ({ EMBOT_CONTROL_TOKEN: TOKEN }),
      config: (name) => ({
        // Slow enough (16 MiB/s for 64 MiB) that the running migration is on screen for seconds.
        // c copies in one stop-and-copy round (no pre-copy): its migrations hold the card in
        // `stop-and-copy` for seconds, as QEMU's final pass does.
        dataplane: { primaryCapBytesPerSec: 16 * 1024 * 1024, ...(name === 'c' ? { maxRounds: 1 } : {}) },
        mobility: { stepTimeoutMs: 5000, vmTimeoutMs: 60_000, forwardGraceMs: 5000, trust: { mode: 'any-authenticated-peer' } },
        // The counter stays `armed` until the test is over.
        modules: { counter: { delayMs: 3_600_000 } },
      }),
    });
    urlA = cluster.agent('a').url;
    a = new ControlClient(urlA, TOKEN);
    b = new ControlClient(cluster.agent('b').url, TOKEN);
    c = new ControlClient(cluster.agent('c').url, TOKEN);
    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox'] });
    page = await (await browser.newContext({ viewport: { width: 1360, height: 900 } })).newPage();
  }, 60_000);

  afterAll(async () => {
    await browser?.close().catch(() => {});
    await cluster?.stop();
  });

  const shot = (name: string): Promise<Buffer> => page.screenshot({ path: join(ARTIFACTS, `${name}.png`), fullPage: true });
  const view = async (name: string): Promise<void> => {
    await page.click(`nav a[data-nav="${name}"]`);
    await page.waitForSelector(`body[data-view="${name}"]`);
  };

  it('refuses the page, its API and its live channel without the token', async () => {
    for (const path of ['/ui/', '/ui/live', '/ui/api/snapshot', '/v1/status', '/ui/?token=wrong-token-123456']) {
      const res = await fetch(`${urlA}${path}`, { redirect: 'manual' });
      expect(res.status, path).toBe(401);
      expect(((await res.json()) as { error: { code: string } }).error.code, path).toBe('EMBOT_ERR_CONTROL_UNAUTHORIZED');
    }
    // A browser without the cookie sees the refusal, not the page.
    const res = await page.goto(`${urlA}/ui/`);
    expect(res?.status()).toBe(401);
    expect(await page.locator('#app').count()).toBe(0);
  });

  it('takes ?token= once, answers with an HttpOnly cookie and a URL without the token', async () => {
    const res = await fetch(`${urlA}/ui/?token=${TOKEN}`, { redirect: 'manual' });
    expect(res.status).toBe(303);
    expect(res.headers.get('location')).toBe('/ui/');
    expect(res.headers.get('set-cookie')).toMatch(/^embot_token=.+; HttpOnly; SameSite=Strict; Path=\//);

    await page.goto(`${urlA}/ui/?token=${TOKEN}`);
    expect(page.url()).toBe(`${urlA}/ui/`);
    await page.waitForSelector('[data-testid=connection] .badge.ok');
    // Script on the page cannot read the token.
    // (Page code as strings: this file is compiled without the DOM library.)
    expect(await page.evaluate('document.cookie')).toBe('');
  });

  it('cluster view: every agent with its health and load, the peer reachable', async () => {
    await view('cluster');
    await page.waitForSelector('[data-testid=agents] [data-agent="a"]');
    // The peer's own health and load (its PeerStatusReply over the peer link) arrive with a peer check.
    await page.waitForSelector('[data-testid=agents] [data-agent="b"] progress.meter', { timeout: 45_000 });
    expect(await page.locator('[data-agent="a"] h3').textContent()).toBe('a');
    const peerBadges = await page.locator('[data-agent="b"] .badge').allTextContents();
    expect(peerBadges).toContain('reachable');
    expect(peerBadges.some((t) => t === 'healthy' || t === 'degraded')).toBe(true);
    expect(peerBadges).not.toContain('unreachable');
    const peerText = (await page.locator('[data-agent="b"]').textContent()) ?? '';
    expect(peerText).toMatch(/load\s*\d+ %/);
    expect(peerText).toContain('uptime');
    expect(peerText).toContain('embots');
    expect(await page.locator('[data-agent="a"]').textContent()).toContain('load');
    // Its peers come from its config here (the fleet directory on etcd: etcd-directory tests); the directory says so.
    expect(peerBadges).toContain('configured');
    expect((await page.locator('[data-agent="a"] [data-testid=directory]').textContent())?.replace(/\s+/g, ' ')).toBe('static static');
    await shot('cluster');
  }, 90_000);

  it("host view: a policy's statechart from its definition, the active state following an emitted event", async () => {
    await a.createVm({ name: 'web-1', memory: 64 * 1024 * 1024, dirtyRate: 1024 * 1024 });
    await a.vmAction('web-1', 'start');
    await a.createVm({ name: 'web-2' });
    await view('host');
    const counting = '[data-vm="web-1"] [data-policy="count"] g.state.active[data-state="counting"]';
    await page.waitForSelector(counting);
    // Both states of the machine are drawn, not just the active one.
    expect(await page.locator('[data-vm="web-1"] [data-policy="count"] g.state[data-state="armed"]').count()).toBe(1);

    const emitted = await runCli(['events', 'emit', '--element', 'vm:web-1', '--type', 'ARM', '--agent', urlA, '--token', TOKEN]);
    expect(emitted.code, emitted.stderr).toBe(0);
    // Pushed, not polled: the page did not reload and shows the new state.
    await page.waitForSelector('[data-vm="web-1"] [data-policy="count"] g.state.active[data-state="armed"]');
    expect(await page.locator(counting).count()).toBe(0);
    expect(await page.locator('[data-vm="web-1"] [data-policy="count"] .state-value').textContent()).toBe('armed');
    await shot('host');
  });

  it('a quarantined plugin shows its error; markup in plugin errors and event payloads shows as text', async () => {
    await a.emitEvent({ elementId: 'vm:web-2', type: 'BOOM' });
    await a.emitEvent({ elementId: 'vm:web-2', type: 'NOTE', payload: { note: HOSTILE } });
    await view('plugins');
    const thrower = page.locator('[data-plugin="throwing"] [data-testid=embot-error]');
    await thrower.first().waitFor();
    expect(await thrower.first().textContent()).toContain('boom from plugin');
    const hostile = page.locator('[data-plugin="hostile"] [data-testid=embot-error]');
    await hostile.first().waitFor();
    expect(await hostile.first().textContent()).toContain(HOSTILE);
    // A module that does not even load shows its load error.
    expect(await page.locator('[data-plugin="syntax-error"] [data-testid=plugin-error]').textContent()).toMatch(/cannot compile .*syntax-error\/index\.js.*Unexpected/);
    await shot('plugins');

    await view('events');
    await page.fill('[data-testid=filter-type]', 'NOTE');
    const row = page.locator('[data-testid=events] tbody tr');
    await row.first().waitFor();
    expect(await row.count()).toBe(1);
    expect(await row.first().textContent()).toContain(HOSTILE.replaceAll('"', '\\"'));
    await page.fill('[data-testid=filter-type]', '');
    await shot('events');

    // Had any of it been parsed as HTML, the image would exist and its onerror would have run.
    expect(await page.locator('img').count()).toBe(0);
    expect(await page.locator('#app script').count()).toBe(0);
    expect(await page.evaluate('window.__xss')).toBeUndefined();
  });

  it('a VM name with markup never reaches the page: the driver refuses it', async () => {
    const res = await fetch(`${urlA}/v1/vms`, { method: 'POST', headers: { Authorization: `Bearer ${TOKEN}`, 'Content-Type': 'application/json' }, body: JSON.stringify({ name: '<img src=x onerror=alert(1)>' }) });
    expect(res.status).toBe(400);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe('EMBOT_ERR_VM_SPEC_INVALID');
  });

  it('starts a migration from the UI, shows it running, and ends with the VM on the other host', async () => {
    await view('migrations');
    await page.selectOption('[data-testid=migrate-vm]', 'web-1');
    await page.waitForSelector('[data-testid=migrate-to] option[value="b"]', { state: 'attached' });
    await page.selectOption('[data-testid=migrate-to]', 'b');
    await page.click('[data-testid=migrate-form] button[type=submit]');

    const running = page.locator('[data-testid=live-migrations] [data-vm="web-1"]');
    await running.waitFor({ timeout: 20_000 });
    expect(await running.locator('.phase').textContent()).not.toBe('');
    // Readings of the copy arrive while it runs (pushed): the rate chart draws them as they come.
    // (A function, not a string: the page's CSP forbids eval, which a string predicate needs.)
    await page.waitForFunction(
      () => ((globalThis as unknown as PageGlobals).document.querySelector('[data-testid=live-migrations] svg.ratechart polyline.rate')?.getAttribute('points') ?? '').split(' ').length >= 4,
      undefined,
      { timeout: 20_000 },
    );
    // The driver's copy phase and how long it has been in it (the pre-copy rounds, or the stop at their end).
    expect(await running.locator('[data-testid=copy-phase]').textContent()).toMatch(/^copy (precopy|stop-and-copy) for \d+(\.\d)? (ms|s)/);
    await shot('migrations-running');

    const done = page.locator('[data-testid=past-migrations] [data-vm="web-1"].outcome-completed');
    await done.waitFor({ timeout: 60_000 });
    expect(await done.locator('.handoff').textContent()).toContain('management hand-off');
    await shot('migrations-past');

    await waitFor(async () => (await b.listVms()).some((v) => v.name === 'web-1'), 20_000, 'web-1 on b');
    expect((await a.listVms()).some((v) => v.name === 'web-1')).toBe(false);
    await view('host');
    await page.waitForSelector('[data-vm="web-2"]');
    expect(await page.locator('[data-vm="web-1"]').count()).toBe(0);
  }, 90_000);

  it('starts a migration to several destinations from the UI and shows how each one ended', async () => {
    await a.createVm({ name: 'web-4', memory: 16 * 1024 * 1024 });
    await a.vmAction('web-4', 'start');
    await view('migrations');
    await page.selectOption('[data-testid=migrate-vm]', 'web-4');
    await page.waitForSelector('[data-testid=migrate-to] option[value="c"]', { state: 'attached' });
    await page.selectOption('[data-testid=migrate-to]', ['b', 'c']);
    await page.click('[data-testid=migrate-form] button[type=submit]');
    const started = await page.waitForSelector('.form-message:has-text("started")');
    const id = /migration (\S+) started/.exec((await started.textContent()) ?? '')![1]!;
    // The agent's own word first, so a failed fan-out fails here with its reason.
    const ended = await a.waitMigration(id, { timeoutMs: 60_000 });
    expect(ended.outcome, `${ended.reason ?? ''} ${JSON.stringify(ended.summary?.destinations ?? [])}`).toBe('completed');
    const done = page.locator(`[data-testid=past-migrations] [data-migration="${id}"].outcome-completed`);
    await done.waitFor({ timeout: 10_000 });
    const rows = done.locator('[data-testid=destinations] tbody tr');
    expect(await rows.count()).toBe(2);
    const won = done.locator('[data-testid=destinations] tr.winner');
    expect(await won.count()).toBe(1);
    const winner = (await won.getAttribute('data-destination'))!;
    expect(['b', 'c']).toContain(winner);
    await shot('migrations-several');
    const owner = winner === 'b' ? b : c;
    const other = winner === 'b' ? c : b;
    await waitFor(async () => (await owner.listVms()).some((v) => v.name === 'web-4'), 20_000, `web-4 on ${winner}`);
    expect((await other.listVms()).some((v) => v.name === 'web-4')).toBe(false);
    expect((await a.listVms()).some((v) => v.name === 'web-4')).toBe(false);
  }, 90_000);

  it('cancels a running migration from the UI: it ends aborted and the VM stays', async () => {
    await a.createVm({ name: 'web-3', memory: 64 * 1024 * 1024, dirtyRate: 1024 * 1024 });
    await a.vmAction('web-3', 'start');
    await view('migrations');
    const { id } = await a.migrate('web-3', 'b');
    const cancel = page.locator(`[data-testid=live-migrations] [data-migration="${id}"] button.danger`);
    await cancel.waitFor({ timeout: 20_000 });
    await cancel.click();
    const ended = await a.waitMigration(id, { timeoutMs: 30_000 });
    expect(ended.outcome).toBe('aborted');
    expect(ended.reason).toContain('cancelled');
    await page.waitForSelector(`[data-testid=past-migrations] [data-migration="${id}"].outcome-aborted`);
    expect(await page.locator(`[data-migration="${id}"] .error`).textContent()).toContain('cancelled');
    await shot('migrations-cancelled');
    expect((await a.listVms()).find((v) => v.name === 'web-3')?.state).toBe('running');
    expect((await b.listVms()).some((v) => v.name === 'web-3')).toBe(false);
  }, 60_000);

  it("shows the copy's stop-and-copy on the card with how long it has lasted, counting while the VM is stopped", async () => {
    const urlC = cluster.agent('c').url;
    await c.createVm({ name: 'web-5', memory: 64 * 1024 * 1024, dirtyRate: 1024 * 1024 });
    await c.vmAction('web-5', 'start');
    // c's own page: a migration's card is on its source's dashboard.
    const pageC = await (await browser.newContext({ viewport: { width: 1360, height: 900 } })).newPage();
    await pageC.goto(`${urlC}/ui/?token=${TOKEN}`);
    await pageC.click('nav a[data-nav="migrations"]');
    await pageC.waitForSelector('body[data-view="migrations"]');
    const asked = Date.now();
    const { id } = await c.migrate('web-5', 'b');
    const card = pageC.locator(`[data-testid=live-migrations] [data-migration="${id}"]`);
    // One round at 16 MiB/s: the whole 64 MiB goes with the VM stopped, about 4 s.
    const stopped = card.locator('[data-testid=copy-phase][data-copy-phase="stop-and-copy"]');
    await stopped.waitFor({ timeout: 30_000 });
    const shown = async (): Promise<number> => {
      const text = (await stopped.textContent()) ?? '';
      const m = /^copy stop-and-copy for (\d+(?:\.\d)?) (ms|s) — the VM is stopped and the rest goes now/.exec(text);
      expect(m, text).not.toBeNull();
      return Number(m![1]) * (m![2] === 's' ? 1000 : 1);
    };
    const first = await shown();
    expect(first).toBeLessThanOrEqual(Date.now() - asked);
    // What the user sees keeps counting while no reading comes (as in QEMU's final pass): with c
    // stopped (SIGSTOP) for 800 ms nothing is pushed, and the page's own clock redraws the time.
    const agentC = cluster.agent('c').child;
    agentC.kill('SIGSTOP');
    let during: number;
    try {
      const before = await shown();
      await new Promise((r) => setTimeout(r, 800));
      during = (await shown()) - before;
    } finally {
      agentC.kill('SIGCONT');
    }
    expect(during).toBeGreaterThanOrEqual(500);
    expect(await card.locator('.phase').textContent()).toBe('migratingVm');
    await pageC.screenshot({ path: join(ARTIFACTS, 'migrations-stop-and-copy.png'), fullPage: true });

    const ended = await c.waitMigration(id, { timeoutMs: 60_000 });
    expect(ended.outcome, ended.reason).toBe('completed');
    const done = pageC.locator(`[data-testid=past-migrations] [data-migration="${id}"].outcome-completed`);
    await done.waitFor({ timeout: 10_000 });
    // A past card has its summary (downtime, bytes); the copy phase was the running card's.
    expect(await done.locator('[data-testid=copy-phase]').count()).toBe(0);
    expect(await pageC.locator(`[data-testid=live-migrations] [data-migration="${id}"]`).count()).toBe(0);
    await pageC.context().close();
    await waitFor(async () => (await b.listVms()).some((v) => v.name === 'web-5'), 20_000, 'web-5 on b');
  }, 90_000);
});
