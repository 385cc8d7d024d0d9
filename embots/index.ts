/** Public surface of the embots folder: the policy API for plugin authors and the runtime. */
export { definePolicy, EMBOT_API_VERSION } from './policy-api.ts';
export type { EffectOutcome, ModuleDefinition, ModuleEntry, ModuleKit, PolicyApi, PolicyDefinition, PolicyEvent } from './policy-api.ts';
export { EmbotRuntime } from './embot-runtime.ts';
export type { AttachableElement, EmbotInfo, EmbotRuntimeOptions, ExportedEmbot, PolicyView, RuntimeEvents, RuntimeModule } from './embot-runtime.ts';
export type { DeadLetter, EmbotStatus } from './embot-store.ts';
export { activePaths } from './policy-chart.ts';
export type { ChartNode, ChartTransition, PolicyChart } from './policy-chart.ts';
export type { PersistedTimer, PolicyState } from './worker/worker-protocol.ts';
