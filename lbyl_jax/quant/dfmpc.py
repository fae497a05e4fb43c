"""DF-MPC: data-free mixed-precision compensation of low-bit layers by the next layer.

Chen, Bai, Huang, Wang, Tian and Liu, "Data-Free Quantization via Mixed-Precision Compensation
without Fine-Tuning", Pattern Recognition 2023 (arXiv 2307.00498). The paper's premise: the error
of a layer quantized to ultra-low precision can be restored by the following layer, kept at a
higher precision, through per-channel compensation coefficients obtained in closed form by
minimising the reconstruction error of the feature maps, without data or fine-tuning. We could not
consult the paper's equations here; this module states its own derivation of that closed form for
the project's units (producer l -> BN -> ReLU -> consumer l+1, :mod:`lbyl_jax.core.units`).

Per unit, with the producer's BN folded (``alpha_k``, ``b_k`` as in docs/lbyl.md), the
full-precision and the quantized pre-activations of output channel k are

  z_k = alpha_k W_k . x + b_k,        zhat_k = alpha_k What_k . x + b_k.

The consumer reads the feature map ``a_k = ReLU(z_k)``; it will get ``ahat_k = ReLU(zhat_k)``.
For ``c_k > 0``, ``c_k ReLU(zhat_k) = ReLU(c_k zhat_k)``, so a coefficient c_k folded into the
consumer's input channel k (``V'[:, k] = c_k V[:, k]``) rescales the deployed feature map. DF-MPC
picks it to reconstruct the full-precision feature map (``target='relu'``, the default):

  c_k = argmin_c E[(a_k - c ahat_k)^2] + lam_bar (c - 1)^2
      = (E[a_k ahat_k] + lam_bar) / (E[ahat_k^2] + lam_bar),                  (mode 'diag')

``lam_bar = lam mean_j E[ahat_j^2]`` (a ridge towards no compensation, relative to the layer's
mean feature energy, so it is scale-free and a dead channel, E[ahat_k^2] ~ 0, keeps c_k = 1); a
non-positive or non-finite c_k falls back to 1. ``target='preact'`` fits the pre-activations
instead, ``c_k = (E[z_k zhat_k] / E[zhat_k^2] + lam) / (1 + lam)`` (ridge relative to each
channel's own energy): the least-squares coefficient of the pre-activation is an attenuation
(``E[z^2] / (E[z^2] + E[e^2])`` for independent rounding noise e) that also shrinks the feature
map's mean, and it lost accuracy on the development split (branch h-quant, benchmarks/probes/quant_methods.py,
ResNet-20), whereas the feature-map fit carries the rectified mean.

The expectations are data-free, under the project's BN-moments input model
(:func:`lbyl_jax.pruning.moments.propagate`: independent input channels and positions, per-channel mean
``m`` and variance ``v``; a full covariance for BN-free MLP inputs). z and zhat are then jointly
Gaussian with

  E[z_k] = t_k = alpha_k W_k . m + b_k,   Cov(z_j, zhat_k) = F_j . Fhat_k,
  F_k = alpha_k (W_k * sqrt(v))

(the same with ``What`` for Fhat, that; ``sqrt(v)`` and ``m`` repeated over the kernel taps,
zero-padded borders ignored as in DFQ), so ``E[a_j ahat_k]`` and ``E[ahat_j ahat_k]`` are the
bivariate rectified-Gaussian moments of :mod:`lbyl_jax.pruning.moments` (``relu_cross_moment``,
``second_moment_matrices``), and for 'preact' ``E[z_j zhat_k] = F_j . Fhat_k + t_j that_k``.

Mode 'full' lets every quantized channel help every original one, a ridge least squares of the
same kind as LBYL's delivery (docs/lbyl.md#consistent-closed-form):

  S = argmin_S E||a - S ahat||^2 + lam_bar ||S - I||_F^2,
  S^T = (E[ahat ahat^T] + lam_bar I)^{-1} (E[ahat a^T] + lam_bar I),
  lam_bar = lam tr(E[ahat ahat^T]) / m,

solved by :class:`lbyl_jax.pruning.solvers.SharedSystem`: with ``G = E[ahat ahat^T] = L L^T`` (symmetric
square root) and ``C = E[ahat a^T]``, ``F = [L, sqrt(lam_bar) I]`` and ``FP = [(L^+ C)^T,
sqrt(lam_bar) I]`` give ``A = G + lam_bar I`` and ``R = C + lam_bar I`` (C lies in the range of G,
the joint second-moment matrix being PSD); for 'preact' ``F = [Fhat, sqrt(lam_bar) I]``,
``FP = [F, sqrt(lam_bar) I]``, ``b = that``, ``bP = t``, ``lam1 = 1``. S is folded as ``V' = V S``
over the consumer's input channels; it crosses the ReLU with a linear map (as LBYL's delivery
does), exact only where S is diagonal and positive.

Mixed precision (the paper's setting): unit producers at ``bits`` (e.g. 2), every other layer at
``high_bits`` (e.g. 8; default ``bits``); ``keep_8bit`` layers at 8. Units run input -> output in
waves (a unit whose producer is another unit's consumer waits for it), so a producer is quantized
after its own inputs were compensated, and each consumer is quantized only after it absorbed the
compensation. The producers are quantized by ``base`` ('rtn', 'omse' or 'squant'); every layer's
stored integers come from the same quantizer, so the compensation is computed against exactly the
deployed producer.

Beyond the presets' plain units (docs/quantization.md, "DF-MPC beyond plain units"):
ReLU6 feature maps use the clipped-Gaussian moments (:func:`clipped_moments`,
:func:`relu6_cross_moment`); a unit whose activation feeds a depthwise conv (MobileNetV2's
expansion units) folds ``c_k`` into that conv's channel k (:func:`fold`; per-channel form only);
with uniform bits the depthwise convs are compensated in turn by the projection convs
(:func:`depthwise_units`); user models get their producer inputs' moments from the traced units
(:func:`traced_input_moments`), and a unit whose input cannot be modelled is left uncompensated
and reported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from lbyl_jax.core import trees
from lbyl_jax.core import units as units_lib
from lbyl_jax.core.bn import BN_EPS
from lbyl_jax.core.options import NONNEG, option
from lbyl_jax.pruning import depthwise as depthwise_lib
from lbyl_jax.pruning import moments as moments_lib
from lbyl_jax.pruning import solvers
from lbyl_jax.pruning import terms
from lbyl_jax.quant import omse as omse_lib
from lbyl_jax.quant import squant as squant_lib
from lbyl_jax.quant import uniform as quant
from lbyl_jax.quant.base import QuantResult, Quantizer, register

MODES = ('diag', 'full')
TARGETS = ('relu', 'preact')
BASES = ('rtn', 'omse', 'squant')
DEFAULT_TARGET = 'relu'
# Chosen on the development split (CIFAR-10 test images 0-4999, the three CIFAR ResNets, W4A32:
# highest mean top-1 among the candidates of branch h-quant commit 88a9803,
# benchmarks/probes/quant_methods.py --phase dev). For
# mixed precision (3-bit producers, 8-bit rest) the same selection chose mode='full', lam=10.
DEFAULT_MODE = 'diag'
DEFAULT_LAM = 1.0
DEFAULT_BASE = 'rtn'
MIXED_MODE, MIXED_LAM = 'full', 10.0
# With uniform bits on an unpruned network, the depthwise convs of MobileNetV2's expansion units
# are compensated too (in the projection conv); with mixed precision they are the expansion convs'
# high-precision compensators and are left alone; on a pruned network (LBYL 30 %) compensating them
# lost accuracy on the development split, so they are left alone there too. Chosen on the
# development split (docs/quantization.md#df-mpc, benchmarks/dfmpc_mobilenet.py).
DEPTHWISE_UNIFORM = True
DEPTHWISE_PRUNED = False
# With uniform bits, an unpruned network and no --dfmpc-lam, the ridge of the units on a depthwise
# path (MobileNetV2's expansion units and its depthwise convs); the presets' plain units, and every
# unit of a pruned network, keep DEFAULT_LAM. Chosen on
# the development split among 0, 0.1, 0.3, 1 (highest mean top-1 over W4 and W6, unpruned;
# docs/quantization.md#df-mpc,
# benchmarks/dfmpc_mobilenet.py).
DEPTHWISE_LAM = 0.0


ACTIVATIONS = ('relu', 'relu6', 'identity')
RELU6_TOP = 6.0


def clipped_moments(mean, var, hi: float = RELU6_TOP) -> tuple[np.ndarray, np.ndarray]:
  """E[a] and E[a^2] of ``a = clip(y, 0, hi)`` (ReLU6 for hi = 6), y ~ N(mean, var), float64.

  The closed form of :func:`lbyl_jax.pruning.depthwise.clipped_moments` (``clip(y, 0, hi) =
  ReLU(y) - ReLU(y - hi)``: ``E[a] = E[ReLU(y)] - E[ReLU(y - hi)]``, ``E[a^2] = E[ReLU(y)^2] -
  E[ReLU(y - hi)^2] - 2 hi E[ReLU(y - hi)]``); var = 0 gives clip(mean, 0, hi) and its square.
  Checked against scipy quadrature and Monte Carlo in tests/test_dfmpc_through.py.
  """
  m, v = np.broadcast_arrays(np.asarray(mean, np.float64), np.asarray(var, np.float64))
  e1, e2 = depthwise_lib.mean_second(m.reshape(-1), np.sqrt(np.maximum(v, 0.0)).reshape(-1),
                                     float(hi))
  return np.asarray(e1).reshape(m.shape), np.asarray(e2).reshape(m.shape)


def relu6_cross_moment(m1, s1, m2, s2, rho, hi: float = RELU6_TOP) -> np.ndarray:
  """E[clip(y1, 0, hi) clip(y2, 0, hi)] for a bivariate normal (means m, stds s, correlation
  rho), float64 NumPy, elementwise over 1-d arrays: ``clip(y, 0, hi) = ReLU(y) - ReLU(y - hi)``
  expands it into four bivariate ReLU cross moments with shifted means,

    E[.] = C(m1, m2) - C(m1, m2 - hi) - C(m1 - hi, m2) + C(m1 - hi, m2 - hi),

  (:func:`lbyl_jax.pruning.depthwise.clipped_cross_moment`, C the closed form of
  :func:`lbyl_jax.pruning.moments.relu_cross_moment`).
  """
  args = [np.asarray(a, np.float64).reshape(-1) for a in (m1, s1, m2, s2, rho)]
  return np.asarray(depthwise_lib.cross(*args, clip=float(hi)), np.float64).reshape(-1)


def activation_mean_var(activation: str, mean, var) -> tuple[np.ndarray, np.ndarray]:
  """Mean and variance of ``act(y)``, y ~ N(mean, var), for the activations DF-MPC models."""
  if activation == 'relu':
    return moments_lib.relu_mean_var(mean, var)
  if activation == 'relu6':
    e1, e2 = clipped_moments(mean, var)
    return e1, np.maximum(e2 - e1 * e1, 0.0)
  if activation == 'identity':
    return np.asarray(mean, np.float64), np.asarray(var, np.float64)
  raise ValueError(f'dfmpc: activation must be one of {", ".join(ACTIVATIONS)}, got '
                   f'{activation!r}')


def _quantizer(base: str) -> Callable[..., quant.QTensor]:
  if base == 'rtn':
    return lambda w, *, bits, per_channel, symmetric, path=None: quant.quantize(
        w, bits=bits, per_channel=per_channel, symmetric=symmetric)
  if base == 'omse':
    return omse_lib.quantize
  if base == 'squant':
    return squant_lib.quantize
  raise ValueError(f'dfmpc: unknown base quantizer {base!r}; known: {", ".join(BASES)}')


# --------------------------------------------------------------------------------------------
# Per-unit algebra.


def unit_affine(variables: Mapping[str, Any], unit: units_lib.Unit, eps: float = BN_EPS
                ) -> tuple[np.ndarray, np.ndarray]:
  """``(alpha, b)`` with ``z = alpha (W . x) + b``: the folded BN and the producer bias (a bias in
  front of a BN is folded into b; without BN alpha = 1 and b = the bias, or 0)."""
  bn = terms.bn_affine(variables, unit, eps=eps)
  bias = terms.producer_bias(variables, unit)
  alpha, b = np.asarray(bn['alpha'], np.float64), np.asarray(bn['b'], np.float64)
  if bias is not None:
    b = b + alpha * np.asarray(bias, np.float64)
  return alpha, b


def moment_rows(kernel, alpha, b, mom: moments_lib.InputMoments) -> tuple[np.ndarray, np.ndarray]:
  """``(F, t)``: F (m, D) with ``E[z z'^T] - t t'^T = F F'^T`` and ``t = E[z]`` (module docstring)
  for a HWIO conv or (in, out) dense kernel reading inputs with moments ``mom``."""
  k = np.asarray(kernel, np.float64)
  m = k.shape[-1]
  cin = k.shape[-2]
  if mom.mean.shape[0] != cin:
    raise ValueError(f'dfmpc: the kernel reads {cin} input channels but the moment model has '
                     f'{mom.mean.shape[0]}')
  rows = np.moveaxis(k, -1, 0).reshape(m, -1, cin)  # (m, taps, cin)
  alpha = np.asarray(alpha, np.float64)
  t = (alpha * np.einsum('mtc,c->m', rows, np.asarray(mom.mean, np.float64))
       + np.asarray(b, np.float64))
  if mom.cov is not None and rows.shape[1] == 1:
    w, Q = np.linalg.eigh(np.asarray(mom.cov, np.float64))
    L = Q * np.sqrt(np.maximum(w, 0.0))
    F = alpha[:, None] * (rows[:, 0, :] @ L)
  else:
    sd = np.sqrt(np.maximum(np.asarray(mom.var, np.float64), 0.0))
    F = alpha[:, None] * (rows * sd).reshape(m, -1)
  return F, t


def _check_target(target: str) -> None:
  if target not in TARGETS:
    raise ValueError(f'dfmpc: target must be one of {", ".join(TARGETS)}, got {target!r}')


def _stds(F) -> np.ndarray:
  return np.sqrt(np.einsum('md,md->m', F, F))


def _rho(F, Fh, s, sh) -> np.ndarray:
  """Correlations F_j . Fhat_k / (s_j sh_k) (0 where a std is 0), shape (m, m)."""
  den = np.outer(s, sh)
  return np.clip(np.where(den > 0, (F @ Fh.T) / np.where(den > 0, den, 1.0), 0.0), -1.0, 1.0)


def _pair(t, s, th, sh, rho, activation: str) -> np.ndarray:
  """E[act(z) act(zhat)] elementwise for (z, zhat) bivariate normal (means t, th, stds s, sh,
  correlation rho): the ReLU closed form of :mod:`lbyl_jax.pruning.moments`, and for ReLU6 its
  four-term expansion ``clip(z, 0, 6) = ReLU(z) - ReLU(z - 6)`` (:func:`relu6_cross_moment`)."""
  if activation == 'relu':
    return moments_lib._cross_flat(t, s, th, sh, rho)  # pylint: disable=protected-access
  return relu6_cross_moment(t, s, th, sh, rho)


def _check_activation(activation: str) -> None:
  if activation not in ACTIVATIONS:
    raise ValueError(f'dfmpc: activation must be one of {", ".join(ACTIVATIONS)}, got '
                     f'{activation!r}')


def diag_moments(F, Fh, t, th, target: str = DEFAULT_TARGET, activation: str = 'relu'
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per channel ``(E[a_k ahat_k], E[ahat_k^2], E[a_k^2])`` of the target (feature maps
  ``a = act(z)`` for 'relu', ``z`` itself for 'preact'), float64. ``activation``: 'relu' (the
  presets' units), 'relu6' (``clip(z, 0, 6)``) or 'identity' (then the feature map is z)."""
  _check_target(target)
  _check_activation(activation)
  F, Fh = np.asarray(F, np.float64), np.asarray(Fh, np.float64)
  t, th = np.asarray(t, np.float64), np.asarray(th, np.float64)
  if target == 'preact' or activation == 'identity':
    return (np.einsum('md,md->m', F, Fh) + t * th, np.einsum('md,md->m', Fh, Fh) + th * th,
            np.einsum('md,md->m', F, F) + t * t)
  s, sh = _stds(F), _stds(Fh)
  den = s * sh
  rho = np.clip(np.where(den > 0, np.einsum('md,md->m', F, Fh) / np.where(den > 0, den, 1.0), 0.0),
                -1.0, 1.0)
  eah = _pair(t, s, th, sh, rho, activation)
  if activation == 'relu6':
    return eah, clipped_moments(th, sh ** 2)[1], clipped_moments(t, s ** 2)[1]
  _, ehh = moments_lib.rectified_moments(th, sh ** 2)
  _, eaa = moments_lib.rectified_moments(t, s ** 2)
  return eah, ehh, eaa


def full_moments(F, Fh, t, th, target: str = DEFAULT_TARGET, activation: str = 'relu'
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(E[a ahat^T], E[ahat ahat^T], diag E[a a^T])`` of the target, (m, m), (m, m), (m,)."""
  _check_target(target)
  _check_activation(activation)
  F, Fh = np.asarray(F, np.float64), np.asarray(Fh, np.float64)
  t, th = np.asarray(t, np.float64), np.asarray(th, np.float64)
  if target == 'preact' or activation == 'identity':
    return (F @ Fh.T + np.outer(t, th), Fh @ Fh.T + np.outer(th, th),
            np.einsum('md,md->m', F, F) + t * t)
  m = t.shape[0]
  s, sh = _stds(F), _stds(Fh)
  j, k = np.meshgrid(np.arange(m), np.arange(m), indexing='ij')
  jr, kr = j.ravel(), k.ravel()
  eah = _pair(t[jr], s[jr], th[kr], sh[kr], _rho(F, Fh, s, sh).ravel(), activation)
  if activation == 'relu6':
    ehh = _pair(th[jr], sh[jr], th[kr], sh[kr], _rho(Fh, Fh, sh, sh).ravel(),
                activation).reshape(m, m)
    ehh = 0.5 * (ehh + ehh.T)
    np.fill_diagonal(ehh, clipped_moments(th, sh ** 2)[1])
    return eah.reshape(m, m), ehh, clipped_moments(t, s ** 2)[1]
  ((_, ehh),) = moments_lib.second_moment_matrices([(th, Fh @ Fh.T)])
  _, eaa = moments_lib.rectified_moments(t, s ** 2)
  return eah.reshape(m, m), ehh, eaa


def diag_coefficients(F, Fh, t, th, lam: float = DEFAULT_LAM,
                      target: str = DEFAULT_TARGET, activation: str = 'relu') -> np.ndarray:
  """Mode 'diag' (module docstring); 1 where undefined or not positive (the ReLU fold needs
  c > 0)."""
  eah, ehh, _ = diag_moments(F, Fh, t, th, target, activation)
  with np.errstate(divide='ignore', invalid='ignore'):
    if target == 'preact':
      c = (eah / ehh + lam) / (1.0 + lam)
      ok = ehh > 0
    else:
      lam_bar = lam * float(np.mean(ehh))
      c = (eah + lam_bar) / (ehh + lam_bar)
      ok = ehh + lam_bar > 1e-12 * max(float(np.max(ehh)), 1e-300)
  return np.where(np.isfinite(c) & (c > 0) & ok, c, 1.0)


def full_system(F, Fh, t, th, lam: float = DEFAULT_LAM, name: str = '',
                target: str = DEFAULT_TARGET, activation: str = 'relu') -> solvers.SharedSystem:
  """Mode 'full' as a :class:`lbyl_jax.pruning.solvers.SharedSystem` whose ``S_P`` is S (row j: channel
  j's coefficients on the quantized channels)."""
  _check_target(target)
  _check_activation(activation)
  m = np.shape(Fh)[0]
  eye = np.eye(m)
  if target == 'preact' or activation == 'identity':
    gram_trace = float(np.einsum('md,md->', Fh, Fh) + np.dot(th, th))
    r = np.sqrt(lam * gram_trace / m) * eye
    return solvers.SharedSystem(np.concatenate([Fh, r], 1), np.concatenate([F, r], 1),
                                np.asarray(th, np.float64), np.asarray(t, np.float64), 1.0, 0.0,
                                name)
  eah, ehh, _ = full_moments(F, Fh, t, th, target, activation)
  w, Q = np.linalg.eigh(0.5 * (ehh + ehh.T))
  w = np.maximum(w, 0.0)
  L = Q * np.sqrt(w)
  cut = m * np.finfo(np.float64).eps * max(float(w.max()), 1e-300)
  inv = np.where(w > cut, 1.0 / np.sqrt(np.where(w > cut, w, 1.0)), 0.0)
  FPt = (Q * inv).T @ eah.T  # L^+ C with C = E[ahat a^T] = eah^T
  r = np.sqrt(lam * float(np.trace(ehh)) / m) * eye
  zeros = np.zeros(m)
  return solvers.SharedSystem(np.concatenate([L, r], 1), np.concatenate([FPt.T, r], 1), zeros,
                              zeros, 0.0, 0.0, name)


def reconstruction_error(F, Fh, t, th, S, target: str = DEFAULT_TARGET,
                         activation: str = 'relu') -> tuple[float, float]:
  """Modelled ``E||a - ahat||^2 / E||a||^2`` (no compensation) and ``E||a - S ahat||^2 /
  E||a||^2`` (S an m x m matrix, or a vector for a diagonal), ``a`` the target."""
  if np.ndim(S) == 1:
    eah, ehh, eaa = diag_moments(F, Fh, t, th, target, activation)
    c = np.asarray(S, np.float64)
    err = lambda d: float(np.sum(eaa - 2.0 * d * eah + d * d * ehh))  # noqa: E731
    one = np.ones_like(c)
  else:
    eah, ehh, eaa = full_moments(F, Fh, t, th, target, activation)
    c = np.asarray(S, np.float64)
    err = lambda M: float(np.sum(eaa) - 2.0 * np.trace(M @ eah.T)  # noqa: E731
                          + np.trace(M @ ehh @ M.T))
    one = np.eye(c.shape[0])
  tot = float(np.sum(eaa))
  if tot <= 0:
    return 0.0, 0.0
  return err(one) / tot, err(c) / tot


def mix_consumer(kernel, S, unit: units_lib.Unit) -> np.ndarray:
  """``V'[..., k, :] = sum_j S[j, k] V[..., j, :]`` over the consumer's input channels (a dense
  consumer after an NCHW flatten mixes whole channel blocks). Float64."""
  V = np.asarray(kernel, np.float64)
  S = np.diag(S) if np.ndim(S) == 1 else np.asarray(S, np.float64)
  if unit.consumer_kind == 'conv':
    return np.einsum('jk,hwjo->hwko', S, V)
  n = V.shape[0] // unit.flatten
  V3 = V.reshape(n, unit.flatten, V.shape[1])
  return np.einsum('jk,jro->kro', S, V3).reshape(V.shape)


# --------------------------------------------------------------------------------------------
# Units beyond the presets' plain ones: per-channel layers in between, user models.


def depthwise_moment_rows(kernel, alpha, b, mom: moments_lib.InputMoments
                          ) -> tuple[np.ndarray, np.ndarray]:
  """:func:`moment_rows` of a depthwise conv (HWIO kernel ``(kh, kw, 1, m)``; output channel k
  reads input channel k only): ``t_k = alpha_k sum_taps D_k m_k + b_k`` and F row k =
  ``alpha_k D_k sqrt(v_k)`` over the taps, in a compact (m, taps) layout. Independent input
  channels make ``F_j . Fhat_k = 0`` for j != k, which this layout does not show: use it for the
  per-channel ('diag') moments only."""
  k = np.asarray(kernel, np.float64)
  m = k.shape[-1]
  if k.shape[-2] != 1 or mom.mean.shape[0] != m:
    raise ValueError(f'dfmpc: a depthwise kernel of shape {k.shape} cannot read '
                     f'{mom.mean.shape[0]} channels')
  rows = np.moveaxis(k, -1, 0).reshape(m, -1)
  alpha = np.asarray(alpha, np.float64)
  t = alpha * rows.sum(1) * np.asarray(mom.mean, np.float64) + np.asarray(b, np.float64)
  F = alpha[:, None] * rows * np.sqrt(np.maximum(np.asarray(mom.var, np.float64), 0.0))[:, None]
  return F, t


def unit_problem(u: units_lib.Unit) -> str | None:
  """Why DF-MPC cannot compensate unit ``u`` (None: it can).

  It needs an activation it models (ReLU, ReLU6, none) and, when per-channel layers sit between
  the activation and the consumer, one consumer path whose first such layer is a depthwise conv
  (the coefficient folds into that conv's channel; a per-channel BN there would need its running
  statistics rescaled, not done)."""
  if u.activation not in ACTIVATIONS:
    return f'activation {u.activation!r} (DF-MPC models {", ".join(ACTIVATIONS)})'
  if u.through:
    if len(u.consumers) != 1 or u.through[0].kind != 'depthwise':
      return ('per-channel layers between the activation and the consumers other than one path '
              'starting with a depthwise conv')
  return None


def depthwise_units(units: Iterable[units_lib.Unit]) -> tuple[units_lib.Unit, ...]:
  """For every unit whose path is activation -> depthwise conv [-> BN] -> activation ->
  consumer (MobileNetV2's expansion units), the depthwise conv as a unit of its own: producer the
  depthwise conv, its BN, the activation after it, the unit's consumer (the projection conv)."""
  out = []
  for u in units:
    th = u.through
    if (not th or len(u.consumers) != 1 or th[0].kind != 'depthwise' or th[0].offset
        or u.through_activation not in ('relu', 'relu6')):
      continue
    if len(th) > 2 or (len(th) == 2 and (th[1].kind != 'bn' or th[1].offset)):
      continue
    bn = th[1].path if len(th) == 2 else None
    con = dataclasses.replace(u.consumers[0], through=())
    out.append(units_lib.Unit(th[0].path, th[0].path, bn, u.through_activation, (con,), u.width))
  return tuple(out)


def _bn_gaussian(variables, path: str) -> tuple[np.ndarray, np.ndarray]:
  """(beta, gamma^2) of the BatchNorm at ``path``: its output model N(beta, gamma^2) per channel
  (a BN without scale / bias has gamma = 1 / beta = 0)."""
  p = (trees.get_path(variables['params'], path)
       if trees.has_path(variables['params'], path) else {})
  mu = np.asarray(trees.get_path(variables['batch_stats'], path)['mean'], np.float64)
  gamma = np.asarray(p['scale'], np.float64) if 'scale' in p else np.ones_like(mu)
  beta = np.asarray(p['bias'], np.float64) if 'bias' in p else np.zeros_like(mu)
  return beta, gamma ** 2


def _depthwise_bn(con: units_lib.Consumer, U: units_lib.Unit) -> bool:
  """Whether ``con`` reads ``U`` through exactly a depthwise conv and a BN (then an activation
  DF-MPC models), from channel 0."""
  th = con.through
  return (len(th) == 2 and th[0].kind == 'depthwise' and th[1].kind == 'bn'
          and not th[0].offset and not th[1].offset and U.through_activation in ACTIVATIONS)


def traced_input_moments(spec, variables: Mapping[str, Any], *, input_mean: float = 0.0,
                         input_var: float = 1.0
                         ) -> tuple[dict[str, moments_lib.InputMoments], dict[str, str]]:
  """Data-free moments of every unit producer's input for any traced model (user models).

  The BN-moment model of :func:`lbyl_jax.pruning.moments.propagate`, driven by the discovered
  units instead of a family's layout: the first conv / dense layer (call order) reads the
  normalized image (per channel mean ``input_mean``, variance ``input_var``); any other producer's
  input channels must each be read (as a consumer, at its offset / flatten rows, with no
  per-channel layer in between) from exactly one unit or policy-excluded unit ``U``, whose
  channels are ``act_U(N(beta, gamma^2))`` with ``U``'s BN, or, without BN, ``act_U(z)`` with z's
  mean and variance propagated from ``U``'s own input moments (independent inputs); through a
  depthwise conv and a BN (an inverted residual), the channels are that BN's ``act(N(beta,
  gamma^2))``. A pooling between ``U``'s activation and the producer is ignored (the mean of an
  average pool is exact; its variance and a max pool's moments are approximated by the unpooled
  ones). Anything else (a residual sum, a layer that is no unit, a scaled path) leaves the
  producer's input unknown.

  Returns:
    ``(moments, unknown)``: unit name -> InputMoments, and unit name -> why its input is unknown.
  """
  d = spec.discovery
  params = variables['params']
  sources = list(d.units) + [e.unit for e in d.excluded]
  linear = [layer.path for layer in d.layers if layer.kind in ('conv', 'dense')]
  first = linear[0] if linear else None
  outs: dict[str, Any] = {}
  ins: dict[str, Any] = {}

  def out_moments(U):
    if U.name not in outs:
      outs[U.name] = f'a cycle through {U.name}'
      if U.activation not in ACTIVATIONS:
        outs[U.name] = f'{U.name} has activation {U.activation!r}'
        return outs[U.name]
      if U.bn is not None:
        mean, var = _bn_gaussian(variables, U.bn)
      else:
        mom = in_moments(U)
        if isinstance(mom, str):
          outs[U.name] = mom
          return mom
        layer = trees.get_path(params, U.producer)
        kernel = np.asarray(layer['kernel'], np.float64)
        bias = (np.asarray(layer['bias'], np.float64) if 'bias' in layer
                else np.zeros(kernel.shape[-1]))
        F, mean = moment_rows(kernel, np.ones(kernel.shape[-1]), bias, mom)
        var = np.einsum('md,md->m', F, F)
      outs[U.name] = activation_mean_var(U.activation, mean, var)
    return outs[U.name]

  def in_moments(P):
    if P.name in ins:
      return ins[P.name]
    ins[P.name] = f'a cycle through {P.name}'
    cin = int(np.shape(trees.get_path(params, P.producer)['kernel'])[-2])
    if P.producer == first:
      ins[P.name] = moments_lib.InputMoments(np.full(cin, float(input_mean)),
                                             np.full(cin, float(input_var)))
      return ins[P.name]
    mean, var = np.zeros(cin), np.zeros(cin)
    hits = np.zeros(cin, np.int64)
    for U in sources:
      for con in U.consumers:
        if con.path != P.producer:
          continue
        if con.scale != 1.0 or (con.through and not _depthwise_bn(con, U)):
          ins[P.name] = (f'{U.name} reaches it through per-channel layers or a scaled path')
          return ins[P.name]
        if con.through:  # depthwise conv -> BN -> activation: that BN's model
          o = activation_mean_var(U.through_activation,
                                  *_bn_gaussian(variables, con.through[1].path))
        else:
          o = out_moments(U)
        if isinstance(o, str):
          ins[P.name] = o
          return o
        try:
          idx = consumer_indices(con, U, units_lib.width_of(variables, U), cin)
        except ValueError as e:
          ins[P.name] = str(e)
          return ins[P.name]
        if idx.size and int(idx.max()) >= cin:
          ins[P.name] = f'the channels of {U.name} do not fit its {cin} inputs'
          return ins[P.name]
        shape = (-1,) + (1,) * (idx.ndim - 1)
        mean[idx] = np.broadcast_to(o[0].reshape(shape), idx.shape)
        var[idx] = np.broadcast_to(o[1].reshape(shape), idx.shape)
        np.add.at(hits, idx, 1)
    if not np.all(hits == 1):
      ins[P.name] = ('its input is not only the output of units DF-MPC can model (e.g. a '
                     'residual sum or a layer that is no prunable unit)')
      return ins[P.name]
    ins[P.name] = moments_lib.InputMoments(mean, var)
    return ins[P.name]

  moments, unknown = {}, {}
  for u in spec.units:
    r = in_moments(u)
    if isinstance(r, str):
      unknown[u.name] = r
    else:
      moments[u.name] = r
  return moments, unknown


def input_moments(spec, variables: Mapping[str, Any], units: Iterable[units_lib.Unit] = ()
                  ) -> tuple[dict[str, moments_lib.InputMoments], dict[str, str]]:
  """The producer inputs' moments DF-MPC uses, and the units whose input is unknown.

  Preset families: :func:`lbyl_jax.pruning.moments.propagate` (as before); other models:
  :func:`traced_input_moments`. Depthwise units among ``units`` (:func:`depthwise_units`) read
  the activation of their expansion unit's BN, ``act(N(beta, gamma^2))`` (after the expansion
  unit's compensation its deployed feature map is fitted to that one).
  """
  if spec.family in moments_lib.NETWORK_MODEL_FAMILIES:
    moments, unknown = dict(moments_lib.propagate(spec, variables)), {}
  else:
    moments, unknown = traced_input_moments(spec, variables)
  by_through = {u.through[0].path: u for u in spec.units if u.through}
  for d in units:
    if d.name in moments or d.producer not in by_through:
      continue
    u = by_through[d.producer]
    moments[d.name] = moments_lib.InputMoments(
        *activation_mean_var(u.activation, *_bn_gaussian(variables, u.bn)))
  return moments, unknown


def consumer_indices(con: units_lib.Consumer, u: units_lib.Unit, m: int, rows: int
                     ) -> np.ndarray:
  """The consumer's input indices (conv: (m,), dense: (m, flatten)) of the m current channels of
  unit ``u`` (m < ``u.width`` after pruning), the consumer having ``rows`` inputs now.

  Unpruned, :meth:`Consumer.indices`. Pruned, the discovered offsets / NHWC row strides refer to
  the original widths; they are re-derived when the unit alone feeds the consumer (offset 0 and
  ``rows == m * flatten``), else the layout is refused."""
  if m == u.width:
    return con.indices(np.arange(m))
  if con.offset == 0 and rows == m * con.flatten:
    if con.kind == 'conv' or con.flatten_order == 'nchw':
      return dataclasses.replace(con, row_stride=0).indices(np.arange(m))
    return dataclasses.replace(con, row_stride=m).indices(np.arange(m))
  raise ValueError(f'dfmpc: {u.name}: the pruned channel layout of its consumer {con.path} '
                   '(concatenated with other channels) is not modelled; quantize with '
                   '--quant-method rtn, omse or squant')


def _written(u: units_lib.Unit) -> tuple[str, ...]:
  """The layer(s) a unit's compensation changes."""
  return (u.through[0].path,) if u.through else tuple(c.path for c in u.consumers)


def fold(params: Mapping[str, Any], u: units_lib.Unit, S) -> None:
  """Folds coefficients S (a vector, or an m x m matrix) into what reads unit ``u``, in place:
  the depthwise conv's output channels for a unit with a depthwise through layer (S must be a
  vector: ``D'[..., k] = c_k D[..., k]``, the conv is linear in each channel), else every
  consumer's input channels (:func:`mix_consumer`; at its offset / flatten rows)."""
  if u.through:
    if np.ndim(S) != 1:
      raise ValueError(f'dfmpc: {u.name}: only per-channel coefficients fold into the depthwise '
                       f'conv {u.through[0].path}')
    t = u.through[0]
    layer = dict(trees.get_path(params, t.path))
    K = np.asarray(layer['kernel'])
    k64 = np.asarray(K, np.float64).copy()
    c = np.asarray(S, np.float64)
    k64[..., t.offset:t.offset + c.shape[0]] *= c
    layer['kernel'] = k64.astype(K.dtype)
    trees.set_path(params, t.path, layer)
    return
  for con in u.consumers:
    cons = dict(trees.get_path(params, con.path))
    V = np.asarray(cons['kernel'])
    if len(u.consumers) == 1 and con.offset == 0 and con.flatten_order == 'nchw':
      cons['kernel'] = mix_consumer(V, S, u).astype(V.dtype)  # the presets' path
    else:
      M = np.diag(S) if np.ndim(S) == 1 else np.asarray(S, np.float64)
      V64 = np.asarray(V, np.float64).copy()
      rows = V.shape[-2] if con.kind == 'conv' else V.shape[0]
      idx = consumer_indices(con, u, M.shape[0], rows)
      if con.kind == 'conv':
        V64[..., idx, :] = np.einsum('jk,hwjo->hwko', M, V64[..., idx, :])
      else:
        V64[idx] = np.einsum('jk,jro->kro', M, V64[idx])
      cons['kernel'] = V64.astype(V.dtype)
    trees.set_path(params, con.path, cons)


# --------------------------------------------------------------------------------------------
# Whole network.


def _waves(units: tuple[units_lib.Unit, ...]) -> list[list[int]]:
  """Unit indices grouped so that a unit comes after the unit whose compensation changes its
  producer (its consumer, or its depthwise through layer)."""
  level: dict[int, int] = {}
  by_written = {p: i for i, u in enumerate(units) for p in _written(u)}
  for i, u in enumerate(units):
    j = by_written.get(u.producer)
    level[i] = 0 if j is None or j >= i else level[j] + 1
  out: dict[int, list[int]] = {}
  for i, lv in level.items():
    out.setdefault(lv, []).append(i)
  return [out[k] for k in sorted(out)]


def compensate(spec, variables: Mapping[str, Any],
               deployed: Callable[[str, np.ndarray], np.ndarray], *, mode: str = DEFAULT_MODE,
               lam: float = DEFAULT_LAM, target: str = DEFAULT_TARGET,
               moments: Mapping[str, moments_lib.InputMoments] | None = None,
               units: Iterable[units_lib.Unit] | None = None, dtype: str = 'float64',
               replace_producers: bool = True, depthwise: bool = False,
               lam_depthwise: float | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """Folds DF-MPC's compensation of every unit's deployed producer into its consumer.

  Args:
    spec: the architecture (``spec.units`` are the producer / consumer pairs).
    variables: float variables (original or pruned; widths are read from the arrays).
    deployed: ``deployed(producer_path, kernel) -> kernel`` as it will run (e.g. the dequantized
      low-bit kernel); called with the producer's kernel after its own inputs were compensated.
    mode: 'diag' or 'full'; lam: the relative ridge weight (>= 0); target: 'relu' (feature maps,
      default) or 'preact'. Units with a depthwise through layer, and depthwise units, always
      use 'diag' (a depthwise conv cannot mix channels); their report says ``form='diag'``.
    moments: per unit, the producer input's moments (default :func:`input_moments`: the
      presets' :func:`lbyl_jax.pruning.moments.propagate`, :func:`traced_input_moments` for
      other models; units whose input is unknown are left uncompensated and reported).
    units: a subset of ``spec.units`` (default: all).
    dtype: solver dtype for 'full'.
    replace_producers: put the deployed producer kernels into the returned variables (default);
      False keeps the float kernels (to be quantized later by the same deterministic quantizer).
    depthwise: also compensate every depthwise through layer, as a producer of its own, in the
      unit's consumer (:func:`depthwise_units`), after its expansion unit.
    lam_depthwise: the ridge of the units on a depthwise path (those with a depthwise through
      layer and the depthwise units); None: ``lam``.

  Returns:
    ``(variables, report)``: float32 variables with the consumers compensated (and the producers'
    kernels replaced by their deployed kernels unless ``replace_producers=False``); per unit the
    coefficient statistics and the modelled relative reconstruction error of the target before /
    after (or ``skipped``: why it was left uncompensated).
  """
  if mode not in MODES:
    raise ValueError(f'dfmpc: mode must be one of {", ".join(MODES)}, got {mode!r}')
  for v in (lam, lam if lam_depthwise is None else lam_depthwise):
    if not (np.isfinite(v) and v >= 0):
      raise ValueError(f'dfmpc: lam must be a finite number >= 0, got {v!r}')
  _check_target(target)
  units = tuple(spec.units if units is None else units)
  bad = {u.name: r for u in units if (r := unit_problem(u)) is not None}
  if bad:
    raise ValueError('dfmpc cannot compensate ' + '; '.join(f'{k}: {v}' for k, v in bad.items()))
  dw_units = depthwise_units(units) if depthwise else ()
  dw_names = {d.name for d in dw_units}
  units = units + dw_units
  unknown: dict[str, str] = {}
  if moments is None:
    moments, unknown = input_moments(spec, variables, dw_units)
  elif dw_units:
    extra, _ = input_moments(spec, variables, dw_units)
    moments = {**{d.name: extra[d.name] for d in dw_units}, **moments}
  work = trees.copy_arrays(variables)
  report: dict[str, Any] = {}
  for wave in _waves(units):
    items = []
    for i in wave:
      u = units[i]
      if u.name not in moments:
        if u.name in unknown:
          report[u.name] = dict(skipped=f'input moments unknown: {unknown[u.name]}')
          continue
        raise ValueError(f'dfmpc: no input moments for unit {u.name}')
      layer = dict(trees.get_path(work['params'], u.producer))
      kernel = np.asarray(layer['kernel'], np.float32)
      dep = np.asarray(deployed(u.producer, kernel), np.float64)
      if dep.shape != kernel.shape or not np.all(np.isfinite(dep)):
        raise ValueError(f'dfmpc: the deployed kernel of {u.producer} has shape {dep.shape} '
                         f'(expected {kernel.shape}) or non-finite values')
      eps = spec.bn_epsilon(u.bn) if u.bn is not None else BN_EPS
      alpha, b = unit_affine(work, u, eps)
      rows = depthwise_moment_rows if u.name in dw_names else moment_rows
      F, t = rows(kernel, alpha, b, moments[u.name])
      Fh, th = rows(dep, alpha, b, moments[u.name])
      if replace_producers:
        layer['kernel'] = dep.astype(np.float32)
        trees.set_path(work['params'], u.producer, layer)
      form = 'diag' if mode == 'diag' or u.through or u.name in dw_names else 'full'
      items.append((u, F, Fh, t, th, form))
    full = [it for it in items if it[5] == 'full']
    res = iter(solvers.solve([full_system(F, Fh, t, th, lam, u.name, target, u.activation)
                              for u, F, Fh, t, th, _ in full], dtype=dtype) if full else ())
    for u, F, Fh, t, th, form in items:
      if form == 'diag':
        lam_u = lam if lam_depthwise is None or not (u.through or u.name in dw_names) else \
            lam_depthwise
        S, dg = diag_coefficients(F, Fh, t, th, lam_u, target, u.activation), {}
      else:
        r = next(res)
        S = r.S_P
        dg = dict(solver=r.diag['solver'], rel_residual=r.diag['rel_residual'],
                  cond=r.diag['cond'])
      fold(work['params'], u, S)
      before, after = reconstruction_error(F, Fh, t, th, S, target, u.activation)
      d = np.diag(S) if np.ndim(S) == 2 else S
      extra = dict(form=form) if form != mode or u.name in dw_names else {}
      if u.name in dw_names:
        extra['depthwise'] = True
      report[u.name] = dict(coef_min=float(np.min(d)), coef_max=float(np.max(d)),
                            coef_mean=float(np.mean(d)),
                            offdiag_abs_mean=float(np.mean(np.abs(S - np.diag(d))))
                            if np.ndim(S) == 2 else 0.0,
                            rel_error_before=before, rel_error_after=after, **dg, **extra)
  return work, report


def dfmpc(spec, variables: Mapping[str, Any], *, bits: int, high_bits: int | None = None,
          mode: str = DEFAULT_MODE, lam: float = DEFAULT_LAM, base: str = DEFAULT_BASE,
          target: str = DEFAULT_TARGET, per_channel: bool = True, symmetric: bool = True,
          keep_8bit: Iterable[str] = (),
          moments: Mapping[str, moments_lib.InputMoments] | None = None,
          depthwise: bool = False, lam_depthwise: float | None = None
          ) -> tuple[tuple[int, ...], dict[str, Any], dict[str, Any], dict[str, Any]]:
  """DF-MPC quantization of a network (module docstring).

  Args:
    spec: the architecture.
    variables: float variables (original, or pruned: widths are read from the arrays).
    bits: bit width of every unit producer (the low-precision layers).
    high_bits: bit width of every other layer (default ``bits``).
    mode, lam, target: compensation form, ridge and fitted quantity (module docstring).
    base: quantizer of every layer: 'rtn', 'omse' or 'squant'.
    per_channel, symmetric: grid options (OMSE needs symmetric).
    keep_8bit: layers at 8 bits (e.g. ``trace.first_and_last_layers(spec)``).
    moments: the producer inputs' moments (default :func:`input_moments`).
    depthwise: also compensate the depthwise convs of depthwise units in their consumers
      (:func:`compensate`); they stay at ``high_bits`` like every layer that is no unit producer.
    lam_depthwise: the ridge of the units on a depthwise path (default ``lam``).

  Returns:
    ``(widths, qtree, qmeta, report)``: the stored format of :func:`lbyl_jax.quant.uniform.quantize_tree`
    (per-layer bits in ``qmeta['layers']``; ``qmeta['method'] = 'dfmpc'``).
  """
  bits = quant.check_bits(bits, where='dfmpc bits')
  high = bits if high_bits is None else quant.check_bits(high_bits, where='dfmpc high_bits')
  qfun = _quantizer(base)
  known = quant.kernel_paths(variables)
  keep8 = quant.normalize_layer_paths(keep_8bit, known, 'dfmpc keep_8bit')
  producers = {u.producer for u in spec.units}
  layer_bits = {p: (bits if p in producers else high) for p in known}

  def deployed(path, kernel):
    b = quant.MAX_BITS if path in keep8 else layer_bits[path]
    qt = qfun(kernel, bits=b, per_channel=per_channel, symmetric=symmetric, path=path)
    return quant.dequantize(qt)

  work, unit_reports = compensate(spec, variables, deployed, mode=mode, lam=lam, target=target,
                                  moments=moments, replace_producers=False, depthwise=depthwise,
                                  lam_depthwise=lam_depthwise)
  qtree, qmeta = quant.quantize_tree(work, bits=bits, per_channel=per_channel,
                                     symmetric=symmetric, keep_8bit=sorted(keep8),
                                     layer_bits=layer_bits, quantizer=qfun)
  qmeta['method'] = 'dfmpc'
  widths = units_lib.widths_of(work, spec.units)
  report = dict(method='dfmpc', bits=bits, high_bits=high, mode=mode, lam=lam, base=base,
                target=target,
                per_channel=per_channel, symmetric=symmetric, keep_8bit=sorted(keep8),
                widths=list(widths), units=unit_reports, nbytes=quant.tree_nbytes(qtree),
                layer_errors={p: d['rel_error'] for p, d in qmeta['layers'].items()})
  if depthwise:
    report['depthwise'] = True
  if lam_depthwise is not None:
    report['lam_depthwise'] = lam_depthwise
  skipped = {k: v['skipped'] for k, v in unit_reports.items() if 'skipped' in v}
  if skipped:
    report['skipped'] = skipped
  return widths, qtree, qmeta, report


def _high_bits(v):
  return quant.check_bits(v, where='DF-MPC high bits')


# The families :func:`lbyl_jax.pruning.moments.propagate` models (the input moments DF-MPC needs).


@register
@dataclasses.dataclass(frozen=True)
class DFMPC(Quantizer):
  """DF-MPC (Chen et al., Pattern Recognition 2023): every unit producer's quantization error is
  compensated in closed form by its consumer (module docstring); uniform bits, or mixed precision
  with ``dfmpc_high_bits``. Defaults from the development split (h-quant's probe, branch h-quant
  commit 88a9803, benchmarks/results/quant_methods_dev.log): 'diag', lam = 1 for uniform bits;
  'full', lam = 10 for mixed precision (per-channel wherever a depthwise conv absorbs the
  coefficients). Runs on every preset and on user models (units whose input moments are unknown
  are left uncompensated and listed in the report's ``skipped``)."""

  name = 'dfmpc'
  summary = 'DF-MPC: closed-form compensation of each producer by its consumer'

  dfmpc_mode: str | None = option(None, help='compensation form: per-channel (diag) or a full'
                                  ' matrix (full)', choices=(None,) + MODES,
                                  default_text='diag for uniform bits, full for mixed precision')
  dfmpc_lam: float | None = option(None, help='ridge towards no compensation (relative)',
                                   check=NONNEG, default_text='1 uniform, 10 mixed')
  dfmpc_high_bits: int | None = option(None, help='bits of the layers that are not unit producers'
                                       ' (mixed precision; the producers get --weight-bits)',
                                       check=_high_bits, metavar='N',
                                       default_text='--weight-bits')
  dfmpc_base: str = option(DEFAULT_BASE, help='rounding of every layer', choices=BASES)
  dfmpc_target: str = option(DEFAULT_TARGET, help='fitted quantity: feature maps (relu) or'
                             ' pre-activations (preact)', choices=TARGETS, advanced=True)

  def __post_init__(self):
    super().__post_init__()
    if self.dfmpc_base == 'omse' and not self.symmetric:
      raise ValueError('--dfmpc-base omse: OMSE implements only the symmetric grid; drop '
                       '--asymmetric')

  @property
  def mixed(self) -> bool:
    return self.dfmpc_high_bits is not None and self.dfmpc_high_bits != self.bits

  def resolved(self) -> tuple[str, float]:
    """(mode, lam) after the defaults (uniform: diag, 1; mixed precision: full, 10)."""
    mode = self.dfmpc_mode or (MIXED_MODE if self.mixed else DEFAULT_MODE)
    if self.dfmpc_lam is not None:
      return mode, float(self.dfmpc_lam)
    return mode, MIXED_LAM if self.mixed else DEFAULT_LAM

  def lam_depthwise(self, pruned: bool = False) -> float | None:
    """The ridge of the units on a depthwise path: :data:`DEPTHWISE_LAM` with uniform bits on an
    unpruned network when ``--dfmpc-lam`` is not given, else None (the same ``lam`` as every
    unit)."""
    if self.dfmpc_lam is not None or self.mixed or (pruned and not DEPTHWISE_PRUNED):
      return None
    return DEPTHWISE_LAM

  def unsupported_units(self, spec) -> list[str]:
    """Units DF-MPC cannot compensate (:func:`unit_problem`): an activation other than ReLU,
    ReLU6 or none, or per-channel layers in between that do not start with a depthwise conv.
    Several consumers, channel offsets, flattens and pools are handled (:func:`fold`)."""
    return [u.name for u in spec.units if unit_problem(u) is not None]

  def unsupported_message(self, spec, names: Sequence[str]) -> str:
    why = '; '.join(f'{n}: {unit_problem(spec.discovery.unit(n))}' for n in names[:4])
    return (f'--quant-method dfmpc cannot compensate some units of {spec.name} ({why}); use '
            '--quant-method rtn, omse or squant')

  def quantize(self, spec, variables, *, keep_8bit, context):
    original = context.get('original')
    pruned = original is not None and (units_lib.widths_of(variables, spec.units)
                                       != units_lib.widths_of(original, spec.units))
    mode, lam = self.resolved()
    _, qtree, qmeta, report = dfmpc(spec, variables, bits=self.bits,
                                    high_bits=self.dfmpc_high_bits, mode=mode, lam=lam,
                                    base=self.dfmpc_base, target=self.dfmpc_target,
                                    per_channel=self.per_channel, symmetric=self.symmetric,
                                    keep_8bit=keep_8bit,
                                    depthwise=DEPTHWISE_UNIFORM and not self.mixed
                                    and (DEPTHWISE_PRUNED or not pruned),
                                    lam_depthwise=self.lam_depthwise(pruned)
                                    if any(u.through for u in spec.units) else None)
    return QuantResult(qtree, qmeta, report)
