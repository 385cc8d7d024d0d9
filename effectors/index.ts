/** Public surface of the effectors: the interface, the registry and the hypervisor drivers. */
export type { Effector } from './effector.ts';
export { EffectorRegistry, type InvokeHooks } from './effector-registry.ts';
export { MAX_ZERO_PAGE_COST } from './hypervisor/hypervisor-contract.ts';
export type {
  DataPaths,
  DriverEstimateHints,
  ColdMigration,
  FanOutMemory,
  FanOutSession,
  FaultInjection,
  HypervisorCapabilities,
  HypervisorDriver,
  HypervisorEvents,
  IncomingPages,
  LoadKnob,
  MemoryChecksum,
  MemoryDump,
  MigrateOutOptions,
  IncomingOptions,
  MigrateOutResult,
  MigrationEndpoint,
  MigrationPath,
  MigrationModel,
  MigrationPhase,
  MigrationProgress as DriverMigrationProgress,
  PageApplyResult,
  UdpServiceCapability,
  VmInfo,
  VmState,
  VmStateChange,
  VmStats,
} from './hypervisor/hypervisor-contract.ts';
export { unsupported } from './hypervisor/unsupported.ts';
export { PrewarmGate, exitConditionMet, shareMet, type PrewarmHold, type PrewarmProgress } from './hypervisor/prewarm-gate.ts';
export { createDriver, type DriverChoice, type DriverHandle, type VmCreateRequest } from './hypervisor/create-driver.ts';
export {
  SimDriver,
  SIM_DEFAULT_SPEC,
  type SimDriverOptions,
  type SimPages,
  type SimPersistedState,
  type SimVmInfo,
  type SimVmState,
  type SimVmStats,
  type VmSpec as SimVmSpec,
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
