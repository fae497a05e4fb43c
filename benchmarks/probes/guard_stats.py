"""The guard's own statistics quoted in benchmarks/NOTES.md ("no data-free signal"): per model,
method and ratio, the rows switched off, the mean factor t and the median predicted error relative
to plain pruning before / after the guard (bias correction off, as in the guard sweep). No
evaluation; reads ../shared or $LBYL_JAX_SHARED. Log: ``benchmarks/results/probe_guard_stats.log``.

  python -m benchmarks.probes.guard_stats
"""

from __future__ import annotations

import numpy as np

from benchmarks import reproduce


def main() -> None:
  from lbyl_jax import pipeline

  for arch in ('resnet20', 'resnet56', 'resnet56_b'):
    spec, variables, _, _ = reproduce._loaded(arch)  # pylint: disable=protected-access
    for method in ('lbyl', 'nm'):
      for ratio in (0.3, 0.5):
        rep = pipeline.compress(spec, variables, method=method, ratio=ratio, guard='moments',
                                bias_correction='off').report
        d = [layer['diagnostics'] for layer in rep['layers']]
        pruned = sum(layer['width_before'] - layer['width_after'] for layer in rep['layers'])
        print(f"{arch} {method} {ratio}: rows off {sum(x['guard_zero_rows'] for x in d)}/{pruned}"
              f", mean t {np.mean([x['guard_t_mean'] for x in d]):.3f}, median predicted error vs"
              f" prune: method {np.median([x['guard_pred_error_method'] for x in d]):.3f},"
              f" guarded {np.median([x['guard_pred_error'] for x in d]):.3f}", flush=True)


if __name__ == '__main__':
  main()
