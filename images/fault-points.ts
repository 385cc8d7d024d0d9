/**
 * Test-only fault injection for the block server, off unless the environment asks for it (like
 * core/mobility/fault-points.ts):
 * - `EMBOT_FAULT_BLOCK_KILL_AFTER=N`: the holder SIGKILLs itself when asked for blocks the
 *   (N+1)th time. The crash is real; only its timing (mid-build) is chosen.
 * - `EMBOT_FAULT_BLOCK_CORRUPT=1`: the holder flips a byte of the first block of every answer,
 *   after its own hash check: a corrupt block on the wire, which a real holder cannot be made to send.
 */
const killAfter = Number(process.env['EMBOT_FAULT_BLOCK_KILL_AFTER'] ?? 'NaN');
const corrupt = process.env['EMBOT_FAULT_BLOCK_CORRUPT'] === '1';
let served = 0;

export function blockServeFault(): void {
  if (Number.isInteger(killAfter) && served++ >= killAfter) process.kill(process.pid, 'SIGKILL');
}

export function corruptServedBlock(block: Buffer): Buffer {
  if (!corrupt) return block;
  const copy = Buffer.from(block);
  copy[0] = copy[0]! ^ 0xff;
  return copy;
}
