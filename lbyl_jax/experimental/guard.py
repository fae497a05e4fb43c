"""Research: the moment guard, a data-free shrink of another method's delivery rows.

Each pruned channel's row of S_P is scaled by the factor in [0, 1] that minimises its post-ReLU
error under the BN-moments model (docs/bias_correction.md, "Guard"). It rescued the published
LBYL / NM forms on the akamaster ResNets, but the default bias correction does better, so the
guard is behind ``--help-all``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lbyl_jax.pruning import moments as moments_lib
from lbyl_jax.pruning.problem import UnitProblem, UnitSolution, coefficient_stats
from lbyl_jax.experimental.rules import row_terms


def guard_scales(S: np.ndarray, M: np.ndarray, keep: np.ndarray, prune: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per pruned channel j, the factor t_j in [0, 1] minimising E(a_j - t s_j^T a_K)^2.

  Under the model, ``E(a_j - t s_j^T a_K)^2 = M_jj - 2 t s_j^T M_Kj + t^2 s_j^T M_KK s_j``, so the
  unconstrained minimiser is ``t* = s_j^T M_Kj / s_j^T M_KK s_j``; it is clipped to [0, 1]: the
  guard never reverses or amplifies the method's delivery, it only shrinks it (t = 0: that channel
  is pruned without compensation). A dead pruned channel (a_j = 0 under the model, M_Kj = 0) gets
  t = 0, which is exactly right: removing it changes nothing.

  Returns:
    (t, predicted error of the method's rows, predicted error with t): per row
    ``E(a_j - t s_j^T a_K)^2`` (absolute; M_jj is the error of no delivery).
  """
  mpp, num, den = row_terms(np.asarray(S, np.float64), M, keep, prune)
  with np.errstate(divide='ignore', invalid='ignore'):
    t = np.where(den > 0, num / den, 0.0)
  t = np.clip(np.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0), 0.0, 1.0)

  def err(tt):
    return np.maximum(mpp - 2.0 * tt * num + tt ** 2 * den, 0.0)

  return t, err(np.ones_like(t)), err(t)

def guard(spec, variables: Mapping[str, Any], problems: Sequence[UnitProblem],
          solutions: Sequence[UnitSolution], *, cov_model: str = 'diag') -> list[UnitSolution]:
  """Applies :func:`guard_scales` to every unit's delivery (``--guard moments``).

  The moments are those of the BN-moments method (``cov_model``, default 'diag'): a
  data-free prediction of how well each delivery row reproduces its pruned activation after the
  ReLU, which LBYL's and NM's filter-space fits do not model. Rows are scaled by t_j; the per-unit
  diagnostics gain ``guard_t_mean``, ``guard_zero_rows`` (rows with t < 1e-6: in effect plain
  pruning) and the predicted errors of the unit's delivery relative to plain pruning's,
  sum_j E(a_j - t_j s_j^T a_K)^2 / sum_j E a_j^2, with the method's rows (``guard_pred_error_method``)
  and with the guarded rows (``guard_pred_error``, at most 1).
  """
  problems, solutions = list(problems), list(solutions)
  idx = [i for i, p in enumerate(problems) if p.prune.size]
  out = list(solutions)
  if not idx:
    return out
  mom = moments_lib.unit_moments(spec, variables, [problems[i] for i in idx], cov_model=cov_model)
  for i, (_, M) in zip(idx, mom):
    p, s = problems[i], solutions[i]
    t, e_method, e_guard = guard_scales(s.S_P, M, p.keep, p.prune)
    S = np.asarray(s.S_P, np.float64) * t[:, None]
    energy = float(np.sum(np.diagonal(M)[p.prune]))
    rel = (lambda e: float(np.sum(e) / energy)) if energy > 0 else (lambda e: 0.0)
    diag = dict(s.diag, guard='moments', guard_t_mean=float(t.mean()),
                guard_zero_rows=int(np.sum(t < 1e-6)), guard_pred_error_method=rel(e_method),
                guard_pred_error=rel(e_guard), **coefficient_stats(S))
    out[i] = dataclasses.replace(s, S_P=S.astype(np.asarray(s.S_P).dtype), diag=diag)
  return out
