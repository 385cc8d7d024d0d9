import { main } from '../../core/cli/main.ts';

export interface CliRun {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs `embot <args>` in this process (no environment), capturing its exit code and output. */
export async function cliHere(args: readonly string[]): Promise<CliRun> {
  let stdout = '';
  let stderr = '';
  const code = await main(['node', 'embot', ...args], { stdout: { write: (x: string) => (stdout += x) }, stderr: { write: (x: string) => (stderr += x) }, env: {} });
  return { code, stdout, stderr };
}
