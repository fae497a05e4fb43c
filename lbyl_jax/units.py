"""Prunable units: layer l -> (BN) -> ReLU -> (pool) -> consumer layer l+1 (ALGORITHMS.md 2, A13).

A unit names the producing layer whose output channels are removed, the BN that follows it, and
the consumer whose input channels receive the compensation. Shortcuts, stems, expansion convs and
heads are never producers. The unit name doubles as the model's width slot.

Paths are '/'-joined keys into ``variables['params']`` (and ``variables['batch_stats']`` for BN).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Unit:
  """One prunable unit.

  Attributes:
    name: width-slot name, equal to ``producer``.
    producer: path of the conv/dense whose output channels are pruned.
    bn: path of the BatchNorm after the producer, or None (MLP: the bias is a filter coordinate).
    consumer: path of the conv/dense that reads the producer's channels.
    consumer_kind: 'conv' (HWIO kernel) or 'dense' ((in, out) kernel).
    flatten: spatial positions per channel seen by a dense consumer after an NCHW flatten.
    pool: 'max' or 'avg' if a pool sits between the activation and the consumer (A5).
  """

  name: str
  producer: str
  bn: str | None
  consumer: str
  consumer_kind: str
  flatten: int = 1
  pool: str | None = None


def get_path(tree: Mapping[str, Any], path: str) -> Any:
  node = tree
  for key in path.split('/'):
    node = node[key]
  return node


def set_path(tree: dict[str, Any], path: str, value: Any) -> None:
  keys = path.split('/')
  node = tree
  for key in keys[:-1]:
    node = node[key]
  node[keys[-1]] = value


def has_path(tree: Mapping[str, Any], path: str) -> bool:
  try:
    get_path(tree, path)
  except (KeyError, TypeError):
    return False
  return True


def filters(variables: Mapping[str, Any], unit: Unit) -> np.ndarray:
  """The producer's filters as rows W_i (N x D), flattened in PyTorch order (C_in, kh, kw).

  For a layer without BN (MLP), the bias is appended as the last coordinate (ALGORITHMS.md 2.2).
  """
  layer = get_path(variables['params'], unit.producer)
  k = np.asarray(layer['kernel'])
  if k.ndim == 4:  # HWIO -> O, I, H, W
    w = np.transpose(k, (3, 2, 0, 1)).reshape(k.shape[3], -1)
  else:  # (in, out)
    w = k.T
  if unit.bn is None and 'bias' in layer:
    w = np.concatenate([w, np.asarray(layer['bias'])[:, None]], axis=1)
  return w


def bn_affine(variables: Mapping[str, Any], unit: Unit, *, sigma: str = 'std') -> dict[str, np.ndarray]:
  """gamma, beta, mu, var, sigma, alpha, b of the unit's BN (section 1). No BN: alpha=1, b=0.

  Args:
    sigma: 'std' for sqrt(var + eps) (exact), 'variance' for the reference codes' use of the raw
      running variance (A1).
  """
  n = np.asarray(get_path(variables['params'], unit.producer)['kernel']).shape[-1]
  if unit.bn is None:
    one, zero = np.ones(n), np.zeros(n)
    return dict(gamma=one, beta=zero, mu=zero, var=one, sigma=one, alpha=one, b=zero)
  p = get_path(variables['params'], unit.bn)
  s = get_path(variables['batch_stats'], unit.bn)
  gamma = np.asarray(p['scale'], np.float64)
  beta = np.asarray(p['bias'], np.float64)
  mu = np.asarray(s['mean'], np.float64)
  var = np.asarray(s['var'], np.float64)
  if sigma == 'std':
    sg = np.sqrt(var + BN_EPS)
  elif sigma == 'variance':
    sg = var
  else:
    raise ValueError(f"sigma must be 'std' or 'variance', got {sigma!r}")
  alpha = gamma / sg
  return dict(gamma=gamma, beta=beta, mu=mu, var=var, sigma=sg, alpha=alpha, b=beta - alpha * mu)


BN_EPS = 1e-5


def producer_bias(variables: Mapping[str, Any], unit: Unit) -> np.ndarray | None:
  layer = get_path(variables['params'], unit.producer)
  return np.asarray(layer['bias']) if 'bias' in layer else None


def width_of(variables: Mapping[str, Any], unit: Unit) -> int:
  return int(np.shape(get_path(variables['params'], unit.producer)['kernel'])[-1])


def widths_of(variables: Mapping[str, Any], units: tuple[Unit, ...]) -> tuple[int, ...]:
  """The width tuple of a (possibly pruned) variable tree, in unit order."""
  return tuple(width_of(variables, u) for u in units)


# --------------------------------------------------------------------------------------------
# Unit lists per architecture family.


def mlp_units(n_hidden: int) -> tuple[Unit, ...]:
  return tuple(
      Unit(f'ip{i + 1}', f'ip{i + 1}', None, f'ip{i + 2}', 'dense') for i in range(n_hidden)
  )


def cifar_resnet_units(depth: int) -> tuple[Unit, ...]:
  n = (depth - 2) // 6
  out = []
  for s in range(3):
    for i in range(n):
      blk = f'layer{s + 1}_{i}'
      out.append(Unit(f'{blk}/conv1', f'{blk}/conv1', f'{blk}/bn1', f'{blk}/conv2', 'conv'))
  return tuple(out)


def resnet_units(stage_sizes, bottleneck: bool) -> tuple[Unit, ...]:
  out = []
  for s, n in enumerate(stage_sizes):
    for i in range(n):
      blk = f'layer{s + 1}_{i}'
      out.append(Unit(f'{blk}/conv1', f'{blk}/conv1', f'{blk}/bn1', f'{blk}/conv2', 'conv'))
      if bottleneck:
        out.append(Unit(f'{blk}/conv2', f'{blk}/conv2', f'{blk}/bn2', f'{blk}/conv3', 'conv'))
  return tuple(out)


def vgg_units(cifar: bool) -> tuple[Unit, ...]:
  from lbyl_jax.models import VGG16_CFG  # pylint: disable=import-outside-toplevel

  cfg = VGG16_CFG[:-1] if cifar else VGG16_CFG
  out = []
  i = 0
  for pos, c in enumerate(cfg):
    if c == 'M':
      continue
    nxt = cfg[pos + 1] if pos + 1 < len(cfg) else None
    pool = 'max' if nxt == 'M' else None
    if i < 12:
      out.append(Unit(f'conv{i}', f'conv{i}', f'bn{i}', f'conv{i + 1}', 'conv', pool=pool))
    elif cifar:  # 2x2 avg pool of the 2x2 map -> 1 position per channel
      out.append(Unit('conv12', 'conv12', 'bn12', 'fc1', 'dense', flatten=1, pool='avg'))
    else:  # max-pool then adaptive avg pool to 7x7 -> 49 positions per channel
      out.append(Unit('conv12', 'conv12', 'bn12', 'fc1', 'dense', flatten=49, pool='max'))
    i += 1
  return tuple(out)
