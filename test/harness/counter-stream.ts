import type { EmbotInfo } from '../../core/control/control-api.ts';
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
  stop(): Promise<void>;
}

/**
 * Calls `post(n)` for n = 0, 1, 2, … one at a time until stopped, moving on to n + 1 only when it
 * resolves true (taken) and calling again with the same n when it resolves false; `post` does its
 * own waiting before a retry.
 */
export function sequencedPoster(post: (seq: number) => Promise<boolean>): SequencedPoster {
  let next = 0;
  let running = true;
  const done = (async () => {
    while (running) if (await post(next)) next++;
  })();
  return {
    get acked() {
      return next;
    },
    async stop() {
      running = false;
      await done;
    },
  };
}

/**
 * Emits sequence-numbered TICKs for VM `vm` to whichever agent `target()` names, one at a time,
 * until stopped; a post that fails (or no agent to post to) is re-sent with the same `seq`.
 * `acked` counts the posts the agent acknowledged.
 */
export function tickProducer(target: () => AgentProcess | undefined, vm: string, retryMs = 5): SequencedPoster {
  return sequencedPoster(async (seq) => {
    const agent = target();
    try {
      if (!agent) throw new Error('no agent to post to');
      await agent.client.emitEvent({ elementId: `vm:${vm}`, type: 'TICK', payload: { seq } });
      return true;
    } catch {
      await sleep(retryMs);
      return false;
    }
  });
}
