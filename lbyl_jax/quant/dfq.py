"""DFQ: data-free quantization baseline (Nagel et al. 2019; docs/quantization.md#dfq).

Steps, each a pure function over variable trees:

1. :func:`fold_bn` folds every BatchNorm into the conv / dense before it. Our Flax models keep
   their BN modules, so the fold leaves each BN in an *identity form*: scale 1, mean 0 and
   ``var = float32(1 - 1e-5)``, for which ``var + eps`` is exactly 1.0 in float32 (checked at
   import) and BN(z) = z + bias. The folded bias ``beta + alpha (bias - mu)`` lives in the BN's
   bias; a conv bias (torchvision VGG) is zeroed. The folded network computes the same function.
2. :func:`equalize` (cross-layer equalization) rescales every producer / consumer pair joined by a
   ReLU: the prunable units of :mod:`lbyl_jax.models.archs` plus the VGG classifier chain
   (:func:`cle_pairs`). Max- and average-pools commute with positive per-channel scales, and a
   dense consumer after an NCHW flatten has its channel's column block scaled.
3. :func:`absorb_bias` (optional, off by default) moves ``c = max(0, beta - 3 gamma)`` from a
   producer into its consumer's bias.
4. Quantization with :func:`lbyl_jax.quant.uniform.quantize_tree` (DFQ's paper: per-tensor asymmetric).
5. :func:`bias_correct` removes the expected output shift ``eps . E[x]`` of each consumer whose
   input statistics are known from its producer's BN: ``E[x] = E[ReLU(y)]``,
   ``y ~ N(beta, gamma^2)`` (tracked through the fold / CLE / absorption).

Bias correction is applied only where that expectation is known:
- the stem (its input is the image, whose statistics are not a BN's) is skipped, which is the
  zero-mean assumption for a normalized input;
- a consumer behind a max-pool is skipped (the mean of a max of correlated rectified Gaussians
  is not determined by per-position BN statistics); behind an average pool it is exact;
- layers reading a residual sum (block inputs, shortcuts, the resnet head) and layers whose
  producer has no BN (LeNet) are skipped.
Zero-padded borders are ignored, as in DFQ.

MobileNetV2 (units with a depthwise "through" layer, :func:`through_pairs`; docs/quantization.md,
"DFQ and UDFC-style on MobileNetV2"): the BN fold is exact everywhere; cross-layer equalization
is exact only across positively homogeneous activations and ReLU6 is not (DFQ's paper replaces
ReLU6 by ReLU for its MobileNetV2 runs, which our model cannot), so these units are NOT
equalized (``report['cle_skipped']``); bias correction is exact for them and applied on both
pairs of the unit: expansion -> depthwise (a depthwise consumer's error reaches only its own
channel) and depthwise -> projection, with ``E[ReLU6(y)] = E[ReLU(y)] - E[ReLU(y - 6)]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from lbyl_jax.core import trees
from lbyl_jax.core import units as units_lib
from lbyl_jax.core.bn import BN_EPS
from lbyl_jax.pruning.moments import clipped_relu_mean
from lbyl_jax.models import trace
from lbyl_jax.quant import uniform as quant
from lbyl_jax.quant.base import QuantResult, Quantizer, register

IDENTITY_VAR = np.float32(1.0) - np.float32(BN_EPS)
# The identity form must be exact in float32, the dtype Flax evaluates BN in.
if IDENTITY_VAR + np.float32(BN_EPS) != np.float32(1.0):
  raise RuntimeError('float32(1 - eps) + eps != 1: the BN identity form would not be exact')

# Per folded layer: the BN-implied distribution of its output, {'mean': ..., 'std': ...}.
Stats = Mapping[str, Mapping[str, np.ndarray]]


# --------------------------------------------------------------------------------------------
# Small tree helpers (float64 working copies).


def _f64_tree(tree):
  return trees.copy_tree(tree, lambda x: np.array(x, np.float64))


def _f32_tree(tree):
  return trees.copy_tree(tree, lambda x: np.asarray(x, np.float32))


def _layer(variables, path):
  return trees.get_path(variables['params'], path)


# --------------------------------------------------------------------------------------------
# Pairs.


def act_mean(mean, std, activation: str = 'relu') -> np.ndarray:
  """E[act(y)], y ~ N(mean, std^2): ReLU, or ReLU6 = ReLU(y) - ReLU(y - 6) (``'relu6'``; any
  other name is taken as ReLU, the rule DFQ always applied)."""
  return clipped_relu_mean(mean, std, 6.0 if activation == 'relu6' else None)


def not_depthwise(spec, names: Sequence[str]) -> list[str]:
  """``names`` (units of ``spec``) less the inverted residuals' depthwise units
  (:func:`depthwise_unit`), which DFQ and UDFC-style handle through the depthwise conv."""
  by_name = {u.name: u for u in spec.units}
  return [n for n in names if depthwise_unit(by_name[n]) is None]


def depthwise_unit(unit: units_lib.Unit) -> units_lib.Through | None:
  """The depthwise layer of a unit DFQ / UDFC handle through it (an inverted residual's
  expansion: 'depthwise' compensation, one depthwise through layer (and its BN) at offset 0,
  plain consumers,
  ReLU / ReLU6 on both sides), or None."""
  if unit.compensation != 'depthwise' or any(t.offset for t in unit.through):
    return None
  dws = [t for t in unit.through if t.kind == 'depthwise']
  if len(dws) != 1 or len(unit.through) > 2:  # the depthwise conv, and its BN
    return None
  t = dws[0]
  if unit.activation not in ('relu', 'relu6') or unit.through_activation not in ('relu', 'relu6'):
    return None
  if any(c.offset or c.flatten_order != 'nchw' or c.scale != 1.0 or c.kind != 'conv'
         or c.through != unit.through for c in unit.consumers):
    return None
  return t


def through_pairs(spec, bn_of: Mapping[str, str] | None = None) -> tuple[units_lib.Unit, ...]:
  """Bias-correction pairs of the depthwise units (:func:`depthwise_unit`): producer ->
  depthwise conv (the unit's activation) and depthwise conv -> each consumer (the activation after
  the depthwise conv's BN), as plain one-consumer units with ``activation`` set."""
  bn_of = {} if bn_of is None else bn_of
  pairs = []
  for u in spec.units:
    t = depthwise_unit(u)
    if t is None:
      continue
    pairs.append(units_lib.Unit.of(f'{u.name}>{t.path}', u.producer, u.bn, t.path, 'conv',
                                   activation=u.activation))
    for c in u.consumers:
      pairs.append(units_lib.Unit.of(f'{t.path}>{c.path}', t.path, bn_of.get(t.path), c.path,
                                     'conv', activation=u.through_activation))
  return tuple(pairs)


def cle_pairs(spec) -> tuple[units_lib.Unit, ...]:
  """Producer -> ReLU -> consumer pairs for equalization and bias correction: the prunable units
  (docs/README.md#which-layers-are-pruned) plus the VGG classifier chain (fc1 -> fc2 (-> fc3))."""
  pairs = list(spec.units)
  if spec.family == 'vgg_cifar':
    pairs.append(units_lib.Unit.of('fc1', 'fc1', 'bn_fc1', 'fc2', 'dense'))
  elif spec.family == 'vgg':
    pairs.append(units_lib.Unit.of('fc1', 'fc1', None, 'fc2', 'dense'))
    pairs.append(units_lib.Unit.of('fc2', 'fc2', None, 'fc3', 'dense'))
  return tuple(pairs)


def _bn_map(spec, bn_of: Mapping[str, str] | None) -> Mapping[str, str]:
  """Layer -> the BN reading its output: given, or traced from ``spec`` (None with explicit pairs
  and no BN anywhere, e.g. for a hand-built toy network)."""
  if bn_of is not None:
    return bn_of
  if spec is None:
    raise ValueError('pass spec, or bn_of together with pairs')
  return trace.trace_layers(spec).bn


def _out_bias_owner(variables, path: str, bn_of: Mapping[str, str]) -> tuple[dict, str]:
  """The (dict, key) holding the additive output bias of a (folded) layer."""
  if path in bn_of:
    return trees.get_path(variables['params'], bn_of[path]), 'bias'
  layer = _layer(variables, path)
  if 'bias' not in layer:
    raise ValueError(f'{path}: has neither a BN nor a bias to receive a bias shift')
  return layer, 'bias'


def _consumer_in_view(kernel: np.ndarray, unit: units_lib.Unit, n: int) -> np.ndarray:
  """The consumer kernel as (N, taps, out): input channel i first (a view-compatible copy)."""
  if unit.consumer_kind == 'conv':
    if kernel.ndim == 4 and kernel.shape[2] == 1 and kernel.shape[3] == n and n > 1:
      # depthwise: input channel i reaches output channel i only (a diagonal in (i, o))
      taps = kernel.reshape(-1, n).T  # (n, taps)
      out = np.zeros((n, taps.shape[1], n), taps.dtype)
      out[np.arange(n), :, np.arange(n)] = taps
      return out
    return np.transpose(kernel, (2, 0, 1, 3)).reshape(n, -1, kernel.shape[-1])
  if kernel.shape[0] != n * unit.flatten:
    raise ValueError(f'{unit.consumer}: expected {n * unit.flatten} inputs, got {kernel.shape[0]}')
  return kernel.reshape(n, unit.flatten, kernel.shape[-1])  # NCHW flatten: channel-major blocks


# --------------------------------------------------------------------------------------------
# 1. BN folding.


def fold_bn(spec, variables: Mapping[str, Any], *, bn_of: Mapping[str, str] | None = None
            ) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
  """Folds every BN into the layer that feeds it (docs/quantization.md#dfq-bias-correction step 1), leaving BN in identity form.

  Returns:
    ``(folded, stats)``: float32 variables computing the same function, and per folded layer the
    BN-implied distribution of its output, ``{'mean': beta, 'std': |gamma|}`` (float64).
  """
  bn_of = _bn_map(spec, bn_of)
  v = _f64_tree(variables)
  stats = {}
  for path, bn_path in bn_of.items():
    layer = _layer(v, path)
    bnp = trees.get_path(v['params'], bn_path)
    bns = trees.get_path(v['batch_stats'], bn_path)
    alpha = bnp['scale'] / np.sqrt(bns['var'] + BN_EPS)
    bias = layer['bias'] if 'bias' in layer else 0.0
    layer['kernel'] = layer['kernel'] * alpha
    b = bnp['bias'] + alpha * (bias - bns['mean'])
    if 'bias' in layer:
      layer['bias'] = np.zeros_like(layer['bias'])
    stats[path] = {'mean': np.array(bnp['bias']), 'std': np.abs(bnp['scale'])}
    bnp['scale'] = np.ones_like(b)
    bnp['bias'] = b
    bns['mean'] = np.zeros_like(b)
    bns['var'] = np.full_like(b, IDENTITY_VAR)
  return _f32_tree(v), stats


# --------------------------------------------------------------------------------------------
# 2. Cross-layer equalization.


def channel_ranges(variables, unit: units_lib.Unit) -> tuple[np.ndarray, np.ndarray]:
  """``r1_i = max|W1[i]|`` (producer output channel) and ``r2_i = max|W2[:, i]|`` (consumer input
  channel, over all kernel taps / flatten positions)."""
  w1 = np.asarray(_layer(variables, unit.producer)['kernel'], np.float64)
  n = w1.shape[-1]
  r1 = np.max(np.abs(w1.reshape(-1, n)), axis=0)
  w2 = np.asarray(_layer(variables, unit.consumer)['kernel'], np.float64)
  r2 = np.max(np.abs(_consumer_in_view(w2, unit, n)), axis=(1, 2))
  return r1, r2


def _is_depthwise(kernel) -> bool:
  shape = np.shape(kernel)
  return len(shape) == 4 and shape[2] == 1 and shape[3] > 1


def _absmax_matrix(kernel: np.ndarray, block: int) -> np.ndarray:
  """``M[j, i] = max |W[taps, j, i]|`` over kernel taps (conv) or over the ``block`` flatten
  positions of input channel j (dense): all that CLE needs of a kernel."""
  k = np.abs(np.asarray(kernel))
  if _is_depthwise(k):  # input channel i reaches output channel i only: a diagonal
    return np.diag(np.max(k[:, :, 0, :], axis=(0, 1))).astype(np.float64)
  if k.ndim == 4:
    return np.max(k, axis=(0, 1)).astype(np.float64)
  return np.max(k.reshape(k.shape[0] // block, block, k.shape[1]), axis=1).astype(np.float64)


def equalize(spec, variables: Mapping[str, Any], *, stats: Stats | None = None,
             pairs: Iterable[units_lib.Unit] | None = None, bn_of: Mapping[str, str] | None = None,
             tol: float = 1e-8, max_iter: int = 1000) -> tuple[dict[str, Any], dict[str, Any]]:
  """Cross-layer equalization (docs/quantization.md#cross-layer-equalization) of BN-folded variables.

  For every pair and channel i, ``s_i = sqrt(r1_i / r2_i)``; ``W1[i] /= s_i``, the producer's output
  bias ``/= s_i``, ``W2[:, i] *= s_i``, so both ranges become ``sqrt(r1_i r2_i)``. Sweeps repeat
  until every scale of a sweep is within ``tol`` of 1 (or ``max_iter`` sweeps).

  The sweeps run on per-layer abs-max matrices (C_in x C_out) with the accumulated per-channel
  scales kept apart, since ``max|c_j W_ji d_i| = d_i max_j c_j |W_ji|`` for positive scales; the
  kernels are rescaled once at the end, in float64.

  Args:
    spec: the architecture (pairs default to :func:`cle_pairs`).
    variables: BN-folded variables (:func:`fold_bn`); a producer must have a folded BN or a bias.
    stats: the output distributions from :func:`fold_bn`; returned rescaled (std, mean / s).
    pairs, bn_of: override the pair list and the layer -> BN map (``spec`` may then be None).
    tol, max_iter: convergence control.

  Returns:
    ``(variables, info)``; info = {iterations, converged, max_scale_change, stats, scale_range}.
  """
  bn_of = _bn_map(spec, bn_of)
  pairs = tuple(cle_pairs(spec) if pairs is None else pairs)
  block = {u.consumer: u.flatten if u.consumer_kind == 'dense' else 1 for u in pairs}
  layers = sorted({u.producer for u in pairs} | {u.consumer for u in pairs})
  M = {p: _absmax_matrix(_layer(variables, p)['kernel'], block.get(p, 1)) for p in layers}
  cin = {p: np.ones(M[p].shape[0]) for p in layers}   # input-channel multipliers
  cout = {p: np.ones(M[p].shape[1]) for p in layers}  # output-channel multipliers
  for u in pairs:
    if M[u.producer].shape[1] != M[u.consumer].shape[0]:
      raise ValueError(f'{u.name}: {u.producer} has {M[u.producer].shape[1]} outputs but '
                       f'{u.consumer} reads {M[u.consumer].shape[0]} channels')
  change = np.inf
  it = 0
  while it < max_iter and change > tol:
    change = 0.0
    for u in pairs:
      p, c = u.producer, u.consumer
      r1 = np.max(M[p] * cin[p][:, None], axis=0) * cout[p]
      r2 = np.max(M[c] * cout[c][None, :], axis=1) * cin[c]
      ok = (r1 > 0) & (r2 > 0)  # a dead channel keeps s = 1
      s = np.where(ok, np.sqrt(np.where(ok, r1, 1.0) / np.where(ok, r2, 1.0)), 1.0)
      change = max(change, float(np.max(np.abs(s - 1.0))))
      cout[p] = cout[p] / s
      cin[c] = cin[c] * s
    it += 1
  v = _f64_tree(variables)
  for p in layers:
    layer = _layer(v, p)
    k = layer['kernel']
    rin = np.repeat(cin[p], block.get(p, 1))
    if _is_depthwise(k):
      layer['kernel'] = k * (rin * cout[p])
    else:
      layer['kernel'] = k * (rin[None, None, :, None] if k.ndim == 4 else rin[:, None]) * cout[p]
  for u in pairs:
    owner, key = _out_bias_owner(v, u.producer, bn_of)
    owner[key] = owner[key] * cout[u.producer]
  st = {}
  for k, d in (stats or {}).items():
    f = cout.get(k, 1.0)
    st[k] = {'mean': np.asarray(d['mean'], np.float64) * f, 'std': np.asarray(d['std'], np.float64) * f}
  allc = np.concatenate([cout[u.producer] for u in pairs]) if pairs else np.ones(1)
  return _f32_tree(v), dict(iterations=it, converged=change <= tol, max_scale_change=change,
                            stats=st, scale_range=(float(1 / allc.max()), float(1 / allc.min())))


# --------------------------------------------------------------------------------------------
# 3. Bias absorption.


def absorb_bias(spec, variables: Mapping[str, Any], stats: Stats, *,
                pairs: Iterable[units_lib.Unit] | None = None, bn_of: Mapping[str, str] | None = None,
                n_std: float = 3.0) -> tuple[dict[str, Any], Stats, dict[str, float]]:
  """Bias absorption (docs/quantization.md#bias-absorption): ``c = max(0, beta - 3 gamma)`` leaves the producer and enters
  the consumer's bias as ``W2 c`` (summed over taps). Exact wherever the pre-activation stays
  above ``c``; zero-padded borders and pools are ignored, as in DFQ.

  Returns:
    ``(variables, stats, absorbed)``: updated variables and producer statistics (mean - c), and
    the total absorbed amount per producer.
  """
  bn_of = _bn_map(spec, bn_of)
  pairs = tuple(cle_pairs(spec) if pairs is None else pairs)
  v = _f64_tree(variables)
  st = {k: {'mean': np.array(d['mean']), 'std': np.array(d['std'])} for k, d in stats.items()}
  absorbed = {}
  for unit in pairs:
    if unit.producer not in st or unit.pool == 'max':
      continue  # no distribution (no BN), or a max-pool that a constant shift would not commute with
    c = np.maximum(0.0, st[unit.producer]['mean'] - n_std * st[unit.producer]['std'])
    owner, key = _out_bias_owner(v, unit.producer, bn_of)
    owner[key] = owner[key] - c
    st[unit.producer]['mean'] = st[unit.producer]['mean'] - c
    w2 = _consumer_in_view(_layer(v, unit.consumer)['kernel'], unit, c.size)
    cons_owner, cons_key = _out_bias_owner(v, unit.consumer, bn_of)
    cons_owner[cons_key] = cons_owner[cons_key] + np.einsum('ito,i->o', w2, c)
    absorbed[unit.producer] = float(np.sum(c))
  return _f32_tree(v), st, absorbed


# --------------------------------------------------------------------------------------------
# 5. Bias correction.


def bias_correct(spec, float_variables: Mapping[str, Any], qtree: Mapping[str, Any],
                 qmeta: Mapping[str, Any], stats: Stats, *,
                 pairs: Iterable[units_lib.Unit] | None = None,
                 bn_of: Mapping[str, str] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
  """Analytic bias correction (docs/quantization.md#dfq-bias-correction) of a quantized tree.

  For each consumer whose input is ``ReLU(y)`` (``ReLU6(y)`` for a pair whose ``activation`` is
  'relu6', :func:`act_mean`; a depthwise consumer reaches only its own channel) of a producer with known ``y ~ N(mean, std^2)``:
  ``eps = What - W`` and the consumer's output bias (its folded BN's bias, or its own bias)
  ``-= sum_{taps, i} eps[.., i, o] E[ReLU(y_i)]``.

  Args:
    float_variables: the float (folded, equalized) variables that were quantized.
    qtree, qmeta: their quantization (:func:`lbyl_jax.quant.uniform.quantize_tree`).
    stats: producer output distributions (from :func:`fold_bn` / :func:`equalize`).

  Returns:
    ``(qtree, status)``: a corrected copy of ``qtree`` and, per consumer considered, 'corrected'
    or the reason it was skipped.
  """
  bn_of = _bn_map(spec, bn_of)
  pairs = tuple(cle_pairs(spec) if pairs is None else pairs)
  out = trees.copy_arrays(qtree)
  deq = quant.dequantize_tree(qtree, qmeta)
  status = {}
  for unit in pairs:
    if unit.consumer not in qmeta['layers']:
      status[unit.consumer] = 'skipped: not quantized'
      continue
    if unit.producer not in stats:
      status[unit.consumer] = 'skipped: producer has no BN statistics'
      continue
    if unit.pool == 'max':
      status[unit.consumer] = 'skipped: max-pool between producer and consumer'
      continue
    ex = act_mean(stats[unit.producer]['mean'], stats[unit.producer]['std'], unit.activation)
    w = np.asarray(_layer(float_variables, unit.consumer)['kernel'], np.float64)
    wq = np.asarray(_layer(deq, unit.consumer)['kernel'], np.float64)
    eps = _consumer_in_view(wq - w, unit, ex.size)
    shift = np.einsum('ito,i->o', eps, ex)
    owner, key = _out_bias_owner(out, unit.consumer, bn_of)
    owner[key] = (np.asarray(owner[key], np.float64) - shift).astype(np.float32)
    status[unit.consumer] = 'corrected'
  return out, status


# --------------------------------------------------------------------------------------------
# Driver.


def dfq(spec, variables: Mapping[str, Any], *, bits: int = 8, per_channel: bool = False,
        symmetric: bool = False, cle: bool = True, bias_absorption: bool = False,
        bias_correction: bool = True, keep_8bit: Iterable[str] = (), cle_tol: float = 1e-8,
        cle_max_iter: int = 1000, relu6_cle: bool = False
        ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
  """DFQ (docs/quantization.md#dfq): fold BN, equalize, (absorb), quantize, bias-correct.

  Defaults follow the DFQ paper's per-tensor asymmetric weights; pass ``per_channel=True,
  symmetric=True`` for the protocol used with UDFC (docs/quantization.md#udfc-defaults). Works on pruned variables too (the
  widths are read from the arrays).

  Returns:
    ``(qtree, qmeta, report)``; ``quant.dequantize_tree(qtree, qmeta)`` are float variables of the
    same model (BNs in identity form). The report holds CLE convergence, absorption amounts,
    per-layer bias-correction status and quantization errors.
  """
  qtree, qmeta, report, _ = _dfq(spec, variables, bits=bits, per_channel=per_channel,
                                 symmetric=symmetric, cle=cle, bias_absorption=bias_absorption,
                                 bias_correction=bias_correction, keep_8bit=keep_8bit,
                                 cle_tol=cle_tol, cle_max_iter=cle_max_iter, relu6_cle=relu6_cle)
  return qtree, qmeta, report


def _dfq(spec, variables, *, bits, per_channel, symmetric, cle, bias_absorption, bias_correction,
         keep_8bit, cle_tol, cle_max_iter, relu6_cle=False):
  """:func:`dfq`, plus the folded layers' output statistics it tracked (layer path -> mean, std;
  after equalization and absorption). ``relu6_cle``: also equalize the depthwise units' pairs
  across their ReLU6 (NOT exact: ReLU6(y / s) s clips at 6 s; the development-split comparison
  of docs/quantization.md rejected it)."""
  bits = quant.check_bits(bits, where='dfq')
  bn_of = trace.trace_layers(spec).bn
  folded, stats = fold_bn(spec, variables, bn_of=bn_of)
  report: dict[str, Any] = dict(method='dfq', bits=bits, per_channel=per_channel, symmetric=symmetric,
                                cle=cle, bias_absorption=bias_absorption,
                                bias_correction=bias_correction)
  # Depthwise units (MobileNetV2): no equalization / absorption across ReLU6, bias correction on
  # both of their pairs (module docstring).
  plain = tuple(u for u in cle_pairs(spec) if not u.through)
  extra = through_pairs(spec, bn_of)
  if extra and not relu6_cle:
    report['cle_skipped'] = {u.name: 'ReLU6 / depthwise unit: equalization is exact only across '
                             'positively homogeneous activations' for u in spec.units if u.through}
  if cle:
    folded, info = equalize(spec, folded, stats=stats, pairs=plain + (extra if relu6_cle else ()),
                            bn_of=bn_of, tol=cle_tol, max_iter=cle_max_iter)
    stats = info.pop('stats')
    report['cle'] = info
  if bias_absorption:
    folded, stats, absorbed = absorb_bias(spec, folded, stats, pairs=plain, bn_of=bn_of)
    report['absorbed'] = absorbed
  qtree, qmeta = quant.quantize_tree(folded, bits=bits, per_channel=per_channel,
                                     symmetric=symmetric, keep_8bit=keep_8bit)
  if bias_correction:
    qtree, status = bias_correct(spec, folded, qtree, qmeta, stats, pairs=plain + extra,
                                 bn_of=bn_of)
    report['bias_correction_status'] = status
  report['layer_errors'] = {p: d['rel_error'] for p, d in qmeta['layers'].items()}
  return qtree, qmeta, report, stats


@register
@dataclasses.dataclass(frozen=True)
class DFQ(Quantizer):
  """DFQ (Nagel et al., ICCV 2019): BN fold, cross-layer equalization, quantization, bias
  correction (docs/quantization.md). In a plan it uses the plan's quantizer options (per-channel
  symmetric by default); :func:`dfq` alone defaults to the paper's per-tensor asymmetric grid."""

  name = 'dfq'
  summary = 'DFQ: BN fold, equalization, bias correction'

  def unsupported_units(self, spec) -> list[str]:
    """The base rule's units, less the inverted residuals' depthwise units
    (:func:`depthwise_unit`: folded, not equalized, bias-corrected)."""
    return not_depthwise(spec, super().unsupported_units(spec))

  def quantize(self, spec, variables, *, keep_8bit, context):
    del context
    qtree, qmeta, report, stats = _dfq(
        spec, variables, bits=self.bits, per_channel=self.per_channel, symmetric=self.symmetric,
        cle=True, bias_absorption=False, bias_correction=True, keep_8bit=keep_8bit,
        cle_tol=1e-8, cle_max_iter=1000)
    return QuantResult(qtree, qmeta, report, output_stats=stats)
