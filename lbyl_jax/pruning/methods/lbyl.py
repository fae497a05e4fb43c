"""LBYL delivery coefficients (docs/lbyl.md): each pruned channel leaves its information to ALL
kept channels through a ridge-regularized least-squares row s_j.

Forms (``config.lbyl_mode``):

- 'consistent' (docs/lbyl.md#consistent-closed-form, default): F = diag(alpha_K) W_K, f_j = alpha_j W_j, and
  (F F^T + lam1 b_K b_K^T + lam2 I) s_j = F f_j + lam1 b_j b_K, one SPD matrix per layer.
- 'reference_code' (docs/lbyl.md#reference-code-form): the official code's per-row systems with the BN running variance as
  "sg", the BN rank-1 term turned into a diagonal ||a||^2 shift, and c (not K * c) applied.
- MLP units (no BN, docs/lbyl.md#units-without-bn): alpha = 1, b = 0, bias already a filter coordinate; lam1 plays no role.
  In 'reference_code' mode the filters are centred over their D coordinates first, which is what
  the official code's sklearn ``Ridge(fit_intercept=True)`` does before discarding the intercept.

Build systems here, solve them batched in :mod:`lbyl_jax.pruning.solvers`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from lbyl_jax.core.options import NONNEG, option
from lbyl_jax.pruning import solvers
from lbyl_jax.pruning.methods.base import Method, register
from lbyl_jax.pruning.problem import UnitProblem, UnitSolution, coefficient_stats


def consistent_system(problem: UnitProblem, lam1: float, lam2: float) -> solvers.SharedSystem:
  """The docs/lbyl.md#consistent-closed-form system of one unit (docs/lbyl.md#units-without-bn for units without BN: alpha = 1, b = 0)."""
  K, P = problem.keep, problem.prune
  alpha = np.asarray(problem.bn['alpha'], np.float64)
  b = np.asarray(problem.bn['b'], np.float64)
  W = np.asarray(problem.W, np.float64)
  F = alpha[K, None] * W[K]
  FP = alpha[P, None] * W[P]
  return solvers.SharedSystem(F, FP, b[K], b[P], float(lam1), float(lam2), problem.unit.name)


def mlp_reference_system(problem: UnitProblem, lam2: float) -> solvers.SharedSystem:
  """docs/lbyl.md#units-without-bn reference: ridge on filters centred over their D coordinates (sklearn's intercept)."""
  W = np.asarray(problem.W, np.float64)
  Wc = W - W.mean(axis=1, keepdims=True)
  K, P = problem.keep, problem.prune
  return solvers.SharedSystem(
      Wc[K], Wc[P], np.zeros(K.size), np.zeros(P.size), 0.0, float(lam2), problem.unit.name)


def reference_system(problem: UnitProblem, lam1: float, lam2: float) -> solvers.RowSystem:
  """The official code's per-row normal equations (docs/lbyl.md#reference-code-form), variance as sg, for one BN unit.

  For pruned j and kept k: K_jk = (gamma_j / gamma_k) (sg_k / sg_j), a_k = mu_k - sg_k beta_k /
  gamma_k, and
    (W_K W_K^T + lam1 (gamma_j / sg_j)^2 ||a||^2 I + lam2 diag(K_j^2)) c_j
        = W_K W_j + lam1 (gamma_j / sg_j) (gamma_j mu_j / sg_j - beta_j) a.
  """
  name = problem.unit.name
  K, P = problem.keep, problem.prune
  bn = problem.bn
  gamma = np.asarray(bn['gamma'], np.float64)
  beta = np.asarray(bn['beta'], np.float64)
  mu = np.asarray(bn['mu'], np.float64)
  sg = np.asarray(bn['var'], np.float64)  # docs/README.md#bn-terms: the code's "sg" is the raw running variance
  if np.any(gamma[K] == 0) or np.any(gamma[P] == 0):
    raise ValueError(f"{name}: lbyl_mode='reference_code' divides by BN gamma, which has zeros"
                     " here; use lbyl_mode='consistent'")
  W = np.asarray(problem.W, np.float64)
  Kjk = (gamma[P, None] / gamma[None, K]) * (sg[None, K] / sg[P, None])  # (p, m)
  a = mu[K] - sg[K] * beta[K] / gamma[K]  # (m,)
  g = gamma[P] / sg[P]  # (p,)
  d = lam1 * (g**2 * np.dot(a, a))[:, None] + lam2 * Kjk**2
  e = (lam1 * g * (gamma[P] * mu[P] / sg[P] - beta[P]))[:, None] * a[None, :]
  return solvers.RowSystem(W[K], W[P], d, e, name)


def build_system(problem: UnitProblem, *, lam1: float, lam2: float, mode: str) -> solvers.System:
  """The system of one unit for ``mode`` in {'consistent', 'reference_code'}."""
  if mode == 'consistent':
    return consistent_system(problem, lam1, lam2)
  if mode == 'reference_code':
    if problem.unit.bn is None:
      return mlp_reference_system(problem, lam2)
    return reference_system(problem, lam1, lam2)
  raise ValueError(f"lbyl_mode must be 'consistent' or 'reference_code', got {mode!r}")


def solve_problems(
    problems: Sequence[UnitProblem], *, lam1: float, lam2: float, mode: str = 'consistent',
    dtype: str = 'float32', with_cond: bool = True,
) -> list[UnitSolution]:
  """LBYL rows S_P for every unit (batched across units of equal shapes; each unit's system is
  built when its bucket is solved, :class:`~lbyl_jax.pruning.solvers.Deferred`)."""
  if mode not in ('consistent', 'reference_code'):
    raise ValueError(f"lbyl_mode must be 'consistent' or 'reference_code', got {mode!r}")
  systems = [solvers.Deferred(
      'row' if mode == 'reference_code' and p.unit.bn is not None else 'shared', p.m,
      int(p.prune.size), int(np.shape(p.W)[1]),
      functools.partial(build_system, p, lam1=lam1, lam2=lam2, mode=mode), p.unit.name)
             for p in problems]
  results = solvers.solve(systems, dtype=dtype, with_cond=with_cond)
  out = []
  for r in results:
    diag = dict(method='lbyl', lbyl_mode=mode, lam1=float(lam1), lam2=float(lam2), **r.diag,
                **coefficient_stats(r.S_P))
    out.append(UnitSolution(r.S_P, None, diag))
  return out


# Used when neither the options nor ``spec.hparams['lbyl']`` give a value (docs/lbyl.md).
DEFAULT_LAMBDA1 = 1e-5
DEFAULT_LAMBDA2 = 1e-3


@register
@dataclasses.dataclass(frozen=True)
class LBYL(Method):
  """Leave Before You Leave: each pruned channel is delivered to all kept channels (docs/lbyl.md)."""

  name = 'lbyl'
  summary = 'Leave Before You Leave (many-to-one delivery)'

  lambda1: float | None = option(None, help='weight of the BN-shift error',
                                 check=NONNEG, default_text="the preset's, else 1e-5")
  lambda2: float | None = option(None, help='ridge weight', check=NONNEG,
                                 default_text="the preset's, else 1e-3")
  lbyl_mode: str = option('consistent', help="'consistent' closed form, or the official code's"
                     " 'reference_code' normal equations",
                     choices=('consistent', 'reference_code'), advanced=True)
  dtype: str = option('float32', help='solver precision', choices=('float32', 'float64'),
                      advanced=True)

  def resolved_lambdas(self, spec) -> tuple[float, float]:
    hp = spec.hparams.get('lbyl', {})
    lam1 = self.lambda1 if self.lambda1 is not None else hp.get('lambda1', DEFAULT_LAMBDA1)
    lam2 = self.lambda2 if self.lambda2 is not None else hp.get('lambda2', DEFAULT_LAMBDA2)
    return float(lam1), float(lam2)

  def deliver(self, spec, variables, problems, context):
    del variables, context
    lam1, lam2 = self.resolved_lambdas(spec)
    return solve_problems(problems, lam1=lam1, lam2=lam2, mode=self.lbyl_mode, dtype=self.dtype)

  def default_bias_correction(self) -> str:
    return 'on' if self.lbyl_mode == 'consistent' else 'off'

  def solver_dims(self, units, dims):
    # The kinds of solve_problems' Deferred systems.
    return [('row' if self.lbyl_mode == 'reference_code' and u.bn is not None else 'shared',
             m, p, d) for u, (m, p, d) in zip(units, dims)]

  def depthwise_options(self, spec):
    """LBYL's consistent form on the composite filters (docs/mobilenet_v2.md#lbyl-on-the-composite-channel);
    the official code's normal equations have no derivation there."""
    if self.lbyl_mode != 'consistent':
      raise ValueError(f'--lbyl-mode {self.lbyl_mode} has no form for depthwise units'
                       f' ({spec.name}); use --lbyl-mode consistent')
    lam1, lam2 = self.resolved_lambdas(spec)
    return dict(lambda1=lam1, lambda2=lam2, dtype=self.dtype)

  def preset(self, name):
    return {'lbyl_mode': 'reference_code'} if name == 'reference_code' else {}
