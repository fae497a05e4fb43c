"""Activation quantization: fake-quantized inputs of every quantized layer, with stored ranges.

Every ``nn.Conv`` / ``nn.Dense`` call whose layer path has a range sees its first argument
replaced by ``Delta clip(round(x / Delta), qmin, qmax)`` (per tensor, float32, round half to even):

- unsigned (inputs after a ReLU, range [0, hi]): ``Delta = hi / (2^b - 1)``, q in [0, 2^b - 1];
- symmetric (anything else, here the normalized image; range [lo, hi]): ``a = max(|lo|, |hi|)``,
  ``Delta = a / (2^(b-1) - 1)``, q in [-(2^(b-1) - 1), 2^(b-1) - 1].

The model classes are untouched: :func:`forward` runs ``model.apply`` inside
``flax.linen.intercept_methods``, and the per-layer ``Delta, qmin, qmax`` travel as an extra
variable collection ``'act_quant'`` (nested like ``'params'``; :func:`attach`), so they are runtime
data: one jitted executable serves every range set and bit width of a model. Layer policy as for
weights: the layers in ``keep_8bit`` (the first layer, which reads the image, and the classifier,
``trace.first_and_last_layers``) get 8-bit inputs.

Ranges (:class:`ActRanges`, JSON-serializable for the checkpoint's meta,
:func:`act_ranges_to_json`):

(a) :func:`bn_ranges`, data-free, the default -- DFQ's rule (Nagel et al. 2019): a layer input
    that is ``ReLU(y)`` of a BN output ``y_c ~ N(beta_c, gamma_c^2)`` gets
    ``hi = max_c max(0, beta_c + k |gamma_c|)``, i.e. the Phi(k) quantile of every channel under
    the BN model (ReLU is monotone). Where the input is not one BN's output the same quantile is
    taken under the BN-moments model of :func:`lbyl_jax.pruning.moments.propagate` (docs/bn_moments.md):
    * after a residual add + ReLU: the pre-activation ``N(beta_out + m_sc, gamma_out^2 + v_sc)``
      (independent branch and shortcut; identity shortcut: the block input's rectified mean and
      variance; option-A: zero-padded; projection: its BN's ``N(beta, gamma^2)``) -- exactly the
      Gaussian that ``moments.propagate`` rectifies;
    * after a k-window max-pool of ReLU(BN) (VGG, the torchvision stem): the Phi(k) quantile of
      the max of w iid copies, ``beta + |gamma| Phi^{-1}(Phi(k)^(1/w))``;
    * after an average pool (the heads, the CIFAR VGG's 2x2 pool): the per-element bound above (an
      average never exceeds it);
    * BN-free dense producers (LeNet, torchvision VGG's classifier): ``y = W x + b`` with the
      propagated mean and covariance (``moments.dense_preactivation``), per unit diagonal;
    * the first layer's input is the normalized image: exactly ``[(0 - mean) / std, (1 - mean) /
      std]`` over channels (no k).
    * a user's model (``spec.family == 'custom'``): the same rules on its traced graph,
      :mod:`lbyl_jax.quant.act_graph`.
    ``bn_gaussians`` overrides the BN output distribution per BN path (DFQ's folded networks keep
    their BNs as identities: pass the distributions DFQ tracked, :func:`dfq_bn_gaussians`).
(b) :func:`distilled_ranges`: the observed ranges on BN-distilled inputs (:mod:`lbyl_jax.experimental.distill`,
    ZeroQ-style): data-free.
(c) :func:`calibration_ranges`: the observed ranges on unlabelled user images: NOT data-free
    (``ActRanges.data_free`` is False and reports must say so).

Observed ranges (b, c): per layer input and batch the minimum and the ``percentile`` of the values
(of ``|x|`` for inputs with negative values); ``percentile=100`` (default) is the min / max over
all batches, otherwise the per-batch percentiles are averaged over batches. An input whose minimum
is >= 0 is unsigned.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lbyl_jax.core import trees
from lbyl_jax.core.options import Options, number, option
from lbyl_jax.core import units as units_lib
from lbyl_jax.experimental import distill as distill_lib
from lbyl_jax.io import checkpoint
from lbyl_jax.io import export as export_lib
from lbyl_jax.models import archs
from lbyl_jax.models import trace
from lbyl_jax.pruning import moments as moments_lib
from lbyl_jax.pruning import terms
from lbyl_jax.quant import act_graph
from lbyl_jax.quant import uniform as quant

COLLECTION = 'act_quant'
FORMAT = 'act_ranges'
VERSION = 1
MIN_BITS, MAX_BITS = 2, 8
SOURCES = ('bn', 'distilled', 'calibration')
# k of the BN rule per activation bit width, chosen on the development split (CIFAR-10 test images
# 0-4999; float weights, the three CIFAR ResNets, k in 2, 3, 4, 5, 6, 8, highest mean top-1:
# branch h-quant commit 88a9803: benchmarks/probes/quant_methods.py --phase dev, and its log
# benchmarks/results/quant_methods_dev.log; the probe is not ported to this layout). Other
# widths use the nearest entry below (2-3 bits: the 4-bit k).
DEFAULT_K = {4: 4.0, 6: 6.0, 8: 8.0}


def default_k(bits: int) -> float:
  """The BN rule's k for ``bits``-bit activations (:data:`DEFAULT_K`)."""
  bits = check_bits(bits)
  below = [b for b in DEFAULT_K if b <= bits]
  return DEFAULT_K[max(below) if below else min(DEFAULT_K)]


def check_bits(bits: int, *, where: str = 'act_bits') -> int:
  if isinstance(bits, bool) or int(bits) != bits or not MIN_BITS <= int(bits) <= MAX_BITS:
    raise ValueError(f'{where}: activation bits must be an integer in [{MIN_BITS}, {MAX_BITS}], '
                     f'got {bits!r}')
  return int(bits)


@dataclasses.dataclass(frozen=True)
class ActRange:
  """The range of one layer's input: ``[lo, hi]``; unsigned (lo == 0) or symmetric."""

  lo: float
  hi: float
  signed: bool

  def __post_init__(self):
    if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo <= self.hi):
      raise ValueError(f'activation range must be finite with lo <= hi, got [{self.lo}, {self.hi}]')
    if not self.signed and self.lo != 0.0:
      raise ValueError(f'an unsigned activation range starts at 0, got lo={self.lo}')


@dataclasses.dataclass(frozen=True)
class ActRanges:
  """Per-layer input ranges and where they came from.

  Attributes:
    layers: layer path (as in ``variables['params']``) -> :class:`ActRange`.
    source: 'bn' (data-free BN rule), 'distilled' (data-free) or 'calibration' (user images).
    data_free: False only for 'calibration'.
    info: JSON-serializable details (k, distillation loss, number of images, percentile, ...).
  """

  layers: Mapping[str, ActRange]
  source: str
  data_free: bool
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ValueError(f'activation range source must be one of {", ".join(SOURCES)}, '
                       f'got {self.source!r}')
    if self.source == 'calibration' and self.data_free:
      raise ValueError('ranges calibrated on user images are not data-free')


# --------------------------------------------------------------------------------------------
# (a) The BN rule.


@dataclasses.dataclass(frozen=True)
class _Source:
  """What a layer reads: the image, or act(N(mean, std^2)) per channel (after a w-window max)."""

  kind: str  # 'image' | 'gauss'
  mean: np.ndarray | None = None
  std: np.ndarray | None = None
  relu: bool = True
  pool: int = 1
  cap: float | None = None  # ReLU6: the activation's upper bound


def _quantile_z(k: float, pool: int) -> float:
  """z with P(max of `pool` iid N(0,1) <= z) = Phi(k) (z = k for pool 1)."""
  if pool == 1:
    return float(k)
  from scipy import stats as sp_stats  # pylint: disable=import-outside-toplevel  (0.3 s to import)
  return float(sp_stats.norm.ppf(sp_stats.norm.cdf(k) ** (1.0 / pool)))


def _image_range(spec) -> ActRange:
  mean = np.asarray(spec.mean, np.float64)
  std = np.asarray(spec.std, np.float64)
  return ActRange(float(np.min((0.0 - mean) / std)), float(np.max((1.0 - mean) / std)), True)


def _source_range(src: _Source, k: float, spec) -> ActRange:
  if src.kind == 'image':
    return _image_range(spec)
  z = _quantile_z(k, src.pool)
  hi = src.mean + z * src.std
  if src.relu:
    top = float(max(0.0, np.max(hi)))
    return ActRange(0.0, top if src.cap is None else min(top, float(src.cap)), False)
  lo = src.mean - z * src.std
  return ActRange(float(np.min(lo)), float(np.max(hi)), True)


def _bn_gauss(variables, path: str, override) -> tuple[np.ndarray, np.ndarray]:
  if override is not None and path in override:
    mean, std = override[path]
    return np.asarray(mean, np.float64), np.abs(np.asarray(std, np.float64))
  p = trees.get_path(variables['params'], path)
  return np.asarray(p['bias'], np.float64), np.abs(np.asarray(p['scale'], np.float64))


def _relu_bn(variables, path, override, pool: int = 1) -> _Source:
  mean, std = _bn_gauss(variables, path, override)
  return _Source('gauss', mean, std, True, pool)


def _post_relu_moments(src: _Source) -> tuple[np.ndarray, np.ndarray]:
  return moments_lib.relu_mean_var(src.mean, src.std ** 2, src.pool)


def _dense_relu(W: np.ndarray, mom: moments_lib.InputMoments) -> _Source:
  """ReLU(y), y = W x + b (rows [w, bias]): ``moments.dense_preactivation`` with a full input
  covariance; with independent inputs only its diagonal ``sum_j w_ij^2 var_j`` is formed."""
  if mom.cov is not None:
    mean, cov = moments_lib.dense_preactivation(W, mom)
    var = np.diagonal(cov)
  else:
    c = mom.mean.shape[0]
    if W.shape[1] not in (c, c + 1):
      raise ValueError(f'dense producer with {W.shape[1]} columns cannot read {c} input channels')
    bias = W[:, c] if W.shape[1] == c + 1 else 0.0
    mean = W[:, :c] @ mom.mean + bias
    var = (W[:, :c] ** 2) @ mom.var
  return _Source('gauss', mean, np.sqrt(np.maximum(var, 0.0)), True, 1)


def _resnet_sources(spec, variables, override) -> dict[str, _Source]:
  params = variables['params']
  torchvision = spec.family == 'resnet'
  out = {'conv1': _Source('image')}
  x = _relu_bn(variables, 'bn1', override, 9 if torchvision else 1)  # torchvision: 3x3 max-pool
  for blk in moments_lib._blocks(params):  # pylint: disable=protected-access
    b = params[blk]
    out[f'{blk}/conv1'] = x
    if 'downsample_conv' in b:
      out[f'{blk}/downsample_conv'] = x
    out[f'{blk}/conv2'] = _relu_bn(variables, f'{blk}/bn1', override)
    out_bn = 'bn2'
    if 'conv3' in b:
      out[f'{blk}/conv3'] = _relu_bn(variables, f'{blk}/bn2', override)
      out_bn = 'bn3'
    beta, gamma = _bn_gauss(variables, f'{blk}/{out_bn}', override)
    planes = beta.shape[0]
    if 'downsample_bn' in b:
      m_sc, s_sc = _bn_gauss(variables, f'{blk}/downsample_bn', override)
      v_sc = s_sc ** 2
    else:
      m_in, v_in = _post_relu_moments(x)
      if planes != m_in.shape[0]:  # option A: subsample + zero-pad planes // 4 per side
        p = planes // 4
        if m_in.shape[0] + 2 * p != planes:
          raise ValueError(f'{blk}: option-A shortcut cannot map {m_in.shape[0]} to {planes} '
                           'channels')
        m_in, v_in = np.pad(m_in, (p, p)), np.pad(v_in, (p, p))
      m_sc, v_sc = m_in, v_in
    x = _Source('gauss', beta + m_sc, np.sqrt(gamma ** 2 + v_sc), True, 1)
  out['fc'] = x  # global average pool: the per-element bound
  return out


def _vgg_sources(spec, variables, override) -> dict[str, _Source]:
  out = {'conv0': _Source('image')}
  for u in spec.units:
    pool = 4 if u.pool == 'max' else 1
    out[u.consumer] = _relu_bn(variables, u.bn, override, pool)
  if spec.family == 'vgg_cifar':
    out['fc2'] = _relu_bn(variables, 'bn_fc1', override)
    return out
  last = spec.units[-1]  # conv12 -> (max-pool, adaptive avg pool) -> flatten -> fc1
  m, v = _post_relu_moments(_relu_bn(variables, last.bn, override, 4))
  mom = moments_lib.InputMoments(np.repeat(m, last.flatten), np.repeat(v, last.flatten))
  for prod, cons in (('fc1', 'fc2'), ('fc2', 'fc3')):
    unit = units_lib.Unit.of(prod, prod, None, cons, 'dense')
    src = _dense_relu(np.asarray(terms.filters(variables, unit), np.float64), mom)
    out[cons] = src
    mom = moments_lib.InputMoments(*_post_relu_moments(src))
  return out


def _mobilenet_sources(spec, variables, override) -> dict[str, _Source]:
  """MobileNetV2 (torchvision layout, ``spec.model.blocks()``): ReLU6(BN) inputs get the BN
  quantile capped at 6; a block's linear output ``BN(project)`` (+ the block input on a residual)
  is ``N(beta + m_x, gamma^2 + v_x)``, symmetric (the moments of ``moments.propagate``)."""
  def relu6(path):
    mean, std = _bn_gauss(variables, path, override)
    return _Source('gauss', mean, std, True, 1, 6.0)

  blocks = spec.model.blocks()
  out = {'features_0/conv': _Source('image')}
  x = relu6('features_0/bn')
  for b in blocks:
    n = b.name
    if b.expand:
      out[f'{n}/conv_0_0'] = x
      out[f'{n}/conv_1_0'] = relu6(f'{n}/conv_0_1')
      out[f'{n}/conv_2'] = relu6(f'{n}/conv_1_1')
    else:
      out[f'{n}/conv_0_0'] = x
      out[f'{n}/conv_1'] = relu6(f'{n}/conv_0_1')
    beta, gamma = _bn_gauss(variables, b.output_bn, override)
    if b.residual:
      if x.relu:  # a rectified block input: its mean and variance (ReLU's, an upper bound)
        m_x, v_x = _post_relu_moments(x)
      else:
        m_x, v_x = x.mean, x.std ** 2
      x = _Source('gauss', beta + m_x, np.sqrt(gamma ** 2 + v_x), False)
    else:
      x = _Source('gauss', beta, gamma, False)
  last = f'features_{len(blocks) + 1}'
  out[f'{last}/conv'] = x
  out['classifier_1'] = relu6(f'{last}/bn')  # global average pool: the per-element bound
  return out


def _mlp_sources(spec, variables) -> dict[str, _Source]:
  mom = moments_lib.propagate(spec, variables)
  out = {spec.units[0].producer: _Source('image')}
  for u in spec.units:
    out[u.consumer] = _dense_relu(np.asarray(terms.filters(variables, u), np.float64),
                                  mom[u.name])
  return out


def bn_ranges(spec, variables: Mapping[str, Any], *, k: float | None = None,
              bits: int | None = None,
              bn_gaussians: Mapping[str, tuple[Any, Any]] | None = None) -> ActRanges:
  """Data-free ranges of every conv / dense input from the BN statistics (module docstring, a).

  Args:
    spec: the architecture (families 'cifar_resnet', 'resnet', 'vgg_cifar', 'vgg', 'mlp',
      'mobilenet_v2'; a user's model, 'custom': :func:`lbyl_jax.quant.act_graph.graph_sources`).
    variables: the variables that will run (original, pruned or compensated).
    k: the rule's number of standard deviations; default :func:`default_k` of ``bits``.
    bits: the activation bit width the ranges are for (only used to pick the default k).
    bn_gaussians: BN path -> (mean, std) of that BN's output, overriding (beta, |gamma|).

  Raises:
    ValueError: neither k nor bits, k <= 0, an unknown family, or a layer without a source.
  """
  if k is None:
    if bits is None:
      raise ValueError('bn_ranges: give k or the activation bits (for the default k)')
    k = default_k(bits)
  if not (math.isfinite(k) and k > 0):
    raise ValueError(f'bn_ranges: k must be a positive number, got {k!r}')
  fam = spec.family
  if fam in ('cifar_resnet', 'resnet'):
    sources = _resnet_sources(spec, variables, bn_gaussians)
  elif fam in ('vgg_cifar', 'vgg'):
    sources = _vgg_sources(spec, variables, bn_gaussians)
  elif fam == 'mlp':
    sources = _mlp_sources(spec, variables)
  elif fam == 'mobilenet_v2':
    sources = _mobilenet_sources(spec, variables, bn_gaussians)
  elif fam == 'custom':  # a user's model: the same rule on its traced graph
    sources = act_graph.graph_sources(spec, variables, bn_gaussians)
  else:
    raise ValueError(f'{spec.name}: the BN range rule (--act-ranges bn) does not know family '
                     f'{fam!r}; use --act-ranges distilled (data-free) or --act-ranges calibration'
                     ' --calib-data SPEC (API: act_ranges=..., calib_images=...)')
  known = quant.kernel_paths(variables)
  missing = sorted(set(known) - set(sources))
  extra = sorted(set(sources) - set(known))
  if missing or extra:
    raise ValueError(f'{spec.name}: BN range rule layer mismatch: no source for {missing}, '
                     f'unknown layers {extra}')
  layers = {p: _source_range(sources[p], k, spec) for p in known}
  return ActRanges(layers, 'bn', True, dict(k=float(k)))


def dfq_bn_gaussians(spec, stats: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[Any, Any]]:
  """BN path -> (mean, std) from DFQ's per-folded-layer output statistics (``dfq.fold_bn`` /
  ``dfq.equalize`` / ``dfq.absorb_bias``), for :func:`bn_ranges` on a DFQ-folded network."""
  bn_of = trace.trace_layers(spec).bn
  return {bn_of[p]: (d['mean'], d['std']) for p, d in stats.items() if p in bn_of}


# --------------------------------------------------------------------------------------------
# (b), (c): observed ranges.


def _stats_fn(model, percentile: float):
  def fn(variables, x):
    out: dict[str, tuple] = {}

    def icpt(next_fun, args, kwargs, ctx):
      if ctx.method_name == '__call__' and isinstance(ctx.module, (nn.Conv, nn.Dense)) and args:
        a = jnp.asarray(args[0], jnp.float32)
        lo, hi = jnp.min(a), jnp.max(a)
        if percentile < 100.0:  # sorts: only when asked for
          out['/'.join(ctx.module.path)] = (lo, hi, jnp.percentile(a, percentile),
                                             jnp.percentile(jnp.abs(a), percentile))
        else:
          out['/'.join(ctx.module.path)] = (lo, hi, hi, jnp.maximum(hi, -lo))
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(icpt):
      model.apply(variables, x)
    return out

  return jax.jit(fn)


def observed_ranges(spec, variables: Mapping[str, Any], batches: Iterable[np.ndarray], *,
                    source: str, percentile: float = 100.0, info: Mapping[str, Any] | None = None
                    ) -> ActRanges:
  """Ranges of every conv / dense input observed on normalized NHWC ``batches`` (module
  docstring). ``source`` 'distilled' or 'calibration' (the latter is marked not data-free)."""
  if not 0.0 < percentile <= 100.0:
    raise ValueError(f'percentile must be in (0, 100], got {percentile!r}')
  widths = units_lib.widths_of(variables, spec.units)
  fn = _stats_fn(spec.build(widths), float(percentile))
  jv = jax.tree_util.tree_map(jnp.asarray, {k: v for k, v in variables.items() if k != COLLECTION})
  acc: dict[str, list[np.ndarray]] = {}
  n = 0
  for x in batches:
    x = np.asarray(x, np.float32)
    n += x.shape[0]
    for p, s in fn(jv, x).items():
      acc.setdefault(p, []).append(np.asarray([float(v) for v in s]))
  if not acc:
    raise ValueError('observed_ranges: no inputs')
  layers = {}
  for p, rows in acc.items():
    r = np.stack(rows)
    lo = float(r[:, 0].min())
    if percentile == 100.0:
      hi, ahi = float(r[:, 1].max()), float(max(r[:, 1].max(), -r[:, 0].min()))
    else:
      hi, ahi = float(r[:, 2].mean()), float(r[:, 3].mean())
    layers[p] = ActRange(0.0, max(hi, 0.0), False) if lo >= 0 else ActRange(-ahi, ahi, True)
  known = set(quant.kernel_paths(variables))
  if set(layers) != known:
    raise ValueError(f'observed_ranges: observed {sorted(layers)} but the variables have '
                     f'{sorted(known)}')
  return ActRanges(layers, source, source != 'calibration',
                   dict(info or {}, n=n, percentile=float(percentile)))


def distilled_ranges(spec, variables: Mapping[str, Any], *, n: int = 64, steps: int = 300,
                     lr: float = 0.1, seed: int = 0, percentile: float = 100.0,
                     batch_size: int = 64) -> ActRanges:
  """(b) Ranges observed on BN-distilled inputs (:func:`lbyl_jax.experimental.distill.distill`): data-free."""
  inputs, dinfo = distill_lib.distill(spec, {k: v for k, v in variables.items() if k != COLLECTION},
                                  n=n, steps=steps, lr=lr, seed=seed)
  batches = (inputs[i:i + batch_size] for i in range(0, len(inputs), batch_size))
  return observed_ranges(spec, variables, batches, source='distilled', percentile=percentile,
                         info=dict(dinfo, steps=int(steps), lr=float(lr), seed=int(seed)))


def calibration_ranges(spec, variables: Mapping[str, Any], images, *, percentile: float = 100.0,
                       batch_size: int = 128) -> ActRanges:
  """(c) Ranges observed on unlabelled user images (uint8 NHWC array, or a
  :class:`lbyl_jax.io.data.Dataset`), normalized as the preset expects. NOT data-free."""
  normalize = archs.normalize_fn(spec)
  if hasattr(images, 'batches'):
    batches = (np.asarray(normalize(b)) for b, _ in images.batches(batch_size))
  else:
    images = np.asarray(images)
    if images.ndim not in (3, 4) or images.shape[0] == 0:
      raise ValueError(f'calibration_ranges: expected N x H x W (x C) images, '
                       f'got shape {images.shape}')
    batches = (np.asarray(normalize(images[i:i + batch_size]))
               for i in range(0, images.shape[0], batch_size))
  return observed_ranges(spec, variables, batches, source='calibration', percentile=percentile)


# --------------------------------------------------------------------------------------------
# Serialization.


def _ranges_dict(ranges: ActRanges) -> dict[str, Any]:
  return dict(format=FORMAT, version=VERSION, source=ranges.source,
              data_free=bool(ranges.data_free),
              info=json.loads(json.dumps(dict(ranges.info))),
              layers={p: dict(lo=float(r.lo), hi=float(r.hi), signed=bool(r.signed))
                      for p, r in sorted(ranges.layers.items())})


def act_ranges_to_json(ranges: ActRanges) -> str:
  """The ranges as a JSON string (``act_ranges_from_json`` reads it back exactly: floats are
  written with ``repr`` precision)."""
  return json.dumps(_ranges_dict(ranges), sort_keys=True)


def act_ranges_from_json(text: str | Mapping[str, Any]) -> ActRanges:
  """Inverse of :func:`act_ranges_to_json` (a JSON string or the parsed dict).

  Raises:
    ValueError: not an activation-range description, a wrong version, or a bad entry (named).
  """
  d = json.loads(text) if isinstance(text, (str, bytes)) else text
  if not isinstance(d, Mapping) or d.get('format') != FORMAT:
    raise ValueError(f'not an activation-range description (need format={FORMAT!r}): '
                     f'{str(d)[:200]}')
  if d.get('version') != VERSION:
    raise ValueError(f'activation ranges version {d.get("version")!r} is not supported '
                     f'(this build reads {VERSION})')
  layers = {}
  for p, r in (d.get('layers') or {}).items():
    try:
      layers[p] = ActRange(float(r['lo']), float(r['hi']), bool(r['signed']))
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f'activation range of layer {p!r}: {e}') from e
  return ActRanges(layers, d.get('source'), bool(d.get('data_free')), dict(d.get('info') or {}))


def act_meta(ranges: ActRanges, bits: int, keep_8bit: Iterable[str] = ()) -> dict[str, Any]:
  """What a checkpoint stores as ``meta['act_quant']``: bits, the 8-bit layers and the ranges."""
  return dict(bits=check_bits(bits), keep_8bit=sorted(keep_8bit), ranges=_ranges_dict(ranges))


def act_from_meta(meta: Mapping[str, Any]) -> tuple[ActRanges, int, list[str]]:
  """Inverse of :func:`act_meta`: ``(ranges, bits, keep_8bit)``."""
  if not isinstance(meta, Mapping) or 'ranges' not in meta or 'bits' not in meta:
    raise ValueError(f"act_quant meta needs 'bits' and 'ranges', got {str(meta)[:200]}")
  return (act_ranges_from_json(meta['ranges']), check_bits(meta['bits']),
          list(meta.get('keep_8bit', ())))


# --------------------------------------------------------------------------------------------
# The forward pass.


def layer_grid(r: ActRange, bits: int) -> tuple[np.float32, np.float32, np.float32]:
  """``(Delta, qmin, qmax)`` of one range (module docstring); Delta = 1 for an all-zero range."""
  bits = check_bits(bits)
  if r.signed:
    n = 2 ** (bits - 1) - 1
    a = max(abs(r.lo), abs(r.hi))
    lo_q, hi_q, top = -n, n, a
  else:
    n = 2 ** bits - 1
    lo_q, hi_q, top = 0, n, r.hi
  delta = np.float32(top / n)
  if not delta > 0:
    delta = np.float32(1.0)
  return delta, np.float32(lo_q), np.float32(hi_q)


def quant_params(ranges: ActRanges, bits: int, keep_8bit: Iterable[str] = ()) -> dict[str, Any]:
  """The ``'act_quant'`` collection: ``{layer path (nested): {'scale', 'qmin', 'qmax'}}``."""
  bits = check_bits(bits)
  keep = set(keep_8bit)
  tree: dict[str, Any] = {}
  for path, r in ranges.layers.items():
    delta, lo_q, hi_q = layer_grid(r, MAX_BITS if path in keep else bits)
    node = tree
    keys = path.split('/')
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = dict(scale=delta, qmin=lo_q, qmax=hi_q)
  return tree


def attach(variables: Mapping[str, Any], ranges: ActRanges, bits: int,
           keep_8bit: Iterable[str] = ()) -> dict[str, Any]:
  """``variables`` plus the ``'act_quant'`` collection for :func:`forward`.

  Raises:
    ValueError: a range or ``keep_8bit`` entry names a layer that is not a conv / dense of the
      variables.
  """
  known = quant.kernel_paths(variables)
  quant.normalize_layer_paths(ranges.layers, known, 'activation ranges')
  keep = quant.normalize_layer_paths(keep_8bit, known, 'activation keep_8bit')
  out = {k: v for k, v in variables.items() if k != COLLECTION}
  out[COLLECTION] = quant_params(ranges, bits, keep)
  return out


def fake_quant(x, scale, qmin, qmax):
  """``scale * clip(round(x / scale), qmin, qmax)`` (jit-able)."""
  return jnp.clip(jnp.round(x / scale), qmin, qmax) * scale


def forward(model: nn.Module, variables: Mapping[str, Any], x, *args, **kwargs):
  """``model.apply(variables, x)`` with every conv / dense input that has an ``'act_quant'``
  entry fake-quantized (without the collection: plain ``apply``). jit-compatible; the
  forward-wrapper of :class:`lbyl_jax.evaluation.Evaluator`."""
  if not isinstance(variables, Mapping) or COLLECTION not in variables:
    return model.apply(variables, x, *args, **kwargs)

  def icpt(next_fun, a, kw, ctx):
    if ctx.method_name == '__call__' and isinstance(ctx.module, (nn.Conv, nn.Dense)) and a:
      mine = ctx.module.variables.get(COLLECTION)
      if mine:
        a = (fake_quant(a[0], mine['scale'], mine['qmin'], mine['qmax']),) + tuple(a[1:])
    return next_fun(*a, **kw)

  with nn.intercept_methods(icpt):
    return model.apply(variables, x, *args, **kwargs)


def export_description(meta: Mapping[str, Any]) -> dict[str, Any]:
  """The activation quantization of ``meta['act_quant']`` (:func:`act_meta`) as the exports
  state it (:mod:`lbyl_jax.io.export`): ``{'bits', 'source', 'data_free', 'keep_8bit', 'info',
  'layers': {layer path: {'scale', 'qmin', 'qmax'}}}``, the grids of :func:`quant_params`."""
  ranges, bits, keep = act_from_meta(meta)
  keep_set = set(keep)
  layers = {}
  for path, r in sorted(ranges.layers.items()):
    delta, lo_q, hi_q = layer_grid(r, MAX_BITS if path in keep_set else bits)
    layers[path] = dict(scale=float(delta), qmin=float(lo_q), qmax=float(hi_q))
  return dict(bits=bits, source=ranges.source, data_free=bool(ranges.data_free),
              keep_8bit=sorted(keep), info=json.loads(json.dumps(dict(ranges.info))),
              layers=layers)


def export_files(spec, widths, meta: Mapping[str, Any], variables: Mapping[str, Any],
                 fmt: str) -> dict[str, bytes]:
  """:func:`lbyl_jax.io.export.export` of float ``variables`` with the activation quantization
  of ``meta`` (:func:`act_meta`): the StableHLO function runs :func:`forward` with the
  ``'act_quant'`` collection baked in (the logits of :func:`forward`); safetensors gets the grids
  as metadata (:func:`export_description`)."""
  ranges, bits, keep = act_from_meta(meta)
  return export_lib.export(spec, widths, attach(variables, ranges, bits, keep), fmt,
                           forward=forward, act=export_description(meta))


def apply_with_act_quant(model: nn.Module, variables: Mapping[str, Any], x, ranges: ActRanges,
                         bits: int, keep_8bit: Iterable[str] = ()):
  """The model's output with fake-quantized layer inputs (:func:`attach` + :func:`forward`)."""
  return forward(model, attach(variables, ranges, bits, keep_8bit), x)



# --------------------------------------------------------------------------------------------
# The plan stage.

RANGE_SOURCES = ('bn', 'distilled', 'calibration')  # the sources a plan can use


def _act_bits(v):
  return check_bits(v, where='activation bits')


@dataclasses.dataclass(frozen=True)
class ActQuant(Options):
  """Activation quantization of a plan: fake-quantized inputs of every conv / dense layer, with
  ranges computed on the compressed network (module docstring): data-free ('bn', 'distilled') or
  observed on unlabelled user images ('calibration': not data-free; the images are an argument of
  the pipeline, ``--calib-data`` on the command line). The first layer and the classifier read
  8-bit inputs unless the weight quantizer's ``--quantize-ends`` is given."""

  stage: ClassVar[str] = 'activation quantization'

  act_bits: int | None = option(None, help='fake-quantize the input of every conv / dense layer to'
                                ' N bits (per tensor; unsigned after a ReLU)', check=_act_bits,
                                metavar='N', default_text='float activations')
  act_ranges: str = option('bn', choices=RANGE_SOURCES,
                           help="activation ranges: DFQ's BN rule (bn) or observed on BN-distilled"
                                ' inputs (distilled), both data-free; or observed on unlabelled'
                                ' images of --calib-data (calibration: NOT data-free)')
  act_k: float | None = option(None, help="the BN rule's number of standard deviations",
                               check=number(0.0, lo_open=True), advanced=True,
                               default_text='4, 6, 8 for 4, 6, 8 bits')

  def __post_init__(self):
    super().__post_init__()
    if self.act_bits is None and (self.act_k is not None or self.act_ranges != 'bn'):
      raise ValueError('--act-ranges / --act-k need --act-bits')
    if self.act_k is not None and self.act_ranges != 'bn':
      raise ValueError('--act-k is the BN rule\'s k; it does nothing with --act-ranges '
                       f'{self.act_ranges}')

  @property
  def enabled(self) -> bool:
    return self.act_bits is not None

  @property
  def needs_images(self) -> bool:
    """Whether the ranges are observed on user images (``act_ranges='calibration'``)."""
    return self.enabled and self.act_ranges == 'calibration'

  def ranges(self, spec, variables: Mapping[str, Any], images=None, *,
             folded_stats: Mapping[str, Mapping[str, Any]] | None = None) -> ActRanges:
    """The ranges of the network that will run (``variables``: the compressed float weights);
    ``images``: the unlabelled uint8 NHWC images (or a Dataset) of 'calibration', only there;
    ``folded_stats``: for a network whose BNs were folded into the layers (DFQ), the folded
    layers' output statistics the quantizer tracked, which the BN rule reads in place of the
    (identity) BNs (:func:`dfq_bn_gaussians`).

    Raises:
      ValueError: 'calibration' without images, or images with another source.
    """
    if self.needs_images and images is None:
      raise ValueError('--act-ranges calibration needs unlabelled images (--calib-data SPEC; '
                       'API: calib_images=)')
    if not self.needs_images and images is not None:
      raise ValueError(f'calibration images were given but --act-ranges is {self.act_ranges} '
                       '(they are used by --act-ranges calibration)')
    if self.act_ranges == 'bn':
      override = None if folded_stats is None else dfq_bn_gaussians(spec, folded_stats)
      return bn_ranges(spec, variables, k=self.act_k, bits=self.act_bits, bn_gaussians=override)
    if self.act_ranges == 'calibration':
      return calibration_ranges(spec, variables, images)
    return distilled_ranges(spec, variables)


def restore(loaded):
  """A :class:`lbyl_jax.io.checkpoint.Loaded` whose ``apply`` fake-quantizes the activations
  stored in ``meta['act_quant']`` (the loaded object unchanged without them)."""
  if 'act_quant' not in loaded.meta:
    return loaded
  ranges, bits, keep = act_from_meta(loaded.meta['act_quant'])
  attach(loaded.variables, ranges, bits, keep)  # validates the layers against the variables
  return ActLoaded(*loaded)


class ActLoaded(checkpoint.Loaded):
  """A loaded checkpoint with activation quantization (``meta['act_quant']``)."""

  __slots__ = ()

  @property
  def act(self) -> tuple[ActRanges, int, list[str]]:
    """``(ranges, bits, keep_8bit)`` of the stored activation quantization."""
    return act_from_meta(self.meta['act_quant'])

  def act_variables(self) -> dict[str, Any]:
    """``variables`` plus the ``'act_quant'`` collection, for :func:`forward` (and an
    :class:`lbyl_jax.evaluation.Evaluator` built with ``forward=actquant.forward``)."""
    return attach(self.variables, *self.act)

  def apply(self, images):
    """Logits of uint8 NHWC images with fake-quantized activations (normalization included)."""
    return forward(self.model, self.act_variables(), archs.normalize_fn(self.spec)(images))

  def export_files(self, fmt: str) -> dict[str, bytes]:
    """The export of :meth:`apply`: with the activation quantization (:func:`export_files`)."""
    export_lib.check_available(fmt, self.spec)
    return export_files(self.spec, self.widths, self.meta['act_quant'], self.variables, fmt)

  def export_description(self, formats) -> dict[str, Any]:
    """``export.json``: as for a float checkpoint, plus the activation quantization."""
    return dict(super().export_description(formats),
                act_quant=export_description(self.meta['act_quant']))
