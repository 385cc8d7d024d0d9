import Database from 'better-sqlite3';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../core/errors.ts';
import type { EmittedEvent } from '../../core/control/control-api.ts';
import { AgentProcess, makeSandbox, runCli, sleep, waitFor } from '../harness/agent-process.ts';
import { counterOf, sequencedPoster, type CounterContext } from '../harness/counter-stream.ts';
import { journaledTickSeqs } from '../harness/journal-peek.ts';

/** The ts of the journaled (not yet processed) event `id` in a stopped agent's store. */
function journaledTs(dataDir: string, id: string): number | undefined {
  const db = new Database(join(dataDir, 'embot.sqlite'), { readonly: true, fileMustExist: true });
  try {
    return db.prepare('SELECT ts FROM events WHERE id = ?').pluck().get(id) as number | undefined;
  } finally {
    db.close();
  }
}

const agents: AgentProcess[] = [];
afterEach(async () => {
  for (const a of agents.splice(0)) await a.kill().catch(() => {});
});

async function start(opts: Parameters<typeof AgentProcess.start>[0]): Promise<AgentProcess> {
  const a = await AgentProcess.start(opts, 60_000);
  agents.push(a);
  return a;
}

async function kill(a: AgentProcess): Promise<void> {
  await a.kill();
  agents.splice(agents.indexOf(a), 1);
}

/** The counter's context for f1 once it counted at least `n` TICKs. */
async function counted(a: AgentProcess, n: number): Promise<CounterContext & { seen: string[] }> {
  return waitFor(async () => {
    const c = counterOf(await a.client.listEmbots(), 'f1') as (CounterContext & { seen: string[] }) | undefined;
    return c && c.count >= n ? c : undefined;
  }, 30_000, `${n} TICKs counted`);
}

async function agentWithCounter(): Promise<{ a: AgentProcess; opts: Parameters<typeof AgentProcess.start>[0] }> {
  const box = makeSandbox([{ from: 'fixture', name: 'counter' }]);
  const opts = { name: 'a', dataDir: box.dataDir('a'), pluginsDir: box.pluginsDir };
  const a = await start(opts);
  await a.client.createVm({ name: 'f1', memory: 1 << 20 });
  await a.client.vmAction('f1', 'start');
  await waitFor(async () => counterOf(await a.client.listEmbots(), 'f1'), 30_000, 'counter embot');
  return { a, opts };
}

describe('POST /v1/events with an id is idempotent: a producer that re-posts an unanswered event gets it processed once', () => {
  it('the same id posted twice: both answered 201 with the first copy (id, ts), the repeat marked duplicate, processed once', async () => {
    const { a } = await agentWithCounter();
    const first = await a.client.emitEvent({ elementId: 'vm:f1', type: 'TICK', payload: { seq: 0 }, id: 'tick-twice-0' });
    expect(first).not.toHaveProperty('duplicate');
    await sleep(30); // the agent's clock moves on: a repeat stamped now would show it
    const again = await a.client.emitEvent({ elementId: 'vm:f1', type: 'TICK', payload: { seq: 0 }, id: 'tick-twice-0' });
    expect(again).toMatchObject({ id: 'tick-twice-0', ts: first.ts, duplicate: true });
    // A repeat with a ts of its own is still the first copy.
    await expect(a.client.emitEvent({ elementId: 'vm:f1', type: 'TICK', payload: { seq: 0 }, id: 'tick-twice-0', ts: first.ts + 5_000 })).resolves.toMatchObject({
      ts: first.ts,
      duplicate: true,
    });
    // The CLI says so, and --json carries the flag.
    const text = await runCli(['events', 'emit', '--element', 'vm:f1', '--type', 'TICK', '--payload', '{"seq":0}', '--id', 'tick-twice-0'], { EMBOT_AGENT: a.url });
    expect(text.code, text.stderr).toBe(0);
    expect(text.stdout).toMatch(/event tick-twice-0 was taken before .*not taken again/);
    const json = await runCli(['events', 'emit', '--element', 'vm:f1', '--type', 'TICK', '--payload', '{"seq":0}', '--id', 'tick-twice-0', '--json'], { EMBOT_AGENT: a.url });
    expect(json.code, json.stderr).toBe(0);
    expect(JSON.parse(json.stdout) as EmittedEvent).toMatchObject({ id: 'tick-twice-0', ts: first.ts, duplicate: true });
    // Bad input: the answer's flag posted back is refused with a code, and nothing is taken.
    const echoed = await fetch(`${a.url}/v1/events`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ ...again, id: 'tick-echo' }) });
    expect(echoed.status).toBe(400);
    expect(((await echoed.json()) as { error: { code: string; message: string } }).error).toMatchObject({ code: ErrorCodes.CONTROL_BAD_REQUEST, message: expect.stringMatching(/duplicate/) });
    await a.client.emitEvent({ elementId: 'vm:f1', type: 'TICK', payload: { seq: 1 }, id: 'tick-twice-1' });
    const c = await counted(a, 2);
    await sleep(300); // a second copy of tick-twice-0 would have been dispatched before tick-twice-1
    expect(counterOf(await a.client.listEmbots(), 'f1')).toMatchObject({ count: 2, lastSeq: 1, outOfOrder: 0 });
    expect(c.seen).toEqual(['0', '1']);
    expect((await a.client.status()).pid).toBe(a.child.pid); // still the same agent
  }, 90_000);

  it('an id processed before a SIGKILL is not taken again when re-posted after the restart', async () => {
    const { a, opts } = await agentWithCounter();
    const first = await a.client.emitEvent({ elementId: 'vm:f1', type: 'TICK', payload: { seq: 0 }, id: 'tick-kept-0' });
    await counted(a, 1);
    await kill(a);
    const b = await start(opts);
    // A producer whose answer was lost (its own timeout, a lost reply) and who re-posts later: the answer is the first copy's.
    await expect(b.client.emitEvent({ elementId: 'vm:f1', type: 'TICK', payload: { seq: 0 }, id: 'tick-kept-0' })).resolves.toMatchObject({
      id: 'tick-kept-0',
      ts: first.ts,
      duplicate: true,
    });
    await b.client.emitEvent({ elementId: 'vm:f1', type: 'TICK', payload: { seq: 1 }, id: 'tick-kept-1' });
    const c = await counted(b, 2);
    await sleep(300);
    expect(counterOf(await b.client.listEmbots(), 'f1')).toMatchObject({ count: 2, lastSeq: 1, outOfOrder: 0 });
    expect(c.seen).toEqual(['0', '1']);
  }, 120_000);

  it('SIGKILLed with a post journaled but not yet answered, restarted: the re-post with the same id is not taken again', async () => {
    const { a, opts } = await agentWithCounter();
    let current: AgentProcess | undefined = a;
    // Near the 1 MiB body limit: writing the answer takes long enough after the journal commit that
    // some of the kills land between the two (the window a CI run hit with small posts, once).
    const pad = 'x'.repeat(900_000);
    /** The last answer to each seq's post. */
    const answers = new Map<number, EmittedEvent>();
    const prod = sequencedPoster(async (seq, fail) => {
      const to = current;
      try {
        if (!to) throw new Error('no agent to post to');
        answers.set(seq, await to.client.emitEvent({ elementId: 'vm:f1', type: 'TICK', payload: { seq, pad }, id: `big-tick-${seq}` }));
        return true;
      } catch (e) {
        fail(e instanceof Error ? e.message : String(e));
        await sleep(20);
        return false;
      }
    });
    const hits: number[] = [];
    /** ts of each caught post as journaled before the kill: what its re-post must be answered with. */
    const caughtTs = new Map<number, number | undefined>();
    const notes: string[] = [];
    // Kill until a post was caught taken-but-unanswered, at most 30 times.
    for (let k = 0; k < 30 && hits.length < 1; k++) {
      await sleep(150 + Math.floor(Math.random() * 300));
      const victim = current!;
      current = undefined;
      await kill(victim);
      const inFlight = prod.acked;
      const journaled = journaledTickSeqs(opts.dataDir, 'vm:f1').includes(inFlight);
      notes.push(`kill ${k}: seq ${inFlight} in flight, journaled ${journaled}`);
      if (journaled) {
        hits.push(inFlight);
        caughtTs.set(inFlight, journaledTs(opts.dataDir, `big-tick-${inFlight}`));
      }
      current = await start(opts);
      await waitFor(() => prod.acked > inFlight + 2, 30_000, 'posts taken after the restart');
    }
    await prod.stop();
    const why = JSON.stringify({ notes, failures: prod.failures });
    // The test means nothing unless the window was hit: a post journaled, its answer lost, re-posted.
    expect(hits.length, why).toBeGreaterThan(0);
    const c = await counted(current!, prod.acked);
    await sleep(300);
    const final = counterOf(await current!.client.listEmbots(), 'f1') as CounterContext & { seen: string[] };
    const seen = final.seen.map(Number);
    expect(seen.filter((s, i) => seen.indexOf(s) !== i), why).toEqual([]);
    expect(final.count, why).toBe(prod.acked);
    expect(c.lastSeq, why).toBe(prod.acked - 1);
    expect(final.outOfOrder, why).toBe(0);
    // The re-post of a caught post was answered as the repeat it is, with the ts journaled before the kill.
    for (const seq of hits) expect(answers.get(seq), why).toMatchObject({ id: `big-tick-${seq}`, ts: caughtTs.get(seq), duplicate: true });
  }, 300_000);
});
