// Worker threads do not inherit the parent's module loader hooks: register tsx here so the
// worker and TypeScript plugin entries load the same way they do in the agent.
import { register } from 'tsx/esm/api';

register();
await import('./module-worker.ts');
