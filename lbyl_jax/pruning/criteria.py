"""Filter-ranking criteria and the kept count (docs/criteria.md).

A criterion maps the filters W (N x D, one row per output channel, bias appended for MLPs) to one
score per channel; the m highest-scoring channels are kept. Ties are broken by a stable sort of
the negated score, so among equal scores the lower channel index is kept, and the kept indices are
returned sorted ascending.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from lbyl_jax.core.registry import Registry

Criterion = Callable[..., np.ndarray]

# ``fn(W, *, seed, index) -> scores``; register a new one with ``@REGISTRY.register('name')``.
REGISTRY: Registry[Criterion] = Registry('criterion')
register = REGISTRY.register
get = REGISTRY.get
names = REGISTRY.names


@register('l1')
def l1(W: np.ndarray, *, seed: int = 0, index: int = 0) -> np.ndarray:
  """sum |W_i| (keep the largest)."""
  del seed, index
  return np.abs(W).sum(axis=1)


@register('l2')
def l2(W: np.ndarray, *, seed: int = 0, index: int = 0) -> np.ndarray:
  """||W_i||_2 (keep the largest; LBYL's main criterion)."""
  del seed, index
  return np.sqrt(np.square(W).sum(axis=1))


@register('l2-gm')
def l2_gm(W: np.ndarray, *, seed: int = 0, index: int = 0) -> np.ndarray:
  """FPGM: d_i = sum_k ||W_i - W_k||_2; keeping the largest prunes the filters nearest the GM."""
  del seed, index
  W = np.asarray(W, np.float64)
  # Pairwise differences (not the Gram identity), so duplicate filters are exactly 0 apart.
  import scipy.spatial.distance  # pylint: disable=import-outside-toplevel  (0.1-0.2 s to import)

  return scipy.spatial.distance.cdist(W, W, 'euclidean').sum(axis=1)


@register('random')
def random(W: np.ndarray, *, seed: int = 0, index: int = 0) -> np.ndarray:
  """Uniform random scores from a generator seeded by (seed, unit index): reproducible per unit."""
  return np.random.default_rng([int(seed), int(index)]).random(W.shape[0])


def n_keep(n: int, ratio: float, *, rounding: str = 'floor') -> int:
  """Kept count for ``n`` channels at pruning ratio ``ratio`` (docs/criteria.md#kept-count), at least 1.

  Args:
    rounding: 'floor' mirrors the codes' ``int(N * (1 - r))`` (convs); 'round' mirrors the LeNet
      path's Python ``round`` (half to even).
  """
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f'pruning ratio must be in [0, 1), got {ratio!r}')
  x = n * (1.0 - ratio)
  if rounding == 'floor':
    m = int(math.floor(x))
  elif rounding == 'round':
    m = int(round(x))
  else:
    raise ValueError(f"rounding must be 'floor' or 'round', got {rounding!r}")
  return max(1, min(n, m))


def select(
    W: np.ndarray, m: int, criterion: str, *, seed: int = 0, index: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """(K, P): the m kept channels (largest scores, stable ties) and the pruned rest, both sorted."""
  n = W.shape[0]
  if not 1 <= m <= n:
    raise ValueError(f'kept count must be in [1, {n}], got {m}')
  score = np.asarray(get(criterion)(W, seed=seed, index=index), np.float64)
  if score.shape != (n,) or not np.all(np.isfinite(score)):
    raise ValueError(f'criterion {criterion!r} gave invalid scores (shape {score.shape})')
  order = np.argsort(-score, kind='stable')
  keep = np.sort(order[:m])
  prune = np.sort(order[m:])
  return keep, prune
