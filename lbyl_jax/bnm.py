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
   ``bias_correction='auto'`` chooses per unit, data-free, see :func:`auto_bias_rule`;
   ``'blend'`` takes the per-unit mixture of the two fits that the same rule's error model
   prefers (a weight in [0, 1] instead of 0 or 1).
4. Constants are returned ready for surgery's fold (consumer pre-BN output += sum over all taps
   V[:, P] c), corrected for zero padding (:func:`fold_constant`).

The closed-form moments run in float64 JAX (one compiled elementwise kernel for every unit of every
network); the small SPD solves run batched in float64 NumPy (see the note above
:func:`second_moments`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from lbyl_jax import moments as moments_lib
from lbyl_jax import units as units_lib
from lbyl_jax.methods import UnitProblem, UnitSolution, coefficient_stats

EPS_SCALE = 1e-6
COV_MODELS = ('identity', 'diag')
BIAS_MODES = ('off', 'on', 'auto', 'blend')
RULE_MODES = ('auto', 'blend')  # modes decided per unit by auto_bias_rule
BIAS_FOLDS = ('padding_aware', 'all_taps')
ACTIVATIONS = ('relu', 'linear')


def _option(config, name: str, default, choices) -> Any:
  value = getattr(config, name, default) if config is not None else default
  if value not in choices:
    raise ValueError(f'bnm: {name} must be one of {choices}, got {value!r}')
  return value


def _bias_mode(config, default: str) -> str:
  """``config``'s bias-correction mode: RestoreConfig's resolved value (None means the method's
  default there), a plain ``bias_correction`` attribute, or ``default``."""
  resolve = getattr(config, 'resolved_bias_correction', None)
  value = resolve() if callable(resolve) else getattr(config, 'bias_correction', None)
  return _option(None, 'bias_correction', default if value is None else value, BIAS_MODES)


# --------------------------------------------------------------------------------------------
# Pre-activation model.


def _gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """a @ b.T. Small products avoid multi-threaded BLAS, whose thread hand-off costs tens of ms
  per call on a busy 2-core machine (measured: 30 ms vs 0.3 ms for 64 x 576 x 64)."""
  if a.shape[0] * a.shape[1] * b.shape[0] <= (1 << 23):
    return np.einsum('id,jd->ij', a, b)
  return a @ b.T


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
    G = _gram(f, f)
  elif cov_model == 'diag':
    if moments is None:
      raise ValueError(f"{name}: bnm_cov='diag' needs propagated input moments")
    c = moments.var.shape[0]
    if W.shape[1] % c:
      raise ValueError(f'{name}: filters of length {W.shape[1]} do not split into {c} input channels')
    sx = np.repeat(moments.var, W.shape[1] // c)  # torch order (C_in, kh, kw): taps innermost
    G = _gram(f * sx, f)
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
# Moments (JAX, one compiled elementwise kernel) and fits (NumPy, batched).
#
# The closed-form moments are the expensive, elementwise part (moments.second_moment_matrices).
# The fits are small SPD solves (m <= 512) done with batched NumPy LAPACK on the host: with
# jaxlib 0.10.2 on a 2-core CPU, batched LAPACK custom calls (Cholesky, eigh) inside a larger XLA
# program deadlocked intermittently (the LAPACK kernel waits on the intra-op thread pool from one
# of that pool's own workers), so they are kept out of XLA.


def second_moments(prepared: Sequence[tuple[np.ndarray, np.ndarray]], *, activation: str = 'relu'
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
  """(E[a], M = E[a a^T]) per unit from its pre-activation (mean, cov)."""
  return moments_lib.second_moment_matrices(prepared, activation=activation)


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
# Consumers: geometry, zero padding, injected error.


@dataclasses.dataclass(frozen=True)
class Consumer:
  """What the constants and the 'auto' rule need to know about a unit's consumer layer.

  Attributes:
    V: (T, N, O) float64 consumer weights: T taps (kernel positions, or the positions a dense
      layer reads per channel after a flatten), N input channels, O outputs.
    tap_weight: (T,) fraction of output positions at which each tap reads inside the (zero-padded)
      input, or None when every tap always does (dense consumers, unknown geometry).
    alpha: (O,) scale gamma / sigma of the BN after the consumer (ones without one).
    bn_energy: sum of (gamma^2 + beta^2) of that BN (the second moment of its output per
      position), or None without one.
    bias: (O,) consumer bias, zeros without one.
    shortcut_energy: second moment per position of the shortcut added after the consumer's BN
      (0 outside residual blocks).
  """

  V: np.ndarray
  tap_weight: np.ndarray | None
  alpha: np.ndarray
  bn_energy: float | None
  bias: np.ndarray
  shortcut_energy: float = 0.0


_GEOMETRY_CACHE: dict[tuple, dict[str, tuple]] = {}


def _tap_fraction(size: int, k: int, stride: int, pad: tuple[int, int]) -> np.ndarray:
  """Per kernel offset, the fraction of output positions whose input index is inside [0, size)."""
  out = (size + pad[0] + pad[1] - k) // stride + 1
  idx = np.arange(out)[:, None] * stride - pad[0] + np.arange(k)[None, :]
  return ((idx >= 0) & (idx < size)).mean(axis=0)


def consumer_geometry(spec, variables: Mapping[str, Any]) -> dict[str, tuple]:
  """{unit name: (tap fractions (kh, kw))} for conv consumers, from an abstract forward pass."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  widths = units_lib.widths_of(variables, spec.units)
  key = (spec.name, widths)
  if key in _GEOMETRY_CACHE:
    return _GEOMETRY_CACHE[key]
  consumers = {u.consumer: u.name for u in spec.units if u.consumer_kind == 'conv'}
  geo: dict[str, tuple] = {}

  def interceptor(next_fun, args, kwargs, ctx):
    path = '/'.join(ctx.module.path)
    if ctx.method_name == '__call__' and path in consumers and isinstance(ctx.module, nn.Conv):
      mod, shape = ctx.module, args[0].shape
      pads = mod.padding
      if isinstance(pads, str):
        raise ValueError(f'{path}: padding {pads!r} is not explicit; the models pad explicitly')
      fr = [_tap_fraction(shape[1 + a], mod.kernel_size[a], mod.strides[a], tuple(pads[a]))
            for a in range(2)]
      geo[consumers[path]] = (np.outer(fr[0], fr[1]),)
    return next_fun(*args, **kwargs)

  model = spec.build(widths)
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.float32),
                                    variables)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda v, x: model.apply(v, x), abstract, spec.dummy_input())
  _GEOMETRY_CACHE[key] = geo
  return geo


def _residual_shortcut_energy(spec, variables, unit, moments) -> float:
  """Second moment of the shortcut that meets the consumer's BN output (residual blocks only)."""
  if spec is None or spec.family not in ('cifar_resnet', 'resnet') or moments is None:
    return 0.0
  blk, _, leaf = unit.consumer.rpartition('/')
  params = variables['params'].get(blk, {})
  last = 'conv3' if 'conv3' in params else 'conv2'
  if leaf != last:
    return 0.0
  if 'downsample_bn' in params:
    p = params['downsample_bn']
    return float(np.sum(np.asarray(p['scale'], np.float64) ** 2 + np.asarray(p['bias'], np.float64) ** 2))
  x = moments.get(f'{blk}/conv1')
  return 0.0 if x is None else float(np.sum(x.var + x.mean ** 2))


def consumers(spec, variables, problems: Sequence[UnitProblem], moments=None) -> list[Consumer]:
  """:class:`Consumer` of every unit (geometry from an abstract forward pass when spec is given)."""
  from lbyl_jax import surgery  # pylint: disable=import-outside-toplevel  (surgery is optional)

  geo = consumer_geometry(spec, variables) if spec is not None else {}
  out = []
  for p in problems:
    u = p.unit
    layer = units_lib.get_path(variables['params'], u.consumer)
    k = np.asarray(layer['kernel'], np.float64)
    if u.consumer_kind == 'conv':
      V = k.reshape(-1, k.shape[2], k.shape[3])
      tw = geo.get(u.name, (None,))[0]
      tw = None if tw is None else tw.reshape(-1)
    else:
      V = np.transpose(k.reshape(p.n, u.flatten, k.shape[1]), (1, 0, 2))
      tw = None
    o = V.shape[2]
    bias = np.asarray(layer['bias'], np.float64) if 'bias' in layer else np.zeros(o)
    bn_path = surgery.consumer_bn_path(variables, u.consumer)
    if bn_path is not None:
      bp = units_lib.get_path(variables['params'], bn_path)
      bs = units_lib.get_path(variables['batch_stats'], bn_path)
      gamma = np.asarray(bp['scale'], np.float64)
      beta = np.asarray(bp['bias'], np.float64)
      alpha = gamma / np.sqrt(np.asarray(bs['var'], np.float64) + units_lib.BN_EPS)
      energy = float(np.sum(gamma ** 2 + beta ** 2))
    else:
      alpha, energy = np.ones(o), None
    out.append(Consumer(V, tw, alpha, energy, bias,
                        _residual_shortcut_energy(spec, variables, u, moments)))
  return out


def fold_constant(consumer: Consumer, prune: np.ndarray, c: np.ndarray) -> np.ndarray:
  """The constant c' whose fold, sum over ALL taps V[:, P] c' (how surgery shifts the consumer's
  BN mean), best matches the position-averaged effect of c under zero padding,
  sum over taps w_tap V[tap, P] c (ALGORITHMS.md 1; BN_MOMENTS.md, open question on padding).

  A per-channel BN shift cannot reproduce the position-dependent border effect; its best L2 value
  is the position average. c' solves min ||A c' - target||^2 + lam ||c' - c||^2 with
  A = sum_t V_t[P]^T and lam = 1e-3 trace(A^T A) / |P| (a ridge towards c where A is
  rank-deficient). Without padding information c is returned unchanged.
  """
  c = np.asarray(c, np.float64)
  if consumer.tap_weight is None or np.all(consumer.tap_weight == 1.0) or c.size == 0:
    return c
  VP = consumer.V[:, prune, :]
  target = np.einsum('t,tpo,p->o', consumer.tap_weight, VP, c)
  A = VP.sum(axis=0).T
  G = A.T @ A
  lam = 1e-3 * np.trace(G) / c.size
  if lam <= 0:
    return c
  return c + np.linalg.solve(G + lam * np.eye(c.size), A.T @ (target - A @ c))


# Assumed correlation of a residual between the positions one consumer window reads. 0 makes tap
# contributions add incoherently, 1 fully coherently; the two bound the drift that the NM
# ResNet-56 actually shows at 50 % pruning (measured once on 200 test images: the predicted drift
# at 0 is 1.5-2x too small, at 1 up to 3x too large), and 0.5 tracks it within about 1.5x.
SPATIAL_CORR = 0.5


def _tap_energy(consumer: Consumer) -> np.ndarray:
  """q_n: E||alpha * sum_t V_t[n]^T r_t||^2 per unit variance of input channel n, for r_t with
  correlation SPATIAL_CORR between any two taps of the window."""
  V2 = consumer.alpha ** 2
  incoherent = np.einsum('tno,o->n', consumer.V ** 2, V2)
  coherent = np.einsum('no,o->n', consumer.V.sum(axis=0) ** 2, V2)
  return (1.0 - SPATIAL_CORR) * incoherent + SPATIAL_CORR * coherent


def injected_error(consumer: Consumer, prune: np.ndarray, var_r: np.ndarray, mean_r: np.ndarray
                   ) -> float:
  """E||alpha * (sum_t V_t[P]^T r_t)||^2 per output position for a residual r on the pruned
  channels with per-channel variance var_r and mean mean_r.

  Fluctuations: independent across channels (the 'diag' model), correlated SPATIAL_CORR across
  the taps of a window. The mean adds coherently over taps.
  """
  q = _tap_energy(consumer)[prune]
  coherent = consumer.alpha * np.einsum('tpo,p->o', consumer.V[:, prune, :], mean_r)
  return float(np.sum(q * var_r) + np.sum(coherent ** 2))


def consumer_energy(consumer: Consumer, E: np.ndarray, M: np.ndarray) -> float:
  """Second moment per position of the tensor after the consumer (its BN output, plus the shortcut
  in residual blocks): sum(gamma^2 + beta^2) with a BN, the modelled E||V^T a + bias||^2 without."""
  if consumer.bn_energy is not None:
    return consumer.bn_energy + consumer.shortcut_energy
  var = np.maximum(np.diagonal(M) - E ** 2, 0.0)
  mean = np.einsum('tno,n->o', consumer.V, E) + consumer.bias
  return float(np.sum(_tap_energy(consumer) * var) + np.sum(mean ** 2)) + consumer.shortcut_energy


def _row_terms(S, M, keep, prune):
  """Per pruned row j: (M_jj, s_j^T M_Kj, s_j^T M_KK s_j), so E(a_j - t s_j^T a_K)^2 =
  M_jj - 2 t s_j^T M_Kj + t^2 s_j^T M_KK s_j under the model."""
  MPK = M[np.ix_(prune, keep)]
  return (np.diagonal(M)[prune], np.sum(S * MPK, axis=1),
          np.sum((S @ M[np.ix_(keep, keep)]) * S, axis=1))


def _residual_moments(E, M, keep, prune, S, c):
  """Per-channel variance and mean of r = a_P - S a_K - c under the model."""
  mpp, num, den = _row_terms(S, M, keep, prune)
  second = mpp - 2.0 * num + den
  mean = E[prune] - S @ E[keep]
  var = np.maximum(second - mean ** 2, 0.0)
  return var, mean - (0.0 if c is None else c)


# --------------------------------------------------------------------------------------------
# The data-free 'auto' rule.


def auto_bias_rule(problems: Sequence[UnitProblem], moments2: Sequence[tuple[np.ndarray, np.ndarray]],
                   candidates: Sequence[Sequence[tuple[np.ndarray, np.ndarray | None]]],
                   cons: Sequence[Consumer], *, fractional: bool = False) -> list[dict[str, Any]]:
  """Per unit, whether to use the intercept fit, decided from the model's own predictions only.

  Why a rule is needed: under the Gaussian model the intercept fit is never worse, but it moves
  each pruned channel's mean into a constant that does not follow the real input. Upstream pruning
  makes every later unit's real input drift away from the original (measured on the NM ResNet-56
  at 50 %: activations shrink to 0.4-0.7 of their original scale in stages 2-3); a constant that
  was right for the original input is then wrong by about drift * |c|, coherently over all
  positions, while the proportional part of the fit scales with the input.

  Rule (no data, no labels), in forward unit order:
  - D_l = sum over upstream units b of eps_b^2, the modelled relative squared error that unit b's
    chosen fit injects into the tensor after its consumer (its BN output, plus the shortcut in
    residual blocks): eps_b^2 = E||alpha * V_P^T r_b||^2 / E||that tensor||^2
    (:func:`injected_error` with :data:`SPATIAL_CORR`, :func:`consumer_energy`);
  - gain_l = E||a_P - S0 a_K||^2 - E||a_P - S1 a_K - c1||^2 >= 0, what the intercept fit saves
    under the model; risk_l = D_l ||c1||^2, the expected error of the constant when the input's
    scale is off by a relative amount whose square is D_l;
  - intercept iff risk_l < gain_l.

  ``fractional=True`` ('blend'): the same error model over the mixtures S_w = (1 - w) S0 + w S1,
  c_w = w c1 (r_w = (1 - w) r0 + w r1): minimise (1 - w)^2 A + 2 w (1 - w) B + w^2 (C + R) with
  A = E||r0||^2, C = E||r1||^2, B = E[r0 . r1] and R = D_l ||c1||^2, so
  w = (A - B) / (A - 2B + C + R), clipped to [0, 1]. With R = 0 the model's best is w = 1.

  Args:
    problems: the units in forward order.
    moments2: (E[a], M) per unit.
    candidates: per unit [(S, None), (S', c')]: the no-constant option and the constant option.
    cons: the consumers.
    fractional: return the blend weight in [0, 1] ('blend') instead of 0 or 1 ('auto').

  Returns:
    Per unit a dict: weight (1.0: use the constant option, 0.0: not), drift D_l, injected eps_l^2
    of the chosen option, gain, risk (both relative to trace M_PP).
  """
  drift = 0.0
  out = []
  for p, (E, M), cand, con in zip(problems, moments2, candidates, cons):
    second = float(np.sum(np.diagonal(M)[p.prune]))
    res = []
    for S, c in cand:
      var, mean = _residual_moments(E, M, p.keep, p.prune, S, c)
      res.append((float(np.sum(var + mean ** 2)), var, mean))
    (S0, _), (S1, c1) = cand[0], cand[1]
    gain = max(res[0][0] - res[1][0], 0.0)
    risk = drift * float(np.sum(np.asarray(c1) ** 2))
    if fractional:
      A, C = res[0][0], res[1][0]
      B = _residual_cross(E, M, p.keep, p.prune, S0, S1, c1)
      den = A - 2.0 * B + C + risk
      w = float(np.clip((A - B) / den, 0.0, 1.0)) if den > 0 else 0.0
      S_w = (1.0 - w) * np.asarray(S0, np.float64) + w * np.asarray(S1, np.float64)
      var, mean = _residual_moments(E, M, p.keep, p.prune, S_w, w * np.asarray(c1, np.float64))
    else:
      w = 1.0 if risk < gain else 0.0
      _, var, mean = res[1] if w else res[0]
    energy = consumer_energy(con, E, M)
    eps2 = injected_error(con, p.prune, var, mean) / energy if energy > 0 else 0.0
    scale = second if second > 0 else 1.0
    out.append(dict(weight=w, drift=drift, injected=eps2, gain=gain / scale, risk=risk / scale))
    drift += eps2
  return out


def _residual_cross(E, M, keep, prune, S0, S1, c1) -> float:
  """E[r0 . r1] for r0 = a_P - S0 a_K and r1 = a_P - S1 a_K - c1 under the model."""
  S0 = np.asarray(S0, np.float64)
  S1 = np.asarray(S1, np.float64)
  MPK = M[np.ix_(prune, keep)]
  MKK = M[np.ix_(keep, keep)]
  second = (np.sum(np.diagonal(M)[prune]) - np.sum(S0 * MPK) - np.sum(S1 * MPK)
            + np.sum((S0 @ MKK) * S1))
  return float(second - np.dot(np.asarray(c1, np.float64), E[prune] - S0 @ E[keep]))


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
  return prepared, kinds, moments


def solve(spec, variables: Mapping[str, Any], problems: Sequence[UnitProblem], config, *,
          activation: str = 'relu', moments: Mapping[str, moments_lib.InputMoments] | None = None,
          eps_scale: float = EPS_SCALE, padding_aware: bool | None = None) -> list[UnitSolution]:
  """BN-moments delivery for every unit (BN_MOMENTS.md); the 'bnm' method of :mod:`lbyl_jax.methods`.

  Args:
    spec, variables: the architecture and its ORIGINAL variables (may be None for BN units with
      ``bnm_cov='identity'`` and bias 'off' / 'on' without padding correction: synthetic tests).
    problems: one :class:`UnitProblem` per unit, in forward order.
    config: reads ``bnm_cov`` ('identity' | 'diag', default 'diag') and ``bias_correction``
      ('off' | 'on' | 'auto' | 'blend', default 'off').
    activation: 'relu' (the method) or 'linear' (a = y; for exactness tests).
    moments: precomputed :func:`lbyl_jax.moments.propagate` output (computed when needed).
    eps_scale: the ridge eps = eps_scale * trace(A) / m.
    padding_aware: return constants for surgery's all-taps fold that reproduce the
      position-averaged effect under zero padding (:func:`fold_constant`); the relative change
      from the raw c = E[a_P] - S_P E[a_K] is ``diag['bias_padding_change']``. None: from
      ``config.bias_fold`` ('padding_aware', the default, or 'all_taps': the raw constant, as the
      BN_MOMENTS.md prototype folds it).

  Returns:
    One :class:`UnitSolution` per unit: 'off': the no-intercept fit, bias None; 'on': the centred
    fit with its intercept; 'auto': per unit one of the two (:func:`auto_bias_rule`), the choice
    and its inputs in ``diag['bias_rule']``.
  """
  cov_model = _option(config, 'bnm_cov', 'diag', COV_MODELS)
  bias_mode = _bias_mode(config, 'off')
  if padding_aware is None:
    padding_aware = _option(config, 'bias_fold', 'padding_aware', BIAS_FOLDS) == 'padding_aware'
  if activation not in ACTIVATIONS:
    raise ValueError(f'bnm: activation must be one of {ACTIVATIONS}, got {activation!r}')
  t0 = time.perf_counter()
  idx = [i for i, p in enumerate(problems) if p.prune.size]
  active = [problems[i] for i in idx]
  if bias_mode in RULE_MODES and active and variables is None:
    raise ValueError(f"bnm: bias_correction={bias_mode!r} needs the network's variables")
  if bias_mode in RULE_MODES and moments is None and spec is not None:
    moments = moments_lib.propagate(spec, variables)
  prepared, kinds, moments = _prepare(spec, variables, active, cov_model, moments)
  fits = fit(active, prepared, activation=activation, eps_scale=eps_scale)
  cons = None
  if active and variables is not None and (bias_mode in RULE_MODES or (bias_mode == 'on' and padding_aware)):
    cons = consumers(spec, variables, active, moments)
  rules = None
  if bias_mode in RULE_MODES and active:
    rules = auto_bias_rule(active, [(f['E'], f['M']) for f in fits],
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
        var, mean = _residual_moments(fr['E'], fr['M'], p.keep, p.prune, S, c_raw)
        res, fit_name = float(np.sum(var + mean ** 2)), 'blend'
      else:
        S, c_raw, res, fit_name = fr['S1'], fr['c1'], fr['res1'], 'centred'
      cond, eps = fr['cond1'], fr['eps1']
      c = fold_constant(cons[j], p.prune, c_raw) if (cons is not None and padding_aware) else c_raw
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


# --------------------------------------------------------------------------------------------
# Guard: shrink another method's delivery where the moment model predicts it hurts.


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
  mpp, num, den = _row_terms(np.asarray(S, np.float64), M, keep, prune)
  with np.errstate(divide='ignore', invalid='ignore'):
    t = np.where(den > 0, num / den, 0.0)
  t = np.clip(np.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0), 0.0, 1.0)

  def err(tt):
    return np.maximum(mpp - 2.0 * tt * num + tt ** 2 * den, 0.0)

  return t, err(np.ones_like(t)), err(t)


def guard(spec, variables: Mapping[str, Any], problems: Sequence[UnitProblem],
          solutions: Sequence[UnitSolution], config=None) -> list[UnitSolution]:
  """Applies :func:`guard_scales` to every unit's delivery (``RestoreConfig.guard='moments'``).

  The moments are those of the BN-moments method (``config.bnm_cov``, default 'diag'): a
  data-free prediction of how well each delivery row reproduces its pruned activation after the
  ReLU, which LBYL's and NM's filter-space fits do not model. Rows are scaled by t_j; the per-unit
  diagnostics gain ``guard_t_mean``, ``guard_zero_rows`` (rows with t < 1e-6: in effect plain
  pruning) and the predicted errors of the unit's delivery relative to plain pruning's,
  sum_j E(a_j - t_j s_j^T a_K)^2 / sum_j E a_j^2, with the method's rows (``guard_pred_error_method``)
  and with the guarded rows (``guard_pred_error``, at most 1).
  """
  problems, solutions = list(problems), list(solutions)
  cov_model = _option(config, 'bnm_cov', 'diag', COV_MODELS)
  idx = [i for i, p in enumerate(problems) if p.prune.size]
  out = list(solutions)
  if not idx:
    return out
  mom = unit_moments(spec, variables, [problems[i] for i in idx], cov_model=cov_model)
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


# --------------------------------------------------------------------------------------------
# Bias constant for any S_P (BN_MOMENTS.md, optional bias correction).


def unit_moments(spec, variables, problems: Sequence[UnitProblem], *, cov_model: str = 'diag',
                 moments=None) -> list[tuple[np.ndarray, np.ndarray]]:
  """(E[a], M) of every unit under the Gaussian model (as :func:`solve` builds them)."""
  prepared, _, _ = _prepare(spec, variables, problems, cov_model, moments)
  return second_moments(prepared)


def activation_means(spec, variables: Mapping[str, Any], problems: Sequence[UnitProblem], *,
                     moments: Mapping[str, moments_lib.InputMoments] | None = None
                     ) -> list[np.ndarray]:
  """E[a] per unit under the Gaussian model: the ReLU means of N(beta, gamma^2) for BN units (no
  propagation needed), of the propagated pre-activations for BN-free units."""
  if moments is None and any(p.unit.bn is None for p in problems):
    moments = moments_lib.propagate(spec, variables)
  out = []
  for p in problems:
    if p.unit.bn is None:
      mean, cov = moments_lib.dense_preactivation(np.asarray(p.W, np.float64), moments[p.unit.name])
      var = np.diagonal(cov)
    else:
      mean = np.asarray(p.bn['beta'], np.float64)
      var = np.asarray(p.bn['gamma'], np.float64) ** 2
    out.append(moments_lib.relu_mean_var(mean, var)[0])
  return out


def bias_constant(spec, variables: Mapping[str, Any], problems, solutions, config=None, *,
                  padding_aware: bool | None = None):
  """c = E[a_P] - S_P E[a_K] (a_P ~ S_P a_K + c) under the Gaussian model, for a given S_P.

  Two call forms:
  - ``bias_constant(spec, variables, problem, S_P, config) -> c`` for one unit: the raw
    constant (no rule, no padding correction);
  - ``bias_constant(spec, variables, problems, solutions, config) -> [c or None]`` for all units,
    ready for surgery's fold (what :func:`lbyl_jax.restore.restore` calls). A bnm solution that
    already chose its constant ('on' / 'auto') keeps it. Otherwise c is computed for the given
    S_P, made padding-aware (:func:`fold_constant`) when ``padding_aware``, and with
    ``config.bias_correction == 'auto'`` kept only where :func:`auto_bias_rule` (with the given
    S_P for both options) says so, with 'blend' scaled by its weight in [0, 1].
  """
  if isinstance(problems, UnitProblem):
    (E,) = activation_means(spec, variables, [problems])
    return E[problems.prune] - np.asarray(solutions, np.float64) @ E[problems.keep]
  problems, solutions = list(problems), list(solutions)
  if len(problems) != len(solutions):
    raise ValueError(f'bias_constant: {len(problems)} problems but {len(solutions)} solutions')
  mode = _bias_mode(config, 'on')
  if padding_aware is None:
    padding_aware = _option(config, 'bias_fold', 'padding_aware', BIAS_FOLDS) == 'padding_aware'
  out: list[np.ndarray | None] = [None] * len(problems)
  todo = []
  for i, (p, s) in enumerate(zip(problems, solutions)):
    if not p.prune.size:
      continue
    if s.diag.get('method') == 'bnm' and s.diag.get('bias_mode') in ('on',) + RULE_MODES:
      out[i] = None if s.bias is None else np.asarray(s.bias, np.float64)
    else:
      todo.append(i)
  if not todo:
    return out
  probs = [problems[i] for i in todo]
  cov_model = _option(config, 'bnm_cov', 'diag', COV_MODELS)
  need_geo = variables is not None and (padding_aware or mode in RULE_MODES)
  moments = moments_lib.propagate(spec, variables) if need_geo and spec is not None else None
  if mode in RULE_MODES:
    mom2 = unit_moments(spec, variables, probs, cov_model=cov_model, moments=moments)
    means = [E for E, _ in mom2]
  else:
    means = activation_means(spec, variables, probs, moments=moments)
  consts = [E[p.prune] - np.asarray(solutions[i].S_P, np.float64) @ E[p.keep]
            for i, p, E in zip(todo, probs, means)]
  cons = consumers(spec, variables, probs, moments) if need_geo else None
  weight = [1.0] * len(todo)
  if mode in RULE_MODES:
    S_list = [np.asarray(solutions[i].S_P, np.float64) for i in todo]
    rules = auto_bias_rule(probs, mom2, [[(S, None), (S, c)] for S, c in zip(S_list, consts)], cons,
                           fractional=mode == 'blend')
    weight = [r['weight'] for r in rules]
  for k, (i, p, c) in enumerate(zip(todo, probs, consts)):
    if weight[k] > 0:
      c = weight[k] * c
      out[i] = fold_constant(cons[k], p.prune, c) if (cons is not None and padding_aware) else c
  return out
