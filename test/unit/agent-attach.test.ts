/**
 * The agent's embot attach of an element that went meanwhile. At a restart, the attach loop walks a
 * list of elements taken before recover()'s discard of an uncommitted incoming VM ended; that
 * discard deregisters the VM's tree, and the attach of one of its elements threw ELEMENT_UNKNOWN
 * out of the agent's start (CI 11:30: a destination restarted after a SIGKILL exited with "no
 * managed element nic:app.0"). The race is reached here directly: the element is taken, its VM
 * removed, then attached (`attach` is the agent's internal, reached through its MobilityHost side).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { startAgent } from '../../core/agent.ts';
import { loadConfig } from '../../core/config/config.ts';
import { createLogger } from '../../core/logger.ts';
import type { ManagedElement } from '../../core/objects/managed-element.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';

const cleanups = cleanupsAfterEach();

describe('agent attach', () => {
  it('of an element deregistered meanwhile (its VM removed) does nothing, instead of throwing out of the caller', async () => {
    const root = mkdtempSync(join(tmpdir(), 'embot-attach-'));
    cleanups.push(() => rmSync(root, { recursive: true, force: true }));
    const flags = { name: 'a', dataDir: join(root, 'data'), pluginsDir: join(root, 'plugins'), logLevel: 'error' as const, control: { port: 0 }, sensors: { host: { intervalMs: 600_000 }, vm: { intervalMs: 600_000 } } };
    const agent = await startAgent(loadConfig({ env: {}, flags }), createLogger({ level: 'error', name: 'a' }));
    cleanups.push(() => agent.stop());
    await agent.control.createVm({ name: 'app', memory: 1 << 20 });
    const host = agent as unknown as { readonly objects: { list(): ManagedElement[] }; attach(el: ManagedElement): Promise<void> };
    const taken = host.objects.list().filter((e) => e.id.endsWith(':app') || e.id.startsWith('nic:app') || e.id.startsWith('disk:app'));
    expect(taken.length).toBeGreaterThan(0);
    await agent.control.removeVm!('app');
    expect(host.objects.list().some((e) => taken.some((t) => t.id === e.id))).toBe(false);
    for (const el of taken) await expect(host.attach(el)).resolves.toBeUndefined();
  });
});
