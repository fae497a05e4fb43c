"""The data every stage of a compression plan passes on, per prunable unit.

:class:`UnitProblem` is what selection produces and what a delivery method sees (filters, BN terms,
kept / pruned channels, all from the ORIGINAL weights); :class:`UnitSolution` is a method's answer
(delivery rows S_P and an optional constant), which corrections may adjust and surgery folds into
the consumer (docs/README.md, "Delivery").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from lbyl_jax.core.units import Unit


@dataclasses.dataclass(frozen=True)
class UnitProblem:
  """What a method sees of one prunable unit.

  Attributes:
    unit: the unit (producer, BN, consumer paths).
    W: producer filters, N x D float64 (torch order; MLP rows end with the bias).
    bn: the dict of :func:`lbyl_jax.pruning.terms.bn_terms` (gamma, beta, mu, var, sigma, alpha,
      b), float64, with ``sigma`` as chosen by the selection's ``bn_sigma``. A producer bias in
      front of a BN is already folded into ``mu`` and ``b``.
    keep: sorted kept indices K (int array, length m >= 1).
    prune: sorted pruned indices P (int array).
  """

  unit: Unit
  W: np.ndarray
  bn: Mapping[str, np.ndarray]
  keep: np.ndarray
  prune: np.ndarray

  @property
  def n(self) -> int:
    return int(self.W.shape[0])

  @property
  def m(self) -> int:
    return int(self.keep.size)


@dataclasses.dataclass(frozen=True)
class UnitSolution:
  """A method's answer for one unit.

  Attributes:
    S_P: |P| x m float64; row j holds the coefficients of pruned channel P[j] on the kept channels.
    bias: |P| float64 constant c with a_P ~ S_P a_K + c, or None. Surgery folds it as
      consumer pre-BN output += sum over taps V[:, P] c.
    diag: per-unit diagnostics (coefficient statistics, solver details, timings).
  """

  S_P: np.ndarray
  bias: np.ndarray | None = None
  diag: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def coefficient_stats(S_P: np.ndarray) -> dict[str, float]:
  """Mean and max |coefficient| over the pruned rows (LBYL's Table A9 statistics)."""
  if S_P.size == 0:
    return dict(coef_mean_abs=0.0, coef_max_abs=0.0)
  a = np.abs(S_P)
  return dict(coef_mean_abs=float(a.mean()), coef_max_abs=float(a.max()))


def check_solutions(problems, sols, method: str) -> None:
  """Shapes (|P| x m) and finiteness of a method's rows; ValueError naming the unit otherwise."""
  if len(sols) != len(problems):
    raise ValueError(f'method {method!r} returned {len(sols)} solutions for {len(problems)} units')
  for p, s in zip(problems, sols):
    shape = (p.prune.size, p.m)
    if np.shape(s.S_P) != shape:
      raise ValueError(f'{p.unit.name}: method {method!r} returned S_P of shape {np.shape(s.S_P)},'
                       f' expected {shape}')
    if not np.all(np.isfinite(s.S_P)):
      raise ValueError(f'{p.unit.name}: method {method!r} returned non-finite coefficients')
