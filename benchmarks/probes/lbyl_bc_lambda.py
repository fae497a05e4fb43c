"""One guess at the BN_MOMENTS.md prototype's "LBYL + bias correction" row (benchmarks/NOTES.md):
LBYL with lambda2 = 0.1, bias correction with the prototype's fold, NM ResNet-56 at 40 / 50 %,
full CIFAR-10 test set. Reads ../shared or $LBYL_JAX_SHARED.

  python benchmarks/probes/lbyl_bc_lambda.py
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
import reproduce  # noqa: E402
from lbyl_jax.compress import restore  # noqa: E402

spec, variables, ds, ev = reproduce._loaded('resnet56_b')  # pylint: disable=protected-access
for ratio in (0.4, 0.5):
  cfg = restore.RestoreConfig(method='lbyl', ratio=ratio, lambda2=0.1, bias_correction='on',
                              bias_fold='all_taps')
  widths, new, _ = restore.restore(spec, variables, cfg)
  print(f"lambda2 0.1 ratio {ratio}: lbyl + bc (all taps) top-1"
        f" {ev.evaluate(new, ds, widths=widths, progress=False)['top1']:.2f}", flush=True)
