import parsePrometheusTextFormat, { type ParsedFamily } from 'parse-prometheus-text-format';

/**
 * `/metrics` text read with parse-prometheus-text-format (a real parser). That parser folds a
 * histogram's samples into one and drops their labels (it only handles unlabelled histograms),
 * so a labelled histogram's sample lines are each given to the parser alone (one untyped sample
 * per line: name, labels, value) and grouped here by their labels without `le`.
 */
export interface Exposition {
  readonly families: readonly ParsedFamily[];
  /** Count and sum of histogram `name`'s series with these labels (zeros when there is none). */
  histogram(name: string, labels: Readonly<Record<string, string>>): { readonly count: number; readonly sum: number; readonly buckets: ReadonlyMap<string, number> };
}

export function parseExposition(text: string): Exposition {
  const families = parsePrometheusTextFormat(text);
  const lines = text.split('\n');
  return {
    families,
    histogram(name, labels) {
      let count = 0;
      let sum = 0;
      const buckets = new Map<string, number>();
      for (const line of lines) {
        if (!line.startsWith(`${name}_`)) continue;
        const [sample] = parsePrometheusTextFormat(`${line}\n`);
        const s = sample?.metrics[0];
        if (!sample || !s || s.value === undefined) continue;
        const l = s.labels ?? {};
        const same = Object.keys(labels).every((k) => l[k] === labels[k]) && Object.keys(l).every((k) => k === 'le' || k in labels);
        if (!same) continue;
        if (sample.name === `${name}_count`) count = Number(s.value);
        else if (sample.name === `${name}_sum`) sum = Number(s.value);
        else if (sample.name === `${name}_bucket` && l['le'] !== undefined) buckets.set(l['le'], Number(s.value));
      }
      return { count, sum, buckets };
    },
  };
}
