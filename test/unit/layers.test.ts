import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { cruise, type ICruiseResult } from 'dependency-cruiser';
import extractDepcruiseOptions from 'dependency-cruiser/config-utl/extract-depcruise-options';
import extractTSConfig from 'dependency-cruiser/config-utl/extract-ts-config';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
/** What `npm run lint:deps` cruises. */
const FOLDERS = ['core', 'embots', 'sensors', 'effectors', 'images', 'plugins'];

/** One line per violation, as `depcruise` prints them: rule, from → to. */
function describeViolations(result: ICruiseResult): string[] {
  return (result.summary.violations ?? []).map((v) => `${v.rule.severity} ${v.rule.name}: ${v.from} → ${v.to}${v.cycle ? ` (cycle ${v.cycle.map((c) => c.name).join(' → ')})` : ''}`);
}

describe('layers (.dependency-cruiser.cjs)', () => {
  it('core, the feature folders and the plugins import one way only: zero violations', { timeout: 120_000 }, async () => {
    const options = await extractDepcruiseOptions(join(ROOT, '.dependency-cruiser.cjs'));
    const tsConfig = extractTSConfig(join(ROOT, 'tsconfig.json'));
    // baseDir: the rules match paths relative to the repository root, wherever vitest runs.
    const reported = await cruise(FOLDERS, { ...options, validate: true, baseDir: ROOT }, undefined, { tsConfig });
    const result = reported.output as ICruiseResult;
    // The cruise really looked at the tree: a rule set that matched nothing would also report 0.
    expect(result.summary.totalCruised).toBeGreaterThan(100);
    expect(result.modules.some((m) => m.source === 'core/agent.ts')).toBe(true);
    const violations = describeViolations(result);
    if (violations.length) console.error(`dependency violations:\n${violations.join('\n')}`);
    expect(violations).toEqual([]);
  });
});
