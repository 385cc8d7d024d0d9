import { z } from 'zod';

/** `manifest.json` of a management module (a folder under `plugins/`), validated before any import. */
export const ManifestSchema = z
  .object({
    name: z.string().regex(/^[a-z][a-z0-9-]{0,63}$/, 'lower-case letters, digits and dashes, starting with a letter'),
    version: z.string().regex(/^\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.-]+)?$/, 'semver, e.g. 1.2.3'),
    description: z.string().max(500).optional(),
    /** Plugin API version the module was written for; see EMBOT_API_VERSION. */
    embotApi: z.number().int().positive(),
    /** Entry file relative to the module folder (.ts, .mts, .js or .mjs). */
    entry: z.string().regex(/^(?!\/)(?!.*\.\.)[\w./-]+\.(?:ts|mts|js|mjs)$/, 'a relative path to a .ts/.mts/.js/.mjs file inside the module'),
    embots: z
      .array(
        z
          .object({
            type: z.string().regex(/^[a-z][a-z0-9-]{0,63}$/),
            /** Elements an embot of this type is created for: one embot per matching element. */
            attachTo: z.object({ kind: z.string().min(1) }).strict(),
            policies: z.array(z.string().min(1)).min(1),
          })
          .strict(),
      )
      .min(1),
    /** Other modules this one needs, name → exact version or `^major.minor.patch`. */
    dependencies: z.record(z.string(), z.string()).default({}),
    /** Defaults of the config handed to policies (`api.config`). */
    config: z.record(z.string(), z.unknown()).default({}),
    limits: z
      .object({
        /** Events a single embot may raise per second before it is quarantined as flooding. */
        maxEmitsPerSecond: z.number().int().positive().default(1000),
        /** Time a worker may spend on one batch before it is considered hung and restarted. */
        batchTimeoutMs: z.number().int().positive().default(2000),
      })
      .strict()
      .default({ maxEmitsPerSecond: 1000, batchTimeoutMs: 2000 }),
  })
  .strict();

export type Manifest = z.infer<typeof ManifestSchema>;

/** `name@version#hash`, the form modules are announced in by `StartMigration`. */
export function moduleRef(m: { readonly name: string; readonly version: string; readonly hash: string }): string {
  return `${m.name}@${m.version}#${m.hash}`;
}
