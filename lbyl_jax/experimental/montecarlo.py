"""Monte Carlo references for the closed-form moments (tests and diagnostics, not the product).

:func:`mc_relu_moments` samples a Gaussian and rectifies it; :func:`mc_propagate` pushes Gaussian
inputs through the real Flax model, calibrating every BatchNorm on the fly (docs/bn_moments.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lbyl_jax.core import trees
from lbyl_jax.core import units as units_lib


def mc_relu_moments(mean: np.ndarray, cov: np.ndarray, *, n: int = 200_000, seed: int = 0,
                    activation: str = 'relu') -> tuple[np.ndarray, np.ndarray]:
  """Monte Carlo E[a] and E[a a^T] for a = act(y), y ~ N(mean, cov); float64 NumPy, seeded."""
  rng = np.random.default_rng(seed)
  y = rng.multivariate_normal(np.asarray(mean, np.float64), np.asarray(cov, np.float64), size=n,
                              method='eigh')
  a = np.maximum(y, 0.0) if activation == 'relu' else y
  return a.mean(0), a.T @ a / n

def _interior(x: np.ndarray, margin: int) -> np.ndarray:
  """Rows of per-channel samples; 4-D maps drop ``margin`` border pixels (zero-padding effects)."""
  if x.ndim == 4:
    if margin and x.shape[1] > 2 * margin and x.shape[2] > 2 * margin:
      x = x[:, margin:-margin, margin:-margin, :]
    return x.reshape(-1, x.shape[-1])
  return x.reshape(x.shape[0], -1)

def mc_propagate(spec, variables: Mapping[str, Any], *, n: int = 128, seed: int = 0,
                 input_hw: tuple[int, int] | None = None, margin: int = 1,
                 input_mean: float = 0.0, input_var: float = 1.0) -> dict[str, Any]:
  """Brute-force reference: Gaussian inputs pushed through the real Flax model, layer by layer.

  Inputs are iid N(input_mean, input_var) per pixel and channel (the assumption of
  :func:`propagate`). Every BatchNorm is calibrated on the fly: it normalizes with the batch
  statistics of its input over the interior positions (``margin`` border pixels dropped), i.e. its
  running statistics are set to what this input distribution produces, which is the premise of the
  BN model. The calibrated statistics are returned, so the same network can be re-run.

  Returns:
    dict(inputs={unit: (mean, var)} of the producer's input, preact={unit: (mean, var)} of the
    pre-activation (BN output, or the producer output for BN-free units), batch_stats=the
    calibrated running statistics as a tree like ``variables['batch_stats']``).
  """
  rng = np.random.default_rng(seed)
  hw = tuple(input_hw) if input_hw is not None else tuple(spec.input_shape[:2])
  x = input_mean + math.sqrt(input_var) * rng.standard_normal((n, *hw, spec.input_shape[-1]))
  x = jnp.asarray(x, jnp.float32)
  producers = {u.producer: u for u in spec.units}
  bns = {u.bn: u for u in spec.units if u.bn is not None}
  inputs, preact, stats = {}, {}, {}

  def stat(v):
    v = _interior(np.asarray(v, np.float64), margin)
    return v.mean(0), v.var(0)

  def interceptor(next_fun, args, kwargs, ctx):
    if ctx.method_name != '__call__':
      return next_fun(*args, **kwargs)
    path = '/'.join(ctx.module.path)
    if isinstance(ctx.module, nn.BatchNorm):
      z = args[0]
      mu, var = stat(z)
      stats[path] = (mu, var)
      p = ctx.module.variables['params']
      y = (z - jnp.asarray(mu, z.dtype)) / jnp.sqrt(jnp.asarray(var, z.dtype) + ctx.module.epsilon)
      y = y * p['scale'] + p['bias']
      if path in bns:
        preact[bns[path].name] = stat(y)
      return y
    if path in producers:
      inputs[producers[path].name] = stat(args[0])
      y = next_fun(*args, **kwargs)
      if producers[path].bn is None:
        preact[producers[path].name] = stat(y)
      return y
    return next_fun(*args, **kwargs)

  model = spec.build(units_lib.widths_of(variables, spec.units))
  with nn.intercept_methods(interceptor):
    model.apply(variables, x)
  batch_stats = None
  if 'batch_stats' in variables:
    batch_stats = jax.tree_util.tree_map(np.asarray, dict(variables['batch_stats']))
    for path, (mu, var) in stats.items():
      trees.set_path(batch_stats, path, dict(mean=mu.astype(np.float32),
                                                 var=var.astype(np.float32)))
  return dict(inputs=inputs, preact=preact, batch_stats=batch_stats)
