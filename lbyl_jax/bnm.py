"""BN-moments compensation (BN_MOMENTS.md): a data-free delivery fitted on modelled ReLU activations.

Per unit (ALGORITHMS.md section 1 notation):

1. Pre-activation model y ~ N(mean, Sigma_y). BN units: mean = beta,
   Sigma_y[i, j] = |gamma_i| |gamma_j| rho_ij with rho the correlations of f_i = alpha_i W_i under
   the input-patch covariance Sx (``config.bnm_cov``: 'identity', or 'diag' = per-input-channel
   variances from :func:`lbyl_jax.moments.propagate` repeated over the kernel taps). BN-free (MLP)
   units: the propagated mean W E[x] + b and covariance W Cov(x) W^T, whatever ``bnm_cov`` says
   (without BN nothing else fixes the scale).
2. Moments of a = ReLU(y): E[a] and M = E[a a^T] in closed form (:mod:`lbyl_jax.moments`).
3. Fit. Default, no intercept: S_P = M_PK (M_KK + eps I)^{-1}, eps = 1e-6 trace(M_KK) / m.
   With an intercept (``bias_correction='on'``): S_P = C_PK (C_KK + eps I)^{-1} with
   C = M - E[a] E[a]^T and the constant c = E[a_P] - S_P E[a_K] (a_P ~ S_P a_K + c).
   ``bias_correction='auto'`` chooses per unit, data-free, see :func:`auto_bias_rule`.

Solves run in float64 JAX, batched with vmap over units of equal (N, m, |P|) (one compile per
shape bucket, cached by jit).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lbyl_jax import moments as moments_lib
from lbyl_jax import units as units_lib
from lbyl_jax.methods import UnitProblem, UnitSolution, coefficient_stats

EPS_SCALE = 1e-6
COV_MODELS = ('identity', 'diag')
BIAS_MODES = ('off', 'on', 'auto')
ACTIVATIONS = ('relu', 'linear')


def _option(config, name: str, default, choices) -> Any:
  value = getattr(config, name, default) if config is not None else default
  if value not in choices:
    raise ValueError(f'bnm: {name} must be one of {choices}, got {value!r}')
  return value


# --------------------------------------------------------------------------------------------
# Pre-activation model.


def preactivation(problem: UnitProblem, moments: moments_lib.InputMoments | None, *,
                  cov_model: str = 'diag') -> tuple[np.ndarray, np.ndarray, str]:
  """(mean, covariance, model name) of the unit's pre-activations y (N,), (N, N), float64.

  Args:
    problem: the unit (W, bn as in :class:`lbyl_jax.methods.UnitProblem`).
    moments: the producer's input moments (needed for 'diag' and for BN-free units).
    cov_model: 'identity' or 'diag' Sx for BN units.
  """
  W = np.asarray(problem.W, np.float64)
  name = problem.unit.name
  if problem.unit.bn is None:
    if moments is None:
      raise ValueError(f'{name}: a BN-free unit needs propagated input moments')
    mean, cov = moments_lib.dense_preactivation(W, moments)
    return mean, 0.5 * (cov + cov.T), 'propagated'
  bn = problem.bn
  f = np.asarray(bn['alpha'], np.float64)[:, None] * W
  if cov_model == 'identity':
    G = f @ f.T
  elif cov_model == 'diag':
    if moments is None:
      raise ValueError(f"{name}: bnm_cov='diag' needs propagated input moments")
    c = moments.var.shape[0]
    if W.shape[1] % c:
      raise ValueError(f'{name}: filters of length {W.shape[1]} do not split into {c} input channels')
    sx = np.repeat(moments.var, W.shape[1] // c)  # torch order (C_in, kh, kw): taps innermost
    G = (f * sx) @ f.T
  else:
    raise ValueError(f"bnm_cov must be 'identity' or 'diag', got {cov_model!r}")
  norm = np.sqrt(np.maximum(np.diagonal(G), 0.0))
  ok = norm > 0
  ns = np.where(ok, norm, 1.0)
  rho = np.clip(G / np.outer(ns, ns), -1.0, 1.0)
  # A zero filter carries no correlation information: treat its channel as independent.
  rho = np.where(np.outer(ok, ok), rho, 0.0)
  np.fill_diagonal(rho, 1.0)
  g = np.abs(np.asarray(bn['gamma'], np.float64))
  return np.asarray(bn['beta'], np.float64).copy(), g[:, None] * rho * g[None, :], cov_model


# --------------------------------------------------------------------------------------------
# Moments (JAX, batched) and fits (NumPy, batched).
#
# The closed-form moments are the expensive, elementwise part: one jit-compiled, vmapped kernel per
# channel count N. The fits are small SPD solves (m <= 512) done with batched NumPy LAPACK on the
# host: with jaxlib 0.10.2 on a 2-core CPU, batched LAPACK custom calls (Cholesky, eigh) inside a
# larger XLA program deadlock intermittently (the LAPACK kernel waits on the intra-op thread pool
# from one of that pool's own workers), so they are kept out of XLA.

_MOMENT_CACHE: dict[tuple, Any] = {}


def _moments_batch(mean: np.ndarray, cov: np.ndarray, activation: str) -> tuple[np.ndarray, np.ndarray]:
  key = (activation, mean.shape)
  fn = _MOMENT_CACHE.get(key)
  if fn is None:
    fn = jax.jit(jax.vmap(lambda a, b: moments_lib.relu_second_moments(a, b, activation=activation)))
    _MOMENT_CACHE[key] = fn
  with jax.enable_x64(True):
    E, M = fn(jnp.asarray(mean, jnp.float64), jnp.asarray(cov, jnp.float64))
    return np.asarray(E), np.asarray(M)


def second_moments(prepared: Sequence[tuple[np.ndarray, np.ndarray]], *, activation: str = 'relu'
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
  """(E[a], M = E[a a^T]) per unit from its pre-activation (mean, cov), batched by width N."""
  out: list[Any] = [None] * len(prepared)
  buckets: dict[int, list[int]] = {}
  for i, (mean, _) in enumerate(prepared):
    buckets.setdefault(int(mean.shape[0]), []).append(i)
  for idx in buckets.values():
    E, M = _moments_batch(np.stack([prepared[i][0] for i in idx]),
                          np.stack([prepared[i][1] for i in idx]), activation)
    for n, i in enumerate(idx):
      out[i] = (E[n], 0.5 * (M[n] + M[n].T))
  return out


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
  mom = second_moments(prepared, activation=activation)
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


# --------------------------------------------------------------------------------------------
# Method entry point.


def _prepare(spec, variables, problems, cov_model: str, moments):
  need = cov_model == 'diag' or any(p.unit.bn is None for p in problems)
  if need and moments is None:
    moments = moments_lib.propagate(spec, variables)
  prepared, kinds = [], []
  for p in problems:
    mom = moments.get(p.unit.name) if moments is not None else None
    if need and mom is None:
      raise ValueError(f'{spec.name}: no propagated moments for unit {p.unit.name}')
    mean, cov, kind = preactivation(p, mom, cov_model=cov_model)
    prepared.append((mean, cov))
    kinds.append(kind)
  return prepared, kinds


def solve(spec, variables: Mapping[str, Any], problems: Sequence[UnitProblem], config, *,
          activation: str = 'relu', moments: Mapping[str, moments_lib.InputMoments] | None = None,
          eps_scale: float = EPS_SCALE) -> list[UnitSolution]:
  """BN-moments delivery for every unit (BN_MOMENTS.md); the 'bnm' method of :mod:`lbyl_jax.methods`.

  Args:
    spec, variables: the architecture and its ORIGINAL variables.
    problems: one :class:`UnitProblem` per unit.
    config: reads ``bnm_cov`` ('identity' | 'diag', default 'diag') and ``bias_correction``
      ('off' | 'on' | 'auto', default 'off').
    activation: 'relu' (the method) or 'linear' (a = y; for exactness tests).
    moments: precomputed :func:`lbyl_jax.moments.propagate` output (computed when needed).
    eps_scale: the ridge eps = eps_scale * trace(A) / m.

  Returns:
    One :class:`UnitSolution` per unit: the no-intercept fit with bias None ('off'); the centred
    fit with its intercept ('on'); per-unit choice of :func:`auto_bias_rule` ('auto').
  """
  cov_model = _option(config, 'bnm_cov', 'diag', COV_MODELS)
  bias_mode = _option(config, 'bias_correction', 'off', BIAS_MODES)
  if activation not in ACTIVATIONS:
    raise ValueError(f'bnm: activation must be one of {ACTIVATIONS}, got {activation!r}')
  t0 = time.perf_counter()
  active = [i for i, p in enumerate(problems) if p.prune.size]
  prepared, kinds = _prepare(spec, variables, [problems[i] for i in active], cov_model, moments)
  fits = fit([problems[i] for i in active], prepared, activation=activation, eps_scale=eps_scale)
  rules = auto_bias_rule(spec, variables, [problems[i] for i in active], fits) \
      if bias_mode == 'auto' else None
  elapsed = time.perf_counter() - t0
  out: list[UnitSolution] = []
  by_index = dict(zip(active, range(len(active))))
  for i, p in enumerate(problems):
    base = dict(method='bnm', bnm_cov=cov_model, bias_mode=bias_mode, activation=activation,
                solve_seconds=elapsed / max(len(problems), 1), compile_seconds=0.0)
    if i not in by_index:
      S = np.zeros((0, p.m))
      out.append(UnitSolution(S, None, dict(base, fit='none', bias_weight=0.0,
                                            **coefficient_stats(S))))
      continue
    j = by_index[i]
    fr = fits[j]
    if bias_mode == 'auto':
      w = float(rules[j]['weight'])
      use_centred = w > 0
    else:
      use_centred = bias_mode == 'on'
      w = 1.0 if use_centred else 0.0
    if use_centred:
      S, c = fr['S1'], w * fr['c1']
      res = fr['res1'] + (1.0 - w) ** 2 * float(np.sum(fr['c1'] ** 2))
      cond, eps, fit_name = fr['cond1'], fr['eps1'], 'centred'
    else:
      S, c = fr['S0'], None
      res, cond, eps, fit_name = fr['res0'], fr['cond0'], fr['eps0'], 'uncentred'
    second = float(fr['second'])
    diag = dict(
        base, fit=fit_name, sx=kinds[j], cond=float(cond), eps=float(eps),
        pred_rel_error=float(res / second) if second > 0 else 0.0,
        pred_rel_error_uncentred=float(fr['res0'] / second) if second > 0 else 0.0,
        pred_rel_error_centred=float(fr['res1'] / second) if second > 0 else 0.0,
        bias_weight=w, **coefficient_stats(S))
    if c is not None:
      diag['bias_abs_mean'] = float(np.mean(np.abs(c)))
    if rules is not None:
      diag['bias_rule'] = {k: v for k, v in rules[j].items() if k != 'weight'}
    out.append(UnitSolution(np.ascontiguousarray(S), None if c is None else np.asarray(c), diag))
  return out


# --------------------------------------------------------------------------------------------
# Bias constant for any S_P (BN_MOMENTS.md, optional bias correction).


def activation_means(spec, variables: Mapping[str, Any], problems: Sequence[UnitProblem], *,
                     moments: Mapping[str, moments_lib.InputMoments] | None = None
                     ) -> list[np.ndarray]:
  """E[a] per unit under the Gaussian model: ReLU means of N(beta, gamma^2) for BN units (no
  propagation needed), of the propagated pre-activations for BN-free units."""
  if moments is None and any(p.unit.bn is None for p in problems):
    moments = moments_lib.propagate(spec, variables)
  out = []
  with jax.enable_x64(True):
    for p in problems:
      if p.unit.bn is None:
        mean, cov = moments_lib.dense_preactivation(np.asarray(p.W, np.float64), moments[p.unit.name])
        std = np.sqrt(np.maximum(np.diagonal(cov), 0.0))
      else:
        mean = np.asarray(p.bn['beta'], np.float64)
        std = np.abs(np.asarray(p.bn['gamma'], np.float64))
      e, _ = moments_lib.relu_moments(jnp.asarray(mean), jnp.asarray(std))
      out.append(np.asarray(e))
  return out


def bias_constant(spec, variables: Mapping[str, Any], problems, solutions, config=None):
  """c = E[a_P] - S_P E[a_K] (a_P ~ S_P a_K + c) under the Gaussian model, for a given S_P.

  Two call forms:
  - ``bias_constant(spec, variables, problem, S_P, config) -> c`` for one unit (always the
    constant; no rule applied);
  - ``bias_constant(spec, variables, problems, solutions, config) -> [c or None]`` for all
    units (what :func:`lbyl_jax.restore.restore` calls). A bnm solution that carries its own
    per-unit decision (``diag['bias_weight']``) gets w * c (None where w == 0); otherwise, with
    ``config.bias_correction == 'auto'``, :func:`auto_bias_rule` decides for the given S_P.
  """
  if isinstance(problems, UnitProblem):
    S_P = np.asarray(solutions, np.float64)
    (E,) = activation_means(spec, variables, [problems])
    return E[problems.prune] - S_P @ E[problems.keep]
  problems = list(problems)
  solutions = list(solutions)
  if len(problems) != len(solutions):
    raise ValueError(f'bias_constant: {len(problems)} problems but {len(solutions)} solutions')
  means = activation_means(spec, variables, problems)
  consts = []
  for p, s, E in zip(problems, solutions, means):
    S_P = np.asarray(s.S_P, np.float64)
    consts.append(E[p.prune] - S_P @ E[p.keep])
  mode = getattr(config, 'bias_correction', 'on') if config is not None else 'on'
  weights = [None] * len(problems)
  for i, s in enumerate(solutions):
    if s.diag.get('method') == 'bnm' and s.diag.get('bias_mode') == 'auto':
      weights[i] = float(s.diag['bias_weight'])
  if mode == 'auto' and any(w is None for w in weights):
    todo = [i for i, w in enumerate(weights) if w is None and problems[i].prune.size]
    rules = auto_bias_rule_for(spec, variables, [problems[i] for i in todo],
                               [solutions[i].S_P for i in todo], config)
    for i, r in zip(todo, rules):
      weights[i] = float(r['weight'])
  out = []
  for p, c, w in zip(problems, consts, weights):
    if p.prune.size == 0 or (w is not None and w == 0.0):
      out.append(None)
    else:
      out.append(c if w is None else w * c)
  return out
