import { readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { describe, expect, it } from 'vitest';
import { freeLoopbackPort } from '../../core/cli/free-port.ts';

const ephemeralStart = Number(readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]);

describe('freeLoopbackPort', () => {
  it('hands out distinct ports below the ephemeral range that an agent can then listen on', async () => {
    const ports = await Promise.all(Array.from({ length: 20 }, () => freeLoopbackPort()));
    expect(new Set(ports).size).toBe(20);
    for (const p of ports) {
      expect(p).toBeGreaterThanOrEqual(20000);
      if (ephemeralStart > 21000) expect(p).toBeLessThan(ephemeralStart);
    }
    // Each one binds, as the agent will.
    for (const p of ports.slice(0, 5)) {
      const s = createServer();
      await new Promise<void>((resolve, reject) => (s.once('error', reject), s.listen(p, '127.0.0.1', () => resolve())));
      await new Promise<void>((r) => s.close(() => r()));
    }
  });

  it('skips a port something already listens on, and one it handed out before', async () => {
    const top = Math.min(ephemeralStart, 32768);
    const at = (port: number): number => (port - 20000 + 0.5) / (top - 20000);
    const listen = (port: number): Promise<ReturnType<typeof createServer> | undefined> =>
      new Promise((resolve) => {
        const s = createServer();
        s.once('error', () => resolve(undefined));
        s.listen(port, '127.0.0.1', () => resolve(s));
      });
    // Two neighbouring ports that are free now, the first of them then taken by a listener.
    let busy: ReturnType<typeof createServer> | undefined;
    let port = 0;
    for (let p = 24000; p < 25000 && busy === undefined; p += 2) {
      const a = await listen(p);
      const b = a && (await listen(p + 1));
      if (a && b) {
        await new Promise<void>((r) => b.close(() => r()));
        busy = a;
        port = p;
      } else a?.close();
    }
    expect(busy).toBeDefined();
    try {
      const proposals = [at(port), at(port + 1), at(port + 1), at(port + 2)];
      const random = (): number => proposals.shift() ?? Math.random();
      expect(await freeLoopbackPort({ random })).toBe(port + 1);
      // port + 1 again is refused as handed out; the next proposal comes back.
      expect(await freeLoopbackPort({ random })).not.toBe(port + 1);
    } finally {
      await new Promise<void>((r) => busy!.close(() => r()));
    }
  });
});
