"""Which setting reproduces the BN-moments prototype's "LBYL + bias correction" row at 40 / 50 %
(78.37 / 36.00; ours with the prototype's fold: 79.51 / 40.85)? NM ResNet-56, L2, the prototype's
all-taps fold, full CIFAR-10 test set. Each line varies one thing from our run: solver precision,
the BN sigma convention, or LBYL's lambdas (the grid of benchmarks/probes/lambda_grid.py), or
LBYL's form. Reads ../shared or $LBYL_JAX_SHARED. Log:
``benchmarks/results/probe_lbyl_bc_prototype.log``.

  python -m benchmarks.probes.lbyl_bc_prototype ['VARIANT NAME' ...] [--ratios 0.1,0.2,0.3]
"""

from __future__ import annotations

import argparse

from benchmarks import reproduce

VARIANTS = {
    'float64 solves': dict(dtype='float64'),
    'bn_sigma variance': dict(bn_sigma='variance'),
    'lambda1 0, lambda2 1e-4': dict(lambda1=0.0, lambda2=1e-4),
    'lambda1 1e-2, lambda2 1e-2': dict(lambda1=1e-2, lambda2=1e-2),
    'reference-code LBYL form': dict(lbyl_mode='reference_code'),
}


def main(argv=None) -> None:
  from lbyl_jax import pipeline

  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('variants', nargs='*', metavar='VARIANT',
                 help=f'run only these ({"; ".join(VARIANTS)}); default: all')
  p.add_argument('--ratios', default='0.4,0.5', help='comma-separated, e.g. 0.1,0.2,0.3')
  args = p.parse_args(argv)
  unknown = [v for v in args.variants if v not in VARIANTS]
  if unknown:
    p.error(f'unknown variant(s) {unknown}; known: {list(VARIANTS)}')
  ratios = tuple(float(x) for x in args.ratios.split(','))
  variants = {k: v for k, v in VARIANTS.items() if not args.variants or k in args.variants}
  spec, variables, ds, ev = reproduce._loaded('resnet56_b')  # pylint: disable=protected-access
  for name, extra in variants.items():
    for ratio in ratios:
      res = pipeline.compress(spec, variables, method='lbyl', ratio=ratio, bias_correction='on',
                              bias_fold='all_taps', **extra)
      top1 = ev.evaluate(res.variables, ds, widths=res.widths, progress=False)['top1']
      print(f'{name}: ratio {ratio}: lbyl + bc (all taps) top-1 {top1:.2f}', flush=True)


if __name__ == '__main__':
  main()
