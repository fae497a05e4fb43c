"""UDFC-style unified pruning + quantization compensation (docs/quantization.md#udfc-style-compensation), and plain RTN.

Per prunable unit (producer l -> BN -> ReLU -> consumer l+1; K kept, P pruned, What = Q(W)):

(a) :func:`quant_scales` -- one scalar per kept channel, a_k ~ s_k ahat_k:
      s_k = (alpha_k^2 <W_k, What_k> + a1 b_k^2 + a2) / (alpha_k^2 ||What_k||^2 + a1 b_k^2 + a2)
(b) :func:`delivery` -- the rows S'_P of the consistent LBYL closed form (docs/lbyl.md#consistent-closed-form) with the kept
    filters quantized, F = diag(alpha_K) What_K, full-precision targets f_j = alpha_j W_j, and
    a1 / a2 in place of lam1 / lam2;
(c) :func:`consumer_update` -- V'_{:,k} = s_k V_{:,k} + sum_j S'_{j,k} V_{:,j}, columns P dropped;
    the consumer is quantized only AFTER this input compensation;
    On an inverted residual's depthwise unit (MobileNetV2): :func:`depthwise_delivery`, the
    composite system of :mod:`lbyl_jax.pruning.depthwise` with the kept channels' expansion
    filters quantized and their depthwise filters rescaled by s_k
    (docs/quantization.md#udfc-style-on-mobilenetv2-joint-with-lbyl);
(d) :func:`udfc` runs the units from input to output; the pruning delivery of every unit is
    computed from the ORIGINAL full-precision W of that layer (kept channels ranked by a criterion
    of :mod:`lbyl_jax.pruning.criteria` on the original filters, docs/README.md#coefficients-from-the-original-weights).

Which What the scalar s_k compensates (docs/quantization.md#order-and-reference-weights): the producer is deployed as Q of its kernel AFTER its
own inputs were compensated by the previous unit (VGG chains, bottleneck conv2), so by default
(``scale_from='compensated'``) s_k is fitted between that deployed full-precision row and its
quantization -- the error the consumer actually sees. Where a producer's inputs are untouched
(every ResNet conv1, the first VGG conv, LeNet) this is identical to the original W.
``scale_from='original'`` fits s_k on Q(original W_k) instead, the literal reading of (d).

Layers that are not unit producers (stem, shortcut convs, conv2 of basic blocks, conv3 of
bottlenecks, heads) are quantized by plain rounding. With ``rescale_others=True`` (off by default)
their own per-channel least-squares rescale (docs/quantization.md#quantization-rescale with a1 = 0: there is no bias mismatch, the
scale acts before the affine BN) is applied exactly, without touching the integers:
- followed by BN: BN(s z) = BN'(z) with gamma' = s gamma, mu' = mu / s (:func:`bn_fold_input_scale`);
- no BN, per-channel quantization: the stored step becomes s Delta (same integers);
- no BN, per-tensor quantization: not representable, left as is (reported).
It is off by default because the least-squares scale of independent rounding noise is a shrinkage
(s ~ 1 / (1 + ||e||^2 / ||W||^2) < 1): optimal for one layer's output MSE, but the shrinkage is
coherent across layers, and on random BN networks it raised the 4-bit output error.

With ``bias_correction=True`` (what ``lbyl``'s default asks for in the joint path of
:func:`lbyl_jax.pipeline.compress`) two data-free mean terms under the BN-moments model
(docs/quantization.md#mean-terms) are added, neither of which docs/quantization.md#udfc-style-compensation has:
- the pruned channels' mean that the delivery does not carry, c = E[a_P] - S'_P E[a_K], folded
  into the consumer's BN mean exactly as ``lbyl`` + bias correction folds it (padding-aware);
- :func:`mean_match` for every kept channel: its BN shift is moved so that the deployed
  activation s_k ReLU(z_hat_k) has the original mean E[ReLU(z_k)] again, z_hat_k ~ N(m_hat_k,
  gamma_k^2) with m_hat_k = beta_k + alpha_k (What_k - W_k) . E[x] (the quantization's mean shift,
  DFQ's bias-correction term, docs/quantization.md#dfq-bias-correction). The scalar s_k of (a) is a least-squares shrinkage
  (s_k ~ 1 / (1 + ||e||^2 / ||W||^2)) that also shrinks the channel's mean; this puts the mean
  back and leaves s_k acting on the fluctuation only.
On a depthwise unit (MobileNetV2) the constant is E[c_P] - S'_P E[c_K] with c the ReLU6 output of
the depthwise conv's BN (pruning.depthwise's constant), and the mean match is made on the depthwise
conv's input, s_k ReLU6(z_hat_k), with clipped means (:func:`mean_match` ``clip``).

All per-unit math is float64 NumPy on the host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from lbyl_jax.core import trees
from lbyl_jax.core import units as units_lib
from lbyl_jax.core.bn import BN_EPS
from lbyl_jax.core.options import NONNEG, option
from lbyl_jax.pruning import bias as bias_lib
from lbyl_jax.pruning import depthwise as depthwise_lib
from lbyl_jax.pruning import moments as moments_lib
from lbyl_jax.pruning import selection as selection_lib
from lbyl_jax.pruning import solvers
from lbyl_jax.pruning import surgery
from lbyl_jax.pruning import terms as terms_lib
from lbyl_jax.pruning.moments import clipped_relu_mean
from lbyl_jax.models import trace
from lbyl_jax.quant import dfq as dfq_lib
from lbyl_jax.quant import uniform as quant
from lbyl_jax.quant.base import QuantResult, Quantizer, register

DEFAULT_A1 = 0.01  # docs/quantization.md#udfc-defaults (UDFC ablation optimum) [RECON]
DEFAULT_A2 = 0.008


# --------------------------------------------------------------------------------------------
# Per-unit math (docs/quantization.md#udfc-style-compensation).


def quant_scales(W, What, alpha, b, *, a1: float = DEFAULT_A1, a2: float = DEFAULT_A2) -> np.ndarray:
  """docs/quantization.md#quantization-rescale: the closed-form minimizer of
  ``alpha_k^2 ||W_k - s What_k||^2 + a1 b_k^2 (1 - s)^2 + a2 (s - 1)^2`` per row k.

  Args:
    W, What: N x D full-precision and quantized filter rows.
    alpha, b: per-row folded BN scale and shift (docs/README.md#bn-terms); 1 and 0 without BN.
    a1, a2: regularization weights (>= 0).

  Returns:
    s, N float64. A row whose denominator is 0 (all-zero What, a1 b^2 + a2 = 0) gets s = 1.
  """
  if a1 < 0 or a2 < 0:
    raise ValueError(f'quant_scales: a1 and a2 must be >= 0, got {a1}, {a2}')
  W = np.asarray(W, np.float64)
  What = np.asarray(What, np.float64)
  if W.shape != What.shape or W.ndim != 2:
    raise ValueError(f'quant_scales: W {W.shape} and What {What.shape} must be equal N x D arrays')
  a2_ = np.asarray(alpha, np.float64) ** 2
  reg = a1 * np.asarray(b, np.float64) ** 2 + a2
  num = a2_ * np.einsum('nd,nd->n', W, What) + reg
  den = a2_ * np.einsum('nd,nd->n', What, What) + reg
  ok = den > 0
  return np.where(ok, num / np.where(ok, den, 1.0), 1.0)


def quant_objective(W, What, alpha, b, s, *, a1: float = DEFAULT_A1, a2: float = DEFAULT_A2) -> np.ndarray:
  """The per-row loss of docs/quantization.md#quantization-rescale at scales ``s`` (s = 1 is plain rounding)."""
  W = np.asarray(W, np.float64)
  What = np.asarray(What, np.float64)
  s = np.broadcast_to(np.asarray(s, np.float64), (W.shape[0],))
  re = np.asarray(alpha, np.float64) ** 2 * np.sum((W - s[:, None] * What) ** 2, axis=1)
  return re + (a1 * np.asarray(b, np.float64) ** 2 + a2) * (1.0 - s) ** 2


def delivery(What_K, alpha_K, b_K, W_P, alpha_P, b_P, *, a1: float = DEFAULT_A1,
             a2: float = DEFAULT_A2) -> np.ndarray:
  """docs/quantization.md#delivery-on-quantized-kept-filters: delivery rows S'_P (|P| x m) of the pruned channels on the quantized kept channels.

  Minimizes, per pruned j, ``||f_j - F^T s_j||^2 + a1 (b_j - b_K^T s_j)^2 + a2 ||s_j||^2`` with
  ``F = diag(alpha_K) What_K`` and ``f_j = alpha_j W_j``: the LBYL consistent system
  (:class:`lbyl_jax.pruning.solvers.SharedSystem`) with a1 / a2 as its lambdas, solved in
  float64 on the host (:func:`lbyl_jax.pruning.solvers.solve_host`). With ``a2 = 0`` and a
  singular system, the minimum-norm least-squares solution is returned.
  """
  if a1 < 0 or a2 < 0:
    raise ValueError(f'delivery: a1 and a2 must be >= 0, got {a1}, {a2}')
  What_K = np.asarray(What_K, np.float64)
  F = np.asarray(alpha_K, np.float64)[:, None] * What_K
  FP = np.asarray(alpha_P, np.float64)[:, None] * np.asarray(W_P, np.float64)
  return solvers.solve_host(solvers.SharedSystem(F, FP, np.asarray(b_K, np.float64),
                                                 np.asarray(b_P, np.float64), a1, a2, 'udfc'))


def deployed_block_terms(spec, variables: Mapping[str, Any], problem, *, producer_hat_K,
                         depthwise_hat_K, sigma: str = 'std') -> depthwise_lib.BlockTerms:
  """:class:`lbyl_jax.pruning.depthwise.BlockTerms` of a depthwise unit whose KEPT channels carry
  the given quantized expansion filters and rescaled depthwise filters
  (docs/quantization.md#udfc-style-on-mobilenetv2-joint-with-lbyl) and whose pruned channels are
  the ORIGINAL full-precision ones.

  Args:
    spec, variables: the architecture and its ORIGINAL variables.
    problem: the unit's :class:`lbyl_jax.pruning.problem.UnitProblem` (original filters).
    producer_hat_K: the producer's kept output channels as stored, HWIO (..., m): Q(W_K).
    depthwise_hat_K: the depthwise kernel's kept channels, (kh, kw, 1, m): s_K d_K (the rescale
      folded in; ``udfc``'s default) or Q(s_K d_K) as stored.
    sigma: BN sigma of the algebra ('std' or 'variance').

  Returns:
    The terms: f_k = alpha1_k Q(W_k), g_k = alpha2_k ``depthwise_hat_K``_k for k in K; f_j, g_j
    original for j in P; b1, b2 (the BN shifts) unchanged.
  """
  unit, keep = problem.unit, np.asarray(problem.keep)
  dw = dfq_lib.depthwise_unit(unit)
  if dw is None:
    raise ValueError(f'{unit.name}: not a depthwise unit UDFC handles (quant.dfq.depthwise_unit)')
  view = trees.copy_tree(variables)  # new dicts, shared arrays: the caller's tree is not changed
  prod = dict(trees.get_path(view['params'], unit.producer))
  k = np.array(prod['kernel'], np.float64)
  k[..., keep] = np.asarray(producer_hat_K, np.float64)
  prod['kernel'] = k
  trees.set_path(view['params'], unit.producer, prod)
  layer = dict(trees.get_path(view['params'], dw.path))
  d = np.array(layer['kernel'], np.float64)
  d[..., keep] = np.asarray(depthwise_hat_K, np.float64)
  layer['kernel'] = d
  trees.set_path(view['params'], dw.path, layer)
  dep = dataclasses.replace(problem, W=terms_lib.filters(view, unit, dtype=np.float64))
  return depthwise_lib.block_terms(spec, view, dep, sigma=sigma)


def depthwise_delivery(terms: depthwise_lib.BlockTerms, keep, prune, *, a1: float = DEFAULT_A1,
                       a2: float = DEFAULT_A2) -> np.ndarray:
  """Delivery rows S'_P (|P| x m) of a depthwise unit on its kept channels with quantized
  expansion filters
  (docs/quantization.md#udfc-style-on-mobilenetv2-joint-with-lbyl).

  LBYL's consistent form on the composite surrogate (docs/mobilenet_v2.md#lbyl-on-the-composite-channel,
  :func:`lbyl_jax.pruning.depthwise.lbyl_system`) with ``terms`` from :func:`deployed_block_terms`:
  per pruned j, min ``||H_j - H^_K^T s_j||^2 + a1 (B_j - B^_K^T s_j)^2 + a2 ||s_j||^2`` with
  H^_k = f^_k (x) g^_k, B^_k = b2_k + (sum_t g^_{k,t}) b1_k (the kept channels, quantized
  expansion filter, rescaled depthwise filter) and H_j, B_j full precision; solved in float64 on
  the host.
  """
  if a1 < 0 or a2 < 0:
    raise ValueError(f'depthwise_delivery: a1 and a2 must be >= 0, got {a1}, {a2}')
  return solvers.solve_host(depthwise_lib.lbyl_system(terms, np.asarray(keep), np.asarray(prune),
                                                      lam1=a1, lam2=a2, name='udfc'))


def mean_match(target, s, sd, *, iters: int = 200, clip: float | None = None) -> np.ndarray:
  """Per channel, the mean m with ``s * E[act(N(m, sd^2))] = target`` (s > 0, sd > 0), act =
  ReLU (``clip`` None) or min(ReLU, clip) (ReLU6: ``clip=6``).

  E[ReLU(N(m, sd^2))] rises strictly from 0 to infinity in m (the clipped mean from 0 to
  ``clip``), so for 0 < target / s (< clip) the root is unique; it is found by bisection on a
  bracket grown until it holds the root. A channel with target <= 0, s <= 0, sd <= 0 or
  target / s >= clip has no such m: NaN (callers leave it unchanged).
  """
  target = np.asarray(target, np.float64)
  s = np.broadcast_to(np.asarray(s, np.float64), target.shape)
  sd = np.broadcast_to(np.asarray(sd, np.float64), target.shape)
  ok = (target > 0) & (s > 0) & (sd > 0) & np.isfinite(target) & np.isfinite(s) & np.isfinite(sd)
  if clip is not None:
    ok = ok & (target < clip * np.where(ok, s, 0.0))
  goal = np.where(ok, target / np.where(ok, s, 1.0), 1.0)
  sd_ = np.where(ok, sd, 1.0)
  lo, hi = -np.abs(goal) - 10.0 * sd_, np.abs(goal) + 10.0 * sd_
  for _ in range(60):  # grow until the mean at lo <= goal <= the mean at hi
    bad_lo = clipped_relu_mean(lo, sd_, clip) > goal
    bad_hi = clipped_relu_mean(hi, sd_, clip) < goal
    if not (bad_lo.any() or bad_hi.any()):
      break
    lo = np.where(bad_lo, 2.0 * lo, lo)
    hi = np.where(bad_hi, 2.0 * hi, hi)
  for _ in range(iters):
    mid = 0.5 * (lo + hi)
    below = clipped_relu_mean(mid, sd_, clip) < goal
    lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
  return np.where(ok, 0.5 * (lo + hi), np.nan)


def consumer_update(V, *, keep, s, S_P, kind: str, flatten: int = 1) -> np.ndarray:
  """docs/quantization.md#consumer-update: ``V'_{:,k} = s_k V_{:,k} + sum_j S'_{j,k} V_{:,j}`` with the pruned inputs dropped.

  Args:
    V: consumer kernel, HWIO (``kind='conv'``) or (in, out) (``kind='dense'``; after an NCHW
      flatten each channel owns ``flatten`` consecutive rows).
    keep: sorted kept channel indices K (m).
    s: m quantization scales; S_P: |P| x m delivery rows (P = the channels not in K, sorted).

  Returns:
    The float64 kernel with m (or m * flatten) inputs.
  """
  V = np.asarray(V, np.float64)
  keep = np.asarray(keep, np.int64)
  s = np.asarray(s, np.float64)
  S_P = np.asarray(S_P, np.float64)
  if kind == 'conv':
    n = V.shape[2]
    prune = np.setdiff1d(np.arange(n), keep)
    return (V[:, :, keep, :] * s[None, None, :, None]
            + np.einsum('jk,hwjo->hwko', S_P, V[:, :, prune, :]))
  if kind == 'dense':
    n = V.shape[0] // flatten
    V3 = V.reshape(n, flatten, V.shape[1])
    prune = np.setdiff1d(np.arange(n), keep)
    out = V3[keep] * s[:, None, None] + np.einsum('jk,jro->kro', S_P, V3[prune])
    return out.reshape(keep.size * flatten, V.shape[1])
  raise ValueError(f"consumer_update: kind must be 'conv' or 'dense', got {kind!r}")


def bn_fold_output_scale(gamma, beta, s) -> tuple[np.ndarray, np.ndarray]:
  """docs/properties.md#t7-quantization-rescale: ``s ReLU(BN(z)) = ReLU(BN'(z))`` for s > 0 with gamma' = s gamma, beta' = s beta (ReLU is
  positively homogeneous), so s_k can live in the producer's BN instead of the consumer."""
  s = np.asarray(s, np.float64)
  return np.asarray(gamma, np.float64) * s, np.asarray(beta, np.float64) * s


def bn_fold_input_scale(gamma, mean, s) -> tuple[np.ndarray, np.ndarray]:
  """``BN(s z) = BN'(z)`` exactly for any s != 0, with gamma' = s gamma and mu' = mu / s:
  ``gamma (s z - mu) / sigma + beta = (s gamma) (z - mu / s) / sigma + beta``.

  Used to rescale a quantized layer that feeds a BN (the variance is left alone, so it can never
  turn negative, unlike the equivalent ``sigma' = sigma / s`` form)."""
  s = np.asarray(s, np.float64)
  return np.asarray(gamma, np.float64) * s, np.asarray(mean, np.float64) / s


# --------------------------------------------------------------------------------------------
# Helpers over variable trees.


def _rows(kernel) -> np.ndarray:
  """Output channels as rows (N x D). Any fixed column order works: only inner products are used."""
  k = np.asarray(kernel, np.float64)
  return np.moveaxis(k, -1, 0).reshape(k.shape[-1], -1)


def _unit_rows(kernel, unit: units_lib.Unit, bias) -> np.ndarray:
  """Filter rows of a unit's producer; without BN the bias is a coordinate (docs/README.md#filters)."""
  rows = _rows(kernel)
  if unit.bn is None and bias is not None:
    rows = np.concatenate([rows, np.asarray(bias, np.float64)[:, None]], axis=1)
  return rows


def _scale_inputs(kernel, unit: units_lib.Unit, keep, s) -> np.ndarray:
  """The consumer kernel with input channels ``keep`` multiplied by ``s`` (the rest untouched)."""
  V = np.array(kernel, np.float64)
  if unit.consumer_kind == 'conv':
    V[:, :, keep, :] *= s[None, None, :, None]
    return V
  n = V.shape[0] // unit.flatten
  V3 = V.reshape(n, unit.flatten, V.shape[1])
  V3[keep] *= s[:, None, None]
  return V3.reshape(V.shape)


def _bits_for(path: str, bits: int, keep_8bit: set[str]) -> int:
  return quant.MAX_BITS if path in keep_8bit else bits


def _stats(x: np.ndarray) -> dict[str, float]:
  if x.size == 0:
    return dict(min=0.0, max=0.0, mean=0.0)
  return dict(min=float(np.min(x)), max=float(np.max(x)), mean=float(np.mean(x)))


def _normalize_paths(variables, paths: Iterable[str]) -> set[str]:
  known = quant.kernel_paths(variables)
  return quant.normalize_layer_paths(paths, known, 'keep_8bit')


# --------------------------------------------------------------------------------------------
# Drivers.


def udfc(spec, variables: Mapping[str, Any], *, bits: int,
         selection: selection_lib.Selection | None = None,
         a1: float = DEFAULT_A1, a2: float = DEFAULT_A2, per_channel: bool = True,
         symmetric: bool = True, keep_8bit: Iterable[str] = (), scale_from: str = 'compensated',
         rescale_others: bool = False, delivery_lambdas: tuple[float, float] | None = None,
         bias_correction: bool = False, bias_fold: str = 'padding_aware',
         kept_mean_match: bool = True, depthwise_kernel: str = 'float'
         ) -> tuple[tuple[int, ...], dict[str, Any], dict[str, Any], dict[str, Any]]:
  """UDFC-style pruning + weight quantization of a whole network (docs/quantization.md#udfc-style-compensation).

  Args:
    spec: the architecture (its ``units`` are the producer / consumer pairs).
    variables: float variables (original, or already pruned: widths are read from the arrays).
    bits: weight bit width (2..8).
    selection: which channels each unit keeps (the plan's shared selection stage,
      :mod:`lbyl_jax.pruning.selection`: criterion, ratio, overrides, kept-count rounding, seed,
      and the BN sigma of the math); None: keep every channel (quantization compensation only).
    a1, a2: the two regularization weights (docs/quantization.md#udfc-defaults defaults 0.01 / 0.008).
    per_channel, symmetric: quantizer (docs/quantization.md#udfc-defaults default: per-channel symmetric).
    keep_8bit: layer paths quantized at 8 bits (e.g. ``quant.first_and_last_layers(spec)``).
    scale_from: 'compensated' (default) or 'original' (see the module docstring).
    rescale_others: also rescale non-producer layers (exact folds, see the module docstring).
    delivery_lambdas: ``(lam1, lam2)`` of the pruning delivery (b); None (the docs/quantization.md#delivery-on-quantized-kept-filters default): a1 / a2.
      The scalar rescale (a) always uses a1 / a2.
    bias_correction: add the pruned channels' constant and the kept channels' mean match (module
      docstring); needs the ORIGINAL variables (the moments are those of the unpruned network).
    bias_fold: 'padding_aware' (default) or 'all_taps' for the pruned channels' constant.
    kept_mean_match: with ``bias_correction``, also the kept channels' mean match (default; False
      keeps only the pruned channels' constant: the development-split comparison of
      docs/quantization.md#udfc-style-on-mobilenetv2-joint-with-lbyl).
    depthwise_kernel: in the delivery of a depthwise unit, the kept channels' depthwise filters
      s_k d_k before rounding ('float', default: like a plain unit's consumer, rounded after the
      delivery; chosen on the development split) or as stored, Q(s_k d_k) ('quantized').

  Returns:
    ``(widths, qtree, qmeta, report)``: ``quant.dequantize_tree(qtree, qmeta)`` are float
    variables of ``spec.build(widths)``.
  """
  bits = quant.check_bits(bits, where='udfc')
  if scale_from not in ('compensated', 'original'):
    raise ValueError(f"scale_from must be 'compensated' or 'original', got {scale_from!r}")
  selection = selection if selection is not None else selection_lib.Selection(ratio=0.0)
  if bias_fold not in bias_lib.FOLDS:
    raise ValueError(f'bias_fold must be one of {bias_lib.FOLDS}, got {bias_fold!r}')
  if depthwise_kernel not in ('quantized', 'float'):
    raise ValueError(f"depthwise_kernel must be 'quantized' or 'float', got {depthwise_kernel!r}")
  d1, d2 = (a1, a2) if delivery_lambdas is None else delivery_lambdas
  keep8 = _normalize_paths(variables, keep_8bit)
  qopts = dict(per_channel=per_channel, symmetric=symmetric)
  work = trees.copy_arrays(variables)
  unit_reports = {}
  problems = selection_lib.build_problems(spec, variables, selection)
  means = _MeanModel(spec, variables, problems, bias_fold) if bias_correction else None
  for index, (unit, problem) in enumerate(zip(spec.units, problems)):
    keep, prune = problem.keep, problem.prune
    alpha, b = problem.bn['alpha'], problem.bn['b']
    b_unit = _bits_for(unit.producer, bits, keep8)
    orig = trees.get_path(variables['params'], unit.producer)
    orig_bias = orig.get('bias')
    orig_k = np.take(np.asarray(orig['kernel'], np.float32), keep, axis=-1)
    orig_kb = None if orig_bias is None else np.take(np.asarray(orig_bias), keep)
    orig_k_hat = _unit_rows(quant.fake_quantize(orig_k, bits=b_unit, **qopts), unit, orig_kb)
    # (a) against the deployed kept rows: this producer after its own inputs were compensated.
    if scale_from == 'compensated':
      cur = trees.get_path(work['params'], unit.producer)
      dep = np.take(np.asarray(cur['kernel'], np.float32), keep, axis=-1)
      dep_bias = None if cur.get('bias') is None else np.take(np.asarray(cur['bias']), keep)
      dep_hat = quant.fake_quantize(dep, bits=b_unit, **qopts)
      Wk = _unit_rows(dep, unit, dep_bias)
      Wk_hat = _unit_rows(dep_hat, unit, dep_bias)
    else:
      dep, dep_hat = orig_k, quant.fake_quantize(orig_k, bits=b_unit, **qopts)
      Wk, Wk_hat = _unit_rows(orig_k, unit, orig_kb), orig_k_hat
    s = quant_scales(Wk, Wk_hat, alpha[keep], b[keep], a1=a1, a2=a2)
    bad = ~(np.isfinite(s) & (s > 0))  # ReLU homogeneity needs s > 0
    s = np.where(bad, 1.0, s)
    # (c) V'_K = s V_K + S'^T V_P: scale the kept inputs, then let surgery mix and slice. A
    # depthwise unit (MobileNetV2): channel k's next linear map is the depthwise kernel's
    # channel k, which takes s_k exactly (its bias is added after the product).
    dw = dfq_lib.depthwise_unit(unit)
    target = unit.consumer if dw is None else dw.path
    cons = dict(trees.get_path(work['params'], target))
    kdt = np.asarray(cons['kernel']).dtype
    if dw is None:
      cons['kernel'] = _scale_inputs(cons['kernel'], unit, keep, s).astype(kdt)
    else:
      k = np.array(cons['kernel'], np.float64)
      k[..., keep] = k[..., keep] * s
      cons['kernel'] = k.astype(kdt)
    # (b) pruning delivery from the ORIGINAL filters, the kept ones quantized. A depthwise unit
    # with pruned channels: the composite system of lbyl (pruning.depthwise) on the kept channels
    # Q(W_K) with the depthwise kernel s_K d_K (rounded after, like a plain unit's consumer), or
    # Q(s_K d_K) as it will be stored (depthwise_kernel='quantized').
    if dw is not None and prune.size:
      dw_hat = np.take(cons['kernel'], keep, axis=-1)
      if depthwise_kernel == 'quantized':
        dw_hat = quant.fake_quantize(dw_hat, bits=_bits_for(dw.path, bits, keep8), **qopts)
      dterms = deployed_block_terms(
          spec, variables, problem, sigma=selection.bn_sigma,
          producer_hat_K=quant.fake_quantize(orig_k, bits=b_unit, **qopts), depthwise_hat_K=dw_hat)
      S_P = depthwise_delivery(dterms, keep, prune, a1=d1, a2=d2)
    else:
      W_orig = _unit_rows(orig['kernel'], unit, orig_bias)
      S_P = delivery(orig_k_hat, alpha[keep], b[keep], W_orig[prune], alpha[prune], b[prune],
                     a1=d1, a2=d2)
    trees.set_path(work['params'], target, cons)
    const = means.pruned_constant(index, S_P) if means is not None else None
    _, work = surgery.apply(spec, work, {unit.name: (keep, S_P, const)})
    lq1 = quant_objective(Wk, Wk_hat, alpha[keep], b[keep], 1.0, a1=a1, a2=a2).sum()
    lqs = quant_objective(Wk, Wk_hat, alpha[keep], b[keep], s, a1=a1, a2=a2).sum()
    unit_reports[unit.name] = dict(
        kept=int(keep.size), pruned=int(prune.size), bits=b_unit, scale=_stats(s),
        scale_fallbacks=int(bad.sum()), coef=_stats(np.abs(S_P)),
        quant_loss_rtn=float(lq1), quant_loss_udfc=float(lqs))
    if dw is not None and prune.size:
      unit_reports[unit.name]['delivery'] = 'depthwise_composite'
    if means is not None and kept_mean_match:
      delta, n_skipped = means.kept_shift(index, np.asarray(dep_hat, np.float64)
                                          - np.asarray(dep, np.float64), s)
      _shift_producer(work, unit, delta)
      unit_reports[unit.name].update(
          bias_constant=_stats(np.abs(const)) if const is not None else None,
          mean_shift=_stats(delta), mean_match_skipped=n_skipped)
    elif means is not None:
      unit_reports[unit.name].update(
          bias_constant=_stats(np.abs(const)) if const is not None else None)

  producers = {u.producer for u in spec.units}
  traced = trace.trace_layers(spec)
  others = [p for p in traced.order if p not in producers]
  rescaled, scale_for_quant, not_rescaled = {}, {}, []
  if rescale_others:
    bn_of = traced.bn
    for path in others:
      layer = trees.get_path(work['params'], path)
      w = np.asarray(layer['kernel'], np.float32)
      what = quant.fake_quantize(w, bits=_bits_for(path, bits, keep8), **qopts)
      if path in bn_of:
        bnp = trees.get_path(work['params'], bn_of[path])
        bns = trees.get_path(work['batch_stats'], bn_of[path])
        alpha_l = np.asarray(bnp['scale'], np.float64) / np.sqrt(np.asarray(bns['var'], np.float64)
                                                                 + BN_EPS)
      else:
        alpha_l = np.ones(w.shape[-1])
      s = quant_scales(_rows(w), _rows(what), alpha_l, np.zeros_like(alpha_l), a1=0.0, a2=a2)
      s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
      if path in bn_of:
        g, mu = bn_fold_input_scale(bnp['scale'], bns['mean'], s)
        bnp = dict(bnp, scale=g.astype(np.float32))
        bns = dict(bns, mean=mu.astype(np.float32))
        trees.set_path(work['params'], bn_of[path], bnp)
        trees.set_path(work['batch_stats'], bn_of[path], bns)
        rescaled[path] = dict(how='bn', **_stats(s))
      elif per_channel:
        scale_for_quant[path] = s
        rescaled[path] = dict(how='quant_step', **_stats(s))
      else:
        not_rescaled.append(path)

  qtree, qmeta = quant.quantize_tree(work, bits=bits, keep_8bit=sorted(keep8), **qopts)
  for path, s in scale_for_quant.items():
    stored = trees.get_path(qtree['params'], path)['kernel']
    stored['scale'] = (np.asarray(stored['scale'], np.float64) * s).astype(np.float32)
    deq = quant.dequantize(quant.decode(stored, qmeta['layers'][path]))
    w = trees.get_path(work['params'], path)['kernel']
    qmeta['layers'][path]['rel_error'] = quant.relative_error(w, deq)
  widths = units_lib.widths_of(work, spec.units)
  report = dict(method='udfc', bits=bits, ratio=selection.ratio, criterion=selection.criterion,
                a1=a1, a2=a2,
                delivery_lambdas=[d1, d2], bias_correction=bool(bias_correction),
                per_channel=per_channel, symmetric=symmetric, keep_8bit=sorted(keep8),
                scale_from=scale_from, bn_sigma=selection.bn_sigma, bias_fold=bias_fold, widths=list(widths), units=unit_reports,
                rescaled=rescaled, not_rescaled=not_rescaled,
                layer_errors={p: d['rel_error'] for p, d in qmeta['layers'].items()},
                nbytes=quant.tree_nbytes(qtree))
  return widths, qtree, qmeta, report


class _MeanModel:
  """The BN-moments model of the ORIGINAL network, for ``udfc(..., bias_correction=True)``."""

  def __init__(self, spec, variables, problems, fold: str):
    self.units = list(spec.units)
    self.problems = list(problems)
    self.moments = moments_lib.propagate(spec, variables)
    self.E = moments_lib.activation_means(spec, variables, self.problems, moments=self.moments)
    self.consumers = bias_lib.consumer_terms(spec, variables, self.problems, self.moments)
    self.padding_aware = fold == 'padding_aware'
    self.sd, self.mean = [], []
    for p in self.problems:
      if p.unit.bn is None:
        mean, cov = moments_lib.dense_preactivation(p.W, self.moments[p.unit.name])
        self.sd.append(np.sqrt(np.maximum(np.diagonal(cov), 0.0)))
        self.mean.append(mean)
      else:
        self.sd.append(np.abs(p.bn['gamma']))
        self.mean.append(np.asarray(p.bn['beta'], np.float64))
    # A producer that is another unit's consumer reads only that unit's kept channels.
    self.reads = {p.unit.consumer: p.keep for p in self.problems}
    # Depthwise units (MobileNetV2): the depthwise conv reads act1(y) (ReLU6 clips at 6), the
    # consumer reads c = act2(BN2(z)); E[c] from BN2's marginals as in pruning.depthwise.
    self.clip: dict[int, float | None] = {}
    self.E_in: dict[int, np.ndarray] = {}
    self.E_out: dict[int, np.ndarray] = {}
    for i, p in enumerate(self.problems):
      if dfq_lib.depthwise_unit(p.unit) is None:
        continue
      t = depthwise_lib.block_terms(spec, variables, p)
      self.clip[i] = t.clip1
      self.E_in[i] = depthwise_lib.mean_second(self.mean[i], self.sd[i], t.clip1)[0]
      self.E_out[i] = depthwise_lib.output_means(t)

  def pruned_constant(self, index: int, S_P) -> np.ndarray | None:
    """c = E[a_P] - S'_P E[a_K], made padding-aware for surgery's all-taps fold (unless the
    plan folds through all taps). A depthwise unit: c = E[c_P] - S'_P E[c_K] with the consumer's
    input c = act2(BN2(z)) (pruning.depthwise's constant)."""
    p, E = self.problems[index], self.E_out.get(index, self.E[index])
    if not p.prune.size:
      return None
    c = E[p.prune] - np.asarray(S_P, np.float64) @ E[p.keep]
    if not self.padding_aware:
      return c
    return bias_lib.fold_constant(self.consumers[index], p.prune, c)

  def kept_shift(self, index: int, err_kernel, s) -> tuple[np.ndarray, int]:
    """Per kept channel, the shift of its pre-activation mean that gives s_k ReLU(z_hat_k) the
    original mean (:func:`mean_match`); ``err_kernel`` = quantized - deployed kept kernel. A
    depthwise unit: s_k act1(z_hat_k), the input of the depthwise conv (ReLU6: clipped means)."""
    p = self.problems[index]
    keep = p.keep
    x_mean = np.asarray(self.moments[p.unit.name].mean, np.float64)
    if p.unit.producer in self.reads:
      x_mean = x_mean[self.reads[p.unit.producer]]
    err = err_kernel.reshape(-1, err_kernel.shape[-2], err_kernel.shape[-1]).sum(axis=0)  # (C_in, m)
    if err.shape[0] != x_mean.shape[0]:
      raise ValueError(f'{p.unit.name}: the producer reads {err.shape[0]} input channels but the '
                       f'moment model has {x_mean.shape[0]}')
    alpha = np.asarray(p.bn['alpha'], np.float64)[keep] if p.unit.bn is not None else 1.0
    m_hat = self.mean[index][keep] + alpha * (x_mean @ err)
    target = self.E_in.get(index, self.E[index])[keep]
    m_star = mean_match(target, s, self.sd[index][keep], clip=self.clip.get(index))
    ok = np.isfinite(m_star)
    return np.where(ok, m_star - m_hat, 0.0), int((~ok).sum())


def _shift_producer(work, unit: units_lib.Unit, delta: np.ndarray) -> None:
  """Adds ``delta`` to the pre-activation of the unit's (already pruned) channels: the BN shift
  beta, or the producer bias without BN."""
  path = unit.bn if unit.bn is not None else unit.producer
  layer = dict(trees.get_path(work['params'], path))
  if layer.get('bias') is None:
    raise ValueError(f'{unit.name}: {path} has no bias to carry the mean correction')
  dt = np.asarray(layer['bias']).dtype
  layer['bias'] = (np.asarray(layer['bias'], np.float64) + delta).astype(dt)
  trees.set_path(work['params'], path, layer)


@register
@dataclasses.dataclass(frozen=True)
class UDFC(Quantizer):
  """UDFC-style compensation (docs/quantization.md): per-channel rescale of the kept channels
  and, with LBYL, the pruning delivery on the quantized kept filters (the joint path)."""

  name = 'udfc'
  summary = 'UDFC-style rescale (+ joint delivery with lbyl)'

  a1: float = option(DEFAULT_A1, help='UDFC BN-shift weight', check=NONNEG, advanced=True)
  a2: float = option(DEFAULT_A2, help='UDFC ridge weight', check=NONNEG, advanced=True)

  def joint_with(self, method_name: str) -> bool:
    return method_name == 'lbyl'

  def unsupported_units(self, spec) -> list[str]:
    """The base rule's units, less the inverted residuals' depthwise units
    (:func:`lbyl_jax.quant.dfq.depthwise_unit`: the rescale folds into the depthwise kernel)."""
    return dfq_lib.not_depthwise(spec, super().unsupported_units(spec))

  def quantize(self, spec, variables, *, keep_8bit, context):
    """The pruned network's quantization compensation (docs/quantization.md, rescale), nothing pruned here."""
    sel = selection_lib.Selection(ratio=0.0, criterion=context['selection'].criterion,
                                  bn_sigma=context['selection'].bn_sigma)
    _, qtree, qmeta, report = udfc(spec, variables, bits=self.bits, selection=sel, a1=self.a1,
                                   a2=self.a2, per_channel=self.per_channel,
                                   symmetric=self.symmetric, keep_8bit=keep_8bit)
    return QuantResult(qtree, qmeta, report)

  def joint(self, spec, variables, *, selection, keep_8bit, bias_correction: str, bias_fold: str
            ) -> tuple[tuple[int, ...], QuantResult]:
    """Pruning + quantization together (docs/quantization.md, joint delivery): the ORIGINAL variables in, the plan's selection.

    The inverted residuals' depthwise units (MobileNetV2, :func:`lbyl_jax.quant.dfq.depthwise_unit`)
    get the composite delivery of :mod:`lbyl_jax.pruning.depthwise` on their kept channels with
    quantized expansion filters and rescaled depthwise filters (:func:`depthwise_delivery`).

    Raises:
      ValueError: units with per-channel layers in between that are not such depthwise units.
    """
    odd = [u.name for u in spec.units if u.through and dfq_lib.depthwise_unit(u) is None]
    if odd:
      raise ValueError(
          f'--quant-method udfc with --method lbyl (the joint pruning delivery on quantized '
          f'filters) handles plain units and the inverted residuals\' depthwise units; '
          f'{spec.name} has other units with per-channel layers in between '
          f'({", ".join(odd[:3])}, ...). Use --quant-method udfc with --ratio 0 or another --method '
          '(nm, bnm, prune), or --quant-method dfq / rtn / omse / squant with --method lbyl')
    if bias_correction == 'on' and spec.family not in moments_lib.NETWORK_MODEL_FAMILIES:
      raise ValueError(
          f'--quant-method udfc with --method lbyl and --bias-correction on (the default): its '
          f'mean terms need the network-level BN-moment model, which exists for the preset '
          f'families only ({spec.name} is a {spec.family!r} model). Pass --bias-correction off '
          f"(API: bias_correction='off'), or use --method prune / nm / bnm, or --quant-method "
          'dfq / dfmpc / rtn / omse / squant')
    widths, qtree, qmeta, report = udfc(
        spec, variables, bits=self.bits, selection=selection, a1=self.a1, a2=self.a2,
        per_channel=self.per_channel, symmetric=self.symmetric, keep_8bit=keep_8bit,
        bias_correction=bias_correction == 'on', bias_fold=bias_fold)
    return widths, QuantResult(qtree, qmeta, report)
