"""Compensation methods: a registry of ``fn(spec, variables, problems, config) -> [UnitSolution]``.

A method receives one :class:`UnitProblem` per prunable unit (filters, BN affine terms, kept and
pruned channel indices, all computed from the ORIGINAL weights, ALGORITHMS.md 2.1 / 2.4 / A6) and
returns, per unit, the rows S_P of the delivery matrix (section 1) plus an optional constant.
Surgery (:mod:`lbyl_jax.surgery`) folds them into the consumer layer.

Registered here: 'prune' (S_P = 0), 'nm' (section 4), 'lbyl' (section 5) and 'bnm'
(BN_MOMENTS.md, implemented in :mod:`lbyl_jax.bnm`, imported only when used).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lbyl_jax import units as units_lib


@dataclasses.dataclass(frozen=True)
class UnitProblem:
  """What a method sees of one prunable unit.

  Attributes:
    unit: the unit (producer, BN, consumer paths).
    W: producer filters, N x D float64 (torch order; MLP rows end with the bias, 2.2).
    bn: the dict of :func:`lbyl_jax.units.bn_affine` (gamma, beta, mu, var, sigma, alpha, b),
      float64, with ``sigma`` as chosen by ``config.bn_sigma``. A producer bias in front of a BN
      is already folded into ``mu`` and ``b``.
    keep: sorted kept indices K (int array, length m >= 1).
    prune: sorted pruned indices P (int array).
  """

  unit: units_lib.Unit
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


Method = Callable[[Any, Any, Sequence[UnitProblem], Any], list[UnitSolution]]

_REGISTRY: dict[str, Method] = {}


def register(name: str) -> Callable[[Method], Method]:
  """Decorator registering a method under ``name``; a second registration of a name is an error."""

  def deco(fn: Method) -> Method:
    if name in _REGISTRY:
      raise ValueError(f'method {name!r} is already registered')
    _REGISTRY[name] = fn
    return fn

  return deco


def get(name: str) -> Method:
  """The method called ``name``; a ValueError listing the known names otherwise."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(f'unknown method {name!r}; known: {", ".join(sorted(_REGISTRY))}') from None


def names() -> list[str]:
  return sorted(_REGISTRY)


def coefficient_stats(S_P: np.ndarray) -> dict[str, float]:
  """Mean and max |coefficient| over the pruned rows (LBYL Table A9; ALGORITHMS.md A11)."""
  if S_P.size == 0:
    return dict(coef_mean_abs=0.0, coef_max_abs=0.0)
  a = np.abs(S_P)
  return dict(coef_mean_abs=float(a.mean()), coef_max_abs=float(a.max()))


@register('prune')
def prune(spec, variables, problems: Sequence[UnitProblem], config) -> list[UnitSolution]:
  """Plain pruning: the pruned channels are dropped and nothing is delivered (S_P = 0)."""
  del spec, variables, config
  out = []
  for p in problems:
    S = np.zeros((p.prune.size, p.m))
    out.append(UnitSolution(S, None, dict(method='prune', **coefficient_stats(S))))
  return out


@register('nm')
def neuron_merging(spec, variables, problems: Sequence[UnitProblem], config) -> list[UnitSolution]:
  """Neuron Merging (ALGORITHMS.md 4), see :func:`lbyl_jax.nm.solve`."""
  from lbyl_jax import nm  # pylint: disable=import-outside-toplevel  (nm imports this module)

  return nm.solve(spec, variables, problems, config)


@register('lbyl')
def lbyl(spec, variables, problems: Sequence[UnitProblem], config) -> list[UnitSolution]:
  """LBYL delivery (ALGORITHMS.md 5), see :func:`lbyl_jax.lbyl.solve`."""
  from lbyl_jax import lbyl as lbyl_lib  # pylint: disable=import-outside-toplevel

  return lbyl_lib.solve(spec, variables, problems, config)


def _find_bnm():
  return importlib.util.find_spec('lbyl_jax.bnm')


def _bnm_module():
  if _find_bnm() is None:
    raise ValueError(
        "method 'bnm' (and bias_correction) needs lbyl_jax/bnm.py, which is not installed in this"
        ' checkout'
    )
  return importlib.import_module('lbyl_jax.bnm')


@register('bnm')
def bn_moments(spec, variables, problems: Sequence[UnitProblem], config) -> list[UnitSolution]:
  """BN-moments delivery (BN_MOMENTS.md), implemented by :func:`lbyl_jax.bnm.solve`."""
  t0 = time.perf_counter()
  sols = list(_bnm_module().solve(spec, variables, problems, config))
  # bnm solves on the host: its whole time is solve time, shared evenly for the report's sums.
  share = (time.perf_counter() - t0) / max(len(sols), 1)
  out = []
  for s in sols:
    diag = dict(s.diag)
    diag.setdefault('solve_seconds', share)
    diag.setdefault('compile_seconds', 0.0)
    out.append(dataclasses.replace(s, diag=diag))
  return out


def bias_module():
  """The module providing ``bias_constant`` (BN_MOMENTS.md, optional bias correction)."""
  return _bnm_module()
