/**
 * Every benchmark figure is a ratio against a limit measured in the same run, so the table means
 * the same thing on any machine. A bench module exports `run(): Promise<BenchTable>`.
 */
export interface BenchRow {
  readonly name: string;
  /** Measured rate or time of the system under test. */
  readonly value: number;
  readonly unit: string;
  /** The limit measured in the same run (raw emit loop, raw actor.send, raw insert...). */
  readonly limitName: string;
  readonly limit: number;
  /** value / limit for rates (higher is better), or limit / value for times; say which in `ratioNote`. */
  readonly ratio: number;
  /** Absolute target from the issue, e.g. '>= 1,000,000 ev/s'; with `met`. */
  readonly target?: string;
  readonly met?: boolean;
}

export interface BenchTable {
  readonly title: string;
  readonly rows: readonly BenchRow[];
  readonly notes?: readonly string[];
}

export function fmt(n: number): string {
  if (!Number.isFinite(n)) return String(n);
  if (Math.abs(n) >= 100) return Math.round(n).toLocaleString('en-US');
  return n.toFixed(n >= 10 ? 1 : 3);
}

export function renderTable(t: BenchTable): string {
  const head = ['benchmark', 'value', 'limit (same run)', 'ratio', 'target', 'met'];
  const body = t.rows.map((r) => [r.name, `${fmt(r.value)} ${r.unit}`, `${r.limitName}: ${fmt(r.limit)} ${r.unit}`, r.ratio.toFixed(3), r.target ?? '', r.met === undefined ? '' : r.met ? 'yes' : 'NO']);
  const lines = [`### ${t.title}`, '', `| ${head.join(' | ')} |`, `|${head.map(() => '---').join('|')}|`, ...body.map((c) => `| ${c.join(' | ')} |`)];
  if (t.notes?.length) lines.push('', ...t.notes.map((n) => `- ${n}`));
  return lines.join('\n');
}

/** Runs `fn` until at least `minMs` elapsed; returns operations per second. */
export function measureRate(opsPerCall: number, fn: () => void, minMs = 500): number {
  for (let i = 0; i < 3; i++) fn();
  let calls = 0;
  const start = process.hrtime.bigint();
  let elapsed = 0;
  while (elapsed < minMs) {
    fn();
    calls++;
    elapsed = Number(process.hrtime.bigint() - start) / 1e6;
  }
  return (calls * opsPerCall) / (elapsed / 1000);
}
