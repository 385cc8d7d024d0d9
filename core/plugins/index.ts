/** Management modules: the catalogue of plugin folders (validated before any import) and their persisted status. */
export { ManifestSchema, moduleRef, type Manifest } from './manifest.ts';
export {
  ModuleCatalogue,
  checkModuleDir,
  scanModules,
  type CatalogueEvents,
  type CatalogueOptions,
  type ModuleCheck,
  type ModuleProblem,
  type ModuleRecord,
  type ScanResult,
} from './catalogue.ts';
export { hashModuleDir, moduleFiles } from './content-hash.ts';
export { isValidRange, satisfies } from './version-range.ts';
export { PLUGIN_STATUSES, PluginStatusStore, type PluginStatus, type PluginStatusKind, type PluginStatusRecord } from './plugin-status-store.ts';
