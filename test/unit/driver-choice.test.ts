import { describe, expect, it } from 'vitest';
import { driverChoice } from '../../core/agent.ts';
import { validateConfig } from '../../core/config/config.ts';
import { DEFAULT_RELAY_BUFFER_BYTES, DEFAULT_RELAY_STALL_BUDGET_MS } from '../../effectors/hypervisor/qemu/stream-relay.ts';

const MiB = 1024 * 1024;
const noImages = (): undefined => undefined;

/** The QemuDriver options the agent builds from this config (the driver hands the relay ones to each fan-out's relay: qemu-fan-out-driver.integration). */
function qemuOptions(config: Record<string, unknown>) {
  const choice = driverChoice(validateConfig({ driver: 'qemu', ...config }), noImages);
  if (choice.kind !== 'qemu') throw new Error(`driver ${choice.kind}, not qemu`);
  return choice.qemu;
}

describe('the qemu driver the agent builds from its config', () => {
  it("gets qemu.relay's bound and stall budget as relayBufferBytes and relayStallBudgetMs", () => {
    expect(qemuOptions({ qemu: { relay: { bufferBytes: 4 * MiB, stallBudgetMs: 1500 } } })).toMatchObject({ relayBufferBytes: 4 * MiB, relayStallBudgetMs: 1500 });
    // 0 is a setting (drop at once), not "absent".
    expect(qemuOptions({ qemu: { relay: { stallBudgetMs: 0 } } })).toMatchObject({ relayBufferBytes: 64 * MiB, relayStallBudgetMs: 0 });
  });

  it("without qemu.relay gets the relay's own defaults (the config's DEFAULTS and stream-relay.ts agree)", () => {
    expect(qemuOptions({})).toMatchObject({ relayBufferBytes: DEFAULT_RELAY_BUFFER_BYTES, relayStallBudgetMs: DEFAULT_RELAY_STALL_BUDGET_MS });
  });
});
