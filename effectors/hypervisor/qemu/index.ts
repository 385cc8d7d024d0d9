/**
 * Public surface of the qemu driver (issue 12). The agent's driver factory imports this once the
 * async contract (../hypervisor-contract.ts) replaces the sync one; effectors/index.ts does not
 * export it yet, so nothing outside changes until then.
 */
export { QemuDriver, type QemuDriverOptions, type QemuPersistedState, type QemuMigrateOutOptions, type QemuIncomingOptions } from './qemu-driver.ts';
export { type QemuTlsFiles } from './migration-tls.ts';
export { validateQemuSpec, checkImage, type QemuVmSpec, type QemuDisk, type QemuNic, type DiskFormat } from './vm-spec.ts';
export { QmpClient, type QmpEvent, type QmpGreeting, type MigrationInfo, type MigrationStatus, type RunState } from './qmp-client.ts';
export { kvmUsable, type Accel } from './qemu-process.ts';
export { GUEST_IMAGE, GUEST_RANGE_START, checkGuestMemory, guestRangeEnd, writeGuestImage, type GuestSettings, type IntegrityResult } from './guest/guest-image.ts';
