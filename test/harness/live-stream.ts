import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterEach } from 'vitest';
import type { LiveHub } from '../../core/control/live-hub.ts';

/** A page's end of the live stream: the text received so far. */
export interface LiveStreamReader {
  read(): string;
  abort(): void;
}

export interface HubServers {
  /** A real HTTP server on 127.0.0.1 whose every request becomes a client of `hub`; resolves with its port. */
  listen(hub: LiveHub): Promise<number>;
  /** {@link listen}, then one fetch of its stream, read to the end in the background. */
  stream(hub: LiveHub): Promise<LiveStreamReader>;
}

/**
 * Registers an `afterEach` (in the suite it is called from) that closes the server a test
 * listened on, cutting the streams still open on it.
 */
export function hubServersAfterEach(): HubServers {
  let server: Server | undefined;
  afterEach(async () => {
    await new Promise<void>((r) => (server ? server.close(() => r()) : r()));
    server?.closeAllConnections();
    server = undefined;
  });
  const listen = async (hub: LiveHub): Promise<number> => {
    server = createServer((_req, res) => void hub.attach(res));
    await new Promise<void>((r) => server!.listen(0, '127.0.0.1', () => r()));
    return (server.address() as AddressInfo).port;
  };
  const stream = async (hub: LiveHub): Promise<LiveStreamReader> => {
    const port = await listen(hub);
    let text = '';
    const abort = new AbortController();
    const res = await fetch(`http://127.0.0.1:${port}/`, { signal: abort.signal });
    void (async () => {
      for await (const chunk of res.body!) text += Buffer.from(chunk as Uint8Array).toString('utf8');
    })().catch(() => {});
    return { read: () => text, abort: () => abort.abort() };
  };
  return { listen, stream };
}

/** Polls `check` every 10 ms; throws after 5 s naming `what`. */
export async function until(check: () => boolean, what: string): Promise<void> {
  const started = Date.now();
  while (!check()) {
    if (Date.now() - started > 5000) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}
