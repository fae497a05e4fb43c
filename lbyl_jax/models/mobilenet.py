"""MobileNetV2 in torchvision layout, with every width a constructor field.

The model mirrors ``torchvision.models.MobileNetV2`` (Sandler et al. 2018, "MobileNetV2: Inverted
Residuals and Linear Bottlenecks"): a 3x3 stride-2 stem conv + BN + ReLU6 (``features.0``),
seventeen inverted-residual blocks (``features.1`` .. ``features.17``), a 1x1 conv + BN + ReLU6
(``features.18``), a global average pool and ``classifier.1`` (Linear; the Dropout before it is
inactive at inference). An inverted residual is

  expand 1x1 (``conv.0.0``) -> BN (``conv.0.1``) -> ReLU6 -> depthwise 3x3, stride s (``conv.1.0``)
  -> BN (``conv.1.1``) -> ReLU6 -> projection 1x1 (``conv.2``) -> BN (``conv.3``) [+ input]

(block 1 has no expansion: ``conv.0.*`` is its depthwise conv + BN, ``conv.1`` / ``conv.2`` its
projection + BN). The residual is added when the stride is 1 and the input and output widths are
equal, torchvision's ``use_res_connect`` rule. Convs have no bias, BN eps is 1e-5, padding is
explicit (1 on each side of every 3x3 conv), so stride-2 outputs match PyTorch exactly.

Flax names: ``features.i`` -> ``features_i``; inside a block the torch path with '.' -> '_'
(``features.2.conv.1.0`` -> ``features_2/conv_1_0``); the plain conv + BN + ReLU6 stages
``features.0`` / ``features.18`` hold ``conv`` and ``bn``; ``classifier.1`` -> ``classifier_1``
(the rules are in :mod:`converters.mapping`).

The depthwise convs are :class:`DepthwiseConv`, an ``nn.Conv`` with ``feature_group_count`` equal
to its channels whose execution path is a sum of k^2 shifted products (about 5x faster than XLA's
grouped convolution on CPU); with ``fast=False`` it is the plain ``nn.Conv`` call, which is what
the discovery of prunable units traces (``ArchSpec.discover_module``). The prunable units are the
expanded channels of blocks 2-17, found by that discovery; their compensation through the
depthwise conv is :mod:`lbyl_jax.pruning.depthwise` (docs/mobilenet_v2.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lbyl_jax.core.bn import BN_EPS

Widths = tuple[int, ...] | None

# torchvision's inverted_residual_setting (t, c, n, s).
_TV_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1))
# The depthwise stride of blocks 1..17 (the first block of each stage of _TV_SETTING strides).
TORCHVISION_STRIDES = (1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1)


def _make_divisible(v: float, divisor: int = 8) -> int:
  """torchvision's channel rounding (``_make_divisible``)."""
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


def torchvision_widths(width_mult: float = 1.0, num_classes: int = 1000) -> dict[str, Any]:
  """The :class:`MobileNetV2` width fields of torchvision's ``mobilenet_v2(width_mult=...)``."""
  stem = _make_divisible(32 * width_mult)
  last = _make_divisible(1280 * max(1.0, width_mult))
  expand, out = [], []
  inp = stem
  for t, c, n, _ in _TV_SETTING:
    oc = _make_divisible(c * width_mult)
    for _ in range(n):
      if t != 1:
        expand.append(int(round(inp * t)))
      out.append(oc)
      inp = oc
  return dict(stem=stem, expand=tuple(expand), out=tuple(out), last=last, num_classes=num_classes)


# --------------------------------------------------------------------------------------------
# Layers.


class DepthwiseConv(nn.Conv):
  """A depthwise ``nn.Conv`` (``feature_group_count`` = input channels = ``features``) with a
  fast execution path; the variables are those of ``nn.Conv`` (kernel HWIO (kh, kw, 1, C)).

  With ``fast=True`` and a 2-D NHWC input, explicit padding and no dilation, the output is the
  sum over the kernel taps of shifted, per-channel scaled copies of the padded input; each product
  is a ``dot_general`` with the channel as batch dimension (no contraction), so MAC counts from a
  jaxpr give kh kw H_out W_out C, the grouped convolution's count. On XLA's CPU backend this runs
  about 5x faster than its grouped convolution (0.23 s vs 1.14 s for 100 x 112 x 112 x 35).
  Anything else, and ``fast=False``, runs ``nn.Conv.__call__`` itself.
  """

  fast: bool = True

  def _fast_path(self, x: jnp.ndarray) -> bool:
    k = tuple(self.kernel_size)
    pad = self.padding
    return (self.fast and x.ndim == 4 and len(k) == 2 and x.shape[-1] == self.features
            and self.feature_group_count == self.features
            and isinstance(pad, (tuple, list)) and len(pad) == 2
            and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pad)
            and self.input_dilation in (None, 1, (1, 1))
            and self.kernel_dilation in (None, 1, (1, 1)) and self.mask is None)

  @nn.compact
  def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
    if not self._fast_path(inputs):
      return super().__call__(inputs)
    kh, kw = (int(s) for s in self.kernel_size)
    sh, sw = (1, 1) if self.strides is None else (
        (self.strides, self.strides) if isinstance(self.strides, int) else tuple(self.strides))
    (pt, pb), (pl, pr) = ((int(a), int(b)) for a, b in self.padding)
    c = self.features
    kernel = self.param('kernel', self.kernel_init, (kh, kw, 1, c), self.param_dtype)
    bias = self.param('bias', self.bias_init, (c,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho = (x.shape[1] + pt + pb - kh) // sh + 1
    wo = (x.shape[2] + pl + pr - kw) // sw + 1
    out = None
    for i in range(kh):
      for j in range(kw):
        tap = xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
        # (C,) x (B, Ho, Wo, C) with C batched -> (C, B, Ho, Wo)
        term = jax.lax.dot_general(kernel[i, j, 0], tap, (((), ()), ((0,), (3,))),
                                   precision=self.precision)
        out = term if out is None else out + term
    out = jnp.transpose(out, (1, 2, 3, 0))
    return out if bias is None else out + bias


def _bn(name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=BN_EPS, name=name)


def _conv(features: int, k: int, stride: int, name: str) -> nn.Conv:
  pad = (k - 1) // 2
  return nn.Conv(features, (k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, name=name)


def _depthwise(features: int, k: int, stride: int, fast: bool, name: str) -> DepthwiseConv:
  pad = (k - 1) // 2
  return DepthwiseConv(features, (k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                       feature_group_count=features, use_bias=False, fast=fast, name=name)


class ConvBNReLU6(nn.Module):
  """torchvision ``Conv2dNormActivation`` with ReLU6: ``conv`` -> ``bn`` -> ReLU6."""

  features: int
  kernel: int
  stride: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    return jax.nn.relu6(_bn('bn')(_conv(self.features, self.kernel, self.stride, 'conv')(x)))


class InvertedResidual(nn.Module):
  """One inverted residual. ``hidden`` = expanded width; ``expand=False``: no expansion conv
  (then ``hidden`` equals the input width, torchvision's expand_ratio 1)."""

  hidden: int
  out: int
  stride: int
  expand: bool
  residual: bool
  fast_depthwise: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    h = x
    if self.expand:
      h = jax.nn.relu6(_bn('conv_0_1')(_conv(self.hidden, 1, 1, 'conv_0_0')(h)))
      dw, dw_bn, proj, proj_bn = 'conv_1_0', 'conv_1_1', 'conv_2', 'conv_3'
    else:
      dw, dw_bn, proj, proj_bn = 'conv_0_0', 'conv_0_1', 'conv_1', 'conv_2'
    h = _depthwise(self.hidden, 3, self.stride, self.fast_depthwise, dw)(h)
    h = jax.nn.relu6(_bn(dw_bn)(h))
    h = _bn(proj_bn)(_conv(self.out, 1, 1, proj)(h))
    return x + h if self.residual else h


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Static shape facts of block ``index`` (1..17): widths, stride, expansion, residual."""

  index: int
  inp: int
  hidden: int
  out: int
  stride: int
  expand: bool
  residual: bool

  @property
  def name(self) -> str:
    return f'features_{self.index}'

  @property
  def output_bn(self) -> str:
    """The BN after the projection (the block's output before the residual add)."""
    return f'{self.name}/{"conv_3" if self.expand else "conv_2"}'


_TV = torchvision_widths()


class MobileNetV2(nn.Module):
  """torchvision-layout MobileNetV2 with arbitrary (e.g. already channel-pruned) widths.

  Attributes:
    stem: output width of ``features.0`` (also the depthwise width of block 1).
    expand: expanded widths of blocks 2..17 (one per block after the first).
    out: projection widths of blocks 1..17.
    last: width of ``features.18``.
    num_classes: classifier outputs.
    strides: depthwise stride of each block.
    residual: per block, whether the input is added; None: torchvision's rule (stride 1 and
      equal input / output widths).
    fast_depthwise: :class:`DepthwiseConv`'s fast path (False: plain ``nn.Conv``, for tracing).
    widths: the prunable widths (the expanded widths, in block order: the discovered units);
      None means ``expand``.
  """

  stem: int = _TV['stem']
  expand: Sequence[int] = _TV['expand']
  out: Sequence[int] = _TV['out']
  last: int = _TV['last']
  num_classes: int = 1000
  strides: Sequence[int] = TORCHVISION_STRIDES
  residual: Sequence[bool] | None = None
  fast_depthwise: bool = True
  widths: Widths = None

  def blocks(self) -> list[BlockConfig]:
    """Every block's static configuration (validates the field lengths)."""
    expand = tuple(self.widths) if self.widths is not None else tuple(self.expand)
    n = len(self.out)
    if n < 1 or len(self.strides) != n or len(expand) != n - 1:
      raise ValueError(
          f'MobileNetV2 needs len(out) = len(strides) = len(expand) + 1 >= 1; got out '
          f'{len(self.out)}, strides {len(self.strides)}, expand {len(expand)}')
    if self.residual is not None and len(self.residual) != n:
      raise ValueError(f'MobileNetV2: residual has {len(self.residual)} entries for {n} blocks')
    out = []
    inp = int(self.stem)
    for i in range(n):
      hidden = int(self.stem) if i == 0 else int(expand[i - 1])
      res = (self.residual[i] if self.residual is not None
             else (self.strides[i] == 1 and inp == self.out[i]))
      out.append(BlockConfig(i + 1, inp, hidden, int(self.out[i]), int(self.strides[i]), i > 0,
                             bool(res)))
      inp = int(self.out[i])
    return out

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = ConvBNReLU6(self.stem, 3, 2, name='features_0')(x)
    blocks = self.blocks()
    for b in blocks:
      x = InvertedResidual(b.hidden, b.out, b.stride, b.expand, b.residual, self.fast_depthwise,
                           name=b.name)(x)
    x = ConvBNReLU6(self.last, 1, 1, name=f'features_{len(blocks) + 1}')(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='classifier_1')(x)


# --------------------------------------------------------------------------------------------
# Widths from a checkpoint.


def fields_from_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """The :class:`MobileNetV2` width fields (stem, expand, out, last, num_classes) read off the
  shapes of a torchvision-layout state dict (torch names, ``module.`` already stripped, e.g. by
  :func:`converters.read_state_dict`).

  Raises:
    ValueError: naming the first missing or inconsistent entry.
  """

  def shape(key: str) -> tuple[int, ...]:
    if key not in state_dict:
      raise ValueError(f'MobileNetV2 state dict lacks {key!r}')
    return tuple(np.shape(state_dict[key]))

  stem = shape('features.0.0.weight')
  if len(stem) != 4 or stem[1:] != (3, 3, 3):
    raise ValueError(f'features.0.0.weight has shape {stem}, expected (C, 3, 3, 3)')
  n = 1
  while f'features.{n}.conv.0.0.weight' in state_dict:
    n += 1
  n_blocks = n - 1
  if n_blocks < 1:
    raise ValueError('MobileNetV2 state dict has no inverted residual blocks (features.1.conv.*)')
  expand, out = [], []
  inp = stem[0]
  for i in range(1, n_blocks + 1):
    first = shape(f'features.{i}.conv.0.0.weight')
    if first[1:] == (1, 3, 3):  # no expansion: conv.0 is the depthwise conv
      if i > 1:
        raise ValueError(f'features.{i} has no expansion conv; only block 1 may lack one')
      if first[0] != inp:
        raise ValueError(f'features.{i}.conv.0.0.weight {first}: depthwise width != input {inp}')
      proj = shape(f'features.{i}.conv.1.weight')
    else:
      if i == 1:
        raise ValueError('features.1 has an expansion conv; torchvision block 1 has none')
      if first[1:] != (inp, 1, 1):
        raise ValueError(f'features.{i}.conv.0.0.weight has shape {first}, expected '
                         f'({first[0]}, {inp}, 1, 1)')
      dw = shape(f'features.{i}.conv.1.0.weight')
      if dw != (first[0], 1, 3, 3):
        raise ValueError(f'features.{i}.conv.1.0.weight has shape {dw}, expected '
                         f'({first[0]}, 1, 3, 3)')
      expand.append(first[0])
      proj = shape(f'features.{i}.conv.2.weight')
    if proj[1:] != (first[0], 1, 1):
      raise ValueError(f'features.{i} projection has shape {proj}, expected (O, {first[0]}, 1, 1)')
    out.append(proj[0])
    inp = proj[0]
  last = shape(f'features.{n_blocks + 1}.0.weight')
  if last[1:] != (inp, 1, 1):
    raise ValueError(f'features.{n_blocks + 1}.0.weight has shape {last}, expected (C, {inp}, 1, 1)')
  cls = shape('classifier.1.weight')
  if cls[1:] != (last[0],):
    raise ValueError(f'classifier.1.weight has shape {cls}, expected (classes, {last[0]})')
  return dict(stem=stem[0], expand=tuple(expand), out=tuple(out), last=last[0],
              num_classes=cls[0])
