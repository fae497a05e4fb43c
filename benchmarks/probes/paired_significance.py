"""Are the small margins of two comparisons larger than the test set can resolve?

Every configuration below is the `benchmarks.reproduce` job of the same key (so its top-1 must equal the
stored row's; the script says so per job). For each pair it evaluates both models on the same
10,000 CIFAR-10 test images and reports, with `evaluation.paired_comparison`, the difference, the
examples only one of them gets right, the exact McNemar p-value and a 95 % interval of the
difference. Per-example correctness is kept (bit-packed, keyed by job) in
`results/paired_correct.npz`, so a rerun only evaluates what is missing; the summary goes to
`results/paired_significance.json`.

Pairs:
- joint UDFC against round-to-nearest: joint UDFC + bias correction against LBYL + bias correction + round-to-nearest (the
  defaults), L2, both ResNet-56 checkpoints, 30 % at W4 / W6, 40 / 50 % at W4 (NM ResNet-56), and
  l1 / l2-gm at 30 % W4, and the akamaster ResNet-20 at 30 % W4 (configurations not in the quant
  suite); UDFC against RTN without pruning (W4; ResNet-20 not in the quant suite either);
- the data-free bias rules: bnm `auto` and `blend` against the better of bias correction off / on, L2, per ratio
  (NM ResNet-56, ResNet-20, akamaster ResNet-56).

  python -m benchmarks.probes.paired_significance [--part quant|bnm|all] [--limit N]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib

import numpy as np

from benchmarks import reproduce
from benchmarks.reproduce import BC_ON, BNM_MODES, RATIOS, Job

RESULTS = pathlib.Path(__file__).resolve().parents[1] / 'results'


def quant_pairs() -> list[tuple[str, Job, Job]]:
  pairs = []
  cells = [('resnet56_b', 'l2', 0.3, 4), ('resnet56', 'l2', 0.3, 4), ('resnet56_b', 'l2', 0.3, 6),
           ('resnet56', 'l2', 0.3, 6), ('resnet56_b', 'l2', 0.4, 4), ('resnet56_b', 'l2', 0.5, 4)]
  cells += [(a, c, 0.3, 4) for c in ('l1', 'l2-gm') for a in ('resnet56_b', 'resnet56')]
  cells += [('resnet20', 'l2', 0.3, 4)]
  for arch, crit, r, bits in cells:
    pairs.append((f'{arch} {crit} {r:.0%} W{bits}: UDFC + bc vs LBYL + bc + RTN',
                  Job(arch, 'lbyl', crit, r, BC_ON, bits=bits, quant_method='udfc'),
                  Job(arch, 'lbyl', crit, r, BC_ON, bits=bits, quant_method='rtn')))
  for arch in ('resnet56_b', 'resnet56', 'resnet20'):
    pairs.append((f'{arch} unpruned W4: UDFC vs RTN',
                  Job(arch, 'prune', 'l2', 0.0, bits=4, quant_method='udfc'),
                  Job(arch, 'prune', 'l2', 0.0, bits=4, quant_method='rtn')))
  return pairs


def bnm_jobs() -> list[tuple[str, float, dict[str, Job]]]:
  return [(arch, r, {name: Job(arch, 'bnm', 'l2', r, opts) for name, opts in BNM_MODES.items()})
          for arch in ('resnet56_b', 'resnet20', 'resnet56') for r in RATIOS]


class Correctness:
  """Per-example correctness per job, cached bit-packed in an npz keyed by the job's key."""

  def __init__(self, path: pathlib.Path, limit: int | None):
    self.path, self.limit = path, limit
    self.cache = {}
    if path.exists() and not limit:
      with np.load(path) as z:
        self.cache = {k: z[k] for k in z.files}
    self.stored = reproduce.stored_rows()

  def get(self, job: Job) -> np.ndarray:
    key = job.key()
    _, _, ds, ev = reproduce._loaded(job.arch)  # pylint: disable=protected-access
    n = self.limit or len(ds)
    if key in self.cache:
      return np.unpackbits(self.cache[key], count=n).astype(bool)
    if self.limit:
      ds = ds.subset(self.limit)
    res = reproduce.compress_job(job)
    correct = ev.predictions(res.variables, ds, widths=res.widths, progress=False)['correct']
    top1 = 100.0 * correct.mean()
    row = self.stored.get(key)
    check = ('not in the sweeps' if row is None or self.limit
             else 'equals the stored row' if abs(row['top1'] - top1) < 1e-9
             else f'DIFFERS from the stored row {row["top1"]:.2f}')
    print(f'  {job.arch} {job.method} {job.criterion} r={job.ratio} {dict(job.options)} '
          f'bits={job.bits} {job.quant_method}: top-1 {top1:.2f} ({check})', flush=True)
    if not self.limit:
      self.cache[key] = np.packbits(correct)
      tmp = self.path.with_suffix('.tmp.npz')
      np.savez_compressed(tmp, **self.cache)
      os.replace(tmp, self.path)
    return correct


def fmt(c: dict) -> str:
  lo, hi = c['ci95']
  return (f"{c['top1_a']:.2f} vs {c['top1_b']:.2f}: diff {c['diff']:+.2f} "
          f"[95 % {lo:+.2f}, {hi:+.2f}], only A {c['only_a']}, only B {c['only_b']}, "
          f"McNemar p = {c['mcnemar_p']:.3g}")


def main(argv=None) -> None:
  from lbyl_jax import evaluation

  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--part', choices=('quant', 'bnm', 'all'), default='all')
  ap.add_argument('--limit', type=int, help='first N test images (no cache, no summary file)')
  args = ap.parse_args(argv)
  store = Correctness(RESULTS / 'paired_correct.npz', args.limit)
  summary_path = RESULTS / 'paired_significance.json'
  summary = json.loads(summary_path.read_text()) if summary_path.exists() and not args.limit else {}
  if args.part in ('quant', 'all'):
    print('A = joint UDFC, B = round-to-nearest', flush=True)
    for label, a, b in quant_pairs():
      c = evaluation.paired_comparison(store.get(a), store.get(b))
      summary[label] = c
      print(f'{label}: {fmt(c)}', flush=True)
  if args.part in ('bnm', 'all'):
    print('A = the rule, B = the better of bias correction off / on', flush=True)
    for arch, r, jobs in bnm_jobs():
      correct = {name: store.get(job) for name, job in jobs.items()}
      best = max(('off', 'on'), key=lambda k: correct[k].mean())
      for rule in ('auto', 'blend'):
        label = f'{arch} bnm {r:.0%}: {rule} vs best of off/on ({best})'
        c = evaluation.paired_comparison(correct[rule], correct[best])
        summary[label] = c
        print(f'{label}: {fmt(c)}', flush=True)
      c = evaluation.paired_comparison(correct['on'], correct['off'])
      summary[f'{arch} bnm {r:.0%}: on vs off'] = c
      print(f'{arch} bnm {r:.0%}: on vs off: {fmt(c)}', flush=True)
  if not args.limit:
    tmp = summary_path.with_suffix('.tmp')
    tmp.write_text(json.dumps(summary, indent=1) + '\n')
    os.replace(tmp, summary_path)


if __name__ == '__main__':
  main()
