import { describe, expect, it } from 'vitest';
import { targetRefusal } from '../../core/mobility/target-refusal.ts';

/** As source-machine.ts recordFailure words the step the refusal rolls back as. */
const asSourceReason = (step: string, message: string): string => `${step} failed: ${message}`;

describe("targetRefusal: the target's words inside the source's reason, each thing once", () => {
  it('a refused boot: the target names bootIncoming as the source does, so the reason says it once (issue 13 by-hand run)', () => {
    const message = targetRefusal('boot', { type: 'MigrationStateFailed', reason: 'bootIncoming failed: injected fault (EMBOT_FAULT_BOOT_FAIL=1): incoming VM app failed to boot' }, 'bootIncoming');
    expect(message).toBe('boot refused by the target: injected fault (EMBOT_FAULT_BOOT_FAIL=1): incoming VM app failed to boot');
    const reason = asSourceReason('bootIncoming', message);
    expect(reason.match(/bootIncoming/g)).toHaveLength(1);
    expect(reason).not.toContain('MigrationStateFailed');
  });

  it("a target step other than the source's keeps its name: it says where the target failed", () => {
    expect(targetRefusal('DirtyObjects', { type: 'MigrationStateFailed', reason: 'applyDirty failed: checksum mismatch' }, 'sendDirtyObjects')).toBe(
      'DirtyObjects refused by the target: applyDirty failed: checksum mismatch',
    );
    expect(targetRefusal('ManagementState', { type: 'MigrationStateFailed', reason: 'stageState failed: no space' })).toBe('ManagementState refused by the target: stageState failed: no space');
  });

  it('only a leading failure of the same step goes: a timeout of it, or the name later in the words, stay', () => {
    expect(targetRefusal('boot', { type: 'MigrationStateFailed', reason: 'bootIncoming timed out after 3000 ms' }, 'bootIncoming')).toBe('boot refused by the target: bootIncoming timed out after 3000 ms');
    expect(targetRefusal('boot', { type: 'MigrationStateFailed', reason: 'aborted: bootIncoming failed: x' }, 'bootIncoming')).toBe('boot refused by the target: aborted: bootIncoming failed: x');
  });

  it('bad replies: no reason, an empty one, or only the prefix name the reply instead; an unexpected reply type is named', () => {
    expect(targetRefusal('boot', { type: 'MigrationStateFailed' }, 'bootIncoming')).toBe('boot refused by the target: MigrationStateFailed');
    expect(targetRefusal('boot', { type: 'MigrationStateFailed', reason: '' }, 'bootIncoming')).toBe('boot refused by the target: MigrationStateFailed');
    expect(targetRefusal('boot', { type: 'MigrationStateFailed', reason: 'bootIncoming failed: ' }, 'bootIncoming')).toBe('boot refused by the target: MigrationStateFailed');
    expect(targetRefusal('boot', { type: 'MigrationStateSuccess' }, 'bootIncoming')).toBe('boot refused by the target: MigrationStateSuccess');
    expect(targetRefusal('PrepareIncoming', { type: 'MigrationDenied', reason: 'not enough memory' })).toBe('PrepareIncoming refused by the target: MigrationDenied: not enough memory');
  });
});
