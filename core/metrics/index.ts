export { AgentMetrics, reasonLabel, stateLabel } from './registry.ts';
export type { BlockFetchMetrics, DirectoryView, EmbotView, EventCounts, MetricsSources, MigrationEnd, MigrationRole, MigrationView, PluginView, UdpView } from './registry.ts';
