import { isEmbotError, ErrorCodes } from '../../core/errors.ts';
import { sleep } from './agent-process.ts';
import type { Cluster } from './cluster.ts';
import { sequencedPoster, type SequencedPoster } from './counter-stream.ts';

/**
 * Posts TICK seq=n with id `tick-n` for VM `vm` to whoever owns it as far as it knows: `a` first,
 * then the owner an ELEMENT_MOVED answer names. A failed post (the agent down, restarting) is
 * re-sent with the same id; a duplicate answer means the earlier post was taken. So an agent
 * killed between taking a post and answering it cannot make the stream count one event twice.
 */
export function ownerFollowingProducer(c: Cluster, vm: string): SequencedPoster {
  let owner = 'a';
  return sequencedPoster(async (seq) => {
    const agent = c.agents.get(owner);
    try {
      if (!agent) throw new Error('owner down');
      await agent.client.emitEvent({ elementId: `vm:${vm}`, type: 'TICK', payload: { seq }, id: `tick-${seq}` });
      return true;
    } catch (e) {
      if (isEmbotError(e, ErrorCodes.EVENT_DUPLICATE)) return true;
      if (isEmbotError(e, ErrorCodes.ELEMENT_MOVED)) owner = String((e as { details?: { owner?: unknown } }).details?.owner ?? owner);
      else await sleep(20);
      return false;
    }
  });
}
