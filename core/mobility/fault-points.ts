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
