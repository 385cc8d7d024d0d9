import type { CancelResponse, TargetChoice } from '../../core/control/dashboard-api.ts';

/** A failed call, with the control API's error code when it sent one. */
export class ApiError extends Error {
  constructor(readonly code: string, message: string) {
    super(message);
  }
}

/** Same-origin calls: the HttpOnly cookie carries the token, the page never sees it. */
async function call<T>(method: 'GET' | 'POST', path: string, body?: unknown): Promise<T> {
  const res = await fetch(path, {
    method,
    credentials: 'same-origin',
    headers: body === undefined && method === 'GET' ? {} : { 'Content-Type': 'application/json' },
    ...(method === 'POST' ? { body: JSON.stringify(body ?? {}) } : {}),
  });
  const text = await res.text();
  let parsed: unknown;
  try {
    parsed = text === '' ? undefined : JSON.parse(text);
  } catch {
    throw new ApiError('EMBOT_ERR_CONTROL_INTERNAL', `${res.status}: not JSON`);
  }
  if (!res.ok) {
    const err = (parsed as { error?: { code?: string; message?: string } } | undefined)?.error;
    throw new ApiError(err?.code ?? `HTTP_${res.status}`, err?.message ?? `HTTP ${res.status}`);
  }
  return parsed as T;
}

export function targets(vm: string): Promise<readonly TargetChoice[]> {
  return call('GET', `/ui/api/targets?vm=${encodeURIComponent(vm)}`);
}

/** One destination, or several (first to boot wins, issue 13). */
export function startMigration(vm: string, to: readonly string[]): Promise<{ readonly id: string }> {
  return call('POST', '/v1/migrations', { vm, to: to.length === 1 ? to[0] : to });
}

export function cancelMigration(id: string): Promise<CancelResponse> {
  return call('POST', `/ui/api/migrations/${encodeURIComponent(id)}/cancel`, {});
}

/** Starts copying a VM to its destinations, held until the switch (`embot prewarm`). */
export function startPrewarm(vm: string, to: readonly string[]): Promise<{ readonly id: string }> {
  return call('POST', '/v1/prewarms', { vm, to });
}

/** A pre-warm's command: every warmed destination when `to` is undefined, else those named. */
export function switchPrewarm(vm: string, to: readonly string[] | undefined): Promise<{ readonly id: string }> {
  return call('POST', '/v1/migrations', to === undefined ? { vm } : { vm, to: to.length === 1 ? to[0] : to });
}

export function cancelPrewarm(vm: string): Promise<{ readonly id: string }> {
  return call('POST', '/v1/prewarms/cancel', { vm });
}
