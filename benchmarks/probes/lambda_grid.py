"""Probe used once to fix the LBYL lambdas (benchmarks/NOTES.md): prune / nm / lbyl (published
forms, bias correction off) over a lambda grid on the FIRST N test images. Output:
``benchmarks/results/probe_lambda_grid_resnet56_b.log`` (lines: ratio, method, lambda1, lambda2,
top-1).

  python -m benchmarks.probes.lambda_grid resnet56_b ../shared/weights/nm_resnet56.cifar10.pth.tar 1000
"""

from __future__ import annotations

import argparse

from benchmarks import reproduce


def main(argv=None) -> None:
  import converters
  from lbyl_jax import evaluation
  from lbyl_jax import pipeline
  from lbyl_jax.io import data
  from lbyl_jax.models import archs

  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('arch')
  p.add_argument('weights', help='checkpoint file')
  p.add_argument('n', type=int, help='first N CIFAR-10 test images')
  args = p.parse_args(argv)
  spec = archs.get(args.arch)
  v = converters.load_variables(args.weights, spec)
  ds = data.load_dataset(str(reproduce.shared_dir() / 'data' / 'cifar10_test.npz'), limit=args.n)
  ev = evaluation.Evaluator(spec, batch_size=500)
  grid = [('prune', 0, 0), ('nm', 0, 0)] + [('lbyl', a, b) for a in [0, 1e-4, 1e-2]
                                          for b in [1e-4, 1e-3, 1e-2, 1e-1, 1]]
  for ratio in [0.3, 0.5]:
    for m, l1, l2 in grid:
      lam = dict(lambda1=l1, lambda2=l2) if m == 'lbyl' else {}
      res = pipeline.compress(spec, v, method=m, ratio=ratio, bias_correction='off', **lam)
      r = ev.evaluate(res.variables, ds, widths=res.widths, progress=False)
      print(ratio, m, l1, l2, r['top1'], flush=True)


if __name__ == '__main__':
  main()
