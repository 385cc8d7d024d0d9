/**
 * Block hashing off the main thread, for indexing. Hashing a slice of blocks in the agent's own
 * thread left the event loop with nothing else to do meanwhile (the read-ahead's completion, the
 * SQLite rows of the previous slice, the agent's other work all waited behind it), and indexing
 * ran at read + hash + insert rather than at the hash's pace. Here each slice goes to a worker
 * (its buffer transferred, not copied, and handed back for the next read), so reading, hashing
 * and the rows overlap, and two workers use a second core when there is one.
 *
 * The workers run plain JavaScript (eval), so they need no TypeScript loader, and are unref'd:
 * an idle pool never keeps a process alive.
 */
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { EmbotError, ErrorCodes } from '../core/errors.ts';
import { BLOCK_HASH_ALGORITHM, type BlockHash } from './block-hash.ts';

const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
parentPort.on('message', (m) => {
  const b = Buffer.from(m.buf, 0, m.len);
  const hashes = [];
  for (let o = 0; o < m.len; o += m.blockSize) hashes.push(createHash(m.algorithm).update(b.subarray(o, Math.min(o + m.blockSize, m.len))).digest('hex'));
  parentPort.postMessage({ id: m.id, buf: m.buf, hashes }, [m.buf]);
});
`;

interface Job {
  readonly resolve: (r: { readonly buf: ArrayBuffer; readonly hashes: BlockHash[] }) => void;
  readonly reject: (e: Error) => void;
}

interface PoolWorker {
  readonly worker: Worker;
  readonly jobs: Map<number, Job>;
}

/** Workers hashing slices of blocks; one pool per process, created on first use. */
export class HashPool {
  private readonly workers: PoolWorker[] = [];
  private next = 0;
  private seq = 0;

  constructor(readonly size = Math.max(1, Math.min(2, availableParallelism()))) {}

  /**
   * Hashes the first `len` bytes of `buf` in blocks of `blockSize`. `buf` is transferred to a
   * worker (detached here until the promise resolves) and comes back in the result.
   */
  hash(buf: ArrayBuffer, len: number, blockSize: number): Promise<{ readonly buf: ArrayBuffer; readonly hashes: BlockHash[] }> {
    const w = this.pick();
    const id = ++this.seq;
    return new Promise((resolve, reject) => {
      w.jobs.set(id, { resolve, reject });
      // Busy: keep the process alive until the answer (idle workers are unref'd).
      if (w.jobs.size === 1) w.worker.ref();
      w.worker.postMessage({ id, buf, len, blockSize, algorithm: BLOCK_HASH_ALGORITHM }, [buf]);
    });
  }

  async close(): Promise<void> {
    const all = this.workers.splice(0);
    await Promise.all(all.map((w) => w.worker.terminate()));
  }

  private pick(): PoolWorker {
    if (this.workers.length < this.size) return this.spawn();
    const w = this.workers[this.next++ % this.workers.length]!;
    return w;
  }

  private spawn(): PoolWorker {
    const worker = new Worker(WORKER_SOURCE, { eval: true });
    const w: PoolWorker = { worker, jobs: new Map() };
    worker.unref();
    worker.on('message', (m: { id: number; buf: ArrayBuffer; hashes: BlockHash[] }) => {
      const job = w.jobs.get(m.id);
      w.jobs.delete(m.id);
      if (w.jobs.size === 0) worker.unref();
      job?.resolve({ buf: m.buf, hashes: m.hashes });
    });
    const fail = (e: Error): void => {
      const i = this.workers.indexOf(w);
      if (i >= 0) this.workers.splice(i, 1);
      for (const job of w.jobs.values()) job.reject(new EmbotError(ErrorCodes.IMAGE_UNKNOWN, `a block hashing worker failed: ${e.message}`, { cause: e }));
      w.jobs.clear();
    };
    worker.on('error', fail);
    worker.on('exit', (code) => fail(new Error(`exited with code ${code}`)));
    this.workers.push(w);
    return w;
  }
}

let shared: HashPool | undefined;

/** The process's pool (workers start on the first hash). */
export function hashPool(): HashPool {
  return (shared ??= new HashPool());
}
