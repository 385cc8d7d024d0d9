import WebSocket from 'ws';
import { Packr } from 'msgpackr';
import { PROTOCOL_VERSION, computeProof, createNonce, decodeFrame, type Frame } from '../../core/wire/index.ts';

const rawPack = new Packr({ useRecords: false });

export interface Closed {
  readonly code: number;
  readonly reason: string;
}

/** What came back for one frame sent: a frame answering it, or the link closing first. */
export type Outcome = { readonly kind: 'frame'; readonly frame: Frame } | { readonly kind: 'closed'; readonly closed: Closed; readonly error: Frame | undefined };

/**
 * A hand-driven peer: authenticates with the cluster secret like an agent, then sends whatever it
 * is told, well-formed or not, and collects what the agent answers. For hostile-peer tests.
 */
export class RawPeer {
  readonly ws: WebSocket;
  readonly closed: Promise<Closed>;
  private readonly inbox: Frame[] = [];
  private waiters: ((f: Frame | undefined) => void)[] = [];
  private isClosed = false;

  constructor(url: string) {
    this.ws = new WebSocket(url, { perMessageDeflate: false });
    this.ws.on('error', () => {});
    this.ws.on('message', (data: Buffer) => {
      let f: Frame;
      try {
        f = decodeFrame(data);
      } catch {
        return;
      }
      const w = this.waiters.shift();
      if (w) w(f);
      else this.inbox.push(f);
    });
    this.closed = new Promise((resolve) =>
      this.ws.on('close', (code, reason) => {
        this.isClosed = true;
        for (const w of this.waiters.splice(0)) w(undefined);
        resolve({ code, reason: reason.toString() });
      }),
    );
  }

  static async connect(url: string, agent: string, secret: Uint8Array): Promise<RawPeer> {
    const p = new RawPeer(url);
    const reply = await p.authenticate(agent, secret);
    if (reply?.type !== 'AuthOk') throw new Error(`handshake as ${agent} failed: ${JSON.stringify(reply)}`);
    return p;
  }

  private opened(): Promise<void> {
    return new Promise((resolve, reject) => {
      if (this.ws.readyState === WebSocket.OPEN) return resolve();
      this.ws.once('open', () => resolve());
      this.ws.once('error', reject);
    });
  }

  /** The next frame, or undefined once the link is closed. */
  next(): Promise<Frame | undefined> {
    const f = this.inbox.shift();
    if (f) return Promise.resolve(f);
    if (this.isClosed) return Promise.resolve(undefined);
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  /** Sends any value msgpack-encoded (plain maps, no records), or raw bytes as they are. */
  send(value: unknown): void {
    this.ws.send(value instanceof Uint8Array ? value : rawPack.pack(value));
  }

  private async authenticate(agent: string, secret: Uint8Array): Promise<Frame | undefined> {
    await this.opened();
    const clientNonce = createNonce();
    this.send({ type: 'Hello', protocol: PROTOCOL_VERSION, agent, nonce: clientNonce });
    const challenge = await this.next();
    if (challenge?.type !== 'Challenge') throw new Error(`expected Challenge, got ${JSON.stringify(challenge)}`);
    const input = { clientNonce, serverNonce: challenge.nonce, clientAgent: agent, serverAgent: challenge.agent };
    this.send({ type: 'Auth', proof: computeProof(secret, 'client', input) });
    return this.next();
  }

  /**
   * Sends a frame (or raw bytes) and waits for the frame that answers `reqId` (by default the
   * frame's own), or for the link to close (then with the connection-level Error frame, if one came).
   */
  async request(frame: (Record<string, unknown> & { readonly reqId: number }) | Record<string, unknown> | Uint8Array, reqId: unknown = (frame as { reqId?: unknown }).reqId): Promise<Outcome> {
    this.send(frame);
    for (;;) {
      const f = await this.next();
      if (f === undefined) return { kind: 'closed', closed: await this.closed, error: this.inbox.find((x) => x.type === 'Error') };
      if ('replyTo' in f && f.replyTo === reqId) return { kind: 'frame', frame: f };
      if (f.type === 'Error' && f.replyTo === undefined) return { kind: 'closed', closed: await this.closed, error: f };
    }
  }

  /** Closes normally and waits until the agent saw it. */
  async close(): Promise<void> {
    if (!this.isClosed) this.ws.close(1000, 'done');
    await this.closed;
  }
}
