/**
 * The peer link over mutual TLS, in process with real sockets on 127.0.0.1: who is accepted,
 * who is refused and with which code, and that the listener keeps serving after each refusal.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createSecureContext } from 'node:tls';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import { createServer as createHttpsServer } from 'node:https';
import { connect as netConnect, type AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket, { WebSocketServer } from 'ws';
import { ConfigError, ErrorCodes, type EmbotError } from '../../core/errors.ts';
import { PROTOCOL_VERSION, PeerServer, computeProof, connectPeer, createNonce, decodeFrame, encodeFrame, type Frame, type PeerConnection } from '../../core/wire/index.ts';
import { clientTlsOptions, loadPeerTls, serverTlsOptions, type PeerTls } from '../../core/wire/peer-tls.ts';
import { reuseReceiveBuffer } from '../../core/wire/receive-buffer.ts';
import { makeTlsFixture, type TlsFixture } from '../harness/cluster-tls.ts';
import { thrown } from '../harness/expect-code.ts';

const SECRET = Buffer.from('peer-tls-unit-cluster-secret-01');

let root: string;
let ca1: TlsFixture;
let ca2: TlsFixture;
let tlsA: PeerTls;
let tlsB: PeerTls;
let tlsC: PeerTls;
/** A certificate for `a` from a CA the cluster does not trust. */
let foreignA: PeerTls;
/** A certificate for `b` from a CA the cluster does not trust. */
let foreignB: PeerTls;

beforeAll(async () => {
  root = mkdtempSync(join(tmpdir(), 'embot-peer-tls-'));
  ca1 = await makeTlsFixture(join(root, 'ca1'), ['a', 'b', 'c']);
  ca2 = await makeTlsFixture(join(root, 'ca2'), ['a', 'b']);
  tlsA = loadPeerTls(ca1.files('a'), 'a');
  tlsB = loadPeerTls(ca1.files('b'), 'b');
  tlsC = loadPeerTls(ca1.files('c'), 'c');
  // The foreign certificates are used with the cluster's CA as trust anchor, as an intruder would.
  foreignA = withCa(ca2.files('a'), 'a', ca1.files('a').ca);
  foreignB = withCa(ca2.files('b'), 'b', ca1.files('b').ca);
});
afterAll(() => rmSync(root, { recursive: true, force: true }));

/** Loads `files` checked against their own CA, then swaps the trust anchor to `caFile`. */
function withCa(files: { ca: string; cert: string; key: string }, name: string, caFile: string): PeerTls {
  const own = loadPeerTls(files, name);
  // Swapped by hand: loadPeerTls itself refuses a certificate the configured CA did not sign.
  const ca = readFileSync(caFile);
  return { ...own, ca, clientContext: createSecureContext({ ca, cert: own.cert, key: own.key, minVersion: 'TLSv1.3' }) };
}

async function server(tls: PeerTls, agent: string, secret?: Uint8Array): Promise<{ server: PeerServer; refused: EmbotError[]; conns: PeerConnection[] }> {
  const s = await PeerServer.listen({ agent, tls, ...(secret ? { secret } : {}), listen: '127.0.0.1:0', handshakeTimeoutMs: 2000 });
  const refused: EmbotError[] = [];
  const conns: PeerConnection[] = [];
  s.on('refused', (e) => refused.push(e));
  s.on('connection', (c) => conns.push(c));
  return { server: s, refused, conns };
}

async function codeOf(p: Promise<unknown>): Promise<string | undefined> {
  try {
    const c = (await p) as PeerConnection;
    await c.close();
    return undefined;
  } catch (e) {
    return (e as EmbotError).code;
  }
}

async function until(check: () => boolean, ms = 3000): Promise<void> {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** The listener still serves a legitimate peer. */
async function stillServes(url: string, secret?: Uint8Array): Promise<void> {
  const conn = await connectPeer({ url, agent: 'a', tls: tlsA, expectedPeer: 'b', ...(secret ? { secret } : {}) });
  expect(await conn.ping()).toBeGreaterThanOrEqual(0);
  await conn.close();
}

describe('peer link over mutual TLS', () => {
  it('connects two agents whose certificates the cluster CA signed, without a cluster secret', async () => {
    const { server: s, conns } = await server(tlsB, 'b');
    try {
      expect(s.url).toMatch(/^wss:\/\/127\.0\.0\.1:\d+\/$/);
      const conn = await connectPeer({ url: s.url, agent: 'a', tls: tlsA, expectedPeer: 'b' });
      expect(conn.remoteAgent).toBe('b');
      expect(await conn.ping()).toBeGreaterThanOrEqual(0);
      await until(() => conns.length === 1);
      expect(conns[0]!.remoteAgent).toBe('a');
      await conn.close();
    } finally {
      await s.close();
    }
  });

  it('keeps the cluster secret as a second factor: valid certificates and a wrong secret are refused', async () => {
    const { server: s, refused } = await server(tlsB, 'b', SECRET);
    try {
      expect(await codeOf(connectPeer({ url: s.url, agent: 'a', tls: tlsA, secret: Buffer.from('another-cluster-secret-000000') }))).toBe(ErrorCodes.PEER_UNAUTHENTICATED);
      await until(() => refused.length === 1);
      await stillServes(s.url, SECRET);
    } finally {
      await s.close();
    }
  });

  it('binds the proofs to the TLS session: a proof made with the right secret but without the session is refused', async () => {
    const { server: s, refused } = await server(tlsB, 'b', SECRET);
    try {
      // A hand-driven client with a valid certificate that plays the handshake as a plain ws link would.
      const ws = new WebSocket(s.url, { perMessageDeflate: false, ...clientTlsOptions(tlsA) });
      const frames: Frame[] = [];
      let wake: (() => void) | undefined;
      ws.on('message', (d: Buffer) => {
        frames.push(decodeFrame(d));
        wake?.();
      });
      const next = async (): Promise<Frame> => {
        while (frames.length === 0) await new Promise<void>((r) => (wake = r));
        return frames.shift()!;
      };
      await new Promise<void>((r, j) => (ws.once('open', () => r()), ws.once('error', j)));
      const clientNonce = createNonce();
      ws.send(encodeFrame({ type: 'Hello', protocol: PROTOCOL_VERSION, agent: 'a', nonce: clientNonce }));
      const challenge = await next();
      if (challenge.type !== 'Challenge') throw new Error(`expected Challenge, got ${challenge.type}`);
      ws.send(encodeFrame({ type: 'Auth', proof: computeProof(SECRET, 'client', { clientNonce, serverNonce: challenge.nonce, clientAgent: 'a', serverAgent: 'b' }) }));
      const answer = await next();
      expect(answer.type === 'Error' ? answer.code : answer.type).toBe(ErrorCodes.PEER_UNAUTHENTICATED);
      ws.terminate();
      await until(() => refused.length === 1);
      await stillServes(s.url, SECRET);
    } finally {
      await s.close();
    }
  });

  it('refuses a client whose certificate another CA signed, on both sides with PEER_CERT_UNTRUSTED', async () => {
    const { server: s, refused, conns } = await server(tlsB, 'b');
    try {
      expect(await codeOf(connectPeer({ url: s.url, agent: 'a', tls: foreignA, expectedPeer: 'b' }))).toBe(ErrorCodes.PEER_CERT_UNTRUSTED);
      await until(() => refused.length === 1);
      expect(refused[0]!.code).toBe(ErrorCodes.PEER_CERT_UNTRUSTED);
      expect(conns).toHaveLength(0);
      await stillServes(s.url);
    } finally {
      await s.close();
    }
  });

  it('refuses a valid certificate used to claim another agent name (PEER_CERT_NAME_MISMATCH)', async () => {
    const { server: s, refused, conns } = await server(tlsB, 'b');
    try {
      // c's certificate, claiming to be a.
      expect(await codeOf(connectPeer({ url: s.url, agent: 'a', tls: tlsC, expectedPeer: 'b' }))).toBe(ErrorCodes.PEER_CERT_NAME_MISMATCH);
      await until(() => refused.length === 1);
      expect(refused[0]!.code).toBe(ErrorCodes.PEER_CERT_NAME_MISMATCH);
      expect(refused[0]!.message).toContain('CN=c');
      expect(conns).toHaveLength(0);
      await stillServes(s.url);
    } finally {
      await s.close();
    }
  });

  it('a client refuses a server whose certificate another CA signed, or that names another agent', async () => {
    const foreign = await server(foreignB, 'b');
    const named = await server(tlsC, 'c');
    try {
      expect(await codeOf(connectPeer({ url: foreign.server.url, agent: 'a', tls: tlsA, expectedPeer: 'b' }))).toBe(ErrorCodes.PEER_CERT_UNTRUSTED);
      // Agent c at the URL configured for b: its certificate is fine, it is just not b.
      expect(await codeOf(connectPeer({ url: named.server.url, agent: 'a', tls: tlsA, expectedPeer: 'b' }))).toBe(ErrorCodes.PEER_UNKNOWN);
    } finally {
      await foreign.server.close();
      await named.server.close();
    }
  });

  it('a plain ws:// client reaches nothing on a TLS listener, which refuses it with PEER_TLS_FAILED and keeps serving', async () => {
    const { server: s, refused, conns } = await server(tlsB, 'b');
    try {
      const plainUrl = s.url.replace('wss:', 'ws:');
      const ws = new WebSocket(plainUrl, { perMessageDeflate: false, handshakeTimeout: 2000 });
      const outcome = await new Promise<string>((resolve) => {
        ws.on('open', () => resolve('open'));
        ws.on('error', (e) => resolve(`error: ${e.message}`));
      });
      expect(outcome).toMatch(/^error/);
      await until(() => refused.length === 1);
      expect(refused[0]!.code).toBe(ErrorCodes.PEER_TLS_FAILED);
      // A raw TCP client that sends nothing is cut off by the TLS handshake timeout, not held forever.
      const raw = netConnect(s.address.port, '127.0.0.1');
      await new Promise<void>((resolve) => raw.on('close', () => resolve()).on('error', () => {}));
      expect(conns).toHaveLength(0);
      await stillServes(s.url);
    } finally {
      await s.close();
    }
  });

  it('bounds the sockets in the TLS handshake: one more is dropped and refused, a legitimate peer gets in once they go', async () => {
    const s = await PeerServer.listen({ agent: 'b', tls: tlsB, listen: '127.0.0.1:0', handshakeTimeoutMs: 5000, maxPendingHandshakes: 2 });
    const refused: EmbotError[] = [];
    s.on('refused', (e) => refused.push(e));
    const raws = [netConnect(s.address.port, '127.0.0.1'), netConnect(s.address.port, '127.0.0.1')];
    try {
      await Promise.all(raws.map((r) => new Promise<void>((resolve) => r.once('connect', () => resolve()))));
      const third = netConnect(s.address.port, '127.0.0.1');
      third.on('error', () => {});
      await new Promise<void>((resolve) => third.once('close', () => resolve()));
      await until(() => refused.length === 1);
      expect(refused[0]!.code).toBe(ErrorCodes.PEER_UNAUTHENTICATED);
      expect(refused[0]!.message).toContain('TLS handshake');
      for (const r of raws) r.destroy();
      // Their slots free up once the server sees them close; until then a peer is turned away.
      for (let attempt = 0; ; attempt++) {
        try {
          await stillServes(s.url);
          break;
        } catch (e) {
          if (attempt >= 50) throw e;
          await new Promise((r) => setTimeout(r, 20));
        }
      }
    } finally {
      for (const r of raws) r.destroy();
      await s.close();
    }
  });

  it('close() drops sockets stalled in the TLS handshake instead of waiting for them', async () => {
    // A handshake timeout far beyond the test's own: close() must not wait for it.
    const s = await PeerServer.listen({ agent: 'b', tls: tlsB, listen: '127.0.0.1:0', handshakeTimeoutMs: 600_000 });
    const raw = netConnect(s.address.port, '127.0.0.1');
    raw.on('error', () => {});
    const rawClosed = new Promise<void>((resolve) => raw.once('close', () => resolve()));
    await new Promise<void>((resolve) => raw.once('connect', () => resolve()));
    await s.close();
    await rawClosed;
  });

  it('refuses to dial a ws:// URL with TLS configured, or a wss:// one without', async () => {
    expect(await codeOf(connectPeer({ url: 'ws://127.0.0.1:9/', agent: 'a', tls: tlsA }))).toBe(ErrorCodes.CONFIG_INVALID);
    expect(await codeOf(connectPeer({ url: 'wss://127.0.0.1:9/', agent: 'a', secret: SECRET }))).toBe(ErrorCodes.CONFIG_INVALID);
  });

  it('a TLS client reaching a plain listener fails with PEER_TLS_FAILED', async () => {
    const plain = await PeerServer.listen({ agent: 'b', secret: SECRET, listen: '127.0.0.1:0' });
    try {
      const url = plain.url.replace('ws:', 'wss:');
      expect(await codeOf(connectPeer({ url, agent: 'a', tls: tlsA, secret: SECRET }))).toBe(ErrorCodes.PEER_TLS_FAILED);
    } finally {
      await plain.close();
    }
  });
});

describe('loadPeerTls', () => {
  it('refuses a certificate another CA signed, one for another agent, a key of another certificate, and missing files', () => {
    const a = ca1.files('a');
    const foreign = ca2.files('a');
    let e = thrown(() => loadPeerTls({ ...foreign, ca: a.ca }, 'a'), ConfigError);
    expect(e.code).toBe(ErrorCodes.CONFIG_INVALID);
    expect(e.message).toContain('not signed by the cluster CA');
    e = thrown(() => loadPeerTls(a, 'b'), ConfigError);
    expect(e.code).toBe(ErrorCodes.CONFIG_INVALID);
    expect(e.message).toContain('not to this agent b');
    e = thrown(() => loadPeerTls({ ...a, key: ca1.files('b').key }, 'a'), ConfigError);
    expect(e.message).toContain('is not the key of');
    e = thrown(() => loadPeerTls({ ...a, ca: a.cert }, 'a'), ConfigError);
    expect(e.message).toContain('is not a CA certificate');
    e = thrown(() => loadPeerTls({ ...a, cert: join(root, 'nope.crt') }, 'a'), ConfigError);
    expect(e.code).toBe(ErrorCodes.CONFIG_NOT_FOUND);
    const garbage = join(root, 'garbage.pem');
    writeFileSync(garbage, 'not a certificate');
    e = thrown(() => loadPeerTls({ ...a, cert: garbage }, 'a'), ConfigError);
    expect(e.message).toContain('is not a PEM certificate');
  });

  it('refuses a certificate that is not valid at the given time', () => {
    const later = new Date(Date.now() + 400 * 24 * 3600 * 1000);
    const e = thrown(() => loadPeerTls(ca1.files('a'), 'a', later), ConfigError);
    expect(e.message).toMatch(/valid from .* not now/);
  });
});

describe('reused receive buffers on a TLS socket', () => {
  it('read decrypted bytes into the reused buffer, and large messages arrive intact', async () => {
    const https = createHttpsServer(serverTlsOptions(tlsB, 2000));
    const wss = new WebSocketServer({ server: https, perMessageDeflate: false, maxPayload: 8 * 1024 * 1024 });
    await new Promise<void>((r) => https.listen(0, '127.0.0.1', () => r()));
    const port = (https.address() as AddressInfo).port;
    const messages = Array.from({ length: 12 }, (_, i) => randomBytes(i % 3 === 0 ? 1024 * 1024 : 100_000 + i * 7919));
    try {
      const got: string[] = [];
      let reads: boolean | undefined;
      const done = new Promise<void>((resolve) => {
        wss.on('connection', (ws) => {
          reads = reuseReceiveBuffer(ws)?.readsIntoReusedBuffer;
          ws.on('message', (data: Buffer) => {
            // Hashed synchronously: the view is valid during this call only.
            got.push(createHash('sha256').update(data).digest('hex'));
            if (got.length === messages.length) resolve();
          });
        });
      });
      const client = new WebSocket(`wss://127.0.0.1:${port}/`, { perMessageDeflate: false, ...clientTlsOptions(tlsA) });
      await new Promise<void>((r, j) => (client.once('open', () => r()), client.once('error', j)));
      for (const m of messages) client.send(m, { binary: true });
      await done;
      client.terminate();
      expect(reads).toBe(true);
      expect(got).toEqual(messages.map((m) => createHash('sha256').update(m).digest('hex')));
    } finally {
      for (const ws of wss.clients) ws.terminate();
      await new Promise<void>((r) => wss.close(() => r()));
      https.closeAllConnections();
      await new Promise<void>((r) => https.close(() => r()));
    }
  });
});
