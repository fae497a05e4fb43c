"""Compensation of 'depthwise' units: NM, LBYL and BN-moments through depthwise conv + BN + ReLU6.

A unit whose path discovery found to be exactly (BN) -> ReLU / ReLU6 -> depthwise conv -> BN ->
ReLU / ReLU6 -> linear consumer (the expanded channels of a MobileNetV2 inverted residual,
:mod:`lbyl_jax.core.units`, compensation 'depthwise') cannot use the ReLU algebra of the other
units: the activation the consumer reads depends on the channel's own depthwise filter and passes
two clipped activations. The derivation, its assumptions and approximations are in
docs/mobilenet_v2.md; per expanded channel i (notation of docs/README.md#notation):

  y_i = alpha1_i W_i . x + b1_i                  producer + BN1 (f_i = alpha1_i W_i)
  a_i = act1(y_i)                                 ReLU6 (or ReLU)
  z_i = sum_t d_{i,t} a_i(p + t)                  depthwise k x k, own filter d_i
  v_i = alpha2_i z_i + b2_i                       BN2 (g_i = alpha2_i d_i)
  c_i = act2(v_i)                                 the activation the consumer V reads

Pruning channel j removes W_j, BN1_j, d_j, BN2_j and V[:, j] (surgery slices the through layers).
Every method gives delivery rows S_P (and a constant) with c_P ~ S_P c_K (+ const), folded into the
consumer by :mod:`lbyl_jax.pruning.surgery` exactly as for a plain unit.

- Filter-space surrogate (:func:`surrogate`, docs/mobilenet_v2.md#the-filter-space-surrogate): with
  both activations replaced by the identity, channel i is one k x k conv of the producer's input
  with filter H_i = f_i (x) g_i and bias B_i = b2_i + (sum_t g_{i,t}) b1_i (interior positions).
- ``nm`` (:func:`nm_rows`, docs/mobilenet_v2.md#neuron-merging-on-the-composite-channel): Neuron
  Merging on the composite: one kept partner with scale (||f_j|| ||g_j||) / (||f_k|| ||g_k||),
  similarity cos(f_j, f_k) cos(g_j, g_k) when both cosines are positive.
- ``lbyl`` (:func:`lbyl_system`, docs/mobilenet_v2.md#lbyl-on-the-composite-channel): LBYL's
  consistent form on (H, B), solved by :mod:`lbyl_jax.pruning.solvers`.
- ``bnm`` (:func:`unit_moments`, docs/mobilenet_v2.md#bn-moments-through-relu6-and-the-depthwise-conv):
  y ~ N(beta1, |gamma1| rho_y |gamma1|), a spatially correlated window (omega^(|dh| + |dw|),
  omega calibrated on BN2's running variances), a = act1(y) in closed form, z's covariance exactly
  through the depthwise filter, v ~ N(beta2, gamma2 rho_z gamma2), c = act2(v); S_P = M_PK (M_KK +
  eps I)^{-1} with M = E[c c^T] (or the centred fit and its intercept with bias correction 'on').
- Constants (bias correction 'on', the default of nm and lbyl, and prune with 'on'):
  k = E[c_P] - S_P E[c_K] with E[c] the clipped mean of N(beta2, gamma2^2)
  (docs/mobilenet_v2.md#constants-for-the-other-methods); the guard (``--guard moments``) scales
  each row by its least-squares factor in [0, 1] under this model's M.

ReLU6 moments use ReLU6(y) = ReLU(y) - ReLU(y - 6), so every clipped moment is a signed sum of
rectified-Gaussian moments of :mod:`lbyl_jax.pruning.moments` (exact, closed form).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lbyl_jax.core import trees
from lbyl_jax.core.bn import BN_EPS
from lbyl_jax.pruning import bias as bias_lib
from lbyl_jax.pruning import moments as moments_lib
from lbyl_jax.pruning import solvers
from lbyl_jax.pruning.problem import UnitProblem, UnitSolution, coefficient_stats

METHODS = ('prune', 'nm', 'lbyl', 'bnm')
BIAS_MODES = ('off', 'on')
SPATIAL_MODELS = ('calibrated', 'independent', 'constant')
# The upper clip of each activation a depthwise unit may have (None: no clip).
CLIPS: dict[str, float | None] = {'relu': None, 'relu6': 6.0}
EPS_SCALE = 1e-6
# Grid of the spatial correlation omega (step 0.005 on [0, 0.995]).
OMEGA_GRID = np.round(np.arange(0.0, 1.0, 0.005), 6)


# --------------------------------------------------------------------------------------------
# Per-unit terms.


@dataclasses.dataclass(frozen=True)
class BlockTerms:
  """The float64 quantities of one depthwise unit (N channels).

  Attributes:
    f: (N, D) BN1-scaled producer filters alpha1_i W_i (torch order).
    b1: (N,) shift of the pre-activation (BN1: beta1 - alpha1 mu1; no BN1: the producer's bias).
    beta1, gamma1: (N,) BN1 affine terms (the pre-activation model N(beta1, gamma1^2)), None
      without BN1.
    d: (N, kh*kw) depthwise filters in torch order (kh, kw).
    g: (N, kh*kw) BN2-scaled depthwise filters alpha2_i d_i.
    b2: (N,) BN2 shift beta2 - alpha2 mu2 (a depthwise bias folded into mu2).
    beta2, gamma2: (N,) BN2 affine terms.
    mu2, var2: (N,) BN2 running statistics (the data's mean and variance of z).
    kernel: (kh, kw) of the depthwise conv.
    clip1, clip2: upper clip of the first / second activation (6.0 for ReLU6, None for ReLU).
  """

  f: np.ndarray
  b1: np.ndarray
  beta1: np.ndarray | None
  gamma1: np.ndarray | None
  d: np.ndarray
  g: np.ndarray
  b2: np.ndarray
  beta2: np.ndarray
  gamma2: np.ndarray
  mu2: np.ndarray
  var2: np.ndarray
  kernel: tuple[int, int] = (3, 3)
  clip1: float | None = 6.0
  clip2: float | None = 6.0

  @property
  def n(self) -> int:
    return int(self.f.shape[0])


def _layers(unit) -> tuple[Any, Any]:
  """The (depthwise, BN) through layers of a depthwise unit (every consumer reads through them)."""
  through = unit.consumers[0].through if unit.consumers else ()
  kinds = tuple(t.kind for t in through)
  if unit.compensation != 'depthwise' or kinds != ('depthwise', 'bn'):
    raise ValueError(f'{unit.name}: not a depthwise unit (compensation {unit.compensation!r},'
                     f' through layers {kinds})')
  return through[0], through[1]


def block_terms(spec, variables: Mapping[str, Any], problem: UnitProblem, *,
                sigma: str = 'std') -> BlockTerms:
  """:class:`BlockTerms` of one unit from the ORIGINAL variables.

  Args:
    spec: the architecture (BN epsilons; may be None: 1e-5).
    problem: the unit as :func:`lbyl_jax.pruning.selection.build_problems` builds it (W: the
      producer's filters, bn: BN1's terms with the chosen sigma).
    sigma: 'std' (sqrt(var + eps)) or 'variance' for BN2's alpha, like the selection's bn_sigma.
  """
  unit = problem.unit
  dw, bn2 = _layers(unit)
  n = problem.n
  layer = trees.get_path(variables['params'], dw.path)
  k = np.asarray(layer['kernel'], np.float64)
  if k.ndim != 4 or k.shape[2] != 1:
    raise ValueError(f'{dw.path}: expected a depthwise HWIO kernel (kh, kw, 1, C), got {k.shape}')
  k = k[..., dw.offset:dw.offset + n]
  d = np.transpose(k[:, :, 0, :], (2, 0, 1)).reshape(n, -1)
  dw_bias = (np.asarray(layer['bias'], np.float64)[dw.offset:dw.offset + n] if 'bias' in layer
             else np.zeros(n))
  p = trees.get_path(variables['params'], bn2.path)
  s = trees.get_path(variables['batch_stats'], bn2.path)
  sl = slice(bn2.offset, bn2.offset + n)
  mu2 = np.asarray(s['mean'], np.float64)[sl] - dw_bias
  var2 = np.asarray(s['var'], np.float64)[sl]
  gamma2 = np.asarray(p['scale'], np.float64)[sl] if 'scale' in p else np.ones(n)
  beta2 = np.asarray(p['bias'], np.float64)[sl] if 'bias' in p else np.zeros(n)
  eps = spec.bn_epsilon(bn2.path) if spec is not None else BN_EPS
  if sigma == 'std':
    sg2 = np.sqrt(var2 + eps)
  elif sigma == 'variance':
    sg2 = var2
  else:
    raise ValueError(f"sigma must be 'std' or 'variance', got {sigma!r}")
  alpha2 = gamma2 / sg2
  W = np.asarray(problem.W, np.float64)
  bn = problem.bn
  if unit.bn is None:
    c_in = int(np.prod(np.shape(trees.get_path(variables['params'], unit.producer)['kernel'])[:-1]))
    f = W[:, :c_in]
    b1 = W[:, c_in] if W.shape[1] > c_in else np.zeros(n)  # the bias column of terms.filters
    beta1 = gamma1 = None
  else:
    f = np.asarray(bn['alpha'], np.float64)[:, None] * W
    b1 = np.asarray(bn['b'], np.float64)
    beta1 = np.asarray(bn['beta'], np.float64)
    gamma1 = np.asarray(bn['gamma'], np.float64)
  acts = (unit.activation, unit.through_activation)
  if any(a not in CLIPS for a in acts):
    raise ValueError(f'{unit.name}: activations {acts}; a depthwise unit needs ReLU or ReLU6')
  return BlockTerms(f=f, b1=b1, beta1=beta1, gamma1=gamma1, d=d, g=alpha2[:, None] * d,
                    b2=beta2 - alpha2 * mu2, beta2=beta2, gamma2=gamma2, mu2=mu2, var2=var2,
                    kernel=(int(k.shape[0]), int(k.shape[1])), clip1=CLIPS[acts[0]],
                    clip2=CLIPS[acts[1]])


# --------------------------------------------------------------------------------------------
# Filter-space surrogate, NM and LBYL.


def surrogate(terms: BlockTerms) -> tuple[np.ndarray, np.ndarray]:
  """(H, B): the composite filters (N, D * kh * kw, torch order (C, kh, kw)) and biases (N,) of
  the unit with both activations replaced by the identity: v_i = H_i . patch(x) + B_i at interior
  positions, H_i = f_i (x) g_i, B_i = b2_i + (sum_t g_{i,t}) b1_i. Gram: H H^T = (F F^T) o (G G^T)."""
  H = (terms.f[:, :, None] * terms.g[:, None, :]).reshape(terms.n, -1)
  B = terms.b2 + terms.g.sum(axis=1) * terms.b1
  return H, B


def _cos(X: np.ndarray, keep: np.ndarray, prune: np.ndarray
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  nP = np.linalg.norm(X[prune], axis=1)
  nK = np.linalg.norm(X[keep], axis=1)
  dots = X[prune] @ X[keep].T
  den = nP[:, None] * nK[None, :]
  return np.divide(dots, den, out=np.zeros_like(dots), where=den > 0), nP, nK


def nm_rows(terms: BlockTerms, keep: np.ndarray, prune: np.ndarray, *, t: float,
            lam: float) -> tuple[np.ndarray, dict[str, Any]]:
  """Neuron Merging rows S_P (|P| x m, at most one non-zero per row) on the composite channel.

  sim_jk = cos(f_j, f_k) cos(g_j, g_k) if both cosines are > 0, else 0; kappa_jk =
  (||f_j|| ||g_j||) / (||f_k|| ||g_k||); bd_jk = |B_j - kappa_jk B_k| min-max normalized over the
  valid kept channels; score = lam (1 - sim) + (1 - lam) bd; k* = argmin score; merge with
  S[j, k*] = kappa if sim_jk* >= t (docs/neuron_merging.md#bn-rule on :func:`surrogate`).
  """
  keep = np.asarray(keep)
  prune = np.asarray(prune)
  S = np.zeros((prune.size, keep.size))
  if prune.size == 0:
    return S, dict(merged=0)
  cf, nfP, nfK = _cos(terms.f, keep, prune)
  cg, ngP, ngK = _cos(terms.g, keep, prune)
  sim = np.where((cf > 0) & (cg > 0), cf * cg, 0.0)
  _, B = surrogate(terms)
  num = (nfP * ngP)[:, None]
  den = (nfK * ngK)[None, :]
  valid = np.broadcast_to(den > 0, sim.shape)
  kappa = np.divide(num, den, out=np.zeros(sim.shape), where=valid)
  bd = np.abs(B[prune, None] - kappa * B[None, keep])
  lo = np.min(np.where(valid, bd, np.inf), axis=1, keepdims=True)
  hi = np.max(np.where(valid, bd, -np.inf), axis=1, keepdims=True)
  rng = hi - lo
  bdn = np.divide(bd - lo, rng, out=np.zeros_like(bd), where=np.isfinite(rng) & (rng > 0))
  score = np.where(valid, lam * (1.0 - sim) + (1.0 - lam) * bdn, np.inf)
  k = np.argmin(score, axis=1)
  rows = np.arange(prune.size)
  ok = np.isfinite(score[rows, k]) & (sim[rows, k] >= t) & (kappa[rows, k] > 0)
  S[rows[ok], k[ok]] = kappa[rows[ok], k[ok]]
  return S, dict(merged=int(ok.sum()))


def lbyl_system(terms: BlockTerms, keep: np.ndarray, prune: np.ndarray, *, lam1: float,
                lam2: float, name: str = '') -> solvers.SharedSystem:
  """LBYL's consistent-form system (docs/lbyl.md#consistent-closed-form) on the composite (H, B):
  min_s ||H_j - H_K^T s||^2 + lam1 (B_j - B_K^T s)^2 + lam2 ||s||^2 for every pruned j."""
  H, B = surrogate(terms)
  return solvers.SharedSystem(H[keep], H[prune], B[keep], B[prune], float(lam1), float(lam2), name)


# --------------------------------------------------------------------------------------------
# Clipped-ReLU moments (closed form through ReLU6(y) = ReLU(y) - ReLU(y - 6)).


def clipped_moments(mean: jax.Array, std: jax.Array, clip: float | None = 6.0
                    ) -> tuple[jax.Array, jax.Array]:
  """E[a] and E[a^2] for a = min(ReLU(y), clip) (clip None: ReLU), y ~ N(mean, std^2).

  With R(u) = ReLU(u): ReLU6(y) = R(y) - R(y - 6) and R(y) R(y - 6) = R(y - 6)^2 + 6 R(y - 6), so
  E[ReLU6] = E R(y) - E R(y - 6) and E[ReLU6^2] = E R(y)^2 - E R(y - 6)^2 - 12 E R(y - 6).
  """
  m = jnp.asarray(mean)
  e1, e2 = moments_lib.relu_moments(m, std)
  if clip is None:
    return e1, e2
  f1, f2 = moments_lib.relu_moments(m - clip, std)
  return e1 - f1, jnp.maximum(e2 - f2 - 2.0 * clip * f1, 0.0)


def clipped_cross_moment(m1, s1, m2, s2, rho, clip: float | None = 6.0) -> jax.Array:
  """E[a_1 a_2] for a = min(ReLU(y), clip) of a bivariate normal (means m, std devs |s|,
  correlation rho): R(0, 0) - R(0, c) - R(c, 0) + R(c, c) with R(a, b) = E[ReLU(y_1 - a)
  ReLU(y_2 - b)] (:func:`lbyl_jax.pruning.moments.relu_cross_moment`)."""
  cm = moments_lib.relu_cross_moment
  if clip is None:
    return cm(m1, s1, m2, s2, rho)
  return (cm(m1, s1, m2, s2, rho) - cm(m1, s1, m2 - clip, s2, rho)
          - cm(m1 - clip, s1, m2, s2, rho) + cm(m1 - clip, s1, m2 - clip, s2, rho))


_moments_jit = jax.jit(clipped_moments, static_argnames='clip')
_cross_jit = jax.jit(clipped_cross_moment, static_argnames='clip')
# Pairs per call of the compiled cross-moment kernel: inputs are padded to one of these lengths
# (two executables per clip; small units do not pay for a large padded chunk).
CHUNKS = (1 << 12, 1 << 15)


def mean_second(mean, std, clip: float | None = 6.0) -> tuple[np.ndarray, np.ndarray]:
  """NumPy float64 :func:`clipped_moments`."""
  with jax.enable_x64(True):
    e1, e2 = _moments_jit(jnp.asarray(mean, jnp.float64), jnp.asarray(std, jnp.float64), clip=clip)
    return np.asarray(e1), np.asarray(e2)


def cross(m1, s1, m2, s2, rho, clip: float | None = 6.0) -> np.ndarray:
  """NumPy float64 :func:`clipped_cross_moment` of broadcast arrays, in fixed-size chunks."""
  arrays = [np.asarray(a, np.float64).ravel() for a in np.broadcast_arrays(m1, s1, m2, s2, rho)]
  n = arrays[0].size
  out = np.empty(n)
  size = CHUNKS[0] if n <= CHUNKS[0] else CHUNKS[1]
  with jax.enable_x64(True):
    for lo in range(0, n, size):
      hi = min(lo + size, n)
      args = []
      for a in arrays:
        chunk = np.zeros(size)
        chunk[:hi - lo] = a[lo:hi]
        args.append(jnp.asarray(chunk))
      out[lo:hi] = np.asarray(_cross_jit(*args, clip=clip))[:hi - lo]
  return out.reshape(np.broadcast(m1, s1, m2, s2, rho).shape)


def second_moments(mean: np.ndarray, cov: np.ndarray, clip: float | None = 6.0
                   ) -> tuple[np.ndarray, np.ndarray]:
  """E[c] (N,) and M = E[c c^T] (N, N) of c = min(ReLU(v), clip), v ~ N(mean, cov) (float64)."""
  mean = np.asarray(mean, np.float64)
  cov = np.asarray(cov, np.float64)
  std = np.sqrt(np.maximum(np.diagonal(cov), 0.0))
  e1, e2 = mean_second(mean, std, clip)
  ss = np.where(std > 0, std, 1.0)
  i, j = np.triu_indices(mean.size, 1)
  rho = np.clip(cov[i, j] / (ss[i] * ss[j]), -1.0, 1.0)
  M = np.diag(e2)
  M[i, j] = M[j, i] = cross(mean[i], std[i], mean[j], std[j], rho, clip)
  return e1, M


# --------------------------------------------------------------------------------------------
# The depthwise stage: spatial model, calibration, moments of z.


def tap_distances(kernel: tuple[int, int] = (3, 3)) -> np.ndarray:
  """(kh*kw, kh*kw) L1 distances |dh| + |dw| between the taps of a kernel window (torch order)."""
  kh, kw = kernel
  h, w = np.divmod(np.arange(kh * kw), kw)
  return np.abs(h[:, None] - h[None, :]) + np.abs(w[:, None] - w[None, :])


def spatial_correlation(omega: float, kernel: tuple[int, int] = (3, 3)) -> np.ndarray:
  """R_omega[t, t'] = omega^(|dh| + |dw|): a separable AR(1) (exponential) correlation of the
  window, positive semi-definite for omega in [0, 1] (Kronecker product of two AR(1) matrices)."""
  return float(omega) ** tap_distances(kernel).astype(np.float64)


def filter_lag_products(d: np.ndarray, kernel: tuple[int, int] = (3, 3)) -> np.ndarray:
  """D[l, i, k'] = sum over tap pairs (t, t') at L1 distance l of d_i[t] d_k'[t']
  (l = 0 .. kh + kw - 2)."""
  dist = tap_distances(kernel)
  return np.stack([np.einsum('it,tu,ku->ik', d, (dist == lag).astype(np.float64), d)
                   for lag in range(int(dist.max()) + 1)])


def _need_bn1(terms: BlockTerms, what: str) -> None:
  if terms.beta1 is None:
    raise ValueError(f'{what} needs a BatchNorm after the producer of a depthwise unit (its'
                     ' pre-activation model N(beta, gamma^2))')


def y_model(terms: BlockTerms, input_var: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
  """(mean, correlation) of y: mean beta1, correlation of f_i under Sx = diag(input variances
  repeated over the producer's kernel taps) (identity when None); a zero filter is uncorrelated
  with everything."""
  _need_bn1(terms, 'the BN-moments model')
  f = terms.f
  if input_var is not None:
    c = np.asarray(input_var).shape[0]
    if f.shape[1] % c:
      raise ValueError(f'filters of length {f.shape[1]} do not split into {c} input channels')
    sx = np.repeat(input_var, f.shape[1] // c)
    G = (f * sx[None, :]) @ f.T
  else:
    G = f @ f.T
  return terms.beta1.copy(), moments_lib.gram_correlation(G)


def _window_cov_lags(terms: BlockTerms, rho: np.ndarray, omega: float, lags: int,
                     ea: np.ndarray, var_a: np.ndarray) -> np.ndarray:
  """C[l, i, k] = Cov(a_i(q), a_k(q')) for taps at L1 distance l, y-correlation rho_ik omega^l
  (one call of the compiled kernel for all lags and pairs)."""
  mean, std = terms.beta1, np.abs(terms.gamma1)
  n = mean.size
  i, j = np.triu_indices(n, 0)
  r = rho[i, j][None, :] * (float(omega) ** np.arange(lags, dtype=np.float64))[:, None]
  shape = r.shape
  cr = cross(np.broadcast_to(mean[i], shape), np.broadcast_to(std[i], shape),
             np.broadcast_to(mean[j], shape), np.broadcast_to(std[j], shape), r, terms.clip1)
  cr = cr - (ea[i] * ea[j])[None, :]
  out = np.empty((lags, n, n))
  out[:, i, j] = cr
  out[:, j, i] = cr
  out[0][np.diag_indices(n)] = var_a
  return out


def _first_stage(terms: BlockTerms) -> tuple[np.ndarray, np.ndarray]:
  ea, e2 = mean_second(terms.beta1, np.abs(terms.gamma1), terms.clip1)
  return ea, np.maximum(e2 - ea * ea, 0.0)


def depthwise_moments(terms: BlockTerms, rho_y: np.ndarray, omega: float
                      ) -> tuple[np.ndarray, np.ndarray]:
  """E[z] (N,) and Cov(z) (N, N) at interior positions under the spatial model.

  E z_i = (sum_t d_i[t]) E a_i;  Cov(z_i, z_k) = sum_l D_ik(l) C_ik(l), with D the filters' lag
  products (:func:`filter_lag_products`) and C_ik(l) the activation covariance of y_i, y_k at
  correlation rho_y_ik omega^l (l = 0: the same position).
  """
  _need_bn1(terms, 'the BN-moments model')
  ea, var_a = _first_stage(terms)
  D = filter_lag_products(terms.d, terms.kernel)
  C = _window_cov_lags(terms, rho_y, omega, D.shape[0], ea, var_a)
  cov = np.einsum('lik,lik->ik', D, C)
  return terms.d.sum(axis=1) * ea, 0.5 * (cov + cov.T)


def _diag_variance_curves(terms: BlockTerms, grid: np.ndarray) -> np.ndarray:
  """Modelled Var(z_i) for every omega of ``grid``: (len(grid), N)."""
  ea, var_a = _first_stage(terms)
  std = np.abs(terms.gamma1)
  D = filter_lag_products(terms.d, terms.kernel)  # (L, N, N)
  Dii = np.stack([np.diagonal(D[l]) for l in range(D.shape[0])])  # (L, N)
  n, lags = terms.n, D.shape[0]
  w = np.asarray(grid, np.float64)
  r = w[:, None, None] ** np.arange(1, lags)[None, :, None]  # (G, L-1, 1)
  m = np.broadcast_to(terms.beta1, (w.size, lags - 1, n))
  s = np.broadcast_to(std, (w.size, lags - 1, n))
  cr = cross(m, s, m, s, np.broadcast_to(r, m.shape), terms.clip1) - ea * ea  # (G, L-1, N)
  return Dii[0] * var_a + np.einsum('ln,gln->gn', Dii[1:], cr)


def _calibration_loss(terms: BlockTerms, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean squared log-variance error per omega of ``grid``, and the channel mask used."""
  curves = _diag_variance_curves(terms, grid)
  target = terms.var2
  ok = (target > 1e-12) & np.all(curves > 1e-12, axis=0)
  if not np.any(ok):
    return np.full(len(grid), np.nan), ok
  err = np.log(np.maximum(curves[:, ok], 1e-300)) - np.log(target[ok])[None, :]
  return np.mean(err ** 2, axis=1), ok


def calibrate_omega(terms: BlockTerms, grid: np.ndarray | None = None) -> tuple[float, dict]:
  """The spatial correlation omega whose modelled Var(z_i) best matches BN2's running variances
  (least squares on log variances over channels with positive modelled and running variance).
  Data-free: BN2's running variance is the data's Var(z_i), stored in the checkpoint.

  Args:
    grid: candidate omegas searched exhaustively; None: coarse-to-fine, step 0.05 on [0, 0.95],
      then step 0.005 within +-0.05 of the best coarse value (the resolution of OMEGA_GRID).

  Returns:
    (omega, dict(log_rmse at omega, log_rmse_independent at omega = 0, channels used)).
  """
  _need_bn1(terms, 'the calibration of the spatial model')
  nothing = dict(log_rmse=float('nan'), log_rmse_independent=float('nan'), channels=0)
  if grid is None:
    coarse = np.round(np.arange(0.0, 0.951, 0.05), 6)
    loss_c, ok = _calibration_loss(terms, coarse)
    if not np.any(ok):
      return 0.0, nothing
    c = float(coarse[int(np.argmin(loss_c))])
    fine = np.round(np.arange(max(c - 0.05, 0.0), min(c + 0.05, 0.995) + 1e-9, 0.005), 6)
    fine = np.setdiff1d(fine, coarse)
    loss_f, _ = _calibration_loss(terms, fine) if fine.size else (np.zeros(0), ok)
    grid = np.concatenate([coarse, fine])
    loss = np.concatenate([loss_c, loss_f])
  else:
    grid = np.asarray(grid, np.float64)
    loss, ok = _calibration_loss(terms, grid)
  if not np.any(ok):
    return 0.0, nothing
  best = int(np.argmin(loss))
  zero = _calibration_loss(terms, np.zeros(1))[0][0] if grid[0] != 0 else loss[0]
  return float(grid[best]), dict(log_rmse=float(np.sqrt(loss[best])),
                                 log_rmse_independent=float(np.sqrt(zero)),
                                 channels=int(ok.sum()))


def unit_moments(terms: BlockTerms, *, input_var: np.ndarray | None = None,
                 spatial: str | float = 'calibrated') -> dict[str, Any]:
  """The BN-moments model of one unit (docs/mobilenet_v2.md#bn-moments-through-relu6-and-the-depthwise-conv).

  Args:
    terms: :func:`block_terms`.
    input_var: per-input-channel variance of the producer's input (``diag`` Sx); None: identity.
    spatial: 'calibrated' (omega from :func:`calibrate_omega`), 'independent' (omega = 0),
      'constant' (omega = 1: the window sees one value), or a float omega in [0, 1].

  Returns:
    dict(E: E[c] (N,), M: E[c c^T] (N, N), omega, rho_z, z_mean, z_var (the modelled moments of
    z, to compare with BN2's running mean / var), calibration diagnostics).
  """
  diag: dict[str, Any] = {}
  if isinstance(spatial, str):
    if spatial not in SPATIAL_MODELS:
      raise ValueError(f'spatial must be one of {SPATIAL_MODELS} or a number, got {spatial!r}')
    if spatial == 'calibrated':
      omega, diag = calibrate_omega(terms)
    else:
      omega = 0.0 if spatial == 'independent' else 1.0
  else:
    omega = float(spatial)
    if not 0.0 <= omega <= 1.0:
      raise ValueError(f'spatial correlation omega must be in [0, 1], got {spatial!r}')
  _, rho_y = y_model(terms, input_var)
  ez, cz = depthwise_moments(terms, rho_y, omega)
  vz = np.maximum(np.diagonal(cz), 0.0)
  sz = np.sqrt(vz)
  ok = sz > 0
  ss = np.where(ok, sz, 1.0)
  rho_z = np.clip(cz / np.outer(ss, ss), -1.0, 1.0)
  rho_z = np.where(np.outer(ok, ok), rho_z, 0.0)
  np.fill_diagonal(rho_z, 1.0)
  cov_v = terms.gamma2[:, None] * rho_z * terms.gamma2[None, :]
  E, M = second_moments(terms.beta2, cov_v, terms.clip2)
  return dict(E=E, M=M, omega=omega, rho_z=rho_z, z_mean=ez, z_var=vz, **diag)


def _ridge(A: np.ndarray, R: np.ndarray, eps_scale: float = EPS_SCALE
           ) -> tuple[np.ndarray, float, float]:
  """X = R (A + eps I)^{-1}, eps = eps_scale trace(A) / m (A SPD, m x m; R p x m)."""
  m = A.shape[0]
  eps = eps_scale * np.trace(A) / m if m else 0.0
  eps = eps if eps > 0 else eps_scale
  Ar = A + eps * np.eye(m)
  X = np.linalg.solve(Ar, R.T).T
  w = np.linalg.eigvalsh(Ar)
  return X, float(eps), float(w[-1] / w[0]) if w[0] > 0 else float('inf')


def bnm_fit(E: np.ndarray, M: np.ndarray, keep: np.ndarray, prune: np.ndarray, *,
            intercept: bool = False, eps_scale: float = EPS_SCALE) -> dict[str, Any]:
  """The BN-moments delivery from the moments of c.

  intercept False: S = M_PK (M_KK + eps I)^{-1}, no constant. True: with C = M - E E^T,
  S = C_PK (C_KK + eps I)^{-1} and c = E_P - S E_K. Both minimize E||c_P - S c_K (- c)||^2 under the
  model; ``res`` is that expected error and ``second`` = trace M_PP (the error of plain pruning).
  """
  keep = np.asarray(keep)
  prune = np.asarray(prune)
  A = M - np.outer(E, E) if intercept else M
  S, eps, cond = _ridge(A[np.ix_(keep, keep)], A[np.ix_(prune, keep)], eps_scale)
  const = E[prune] - S @ E[keep] if intercept else None
  resid = (np.trace(A[np.ix_(prune, prune)]) - 2.0 * np.sum(S * A[np.ix_(prune, keep)])
           + np.sum((S @ A[np.ix_(keep, keep)]) * S))
  return dict(S=S, const=const, res=float(max(resid, 0.0)),
              second=float(np.trace(M[np.ix_(prune, prune)])), eps=eps, cond=cond)


def guard_scales(S: np.ndarray, M: np.ndarray, keep: np.ndarray, prune: np.ndarray) -> np.ndarray:
  """Per row of S, the factor t_j in [0, 1] minimising E(c_j - t s_j^T c_K)^2 under the model's
  M (docs/bias_correction.md#guard; the same clipped least-squares factor as
  :func:`lbyl_jax.experimental.guard.guard_scales`, which a test checks):
  t* = s_j^T M_Kj / s_j^T M_KK s_j, clipped to [0, 1]; 0 where the denominator vanishes."""
  S = np.asarray(S, np.float64)
  num = np.sum(S * M[np.ix_(prune, keep)], axis=1)
  den = np.sum((S @ M[np.ix_(keep, keep)]) * S, axis=1)
  with np.errstate(divide='ignore', invalid='ignore'):
    t = np.where(den > 0, num / den, 0.0)
  return np.clip(np.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0), 0.0, 1.0)


def output_means(terms: BlockTerms) -> np.ndarray:
  """E[c] under BN2's marginals N(beta2, gamma2^2) alone (the constants of nm / lbyl / prune)."""
  return mean_second(terms.beta2, np.abs(terms.gamma2), terms.clip2)[0]


# --------------------------------------------------------------------------------------------
# The stage (called by lbyl_jax.pipeline for the units whose compensation is 'depthwise').


def _input_vars(spec, variables, problems, cov: str) -> dict[str, np.ndarray | None]:
  if cov == 'identity':
    return {p.unit.name: None for p in problems}
  if cov != 'diag':
    raise ValueError(f"the input covariance model must be 'diag' or 'identity', got {cov!r}")
  if spec is None or spec.family == 'custom':
    raise ValueError("depthwise units: the 'diag' input covariance needs per-channel input moments"
                     " propagated through the network, which exist for the presets only; use"
                     " bnm_cov='identity' / moment_cov='identity' on a user's model")
  mom = moments_lib.propagate(spec, variables)
  return {p.unit.name: mom[p.unit.name].var for p in problems}


def deliver(spec, variables: Mapping[str, Any], problems: Sequence[UnitProblem], method: str,
            options: Mapping[str, Any] | None = None, *, bias_correction: str = 'off',
            guard: str = 'off', moment_cov: str = 'diag', bias_fold: str = 'padding_aware',
            sigma: str = 'std', skipped: list[dict[str, str]] | None = None
            ) -> list[UnitSolution]:
  """Delivery rows, guard and constants of every depthwise unit in ``problems``.

  Args:
    spec, variables: the architecture and its ORIGINAL variables.
    problems: units whose compensation is 'depthwise'.
    method: 'prune', 'nm', 'lbyl' or 'bnm'.
    options: the method's options here (``Method.depthwise_options``): nm ``t``, ``lam``; lbyl
      ``lambda1``, ``lambda2``, ``dtype``; bnm ``cov`` ('diag' | 'identity') and ``spatial``
      (:data:`SPATIAL_MODELS`).
    bias_correction: 'off' or 'on' ('auto' / 'blend' are refused: their error model is the ReLU
      units'). 'on': nm / lbyl / prune get k = E[c_P] - S_P E[c_K]; bnm fits centred moments and
      its intercept.
    guard: 'off' or 'moments' (rows scaled by :func:`guard_scales` on the BN-moments model, whose
      input covariance is bnm's ``cov`` for bnm and ``moment_cov`` otherwise).
    bias_fold: 'padding_aware' (constants fitted to the consumer's zero padding,
      :func:`lbyl_jax.pruning.bias.fold_constant`; nothing changes for a 1x1 consumer) or
      'all_taps'.
    sigma: BN sigma of the algebra ('std' or 'variance'), for BN1 (in the problems) and BN2.
    skipped: consumers that cannot absorb a constant are appended here (unit, consumer, reason).

  Raises:
    ValueError: an option whose algebra is not derived for these units, named.
  """
  options = dict(options or {})
  if method not in METHODS:
    raise ValueError(f'method {method!r} has no form for depthwise units; use one of {METHODS}')
  if bias_correction not in BIAS_MODES:
    raise ValueError(f'--bias-correction {bias_correction} is not derived for depthwise units'
                     f' ({", ".join(p.unit.name for p in problems[:3])}, ...): its error model'
                     " assumes ReLU units; use 'on' or 'off'")
  if guard not in ('off', 'moments'):
    raise ValueError(f"guard must be 'off' or 'moments', got {guard!r}")
  if bias_fold not in bias_lib.FOLDS:
    raise ValueError(f'bias_fold must be one of {bias_lib.FOLDS}, got {bias_fold!r}')
  skipped = [] if skipped is None else skipped
  spatial = options.get('spatial', 'calibrated')
  cov = options.get('cov', 'diag') if method == 'bnm' else moment_cov
  t0 = time.perf_counter()
  active = [p for p in problems if p.prune.size]
  terms = {p.unit.name: block_terms(spec, variables, p, sigma=sigma) for p in active}
  need_model = method == 'bnm' or guard == 'moments'
  if need_model:
    for p in active:
      _need_bn1(terms[p.unit.name], f"{p.unit.name}: {'bnm' if method == 'bnm' else '--guard'}")
  input_var = _input_vars(spec, variables, active, cov) if need_model and active else {}
  rows: list[tuple[np.ndarray, np.ndarray | None, dict[str, Any], dict | None]] = []
  lbyl_idx, systems = [], []
  for p in problems:
    base = dict(method=method, compensation='depthwise', bias_correction=bias_correction)
    if not p.prune.size:
      rows.append((np.zeros((0, p.m)), None, base, None))
      continue
    tm = terms[p.unit.name]
    model = None
    if need_model:
      model = unit_moments(tm, input_var=input_var[p.unit.name], spatial=spatial)
      base.update(omega=model['omega'], sx=cov, spatial=spatial,
                  z_var_log_rmse=model.get('log_rmse', float('nan')))
    const = None
    if method == 'prune':
      S = np.zeros((p.prune.size, p.m))
    elif method == 'nm':
      t, lam = float(options['t']), float(options['lam'])
      S, info = nm_rows(tm, p.keep, p.prune, t=t, lam=lam)
      base.update(info, t=t, lam=lam)
    elif method == 'lbyl':
      lam1, lam2 = float(options['lambda1']), float(options['lambda2'])
      S = None
      lbyl_idx.append(len(rows))
      systems.append(lbyl_system(tm, p.keep, p.prune, lam1=lam1, lam2=lam2, name=p.unit.name))
      base.update(lam1=lam1, lam2=lam2)
    else:  # bnm
      fit = bnm_fit(model['E'], model['M'], p.keep, p.prune, intercept=bias_correction == 'on')
      S, const = fit['S'], fit['const']
      base.update(fit='centred' if bias_correction == 'on' else 'uncentred', cond=fit['cond'],
                  eps=fit['eps'],
                  pred_rel_error=fit['res'] / fit['second'] if fit['second'] else 0.0)
    rows.append((S, const, base, model))
  if systems:
    for i, r in zip(lbyl_idx, solvers.solve(systems, dtype=options.get('dtype', 'float32'))):
      _, const, diag, model = rows[i]
      rows[i] = (r.S_P, const, dict(diag, **r.diag), model)
  share = (time.perf_counter() - t0) / max(len(problems), 1)
  cons_terms = {}
  if bias_correction == 'on' and bias_fold == 'padding_aware' and active:
    n_cons = max(len(p.unit.consumers) for p in active)
    for index in range(n_cons):
      sub = [p for p in active if len(p.unit.consumers) > index]
      for p, ct in zip(sub, bias_lib.consumer_terms(spec, variables, sub, index=index)):
        cons_terms[(p.unit.name, index)] = ct
  out = []
  for p, (S, const, diag, model) in zip(problems, rows):
    if p.prune.size and guard == 'moments':
      tg = guard_scales(S, model['M'], p.keep, p.prune)
      S = S * tg[:, None]
      diag.update(guard='moments', guard_t_mean=float(tg.mean()),
                  guard_zero_rows=int(np.sum(tg < 1e-6)))
    if p.prune.size and bias_correction == 'on' and (method != 'bnm' or guard == 'moments'):
      # k = E[c_P] - S_P E[c_K] for the final rows (after the guard, for bnm's centred fit too).
      E = model['E'] if model is not None else output_means(terms[p.unit.name])
      const = E[p.prune] - S @ E[p.keep]
    bias = None
    if const is not None:
      diag['bias_abs_mean'] = float(np.mean(np.abs(const)))
      folded = {}
      for index, con in enumerate(p.unit.consumers):
        if not bias_lib.absorbs(variables, con):
          skipped.append(dict(unit=p.unit.name, consumer=con.path,
                              reason='the consumer has neither a following BatchNorm nor a bias'))
          folded[con.path] = None
          continue
        ct = cons_terms.get((p.unit.name, index))
        folded[con.path] = const if ct is None else bias_lib.fold_constant(ct, p.prune, const)
      if len(p.unit.consumers) == 1:
        bias = folded[p.unit.consumers[0].path]
      elif any(v is not None for v in folded.values()):
        bias = folded
    diag.setdefault('solve_seconds', share)
    diag.setdefault('compile_seconds', 0.0)
    diag.update(coefficient_stats(np.asarray(S)))
    out.append(UnitSolution(np.ascontiguousarray(S, dtype=np.float64), bias, diag))
  return out
