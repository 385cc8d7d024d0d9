import type { MigrationOutcome } from './mobility-contract.ts';
import type { MigrationRole } from './migration-journal.ts';

/** Live progress of a migration, for `embot migrate` and `embot migrations`. */
export interface MigrationProgress {
  readonly phase: string;
  /** Bytes sent (source) or received (target) so far: management state, events, memory. */
  readonly bytes: number;
  readonly memoryBytes: number;
  readonly memoryTotal: number;
  /** 0..100, by memory copied; 100 once completed. */
  readonly percent: number;
}

/** Time spent in one phase. */
export interface PhaseTime {
  readonly phase: string;
  readonly ms: number;
}

/** What a finished migration reports. */
export interface MigrationSummary {
  readonly migrationId: string;
  readonly vm: string;
  readonly from: string;
  readonly to: string;
  readonly outcome: MigrationOutcome;
  readonly reason?: string;
  readonly totalMs: number;
  readonly phases: readonly PhaseTime[];
  readonly embots: number;
  readonly events: number;
  readonly modules: readonly string[];
  readonly modulesShipped: number;
  readonly dirtyRounds: number;
  readonly bytes: number;
  readonly memoryBytes: number;
  /** From stopping the VM at the source to the target's acknowledgement (upper bound). */
  readonly downtimeMs: number | null;
  readonly forwarded: number;
}

/** One migration as listed by the control API. */
export interface MigrationInfo {
  readonly id: string;
  readonly role: MigrationRole;
  readonly vm: string;
  readonly peer: string;
  readonly phase: string;
  readonly outcome: MigrationOutcome | null;
  readonly reason?: string;
  readonly startedAt: number;
  readonly updatedAt: number;
  readonly progress?: MigrationProgress;
  readonly summary?: MigrationSummary;
}
