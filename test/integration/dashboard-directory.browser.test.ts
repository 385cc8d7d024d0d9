/**
 * The cluster view of the dashboard with the fleet directory on etcd, in Debian's Chromium: two real
 * agents with `--etcd` and no static peers, a real etcd. The peer found through etcd shows as such,
 * the directory's state shows on this agent's card, and an etcd outage shows coded while the peer
 * it knew stays on screen. A second agent started with a taken name shows it on its own card.
 */
import { randomBytes } from 'node:crypto';
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { chromium, type Browser } from 'playwright-core';
import { ErrorCodes } from '../../core/errors.ts';
import { AgentProcess, makeSandbox, waitFor } from '../harness/agent-process.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { etcdServer, requireEtcd } from '../harness/etcd-server.ts';

const CHROMIUM = '/usr/bin/chromium';
const TOKEN = 'dashboard-directory-token-0123456789';
const missing = !existsSync(CHROMIUM);
if (missing && process.env['CI']) throw new Error(`${CHROMIUM} is missing: .ci/run installs Debian's chromium for the dashboard tests`);
const run = requireEtcd() && !missing;
const cleanups = cleanupsAfterEach();
const agents: AgentProcess[] = [];
let browser: Browser | undefined;
afterEach(async () => {
  await browser?.close().catch(() => {});
  browser = undefined;
  await Promise.all(agents.splice(0).map((a) => a.kill().catch(() => {})));
});

describe.skipIf(!run)('dashboard cluster view with the fleet directory on etcd (Chromium)', () => {
  it('b shows as found via etcd, a’s card says etcd connected; a second agent named a says name taken (coded) on its card; etcd killed: unavailable with its code, b still listed', async () => {
    const etcd = await etcdServer(cleanups);
    await etcd.start();
    const box = makeSandbox();
    const secretFile = join(box.root, 'cluster.secret');
    writeFileSync(secretFile, randomBytes(32).toString('base64'));
    const start = async (name: string, dataDir = box.dataDir(name)): Promise<AgentProcess> => {
      const file = join(box.root, `config-${name}.json`);
      writeFileSync(file, JSON.stringify({ peer: { listen: '127.0.0.1:0', secretFile }, directory: { ttlSeconds: 2 }, sensors: { host: { intervalMs: 60_000 }, vm: { intervalMs: 60_000 } } }));
      const agent = await AgentProcess.start({ name, dataDir, pluginsDir: box.pluginsDir, extraArgs: ['--config', file, '--etcd', etcd.url], env: { EMBOT_CONTROL_TOKEN: TOKEN } });
      agents.push(agent);
      return agent;
    };
    const a = await start('a');
    await start('b');

    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox'] });
    const page = await (await browser.newContext()).newPage();
    await page.goto(`${a.url}/?token=${TOKEN}`);
    await page.click('nav a[data-nav="cluster"]');
    await page.waitForSelector('[data-testid=agents] [data-agent="b"]', { timeout: 30_000 });
    expect(await page.locator('[data-agent="b"] .badge').allTextContents()).toContain('via etcd');
    const directory = (): Promise<string> => page.locator('[data-agent="a"] [data-testid=directory]').textContent().then((t) => (t ?? '').replace(/\s+/g, ' ').trim());
    await waitFor(async () => ((await directory()) === 'etcd connected' ? true : undefined), 20_000, 'etcd connected on a’s card');

    // A second agent started with a's name once a registered: its own card says the name is taken, with the code.
    const twin = await start('a', box.dataDir('a-twin'));
    const twinPage = await (await browser.newContext()).newPage();
    await twinPage.goto(`${twin.url}/?token=${TOKEN}`);
    await twinPage.click('nav a[data-nav="cluster"]');
    const twinDirectory = (): Promise<string> => twinPage.locator('[data-agent="a"] [data-testid=directory]').textContent().then((t) => (t ?? '').replace(/\s+/g, ' ').trim());
    await waitFor(async () => ((await twinDirectory()) === 'etcd name taken' ? true : undefined), 20_000, 'the name taken on the twin’s card');
    expect(await twinPage.locator('[data-agent="a"] [data-testid=directory] .badge').getAttribute('class')).toContain('bad');
    expect(await twinPage.locator('[data-agent="a"] ul.problems').textContent()).toContain(ErrorCodes.DIRECTORY_NAME_TAKEN);
    // a itself is unaffected.
    expect(await directory()).toBe('etcd connected');

    await etcd.kill();
    await waitFor(async () => ((await directory()) === 'etcd unavailable' ? true : undefined), 30_000, 'etcd unavailable on a’s card');
    expect(await page.locator('[data-agent="a"] ul.problems').textContent()).toContain(ErrorCodes.DIRECTORY_UNAVAILABLE);
    // The peer it knew stays usable, and on screen.
    expect(await page.locator('[data-agent="b"] h3').textContent()).toBe('b');
  }, 120_000);
});
