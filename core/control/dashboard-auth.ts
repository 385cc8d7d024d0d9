import type { IncomingMessage } from 'node:http';
import { TOKEN_COOKIE, TOKEN_PARAM } from './dashboard-api.ts';

/**
 * The control token a request presents: `Authorization: Bearer` (CLI, scripts), else the
 * dashboard's HttpOnly cookie (the page, its API calls and its EventSource, which cannot set
 * headers), else `?token=` on a GET of the page itself — the one way a person hands the token to
 * a browser; the page answers it with the cookie and a redirect to the URL without it.
 */
export function presentedToken(req: IncomingMessage): string | undefined {
  const header = req.headers.authorization;
  if (typeof header === 'string') {
    const m = /^Bearer\s+(.+)$/i.exec(header.trim());
    return m ? m[1]! : undefined;
  }
  const fromCookie = cookie(req.headers.cookie, TOKEN_COOKIE);
  if (fromCookie !== undefined) return fromCookie;
  if (req.method === 'GET' || req.method === 'HEAD') {
    const url = new URL(req.url ?? '/', 'http://control.invalid');
    if (isPagePath(url.pathname)) return url.searchParams.get(TOKEN_PARAM) ?? undefined;
  }
  return undefined;
}

/** The paths that serve the page (where `?token=` is taken and exchanged). */
export function isPagePath(pathname: string): boolean {
  return pathname === '/' || pathname === '/ui' || pathname === '/ui/' || pathname === '/ui/index.html';
}

/** Set-Cookie value that hands the token to the page: script cannot read it, other sites cannot send it. */
export function tokenCookie(token: string): string {
  return `${TOKEN_COOKIE}=${encodeURIComponent(token)}; HttpOnly; SameSite=Strict; Path=/`;
}

function cookie(header: string | undefined, name: string): string | undefined {
  if (!header) return undefined;
  for (const part of header.split(';')) {
    const eq = part.indexOf('=');
    if (eq < 0) continue;
    if (part.slice(0, eq).trim() !== name) continue;
    try {
      return decodeURIComponent(part.slice(eq + 1).trim());
    } catch {
      return undefined;
    }
  }
  return undefined;
}
