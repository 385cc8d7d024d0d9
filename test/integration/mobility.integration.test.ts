import { afterEach, describe, expect, it } from 'vitest';
import { counterOf, tickProducer } from '../harness/counter-stream.ts';
import { Cluster, migrate } from '../harness/cluster.ts';
import { waitFor } from '../harness/agent-process.ts';


let cluster: Cluster | undefined;
afterEach(async () => {
  await cluster?.stop();
  cluster = undefined;
});




describe('peer-to-peer mobility', () => {
  it('moves a VM with its embots while events flow: every event processed once, in order, across both hosts', async () => {
    cluster = await Cluster.start(['a', 'b'], { plugins: [{ from: 'fixture', name: 'counter' }, { from: 'shipped', name: 'vm-watchdog' }] });
    const a = cluster.agent('a');
    const b = cluster.agent('b');
    await a.client.createVm({ name: 'web-1', memory: 2 << 20 });
    await a.client.vmAction('web-1', 'start');
    await waitFor(async () => counterOf(await a.client.listEmbots(), 'web-1'), 10_000, 'counter embot on a');

    const prod = tickProducer(() => a, 'web-1');
    await waitFor(() => prod.acked >= 100, 10_000, '100 events before the move');
    const info = await migrate(a, 'web-1', 'b');
    expect(info.outcome).toBe('completed');
    await waitFor(() => prod.acked >= info.summary!.events + 150, 10_000, 'events after the switch (forwarded by a)');
    await prod.stop();

    // b owns the VM and its embots now; a has nothing of it.
    expect((await b.client.listVms()).map((v) => `${v.name}:${v.state}`)).toEqual(['web-1:running']);
    expect((await a.client.listVms()).map((v) => v.name)).toEqual([]);
    expect((await a.client.listEmbots()).filter((e) => e.elementIds.includes('vm:web-1'))).toEqual([]);
    const final = await waitFor(async () => {
      const c = counterOf(await b.client.listEmbots(), 'web-1');
      return c && c.count >= prod.acked ? c : undefined;
    }, 10_000, `all ${prod.acked} events processed at b`);
    expect(final.count).toBe(prod.acked);
    expect(final.lastSeq).toBe(prod.acked - 1);
    expect(final.outOfOrder).toBe(0);
    expect(info.summary!.embots).toBe(2);
    // The 150+ events sent to a after the switch were forwarded: they are counted at b above.
    const watchdog = (await b.client.listEmbots()).find((e) => e.id === 'vm-watchdog/watchdog/vm:web-1');
    expect(watchdog?.status).toBe('running');
  });

  it('moves the embots of the VM\'s dependent elements with it', async () => {
    cluster = await Cluster.start(['a', 'b'], { plugins: [{ from: 'fixture', name: 'disk-watch' }] });
    const a = cluster.agent('a');
    const b = cluster.agent('b');
    await a.client.createVm({ name: 'files', memory: 1 << 20 });
    const id = 'disk-watch/watch/disk:files.0';
    await waitFor(async () => (await a.client.listEmbots()).find((e) => e.id === id), 10_000, 'disk embot at a');
    for (let i = 0; i < 3; i++) await a.client.emitEvent({ elementId: 'disk:files.0', type: 'DISK_IO', payload: null });
    await waitFor(async () => ((await a.client.listEmbots()).find((e) => e.id === id)?.policies[0]?.context as { ios: number } | undefined)?.ios === 3, 5000, 'three IOs at a');
    const info = await migrate(a, 'files', 'b');
    expect(info.outcome).toBe('completed');
    expect(info.summary?.embots).toBe(1);
    expect((await a.client.listEmbots()).find((e) => e.id === id)).toBeUndefined();
    await b.client.emitEvent({ elementId: 'disk:files.0', type: 'DISK_IO', payload: null });
    await waitFor(async () => ((await b.client.listEmbots()).find((e) => e.id === id)?.policies[0]?.context as { ios: number } | undefined)?.ios === 4, 5000, 'the count goes on at b');
  });

  it('continues a delayed transition at the target at the time it would have fired at the source', async () => {
    cluster = await Cluster.start(['a', 'b'], { plugins: [{ from: 'fixture', name: 'counter' }], config: () => ({ modules: { counter: { delayMs: 2000 } } }) });
    const a = cluster.agent('a');
    const b = cluster.agent('b');
    await a.client.createVm({ name: 'db-1', memory: 1 << 20 });
    await waitFor(async () => counterOf(await a.client.listEmbots(), 'db-1'), 10_000, 'counter embot');
    const armedAt = Date.now();
    await a.client.emitEvent({ elementId: 'vm:db-1', type: 'ARM', payload: null });
    await waitFor(async () => (await a.client.listEmbots()).find((e) => e.id === 'counter/counter/vm:db-1')?.policies[0]?.state === 'armed', 5000, 'armed at a');
    expect((await migrate(a, 'db-1', 'b')).outcome).toBe('completed');
    expect((await b.client.listEmbots()).find((e) => e.id === 'counter/counter/vm:db-1')?.policies[0]?.state).toBe('armed');
    const fired = await waitFor(async () => (await b.client.listEvents({ limit: 500 })).find((e) => e.type === 'COUNTER_FIRED'), 8000, 'COUNTER_FIRED at b');
    expect(fired.ts - armedAt).toBeGreaterThanOrEqual(1900);
    expect(fired.ts - armedAt).toBeLessThan(2000 + 1500);
    expect((await a.client.listEvents({ limit: 500 })).some((e) => e.type === 'COUNTER_FIRED')).toBe(false);
  });

  it('loses nothing when the target denies: the source keeps managing the VM with its held events released', async () => {
    cluster = await Cluster.start(['a', 'b'], { plugins: [{ from: 'fixture', name: 'counter' }], config: (n) => (n === 'b' ? { sim: { hostMemory: 1 << 20 } } : {}) });
    const a = cluster.agent('a');
    const b = cluster.agent('b');
    await a.client.createVm({ name: 'big', memory: 8 << 20 });
    await waitFor(async () => counterOf(await a.client.listEmbots(), 'big'), 10_000, 'counter embot');
    const prod = tickProducer(() => a, 'big');
    await waitFor(() => prod.acked >= 30, 10_000, 'some events');
    const info = await migrate(a, 'big', 'b');
    await waitFor(() => prod.acked >= 60, 10_000, 'more events');
    await prod.stop();
    expect(info.outcome).toBe('denied');
    expect(info.reason ?? info.summary?.reason).toMatch(/not enough memory/);
    const c = await waitFor(async () => {
      const x = counterOf(await a.client.listEmbots(), 'big');
      return x && x.count >= prod.acked ? x : undefined;
    }, 10_000, 'all events processed at a');
    expect(c.count).toBe(prod.acked);
    expect(c.outOfOrder).toBe(0);
    expect(await b.client.listVms()).toEqual([]);
    expect((await b.client.listEmbots()).filter((e) => e.elementIds.includes('vm:big'))).toEqual([]);
  });

  it('rolls back when the target dies mid-migration: nothing lost at the source, nothing left at the restarted target', async () => {
    cluster = await Cluster.start(['a', 'b'], { plugins: [{ from: 'fixture', name: 'counter' }] });
    const a = cluster.agent('a');
    await cluster.kill('b');
    await cluster.startAgent('b', { EMBOT_FAULT_KILL_AT: 'target:eventsStaged' });
    await a.client.createVm({ name: 'app', memory: 1 << 20 });
    await a.client.vmAction('app', 'start');
    await waitFor(async () => counterOf(await a.client.listEmbots(), 'app'), 10_000, 'counter embot');
    const prod = tickProducer(() => a, 'app');
    await waitFor(() => prod.acked >= 20, 10_000, 'events');
    const info = await migrate(a, 'app', 'b');
    expect(info.outcome).toBe('aborted');
    await waitFor(() => prod.acked >= 50, 10_000, 'events after the abort');
    await prod.stop();
    const c = await waitFor(async () => {
      const x = counterOf(await a.client.listEmbots(), 'app');
      return x && x.count >= prod.acked ? x : undefined;
    }, 10_000, 'all events processed at a');
    expect(c.count).toBe(prod.acked);
    expect(c.outOfOrder).toBe(0);
    expect((await a.client.listVms()).map((v) => `${v.name}:${v.state}`)).toEqual(['app:running']);
    const b2 = await cluster.startAgent('b');
    expect(await b2.client.listVms()).toEqual([]);
    expect(await b2.client.listEmbots().then((l) => l.filter((e) => e.elementIds.includes('vm:app')))).toEqual([]);
  });
});
