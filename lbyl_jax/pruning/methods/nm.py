"""Neuron Merging (docs/neuron_merging.md): each pruned channel is merged into ONE kept channel.

Row j of S_P has at most one non-zero entry, the merge scale of the chosen kept channel (or none:
plain pruning of that channel). All pruned channels of a unit are handled at once on (p, m)
matrices.

- MLP units (no BN, docs/neuron_merging.md#mlp-rule): cosine similarity of [w, bias] rows, k* = argmax, merge if cos >= t with
  scale ||W_j|| / ||W_k*||.
- Conv + BN units (docs/neuron_merging.md#bn-rule): a score mixing cosine distance and a BN-shift mismatch picks k*.
  ``nm_mode='exact'`` (default) uses the exact scale s * alpha_j / alpha_k (docs/neuron_merging.md#exact-form), for which
  a_j = scale * a_k holds exactly when W_j = s W_k and b_j = scale * b_k, and the shift mismatch
  |b_j - scale * b_k| (the pre-activation error that merging leaves, [DERIVED]).
  ``nm_mode='reference_code'`` reproduces decompose.py: the running VARIANCE as "sg" (no sqrt, no
  eps), the inverted scale s * (gamma_k / gamma_j) * (sg_j / sg_k), and its bias distance.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from lbyl_jax.core.options import NONNEG, number, option
from lbyl_jax.pruning.methods.base import Method, register
from lbyl_jax.pruning.problem import UnitProblem, UnitSolution, coefficient_stats


def _norms_and_cos(W: np.ndarray, keep: np.ndarray, prune: np.ndarray):
  """Row norms of W_P, W_K and the (p, m) cosine matrix (0 where a filter is all zero)."""
  W = np.asarray(W, np.float64)
  nP = np.linalg.norm(W[prune], axis=1)
  nK = np.linalg.norm(W[keep], axis=1)
  denom = nP[:, None] * nK[None, :]
  dots = W[prune] @ W[keep].T
  cos = np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)
  return nP, nK, cos


def merge_mlp(W: np.ndarray, keep: np.ndarray, prune: np.ndarray, *, t: float | None) -> np.ndarray:
  """S_P of docs/neuron_merging.md#mlp-rule (rows W_i = [w_i, bias_i]); ``t=None`` merges every pruned neuron."""
  nP, nK, cos = _norms_and_cos(W, keep, prune)
  S = np.zeros((prune.size, keep.size))
  if prune.size == 0:
    return S
  k = np.argmax(cos, axis=1)  # first maximum on ties
  rows = np.arange(prune.size)
  best = cos[rows, k]
  ok = (nK[k] > 0) if t is None else (nK[k] > 0) & (best >= t)
  S[rows[ok], k[ok]] = nP[ok] / nK[k[ok]]
  return S


def merge_bn(
    W: np.ndarray, bn, keep: np.ndarray, prune: np.ndarray, *, t: float, lam: float,
    mode: str = 'exact',
) -> np.ndarray:
  """S_P of docs/neuron_merging.md#bn-rule for a conv (or linear) followed by BN.

  Args:
    bn: the dict of :func:`lbyl_jax.pruning.units.bn_affine` (float64).
    t: cosine-similarity threshold; a pruned channel whose chosen partner has cos < t is not merged.
    lam: weight of the cosine distance in the score (1 - lam weighs the bias distance).
    mode: 'exact' or 'reference_code' (docs/neuron_merging.md#reference-code-form).
  """
  nP, nK, cos = _norms_and_cos(W, keep, prune)
  S = np.zeros((prune.size, keep.size))
  if prune.size == 0:
    return S
  K, P = keep, prune
  cd = 1.0 - cos
  with np.errstate(divide='ignore', invalid='ignore'):
    s = nP[:, None] / nK[None, :]
    if mode == 'exact':
      alpha, b = np.asarray(bn['alpha'], np.float64), np.asarray(bn['b'], np.float64)
      scale = s * alpha[P, None] / alpha[None, K]
      bd = np.abs(b[P, None] - scale * b[None, K])
    elif mode == 'reference_code':
      gamma = np.asarray(bn['gamma'], np.float64)
      beta = np.asarray(bn['beta'], np.float64)
      mu = np.asarray(bn['mu'], np.float64)
      sg = np.asarray(bn['var'], np.float64)  # docs/README.md#bn-terms: running variance, no sqrt, no eps
      scale = s * (gamma[None, K] / gamma[P, None]) * (sg[P, None] / sg[None, K])
      kink = mu[P] - sg[P] * beta[P] / gamma[P]  # channel j's ReLU kink in its input units
      bn_k = (gamma[None, K] / sg[None, K]) * (s * kink[:, None] - mu[None, K]) + beta[None, K]
      bd = np.abs(bn_k) / scale
    else:
      raise ValueError(f"nm_mode must be 'exact' or 'reference_code', got {mode!r}")
  # Kept channels that cannot carry a merge (zero filter, zero alpha or gamma) are never chosen.
  valid = np.isfinite(scale) & np.isfinite(bd) & (nK[None, :] > 0)
  bd = np.where(valid, bd, np.nan)
  lo = np.min(np.where(valid, bd, np.inf), axis=1, keepdims=True)
  hi = np.max(np.where(valid, bd, -np.inf), axis=1, keepdims=True)
  rng = hi - lo
  bdn = np.divide(bd - lo, rng, out=np.zeros_like(bd), where=np.isfinite(rng) & (rng > 0))
  score = np.where(valid, lam * cd + (1.0 - lam) * bdn, np.inf)
  k = np.argmin(score, axis=1)  # first minimum on ties
  rows = np.arange(P.size)
  ok = np.isfinite(score[rows, k]) & (cos[rows, k] >= t)
  S[rows[ok], k[ok]] = scale[rows[ok], k[ok]]
  return S


def solve_problems(
    problems: Sequence[UnitProblem], *, t: float, lam: float, mode: str = 'exact'
) -> list[UnitSolution]:
  """NM rows S_P for every unit (MLP rule for units without BN, docs/neuron_merging.md#bn-rule otherwise)."""
  out = []
  for p in problems:
    t0 = time.perf_counter()
    if p.unit.bn is None:
      S = merge_mlp(p.W, p.keep, p.prune, t=t)
    else:
      S = merge_bn(p.W, p.bn, p.keep, p.prune, t=t, lam=lam, mode=mode)
    merged = int(np.count_nonzero(np.any(S != 0, axis=1)))
    diag = dict(method='nm', nm_mode=mode, t=float(t), lam=float(lam), merged=merged,
                solve_seconds=time.perf_counter() - t0, compile_seconds=0.0,
                **coefficient_stats(S))
    out.append(UnitSolution(S, None, diag))
  return out


@register
@dataclasses.dataclass(frozen=True)
class NeuronMerging(Method):
  """Neuron Merging: every pruned channel is merged into one kept channel (docs/neuron_merging.md).

  ``t`` / ``lam`` default to the preset's values (the official scripts'), ``spec.hparams['nm']``.
  """

  name = 'nm'
  summary = 'Neuron Merging (one-to-one delivery)'

  nm_t: float | None = option(None, help='cosine-similarity threshold', default_text="the preset's",
                           check=NONNEG)
  nm_lam: float | None = option(None, help='weight of the cosine distance in the score',
                             default_text="the preset's", check=number(0.0, 1.0))
  nm_mode: str = option('exact', help="'exact' BN algebra, or the official code's 'reference_code'",
                     choices=('exact', 'reference_code'), advanced=True)

  def resolved(self, spec) -> tuple[float, float]:
    hp = spec.hparams.get('nm', {})
    t = self.nm_t if self.nm_t is not None else hp.get('t')
    lam = self.nm_lam if self.nm_lam is not None else hp.get('lam')
    if t is None or lam is None:
      raise ValueError(f'{spec.name}: no Neuron Merging defaults for this model; give --nm-t and'
                       ' --nm-lam')
    return float(t), float(lam)

  def deliver(self, spec, variables, problems, context):
    del variables, context
    t, lam = self.resolved(spec)
    return solve_problems(problems, t=t, lam=lam, mode=self.nm_mode)

  def default_bias_correction(self) -> str:
    return 'on' if self.nm_mode == 'exact' else 'off'

  def depthwise_options(self, spec):
    """NM on the composite channel (docs/mobilenet_v2.md#neuron-merging-on-the-composite-channel):
    the same t and lam; the official code's form has no derivation there."""
    if self.nm_mode != 'exact':
      raise ValueError(f'--nm-mode {self.nm_mode} has no form for depthwise units'
                       f' ({spec.name}); use --nm-mode exact')
    t, lam = self.resolved(spec)
    return dict(t=t, lam=lam)

  def preset(self, name):
    return {'nm_mode': 'reference_code'} if name == 'reference_code' else {}
