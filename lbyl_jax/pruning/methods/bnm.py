"""BN-moments compensation (docs/bn_moments.md): a data-free delivery fitted on modelled ReLU activations.

Per unit (docs/README.md#notation notation):

1. Pre-activation model y ~ N(mean, Sigma_y). BN units: mean = beta,
   Sigma_y[i, j] = |gamma_i| |gamma_j| rho_ij with rho the correlations of f_i = alpha_i W_i under
   the input-patch covariance Sx (``config.bnm_cov``: 'identity', or 'diag' = per-input-channel
   variances from :func:`lbyl_jax.pruning.moments.propagate` repeated over the kernel taps). BN-free (MLP)
   units: the propagated mean W E[x] + b and covariance W Cov(x) W^T, whatever ``bnm_cov`` says
   (without BN nothing else fixes the scale).
2. Moments of a = ReLU(y): E[a] and M = E[a a^T] in closed form (:mod:`lbyl_jax.pruning.moments`).
3. Fit. Default, no intercept: S_P = M_PK (M_KK + eps I)^{-1}, eps = 1e-6 trace(M_KK) / m.
   With an intercept (``bias_correction='on'``): S_P = C_PK (C_KK + eps I)^{-1} with
   C = M - E[a] E[a]^T and the constant c = E[a_P] - S_P E[a_K] (a_P ~ S_P a_K + c).
   ``bias_correction='auto'`` chooses per unit, data-free, see :func:`lbyl_jax.experimental.rules.auto_bias_rule`;
   ``'blend'`` takes the per-unit mixture of the two fits that the same rule's error model
   prefers (a weight in [0, 1] instead of 0 or 1).
4. Constants are returned ready for surgery's fold (consumer pre-BN output += sum over all taps
   V[:, P] c), corrected for zero padding (:func:`lbyl_jax.pruning.bias.fold_constant`).

The closed-form moments run in float64 JAX (one compiled elementwise kernel for every unit of every
network); the small SPD solves run batched in float64 NumPy (see the note above
:func:`second_moments`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lbyl_jax.core.options import option
from lbyl_jax.pruning import bias as bias_lib
from lbyl_jax.pruning import depthwise as depthwise_lib
from lbyl_jax.pruning import moments as moments_lib
from lbyl_jax.pruning.methods.base import Method, register
from lbyl_jax.pruning.problem import UnitProblem, UnitSolution, coefficient_stats
from lbyl_jax.experimental import rules as rules_lib

EPS_SCALE = 1e-6
BIAS_MODES = ('off', 'on', 'auto', 'blend')
ACTIVATIONS = ('relu', 'linear')


def _ridge_solve(A: np.ndarray, R: np.ndarray, eps_scale: float):
  """X = R (A + eps I)^{-1} for stacks A (B, m, m) SPD and R (B, p, m); eps = eps_scale tr(A)/m."""
  m = A.shape[-1]
  eps = eps_scale * np.trace(A, axis1=-2, axis2=-1) / m
  eps = np.where(eps > 0, eps, eps_scale)  # an all-zero block still needs a positive ridge
  Ar = A + eps[:, None, None] * np.eye(m)
  X = np.swapaxes(np.linalg.solve(Ar, np.swapaxes(R, -1, -2)), -1, -2)
  w = np.linalg.eigvalsh(Ar)
  cond = np.where(w[:, 0] > 0, w[:, -1] / np.where(w[:, 0] > 0, w[:, 0], 1.0), np.inf)
  return X, eps, cond

def _residual(S: np.ndarray, PP: np.ndarray, PK: np.ndarray, KK: np.ndarray) -> np.ndarray:
  """trace E[(u_P - S u_K)(u_P - S u_K)^T] from the blocks of E[u u^T] (batched)."""
  return (np.trace(PP, axis1=-2, axis2=-1) - 2.0 * np.einsum('bpk,bpk->b', S, PK)
          + np.einsum('bpk,bkl,bpl->b', S, KK, S))

def fit(problems: Sequence[UnitProblem], prepared: Sequence[tuple[np.ndarray, np.ndarray]], *,
        activation: str = 'relu', eps_scale: float = EPS_SCALE) -> list[dict[str, Any]]:
  """Both fits (uncentred, and centred with intercept) for every unit.

  Args:
    problems: the units (all with at least one pruned channel).
    prepared: (mean, cov) of each unit's pre-activations (:func:`preactivation`).

  Returns:
    Per unit a dict: E, M (activation moments); S0, c0 = E_P - S0 E_K (uncentred fit and the
    constant it leaves); S1, c1 (centred fit and its intercept); res0 = E||a_P - S0 a_K||^2,
    res1 = E||a_P - S1 a_K - c1||^2, res1_nobias = E||a_P - S1 a_K||^2 (traces under the model);
    second = trace M_PP; eps0 / eps1 and cond0 / cond1 of the regularized systems.
  """
  mom = moments_lib.second_moments(prepared, activation=activation)
  out: list[Any] = [None] * len(problems)
  buckets: dict[tuple[int, int, int], list[int]] = {}
  for i, p in enumerate(problems):
    buckets.setdefault((p.n, p.m, int(p.prune.size)), []).append(i)
  for idx in buckets.values():
    K = np.stack([problems[i].keep for i in idx])
    P = np.stack([problems[i].prune for i in idx])
    E = np.stack([mom[i][0] for i in idx])
    M = np.stack([mom[i][1] for i in idx])
    C = M - E[:, :, None] * E[:, None, :]
    take = lambda X, r, c: np.take_along_axis(np.take_along_axis(X, r[:, :, None], 1), c[:, None, :], 2)
    EK = np.take_along_axis(E, K, 1)
    EP = np.take_along_axis(E, P, 1)
    S0, eps0, cond0 = _ridge_solve(take(M, K, K), take(M, P, K), eps_scale)
    S1, eps1, cond1 = _ridge_solve(take(C, K, K), take(C, P, K), eps_scale)
    c0 = EP - np.einsum('bpk,bk->bp', S0, EK)
    c1 = EP - np.einsum('bpk,bk->bp', S1, EK)
    res0 = _residual(S0, take(M, P, P), take(M, P, K), take(M, K, K))
    res1 = _residual(S1, take(C, P, P), take(C, P, K), take(C, K, K))
    second = np.trace(take(M, P, P), axis1=-2, axis2=-1)
    for n, i in enumerate(idx):
      out[i] = dict(E=E[n], M=M[n], S0=S0[n], c0=c0[n], S1=S1[n], c1=c1[n], res0=float(res0[n]),
                    res1=float(res1[n]), res1_nobias=float(res1[n] + np.sum(c1[n] ** 2)),
                    second=float(second[n]), eps0=float(eps0[n]), eps1=float(eps1[n]),
                    cond0=float(cond0[n]), cond1=float(cond1[n]))
  return out

def solve(spec, variables: Mapping[str, Any] | None, problems: Sequence[UnitProblem], *,
          cov_model: str = 'diag', bias_mode: str = 'off', padding_aware: bool = True,
          activation: str = 'relu', moments: Mapping[str, moments_lib.InputMoments] | None = None,
          eps_scale: float = EPS_SCALE) -> list[UnitSolution]:
  """BN-moments delivery for every unit (docs/bn_moments.md); the 'bnm' method (:class:`BNM`).

  Args:
    spec, variables: the architecture and its ORIGINAL variables (may be None for BN units with
      ``bnm_cov='identity'`` and bias 'off' / 'on' without padding correction: synthetic tests).
    problems: one :class:`UnitProblem` per unit, in forward order.
    cov_model: input-patch covariance of BN units, 'identity' or 'diag'.
    bias_mode: 'off' (uncentred fit), 'on' (centred fit with its intercept), 'auto' / 'blend'
      (per unit, :func:`lbyl_jax.experimental.rules.auto_bias_rule`).
    activation: 'relu' (the method) or 'linear' (a = y; for exactness tests).
    moments: precomputed :func:`lbyl_jax.pruning.moments.propagate` output (computed when needed).
    eps_scale: the ridge eps = eps_scale * trace(A) / m.
    padding_aware: return constants for surgery's all-taps fold that reproduce the
      position-averaged effect under zero padding (:func:`lbyl_jax.pruning.bias.fold_constant`);
      the relative change from the raw c = E[a_P] - S_P E[a_K] is ``diag['bias_padding_change']``.
      False: the raw constant (the prototype's 'all_taps' fold).

  Returns:
    One :class:`UnitSolution` per unit: 'off': the no-intercept fit, bias None; 'on': the centred
    fit with its intercept; 'auto': per unit one of the two (:func:`lbyl_jax.experimental.rules.auto_bias_rule`), the choice
    and its inputs in ``diag['bias_rule']``.
  """
  if cov_model not in moments_lib.COV_MODELS:
    raise ValueError(f'bnm: cov_model must be one of {moments_lib.COV_MODELS}, got {cov_model!r}')
  if bias_mode not in BIAS_MODES:
    raise ValueError(f'bnm: bias_correction must be one of {BIAS_MODES}, got {bias_mode!r}')
  if activation not in ACTIVATIONS:
    raise ValueError(f'bnm: activation must be one of {ACTIVATIONS}, got {activation!r}')
  t0 = time.perf_counter()
  idx = [i for i, p in enumerate(problems) if p.prune.size]
  active = [problems[i] for i in idx]
  if bias_mode in rules_lib.RULE_MODES and active and variables is None:
    raise ValueError(f"bnm: bias_correction={bias_mode!r} needs the network's variables")
  if bias_mode in rules_lib.RULE_MODES and moments is None and spec is not None:
    moments = moments_lib.propagate(spec, variables)
  prepared, kinds, moments = moments_lib.prepare(spec, variables, active, cov_model, moments)
  fits = fit(active, prepared, activation=activation, eps_scale=eps_scale)
  cons = None
  if active and variables is not None and (bias_mode in rules_lib.RULE_MODES or (bias_mode == 'on' and padding_aware)):
    cons = bias_lib.consumer_terms(spec, variables, active, moments)
  rules = None
  if bias_mode in rules_lib.RULE_MODES and active:
    rules = rules_lib.auto_bias_rule(active, [(f['E'], f['M']) for f in fits],
                           [[(f['S0'], None), (f['S1'], f['c1'])] for f in fits], cons,
                           fractional=bias_mode == 'blend')
  share = (time.perf_counter() - t0) / max(len(problems), 1)
  out: list[UnitSolution] = []
  where = dict(zip(idx, range(len(idx))))
  for i, p in enumerate(problems):
    base = dict(method='bnm', bnm_cov=cov_model, bias_mode=bias_mode, activation=activation,
                solve_seconds=share, compile_seconds=0.0)
    if i not in where:
      S = np.zeros((0, p.m))
      out.append(UnitSolution(S, None, dict(base, fit='none', bias_weight=0.0,
                                            pred_rel_error=0.0, **coefficient_stats(S))))
      continue
    j = where[i]
    fr = fits[j]
    w = float(rules[j]['weight']) if rules is not None else (1.0 if bias_mode == 'on' else 0.0)
    if w > 0:
      if w < 1:  # 'blend': the mixture of the two fits
        S, c_raw = (1.0 - w) * fr['S0'] + w * fr['S1'], w * fr['c1']
        var, mean = rules_lib.residual_moments(fr['E'], fr['M'], p.keep, p.prune, S, c_raw)
        res, fit_name = float(np.sum(var + mean ** 2)), 'blend'
      else:
        S, c_raw, res, fit_name = fr['S1'], fr['c1'], fr['res1'], 'centred'
      cond, eps = fr['cond1'], fr['eps1']
      c = bias_lib.fold_constant(cons[j], p.prune, c_raw) if (cons is not None and padding_aware) else c_raw
    else:
      S, c_raw, c = fr['S0'], None, None
      res, cond, eps, fit_name = fr['res0'], fr['cond0'], fr['eps0'], 'uncentred'
    second = fr['second']

    def rel(x, second=second):
      return float(x / second) if second > 0 else 0.0

    diag = dict(
        base, fit=fit_name, sx=kinds[j], cond=float(cond), eps=float(eps),
        pred_rel_error=rel(res), pred_rel_error_uncentred=rel(fr['res0']),
        pred_rel_error_centred=rel(fr['res1']), bias_weight=w, **coefficient_stats(S))
    if c is not None:
      # Scalars only: reports are written as JSON.
      raw_norm = float(np.linalg.norm(c_raw))
      diag.update(bias_abs_mean=float(np.mean(np.abs(c))),
                  bias_raw_abs_mean=float(np.mean(np.abs(c_raw))),
                  bias_padding_change=float(np.linalg.norm(c - c_raw) / raw_norm) if raw_norm else 0.0,
                  bias_padding_aware=bool(cons is not None and padding_aware))
    if rules is not None:
      diag['bias_rule'] = {k: v for k, v in rules[j].items() if k != 'weight'}
    out.append(UnitSolution(np.ascontiguousarray(S), None if c is None else np.asarray(c), diag))
  return out


@register
@dataclasses.dataclass(frozen=True)
class BNM(Method):
  """BN-moments delivery: a data-free fit on modelled ReLU activations (docs/bn_moments.md).

  With the plan's bias correction 'on' it fits centred moments plus an intercept (its own
  constant); the default 'off' is the uncentred fit, which already carries the means.
  """

  name = 'bnm'
  summary = 'BN-moments fit on modelled activations'

  bnm_cov: str = option('diag', help='input-patch covariance model',
                    choices=moments_lib.COV_MODELS, advanced=True)
  bnm_spatial: str | None = option(
      None, choices=(None,) + depthwise_lib.SPATIAL_MODELS, advanced=True,
      help='spatial correlation of the depthwise window (depthwise units only,'
           ' docs/mobilenet_v2.md): calibrated on the BN running variances, independent or'
           ' constant positions', default_text="'calibrated'")

  def deliver(self, spec, variables, problems, context):
    t0 = time.perf_counter()
    sols = solve(spec, variables, problems, cov_model=self.bnm_cov,
                 bias_mode=context.bias_correction,
                 padding_aware=context.bias_fold == 'padding_aware')
    # bnm solves on the host: its whole time is solve time, shared evenly for the report's sums.
    share = (time.perf_counter() - t0) / max(len(sols), 1)
    out = []
    for sol in sols:
      diag = dict(sol.diag)
      diag.setdefault('solve_seconds', share)
      diag.setdefault('compile_seconds', 0.0)
      out.append(dataclasses.replace(sol, diag=diag))
    return out

  def depthwise_options(self, spec):
    """BN moments through the depthwise window (docs/mobilenet_v2.md#bn-moments-through-relu6-and-the-depthwise-conv)."""
    del spec
    return dict(cov=self.bnm_cov, spatial=self.bnm_spatial or 'calibrated')
