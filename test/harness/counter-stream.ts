import type { EmbotInfo } from '../../core/control/control-api.ts';
import { ErrorCodes, isEmbotError } from '../../core/errors.ts';
import { sleep, type AgentProcess } from './agent-process.ts';

/** The `counter` fixture policy's context: how many TICKs it saw, the last `seq`, and how many came out of order. */
export interface CounterContext {
  count: number;
  lastSeq: number;
  outOfOrder: number;
  fired?: number;
}

/** The counter embot's context for VM `vm` in an agent's embot list. */
export function counterOf(embots: readonly EmbotInfo[], vm: string): CounterContext | undefined {
  return embots.find((e) => e.id === `counter/counter/vm:${vm}`)?.policies[0]?.context as CounterContext | undefined;
}

/** A sequence-numbered stream of posts, running until stopped; `acked` counts the sequence numbers taken. */
export interface SequencedPoster {
  readonly acked: number;
  /** The posts that failed, newest last (at most 50; a run of the same failure for one `seq` is one entry with its count): which `seq` and why. */
  readonly failures: readonly { readonly seq: number; readonly error: string; readonly times: number }[];
  stop(): Promise<void>;
}

/**
 * Calls `post(n)` for n = 0, 1, 2, … one at a time until stopped, moving on to n + 1 only when it
 * resolves true (taken) and calling again with the same n when it resolves false; `post` does its
 * own waiting before a retry.
 */
export function sequencedPoster(post: (seq: number, fail: (error: string) => void) => Promise<boolean>): SequencedPoster {
  let next = 0;
  let running = true;
  const failures: { seq: number; error: string; times: number }[] = [];
  const fail = (error: string): void => {
    const last = failures.at(-1);
    if (last?.seq === next && last.error === error) {
      last.times++;
      return;
    }
    failures.push({ seq: next, error, times: 1 });
    if (failures.length > 50) failures.shift();
  };
  const done = (async () => {
    while (running) if (await post(next, fail)) next++;
  })();
  return {
    get acked() {
      return next;
    },
    failures,
    async stop() {
      running = false;
      await done;
    },
  };
}

let producers = 0;

/**
 * Emits sequence-numbered TICKs for VM `vm` to whichever agent `target()` names, one at a time,
 * until stopped; a post that fails (or no agent to post to) is re-sent with the same `seq` and the
 * same event id. The id is what makes the re-post safe: a post whose answer was lost (the agent
 * SIGKILLed after journaling it) would otherwise be taken twice, once from the journal and once
 * re-posted. The agent answers a re-posted id it has taken as a success without taking it again
 * (README "Events: idempotent posts"). `acked` counts the posts the agent acknowledged.
 */
export function tickProducer(target: () => AgentProcess | undefined, vm: string, retryMs = 5): SequencedPoster {
  const run = `tick.${vm}.${process.pid.toString(36)}.${(producers++).toString(36)}`;
  return sequencedPoster(async (seq, fail) => {
    const agent = target();
    try {
      if (!agent) throw new Error('no agent to post to');
      await agent.client.emitEvent({ elementId: `vm:${vm}`, type: 'TICK', payload: { seq }, id: `${run}.${seq}` });
      return true;
    } catch (e) {
      if (isEmbotError(e, ErrorCodes.EVENT_DUPLICATE)) return true;
      fail(e instanceof Error ? e.message : String(e));
      await sleep(retryMs);
      return false;
    }
  });
}
