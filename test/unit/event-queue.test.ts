import { describe, expect, it } from 'vitest';
import type { EmbotEvent } from '../../core/events.ts';
import { EventQueue } from '../../sensors/event-queue.ts';
import type { QueuedEvent } from '../../sensors/event-queue.ts';
import { prng } from '../harness/prng.ts';

function entry(seq: number, ts: number, elementId = 'vm:a'): QueuedEvent {
  const event: EmbotEvent = { id: `t.${seq}`, ts, elementId, type: 'T', payload: null };
  return { event, seq };
}

const byTsThenSeq = (a: QueuedEvent, b: QueuedEvent): number => a.event.ts - b.event.ts || a.seq - b.seq;

describe('EventQueue', () => {
  it('pops in (ts, arrival) order: push everything, pop everything equals a sort', () => {
    for (const seed of [1, 2, 3]) {
      const rnd = prng(seed);
      const q = new EventQueue();
      const all: QueuedEvent[] = [];
      for (let seq = 1; seq <= 5000; seq++) {
        const e = entry(seq, Math.floor(rnd() * 200)); // many ties: arrival must break them
        all.push(e);
        q.push(e);
      }
      const out: number[] = [];
      for (let e = q.pop(); e !== undefined; e = q.pop()) out.push(e.seq);
      expect(out).toEqual(all.sort(byTsThenSeq).map((e) => e.seq));
      expect(q.size).toBe(0);
    }
  });

  it('every pop is the minimum of what is queued under random interleavings of push and pop', () => {
    for (const seed of [11, 12, 13, 14]) {
      const rnd = prng(seed);
      const q = new EventQueue();
      const model: QueuedEvent[] = [];
      let seq = 0;
      let clock = 0;
      for (let step = 0; step < 6000; step++) {
        const r = rnd();
        if (r < 0.55) {
          clock += Math.floor(rnd() * 3);
          // mostly monotonic (the FIFO run), sometimes far in the past (the heap)
          const ts = rnd() < 0.8 ? clock : Math.floor(rnd() * (clock + 1));
          const e = entry(++seq, ts);
          q.push(e);
          model.push(e);
        } else {
          const got = q.pop();
          if (model.length === 0) {
            expect(got).toBeUndefined();
            continue;
          }
          model.sort(byTsThenSeq);
          const want = model.shift()!;
          expect(got?.seq).toBe(want.seq);
        }
        expect(q.size).toBe(model.length);
        if (model.length > 0 && step % 97 === 0) expect(q.peek()?.seq).toBe([...model].sort(byTsThenSeq)[0]!.seq);
      }
    }
  });

  it('keeps order when old entries (released hold queues) re-enter after newer ones', () => {
    const q = new EventQueue();
    for (let s = 10; s < 20; s++) q.push(entry(s, s * 10));
    for (let s = 1; s < 10; s++) q.push(entry(s, s * 10)); // lower seq and ts: released from a hold
    const out: number[] = [];
    for (let e = q.pop(); e !== undefined; e = q.pop()) out.push(e.seq);
    expect(out).toEqual(Array.from({ length: 19 }, (_, i) => i + 1));
  });

  it('extract removes exactly the matching entries and leaves the rest ordered', () => {
    const rnd = prng(7);
    const q = new EventQueue();
    const all: QueuedEvent[] = [];
    for (let seq = 1; seq <= 3000; seq++) {
      const e = entry(seq, Math.floor(rnd() * 500), `vm:e${seq % 5}`);
      all.push(e);
      q.push(e);
      if (seq % 700 === 0) q.pop() && all.sort(byTsThenSeq).shift();
    }
    const taken = q.extract((e) => e.elementId === 'vm:e3');
    const want = all.filter((e) => e.event.elementId === 'vm:e3');
    expect(taken.map((e) => e.seq).sort((a, b) => a - b)).toEqual(want.map((e) => e.seq).sort((a, b) => a - b));
    const rest: number[] = [];
    for (let e = q.pop(); e !== undefined; e = q.pop()) rest.push(e.seq);
    expect(rest).toEqual(all.filter((e) => e.event.elementId !== 'vm:e3').sort(byTsThenSeq).map((e) => e.seq));
  });

  it('survives long monotonic runs (compaction of the FIFO run) without losing entries', () => {
    const q = new EventQueue();
    let popped = 0;
    let next = 1;
    for (let round = 0; round < 8; round++) {
      for (let i = 0; i < 5000; i++) q.push(entry(next, next++));
      for (let i = 0; i < 4000; i++) expect(q.pop()!.seq).toBe(++popped);
    }
    while (q.size > 0) expect(q.pop()!.seq).toBe(++popped);
    expect(popped).toBe(next - 1);
  });
});
