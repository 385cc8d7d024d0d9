import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/**
 * Vitest global setup: the whole run gets a temp folder of its own (TMPDIR, which `os.tmpdir()`
 * reads on every call and child agents inherit), so nothing a test or an agent it spawns writes
 * there outlives the run, also when a test fails or a process is SIGKILLed mid-write. Tests still
 * clean up after themselves; what they left is named at the end so a leak is seen, not hidden.
 */
export default function setup(): () => void {
  const outer = tmpdir();
  const run = mkdtempSync(join(outer, 'embot-vitest-'));
  process.env['TMPDIR'] = run;
  return () => {
    let left: string[] = [];
    try {
      left = readdirSync(run);
    } catch {
      /* already gone */
    }
    // vitest's own cache and v8 coverage folders are not ours to report.
    const ours = left.filter((name) => name.startsWith('embot-'));
    if (ours.length > 0) process.stderr.write(`temp hygiene: tests left ${ours.length} entries in the temp dir: ${ours.slice(0, 20).join(', ')}${ours.length > 20 ? ', …' : ''}\n`);
    rmSync(run, { recursive: true, force: true, maxRetries: 3 });
    process.env['TMPDIR'] = outer;
  };
}
