"""Physical channel removal with compensation folded into the consumer (docs/surgery.md).

For every unit with kept channels K, pruned channels P, delivery rows S_P and optional constant c:

- consumer input channels are mixed, V'_{:,k} = V_{:,k} + sum_j S[j,k] V_{:,j}, and the columns P
  dropped (conv HWIO: axis 2; dense after an NCHW flatten: channel blocks of ``unit.flatten`` rows);
- the constant c (a_P ~ S_P a_K + c) becomes a shift of the consumer's pre-BN output,
  delta = sum over taps of V[:, P] c: the BN right after the consumer (found by tracing the
  model, :func:`lbyl_jax.models.trace.consumer_bn`) absorbs it as mean -= delta, otherwise the
  consumer's bias += delta (zero-padded borders are ignored);
- the producer's kernel, bias and BN (scale, bias, mean, var) are sliced to K.

All coefficients come from the ORIGINAL weights (docs/README.md#coefficients-from-the-original-weights), so all consumer updates are made
first on the original shapes and all producer slices after: a layer that is both a consumer (its
inputs) and a producer (its outputs) is touched on two different axes, which commute.
Arithmetic is float64; results are cast back to each leaf's dtype. Units with nothing pruned are
left untouched, so ratio 0 returns the original leaves (bitwise identical).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lbyl_jax.core import trees
from lbyl_jax.core import units as units_lib
from lbyl_jax.models import trace


def _check(unit: units_lib.Unit, n: int, keep, S_P, c) -> tuple[np.ndarray, np.ndarray]:
  keep = np.asarray(keep, np.int64)
  if keep.ndim != 1 or keep.size < 1 or np.any(np.diff(keep) <= 0) or keep[0] < 0 or keep[-1] >= n:
    raise ValueError(f'{unit.name}: kept indices must be sorted, unique and in [0, {n});'
                     f' got {keep}')
  prune = np.setdiff1d(np.arange(n), keep)
  S_P = np.asarray(S_P)
  if S_P.shape != (prune.size, keep.size):
    raise ValueError(f'{unit.name}: S_P has shape {S_P.shape}, expected {(prune.size, keep.size)}')
  if not np.all(np.isfinite(S_P)):
    raise ValueError(f'{unit.name}: S_P has non-finite entries')
  if c is not None:
    c = np.asarray(c)
    if c.shape != (prune.size,) or not np.all(np.isfinite(c)):
      raise ValueError(f'{unit.name}: bias constant must be {prune.size} finite values,'
                       f' got shape {c.shape}')
  return keep, prune


def _mix_consumer(new, unit: units_lib.Unit, keep, prune, S_P, c, consumer_bn: str | None) -> None:
  params = new['params']
  layer = dict(trees.get_path(params, unit.consumer))
  V = np.asarray(layer['kernel'])
  n = keep.size + prune.size
  S = np.asarray(S_P, np.float64)
  if unit.consumer_kind == 'conv':
    if V.ndim != 4 or V.shape[2] != n:
      raise ValueError(f'{unit.consumer}: expected an HWIO kernel with {n} inputs, got {V.shape}')
    # float64 arithmetic on the slices only (a VGG classifier kernel is 10^8 entries).
    VP = np.take(V, prune, axis=2).astype(np.float64)
    h, w, _, o = V.shape
    mixed = S.T @ np.moveaxis(VP, 2, 0).reshape(prune.size, h * w * o)  # BLAS, not c_einsum
    Vk = np.take(V, keep, axis=2).astype(np.float64)
    Vk += np.moveaxis(mixed.reshape(keep.size, h, w, o), 0, 2)
    delta = None if c is None else np.einsum('j,hwjo->o', np.asarray(c, np.float64), VP)
  elif unit.consumer_kind == 'dense':
    r = unit.flatten
    if V.ndim != 2 or V.shape[0] != n * r:
      raise ValueError(f'{unit.consumer}: expected a dense kernel with {n}*{r} inputs,'
                       f' got {V.shape}')
    V3 = V.reshape(n, r, V.shape[1])  # NCHW flatten: channel-major blocks
    VP = np.take(V3, prune, axis=0).astype(np.float64)
    mixed = (S.T @ VP.reshape(prune.size, -1)).reshape(keep.size, r, V.shape[1])
    Vk = np.take(V3, keep, axis=0).astype(np.float64)
    Vk += mixed
    Vk = Vk.reshape(keep.size * r, V.shape[1])
    delta = None if c is None else np.einsum('j,jso->o', np.asarray(c, np.float64), VP)
  else:
    raise ValueError(f'{unit.name}: unknown consumer kind {unit.consumer_kind!r}')
  layer['kernel'] = Vk.astype(V.dtype)
  if delta is not None:
    bn = consumer_bn if consumer_bn is not None and trees.has_path(new.get('batch_stats', {}),
                                                                     consumer_bn) else None
    if bn is not None:
      stats = dict(trees.get_path(new['batch_stats'], bn))
      mean = np.asarray(stats['mean'])
      stats['mean'] = (mean.astype(np.float64) - delta).astype(mean.dtype)
      trees.set_path(new['batch_stats'], bn, stats)
    elif 'bias' in layer:
      bias = np.asarray(layer['bias'])
      layer['bias'] = (bias.astype(np.float64) + delta).astype(bias.dtype)
    else:
      raise ValueError(f'{unit.consumer}: a bias constant needs a following BN or a bias to'
                       ' absorb it')
  trees.set_path(params, unit.consumer, layer)


def _slice_producer(new, unit: units_lib.Unit, keep) -> None:
  params = new['params']
  layer = {k: np.take(np.asarray(v), keep, axis=-1)
           for k, v in trees.get_path(params, unit.producer).items()}
  trees.set_path(params, unit.producer, layer)
  if unit.bn is not None:
    bn_p = {k: np.take(np.asarray(v), keep, axis=-1)
            for k, v in trees.get_path(params, unit.bn).items()}
    trees.set_path(params, unit.bn, bn_p)
    stats = {k: np.take(np.asarray(v), keep, axis=-1)
             for k, v in trees.get_path(new['batch_stats'], unit.bn).items()}
    trees.set_path(new['batch_stats'], unit.bn, stats)


def apply(
    spec, variables: Mapping[str, Any], solutions: Mapping[str, tuple[Any, Any, Any]]
) -> tuple[tuple[int, ...], dict[str, Any]]:
  """Builds the physically smaller variables.

  Args:
    spec: the :class:`lbyl_jax.models.archs.ArchSpec` (its ``units`` give the paths).
    variables: the original variables.
    solutions: ``{unit_name: (K, S_P, c or None)}``; units not listed are left as they are.

  Returns:
    (widths, new_variables): the new width tuple (``units.widths_of``) and the new tree.
  """
  by_name = {u.name: u for u in spec.units}
  unknown = sorted(set(solutions) - set(by_name))
  if unknown:
    raise ValueError(f'{spec.name}: no prunable unit named {", ".join(unknown)}')
  new = trees.copy_tree(variables)
  plan = []
  for unit in spec.units:
    if unit.name not in solutions:
      continue
    keep, S_P, c = solutions[unit.name]
    n = units_lib.width_of(variables, unit)
    keep, prune = _check(unit, n, keep, S_P, c)
    if prune.size:
      plan.append((unit, keep, prune, S_P, c))
  for unit, keep, prune, S_P, c in plan:
    _mix_consumer(new, unit, keep, prune, S_P, c,
                  trace.consumer_bn(spec, unit.consumer) if c is not None else None)
  for unit, keep, _, _, _ in plan:
    _slice_producer(new, unit, keep)
  return units_lib.widths_of(new, spec.units), new
