"""Probe of methods / lambdas on the akamaster ResNet-20, FIRST 1000 test images
(benchmarks/NOTES.md): the published forms (bias correction off), LBYL with larger ridges, bnm,
and NM's reference-code form. Reads ../shared or $LBYL_JAX_SHARED; prints to stdout.

  python -m benchmarks.probes.resnet20_methods
"""

from __future__ import annotations

import numpy as np

from benchmarks import reproduce

CONFIGS = [('prune', {}), ('lbyl', dict(lambda2=1e-2)), ('lbyl', dict(lambda2=1e-1)),
           ('lbyl', dict(lambda2=1.0)), ('lbyl', dict(lambda2=10.0)),
           ('lbyl', dict(lambda1=1.0, lambda2=1e-1)), ('bnm', {}),
           ('nm', dict(nm_mode='reference_code'))]


def main() -> None:
  from lbyl_jax import pipeline

  spec, v, ds, ev = reproduce._loaded('resnet20')  # pylint: disable=protected-access
  ds = ds.subset(1000)
  for ratio in [0.1, 0.3]:
    for m, kw in CONFIGS:
      try:
        res = pipeline.compress(spec, v, method=m, ratio=ratio, bias_correction='off', **kw)
        r = ev.evaluate(res.variables, ds, widths=res.widths, progress=False)
        cm = np.mean([l['diagnostics'].get('coef_max_abs', 0) for l in res.report['layers']])
        print(ratio, m, kw, r['top1'], 'mean max|coef|', round(cm, 3), flush=True)
      except Exception as e:  # pylint: disable=broad-except  (a probe: report and go on)
        print(ratio, m, kw, 'ERR', type(e).__name__, str(e)[:200], flush=True)


if __name__ == '__main__':
  main()
