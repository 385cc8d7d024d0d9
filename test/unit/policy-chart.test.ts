import { describe, expect, it } from 'vitest';
import { createMachine } from 'xstate';
import { activePaths, describeMachine, MAX_CHART_NODES } from '../../embots/policy-chart.ts';

describe('policy charts from machine definitions', () => {
  it('reads states, initial states, nested states and every kind of transition', () => {
    const machine = createMachine({
      id: 'm',
      initial: 'idle',
      states: {
        idle: { on: { GO: 'running', NOOP: {} } },
        running: {
          initial: 'cold',
          states: { cold: { on: { HEAT: 'hot' } }, hot: { always: { target: 'cold', guard: () => false } } },
          after: { 5000: 'done' },
          on: { STOP: '#m.idle' },
        },
        done: { type: 'final' },
      },
    });
    const chart = describeMachine(machine)!;
    expect(chart.id).toBe('m');
    expect(chart.truncated).toBe(false);
    expect(chart.root.initial).toBe('idle');
    const running = chart.root.children.find((c) => c.key === 'running')!;
    expect(running.type).toBe('compound');
    expect(running.initial).toBe('cold');
    expect(running.children.map((c) => c.path)).toEqual(['running.cold', 'running.hot']);
    expect(running.transitions).toEqual(expect.arrayContaining([{ event: 'STOP', targets: ['idle'] }, { event: expect.stringMatching(/^xstate\.after\.5000\./), targets: ['done'] }]));
    expect(running.children[1]!.transitions).toEqual([{ event: '', targets: ['running.cold'] }]);
    expect(chart.root.children.find((c) => c.key === 'idle')!.transitions).toEqual([
      { event: 'GO', targets: ['running'] },
      { event: 'NOOP', targets: [] },
    ]);
    expect(chart.root.children.find((c) => c.key === 'done')!.type).toBe('final');
  });

  it('cuts a huge machine and says so', () => {
    const states = Object.fromEntries(Array.from({ length: MAX_CHART_NODES + 50 }, (_, i) => [`s${i}`, {}]));
    const chart = describeMachine(createMachine({ initial: 's0', states }))!;
    expect(chart.truncated).toBe(true);
    expect(chart.root.children.length).toBeLessThan(MAX_CHART_NODES);
  });

  it('is undefined for something that is not a machine', () => {
    for (const bad of [undefined, null, 42, 'machine', {}, { root: 3 }]) expect(describeMachine(bad)).toBeUndefined();
  });

  it('names the active states of a state value', () => {
    expect(activePaths('idle')).toEqual(['idle']);
    expect(activePaths({ running: 'hot' })).toEqual(['running', 'running.hot']);
    expect(activePaths({ a: { b: 'c' }, d: 'e' })).toEqual(['a', 'a.b', 'a.b.c', 'd', 'd.e']);
    expect(activePaths(null)).toEqual([]);
  });
});
