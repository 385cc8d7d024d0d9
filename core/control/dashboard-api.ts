/**
 * What the dashboard's own routes (`/ui/api/*`) and its live channel (`/ui/live`) carry. The
 * front-end (dashboard/) imports these types, so server and page agree on one shape.
 */
import type { EmbotEvent } from '../events.ts';
import type { AgentStatus, EmbotInfo, MigrationInfo, PluginInfo, VmInfo } from './control-api.ts';
import type { PolicyChart } from '../../embots/index.ts';

export type { AgentStatus, EmbotEvent, EmbotInfo, MigrationInfo, PluginInfo, PolicyChart, VmInfo };

/** A configured peer as this agent sees it. */
export interface PeerView {
  readonly name: string;
  readonly url: string;
  /** Where this agent knows it from: its config, or the fleet directory on etcd. */
  readonly source: 'config' | 'etcd';
  /** Whether its peer port accepted a TCP connection at the last check (not whether it trusts us). */
  readonly reachable: boolean;
  /** ms since epoch of that check. */
  readonly checkedAt: number;
  /** Its health and load as it answered our `PeerStatus` over the authenticated peer link; absent when it did not. */
  readonly status?: PeerStatusView;
}

/** A peer's own health and load (its `PeerStatusReply`). */
export interface PeerStatusView {
  readonly uptimeMs: number;
  /** 0..1: its host's CPU load as it reports it. */
  readonly load: number;
  readonly vms: number;
  readonly embots: number;
  /** 'ok', or why not: quarantined embots, modules with errors, dead letters. */
  readonly health: { readonly ok: boolean; readonly problems: readonly string[] };
}

/** The cluster view: this agent, its health and load, and its peers. */
export interface ClusterView {
  readonly self: AgentStatus;
  /** 'ok', or why not: quarantined embots, modules with errors, dead letters. */
  readonly health: { readonly ok: boolean; readonly problems: readonly string[] };
  /** 0..1: the host's CPU load as its host sensor reports it. */
  readonly load: number;
  readonly peers: readonly PeerView[];
}

/**
 * A migration target the UI offers, best first. Today the order is the configured peers'
 * (reachable ones first); the placement ranking (block index, issue 14) plugs in through
 * `DashboardHost.rankTargets` and fills `score` and `why`.
 */
export interface TargetChoice {
  readonly name: string;
  readonly reachable: boolean;
  readonly score?: number;
  readonly why?: string;
  /** Which ranking ordered the list ('configured-order' until placement lands). */
  readonly rankedBy: string;
}

/** Everything a page needs to draw every view; sent first on each live connection. */
export interface DashboardSnapshot {
  readonly cluster: ClusterView;
  readonly vms: readonly VmInfo[];
  readonly embots: readonly EmbotInfo[];
  readonly plugins: readonly PluginInfo[];
  readonly migrations: readonly MigrationInfo[];
  readonly events: readonly EmbotEvent[];
  /** Statecharts by module, then policy (read from the machine definitions). */
  readonly charts: Readonly<Record<string, Readonly<Record<string, PolicyChart>>>>;
}

/** One message on the live channel (`event:` is `kind`, `data:` is this object as JSON). */
export type LiveMessage =
  | { readonly kind: 'snapshot'; readonly snapshot: DashboardSnapshot }
  | { readonly kind: 'events'; readonly events: readonly EmbotEvent[]; /** events of a burst left out (the client was sent the newest). */ readonly dropped: number }
  | { readonly kind: 'embots'; readonly embots: readonly EmbotInfo[] }
  | { readonly kind: 'plugins'; readonly plugins: readonly PluginInfo[]; readonly charts: DashboardSnapshot['charts'] }
  | { readonly kind: 'vms'; readonly vms: readonly VmInfo[] }
  | { readonly kind: 'cluster'; readonly cluster: ClusterView }
  | { readonly kind: 'migration'; readonly migration: MigrationInfo };

/** Body of `POST /ui/api/migrations/:id/cancel`'s answer. */
export interface CancelResponse {
  readonly id: string;
  readonly cancelled: boolean;
}

/** Query string parameter that carries the control token to the page once (exchanged for a cookie). */
export const TOKEN_PARAM = 'token';
/** HttpOnly cookie that carries the control token for the page, its API calls and the live channel. */
export const TOKEN_COOKIE = 'embot_token';
