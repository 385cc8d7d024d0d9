import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ConfigError, ErrorCodes } from '../../core/errors.ts';
import { closeReason, computeProof, createNonce, loadClusterSecret, parseCloseReason, verifyProof, type ProofInput } from '../../core/wire/index.ts';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'embot-wire-auth-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

const secret = Buffer.from('0123456789abcdef-cluster');
const input: ProofInput = { clientNonce: createNonce(), serverNonce: createNonce(), clientAgent: 'a', serverAgent: 'b' };

describe('challenge–response proofs', () => {
  it('verifies a proof made with the same secret, role and handshake', () => {
    const proof = computeProof(secret, 'server', input);
    expect(proof.byteLength).toBe(32);
    expect(verifyProof(secret, 'server', input, proof)).toBe(true);
  });

  it('rejects a proof from another secret', () => {
    const proof = computeProof(Buffer.from('another-secret-of-16b'), 'server', input);
    expect(verifyProof(secret, 'server', input, proof)).toBe(false);
  });

  it('rejects the server proof replayed as a client proof', () => {
    expect(verifyProof(secret, 'client', input, computeProof(secret, 'server', input))).toBe(false);
  });

  const base: ProofInput = { ...input, clientAgent: 'a', serverAgent: 'bc' };
  it.each([
    ['client nonce', { ...base, clientNonce: createNonce() }],
    ['server nonce', { ...base, serverNonce: createNonce() }],
    ['client name', { ...base, clientAgent: 'c' }],
    ['server name', { ...base, serverAgent: 'c' }],
    // Length prefixes keep "ab"+"c" from hashing like "a"+"bc".
    ['the split between names', { ...base, clientAgent: 'ab', serverAgent: 'c' }],
  ])('binds the proof to the %s', (_what, other) => {
    const proof = computeProof(secret, 'client', base);
    expect(verifyProof(secret, 'client', base, proof)).toBe(true);
    expect(verifyProof(secret, 'client', other, proof)).toBe(false);
  });

  it('rejects a proof of the wrong length without throwing', () => {
    expect(verifyProof(secret, 'client', input, new Uint8Array(31))).toBe(false);
  });

  it('uses fresh nonces', () => {
    expect(Buffer.from(createNonce()).equals(Buffer.from(createNonce()))).toBe(false);
  });
});

describe('loadClusterSecret', () => {
  it('reads the secret and drops the trailing newline echo adds', () => {
    const file = path.join(dir, 'ok.secret');
    fs.writeFileSync(file, 'correct horse battery staple\n');
    expect(Buffer.from(loadClusterSecret(file)).toString()).toBe('correct horse battery staple');
  });

  it('refuses a secret shorter than 16 bytes', () => {
    const file = path.join(dir, 'short.secret');
    fs.writeFileSync(file, 'short-secret\n\n');
    expect(() => loadClusterSecret(file)).toThrow(ConfigError);
    try {
      loadClusterSecret(file);
    } catch (e) {
      expect((e as ConfigError).code).toBe(ErrorCodes.CONFIG_INVALID);
      expect((e as ConfigError).message).toContain('12 bytes');
    }
  });

  it('refuses a file of whitespace only', () => {
    const file = path.join(dir, 'blank.secret');
    fs.writeFileSync(file, ' \n\t\r\n                    \n');
    expect(() => loadClusterSecret(file)).toThrow(expect.objectContaining({ code: ErrorCodes.CONFIG_INVALID }));
  });

  it('reports a missing file as CONFIG_NOT_FOUND', () => {
    expect(() => loadClusterSecret(path.join(dir, 'nope'))).toThrow(expect.objectContaining({ code: ErrorCodes.CONFIG_NOT_FOUND }));
  });
});

describe('close reasons', () => {
  it('carry the error code and fit in 123 bytes', () => {
    const reason = closeReason(ErrorCodes.FRAME_MALFORMED, 'ü'.repeat(200));
    expect(Buffer.byteLength(reason)).toBeLessThanOrEqual(123);
    expect(parseCloseReason(reason).code).toBe(ErrorCodes.FRAME_MALFORMED);
  });

  it('do not invent a code for foreign reasons', () => {
    expect(parseCloseReason('bye').code).toBeUndefined();
    expect(parseCloseReason('EMBOT_ERR_MADE_UP: x').code).toBeUndefined();
  });
});
