"""Flax Linen models whose every prunable width is a constructor field.

All models are inference-only (BatchNorm uses running statistics) and take NHWC float inputs that
are already normalized. Layer names mirror the PyTorch names (``layer1.0.conv1`` becomes
``layer1_0/conv1``) so conversion and surgery stay readable.

Padding is always explicit, so stride-2 convolutions and pools match PyTorch exactly (Flax
``'SAME'`` pads asymmetrically at stride 2).

A model built with ``widths=None`` has the original widths. A pruned model is the same class with a
tuple of widths, one per prunable slot, in the order given by :func:`width_names`; ``model.init``
then produces exactly the shapes of the pruned variables.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lbyl_jax.core.bn import BN_EPS

Widths = tuple[int, ...] | None


def _bn(name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=BN_EPS, name=name)


def _conv(features: int, k: int, stride: int, pad: int, name: str, bias: bool = False) -> nn.Conv:
  return nn.Conv(
      features,
      (k, k),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      use_bias=bias,
      name=name,
  )


def _flatten_nchw(x: jnp.ndarray) -> jnp.ndarray:
  """Flattens NHWC in PyTorch's NCHW order, so a Linear after it reads channel blocks."""
  return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


# --------------------------------------------------------------------------------------------
# LeNet-300-100


class MLP(nn.Module):
  """Fully connected ReLU network (LeNet-300-100: hidden=(300, 100)), layers named ip1, ip2, ..."""

  hidden: Sequence[int] = (300, 100)
  num_classes: int = 10
  widths: Widths = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = x.reshape(x.shape[0], -1)
    hidden = tuple(self.widths) if self.widths is not None else tuple(self.hidden)
    for i, h in enumerate(hidden):
      x = nn.relu(nn.Dense(h, name=f'ip{i + 1}')(x))
    return nn.Dense(self.num_classes, name=f'ip{len(hidden) + 1}')(x)


# --------------------------------------------------------------------------------------------
# CIFAR ResNets (He et al. 2016, section 4.2): 3 stages of n basic blocks, widths 16/32/64.


class CifarBasicBlock(nn.Module):
  planes: int
  inner: int
  stride: int
  in_planes: int
  shortcut: str  # 'A' (subsample + zero pad) or 'B' (1x1 conv + BN)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    out = nn.relu(_bn('bn1')(_conv(self.inner, 3, self.stride, 1, 'conv1')(x)))
    out = _bn('bn2')(_conv(self.planes, 3, 1, 1, 'conv2')(out))
    if self.stride != 1 or self.in_planes != self.planes:
      if self.shortcut == 'A':
        sc = x[:, :: self.stride, :: self.stride, :]
        p = self.planes // 4
        sc = jnp.pad(sc, ((0, 0), (0, 0), (0, 0), (p, p)))
      else:
        sc = _bn('downsample_bn')(_conv(self.planes, 1, self.stride, 0, 'downsample_conv')(x))
    else:
      sc = x
    return nn.relu(out + sc)


class CifarResNet(nn.Module):
  """CIFAR ResNet-(6n+2). ``widths`` holds the conv1 width of every block (stage-major)."""

  depth: int = 56
  shortcut: str = 'A'
  num_classes: int = 10
  stage_widths: Sequence[int] = (16, 32, 64)
  widths: Widths = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    n = (self.depth - 2) // 6
    x = nn.relu(_bn('bn1')(_conv(self.stage_widths[0], 3, 1, 1, 'conv1')(x)))
    in_planes = self.stage_widths[0]
    b = 0
    for s, planes in enumerate(self.stage_widths):
      for i in range(n):
        stride = 2 if (s > 0 and i == 0) else 1
        inner = self.widths[b] if self.widths is not None else planes
        x = CifarBasicBlock(planes, inner, stride, in_planes, self.shortcut, name=f'layer{s + 1}_{i}')(x)
        in_planes = planes
        b += 1
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='fc')(x)


# --------------------------------------------------------------------------------------------
# torchvision ResNets (v1.5: stride on the 3x3 conv of bottlenecks).


class BasicBlock(nn.Module):
  planes: int
  inner: tuple[int, ...]
  stride: int
  downsample: bool

  expansion = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    out = nn.relu(_bn('bn1')(_conv(self.inner[0], 3, self.stride, 1, 'conv1')(x)))
    out = _bn('bn2')(_conv(self.planes, 3, 1, 1, 'conv2')(out))
    sc = x
    if self.downsample:
      sc = _bn('downsample_bn')(_conv(self.planes, 1, self.stride, 0, 'downsample_conv')(x))
    return nn.relu(out + sc)


class Bottleneck(nn.Module):
  planes: int
  inner: tuple[int, ...]
  stride: int
  downsample: bool

  expansion = 4

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    out = nn.relu(_bn('bn1')(_conv(self.inner[0], 1, 1, 0, 'conv1')(x)))
    out = nn.relu(_bn('bn2')(_conv(self.inner[1], 3, self.stride, 1, 'conv2')(out)))
    out = _bn('bn3')(_conv(self.planes * 4, 1, 1, 0, 'conv3')(out))
    sc = x
    if self.downsample:
      sc = _bn('downsample_bn')(_conv(self.planes * 4, 1, self.stride, 0, 'downsample_conv')(x))
    return nn.relu(out + sc)


class ResNet(nn.Module):
  """torchvision ResNet. ``widths``: per block conv1 (basic) or conv1, conv2 (bottleneck) widths."""

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  bottleneck: bool = True
  num_classes: int = 1000
  stage_widths: Sequence[int] = (64, 128, 256, 512)
  widths: Widths = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    block_cls = Bottleneck if self.bottleneck else BasicBlock
    per_block = 2 if self.bottleneck else 1
    x = nn.relu(_bn('bn1')(_conv(64, 7, 2, 3, 'conv1')(x)))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    in_planes = 64
    b = 0
    for s, (n, planes) in enumerate(zip(self.stage_sizes, self.stage_widths)):
      for i in range(n):
        stride = 2 if (s > 0 and i == 0) else 1
        if self.widths is not None:
          inner = tuple(self.widths[b * per_block:(b + 1) * per_block])
        else:
          inner = (planes,) * per_block
        downsample = stride != 1 or in_planes != planes * block_cls.expansion
        x = block_cls(planes, inner, stride, downsample, name=f'layer{s + 1}_{i}')(x)
        in_planes = planes * block_cls.expansion
        b += 1
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='fc')(x)


# --------------------------------------------------------------------------------------------
# VGG-16 with BN.

VGG16_CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M')


class VGG(nn.Module):
  """VGG with BN. Convs are ``conv0..conv12`` with ``bn0..bn12``; ``widths`` are the conv widths.

  ``cifar=True``: the network-slimming CIFAR variant used by LBYL and Neuron Merging (no conv bias,
  four max-pools, a final 2x2 average pool, classifier fc1 (512) -> BN1d ``bn_fc1`` -> ReLU -> fc2).
  ``cifar=False``: torchvision ``vgg16_bn`` (conv bias, five max-pools, adaptive average pool to
  7x7, classifier fc1 (4096) -> ReLU -> fc2 (4096) -> ReLU -> fc3; dropout is inactive).
  """

  cifar: bool = True
  num_classes: int = 10
  widths: Widths = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    cfg = VGG16_CFG[:-1] if self.cifar else VGG16_CFG
    convs = [c for c in cfg if c != 'M']
    widths = tuple(self.widths) if self.widths is not None else tuple(convs)
    i = 0
    for c in cfg:
      if c == 'M':
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      x = _conv(widths[i], 3, 1, 1, f'conv{i}', bias=not self.cifar)(x)
      x = nn.relu(_bn(f'bn{i}')(x))
      i += 1
    if self.cifar:
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
      x = _flatten_nchw(x)
      x = nn.relu(_bn('bn_fc1')(nn.Dense(512, name='fc1')(x)))
      return nn.Dense(self.num_classes, name='fc2')(x)
    x = adaptive_avg_pool(x, (7, 7))
    x = _flatten_nchw(x)
    x = nn.relu(nn.Dense(4096, name='fc1')(x))
    x = nn.relu(nn.Dense(4096, name='fc2')(x))
    return nn.Dense(self.num_classes, name='fc3')(x)


def adaptive_avg_pool(x: jnp.ndarray, out_hw: tuple[int, int]) -> jnp.ndarray:
  """PyTorch ``AdaptiveAvgPool2d`` (bin i covers floor(i*H/o) .. ceil((i+1)*H/o))."""
  h, w = x.shape[1], x.shape[2]
  oh, ow = out_hw
  if (h, w) == (oh, ow):
    return x
  rows = []
  for i in range(oh):
    h0, h1 = (i * h) // oh, -((-(i + 1) * h) // oh)
    cols = []
    for j in range(ow):
      w0, w1 = (j * w) // ow, -((-(j + 1) * w) // ow)
      cols.append(jnp.mean(x[:, h0:h1, w0:w1, :], axis=(1, 2)))
    rows.append(jnp.stack(cols, axis=1))
  return jnp.stack(rows, axis=1)


def describe(module: nn.Module) -> dict[str, Any]:
  """The constructor fields of a model, for reports."""
  return {k: getattr(module, k) for k in module.__dataclass_fields__ if k not in ('parent', 'name')}
