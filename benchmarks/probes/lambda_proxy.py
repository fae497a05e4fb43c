"""The rejected data-free lambda rule: mean predicted relative activation error of LBYL under
the BN-moments model, per lambda2 (benchmarks/NOTES.md). Prints to stdout.

  python -m benchmarks.probes.lambda_proxy
"""

from __future__ import annotations

import numpy as np

from benchmarks import reproduce


def main() -> None:
  from lbyl_jax.pruning import moments
  from lbyl_jax.pruning.methods import bnm
  from lbyl_jax.pruning.methods import lbyl
  from lbyl_jax.pruning.selection import Selection, build_problems

  for arch in ('resnet20', 'resnet56_b'):
    spec, v, _, _ = reproduce._loaded(arch)  # pylint: disable=protected-access
    for ratio in [0.1, 0.3, 0.5]:
      probs = build_problems(spec, v, Selection(ratio=ratio))
      M2 = moments.unit_moments(spec, v, probs, cov_model='diag')
      out = []
      for lam2 in [1e-4, 1e-3, 1e-2, 1e-1, 1, 10]:
        sols = lbyl.solve_problems(probs, lam1=0.0, lam2=lam2, with_cond=False)
        rel = []
        for p, s, (_, M) in zip(probs, sols, M2):
          K, P = p.keep, p.prune
          r = bnm._residual(s.S_P[None], M[np.ix_(P, P)][None], M[np.ix_(P, K)][None],  # pylint: disable=protected-access
                            M[np.ix_(K, K)][None])[0]
          rel.append(r / np.trace(M[np.ix_(P, P)]))
        out.append((lam2, round(float(np.mean(rel)), 4)))
      print(arch, ratio, out, flush=True)


if __name__ == '__main__':
  main()
