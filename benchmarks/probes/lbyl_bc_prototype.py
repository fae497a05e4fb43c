"""Which setting reproduces the BN_MOMENTS.md prototype's "LBYL + bias correction" row at 40 / 50 %
(78.37 / 36.00; ours with the prototype's fold: 79.51 / 40.85)? NM ResNet-56, L2, the prototype's
all-taps fold, full CIFAR-10 test set. Each line varies one thing from our run: solver precision,
the BN sigma convention, or LBYL's lambdas (the grid of benchmarks/probes/lambda_grid.py).
Reads ../shared or $LBYL_JAX_SHARED.

  python benchmarks/probes/lbyl_bc_prototype.py ['VARIANT NAME' ...] [--ratios=0.1,0.2,0.3]
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
import reproduce  # noqa: E402
from lbyl_jax.compress import restore  # noqa: E402

VARIANTS = {
    'float64 solves': dict(dtype='float64'),
    'bn_sigma variance': dict(bn_sigma='variance'),
    'lambda1 0, lambda2 1e-4': dict(lambda1=0.0, lambda2=1e-4),
    'lambda1 1e-2, lambda2 1e-2': dict(lambda1=1e-2, lambda2=1e-2),
    'reference-code LBYL form': dict(lbyl_mode='reference_code'),
}
RATIOS = (0.4, 0.5)
args = sys.argv[1:]
for a in [a for a in args if a.startswith('--ratios=')]:  # e.g. --ratios=0.1,0.2,0.3
  RATIOS = tuple(float(x) for x in a.split('=', 1)[1].split(','))
  args.remove(a)
if args:  # run only the named variants, e.g. 'reference-code LBYL form'
  VARIANTS = {k: v for k, v in VARIANTS.items() if k in args}

spec, variables, ds, ev = reproduce._loaded('resnet56_b')  # pylint: disable=protected-access
for name, extra in VARIANTS.items():
  for ratio in RATIOS:
    cfg = restore.RestoreConfig(method='lbyl', ratio=ratio, bias_correction='on',
                                bias_fold='all_taps', **extra)
    widths, new, _ = restore.restore(spec, variables, cfg)
    top1 = ev.evaluate(new, ds, widths=widths, progress=False)['top1']
    print(f'{name}: ratio {ratio}: lbyl + bc (all taps) top-1 {top1:.2f}', flush=True)
