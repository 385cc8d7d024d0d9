/**
 * The small subset of semver ranges a module manifest may use for its dependencies. Hand-written
 * rather than pulling in `semver`: five range forms are all manifests need, and the catalogue must
 * reject anything else with a clear message instead of guessing.
 */

interface SemVer {
  readonly major: number;
  readonly minor: number;
  readonly patch: number;
  /** Dot-separated pre-release identifiers; empty for a release. */
  readonly pre: readonly string[];
}

type Comparator = { readonly op: '>=' | '<' | '='; readonly v: SemVer };

const VERSION_RE = /^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?$/;

function parseVersion(text: string): SemVer | undefined {
  const m = VERSION_RE.exec(text.trim());
  if (!m) return undefined;
  return { major: Number(m[1]), minor: Number(m[2]), patch: Number(m[3]), pre: m[4] === undefined ? [] : m[4].split('.') };
}

function compareIdentifiers(a: string, b: string): number {
  const an = /^\d+$/.test(a);
  const bn = /^\d+$/.test(b);
  if (an && bn) return Math.sign(Number(a) - Number(b));
  // Semver: numeric identifiers sort before alphanumeric ones.
  if (an) return -1;
  if (bn) return 1;
  return a < b ? -1 : a > b ? 1 : 0;
}

function compare(a: SemVer, b: SemVer): number {
  const core = Math.sign(a.major - b.major) || Math.sign(a.minor - b.minor) || Math.sign(a.patch - b.patch);
  if (core !== 0) return core;
  // A release ranks above any of its pre-releases.
  if (a.pre.length === 0 && b.pre.length === 0) return 0;
  if (a.pre.length === 0) return 1;
  if (b.pre.length === 0) return -1;
  for (let i = 0; i < Math.min(a.pre.length, b.pre.length); i++) {
    const c = compareIdentifiers(a.pre[i]!, b.pre[i]!);
    if (c !== 0) return c;
  }
  return Math.sign(a.pre.length - b.pre.length);
}

const v = (major: number, minor: number, patch: number): SemVer => ({ major, minor, patch, pre: ['0'] });

/** Comparators of a range, or undefined when the range is not one of the supported forms. */
function parseRange(range: string): readonly Comparator[] | undefined {
  const text = range.trim();
  if (text === '*' || text === '') return [];
  const m = /^(\^|~|>=|=)?\s*(.+)$/.exec(text);
  if (!m) return undefined;
  const base = parseVersion(m[2]!);
  if (!base) return undefined;
  const { major, minor, patch } = base;
  switch (m[1]) {
    case undefined:
    case '=':
      return [{ op: '=', v: base }];
    case '>=':
      return [{ op: '>=', v: base }];
    case '~':
      // Upper bounds use the lowest pre-release (`-0`) so that e.g. 2.0.0-beta is outside ^1.x.
      return [{ op: '>=', v: base }, { op: '<', v: v(major, minor + 1, 0) }];
    case '^': {
      const upper = major > 0 ? v(major + 1, 0, 0) : minor > 0 ? v(0, minor + 1, 0) : v(0, 0, patch + 1);
      return [{ op: '>=', v: base }, { op: '<', v: upper }];
    }
    default:
      return undefined;
  }
}

/**
 * Whether `range` is one of the supported forms: `*`, exact `1.2.3` (or `=1.2.3`), `^1.2.3`,
 * `~1.2.3`, `>=1.2.3` (each base may carry a pre-release tag).
 *
 * @example
 * ```ts
 * isValidRange('^1.2.0') // true
 * isValidRange('1.x')    // false
 * ```
 */
export function isValidRange(range: string): boolean {
  return parseRange(range) !== undefined;
}

/**
 * Whether `version` lies in `range` (npm semantics for the supported forms, see
 * {@link isValidRange}). A pre-release version only satisfies a range whose own base is a
 * pre-release of the same `major.minor.patch`, as in npm, so `^1.0.0` never picks up `1.1.0-rc.1`.
 * An unparsable version or an unsupported range never satisfies.
 *
 * @example
 * ```ts
 * satisfies('1.4.2', '^1.2.3')  // true
 * satisfies('2.0.0', '^1.2.3')  // false
 * satisfies('0.2.9', '^0.2.3')  // true, but '0.3.0' is not
 * ```
 */
export function satisfies(version: string, range: string): boolean {
  const ver = parseVersion(version);
  const comparators = parseRange(range);
  if (!ver || !comparators) return false;
  for (const c of comparators) {
    const cmp = compare(ver, c.v);
    const ok = c.op === '=' ? cmp === 0 : c.op === '>=' ? cmp >= 0 : cmp < 0;
    if (!ok) return false;
  }
  if (ver.pre.length > 0) {
    // Only the range's own base counts (upper bounds carry a synthetic `-0`).
    return comparators.some((c) => c.op !== '<' && c.v.pre.length > 0 && c.v.major === ver.major && c.v.minor === ver.minor && c.v.patch === ver.patch);
  }
  return true;
}
