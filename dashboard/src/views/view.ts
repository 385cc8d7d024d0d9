import type { State } from '../store.ts';

/** One page of the dashboard: built once when shown, then updated on every change. */
export interface View {
  readonly el: HTMLElement;
  update(state: State): void;
}
