/**
 * The parent's side of a benchmark target that runs in a child process (its own event loop, as a
 * target agent has): fork under tsx, ask over IPC and wait for the typed answer, stop it.
 * The child answers every message with one of its own, `failed` carrying an error.
 *
 * @example
 * ```ts
 * const t = await forkTarget<ToTarget, FromTarget>(THIS_FILE, [], 'dataplane bench');
 * const ready = await t.next();                       // the child's first message
 * const { ms } = await t.ask({ type: 'cpu' }, 'cpu');
 * await t.close({ type: 'exit' });
 * ```
 */
import { fork } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const REPO = fileURLToPath(new URL('..', import.meta.url));

type Message = { readonly type: string };
type Failed = { readonly type: 'failed'; readonly error: string };

export interface ChildTarget<To extends Message, From extends Message> {
  /** The child's next message; rejects on `failed` or when it exits first. */
  next(): Promise<Exclude<From, Failed>>;
  /** Sends `m` and waits for an answer of type `want`. */
  ask<T extends From['type']>(m: To, want: T): Promise<Extract<From, { type: T }>>;
  /** Sends `exit`, SIGKILLs the child if it has not gone within 2 s. */
  close(exit: To): Promise<void>;
}

export function forkTarget<To extends Message, From extends Message>(file: string, args: readonly string[], label: string): ChildTarget<To, From> {
  const child = fork(file, [...args], { cwd: REPO, execArgv: ['--import', 'tsx'], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const next = (): Promise<Exclude<From, Failed>> =>
    new Promise((res, rej) => {
      const onExit = (code: number | null): void => rej(new Error(`${label}: target process exited (${code}) before answering`));
      child.once('exit', onExit);
      child.once('message', (m: From | Failed) => {
        child.off('exit', onExit);
        if (m.type === 'failed') rej(new Error(`${label}: target failed: ${(m as Failed).error}`));
        else res(m as Exclude<From, Failed>);
      });
    });
  return {
    next,
    ask: async <T extends From['type']>(m: To, want: T): Promise<Extract<From, { type: T }>> => {
      const answer = next();
      child.send(m);
      const a: From = await answer;
      if (a.type !== want) throw new Error(`${label}: target answered ${a.type}, expected ${want}`);
      return a as Extract<From, { type: T }>;
    },
    close: async (exit) => {
      if (child.exitCode === null && child.signalCode === null) {
        child.send(exit);
        const timer = setTimeout(() => child.kill('SIGKILL'), 2000);
        await exited;
        clearTimeout(timer);
      }
    },
  };
}

/** The child's side of a failure: what goes back as `failed`. */
export function failure(e: unknown): Failed {
  return { type: 'failed', error: e instanceof Error ? (e.stack ?? e.message) : String(e) };
}
