"""The guard's own statistics quoted in benchmarks/NOTES.md ("no data-free signal"): per model,
method and ratio, the rows switched off, the mean factor t and the median predicted error relative
to plain pruning before / after the guard. No evaluation; reads ../shared or $LBYL_JAX_SHARED.

  python benchmarks/probes/guard_stats.py
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
import reproduce  # noqa: E402
from lbyl_jax.compress import restore  # noqa: E402

for arch in ('resnet20', 'resnet56', 'resnet56_b'):
  spec, variables, _, _ = reproduce._loaded(arch)  # pylint: disable=protected-access
  for method in ('lbyl', 'nm'):
    for ratio in (0.3, 0.5):
      _, _, rep = restore.restore(spec, variables, restore.RestoreConfig(method=method, ratio=ratio,
                                                                         guard='moments'))
      d = [layer['diagnostics'] for layer in rep['layers']]
      pruned = sum(layer['width_before'] - layer['width_after'] for layer in rep['layers'])
      print(f"{arch} {method} {ratio}: rows off {sum(x['guard_zero_rows'] for x in d)}/{pruned}"
            f", mean t {np.mean([x['guard_t_mean'] for x in d]):.3f}, median predicted error vs"
            f" prune: method {np.median([x['guard_pred_error_method'] for x in d]):.3f},"
            f" guarded {np.median([x['guard_pred_error'] for x in d]):.3f}", flush=True)
