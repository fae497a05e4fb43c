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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from lbyl_jax.core import trees
from lbyl_jax.core import units as units_lib
from lbyl_jax.core.bn import BN_EPS
from lbyl_jax.core.options import NONNEG, option
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


def diag_moments(F, Fh, t, th, target: str = DEFAULT_TARGET
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per channel ``(E[a_k ahat_k], E[ahat_k^2], E[a_k^2])`` of the target (feature maps
  ``a = ReLU(z)`` for 'relu', ``z`` itself for 'preact'), float64."""
  _check_target(target)
  F, Fh = np.asarray(F, np.float64), np.asarray(Fh, np.float64)
  t, th = np.asarray(t, np.float64), np.asarray(th, np.float64)
  if target == 'preact':
    return (np.einsum('md,md->m', F, Fh) + t * th, np.einsum('md,md->m', Fh, Fh) + th * th,
            np.einsum('md,md->m', F, F) + t * t)
  s, sh = _stds(F), _stds(Fh)
  den = s * sh
  rho = np.clip(np.where(den > 0, np.einsum('md,md->m', F, Fh) / np.where(den > 0, den, 1.0), 0.0),
                -1.0, 1.0)
  eah = moments_lib._cross_flat(t, s, th, sh, rho)  # pylint: disable=protected-access
  _, ehh = moments_lib.rectified_moments(th, sh ** 2)
  _, eaa = moments_lib.rectified_moments(t, s ** 2)
  return eah, ehh, eaa


def full_moments(F, Fh, t, th, target: str = DEFAULT_TARGET
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(E[a ahat^T], E[ahat ahat^T], diag E[a a^T])`` of the target, (m, m), (m, m), (m,)."""
  _check_target(target)
  F, Fh = np.asarray(F, np.float64), np.asarray(Fh, np.float64)
  t, th = np.asarray(t, np.float64), np.asarray(th, np.float64)
  if target == 'preact':
    return (F @ Fh.T + np.outer(t, th), Fh @ Fh.T + np.outer(th, th),
            np.einsum('md,md->m', F, F) + t * t)
  m = t.shape[0]
  s, sh = _stds(F), _stds(Fh)
  j, k = np.meshgrid(np.arange(m), np.arange(m), indexing='ij')
  eah = moments_lib._cross_flat(  # pylint: disable=protected-access
      t[j.ravel()], s[j.ravel()], th[k.ravel()], sh[k.ravel()], _rho(F, Fh, s, sh).ravel())
  ((_, ehh),) = moments_lib.second_moment_matrices([(th, Fh @ Fh.T)])
  _, eaa = moments_lib.rectified_moments(t, s ** 2)
  return eah.reshape(m, m), ehh, eaa


def diag_coefficients(F, Fh, t, th, lam: float = DEFAULT_LAM,
                      target: str = DEFAULT_TARGET) -> np.ndarray:
  """Mode 'diag' (module docstring); 1 where undefined or not positive (the ReLU fold needs
  c > 0)."""
  eah, ehh, _ = diag_moments(F, Fh, t, th, target)
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
                target: str = DEFAULT_TARGET) -> solvers.SharedSystem:
  """Mode 'full' as a :class:`lbyl_jax.pruning.solvers.SharedSystem` whose ``S_P`` is S (row j: channel
  j's coefficients on the quantized channels)."""
  _check_target(target)
  m = np.shape(Fh)[0]
  eye = np.eye(m)
  if target == 'preact':
    gram_trace = float(np.einsum('md,md->', Fh, Fh) + np.dot(th, th))
    r = np.sqrt(lam * gram_trace / m) * eye
    return solvers.SharedSystem(np.concatenate([Fh, r], 1), np.concatenate([F, r], 1),
                                np.asarray(th, np.float64), np.asarray(t, np.float64), 1.0, 0.0,
                                name)
  eah, ehh, _ = full_moments(F, Fh, t, th, target)
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


def reconstruction_error(F, Fh, t, th, S, target: str = DEFAULT_TARGET) -> tuple[float, float]:
  """Modelled ``E||a - ahat||^2 / E||a||^2`` (no compensation) and ``E||a - S ahat||^2 /
  E||a||^2`` (S an m x m matrix, or a vector for a diagonal), ``a`` the target."""
  if np.ndim(S) == 1:
    eah, ehh, eaa = diag_moments(F, Fh, t, th, target)
    c = np.asarray(S, np.float64)
    err = lambda d: float(np.sum(eaa - 2.0 * d * eah + d * d * ehh))  # noqa: E731
    one = np.ones_like(c)
  else:
    eah, ehh, eaa = full_moments(F, Fh, t, th, target)
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
# Whole network.


def _waves(units: tuple[units_lib.Unit, ...]) -> list[list[int]]:
  """Unit indices grouped so that a unit comes after the unit whose consumer is its producer."""
  level: dict[int, int] = {}
  by_consumer = {u.consumer: i for i, u in enumerate(units)}
  for i, u in enumerate(units):
    j = by_consumer.get(u.producer)
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
               replace_producers: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
  """Folds DF-MPC's compensation of every unit's deployed producer into its consumer.

  Args:
    spec: the architecture (``spec.units`` are the producer / consumer pairs).
    variables: float variables (original or pruned; widths are read from the arrays).
    deployed: ``deployed(producer_path, kernel) -> kernel`` as it will run (e.g. the dequantized
      low-bit kernel); called with the producer's kernel after its own inputs were compensated.
    mode: 'diag' or 'full'; lam: the relative ridge weight (>= 0); target: 'relu' (feature maps,
      default) or 'preact'.
    moments: per unit, the producer input's moments (default :func:`lbyl_jax.pruning.moments.propagate`).
    units: a subset of ``spec.units`` (default: all).
    dtype: solver dtype for 'full'.
    replace_producers: put the deployed producer kernels into the returned variables (default);
      False keeps the float kernels (to be quantized later by the same deterministic quantizer).

  Returns:
    ``(variables, report)``: float32 variables with the consumers compensated (and the producers'
    kernels replaced by their deployed kernels unless ``replace_producers=False``); per unit the
    coefficient statistics and the modelled relative reconstruction error of the target before /
    after.
  """
  if mode not in MODES:
    raise ValueError(f'dfmpc: mode must be one of {", ".join(MODES)}, got {mode!r}')
  if not (np.isfinite(lam) and lam >= 0):
    raise ValueError(f'dfmpc: lam must be a finite number >= 0, got {lam!r}')
  _check_target(target)
  units = tuple(spec.units if units is None else units)
  if moments is None:
    moments = moments_lib.propagate(spec, variables)
  work = trees.copy_arrays(variables)
  report: dict[str, Any] = {}
  for wave in _waves(units):
    items = []
    for i in wave:
      u = units[i]
      if u.name not in moments:
        raise ValueError(f'dfmpc: no input moments for unit {u.name}')
      layer = dict(trees.get_path(work['params'], u.producer))
      kernel = np.asarray(layer['kernel'], np.float32)
      dep = np.asarray(deployed(u.producer, kernel), np.float64)
      if dep.shape != kernel.shape or not np.all(np.isfinite(dep)):
        raise ValueError(f'dfmpc: the deployed kernel of {u.producer} has shape {dep.shape} '
                         f'(expected {kernel.shape}) or non-finite values')
      eps = spec.bn_epsilon(u.bn) if u.bn is not None else BN_EPS
      alpha, b = unit_affine(work, u, eps)
      F, t = moment_rows(kernel, alpha, b, moments[u.name])
      Fh, th = moment_rows(dep, alpha, b, moments[u.name])
      if replace_producers:
        layer['kernel'] = dep.astype(np.float32)
        trees.set_path(work['params'], u.producer, layer)
      items.append((u, F, Fh, t, th))
    if mode == 'diag':
      coefs = [diag_coefficients(F, Fh, t, th, lam, target) for _, F, Fh, t, th in items]
      diags = [{} for _ in items]
    else:
      res = solvers.solve([full_system(F, Fh, t, th, lam, u.name, target)
                           for u, F, Fh, t, th in items], dtype=dtype)
      coefs = [r.S_P for r in res]
      diags = [dict(solver=r.diag['solver'], rel_residual=r.diag['rel_residual'],
                    cond=r.diag['cond']) for r in res]
    for (u, F, Fh, t, th), S, dg in zip(items, coefs, diags):
      cons = dict(trees.get_path(work['params'], u.consumer))
      kdt = np.asarray(cons['kernel']).dtype
      cons['kernel'] = mix_consumer(cons['kernel'], S, u).astype(kdt)
      trees.set_path(work['params'], u.consumer, cons)
      before, after = reconstruction_error(F, Fh, t, th, S, target)
      d = np.diag(S) if np.ndim(S) == 2 else S
      report[u.name] = dict(coef_min=float(np.min(d)), coef_max=float(np.max(d)),
                            coef_mean=float(np.mean(d)),
                            offdiag_abs_mean=float(np.mean(np.abs(S - np.diag(d))))
                            if np.ndim(S) == 2 else 0.0,
                            rel_error_before=before, rel_error_after=after, **dg)
  return work, report


def dfmpc(spec, variables: Mapping[str, Any], *, bits: int, high_bits: int | None = None,
          mode: str = DEFAULT_MODE, lam: float = DEFAULT_LAM, base: str = DEFAULT_BASE,
          target: str = DEFAULT_TARGET, per_channel: bool = True, symmetric: bool = True,
          keep_8bit: Iterable[str] = (),
          moments: Mapping[str, moments_lib.InputMoments] | None = None
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
    moments: the producer inputs' moments (default :func:`lbyl_jax.pruning.moments.propagate`).

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
                                  moments=moments, replace_producers=False)
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
  return widths, qtree, qmeta, report


def _high_bits(v):
  return quant.check_bits(v, where='DF-MPC high bits')


# The families :func:`lbyl_jax.pruning.moments.propagate` models (the input moments DF-MPC needs).
MOMENT_FAMILIES = ('cifar_resnet', 'resnet', 'vgg_cifar', 'vgg', 'mlp', 'mobilenet_v2')


@register
@dataclasses.dataclass(frozen=True)
class DFMPC(Quantizer):
  """DF-MPC (Chen et al., Pattern Recognition 2023): every unit producer's quantization error is
  compensated in closed form by its consumer (module docstring); uniform bits, or mixed precision
  with ``dfmpc_high_bits``. Defaults from the development split (h-quant's probe, branch h-quant
  commit 88a9803, benchmarks/results/quant_methods_dev.log): 'diag', lam = 1 for uniform bits;
  'full', lam = 10 for mixed precision."""

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

  def quantize(self, spec, variables, *, keep_8bit, context):
    del context
    if spec.family not in MOMENT_FAMILIES:
      raise ValueError(f'--quant-method dfmpc: its data-free input moments come from the '
                       f'BN-moment model of the preset families ({", ".join(MOMENT_FAMILIES)}); '
                       f'{spec.name} is a {spec.family!r} model: use --quant-method rtn, omse, '
                       'squant, dfq or udfc')
    mode, lam = self.resolved()
    _, qtree, qmeta, report = dfmpc(spec, variables, bits=self.bits,
                                    high_bits=self.dfmpc_high_bits, mode=mode, lam=lam,
                                    base=self.dfmpc_base, target=self.dfmpc_target,
                                    per_channel=self.per_channel, symmetric=self.symmetric,
                                    keep_8bit=keep_8bit)
    return QuantResult(qtree, qmeta, report)
