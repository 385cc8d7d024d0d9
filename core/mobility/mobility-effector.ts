import { EffectorError, ErrorCodes } from '../errors.ts';
import type { Effector } from '../../effectors/index.ts';
import type { MigrationSummary } from './migration-record.ts';

/** What the effector needs of the mobility service. */
export interface MigrationStarter {
  migrate(vm: string, to: string): { readonly id: string };
  wait(id: string): Promise<MigrationSummary | undefined>;
  peerNames(): readonly string[];
}

/**
 * Lets policies move VMs: `api.effect('mobility', 'migrate', { vm, to? })`. Without `to`, the
 * peers are tried in turn until one accepts and the move completes; the outcome event carries
 * the summary (EFFECT_DONE) or the reasons every peer gave (EFFECT_FAILED).
 *
 * @example
 * ```ts
 * api.effect('mobility', 'migrate', { vm: 'web-1' }, { tag: 'rebalance' });
 * ```
 */
export class MobilityEffector implements Effector {
  readonly name = 'mobility';
  readonly ops = ['migrate'] as const;

  constructor(private readonly mobility: MigrationStarter) {}

  async invoke(op: string, args: Readonly<Record<string, unknown>>): Promise<MigrationSummary> {
    if (op !== 'migrate') throw new EffectorError(ErrorCodes.EFFECTOR_OP_UNKNOWN, `mobility effector has no op '${op}'`);
    const vm = args['vm'];
    if (typeof vm !== 'string') throw new EffectorError(ErrorCodes.EFFECTOR_ARGS_INVALID, 'mobility.migrate needs { vm: string, to?: string }');
    const to = args['to'];
    const candidates = typeof to === 'string' ? [to] : [...this.mobility.peerNames()];
    if (!candidates.length) throw new EffectorError(ErrorCodes.EFFECTOR_FAILED, 'no peers configured to migrate to');
    const reasons: string[] = [];
    for (const peer of candidates) {
      const { id } = this.mobility.migrate(vm, peer);
      const summary = await this.mobility.wait(id);
      if (summary?.outcome === 'completed') return summary;
      reasons.push(`${peer}: ${summary?.outcome ?? 'unknown'}${summary?.reason ? ` (${summary.reason})` : ''}`);
    }
    throw new EffectorError(ErrorCodes.EFFECTOR_FAILED, `could not migrate ${vm}: ${reasons.join('; ')}`, { details: { vm, reasons } });
  }
}
