import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { EffectorError, EmbotError, ErrorCodes } from '../../core/errors.ts';
import { EffectorRegistry, HypervisorEffector, HYPERVISOR_OPS, SimDriver, createDriver } from '../../effectors/index.ts';
import type { Effector, HypervisorCapabilities, SimDriverOptions, VmInfo } from '../../effectors/index.ts';

async function rejection(p: Promise<unknown>): Promise<EmbotError> {
  const e = await p.then(
    () => undefined,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(EmbotError);
  return e as EmbotError;
}

describe('HypervisorEffector', () => {
  let driver: SimDriver;
  let hv: HypervisorEffector;

  beforeEach(() => {
    driver = new SimDriver({ pageSize: 1024, defaults: { memory: 64 * 1024, dirtyRate: 0 } });
    hv = new HypervisorEffector(driver);
  });
  afterEach(() => driver.close());

  it('declares its name, ops, muted sensors and the element it acts on', () => {
    expect(hv.name).toBe('hypervisor');
    expect([...hv.ops]).toEqual(['create', 'start', 'stop', 'kill', 'crash', 'remove', 'list', 'stats']);
    expect(hv.mutes).toEqual(['vm']);
    expect(hv.elementOf({ vm: 'web-1' })).toBe('vm:web-1');
    expect(hv.elementOf({})).toBeUndefined();
    expect(hv.elementOf({ vm: 7 })).toBeUndefined();
  });

  it('runs every op against the driver', async () => {
    const created = (await hv.invoke('create', { vm: 'web-1', memory: 32 * 1024, vcpus: 2, label: 'ignored' })) as VmInfo;
    expect(created).toMatchObject({ name: 'web-1', memory: 32 * 1024, vcpus: 2, state: 'created' });
    expect(created).not.toHaveProperty('label');
    expect(await hv.invoke('start', { vm: 'web-1' })).toMatchObject({ state: 'running' });
    expect(await hv.invoke('stats', { vm: 'web-1' })).toMatchObject({ name: 'web-1', state: 'running', memory: 32 * 1024 });
    expect(await hv.invoke('crash', { vm: 'web-1' })).toMatchObject({ state: 'crashed', crashes: 1 });
    expect(await hv.invoke('start', { vm: 'web-1' })).toMatchObject({ state: 'running' });
    expect(await hv.invoke('stop', { vm: 'web-1' })).toMatchObject({ state: 'stopped' });
    expect(((await hv.invoke('list', {})) as VmInfo[]).map((v) => v.name)).toEqual(['web-1']);
    expect(await hv.invoke('remove', { vm: 'web-1' })).toEqual({ removed: 'web-1' });
    expect(driver.list()).toEqual([]);
  });

  it('rejects an unknown op with EMBOT_ERR_EFFECTOR_OP_UNKNOWN', async () => {
    expect((await rejection(hv.invoke('reboot', { vm: 'a' }))).code).toBe(ErrorCodes.EFFECTOR_OP_UNKNOWN);
  });

  it.each(HYPERVISOR_OPS.filter((op) => op !== 'list'))('rejects %s without args.vm (EMBOT_ERR_EFFECTOR_ARGS_INVALID)', async (op) => {
    expect((await rejection(hv.invoke(op, {}))).code).toBe(ErrorCodes.EFFECTOR_ARGS_INVALID);
    expect((await rejection(hv.invoke(op, { vm: 3 }))).code).toBe(ErrorCodes.EFFECTOR_ARGS_INVALID);
  });

  it("passes the driver's refusals through as rejections with their codes", async () => {
    expect((await rejection(hv.invoke('start', { vm: 'ghost' }))).code).toBe(ErrorCodes.VM_UNKNOWN);
    await hv.invoke('create', { vm: 'a' });
    expect((await rejection(hv.invoke('create', { vm: 'a' }))).code).toBe(ErrorCodes.VM_EXISTS);
    expect((await rejection(hv.invoke('stop', { vm: 'a' }))).code).toBe(ErrorCodes.VM_BAD_STATE);
    expect((await rejection(hv.invoke('create', { vm: 'b', memory: -1 }))).code).toBe(ErrorCodes.VM_SPEC_INVALID);
  });

  it("creates through the driver factory's spec mapping: what the sim cannot do is refused, a bad path arg too", async () => {
    const { driver: sim, specFor } = createDriver({ kind: 'sim', sim: { pageSize: 1024, defaults: { memory: 64 * 1024, dirtyRate: 0 } } });
    const effector = new HypervisorEffector(sim, specFor);
    const refused = await rejection(effector.invoke('create', { vm: 'a', image: '/tmp/disk.qcow2' }));
    expect(refused.code).toBe(ErrorCodes.VM_SPEC_INVALID);
    expect(refused.message).toMatch(/sim driver .*image/);
    expect((await rejection(effector.invoke('create', { vm: 'a', boot: 42 }))).code).toBe(ErrorCodes.EFFECTOR_ARGS_INVALID);
    expect(sim.list()).toEqual([]);
    expect(await effector.invoke('create', { vm: 'a', memory: 32 * 1024, udpPort: 9001 })).toMatchObject({ name: 'a', memory: 32 * 1024, udpPort: 9001 });
    await sim.close();
  });

  it('kills a running VM: stopped at once, reason kill', async () => {
    const reasons: string[] = [];
    driver.events.on('vm-state', (e) => reasons.push(e.reason));
    await hv.invoke('create', { vm: 'a' });
    await hv.invoke('start', { vm: 'a' });
    expect(await hv.invoke('kill', { vm: 'a' })).toMatchObject({ state: 'stopped', crashes: 0 });
    expect(reasons.at(-1)).toBe('kill');
  });

  it('crash needs the faults capability: without it EMBOT_ERR_DRIVER_UNSUPPORTED, and the VM keeps running', async () => {
    // Named fake: a sim driver that declares no faults, standing for any driver without the capability.
    class SimDriverWithoutFaults extends SimDriver {
      constructor(o: SimDriverOptions) {
        super(o);
        const { faults: _faults, ...rest } = this.capabilities;
        (this as { capabilities: HypervisorCapabilities }).capabilities = rest;
      }
    }
    const bare = new SimDriverWithoutFaults({ pageSize: 1024, defaults: { memory: 64 * 1024, dirtyRate: 0 } });
    const effector = new HypervisorEffector(bare);
    await effector.invoke('create', { vm: 'a' });
    await effector.invoke('start', { vm: 'a' });
    const e = await rejection(effector.invoke('crash', { vm: 'a' }));
    expect(e.code).toBe(ErrorCodes.DRIVER_UNSUPPORTED);
    expect(e.details).toMatchObject({ driver: 'sim', capability: 'faults' });
    expect(bare.get('a')).toMatchObject({ state: 'running', crashes: 0 });
    await bare.close();
  });
});

/** An effector that records what happens around it, for the registry's contract. */
function recordingEffector(log: string[], behaviour: (op: string) => unknown): Effector {
  return {
    name: 'rec',
    ops: ['go', 'sync-throw'],
    mutes: ['vm', 'net'],
    elementOf: (args) => (typeof args.vm === 'string' ? `vm:${args.vm}` : undefined),
    invoke(op) {
      log.push(`invoke ${op}`);
      if (op === 'sync-throw') throw new TypeError('sync boom');
      return Promise.resolve().then(() => behaviour(op));
    },
  };
}

describe('EffectorRegistry', () => {
  let registry: EffectorRegistry;
  let log: string[];
  const hooks = () => ({
    mute: (element: string, sensors: readonly string[]) => {
      log.push(`mute ${element} [${sensors.join(',')}]`);
      return () => log.push(`unmute ${element}`);
    },
  });

  beforeEach(() => {
    registry = new EffectorRegistry();
    log = [];
  });

  it('registers, gets and lists effectors', () => {
    const e = recordingEffector(log, () => 1);
    registry.register(e);
    expect(registry.get('rec')).toBe(e);
    expect(registry.has('rec')).toBe(true);
    expect(registry.list()).toEqual([e]);
    expect(registry.unregister('rec')).toBe(true);
    expect(registry.has('rec')).toBe(false);
  });

  it('refuses a second effector with the same name (EMBOT_ERR_EFFECTOR_EXISTS)', () => {
    registry.register(recordingEffector(log, () => 1));
    expect(() => registry.register(recordingEffector(log, () => 2))).toThrow(expect.objectContaining({ code: ErrorCodes.EFFECTOR_EXISTS }));
  });

  it('refuses something that is not an effector (EMBOT_ERR_EFFECTOR_ARGS_INVALID)', () => {
    expect(() => registry.register({ name: 'x' } as never)).toThrow(expect.objectContaining({ code: ErrorCodes.EFFECTOR_ARGS_INVALID }));
  });

  it('get of an unknown effector throws EMBOT_ERR_EFFECTOR_UNKNOWN; invoke rejects with it', async () => {
    expect(() => registry.get('nope')).toThrow(expect.objectContaining({ code: ErrorCodes.EFFECTOR_UNKNOWN }));
    expect((await rejection(registry.invoke('nope', 'go', {}))).code).toBe(ErrorCodes.EFFECTOR_UNKNOWN);
  });

  it('rejects an op the effector does not declare, before muting anything', async () => {
    registry.register(recordingEffector(log, () => 1));
    expect((await rejection(registry.invoke('rec', 'fly', { vm: 'a' }, hooks()))).code).toBe(ErrorCodes.EFFECTOR_OP_UNKNOWN);
    expect(log).toEqual([]);
  });

  it('rejects args that are not an object', async () => {
    registry.register(recordingEffector(log, () => 1));
    for (const bad of [null, [1], 'vm']) {
      expect((await rejection(registry.invoke('rec', 'go', bad as never, hooks()))).code).toBe(ErrorCodes.EFFECTOR_ARGS_INVALID);
    }
    expect(log).toEqual([]);
  });

  it('mutes the declared sensors for the element before acting and unmutes after', async () => {
    registry.register(
      recordingEffector(log, () => {
        log.push('settled');
        return 'ok';
      }),
    );
    expect(await registry.invoke('rec', 'go', { vm: 'a' }, hooks())).toBe('ok');
    expect(log).toEqual(['mute vm:a [vm,net]', 'invoke go', 'settled', 'unmute vm:a']);
  });

  it('unmutes even when the effector rejects, and keeps an EmbotError as it is', async () => {
    const own = new EffectorError(ErrorCodes.VM_BAD_STATE, 'not now');
    registry.register(
      recordingEffector(log, () => {
        throw own;
      }),
    );
    expect(await rejection(registry.invoke('rec', 'go', { vm: 'a' }, hooks()))).toBe(own);
    expect(log).toEqual(['mute vm:a [vm,net]', 'invoke go', 'unmute vm:a']);
  });

  it('wraps a foreign error in EMBOT_ERR_EFFECTOR_FAILED with the original as cause, and unmutes', async () => {
    const boom = new RangeError('disk on fire');
    registry.register(
      recordingEffector(log, () => {
        throw boom;
      }),
    );
    const e = await rejection(registry.invoke('rec', 'go', { vm: 'a' }, hooks()));
    expect(e).toBeInstanceOf(EffectorError);
    expect(e.code).toBe(ErrorCodes.EFFECTOR_FAILED);
    expect(e.cause).toBe(boom);
    expect(e.message).toContain('disk on fire');
    expect(e.details).toEqual({ effector: 'rec', op: 'go' });
    expect(log.at(-1)).toBe('unmute vm:a');
  });

  it('turns a synchronous throw into a rejection, wrapped, and unmutes', async () => {
    registry.register(recordingEffector(log, () => 1));
    const e = await rejection(registry.invoke('rec', 'sync-throw', { vm: 'a' }, hooks()));
    expect(e.code).toBe(ErrorCodes.EFFECTOR_FAILED);
    expect(e.cause).toBeInstanceOf(TypeError);
    expect(log).toEqual(['mute vm:a [vm,net]', 'invoke sync-throw', 'unmute vm:a']);
  });

  it('wraps a thrown non-Error value too', async () => {
    registry.register(
      recordingEffector(log, () => {
        throw 'just a string';
      }),
    );
    const e = await rejection(registry.invoke('rec', 'go', { vm: 'a' }));
    expect(e.code).toBe(ErrorCodes.EFFECTOR_FAILED);
    expect(e.cause).toBe('just a string');
  });

  it('does not mute when the args name no element, when no hook is given, or when the effector mutes nothing', async () => {
    registry.register(recordingEffector(log, () => 1));
    await registry.invoke('rec', 'go', {}, hooks());
    await registry.invoke('rec', 'go', { vm: 'a' });
    registry.register({ name: 'plain', ops: ['go'], elementOf: () => 'vm:a', invoke: async () => 2 });
    await registry.invoke('plain', 'go', { vm: 'a' }, hooks());
    expect(log).toEqual(['invoke go', 'invoke go']);
  });

  it('drives the hypervisor effector end to end with the VM sensor muted during the act', async () => {
    const driver = new SimDriver({ defaults: { memory: 64 * 1024, dirtyRate: 0 } });
    registry.register(new HypervisorEffector(driver));
    let muted = false;
    const heard: string[] = [];
    driver.events.on('vm-state', (e) => heard.push(`${e.to}${muted ? ' (muted)' : ''}`));
    const mute = (element: string, sensors: readonly string[]) => {
      expect([element, sensors]).toEqual(['vm:web-1', ['vm']]);
      muted = true;
      return () => {
        muted = false;
      };
    };
    await registry.invoke('hypervisor', 'create', { vm: 'web-1' }, { mute });
    await registry.invoke('hypervisor', 'start', { vm: 'web-1' }, { mute });
    driver.crash('web-1'); // not through an effector: heard unmuted
    expect(heard).toEqual(['created (muted)', 'running (muted)', 'crashed']);
    driver.close();
  });
});
