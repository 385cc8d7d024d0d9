import type { Command } from 'commander';
import { chmodSync, existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { ConfigError, ErrorCodes, PluginError, describeError } from '../errors.ts';
import { packModule } from '../mobility/module-shipping.ts';
import { encodeSignatureFile, generateSigningKeys, parsePrivateKey, parsePublicKey, signModule, verifyModuleSignature } from '../mobility/trust-policy.ts';
import { MODULE_SIGNATURE_FILE } from '../plugins/content-hash.ts';
import { moduleRef } from '../plugins/manifest.ts';
import type { CliContext } from './context.ts';

export const PRIVATE_KEY_FILE = 'cluster-signing.key';
export const PUBLIC_KEY_FILE = 'cluster-signing.pub';

interface KeygenFlags {
  readonly out: string;
  readonly force?: boolean;
  readonly json?: boolean;
}
interface SignFlags {
  readonly key: string;
  readonly json?: boolean;
}
interface VerifyFlags {
  readonly pub: readonly string[];
  readonly json?: boolean;
}
interface JsonFlag {
  readonly json?: boolean;
}

const collect = (value: string, previous: readonly string[] = []): string[] => [...previous, value];

/** `embot module keygen|sign|verify|hash`: the cluster's module signing key and signed modules. Local, no agent needed. */
export function registerModuleCommands(program: Command, ctx: CliContext): void {
  const group = program
    .command('module')
    .description('sign management modules so agents accept them when they are shipped during a migration (works on local files)')
    .addHelpText(
      'after',
      `\nTypical use: keygen once per cluster, sign each module folder after every change, and list ${PUBLIC_KEY_FILE}\nunder trust.publicKeys on every agent. The signature lives in the module's ${MODULE_SIGNATURE_FILE} and is not part of its hash.`,
    );

  group
    .command('keygen')
    .description(`create an ed25519 cluster signing key pair: ${PRIVATE_KEY_FILE} (PKCS8 PEM, mode 0600) and ${PUBLIC_KEY_FILE}`)
    .requiredOption('--out <dir>', 'folder to write the key pair into (created if missing)')
    .option('--force', 'overwrite an existing key pair')
    .option('--json', 'print the result as JSON')
    .action((opts: KeygenFlags) => {
      const dir = resolve(opts.out);
      const keyPath = join(dir, PRIVATE_KEY_FILE);
      const pubPath = join(dir, PUBLIC_KEY_FILE);
      if (!opts.force) {
        const there = [keyPath, pubPath].filter((p) => existsSync(p));
        if (there.length > 0) throw new ConfigError(ErrorCodes.CLI_USAGE, `${there.join(' and ')} already exist; pass --force to replace the cluster key (modules signed with the old one stop verifying)`);
      }
      const keys = generateSigningKeys();
      try {
        mkdirSync(dir, { recursive: true, mode: 0o700 });
        writeFileSync(keyPath, keys.privatePem, { mode: 0o600 });
        // writeFileSync keeps the mode of a file it overwrites (--force).
        chmodSync(keyPath, 0o600);
        writeFileSync(pubPath, keys.publicPem, { mode: 0o644 });
      } catch (e) {
        throw new PluginError(ErrorCodes.PLUGIN_LOAD_FAILED, `cannot write the key pair into ${dir}: ${describeError(e)}`, { cause: e });
      }
      if (opts.json) ctx.json({ privateKey: keyPath, publicKey: pubPath, publicKeyBase64: keys.publicRawBase64 });
      else {
        ctx.out(
          `wrote ${keyPath} (private: keep it off the agents, only signers need it)\n` +
            `wrote ${pubPath} (public: add it to trust.publicKeys on every agent)\n` +
            `public key (base64): ${keys.publicRawBase64}`,
        );
      }
    });

  group
    .command('sign')
    .description(`sign a module folder with the cluster key: writes DIR/${MODULE_SIGNATURE_FILE} and prints the module ref`)
    .argument('<dir>', 'module folder (holds manifest.json)')
    .requiredOption('--key <file>', `private key file (${PRIVATE_KEY_FILE} from \`embot module keygen\`)`)
    .option('--json', 'print the result as JSON')
    .action((dir: string, opts: SignFlags) => {
      const moduleDir = existingDir(dir);
      const key = parsePrivateKey(readKeyFile(opts.key), opts.key);
      const packed = packModule(moduleDir);
      const identity = { name: packed.name, version: packed.version, hash: packed.hash };
      const sigPath = join(moduleDir, MODULE_SIGNATURE_FILE);
      try {
        writeFileSync(sigPath, encodeSignatureFile(signModule(identity, key)), { mode: 0o644 });
      } catch (e) {
        throw new PluginError(ErrorCodes.PLUGIN_LOAD_FAILED, `cannot write ${sigPath}: ${describeError(e)}`, { cause: e });
      }
      const ref = moduleRef(identity);
      if (opts.json) ctx.json({ ...identity, ref, signatureFile: sigPath });
      else ctx.out(`${ref}\nsigned: wrote ${sigPath}`);
    });

  group
    .command('verify')
    .description('check that a module folder is signed by one of the given public keys (exit 1 when not)')
    .argument('<dir>', 'module folder')
    .requiredOption('--pub <file>', `public key: file (${PUBLIC_KEY_FILE}), PEM or base64; repeat for several`, collect)
    .option('--json', 'print the result as JSON')
    .action((dir: string, opts: VerifyFlags) => {
      const moduleDir = existingDir(dir);
      const keys = opts.pub.map((spec, i) => parsePublicKey(spec, { where: opts.pub.length === 1 ? '--pub' : `--pub #${i + 1}` }));
      const packed = packModule(moduleDir);
      const identity = { name: packed.name, version: packed.version, hash: packed.hash };
      const ref = moduleRef(identity);
      const signed = packed.signature !== undefined;
      const valid = packed.signature !== undefined && verifyModuleSignature(identity, packed.signature, keys);
      const reason = !signed
        ? `module ${ref} is not signed (no ${MODULE_SIGNATURE_FILE}); sign it with \`embot module sign ${dir} --key ${PRIVATE_KEY_FILE}\``
        : valid
          ? undefined
          : `the signature of ${ref} does not verify against the given key(s): signed with another key, or changed after signing (re-sign it)`;
      if (opts.json) ctx.json({ ...identity, ref, signed, valid, ...(reason === undefined ? {} : { reason }) });
      else if (valid) ctx.out(`${ref}\nsignature ok`);
      if (reason !== undefined) throw new PluginError(ErrorCodes.MODULE_UNTRUSTED, reason);
    });

  group
    .command('hash')
    .description('print a module folder\'s content hash as name@version#hash (what StartMigration announces and trust.allowHashes lists)')
    .argument('<dir>', 'module folder')
    .option('--json', 'print the result as JSON')
    .action((dir: string, opts: JsonFlag) => {
      const packed = packModule(existingDir(dir));
      const identity = { name: packed.name, version: packed.version, hash: packed.hash };
      const ref = moduleRef(identity);
      if (opts.json) ctx.json({ ...identity, ref, signed: packed.signature !== undefined });
      else ctx.out(ref);
    });
}

function existingDir(dir: string): string {
  const abs = resolve(dir);
  if (!statSync(abs, { throwIfNoEntry: false })?.isDirectory()) throw new ConfigError(ErrorCodes.CLI_USAGE, `${dir} is not a folder (expected a module folder holding manifest.json)`);
  return abs;
}

function readKeyFile(path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch (e) {
    throw new ConfigError(ErrorCodes.CONFIG_NOT_FOUND, `cannot read key file ${path}: ${describeError(e)}`);
  }
}
