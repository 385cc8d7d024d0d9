/**
 * The layers, as drawn in the README: `core/` holds what every feature uses; the feature folders
 * (embots, sensors, effectors) use core; only the composition roots (core/agent.ts, the control
 * API, the CLI) and the public entry wire features together, and only through each folder's
 * index.ts. Mobility lives in core/mobility (the design card puts it there) but is a feature: it
 * reaches the others through their index.ts too. Plugins use the package's public entry alone.
 * Checked by test/unit/layers.test.ts in `npm test`.
 */
const FEATURES = '^(embots|sensors|effectors|images)/';
const FEATURE_INDEX = '^(embots|sensors|effectors|images)/index\\.ts$';
const WIRING = '^core/(agent\\.ts|index\\.ts|internal\\.ts|control/|cli/|mobility/)';

module.exports = {
  forbidden: [
    {
      name: 'core-base-uses-no-feature',
      comment: 'core/ (store, wire, objects, config, plugins, errors…) is what every feature uses; it may not depend on a feature.',
      severity: 'error',
      from: { path: '^core/', pathNot: WIRING },
      to: { path: FEATURES },
    },
    {
      name: 'features-through-their-index',
      comment: "Code outside a feature folder imports it through its index.ts, never a deep file.",
      severity: 'error',
      from: { path: '^(core|embots|sensors|effectors|images)/' },
      to: { path: FEATURES, pathNot: [FEATURE_INDEX, '^$1/'] },
    },
    {
      name: 'features-do-not-wire',
      comment: 'A feature folder may not import the composition roots or mobility: those depend on it.',
      severity: 'error',
      from: { path: FEATURES },
      to: { path: '^core/(agent\\.ts|index\\.ts|internal\\.ts|control/|cli/|mobility/)' },
    },
    {
      name: 'plugins-use-the-public-entry',
      comment: "A shipped plugin imports the package's public entry (core/index.ts, 'embot') and nothing else of the project.",
      severity: 'error',
      from: { path: '^plugins/' },
      to: { path: '^(core|embots|sensors|effectors)/', pathNot: '^core/index\\.ts$' },
    },
    {
      name: 'no-circular',
      comment: 'Folders point one way; a cycle between files of different folders means they do not.',
      severity: 'error',
      from: { path: '^(core|embots|sensors|effectors|images)/' },
      to: { circular: true, viaOnly: { path: '^(core|embots|sensors|effectors)/' } },
    },
  ],
  options: {
    doNotFollow: { path: 'node_modules' },
    exclude: { path: '^(node_modules|test|bench|dist)/' },
    tsPreCompilationDeps: true,
    tsConfig: { fileName: 'tsconfig.json' },
    moduleSystems: ['es6'],
  },
};
