/**
 * Test-only fault injection, off unless the environment asks for it: with
 * `EMBOT_FAULT_KILL_AT=source:migratingVm` (a comma list of `role:phase`) the agent kills itself
 * with SIGKILL right after journaling that phase. The crash is real; only its timing is chosen,
 * which a test could not otherwise hit reliably.
 */
const points = new Set((process.env['EMBOT_FAULT_KILL_AT'] ?? '').split(',').map((s) => s.trim()).filter(Boolean));

export function faultPoint(point: string): void {
  if (points.has(point)) process.kill(process.pid, 'SIGKILL');
}

/**
 * Test-only: `EMBOT_FAULT_FORWARD_BACKOFF_MS=<ms>` pins the forwarding's pause before a batch the new
 * owner did not take is offered again (normally 100 ms doubling up to 2 s), so a test can have a
 * batch asleep in its back-off when the grace period ends, which it could not otherwise hit reliably.
 */
export function forwardBackOffFault(): { readonly retryMs: number; readonly retryMaxMs: number } | undefined {
  const ms = Number(process.env['EMBOT_FAULT_FORWARD_BACKOFF_MS']);
  return Number.isFinite(ms) && ms > 0 ? { retryMs: ms, retryMaxMs: ms } : undefined;
}
