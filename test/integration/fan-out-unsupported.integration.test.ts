import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { startAgent, type RunningAgent } from '../../core/agent.ts';
import { freeLoopbackPort } from '../../core/cli/free-port.ts';
import { loadConfig } from '../../core/config/config.ts';
import { ErrorCodes, isEmbotError } from '../../core/errors.ts';
import { createLogger } from '../../core/logger.ts';
import { makeSandbox } from '../harness/agent-process.ts';

/**
 * A driver without the fanOut capability keeps answering several destinations (and --retries /
 * --fallback) with EMBOT_ERR_MULTI_DESTINATION_UNSUPPORTED, before anything starts. Both built-in
 * drivers have the capability, so this agent's sim driver has it taken away: a fake, named as such,
 * for a driver that cannot be had for real. Everything else is a real agent in this process.
 */

let agent: RunningAgent | undefined;
afterEach(async () => {
  await agent?.stop();
  agent = undefined;
});

describe('several destinations with a driver that cannot copy to several', () => {
  it('is refused with MULTI_DESTINATION_UNSUPPORTED (API 501), no migration journaled, the VM untouched', async () => {
    const box = makeSandbox();
    const secretFile = join(box.root, 'secret');
    writeFileSync(secretFile, randomBytes(32).toString('hex'));
    const flags = {
      name: 'a',
      dataDir: box.dataDir('a'),
      pluginsDir: box.pluginsDir,
      logLevel: 'error' as const,
      control: { port: 0 },
      // The peers need not run: the refusal comes before any link is opened.
      peer: { listen: `127.0.0.1:${await freeLoopbackPort()}`, peers: { b: 'ws://127.0.0.1:9', c: 'ws://127.0.0.1:9' }, secretFile },
      sensors: { host: { intervalMs: 600_000 }, vm: { intervalMs: 600_000 } },
    };
    agent = await startAgent(loadConfig({ env: {}, flags }), createLogger({ level: 'error', name: 'a' }));
    // FAKE: the capability taken away (see above).
    const driver = agent.services.get('hypervisor');
    Object.defineProperty(driver, 'capabilities', { value: { ...driver.capabilities, fanOut: undefined } });
    await agent.control.createVm({ name: 'web', memory: 1 << 20 });
    await agent.control.vmAction('web', 'start');

    for (const [to, options] of [[['b', 'c'], {}], ['b', { retries: 1 }], ['b', { retries: 0 }], ['b', { fallback: ['c'] }]] as const) {
      let thrown: unknown;
      try {
        agent.control.migrate('web', to, options);
      } catch (e) {
        thrown = e;
      }
      expect(isEmbotError(thrown, ErrorCodes.MULTI_DESTINATION_UNSUPPORTED), `${JSON.stringify(to)} ${JSON.stringify(options)}: ${String(thrown)}`).toBe(true);
    }
    const res = await fetch(`${agent.controlUrl}/v1/migrations`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ vm: 'web', to: ['b', 'c'] }) });
    expect(res.status).toBe(501);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe(ErrorCodes.MULTI_DESTINATION_UNSUPPORTED);
    expect(agent.control.listMigrations()).toEqual([]);
    expect(agent.services.get('hypervisor').get('web')?.state).toBe('running');
  }, 60_000);
});
