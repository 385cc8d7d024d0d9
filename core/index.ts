/**
 * embot's public surface: start an agent, talk to one, and the types and error codes they use.
 * Internals (store, wire, mobility sides) are under `embot/internal`.
 *
 * @example
 * ```ts
 * import { startAgent, loadConfig, createLogger, ControlClient } from 'embot';
 * const agent = await startAgent(loadConfig({ flags: { control: { port: 0 } } }), createLogger({ level: 'info' }));
 * console.log(await new ControlClient(agent.controlUrl).status());
 * await agent.stop();
 * ```
 */
export { startAgent } from './agent.ts';
export type { AgentServices, RunningAgent } from './agent.ts';
export { loadConfig, AgentConfigSchema } from './config/config.ts';
export type { AgentConfig, AgentConfigInput, LoadConfigOptions } from './config/config.ts';
export { createLogger } from './logger.ts';
export type { Logger, LogLevel, LogFormat } from './logger.ts';
export { ControlClient } from './control/client.ts';
export type { AgentControl, AgentStatus, EmbotInfo, PluginInfo, PolicyInfo } from './control/control-api.ts';
export type { MigrationInfo, MigrationProgress, MigrationSummary } from './mobility/migration-record.ts';
export type { EmbotEvent, EmbotEventInput } from './events.ts';
export type { ManagedElement, ElementInput } from './objects/managed-element.ts';
export { ErrorCodes, EmbotError, isEmbotError } from './errors.ts';
// The fleet directory's contract; its implementations (static, etcd) are in embot/internal.
export type { DirectoryState, DirectoryStatus, PeerChange, PeerDirectory, PeerEntry, PeerSource, SelfAnnouncement } from './peers/peer-directory.ts';
export type { ErrorCode } from './errors.ts';
// The policy API for plugin authors: a plugin imports these from 'embot' and nothing else.
export { definePolicy, EMBOT_API_VERSION } from '../embots/index.ts';
export type { ModuleDefinition, ModuleEntry, ModuleKit, PolicyApi, PolicyDefinition, PolicyEvent, EffectOutcome } from '../embots/index.ts';
