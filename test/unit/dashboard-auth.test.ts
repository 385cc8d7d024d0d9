import type { IncomingMessage } from 'node:http';
import { describe, expect, it } from 'vitest';
import { isPagePath, presentedToken, tokenCookie } from '../../core/control/dashboard-auth.ts';

/** presentedToken reads only these three fields of a request. */
const req = (o: { method?: string; url?: string; headers?: Record<string, string> }): IncomingMessage => ({ method: o.method ?? 'GET', url: o.url ?? '/v1/status', headers: o.headers ?? {} }) as unknown as IncomingMessage;

describe('the token a request presents', () => {
  it('takes a Bearer header first, then the cookie, then ?token= on the page only', () => {
    expect(presentedToken(req({ headers: { authorization: 'Bearer abc', cookie: 'embot_token=def' } }))).toBe('abc');
    expect(presentedToken(req({ headers: { cookie: 'a=1; embot_token=d%20e%3Bf; b=2' } }))).toBe('d e;f');
    expect(presentedToken(req({ url: '/ui/?token=xyz' }))).toBe('xyz');
    expect(presentedToken(req({ url: '/?token=xyz' }))).toBe('xyz');
  });

  it('refuses what is not one: other schemes, bad encodings, ?token= off the page or on a POST', () => {
    expect(presentedToken(req({ headers: { authorization: 'Basic YTpi', cookie: 'embot_token=def' } }))).toBeUndefined();
    expect(presentedToken(req({ headers: { cookie: 'embot_token=%E0%A4%A' } }))).toBeUndefined();
    expect(presentedToken(req({ headers: { cookie: 'other=1; embot_tokenx=2' } }))).toBeUndefined();
    expect(presentedToken(req({ url: '/v1/status?token=xyz' }))).toBeUndefined();
    expect(presentedToken(req({ url: '/ui/live?token=xyz' }))).toBeUndefined();
    expect(presentedToken(req({ method: 'POST', url: '/ui/?token=xyz' }))).toBeUndefined();
    expect(presentedToken(req({}))).toBeUndefined();
  });

  it('hands the page an HttpOnly, same-site cookie with the token encoded', () => {
    expect(tokenCookie('a;b c')).toBe('embot_token=a%3Bb%20c; HttpOnly; SameSite=Strict; Path=/');
    expect(['/', '/ui', '/ui/', '/ui/index.html'].every(isPagePath)).toBe(true);
    expect(['/ui/live', '/ui/api/snapshot', '/v1/status', '/ui/assets/x.js'].some(isPagePath)).toBe(false);
  });
});
