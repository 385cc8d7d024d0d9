/**
 * Internal surface (nats.js style): the building blocks the agent is made of, for tests,
 * benchmarks and embedders who know what they are doing. No stability promise.
 */
export { Store } from './store/store.ts';
export { ServiceRegistry } from './registry.ts';
export { EventIdSource } from './events.ts';
export { ManagedObjectService } from './objects/object-service.ts';
export * from './errors.ts';
export * from './wire/index.ts';
export * from './plugins/index.ts';
export { MobilityService } from './mobility/mobility-service.ts';
export { MigrationJournal } from './mobility/migration-journal.ts';
export { createSourceMachine } from './mobility/source-machine.ts';
export { createTargetMachine } from './mobility/target-machine.ts';
export { PluginCache } from './mobility/plugin-cache.ts';
export { createTrustPolicy, generateSigningKeys, signModule, verifyModuleSignature } from './mobility/trust-policy.ts';
export { packModule, unpackModule, acceptModuleBundle } from './mobility/module-shipping.ts';
export { startControlServer } from './control/server.ts';
export { StaticPeerDirectory } from './peers/static-peer-directory.ts';
export { EtcdPeerDirectory, type EtcdPeerDirectoryOptions } from './peers/etcd-peer-directory.ts';
export { createPeerDirectory } from './peers/create-peer-directory.ts';
export { checkRecord, type DirectoryRecord } from './peers/directory-record.ts';
