"""Rectified-Gaussian moments and their data-free propagation through a network (docs/bn_moments.md).

Three parts:

1. Closed forms (JAX, jit-able, float64 under ``jax.enable_x64``): E[ReLU(y)] and E[ReLU(y)^2] for
   y ~ N(m, s^2); the bivariate normal CDF; E[ReLU(y_i) ReLU(y_j)] for a bivariate normal; the
   whole second-moment matrix M = E[a a^T] of a = ReLU(y), y ~ N(mean, Sigma); the moments of the
   max of k iid rectified Gaussians (max-pools).
2. :func:`propagate`: for every prunable unit, the per-channel mean and variance of the producer's
   input, derived from BN statistics only (no data), as docs/bn_moments.md#input-covariance's ``diag`` Sx needs.
3. The per-unit model the BN-moments method, the bias correction and the guard share: each unit's
   pre-activations N(mean, Sigma) (:func:`preactivation`) and its activation moments
   E[a], E[a a^T] (:func:`unit_moments`, :func:`activation_means`). Monte Carlo references for
   the tests are in :mod:`lbyl_jax.experimental.montecarlo`.

The bivariate cross moment. With X, Y standard normal with correlation rho, r = sqrt(1 - rho^2),
h_i = m_i / s_i, A = (h_i - rho h_j) / r and B = (h_j - rho h_i) / r (derived by expanding
(h_i + X)(h_j + Y) over the orthant and using the truncated first and mixed moments of the
bivariate normal; checked against Monte Carlo in tests/test_moments.py):

  E[ReLU(y_i) ReLU(y_j)] / (s_i s_j) = (h_i h_j + rho) Phi2(h_i, h_j; rho)
      + h_i phi(h_j) Phi(A) + h_j phi(h_i) Phi(B) + r phi(h_j) phi(A).

The last term is sqrt(1-rho^2)/sqrt(2 pi) * phi(sqrt((h_i^2 - 2 rho h_i h_j + h_j^2)/(1-rho^2)))
written in a form that stays finite as |rho| -> 1. rho is clipped to 1 - 1e-10 (float64): the
cross moment is Lipschitz in rho with constant s_i s_j (its rho-derivative is s_i s_j P(y_i>0,
y_j>0)), so the clip moves it by at most 1e-10 s_i s_j.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.special  # norm_cdf; imported here, not lazily inside a first call
import numpy as np

from lbyl_jax.core import trees
from lbyl_jax.pruning import terms
from lbyl_jax.pruning.problem import UnitProblem

_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)
# 20-point Gauss-Legendre rule on [-1, 1] (Genz's bivariate normal algorithm uses 20 points for
# the hardest correlations; we use them everywhere, which only adds accuracy).
_GL_X, _GL_W = np.polynomial.legendre.leggauss(20)
# Rule for the max-of-k integrals (smooth integrand over a window of length <= 20).
_GL_MAX_X, _GL_MAX_W = np.polynomial.legendre.leggauss(96)
_Z_MAX = 10.0  # standard-normal tail beyond this is below 1e-23


# --------------------------------------------------------------------------------------------
# Part 1: closed forms.


def _float_dtype(*arrays) -> jnp.dtype:
  """The floating dtype of the inputs (weakly typed Python floats count as the default float)."""
  dt = jnp.result_type(*arrays)
  return dt if jnp.issubdtype(dt, jnp.floating) else jnp.result_type(float)


def norm_pdf(x: jax.Array) -> jax.Array:
  return jnp.exp(-0.5 * x * x) / _SQRT2PI


def norm_cdf(x: jax.Array) -> jax.Array:
  # erfc keeps relative accuracy in the lower tail, where 1 + erf would cancel.
  return 0.5 * jax.scipy.special.erfc(-x / _SQRT2)


def relu_moments(mean: jax.Array, std: jax.Array) -> tuple[jax.Array, jax.Array]:
  """E[ReLU(y)] and E[ReLU(y)^2] for y ~ N(mean, std^2), elementwise (docs/bn_moments.md#one-channel).

  E[ReLU(y)] = m Phi(m/s) + s phi(m/s);  E[ReLU(y)^2] = (m^2 + s^2) Phi(m/s) + m s phi(m/s).
  ``std`` may be negative (a BN gamma): only |std| matters. std == 0 gives exactly ReLU(m) and
  ReLU(m)^2.
  """
  m = jnp.asarray(mean)
  s = jnp.abs(jnp.asarray(std))
  m, s = jnp.broadcast_arrays(m, s)
  pos = s > 0
  s_safe = jnp.where(pos, s, 1.0)
  h = m / s_safe
  cdf, pdf = norm_cdf(h), norm_pdf(h)
  e1 = m * cdf + s_safe * pdf
  e2 = (m * m + s_safe * s_safe) * cdf + m * s_safe * pdf
  rm = jnp.maximum(m, 0.0)
  return jnp.where(pos, e1, rm), jnp.where(pos, e2, rm * rm)


def bvn_cdf(a: jax.Array, b: jax.Array, rho: jax.Array) -> jax.Array:
  """Phi2(a, b; rho) = P(X <= a, Y <= b) for standard normals with correlation rho.

  Genz's BVNU algorithm (Genz 2004, "Numerical computation of rectangular bivariate and trivariate
  normal and t probabilities"): for |rho| < 0.925 the Gauss-Legendre rule on
  Phi2 = Phi(a) Phi(b) + (1/2pi) int_0^rho exp(-(a^2 - 2tab + b^2)/(2(1-t^2)))/sqrt(1-t^2) dt
  after t = sin(theta), which removes the endpoint singularity; for |rho| >= 0.925 the
  Drezner-Wesolowsky expansion around |rho| = 1 plus a Gauss-Legendre correction. Both branches
  are evaluated and selected elementwise (vectorized, jit-able). Accuracy about 1e-15 in float64.
  """
  a, b, rho = jnp.broadcast_arrays(jnp.asarray(a), jnp.asarray(b), jnp.asarray(rho))
  dtype = _float_dtype(a, b, rho)
  x = jnp.asarray(_GL_X, dtype)
  w = jnp.asarray(_GL_W, dtype)
  h, k = -a, -b  # upper orthant form P(X > h, Y > k) of Genz's code
  hk = h * k
  r = jnp.clip(rho, -1.0, 1.0)

  # Branch 1: moderate correlation.
  hs = 0.5 * (h * h + k * k)
  asr = 0.5 * jnp.arcsin(r)
  sn = jnp.sin(asr[..., None] * (1.0 + x))
  expo = (sn * hk[..., None] - hs[..., None]) / (1.0 - sn * sn)
  low = jnp.sum(w * jnp.exp(expo), axis=-1) * asr / (2.0 * jnp.pi) + norm_cdf(-h) * norm_cdf(-k)

  # Branch 2: |rho| near 1. For rho < 0 the problem is mirrored by k -> -k.
  neg = r < 0
  kk = jnp.where(neg, -k, k)
  hk2 = jnp.where(neg, -hk, hk)
  as_ = jnp.maximum((1.0 - r) * (1.0 + r), jnp.finfo(dtype).tiny)
  aa = jnp.sqrt(as_)
  bs = (h - kk) ** 2
  c = (4.0 - hk2) / 8.0
  d = (12.0 - hk2) / 16.0
  e0 = -(bs / as_ + hk2) / 2.0
  t0 = aa * jnp.exp(jnp.maximum(e0, -100.0)) * (
      1.0 - c * (bs - as_) * (1.0 - d * bs / 5.0) / 3.0 + c * d * as_ * as_ / 5.0)
  hi = jnp.where(e0 > -100.0, t0, 0.0)
  bb = jnp.sqrt(bs)
  sp = _SQRT2PI * norm_cdf(-bb / aa)
  t1 = jnp.exp(-jnp.minimum(hk2, 100.0) / 2.0) * sp * bb * (1.0 - c * bs * (1.0 - d * bs / 5.0) / 3.0)
  hi = hi - jnp.where(hk2 > -100.0, t1, 0.0)
  ah = aa / 2.0
  xs = (ah[..., None] * (1.0 + x)) ** 2
  rs = jnp.sqrt(1.0 - xs)
  e1 = -(bs[..., None] / xs + hk2[..., None]) / 2.0
  sp1 = 1.0 + c[..., None] * xs * (1.0 + d[..., None] * xs)
  ep = jnp.exp(-hk2[..., None] * xs / (2.0 * (1.0 + rs) ** 2)) / rs
  terms = jnp.where(e1 > -100.0, jnp.exp(jnp.maximum(e1, -100.0)) * (ep - sp1), 0.0)
  hi = hi + ah * jnp.sum(w * terms, axis=-1)
  hi = -hi / (2.0 * jnp.pi)
  tail = jnp.where(h < 0, norm_cdf(kk) - norm_cdf(h), norm_cdf(-h) - norm_cdf(-kk))
  hi = jnp.where(r > 0, hi + norm_cdf(-jnp.maximum(h, kk)), jnp.where(h >= kk, -hi, tail - hi))

  out = jnp.where(jnp.abs(r) < 0.925, low, hi)
  return jnp.clip(out, 0.0, 1.0)


def _rho_clip(dtype) -> float:
  return 1e-10 if jnp.dtype(dtype) == jnp.float64 else 1e-5


def relu_cross_moment(m1, s1, m2, s2, rho) -> jax.Array:
  """E[ReLU(y_1) ReLU(y_2)] for a bivariate normal (means m, std devs |s|, correlation rho).

  Closed form of the module docstring; a zero std makes that variable a constant, giving
  ReLU(m) times the other's rectified mean. Elementwise over broadcast inputs.
  """
  m1, s1, m2, s2, rho = jnp.broadcast_arrays(*(jnp.asarray(v) for v in (m1, s1, m2, s2, rho)))
  s1, s2 = jnp.abs(s1), jnp.abs(s2)
  dtype = _float_dtype(m1, s1, m2, s2, rho)
  p1, p2 = s1 > 0, s2 > 0
  s1s = jnp.where(p1, s1, 1.0)
  s2s = jnp.where(p2, s2, 1.0)
  h1, h2 = m1 / s1s, m2 / s2s
  lim = 1.0 - _rho_clip(dtype)
  r = jnp.clip(rho, -lim, lim)
  rr = jnp.sqrt((1.0 - r) * (1.0 + r))
  big_a = (h1 - r * h2) / rr
  big_b = (h2 - r * h1) / rr
  phi1, phi2 = norm_pdf(h1), norm_pdf(h2)
  pa = norm_pdf(big_a)
  both = (h1 * h2 + r) * bvn_cdf(h1, h2, r) + h1 * phi2 * norm_cdf(big_a) \
      + h2 * phi1 * norm_cdf(big_b) + rr * phi2 * pa
  both = s1s * s2s * both
  e1, _ = relu_moments(m1, s1)
  e2, _ = relu_moments(m2, s2)
  r1, r2 = jnp.maximum(m1, 0.0), jnp.maximum(m2, 0.0)
  return jnp.where(p1 & p2, both, jnp.where(p1, e1 * r2, jnp.where(p2, r1 * e2, r1 * r2)))


def relu_second_moments(mean: jax.Array, cov: jax.Array, *, activation: str = 'relu'
                        ) -> tuple[jax.Array, jax.Array]:
  """First moments E[a] (N,) and second moments M = E[a a^T] (N, N) of a = act(y), y ~ N(mean, cov).

  Args:
    mean: (N,) pre-activation means.
    cov: (N, N) pre-activation covariance (symmetric PSD).
    activation: 'relu' (docs/bn_moments.md#rectified-gaussian-moments) or 'linear' (a = y, M = mean mean^T + cov; for tests of
      exact linear recovery).
  """
  mean = jnp.asarray(mean)
  cov = jnp.asarray(cov)
  if activation == 'linear':
    return mean, cov + jnp.outer(mean, mean)
  if activation != 'relu':
    raise ValueError(f"activation must be 'relu' or 'linear', got {activation!r}")
  std = jnp.sqrt(jnp.maximum(jnp.diagonal(cov), 0.0))
  pos = std > 0
  ss = jnp.where(pos, std, 1.0)
  rho = jnp.clip(cov / (ss[:, None] * ss[None, :]), -1.0, 1.0)
  cross = relu_cross_moment(mean[:, None], std[:, None], mean[None, :], std[None, :], rho)
  e1, e2 = relu_moments(mean, std)
  cross = 0.5 * (cross + cross.T)
  n = mean.shape[0]
  eye = jnp.eye(n, dtype=bool)
  return e1, jnp.where(eye, e2[:, None] * jnp.ones_like(cross), cross)


def max_relu_moments(mean: jax.Array, std: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """E[max_k ReLU(y)] and E[(max_k ReLU(y))^2] for k iid y ~ N(mean, std^2) (a k-window max-pool).

  ReLU is monotone, so the max of the rectified copies is ReLU(m + s Z_k) with Z_k the max of k
  standard normals, density k phi(z) Phi(z)^(k-1). The integral over z > -m/s is done with a
  96-point Gauss-Legendre rule on [max(-m/s, -10), 10], where the integrand is smooth. k = 1
  reproduces :func:`relu_moments`.
  """
  if k < 1:
    raise ValueError(f'max-pool window size must be >= 1, got {k}')
  m = jnp.asarray(mean)
  s = jnp.abs(jnp.asarray(std))
  m, s = jnp.broadcast_arrays(m, s)
  dtype = _float_dtype(m, s)
  x = jnp.asarray(_GL_MAX_X, dtype)
  w = jnp.asarray(_GL_MAX_W, dtype)
  pos = s > 0
  ss = jnp.where(pos, s, 1.0)
  lo = jnp.clip(-m / ss, -_Z_MAX, _Z_MAX)
  half = 0.5 * (_Z_MAX - lo)
  z = lo[..., None] + half[..., None] * (1.0 + x)
  dens = k * norm_pdf(z) * norm_cdf(z) ** (k - 1)
  val = jnp.maximum(m[..., None] + ss[..., None] * z, 0.0)
  e1 = half * jnp.sum(w * dens * val, axis=-1)
  e2 = half * jnp.sum(w * dens * val * val, axis=-1)
  rm = jnp.maximum(m, 0.0)
  return jnp.where(pos, e1, rm), jnp.where(pos, e2, rm * rm)


# --------------------------------------------------------------------------------------------
# Monte Carlo reference for the closed forms (tests).




# --------------------------------------------------------------------------------------------
# Part 2: data-free propagation of per-channel moments (docs/bn_moments.md#propagation-through-the-network, 'diag' Sx).


@dataclasses.dataclass(frozen=True)
class InputMoments:
  """Moments of a producer's input, per input channel (float64).

  Attributes:
    mean: (C,) per-channel means.
    var: (C,) per-channel variances.
    cov: (C, C) full covariance where the model gives one (inputs of BN-free dense layers, whose
      pre-activations are exactly linear in them), else None (independence across channels).
  """

  mean: np.ndarray
  var: np.ndarray
  cov: np.ndarray | None = None


def _bn(variables: Mapping[str, Any], path: str) -> tuple[np.ndarray, np.ndarray]:
  """(beta, |gamma|) of a BN: the pre-activation model N(beta, gamma^2) of docs/bn_moments.md#gaussian-pre-activation-model."""
  p = trees.get_path(variables['params'], path)
  return np.asarray(p['bias'], np.float64), np.abs(np.asarray(p['scale'], np.float64))


# Compiled once per shape: eager evaluation would compile every primitive separately.
_relu_moments_jit = jax.jit(relu_moments)
_max_relu_moments_jit = jax.jit(max_relu_moments, static_argnums=2)
_cross_jit = jax.jit(relu_cross_moment)
# Pairs per call of the elementwise cross-moment kernel: every network reuses ONE executable
# (inputs are padded to this length), and the (chunk, 20) quadrature temporaries stay ~5 MB.
PAIR_CHUNK = 1 << 15


# Elements per call of the elementwise ReLU-moment kernel: every width of every network reuses ONE
# executable (inputs zero-padded to this length; elementwise, so the padding changes no value).
RELU_CHUNK = 2048


def rectified_moments(mean: np.ndarray, var: np.ndarray, pool_k: int = 1
                      ) -> tuple[np.ndarray, np.ndarray]:
  """NumPy float64 E[a] and E[a^2] of a = ReLU(y) (or the max of pool_k iid copies), y ~ N(mean, var).

  The standard deviation sqrt(max(var, 0)) is taken in NumPy (IEEE square root: the same bits as
  on the device). Plain ReLU moments run in chunks of :data:`RELU_CHUNK` zero-padded elements, so
  all widths share one compiled executable; the max-pool moments reduce over a quadrature axis,
  whose vectorization depends on the length, so they run at the exact length.
  """
  mean, std = np.broadcast_arrays(np.asarray(mean, np.float64),
                                  np.sqrt(np.maximum(np.asarray(var, np.float64), 0.0)))
  with jax.enable_x64(True):
    if pool_k != 1:
      e1, e2 = _max_relu_moments_jit(jnp.asarray(mean), jnp.asarray(std), pool_k)
      return np.asarray(e1), np.asarray(e2)
    flat_m, flat_s = mean.reshape(-1), std.reshape(-1)
    n = flat_m.size
    e1, e2 = np.empty(n), np.empty(n)
    for lo in range(0, n, RELU_CHUNK):
      hi = min(lo + RELU_CHUNK, n)
      m_chunk, s_chunk = np.zeros(RELU_CHUNK), np.zeros(RELU_CHUNK)
      m_chunk[:hi - lo] = flat_m[lo:hi]
      s_chunk[:hi - lo] = flat_s[lo:hi]
      a, b = _relu_moments_jit(m_chunk, s_chunk)
      e1[lo:hi] = np.asarray(a)[:hi - lo]
      e2[lo:hi] = np.asarray(b)[:hi - lo]
    return e1.reshape(mean.shape), e2.reshape(mean.shape)


_WARMING: list[Any] = []


def warm_up(submit) -> None:
  """Starts, once per process, a call of :func:`rectified_moments`' elementwise kernel on zeros
  through ``submit(fn, *args)`` (a thread pool's): its trace and compile, or its load from JAX's
  persistent cache, then happens in the background while a command loads its weights, not in
  the first bias correction (:func:`lbyl_jax.pipeline.prepare`). Every width uses this one
  executable (:data:`RELU_CHUNK`)."""
  if not _WARMING:
    _WARMING.append(submit(rectified_moments, np.zeros(1), np.ones(1)))


def relu_mean(mean, std) -> np.ndarray:
  """E[ReLU(y)] for y ~ N(mean, std^2), elementwise NumPy float64: mean Phi(t) + std phi(t),
  t = mean / std (std taken in absolute value: a negative BN gamma gives the same distribution;
  std = 0 gives ReLU(mean)).

  The host-side twin of :func:`relu_moments`' mean (the tests compare them), for callers that
  evaluate it hundreds of times on small arrays (bisection in UDFC's mean match, DFQ's bias
  correction), where a jitted call would pay dispatch on each call and a compile per shape."""
  import scipy.special  # pylint: disable=import-outside-toplevel  (0.1-0.3 s to import)

  m = np.asarray(mean, np.float64)
  sd = np.abs(np.asarray(std, np.float64))
  pos = sd > 0
  t = m / np.where(pos, sd, 1.0)
  val = m * scipy.special.ndtr(t) + sd * np.exp(-0.5 * t * t) / np.sqrt(2.0 * np.pi)
  return np.where(pos, val, np.maximum(m, 0.0))


def clipped_relu_mean(mean, std, clip: float | None = None) -> np.ndarray:
  """E[min(ReLU(y), clip)] for y ~ N(mean, std^2) (clip None: E[ReLU(y)]; ReLU6: clip = 6),
  NumPy float64, through min(ReLU(y), c) = ReLU(y) - ReLU(y - c) and :func:`relu_mean`."""
  e = relu_mean(mean, std)
  if clip is None:
    return e
  return e - relu_mean(np.asarray(mean, np.float64) - clip, std)


def relu_mean_var(mean: np.ndarray, var: np.ndarray, pool_k: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Mean and variance of ReLU(y) (or of the max of pool_k iid copies), y ~ N(mean, var)."""
  e1, e2 = rectified_moments(mean, var, pool_k)
  return e1, np.maximum(e2 - e1 * e1, 0.0)


def _cross_flat(m1, s1, m2, s2, rho) -> np.ndarray:
  n = m1.shape[0]
  out = np.empty(n)
  with jax.enable_x64(True):
    for lo in range(0, n, PAIR_CHUNK):
      hi = min(lo + PAIR_CHUNK, n)
      args = []
      for a in (m1, s1, m2, s2, rho):
        chunk = np.zeros(PAIR_CHUNK)
        chunk[:hi - lo] = a[lo:hi]
        args.append(jnp.asarray(chunk))
      out[lo:hi] = np.asarray(_cross_jit(*args))[:hi - lo]
  return out


def second_moment_matrices(gaussians, *, activation: str = 'relu'
                           ) -> list[tuple[np.ndarray, np.ndarray]]:
  """(E[a], M = E[a a^T]) for each (mean, cov) in ``gaussians``: NumPy float64 in and out.

  The same numbers as :func:`relu_second_moments`, computed for many matrices at once: the
  strictly upper triangles of all of them go through one compiled elementwise kernel in chunks of
  :data:`PAIR_CHUNK` pairs (so any mix of widths costs a single compile); the diagonals use the
  univariate formula.
  """
  gaussians = [(np.asarray(m, np.float64), np.asarray(c, np.float64)) for m, c in gaussians]
  if activation == 'linear':
    return [(m, c + np.outer(m, m)) for m, c in gaussians]
  if activation != 'relu':
    raise ValueError(f"activation must be 'relu' or 'linear', got {activation!r}")
  parts, idx = [], []
  for mean, cov in gaussians:
    std = np.sqrt(np.maximum(np.diagonal(cov), 0.0))
    ss = np.where(std > 0, std, 1.0)
    i, j = np.triu_indices(mean.shape[0], 1)
    rho = np.clip(cov[i, j] / (ss[i] * ss[j]), -1.0, 1.0)
    parts.append((mean[i], std[i], mean[j], std[j], rho))
    idx.append((i, j))
  flat = [np.concatenate([p[k] for p in parts]) for k in range(5)] if parts else [np.zeros(0)] * 5
  cross = _cross_flat(*flat)
  out, lo = [], 0
  for (mean, cov), (i, j) in zip(gaussians, idx):
    e1, e2 = rectified_moments(mean, np.diagonal(cov))
    M = np.diag(e2)
    M[i, j] = M[j, i] = cross[lo:lo + i.size]
    lo += i.size
    out.append((e1, M))
  return out


def _blocks(params: Mapping[str, Any]) -> list[str]:
  """Residual block names layer{s}_{i} in forward order."""
  out = []
  s = 1
  while f'layer{s}_0' in params:
    i = 0
    while f'layer{s}_{i}' in params:
      out.append(f'layer{s}_{i}')
      i += 1
    s += 1
  return out


def _residual_out(variables, blk: str, out_bn: str, x_mean, x_var):
  """Block output moments: ReLU(z), z ~ N(beta_out + m_sc, gamma_out^2 + v_sc).

  The residual branch and the shortcut are treated as independent. Shortcuts: identity (the block
  input's moments); option A (subsample keeps the moments; the zero-padded channels are constant
  0); projection (N(beta_ds, gamma_ds^2) from its BN).
  """
  params = variables['params'][blk]
  beta, gamma = _bn(variables, f'{blk}/{out_bn}')
  planes = beta.shape[0]
  if 'downsample_bn' in params:
    m_sc, g_sc = _bn(variables, f'{blk}/downsample_bn')
    v_sc = g_sc ** 2
  elif planes != x_mean.shape[0]:
    p = planes // 4
    if x_mean.shape[0] + 2 * p != planes:
      raise ValueError(
          f'{blk}: option-A shortcut pads {p} channels per side, which cannot map'
          f' {x_mean.shape[0]} to {planes} channels')
    m_sc, v_sc = np.pad(x_mean, (p, p)), np.pad(x_var, (p, p))
  else:
    m_sc, v_sc = x_mean, x_var
  return relu_mean_var(beta + m_sc, gamma ** 2 + v_sc)


def _image_moments(spec, input_mean: float, input_var: float) -> InputMoments:
  c = spec.input_shape[-1]
  return InputMoments(np.full(c, float(input_mean)), np.full(c, float(input_var)))


def dense_preactivation(W: np.ndarray, moments: InputMoments) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of y = W_{:, :C} x + W_{:, C} for a BN-free dense producer (rows [w, bias]).

  E[y] = W E[x] + b and Cov(y) = W Cov(x) W^T, exact for any input distribution with these first
  two moments (the covariance is diag(var) when the input's full covariance is unknown).
  """
  c = moments.mean.shape[0]
  if W.shape[1] not in (c, c + 1):
    raise ValueError(f'dense producer with {W.shape[1]} columns cannot read {c} input channels')
  w = W[:, :c]
  bias = W[:, c] if W.shape[1] == c + 1 else np.zeros(W.shape[0])
  cov = moments.cov if moments.cov is not None else np.diag(moments.var)
  return w @ moments.mean + bias, w @ cov @ w.T


# The families :func:`propagate` models (a user's model, family 'custom', is not one of them).
NETWORK_MODEL_FAMILIES = ('cifar_resnet', 'resnet', 'vgg_cifar', 'vgg', 'mlp', 'mobilenet_v2')


def propagate(spec, variables: Mapping[str, Any], *, input_mean: float = 0.0,
              input_var: float = 1.0) -> dict[str, InputMoments]:
  """Per-unit moments of the producer's input, from the checkpoint's BN parameters only.

  Model (docs/bn_moments.md#propagation-through-the-network, 'diag' Sx): every BN output is N(beta, gamma^2) per channel (exact in mean
  and variance when the running statistics match the data); channels and positions are treated
  as independent; residual sums add means and variances; a ReLU maps N(m, s^2) to its rectified
  moments. Family specifics:

  - image input: the normalized image, per channel mean ``input_mean`` and variance
    ``input_var`` (0 and 1: what per-channel normalization by the dataset statistics produces);
  - CIFAR / torchvision ResNets: stem output ReLU(N(beta, gamma^2)) (torchvision: then the 3x3
    max-pool, modelled as the max of 9 iid copies, borders ignored); block input = previous block
    output; bottleneck conv2 / conv3 inputs ReLU(N(beta_bn1, gamma_bn1^2)) /
    ReLU(N(beta_bn2, gamma_bn2^2)); see :func:`_residual_out` for block outputs;
  - VGG: conv i+1 reads ReLU(BN_i), through a 2x2 max-pool modelled as the max of 4 iid copies
    (for positively correlated Gaussian neighbours an upper bound on the mean, by Slepian's
    inequality);
  - MLP (no BN): y = W x + b propagated exactly in mean and full covariance
    (:func:`dense_preactivation`), the input covariance ``input_var`` * I; the activation moments
    come from the bivariate closed form, so Cov(a) is full;
  - MobileNetV2 (units: the expansion convs ``features_i/conv_0_0``): every block's output is its
    projection BN, N(beta, gamma^2) per channel (linear bottleneck: no activation), plus the
    block input's moments when the block is residual (branches independent); a block's input is
    the previous block's output (docs/mobilenet_v2.md#expansion-pre-activations).

  Returns:
    {unit name: InputMoments of the producer's input}.
  """
  params = variables['params']
  fam = spec.family
  out: dict[str, InputMoments] = {}
  image = _image_moments(spec, input_mean, input_var)
  if fam == 'mlp':
    c = int(np.prod(spec.input_shape))
    mom = InputMoments(np.full(c, float(input_mean)), np.full(c, float(input_var)),
                       np.eye(c) * float(input_var))
    for u in spec.units:
      out[u.name] = mom
      mean, cov = dense_preactivation(terms.filters(variables, u), mom)
      ((e, m2),) = second_moment_matrices([(mean, cov)])
      cov_a = m2 - np.outer(e, e)
      mom = InputMoments(e, np.diagonal(cov_a).copy(), cov_a)
    return out
  if fam in ('vgg_cifar', 'vgg'):
    mom = image
    for u in spec.units:
      out[u.name] = mom
      beta, gamma = _bn(variables, u.bn)
      mom = InputMoments(*relu_mean_var(beta, gamma ** 2, 4 if u.pool == 'max' else 1))
    return out
  if fam == 'mobilenet_v2':
    return _mobilenet_inputs(spec, variables)
  if fam not in NETWORK_MODEL_FAMILIES:
    raise ValueError(f'{spec.name}: the network-level BN-moment model exists for the preset families'
                     f' only (not {fam!r}); use options that need no moment propagation')
  beta, gamma = _bn(variables, 'bn1')
  x = relu_mean_var(beta, gamma ** 2, 9 if fam == 'resnet' else 1)  # torchvision: 3x3 stem max-pool
  names = {u.producer for u in spec.units}
  for blk in _blocks(params):
    out_bn = 'bn3' if 'conv3' in params[blk] else 'bn2'
    if f'{blk}/conv1' in names:
      out[f'{blk}/conv1'] = InputMoments(*x)
    if out_bn == 'bn3' and f'{blk}/conv2' in names:
      b1, g1 = _bn(variables, f'{blk}/bn1')
      out[f'{blk}/conv2'] = InputMoments(*relu_mean_var(b1, g1 ** 2))
    x = _residual_out(variables, blk, out_bn, *x)
  missing = [u.name for u in spec.units if u.name not in out]
  if missing:
    raise ValueError(f'{spec.name}: no propagated moments for units {missing}')
  return out


def _mobilenet_inputs(spec, variables: Mapping[str, Any]) -> dict[str, InputMoments]:
  """:func:`propagate` for the MobileNetV2 presets (``spec.model.blocks()``)."""
  by_block = {u.producer.split('/')[0]: u for u in spec.units}
  out: dict[str, InputMoments] = {}
  mean = var = None
  for b in spec.model.blocks():
    if b.name in by_block:
      if mean is None:
        raise ValueError(f'{spec.name}: block {b.name} has no modelled input')
      out[by_block[b.name].name] = InputMoments(mean.copy(), var.copy())
    beta, gamma = _bn(variables, b.output_bn)
    if b.residual and mean is not None:
      mean, var = beta + mean, gamma ** 2 + var
    else:
      mean, var = beta, gamma ** 2
  missing = [u.name for u in spec.units if u.name not in out]
  if missing:
    raise ValueError(f'{spec.name}: no propagated moments for units {missing}')
  return out


# --------------------------------------------------------------------------------------------
# Part 3: the per-unit model of pre-activations and activations (docs/bn_moments.md).

COV_MODELS = ('identity', 'diag')


def _gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """a @ b.T. Small products avoid multi-threaded BLAS, whose thread hand-off costs tens of ms
  per call on a busy 2-core machine (measured: 30 ms vs 0.3 ms for 64 x 576 x 64)."""
  if a.shape[0] * a.shape[1] * b.shape[0] <= (1 << 23):
    return np.einsum('id,jd->ij', a, b)
  return a @ b.T

def preactivation(problem: UnitProblem, moments: InputMoments | None, *,
                  cov_model: str = 'diag') -> tuple[np.ndarray, np.ndarray, str]:
  """(mean, covariance, model name) of the unit's pre-activations y (N,), (N, N), float64.

  Args:
    problem: the unit (W, bn as in :class:`lbyl_jax.pruning.methods.base.UnitProblem`).
    moments: the producer's input moments (needed for 'diag' and for BN-free units).
    cov_model: 'identity' or 'diag' Sx for BN units.
  """
  W = np.asarray(problem.W, np.float64)
  name = problem.unit.name
  if problem.unit.bn is None:
    if moments is None:
      raise ValueError(f'{name}: a BN-free unit needs propagated input moments')
    mean, cov = dense_preactivation(W, moments)
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
  rho = gram_correlation(G)
  g = np.abs(np.asarray(bn['gamma'], np.float64))
  return np.asarray(bn['beta'], np.float64).copy(), g[:, None] * rho * g[None, :], cov_model


def gram_correlation(G: np.ndarray) -> np.ndarray:
  """The correlation matrix of a Gram matrix of filters, clipped to [-1, 1], unit diagonal; a
  zero filter carries no correlation information, so its channel is treated as independent."""
  norm = np.sqrt(np.maximum(np.diagonal(G), 0.0))
  ok = norm > 0
  ns = np.where(ok, norm, 1.0)
  rho = np.clip(G / np.outer(ns, ns), -1.0, 1.0)
  rho = np.where(np.outer(ok, ok), rho, 0.0)
  np.fill_diagonal(rho, 1.0)
  return rho

def second_moments(prepared: Sequence[tuple[np.ndarray, np.ndarray]], *, activation: str = 'relu'
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
  """(E[a], M = E[a a^T]) per unit from its pre-activation (mean, cov)."""
  return second_moment_matrices(prepared, activation=activation)

def prepare(spec, variables, problems, cov_model: str, moments):
  need = cov_model == 'diag' or any(p.unit.bn is None for p in problems)
  if need and moments is None and spec is not None and spec.family == 'custom':
    no_bn = [p.unit.name for p in problems if p.unit.bn is None]
    why = (f"cov_model='diag' needs per-channel input moments" if cov_model == 'diag' else
           f'units without BN: {", ".join(no_bn[:5])} need their input moments')
    raise ValueError(f'{spec.name}: {why} propagated through the network, which exists for the'
                     " presets only; on a user's model use bnm_cov='identity' / moment_cov="
                     "'identity' (units with a BatchNorm)")
  if need and moments is None:
    moments = propagate(spec, variables)
  prepared, kinds = [], []
  for p in problems:
    mom = moments.get(p.unit.name) if moments is not None else None
    if need and mom is None:
      raise ValueError(f'{spec.name}: no propagated moments for unit {p.unit.name}')
    mean, cov, kind = preactivation(p, mom, cov_model=cov_model)
    prepared.append((mean, cov))
    kinds.append(kind)
  return prepared, kinds, moments

def unit_moments(spec, variables, problems: Sequence[UnitProblem], *, cov_model: str = 'diag',
                 moments=None) -> list[tuple[np.ndarray, np.ndarray]]:
  """(E[a], M) of every unit under the Gaussian model (as the bnm method builds them)."""
  prepared, _, _ = prepare(spec, variables, problems, cov_model, moments)
  return second_moments(prepared)

def activation_means(spec, variables: Mapping[str, Any], problems: Sequence[UnitProblem], *,
                     moments: Mapping[str, InputMoments] | None = None
                     ) -> list[np.ndarray]:
  """E[a] per unit under the Gaussian model: the ReLU means of N(beta, gamma^2) for BN units (no
  propagation needed), of the propagated pre-activations for BN-free units."""
  if moments is None and any(p.unit.bn is None for p in problems):
    moments = propagate(spec, variables)
  out = []
  for p in problems:
    if p.unit.bn is None:
      mean, cov = dense_preactivation(np.asarray(p.W, np.float64), moments[p.unit.name])
      var = np.diagonal(cov)
    else:
      mean = np.asarray(p.bn['beta'], np.float64)
      var = np.asarray(p.bn['gamma'], np.float64) ** 2
    out.append(relu_mean_var(mean, var)[0])
  return out
