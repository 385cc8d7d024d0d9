import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { main } from '../../core/cli/main.ts';
import { ErrorCodes } from '../../core/errors.ts';
import { Cluster } from '../harness/cluster.ts';
import { runCli, waitFor } from '../harness/agent-process.ts';
import type { ControlErrorBody } from '../../core/control/control-api.ts';

/**
 * `embot migrate VM --to …` against a real source agent with two real peers: what a destination
 * list may not be, answered with coded errors by the CLI (exit 2) and the control API (HTTP 400),
 * the source untouched and still serving; a single name (or a list of one) migrates as before.
 */
let cluster: Cluster;

beforeAll(async () => {
  cluster = await Cluster.start(['a', 'b', 'c'], { plugins: [{ from: 'shipped', name: 'vm-watchdog' }] });
  const a = cluster.agent('a');
  await a.client.createVm({ name: 'web', memory: 1 << 20 });
  await a.client.vmAction('web', 'start');
  await waitFor(async () => (await a.client.listEmbots()).some((e) => e.elementIds.includes('vm:web')), 10_000, 'watchdog of web on a');
}, 60_000);
afterAll(() => cluster.stop());

async function cli(args: readonly string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  let stdout = '';
  let stderr = '';
  const code = await main(['node', 'embot', ...args, '--agent', cluster.agent('a').url], {
    stdout: { write: (s: string) => (stdout += s) },
    stderr: { write: (s: string) => (stderr += s) },
    env: {},
  });
  return { code, stdout, stderr };
}

async function post(body: unknown): Promise<{ status: number; body: { error?: { code: string; message: string; details?: Record<string, unknown> }; id?: string } }> {
  const res = await fetch(`${cluster.agent('a').url}/v1/migrations`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
  return { status: res.status, body: (await res.json()) as never };
}

/** Nothing moved and nothing started: web runs on a with its watchdog, no migration on any agent. */
async function expectUntouched(): Promise<void> {
  const a = cluster.agent('a');
  expect((await a.client.listVms()).map((v) => `${v.name}:${v.state}`)).toEqual(['web:running']);
  expect((await a.client.listEmbots()).some((e) => e.elementIds.includes('vm:web'))).toBe(true);
  for (const n of ['a', 'b', 'c']) expect(await cluster.agent(n).client.listMigrations()).toEqual([]);
  for (const n of ['b', 'c']) expect(await cluster.agent(n).client.listVms()).toEqual([]);
}

describe('migrate --to: bad destination lists', () => {
  it.each([
    [['--to', 'a,b'], 'self', /a is this agent, the migration's source; it cannot also be a destination \[EMBOT_ERR_DESTINATIONS_INVALID\]/],
    [['--to', 'b,zz'], 'unknown', /no peer named 'zz'; known: b, c \[EMBOT_ERR_DESTINATIONS_INVALID\]/],
    [['--to', 'b,c,b'], 'duplicate', /destination b named more than once/],
    [['--to', ','], 'empty', /no destination given/],
  ])('embot migrate web %j exits 2 with the code (%s); the source keeps its VM and serves on', async (flags, _problem, message) => {
    const r = await cli(['migrate', 'web', ...flags]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(message);
    expect(r.stderr).toContain(ErrorCodes.DESTINATIONS_INVALID);
    expect(r.stdout).toBe('');
    await expectUntouched();
  });

  it.each([
    [{ vm: 'web', to: [] }, 'empty'],
    [{ vm: 'web', to: ['b', ''] }, 'blank'],
    [{ vm: 'web', to: ['b', 'b'] }, 'duplicate'],
    [{ vm: 'web', to: ['a'] }, 'self'],
    [{ vm: 'web', to: ['c', 'nope'] }, 'unknown'],
    // The CLI's "b,c" sent as one string: told to send a list (it was "no peer named 'b,c'").
    [{ vm: 'web', to: 'b,c' }, 'unknown'],
  ])('POST /v1/migrations %j: 400 DESTINATIONS_INVALID (%s)', async (body, problem) => {
    const r = await post(body);
    expect(r.status).toBe(400);
    expect(r.body.error?.code).toBe(ErrorCodes.DESTINATIONS_INVALID);
    expect(r.body.error?.details?.['problem']).toBe(problem);
    await expectUntouched();
  });

  it('"b,c" as one string over the API says to send a list', async () => {
    const r = await post({ vm: 'web', to: 'b,c' });
    expect(r.body.error?.message).toBe(`'b,c' is not a peer name: several destinations go as a list (["b", "c"])`);
    await expectUntouched();
  });

  it('a `to` that is neither a name nor a list of names is a bad request', async () => {
    for (const to of [7, [1, 2], { b: true }, null]) {
      const r = await post({ vm: 'web', to });
      expect(r.status).toBe(400);
      expect(r.body.error?.code).toBe(ErrorCodes.CONTROL_BAD_REQUEST);
    }
    await expectUntouched();
  });

  it('bad --retries / --fallback are refused before anything starts (CLI exit 2, API 400)', async () => {
    const overlap = await post({ vm: 'web', to: ['b', 'c'], fallback: ['c'] });
    expect(overlap.status).toBe(400);
    expect(overlap.body.error?.code).toBe(ErrorCodes.DESTINATIONS_INVALID);
    expect(overlap.body.error?.details?.['problem']).toBe('duplicate');
    const self = await post({ vm: 'web', to: ['b'], fallback: ['a'] });
    expect(self.body.error?.details?.['problem']).toBe('self');
    const many = await post({ vm: 'web', to: ['b', 'c'], retries: 9 });
    expect(many.status).toBe(400);
    expect(many.body.error?.code).toBe(ErrorCodes.CONTROL_BAD_REQUEST);
    for (const flags of [['--retries', '9'], ['--retries', '-1'], ['--retries', 'x'], ['--fallback', 'b,b'], ['--fallback', '']]) {
      const r = await cli(['migrate', 'web', '--to', 'b,c', ...flags]);
      expect(r.code, flags.join(' ')).toBe(2);
      expect(r.stdout).toBe('');
    }
    const unknown = await cli(['migrate', 'web', '--to', 'b', '--fallback', 'zz']);
    expect(unknown.code).toBe(2);
    expect(unknown.stderr).toContain(ErrorCodes.DESTINATIONS_INVALID);
    await expectUntouched();
  });

  it('a single unknown name keeps its old answer (PEER_UNKNOWN, exit 1)', async () => {
    const r = await cli(['migrate', 'web', '--to', 'zz']);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(ErrorCodes.PEER_UNKNOWN);
    await expectUntouched();
  });
});

describe('migrate with --json: a usage error is one JSON document (the real CLI, a child process)', () => {
  /** stderr is exactly one JSON document of the control API's error shape (no commander text, no help hint), stdout empty. */
  function errorOf(r: { readonly stdout: string; readonly stderr: string }): ControlErrorBody['error'] {
    expect(r.stdout).toBe('');
    const body = JSON.parse(r.stderr) as ControlErrorBody;
    expect(Object.keys(body)).toEqual(['error']);
    expect(Object.keys(body.error).filter((k) => !['code', 'message', 'details'].includes(k))).toEqual([]);
    expect(body.error.message).not.toMatch(/^error: |\[EMBOT_ERR_|run with --help/);
    return body.error;
  }
  const url = (): string[] => ['--agent', cluster.agent('a').url];

  it.each([
    // --to takes the next word as its value: the flag is the missing value, a usage error here, not an unknown peer at the agent.
    [['migrate', 'web', '--to', '--json'], ErrorCodes.CLI_USAGE, /argument '--json' is invalid\. expected PEER\[,PEER…\], got the flag '--json': the value is missing/],
    [['migrate', 'web', '--to', 'b', '--bogus', '--json'], ErrorCodes.CLI_USAGE, /^unknown option '--bogus'$/],
    [['migrate', 'web', '--json', '--to', 'b,c', '--retries', '9'], ErrorCodes.CLI_USAGE, /--retries must be a whole number from 0 to 5, got '9'$/],
    [['migrate', 'web', '--to', 'b,b', '--json'], ErrorCodes.DESTINATIONS_INVALID, /destination b named more than once$/],
    [['migrate', 'web', '--to', 'b', '--fallback', '--json'], ErrorCodes.CLI_USAGE, /got the flag '--json'/],
    [['migrate', '--json'], ErrorCodes.CLI_USAGE, /^missing required argument 'vm'$/],
  ])('embot %j: exit 2, stderr one {"error":{code,message}} (%s), stdout empty, nothing started', async (args, code, message) => {
    const r = await runCli([...args, ...url()]);
    expect(r.code).toBe(2);
    const e = errorOf(r);
    expect(e.code).toBe(code);
    expect(e.message).toMatch(message);
    await expectUntouched();
  });

  it("the agent's refusal with --json is its own error body (code, message, details), exit as without --json; without --json the text is as before", async () => {
    const r = await runCli(['migrate', 'web', '--to', 'b,zz', '--json', ...url()]);
    expect(r.code).toBe(2);
    const e = errorOf(r);
    expect(e).toMatchObject({ code: ErrorCodes.DESTINATIONS_INVALID, message: "no peer named 'zz'; known: b, c", details: { problem: 'unknown', names: ['zz'] } });
    const single = await runCli(['migrate', 'web', '--to', 'zz', '--json', ...url()]);
    expect(single.code).toBe(1);
    expect(errorOf(single).code).toBe(ErrorCodes.PEER_UNKNOWN);
    const text = await runCli(['migrate', 'web', '--to', '--bogus', ...url()]);
    expect(text.code).toBe(2);
    expect(text.stdout).toBe('');
    expect(text.stderr).toMatch(/^error: option '--to <peer>' argument '--bogus' is invalid\. .* \[EMBOT_ERR_CLI_USAGE\]\n\(run with --help for usage\)\n$/);
    await expectUntouched();
  });
});

describe('migrate --to: one destination as before', () => {
  it('a list of one over the API and a single name on the CLI each move the VM with its watchdog', async () => {
    const a = cluster.agent('a');
    const b = cluster.agent('b');
    const started = await post({ vm: 'web', to: ['b'] });
    expect(started.status).toBe(202);
    const info = await a.client.waitMigration(started.body.id!, { timeoutMs: 60_000 });
    expect(info.outcome).toBe('completed');
    expect(info.peer).toBe('b');
    expect((await b.client.listVms()).map((v) => `${v.name}:${v.state}`)).toEqual(['web:running']);
    expect(await a.client.listVms()).toEqual([]);

    // And back with the CLI's single-name form: the summary as today, exit 0.
    let stdout = '';
    const code = await main(['node', 'embot', 'migrate', 'web', '--to', 'a', '--agent', b.url], { stdout: { write: (s: string) => (stdout += s) }, stderr: { write: () => true }, env: {} });
    expect(code).toBe(0);
    expect(stdout).toMatch(/^outcome:\s+completed$/m);
    expect((await a.client.listVms()).map((v) => `${v.name}:${v.state}`)).toEqual(['web:running']);
    await waitFor(async () => (await a.client.listEmbots()).some((e) => e.elementIds.includes('vm:web')), 10_000, 'watchdog of web back on a');
  }, 120_000);
});
