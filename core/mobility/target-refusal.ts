/**
 * How the source words a step its target refused, so that a failure's reason says each thing once.
 * Both machines word a failed step `<step> failed: …` (source-machine.ts and target-machine.ts,
 * recordFailure), and the source's reason carries the target's: a boot the target refused read
 * `bootIncoming failed: … MigrationStateFailed: bootIncoming failed: …` (issue 13's by-hand run).
 */

/** The part of a target's reply the wording reads (MigrationStateFailed, or an unexpected reply). */
export interface TargetReply {
  readonly type: string;
  readonly reason?: string;
}

/**
 * `<what> refused by the target: <the target's words>`. `namedStep` is the source's step whose
 * failure this becomes: the source prefixes it, so a target's reason that starts with the same
 * step's failure loses that prefix. MigrationStateFailed goes unnamed when the target gave a
 * reason ("refused" says it); any other reply is named, as it is what the source did not expect.
 */
export function targetRefusal(what: string, reply: TargetReply, namedStep?: string): string {
  const prefix = namedStep === undefined ? undefined : `${namedStep} failed: `;
  const said = prefix !== undefined && reply.reason?.startsWith(prefix) === true ? reply.reason.slice(prefix.length) : reply.reason;
  if (said === undefined || said === '') return `${what} refused by the target: ${reply.type}`;
  return `${what} refused by the target: ${reply.type === 'MigrationStateFailed' ? '' : `${reply.type}: `}${said}`;
}
