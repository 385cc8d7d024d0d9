/** Public surface of the effectors: the interface, the registry and the hypervisor drivers. */
export type { Effector } from './effector.ts';
export { EffectorRegistry, type InvokeHooks } from './effector-registry.ts';
export type { DriverEvents, HypervisorDriver, VmInfo, VmSpec, VmState, VmStats } from './hypervisor/driver.ts';
export {
  SimDriver,
  SIM_DEFAULT_SPEC,
  type SimDriverOptions,
  type SimPages,
  type SimPersistedState,
  type SimVmStats,
} from './hypervisor/sim/sim-driver.ts';
export { HypervisorEffector, HYPERVISOR_OPS, type HypervisorOp } from './hypervisor/hypervisor-effector.ts';
export { SimUdpService, type SimUdpServiceOptions } from './hypervisor/sim/sim-udp-service.ts';
export {
  batchChecksum,
  DEFAULT_BATCH_BYTES,
  PageReceiver,
  preCopy,
  WINDOW_BATCHES,
  type ApplyResult,
  type DataPath,
  type PageReceiverOptions,
  type PreCopyResult,
} from './hypervisor/sim/dataplane/index.ts';
