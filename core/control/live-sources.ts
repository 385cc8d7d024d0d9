import type { EmbotEvent } from '../events.ts';
import type { MigrationInfo, MigrationSummary } from './control-api.ts';
import type { LiveHub } from './live-hub.ts';

/** An emitter's `on`/`off` for one event name (eventemitter3 and node:events both fit). */
interface Source<Name extends string, Listener> {
  on(name: Name, listener: Listener): unknown;
  off(name: Name, listener: Listener): unknown;
}

/** The agent's event sources the live channel listens to. */
export interface LiveSources {
  readonly runtime: Source<'processed', (events: readonly EmbotEvent[]) => void> &
    Source<'embot-created' | 'embot-quarantined' | 'module-status', () => void>;
  readonly mobility: Source<'progress', (m: MigrationInfo) => void> & Source<'finished', (s: MigrationSummary) => void>;
  readonly vms: Source<'vm-state' | 'vm-removed', () => void>;
  /** The migration record after it finished (the summary alone lacks role and phase). */
  getMigration(id: string): MigrationInfo | undefined;
}

/**
 * Connects the agent's own events to the hub: nothing here polls. Returns the undo (agent stop).
 */
export function wireLiveSources(hub: LiveHub, s: LiveSources): () => void {
  const processed = (events: readonly EmbotEvent[]): void => hub.events(events);
  const embots = (): void => hub.changed('embots');
  const plugins = (): void => {
    hub.changed('plugins');
    hub.changed('cluster');
  };
  const quarantined = (): void => {
    hub.changed('embots');
    hub.changed('cluster');
  };
  const progress = (m: MigrationInfo): void => {
    hub.migration(m);
    // A pre-warm's state lives on its parent row (`<id>~<peer>` is one destination of `<id>`), which
    // has no progress of its own: each destination's reading re-sends the parent, coalesced by the hub.
    const at = m.role === 'source' && hub.size > 0 ? m.id.lastIndexOf('~') : -1;
    if (at <= 0) return;
    const parent = s.getMigration(m.id.slice(0, at));
    if (parent?.prewarm && parent.outcome === null) hub.migration(parent);
  };
  const finished = (summary: MigrationSummary): void => {
    if (hub.size === 0) return;
    const info = s.getMigration(summary.migrationId);
    if (info) hub.migration(info);
    hub.changed('cluster');
  };
  const vms = (): void => {
    hub.changed('vms');
    hub.changed('cluster');
  };
  s.runtime.on('processed', processed);
  s.runtime.on('embot-created', embots);
  s.runtime.on('embot-quarantined', quarantined);
  s.runtime.on('module-status', plugins);
  s.mobility.on('progress', progress);
  s.mobility.on('finished', finished);
  s.vms.on('vm-state', vms);
  s.vms.on('vm-removed', vms);
  return () => {
    s.runtime.off('processed', processed);
    s.runtime.off('embot-created', embots);
    s.runtime.off('embot-quarantined', quarantined);
    s.runtime.off('module-status', plugins);
    s.mobility.off('progress', progress);
    s.mobility.off('finished', finished);
    s.vms.off('vm-state', vms);
    s.vms.off('vm-removed', vms);
  };
}
