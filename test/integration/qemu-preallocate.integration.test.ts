import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { QemuDriver } from '../../effectors/hypervisor/qemu/qemu-driver.ts';
import { qemuArgs } from '../../effectors/hypervisor/qemu/qemu-process.ts';
import type { QemuVmSpec } from '../../effectors/hypervisor/qemu/vm-spec.ts';
import { cleanupsAfterEach } from '../harness/cleanups.ts';
import { qemuTestFile } from '../harness/qemu-processes.ts';

const MiB = 1024 * 1024;
const { run, qemus } = qemuTestFile();
const cleanups = cleanupsAfterEach();

const spec: QemuVmSpec = { name: 'pre-1', memory: 96 * MiB, vcpus: 1, testGuest: { passes: 1, halt: true } };

/** Resident memory of a process, bytes (/proc/<pid>/status VmRSS). */
function rss(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m?.[1] ?? 0) * 1024;
}

describe('incoming QEMU with its RAM faulted in at start (preallocate, or a pre-warm\'s target)', () => {
  it('the command line has -mem-prealloc only for an incoming QEMU that asks for it', () => {
    const base = { stateDir: '/tmp/x', spec, accel: 'tcg' as const };
    expect(qemuArgs({ ...base, incoming: true, preallocate: true })).toContain('-mem-prealloc');
    expect(qemuArgs({ ...base, incoming: true })).not.toContain('-mem-prealloc');
    // A VM that boots here is never preallocated by this option: it is about the incoming stream.
    expect(qemuArgs({ ...base, incoming: false, preallocate: true })).not.toContain('-mem-prealloc');
  });

  it.skipIf(!run)('a driver with preallocateIncoming starts its incoming QEMU with the guest RAM resident; without, it is not', async () => {
    const root = qemus.root();
    const resident: Record<string, number> = {};
    for (const preallocateIncoming of [true, false]) {
      const d = new QemuDriver({ root: join(root, String(preallocateIncoming)), accel: 'tcg', preallocateIncoming });
      cleanups.push(() => d.close());
      await d.prepareIncoming(spec);
      resident[String(preallocateIncoming)] = rss(d.pid('pre-1')!);
      await d.abortIncoming('pre-1');
    }
    expect(resident['true']).toBeGreaterThanOrEqual(spec.memory);
    expect(resident['false']).toBeLessThan(spec.memory / 2);
  }, 60_000);

  it.skipIf(!run)('a pre-warm\'s target (prepareIncoming with prewarm) has its guest RAM resident before the copy, a started QEMU and an adopted spare alike; a cold target has not', async () => {
    const root = qemus.root();
    const { name: _n, ...shape } = spec;
    const resident: Record<string, number> = {};
    for (const [label, spare, prewarm] of [['fresh', false, true], ['spare', true, true], ['cold', false, false]] as const) {
      const d = new QemuDriver({ root: join(root, label), accel: 'tcg', ...(spare ? { spareIncoming: shape } : {}) });
      cleanups.push(() => d.close());
      await d.prepareIncoming(spec, prewarm ? { prewarm: true } : {});
      resident[label] = rss(d.pid('pre-1')!);
      // Still an incoming VM waiting for its stream, as without the fault-in.
      expect((await d.qmp('pre-1')!.execute('query-status')).status, label).toBe('inmigrate');
      await d.abortIncoming('pre-1');
    }
    expect(resident['fresh']).toBeGreaterThanOrEqual(spec.memory);
    expect(resident['spare']).toBeGreaterThanOrEqual(spec.memory);
    expect(resident['cold']).toBeLessThan(spec.memory / 2);
  }, 90_000);
});
