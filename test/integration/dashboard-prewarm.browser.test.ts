import { existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { chromium, type Browser, type Page } from 'playwright-core';
import { Cluster } from '../harness/cluster.ts';
import { REPO, waitFor } from '../harness/agent-process.ts';
import { ControlClient } from '../../core/control/client.ts';
import { ErrorCodes } from '../../core/errors.ts';

/**
 * Pre-warm from the dashboard (issue 15) in a real browser (Debian's chromium, driven by
 * playwright-core) against three real agents on loopback with a control token: started from the
 * page to b and c, each destination's state pushed into its card until the exit condition holds,
 * switched from the page to b alone (c discards), and a second pre-warm cancelled from the page
 * (nothing left anywhere). Screenshots in test/artifacts/dashboard/ (git-ignored).
 */
const CHROMIUM = '/usr/bin/chromium';
const ARTIFACTS = join(REPO, 'test', 'artifacts', 'dashboard');
const TOKEN = 'dashboard-prewarm-token-0123456789';
const MiB = 1 << 20;
const missing = !existsSync(CHROMIUM);
if (missing && process.env['CI']) throw new Error(`${CHROMIUM} is missing: .ci/run installs Debian's chromium for the dashboard tests`);

describe.skipIf(missing)('dashboard pre-warm in Chromium, three agents, token configured', () => {
  let cluster: Cluster;
  let browser: Browser;
  let page: Page;
  let a: ControlClient;
  let b: ControlClient;
  let c: ControlClient;

  beforeAll(async () => {
    mkdirSync(ARTIFACTS, { recursive: true });
    cluster = await Cluster.start(['a', 'b', 'c'], {
      plugins: [{ from: 'fixture', name: 'counter' }],
      env: () => ({ EMBOT_CONTROL_TOKEN: TOKEN }),
      config: () => ({
        mobility: { stepTimeoutMs: 5000, vmTimeoutMs: 60_000, forwardGraceMs: 5000, trust: { mode: 'any-authenticated-peer' } },
      }),
    });
    const urlA = cluster.agent('a').url;
    a = new ControlClient(urlA, TOKEN);
    b = new ControlClient(cluster.agent('b').url, TOKEN);
    c = new ControlClient(cluster.agent('c').url, TOKEN);
    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox'] });
    page = await (await browser.newContext({ viewport: { width: 1360, height: 900 } })).newPage();
    await page.goto(`${urlA}/ui/?token=${TOKEN}`);
    await page.waitForSelector('[data-testid=connection] .badge.ok');
    await page.click('nav a[data-nav="migrations"]');
    await page.waitForSelector('body[data-view="migrations"]');
  }, 60_000);

  afterAll(async () => {
    await browser?.close().catch(() => {});
    await cluster?.stop();
  });

  /** A running VM at a that dirties its memory, so the held copies have rounds to re-send. */
  async function warmVm(name: string): Promise<void> {
    await a.createVm({ name, memory: 16 * MiB, dirtyRate: MiB });
    await a.vmAction(name, 'start');
  }

  /** Picks the VM and b and c from the ranked target list and presses Pre-warm; the pre-warm's id. */
  async function prewarmFromPage(vm: string): Promise<string> {
    await page.waitForSelector(`[data-testid=migrate-vm] option[value="${vm}"]`, { state: 'attached' });
    await page.selectOption('[data-testid=migrate-vm]', vm);
    await page.waitForSelector('[data-testid=migrate-to] option[value="c"]', { state: 'attached' });
    await page.selectOption('[data-testid=migrate-to]', ['b', 'c']);
    await page.click('[data-testid=prewarm-start]');
    // The page's own word: the id, or the agent's error code and message.
    const text = await waitFor(async () => /pre-warm (\S+) started|EMBOT_ERR_\S+.*/.exec((await page.locator('.form-message').textContent()) ?? '')?.[0], 10_000, 'the pre-warm started from the page');
    const id = /pre-warm (\S+) started/.exec(text)?.[1];
    expect(id, text).toBeDefined();
    return id!;
  }

  /** Nothing of `vm` left at an agent: no VM, no embot, no running migration. */
  async function expectClean(agent: ControlClient, vm: string): Promise<void> {
    expect((await agent.listVms()).filter((v) => v.name === vm)).toEqual([]);
    expect((await agent.listEmbots()).filter((e) => e.elementIds.includes(`vm:${vm}`))).toEqual([]);
    expect((await agent.listMigrations()).filter((m) => m.vm === vm && m.outcome === null)).toEqual([]);
  }

  it('pre-warms b and c from the page, shows each destination warm, switches to b alone from the page: the VM ends at b, c clean', async () => {
    await warmVm('warm-1');
    const id = await prewarmFromPage('warm-1');
    const card = page.locator(`[data-testid=live-migrations] [data-migration="${id}"]`);
    const row = (dest: string) => card.locator(`[data-testid=prewarm-destinations] tr[data-destination="${dest}"]`);
    // Both destinations' state arrives pushed over the live channel, up to the exit condition.
    for (const dest of ['b', 'c']) await row(dest).locator('td[data-field=exit] .badge.ok').waitFor({ timeout: 30_000 });
    for (const dest of ['b', 'c']) {
      expect(await row(dest).locator('td[data-field=exit]').textContent()).toBe('met');
      expect(await row(dest).locator('td[data-field=copied]').textContent()).toMatch(/MiB$/);
      expect(await row(dest).locator('td[data-field=remaining]').textContent()).toMatch(/^\d+(\.\d)? (B|KiB|MiB)$/);
      expect(await row(dest).locator('td[data-field=rate]').textContent()).toMatch(/\/s$/);
      expect(await row(dest).locator('td[data-field=dirty]').textContent()).toMatch(/\/s$/);
    }
    // The agent's own record agrees with what the page shows.
    const own = (await a.listMigrations()).find((m) => m.id === id)?.prewarm;
    expect(own?.commandedAt).toBeNull();
    expect(own?.destinations.map((d) => [d.name, d.status])).toEqual([['b', 'warming'], ['c', 'warming']]);
    // Held rounds keep coming while it waits: the rounds column moves without a reload.
    const rounds = Number(await row('b').locator('td[data-field=rounds]').textContent());
    await waitFor(async () => Number(await row('b').locator('td[data-field=rounds]').textContent()) > rounds, 20_000, 'more held rounds shown');
    // The guest dirties 1 MiB/s and the held readings say so (they once read 0 B/s: each held round measured alone).
    for (const dest of ['b', 'c']) {
      await waitFor(async () => (/(KiB|MiB)\/s$/.test((await row(dest).locator('td[data-field=dirty]').textContent()) ?? '') ? true : undefined), 20_000, `${dest}'s dirty rate shown in KiB/s or MiB/s`);
    }
    // The card is rebuilt on every push (its pre-warm panel is moved into the new one), so the card
    // can be replaced while it is being captured: capture again until one capture finds it whole.
    await waitFor(
      () => card.screenshot({ path: join(ARTIFACTS, 'migrations-prewarm-card.png'), timeout: 2000 }).then(() => true, () => undefined),
      20_000,
      'a screenshot of the pre-warm card',
    );
    await page.screenshot({ path: join(ARTIFACTS, 'migrations-prewarm.png'), fullPage: true });

    await row('c').locator('input[data-testid=prewarm-choose]').uncheck();
    expect(await row('b').locator('input[data-testid=prewarm-choose]').isChecked()).toBe(true);
    await card.locator('[data-testid=prewarm-switch]').click();
    await page.waitForSelector('.form-message:has-text("switch of warm-1 commanded")');

    const ended = await a.waitMigration(id, { timeoutMs: 60_000 });
    expect(ended.outcome, ended.reason).toBe('completed');
    expect(ended.summary?.winner).toBe('b');
    const c1 = ended.summary?.destinations?.find((d) => d.name === 'c');
    expect(c1?.outcome).toBe('terminated');
    expect(c1?.reason).toContain('not named by the migrate command');
    const done = page.locator(`[data-testid=past-migrations] [data-migration="${id}"].outcome-completed`);
    await done.waitFor({ timeout: 10_000 });
    expect(await done.locator('[data-testid=destinations] tr.winner').getAttribute('data-destination')).toBe('b');
    // A finished pre-warm has no actions left on its card.
    expect(await done.locator('[data-testid=prewarm]').count()).toBe(0);
    await page.screenshot({ path: join(ARTIFACTS, 'migrations-prewarm-switched.png'), fullPage: true });

    await waitFor(async () => (await b.listVms()).find((v) => v.name === 'warm-1' && v.state === 'running'), 20_000, 'warm-1 running at b');
    expect((await a.listVms()).some((v) => v.name === 'warm-1')).toBe(false);
    await waitFor(async () => !(await c.listVms()).some((v) => v.name === 'warm-1'), 10_000, 'warm-1 gone from c');
    await expectClean(c, 'warm-1');
    expect(await page.locator('img').count()).toBe(0);
  }, 120_000);

  it('refuses a second pre-warm of the VM and one without targets with a message; cancels the pre-warm from the page: nothing left at b or c, the VM runs on at a', async () => {
    await warmVm('warm-2');
    const id = await prewarmFromPage('warm-2');
    const card = page.locator(`[data-testid=live-migrations] [data-migration="${id}"]`);
    await card.locator('[data-testid=prewarm-destinations] tr[data-destination="c"]').waitFor({ timeout: 20_000 });
    // Bad input from the page: a second pre-warm of the VM is refused with its code, the first goes on.
    await page.click('[data-testid=prewarm-start]');
    await page.waitForSelector(`.form-message:has-text("${ErrorCodes.VM_BAD_STATE}")`);
    // No target picked: the page says so and calls nothing.
    await page.selectOption('[data-testid=migrate-to]', []);
    await page.click('[data-testid=prewarm-start]');
    await page.waitForSelector('.form-message:has-text("pick a VM and one or more targets")');
    expect((await a.listMigrations()).filter((m) => m.vm === 'warm-2' && m.outcome === null && m.prewarm).map((m) => m.id)).toEqual([id]);
    await card.locator('[data-testid=prewarm-cancel]').click();
    const ended = await a.waitMigration(id, { timeoutMs: 60_000 });
    expect(ended.outcome).toBe('aborted');
    expect(ended.summary?.winner ?? null).toBeNull();
    await page.locator(`[data-testid=past-migrations] [data-migration="${id}"].outcome-aborted`).waitFor({ timeout: 10_000 });
    expect(await page.locator(`[data-testid=live-migrations] [data-migration="${id}"]`).count()).toBe(0);
    await page.screenshot({ path: join(ARTIFACTS, 'migrations-prewarm-cancelled.png'), fullPage: true });

    for (const agent of [b, c]) await waitFor(async () => !(await agent.listVms()).some((v) => v.name === 'warm-2'), 10_000, 'warm-2 discarded');
    await expectClean(b, 'warm-2');
    await expectClean(c, 'warm-2');
    expect((await a.listVms()).find((v) => v.name === 'warm-2')?.state).toBe('running');
    expect((await a.listMigrations()).filter((m) => m.vm === 'warm-2' && m.outcome === null)).toEqual([]);
  }, 120_000);
});
