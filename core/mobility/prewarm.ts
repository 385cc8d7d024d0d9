/**
 * One pre-warm (issue 13 point 3, README "Several destinations"): `embot prewarm VM --to b,c`
 * starts the fan-out with its copies held (PrewarmGate); `embot migrate VM [--to b]` is the
 * command: the destinations not named are terminated, the VM's events are held and its embots
 * frozen *now* (not at the pre-warm: until the command the VM's events are processed here), and
 * the gate lifts once the configured share of the named destinations meets the exit condition.
 */
import { ConfigError, ErrorCodes, ProtocolError } from '../errors.ts';
import { PrewarmGate, exitConditionMet, shareMet, type DriverMigrationProgress } from '../../effectors/index.ts';

/** One destination of a pre-warm, as `embot migrations` shows it. */
export interface PrewarmDestination {
  readonly name: string;
  /** warming: copying, held; selected: named by the command; dropped: not named, or its copy ended. */
  readonly status: 'warming' | 'selected' | 'dropped';
  readonly copiedBytes: number;
  readonly remainingBytes: number;
  readonly rateBytesPerSec: number;
  readonly dirtyRateBytesPerSec: number;
  readonly rounds: number;
  readonly exitConditionMet: boolean;
}

export interface PrewarmInfo {
  /** Epoch ms of the migrate command, null while warming. */
  readonly commandedAt: number | null;
  readonly downtimeLimitMs: number;
  readonly exitShare: number;
  readonly destinations: readonly PrewarmDestination[];
}

/**
 * @example
 * ```ts
 * const pw = new PrewarmControl(['b', 'c'], { downtimeLimitMs: 300, exitShare: 1 });
 * // the coordinator passes pw.gate to each copy and pw.record(dest, p) its progress
 * pw.command(['b']); // c is terminated, the hold starts, the gate lifts when b meets the exit condition
 * ```
 */
export class PrewarmControl {
  readonly gate = new PrewarmGate();
  private readonly progress = new Map<string, DriverMigrationProgress>();
  private readonly ended = new Set<string>();
  private selectedNames: readonly string[] | undefined;
  private commandedAtMs: number | undefined;
  private resolveCommand!: (selected: readonly string[]) => void;
  /** Settles with the destinations the command named. */
  readonly commanded: Promise<readonly string[]> = new Promise((r) => (this.resolveCommand = r));

  constructor(
    readonly destinations: readonly string[],
    private readonly o: { readonly downtimeLimitMs: number; readonly exitShare: number },
  ) {}

  record(dest: string, p: DriverMigrationProgress): void {
    this.progress.set(dest, p);
  }

  /** A destination's copy ended (failed, terminated): it no longer counts for the exit share. */
  end(dest: string): void {
    this.ended.add(dest);
  }

  get selected(): readonly string[] | undefined {
    return this.selectedNames;
  }

  /** When the command came (ms since the epoch); undefined before it. */
  get commandedAt(): number | undefined {
    return this.commandedAtMs;
  }

  /** Destinations still warming (their copy running): the ones a command may name. */
  warm(): readonly string[] {
    return this.destinations.filter((d) => !this.ended.has(d));
  }

  /**
   * The migrate command; `names` undefined: every destination still warming. A name not warming
   * (never a destination, or its copy ended) is DESTINATIONS_INVALID, problem `notWarmed`; a
   * second command is VM_BAD_STATE.
   */
  command(names: readonly string[] | undefined): readonly string[] {
    if (this.selectedNames !== undefined) throw new ProtocolError(ErrorCodes.VM_BAD_STATE, `the pre-warm already switches to ${this.selectedNames.join(', ')}`);
    const warm = this.warm();
    const chosen = names ?? warm;
    const cold = chosen.filter((n) => !warm.includes(n));
    if (cold.length > 0 || chosen.length === 0) {
      throw new ConfigError(ErrorCodes.DESTINATIONS_INVALID, `not warmed by this pre-warm: ${cold.join(', ') || '(none left)'}; warming: ${warm.join(', ') || 'none'}`, { details: { problem: 'notWarmed', names: [...cold] } });
    }
    this.selectedNames = [...chosen];
    this.commandedAtMs = Date.now();
    this.gate.command();
    this.resolveCommand(this.selectedNames);
    return this.selectedNames;
  }

  private met(dest: string): boolean {
    const p = this.progress.get(dest);
    return p !== undefined && exitConditionMet(p, this.o.downtimeLimitMs);
  }

  /** After the command: the share of the named destinations still copying meets the exit condition (or none is left). */
  readyToSwitch(): boolean {
    const running = (this.selectedNames ?? []).filter((d) => !this.ended.has(d));
    return running.length === 0 || shareMet(running.map((d) => this.met(d)), this.o.exitShare);
  }

  info(): PrewarmInfo {
    return {
      commandedAt: this.commandedAtMs ?? null,
      downtimeLimitMs: this.o.downtimeLimitMs,
      exitShare: this.o.exitShare,
      destinations: this.destinations.map((name): PrewarmDestination => {
        const p = this.progress.get(name);
        const status = this.ended.has(name) || (this.selectedNames !== undefined && !this.selectedNames.includes(name)) ? 'dropped' : this.selectedNames ? 'selected' : 'warming';
        return {
          name,
          status,
          copiedBytes: p?.transferredBytes ?? 0,
          remainingBytes: p?.remainingBytes ?? 0,
          rateBytesPerSec: Math.round(p?.rateBytesPerSec ?? 0),
          dirtyRateBytesPerSec: Math.round(p?.dirtyRateBytesPerSec ?? 0),
          rounds: p?.rounds ?? 0,
          exitConditionMet: this.met(name),
        };
      }),
    };
  }
}
