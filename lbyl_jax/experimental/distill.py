"""BN-distilled inputs and output agreement: a data-free check of a compressed network as a whole.

:func:`distill` makes inputs from the model alone (ZeroQ, Cai et al. 2020): starting from Gaussian
noise, it minimises by Adam the mismatch between every BatchNorm input's batch statistics and that
layer's running statistics, per channel and scale-free,

  L(x) = mean over BN layers l of mean over channels c of
         ((mu_lc(x) - m_lc) / s_lc)^2 + (sd_lc(x) / s_lc - 1)^2,   s_lc = sqrt(v_lc + eps),

so no image, no label and nothing outside the checkpoint is used. :func:`output_kl` measures how
far a compressed network's predictions are from the original's on such inputs:
mean over inputs of KL(softmax(original) || softmax(compressed)). It sees every layer at once,
which a per-layer error model cannot: the drift that upstream pruning causes downstream.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lbyl_jax.core import units as units_lib


def _bn_loss_fn(spec, variables: Mapping[str, Any]):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  model = spec.build(units_lib.widths_of(variables, spec.units))

  def loss(x):
    terms = []

    def interceptor(next_fun, args, kwargs, ctx):
      if ctx.method_name == '__call__' and isinstance(ctx.module, nn.BatchNorm):
        z = args[0].astype(jnp.float32)
        axes = tuple(range(z.ndim - 1))
        stats = ctx.module.variables['batch_stats']
        s = jnp.sqrt(stats['var'] + ctx.module.epsilon)
        mu = jnp.mean(z, axes)
        sd = jnp.sqrt(jnp.var(z, axes) + ctx.module.epsilon)
        terms.append(jnp.mean(((mu - stats['mean']) / s) ** 2 + (sd / s - 1.0) ** 2))
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      model.apply(variables, x)
    if not terms:
      raise ValueError(f'{spec.name} has no BatchNorm layer to distill inputs from')
    return sum(terms) / len(terms)

  return loss


def distill(spec, variables: Mapping[str, Any], *, n: int = 64, steps: int = 300, lr: float = 0.1,
            seed: int = 0) -> tuple[np.ndarray, dict[str, float]]:
  """``n`` inputs (already normalized, NHWC float32) whose BN statistics match the checkpoint's.

  Adam (beta1 0.9, beta2 0.999) on the pixels of a N(0, 1) start, ``steps`` steps of size ``lr``.

  Returns:
    (inputs, info): info has the BN-matching loss at the start and at the end.

  Raises:
    ValueError: bad n / steps / lr, a model without BatchNorm, or a non-finite loss.
  """
  if int(n) != n or n < 2 or int(steps) != steps or steps < 0 or not lr > 0:
    raise ValueError(f'distill needs integer n >= 2, steps >= 0 and lr > 0, got {n}, {steps}, {lr}')
  variables = jax.tree_util.tree_map(jnp.asarray, variables)
  loss_fn = _bn_loss_fn(spec, variables)
  x = jax.random.normal(jax.random.PRNGKey(seed), (int(n), *spec.input_shape), jnp.float32)

  @jax.jit
  def step(x, m, v, t):
    value, g = jax.value_and_grad(loss_fn)(x)
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g * g
    mhat = m / (1.0 - 0.9 ** t)
    vhat = v / (1.0 - 0.999 ** t)
    return x - lr * mhat / (jnp.sqrt(vhat) + 1e-8), m, v, value

  start = float(jax.jit(loss_fn)(x))
  m = jnp.zeros_like(x)
  v = jnp.zeros_like(x)
  for t in range(1, int(steps) + 1):
    x, m, v, _ = step(x, m, v, jnp.float32(t))
  end = float(jax.jit(loss_fn)(x))
  if not (np.isfinite(start) and np.isfinite(end)):
    raise ValueError(f'{spec.name}: the BN-matching loss is not finite ({start}, {end})')
  return np.asarray(x), dict(loss_start=start, loss_end=end)


@functools.cache
def _jitted_apply(spec, widths: tuple[int, ...]):
  return jax.jit(spec.build(widths).apply)


def logits(spec, variables: Mapping[str, Any], inputs: np.ndarray,
           widths=None) -> np.ndarray:
  """The model's float32 logits on already-normalized inputs (one jitted apply per widths)."""
  if widths is None:
    widths = units_lib.widths_of(variables, spec.units)
  apply = _jitted_apply(spec, tuple(int(w) for w in widths))
  return np.asarray(apply(variables, jnp.asarray(inputs, jnp.float32)))


def output_kl(reference_logits: np.ndarray, other_logits: np.ndarray) -> float:
  """Mean over rows of KL(softmax(reference) || softmax(other)), in float64."""
  p = np.asarray(reference_logits, np.float64)
  q = np.asarray(other_logits, np.float64)
  if p.shape != q.shape or p.ndim != 2:
    raise ValueError(f'output_kl needs two [n, classes] arrays of one shape, got {p.shape}, {q.shape}')
  lp = p - np.logaddexp.reduce(p, axis=1, keepdims=True)
  lq = q - np.logaddexp.reduce(q, axis=1, keepdims=True)
  return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))
