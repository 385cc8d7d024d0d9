/**
 * A running VM's disks to a migration target without shared storage, as libvirt does it
 * (VIR_MIGRATE_NON_SHARED_INC): the target's incoming QEMU exports its disks over NBD, writable;
 * the source mirrors each disk into the export (`blockdev-mirror`), waits for BLOCK_JOB_READY
 * (from then on every guest write reaches both copies), migrates the memory, and at the switch,
 * with the VM paused, ends each job with `block-job-cancel`: after READY that is QEMU's "stop
 * mirroring, leave a consistent copy of the disk as it is now" (a `block-job-complete` would
 * instead pivot the source VM onto the remote copy, which is not what a migration wants).
 *
 * Sync mode: the target's disk is an overlay on the VM's base image, and the base is built there
 * from its cheapest holders first (images/, issue 14). So the source mirrors with sync `top`: only
 * the blocks in the VM's own overlay (what it changed) cross, never the base's. With a raw disk
 * and no backing file, `top` is the whole disk, which is correct but moves everything.
 *
 * With the cluster's TLS the NBD link uses the same `tls-creds-x509` object as the migration
 * stream (migration-tls.ts creates it, id given here): the target's server as `endpoint: server`,
 * the source's client as `endpoint: client`.
 */
import { createServer } from 'node:net';
import { EffectorError, ErrorCodes, describeError } from '../../../core/errors.ts';
import type { QmpClient, QmpEvent } from './qmp-client.ts';

/** What the source mirrors: the backend (`virtio0`, `ide0-hd0`) and the export it goes to. */
export interface MirroredDisk {
  readonly device: string;
  readonly exportName: string;
}

/** The target's NBD export of its incoming disks, as the source must dial it. */
export interface DiskExport {
  readonly host: string;
  readonly port: number;
  readonly disks: readonly MirroredDisk[];
  readonly tlsCreds?: string;
}

export type MirrorSync = 'top' | 'full';

export interface DiskMirrorOptions {
  /** Default `top`: the target has the base image already (built from its holders). */
  readonly sync?: MirrorSync;
  /** How long the first copy may take before READY (default 300 s: TCG, loaded machines). */
  readonly readyTimeoutMs?: number;
  /** The source's TLS credentials object id, when the cluster uses TLS. */
  readonly tlsCreds?: string;
  /** With TLS: the name the target's certificate must carry (its agent name; QEMU would check the dialled address otherwise). */
  readonly tlsHostname?: string;
}

/** One disk's job as the source saw it end. */
export interface MirrorJobReport {
  readonly device: string;
  readonly job: string;
  /** Bytes the job copied (QEMU's `offset` at the end): the overlay's blocks and the writes during the move. */
  readonly bytes: number;
  readonly len: number;
}

const NBD_PREFIX = 'embot-mirror';
const qmpError = (message: string, cause?: unknown): EffectorError =>
  new EffectorError(ErrorCodes.QEMU_FAILED, cause === undefined ? message : `${message}: ${describeError(cause)}`, cause === undefined ? {} : { cause });

/** A port nobody listens on at `host` now (QEMU's nbd-server-start cannot report the port it bound). */
async function freePort(host: string): Promise<number> {
  const srv = createServer();
  await new Promise<void>((resolve, reject) => {
    srv.once('error', reject);
    srv.listen(0, host, () => resolve());
  });
  const port = (srv.address() as { port: number }).port;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

/** The node name QEMU gave a backend's root node (`-drive` without node-name gets `#blockNNN`). */
async function nodeNameOf(qmp: QmpClient, device: string): Promise<string> {
  const devices = (await qmp.executeRaw('query-block')) as readonly { device: string; inserted?: { 'node-name'?: string } }[];
  const node = devices.find((d) => d.device === device)?.inserted?.['node-name'];
  if (node === undefined) throw new EffectorError(ErrorCodes.QEMU_FAILED, `no block device ${device} in this QEMU (have: ${devices.map((d) => d.device).join(', ') || 'none'})`);
  return node;
}

/**
 * Target: starts QEMU's NBD server on `host` (a loopback or the peer listen address) and exports
 * each of `devices` writable, for the source's mirror. Call on the incoming QEMU before the
 * memory moves; {@link stopDiskExport} when the migration ends either way. Only an incoming QEMU
 * can: its disks are inactive until the switch, while a running VM's device keeps the write
 * permission to itself (QEMU refuses the export with a permission conflict).
 */
export async function exportDisks(
  qmp: QmpClient,
  o: { readonly host: string; readonly devices: readonly string[]; readonly tlsCreds?: string; readonly tlsAuthz?: string },
): Promise<DiskExport> {
  if (o.devices.length === 0) throw new EffectorError(ErrorCodes.VM_SPEC_INVALID, 'no disks to export');
  let port = 0;
  for (let attempt = 0; ; attempt++) {
    port = await freePort(o.host);
    try {
      await qmp.executeRaw('nbd-server-start', {
        addr: { type: 'inet', data: { host: o.host, port: String(port) } },
        ...(o.tlsCreds ? { 'tls-creds': o.tlsCreds } : {}),
        // The same authz-list as the migration stream's: only the source agent's certificate may write the disk.
        ...(o.tlsCreds && o.tlsAuthz ? { 'tls-authz': o.tlsAuthz } : {}),
      });
      break;
    } catch (e) {
      // The port was taken between our probe and QEMU's bind: another one.
      if (attempt >= 3 || !/in use|bind/i.test(describeError(e))) throw qmpError(`NBD server on ${o.host} not started`, e);
    }
  }
  const disks: MirroredDisk[] = [];
  try {
    for (const device of o.devices) {
      const exportName = `${NBD_PREFIX}-${device}`;
      await qmp.executeRaw('block-export-add', { type: 'nbd', id: exportName, 'node-name': await nodeNameOf(qmp, device), name: exportName, writable: true });
      disks.push({ device, exportName });
    }
  } catch (e) {
    await stopDiskExport(qmp, disks);
    throw qmpError(`disk export for the incoming VM failed`, e);
  }
  return { host: o.host, port, disks, ...(o.tlsCreds ? { tlsCreds: o.tlsCreds } : {}) };
}

/** Target: removes the exports and stops the NBD server (idempotent, never throws). */
export async function stopDiskExport(qmp: QmpClient, disks: readonly MirroredDisk[]): Promise<void> {
  for (const d of disks) await qmp.executeRaw('block-export-del', { id: d.exportName, mode: 'hard' }).catch(() => undefined);
  await qmp.executeRaw('nbd-server-stop').catch(() => undefined);
}

/** Waits for `name` events of `job` on `qmp`, or fails after `timeoutMs`. */
function jobEvent(qmp: QmpClient, job: string, names: readonly string[], timeoutMs: number): { readonly promise: Promise<QmpEvent>; readonly cancel: () => void } {
  let off = (): void => {};
  const promise = new Promise<QmpEvent>((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new EffectorError(ErrorCodes.QMP_TIMEOUT, `disk mirror ${job}: no ${names.join('/')} within ${timeoutMs} ms`));
    }, timeoutMs);
    const onEvent = (e: QmpEvent): void => {
      const data = e.data as { device?: string; id?: string; error?: string } | undefined;
      if ((data?.device ?? data?.id) !== job) return;
      if (e.event === 'BLOCK_JOB_ERROR' || (e.event === 'BLOCK_JOB_COMPLETED' && data?.error !== undefined && !names.includes('BLOCK_JOB_COMPLETED'))) {
        off();
        reject(new EffectorError(ErrorCodes.QEMU_FAILED, `disk mirror ${job} failed: ${data?.error ?? e.event}`));
        return;
      }
      if (names.includes(e.event)) {
        off();
        resolve(e);
      }
    };
    off = (): void => {
      clearTimeout(timer);
      qmp.events.off('event', onEvent);
    };
    qmp.events.on('event', onEvent);
  });
  return { promise, cancel: () => off() };
}

/**
 * Source: one mirror job per exported disk into the target's NBD export. Resolves once every job
 * is READY (each write of the guest now reaches the target too); end it with
 * {@link DiskMirror.finish} at the switch, or {@link DiskMirror.abort} on a roll-back.
 */
export async function startDiskMirror(qmp: QmpClient, target: DiskExport, o: DiskMirrorOptions = {}): Promise<DiskMirror> {
  const mirror = new DiskMirror(qmp);
  const waits: { readonly promise: Promise<QmpEvent>; readonly cancel: () => void }[] = [];
  try {
    const ready: Promise<QmpEvent>[] = [];
    for (const d of target.disks) {
      const job = `${NBD_PREFIX}-${d.device}`;
      const node = `${job}-target`;
      await qmp.executeRaw('blockdev-add', {
        driver: 'nbd',
        'node-name': node,
        server: { type: 'inet', host: target.host, port: String(target.port) },
        export: d.exportName,
        ...(o.tlsCreds ? { 'tls-creds': o.tlsCreds, ...(o.tlsHostname ? { 'tls-hostname': o.tlsHostname } : {}) } : {}),
      });
      mirror.nodes.push(node);
      const w = jobEvent(qmp, job, ['BLOCK_JOB_READY'], o.readyTimeoutMs ?? 300_000);
      // Before the job exists, so a READY that comes at once is not missed.
      ready.push(w.promise);
      waits.push(w);
      // Handled here too: when a later disk fails, this wait is cancelled below, and its timer must
      // not reject later with nobody listening (an unhandled rejection ends the agent).
      w.promise.catch(() => undefined);
      try {
        // write-blocking: a guest write completes only once the target has it too, so the copy
        // converges however fast the guest writes (libvirt's choice as well).
        await qmp.executeRaw('blockdev-mirror', { 'job-id': job, device: d.device, target: node, sync: o.sync ?? 'top', 'copy-mode': 'write-blocking' });
      } catch (e) {
        w.cancel();
        throw e;
      }
      mirror.jobs.push({ device: d.device, job });
    }
    await Promise.all(ready);
  } catch (e) {
    for (const w of waits) w.cancel();
    await mirror.abort();
    throw qmpError('disk mirror to the target did not get ready', e);
  }
  return mirror;
}

export class DiskMirror {
  readonly jobs: { readonly device: string; readonly job: string }[] = [];
  readonly nodes: string[] = [];
  private ended = false;

  constructor(private readonly qmp: QmpClient) {}

  /**
   * At the switch, the VM paused: each job cancelled after READY, which leaves the target's disk
   * a consistent copy of the source's as it is now; resolves with what each job copied.
   */
  async finish(timeoutMs = 60_000): Promise<readonly MirrorJobReport[]> {
    if (this.ended) throw new EffectorError(ErrorCodes.QEMU_FAILED, 'disk mirror already ended');
    this.ended = true;
    const reports: MirrorJobReport[] = [];
    try {
      for (const j of this.jobs) {
        const done = jobEvent(this.qmp, j.job, ['BLOCK_JOB_COMPLETED', 'BLOCK_JOB_CANCELLED'], timeoutMs);
        try {
          await this.qmp.executeRaw('block-job-cancel', { device: j.job });
        } catch (e) {
          done.cancel();
          throw e;
        }
        const e = await done.promise;
        const data = e.data as { offset?: number; len?: number; error?: string };
        if (data.error !== undefined) throw new EffectorError(ErrorCodes.QEMU_FAILED, `disk mirror ${j.job} ended with an error: ${data.error}`);
        reports.push({ device: j.device, job: j.job, bytes: data.offset ?? 0, len: data.len ?? 0 });
      }
    } finally {
      await this.dropNodes();
    }
    return reports;
  }

  /** A roll-back: the jobs cancelled (the source's disk was never touched), the NBD links dropped. */
  async abort(): Promise<void> {
    this.ended = true;
    for (const j of this.jobs) {
      const done = jobEvent(this.qmp, j.job, ['BLOCK_JOB_COMPLETED', 'BLOCK_JOB_CANCELLED'], 30_000);
      const sent = await this.qmp.executeRaw('block-job-cancel', { device: j.job, force: true }).then(
        () => true,
        () => false,
      );
      if (sent) await done.promise.catch(() => undefined);
      else done.cancel();
    }
    await this.dropNodes();
  }

  private async dropNodes(): Promise<void> {
    for (const n of this.nodes.splice(0)) await this.qmp.executeRaw('blockdev-del', { 'node-name': n }).catch(() => undefined);
  }
}
