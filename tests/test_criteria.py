"""Filter-ranking criteria, kept counts and tie-breaking (docs/criteria.md)."""

from __future__ import annotations

import numpy as np
import pytest

from lbyl_jax.pruning import criteria


def brute_force_keep(score: np.ndarray, m: int) -> np.ndarray:
  """Largest m scores; among equal scores the lower index wins; sorted ascending."""
  order = sorted(range(len(score)), key=lambda i: (-score[i], i))
  return np.array(sorted(order[:m]))


@pytest.mark.parametrize('name', ['l1', 'l2', 'l2-gm'])
def test_scores_match_definitions(name):
  W = np.random.default_rng(0).normal(size=(17, 23))
  score = criteria.get(name)(W)
  if name == 'l1':
    expected = [sum(abs(x) for x in row) for row in W]
  elif name == 'l2':
    expected = [np.sqrt(sum(x * x for x in row)) for row in W]
  else:
    expected = [sum(np.sqrt(((W[i] - W[k]) ** 2).sum()) for k in range(len(W))) for i in range(len(W))]
  np.testing.assert_allclose(score, expected, rtol=1e-12)
  keep, prune = criteria.select(W, 11, name)
  np.testing.assert_array_equal(keep, brute_force_keep(np.asarray(expected), 11))
  np.testing.assert_array_equal(np.sort(np.concatenate([keep, prune])), np.arange(17))
  assert np.all(np.diff(keep) > 0) and np.all(np.diff(prune) > 0)


def test_l2_gm_prunes_filters_nearest_the_geometric_median():
  # Points on a line; distance sums 16.2, 13.2, 12.0, 12.8, 34.2: the median 2.2 and its
  # nearest neighbour 3 are pruned, the outliers kept.
  W = np.array([[0.0], [1.0], [2.2], [3.0], [10.0]])
  keep, prune = criteria.select(W, 3, 'l2-gm')
  np.testing.assert_array_equal(prune, [2, 3])
  np.testing.assert_array_equal(keep, [0, 1, 4])


def test_ties_keep_lower_indices():
  W = np.ones((8, 4))
  W[5] *= 2  # the single largest
  for name in ('l1', 'l2', 'l2-gm'):
    keep, _ = criteria.select(W, 3, name)
    expected = [0, 1, 5] if name != 'l2-gm' else [5, 0, 1]
    np.testing.assert_array_equal(keep, sorted(expected))


def test_random_is_reproducible_per_seed_and_unit():
  W = np.zeros((64, 3))
  a = criteria.select(W, 20, 'random', seed=3, index=7)[0]
  b = criteria.select(W, 20, 'random', seed=3, index=7)[0]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, criteria.select(W, 20, 'random', seed=3, index=8)[0])
  assert not np.array_equal(a, criteria.select(W, 20, 'random', seed=4, index=7)[0])


@pytest.mark.parametrize('n,ratio,rounding,expected', [
    (512, 0.1, 'floor', 460),  # VGG at 10 % (3)
    (64, 0.1, 'floor', 57),
    (64, 0.3, 'floor', 44),  # 5.5 table
    (512, 0.3, 'floor', 358),
    (16, 0.5, 'floor', 8),
    (300, 0.7, 'round', 90),
    (100, 0.8, 'round', 20),
    (10, 0.25, 'floor', 7),
    (10, 0.25, 'round', 8),
    (5, 0.5, 'round', 2),  # Python round: half to even
    (4, 0.9, 'floor', 1),  # at least one channel
    (33, 0.0, 'floor', 33),
])
def test_n_keep(n, ratio, rounding, expected):
  assert criteria.n_keep(n, ratio, rounding=rounding) == expected


@pytest.mark.parametrize('ratio', [1.0, -0.1, 1.5])
def test_bad_ratio(ratio):
  with pytest.raises(ValueError, match=repr(ratio)):
    criteria.n_keep(10, ratio)


def test_bad_names_and_counts():
  with pytest.raises(ValueError, match="unknown criterion 'l3'.*l1, l2, l2-gm, random"):
    criteria.select(np.ones((4, 2)), 2, 'l3')
  with pytest.raises(ValueError, match="rounding must be"):
    criteria.n_keep(10, 0.5, rounding='ceil')
  with pytest.raises(ValueError, match=r'kept count must be in \[1, 4\], got 5'):
    criteria.select(np.ones((4, 2)), 5, 'l2')
  with pytest.raises(ValueError, match="already registered"):
    criteria.register('l2')(lambda W, **kw: W.sum(1))
