import { fileURLToPath } from 'node:url';
import type { EmbotEvent } from '../core/events.ts';
import { checkModuleDir } from '../core/plugins/index.ts';
import { Store } from '../core/store/store.ts';
import { EffectorRegistry } from '../effectors/index.ts';
import { EMBOT_API_VERSION, EmbotRuntime } from '../embots/index.ts';
import { SensorService } from '../sensors/index.ts';

const COUNTER_DIR = fileURLToPath(new URL('../test/fixtures/plugins/counter/', import.meta.url));

/** The event path's real parts, wired as the agent wires them: one Store shared by the journal and the runtime. */
export interface RuntimeStack {
  readonly store: Store;
  readonly sensors: SensorService;
  readonly runtime: EmbotRuntime;
  /** Waits for the sensors to drain, then closes the runtime, the sensors and the store. */
  close(): Promise<void>;
}

export function openRuntimeStack(file: string): RuntimeStack {
  const store = Store.open({ file, synchronous: 'NORMAL' });
  const sensors = new SensorService({ host: 'bench', store });
  const runtime = new EmbotRuntime({ store, sensors, effectors: new EffectorRegistry() });
  const close = async (): Promise<void> => {
    await sensors.idle();
    await runtime.close();
    await sensors.close();
    store.close();
  };
  return { store, sensors, runtime, close };
}

/** Loads the `counter` test fixture module and attaches `vm:bench-0`, the element {@link postTickBursts} posts to. */
export async function attachCounter(runtime: EmbotRuntime): Promise<void> {
  const c = checkModuleDir(COUNTER_DIR, EMBOT_API_VERSION);
  if (!c.ok) throw new Error(`counter fixture is not a valid module: ${c.problem.error.message}`);
  await runtime.loadModule(c.record);
  await runtime.attach({ id: 'vm:bench-0', kind: 'vm', scope: ['vm:bench-0'] });
}

/**
 * Counts the runtime's `processed` events from now: `done` resolves once `n` were committed;
 * `stop()` unsubscribes. A pump measures up to `done`, so subscribe before posting.
 */
export function processedWaiter(runtime: EmbotRuntime, n: number): { readonly done: Promise<void>; stop(): void } {
  let processed = 0;
  let resolveDone!: () => void;
  const done = new Promise<void>((r) => (resolveDone = r));
  const onProcessed = (events: readonly EmbotEvent[]): void => {
    processed += events.length;
    if (processed >= n) resolveDone();
  };
  runtime.on('processed', onProcessed);
  return { done, stop: () => void runtime.off('processed', onProcessed) };
}

/**
 * Posts `n` TICKs for `vm:bench-0`, numbered on from `rig.seq`, in bursts of `burst`, waiting for
 * the sensors to take each burst before the next (so the journal, not memory, holds the backlog).
 */
export async function postTickBursts(rig: { readonly sensors: SensorService; seq: number }, n: number, burst: number): Promise<void> {
  for (let from = 0; from < n; from += burst) {
    const end = Math.min(n, from + burst);
    for (let i = from; i < end; i++) rig.sensors.post({ elementId: 'vm:bench-0', type: 'TICK', payload: { seq: rig.seq++ } });
    await rig.sensors.idle();
  }
}
