"""What the methods see of a unit: its filters as rows and its BN's affine terms (docs/README.md).

Notation: a BN after the producer computes ``gamma (z - mu) / sigma + beta = alpha z + b`` with
``alpha = gamma / sigma`` and ``b = beta - alpha mu``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lbyl_jax.core import trees
from lbyl_jax.core.bn import BN_EPS
from lbyl_jax.core.units import Unit


def filters(variables: Mapping[str, Any], unit: Unit, dtype=None) -> np.ndarray:
  """The producer's filters as rows W_i (N x D), flattened in PyTorch order (C_in, kh, kw).

  For a layer without BN (MLP), the bias is appended as the last coordinate (docs/lbyl.md).
  ``dtype``: of the result (default: the kernel's), converted in the same pass as the transpose.
  """
  layer = trees.get_path(variables['params'], unit.producer)
  k = np.asarray(layer['kernel'])
  dtype = k.dtype if dtype is None else np.dtype(dtype)
  if k.ndim == 4:  # HWIO -> O, I, H, W: one C-ordered copy, so the reshape copies nothing
    w = np.transpose(k, (3, 2, 0, 1)).astype(dtype, order='C').reshape(k.shape[3], -1)
  else:  # (in, out)
    w = k.T.astype(dtype, copy=False)
  if unit.bn is None and 'bias' in layer:
    w = np.concatenate([w, np.asarray(layer['bias'], dtype)[:, None]], axis=1)
  return w


def bn_affine(variables: Mapping[str, Any], unit: Unit, *, sigma: str = 'std',
              eps: float = BN_EPS) -> dict[str, np.ndarray]:
  """gamma, beta, mu, var, sigma, alpha, b of the unit's BN. No BN: alpha=1, b=0.

  A BatchNorm without scale (bias) has gamma = 1 (beta = 0).

  Args:
    sigma: 'std' for sqrt(var + eps) (exact), 'variance' for the reference codes' use of the raw
      running variance (docs/lbyl.md, reference forms).
    eps: the BatchNorm's epsilon (:meth:`ArchSpec.bn_epsilon`).
  """
  n = np.asarray(trees.get_path(variables['params'], unit.producer)['kernel']).shape[-1]
  if unit.bn is None:
    one, zero = np.ones(n), np.zeros(n)
    return dict(gamma=one, beta=zero, mu=zero, var=one, sigma=one, alpha=one, b=zero)
  p = (trees.get_path(variables['params'], unit.bn)
       if trees.has_path(variables['params'], unit.bn) else {})
  s = trees.get_path(variables['batch_stats'], unit.bn)
  mu = np.asarray(s['mean'], np.float64)
  var = np.asarray(s['var'], np.float64)
  gamma = np.asarray(p['scale'], np.float64) if 'scale' in p else np.ones_like(mu)
  beta = np.asarray(p['bias'], np.float64) if 'bias' in p else np.zeros_like(mu)
  if sigma == 'std':
    sg = np.sqrt(var + eps)
  elif sigma == 'variance':
    sg = var
  else:
    raise ValueError(f"sigma must be 'std' or 'variance', got {sigma!r}")
  alpha = gamma / sg
  return dict(gamma=gamma, beta=beta, mu=mu, var=var, sigma=sg, alpha=alpha, b=beta - alpha * mu)


def producer_bias(variables: Mapping[str, Any], unit: Unit) -> np.ndarray | None:
  layer = trees.get_path(variables['params'], unit.producer)
  return np.asarray(layer['bias']) if 'bias' in layer else None


def bn_terms(variables: Mapping[str, Any], unit: Unit, *, sigma: str = 'std',
             eps: float = BN_EPS) -> dict[str, np.ndarray]:
  """:func:`bn_affine` with a producer bias in front of the BN folded into mu and b
  (BN(Wx + bias) = alpha W x + beta - alpha (mu - bias); torchvision VGG convs have biases)."""
  affine = bn_affine(variables, unit, sigma=sigma, eps=eps)
  bn = {k: np.asarray(v, np.float64) for k, v in affine.items()}
  bias = producer_bias(variables, unit)
  if unit.bn is not None and bias is not None:
    bn['mu'] = bn['mu'] - np.asarray(bias, np.float64)
    bn['b'] = bn['beta'] - bn['alpha'] * bn['mu']
  return bn
