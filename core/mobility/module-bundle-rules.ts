import { ErrorCodes, PluginError } from '../errors.ts';
import { isModuleContentPath, MODULE_SIGNATURE_FILE } from '../plugins/content-hash.ts';

/** What one shipped module may hold; a bundle beyond these is refused before anything is written. */
export const MODULE_BUNDLE_LIMITS = {
  maxFiles: 1000,
  /** Sum of the file sizes. */
  maxTotalBytes: 16 * 1024 * 1024,
  /** Characters of one relative path. */
  maxPathLength: 1024,
} as const;

function invalid(message: string, details?: Record<string, unknown>): PluginError {
  return new PluginError(ErrorCodes.MODULE_BUNDLE_INVALID, message, details === undefined ? undefined : { details });
}

/**
 * Why a relative path from a bundle cannot be written as is, or undefined when it can. Paths
 * must be what `moduleFiles` produces on the sending side: `/`-separated, relative, no `.`/`..`
 * or empty segments, no dot-files or `node_modules`, no backslash or control characters.
 */
export function bundlePathProblem(rel: string): string | undefined {
  if (rel.length === 0) return 'is empty';
  if (rel.length > MODULE_BUNDLE_LIMITS.maxPathLength) return `is longer than ${MODULE_BUNDLE_LIMITS.maxPathLength} characters`;
  if (/[\u0000-\u001f\u007f]/.test(rel)) return 'holds a control character';
  if (rel.includes('\\')) return 'holds a backslash';
  if (rel.startsWith('/') || /^[A-Za-z]:/.test(rel)) return 'is absolute';
  const segments = rel.split('/');
  if (segments.some((s) => s === '..')) return 'leaves the module folder (..)';
  if (segments.some((s) => s === '' || s === '.')) return 'has an empty or "." segment';
  if (segments.some((s) => Buffer.byteLength(s, 'utf8') > 255)) return 'has a segment longer than 255 bytes';
  if (!isModuleContentPath(rel)) return `is not module content (dot-file, node_modules or ${MODULE_SIGNATURE_FILE})`;
  return undefined;
}

/**
 * Checks a file map against the bundle rules (count, total size, every path, no file that is
 * also a folder of another file).
 *
 * @throws PluginError `EMBOT_ERR_MODULE_BUNDLE_INVALID`.
 */
export function assertValidFileMap(files: ReadonlyMap<string, Uint8Array>): void {
  if (files.size === 0) throw invalid('module bundle holds no files');
  if (files.size > MODULE_BUNDLE_LIMITS.maxFiles) throw invalid(`module bundle holds ${files.size} files, more than ${MODULE_BUNDLE_LIMITS.maxFiles}`);
  let total = 0;
  for (const [rel, bytes] of files) {
    const problem = bundlePathProblem(rel);
    if (problem !== undefined) throw invalid(`module bundle path ${JSON.stringify(rel.slice(0, 200))} ${problem}`, { path: rel.slice(0, 200) });
    total += bytes.byteLength;
    if (total > MODULE_BUNDLE_LIMITS.maxTotalBytes) throw invalid(`module bundle content is larger than ${MODULE_BUNDLE_LIMITS.maxTotalBytes} bytes`);
  }
  for (const rel of files.keys()) {
    for (let i = rel.indexOf('/'); i !== -1; i = rel.indexOf('/', i + 1)) {
      if (files.has(rel.slice(0, i))) throw invalid(`module bundle path ${JSON.stringify(rel.slice(0, i))} is both a file and the folder of ${JSON.stringify(rel.slice(0, 200))}`);
    }
  }
}
