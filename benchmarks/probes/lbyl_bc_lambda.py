"""One guess at the BN-moments prototype's "LBYL + bias correction" row (benchmarks/NOTES.md):
LBYL with lambda2 = 0.1, bias correction with the prototype's fold, NM ResNet-56 at 40 / 50 %,
full CIFAR-10 test set. Reads ../shared or $LBYL_JAX_SHARED. Log:
``benchmarks/results/probe_lbyl_bc_lambda.log``.

  python -m benchmarks.probes.lbyl_bc_lambda
"""

from __future__ import annotations

from benchmarks import reproduce


def main() -> None:
  from lbyl_jax import pipeline

  spec, variables, ds, ev = reproduce._loaded('resnet56_b')  # pylint: disable=protected-access
  for ratio in (0.4, 0.5):
    res = pipeline.compress(spec, variables, method='lbyl', ratio=ratio, lambda2=0.1,
                            bias_correction='on', bias_fold='all_taps')
    print(f"lambda2 0.1 ratio {ratio}: lbyl + bc (all taps) top-1"
          f" {ev.evaluate(res.variables, ds, widths=res.widths, progress=False)['top1']:.2f}",
          flush=True)


if __name__ == '__main__':
  main()
