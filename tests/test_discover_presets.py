"""Discovery and generalized surgery reproduce the presets' hand-written machinery exactly.

- :func:`lbyl_jax.graph.discover` on every preset returns the units of :mod:`lbyl_jax.units`
  (same producers, BNs, consumers, consumer kinds, flatten, pool, in the same order);
- :func:`lbyl_jax.graph.apply_plan` equals :func:`lbyl_jax.surgery.apply` bitwise on random plans;
- :func:`lbyl_jax.user_models.compress` on a preset's module equals
  :func:`lbyl_jax.restore.restore` bitwise, and returns the same class with the new widths.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from lbyl_jax import archs
from lbyl_jax import graph
from lbyl_jax import restore
from lbyl_jax import surgery
from lbyl_jax import user_models


def random_variables(spec, seed=0):
  """He-normal kernels and random BN / biases in NumPy from the preset's abstract shapes."""
  rng = np.random.default_rng(seed)

  def leaf(path, a):
    name = path[-1].key
    if name == 'kernel':
      x = rng.standard_normal(a.shape) * math.sqrt(2.0 / math.prod(a.shape[:-1]))
    elif name in ('var', 'scale'):
      x = rng.uniform(0.5, 1.5, a.shape)
    else:
      x = 0.1 * rng.standard_normal(a.shape)
    return x.astype(a.dtype)

  return jax.tree_util.tree_map_with_path(leaf, spec.abstract_variables())


def assert_trees_equal(a, b):
  la, ta = jax.tree_util.tree_flatten_with_path(a)
  lb, tb = jax.tree_util.tree_flatten_with_path(b)
  assert ta == tb
  for (path, x), (_, y) in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, path
    assert np.array_equal(x, y), path


@pytest.mark.parametrize('name', archs.names())
def test_discovery_returns_the_hand_written_units(name):
  spec = archs.get(name)
  d = graph.discover(spec.model, spec.abstract_variables(), (1, *spec.input_shape))
  assert d.as_preset_units() == spec.units
  assert all(u.compensation in ('exact', 'maxpool_approx') for u in d.units)
  assert all(u.activation == 'relu' for u in d.units)
  assert graph.widths_of(spec.abstract_variables(), d) == spec.default_widths()


@pytest.mark.parametrize('name', ['resnet20', 'resnet20_b', 'vgg16_bn_cifar', 'lenet_300_100',
                                  'resnet18'])
def test_apply_plan_equals_surgery(name):
  spec = archs.get(name)
  v = random_variables(spec, 1)
  d = graph.discover(spec.model, v, (1, *spec.input_shape))
  rng = np.random.default_rng(7)
  plan = {}
  for u in d.units:
    m = int(rng.integers(1, u.width + 1))
    keep = np.sort(rng.choice(u.width, m, replace=False))
    c = rng.standard_normal(u.width - m) if rng.random() < 0.7 else None
    plan[u.name] = (keep, 0.1 * rng.standard_normal((u.width - m, m)), c)
  widths, expected = surgery.apply(spec, v, plan)
  got = graph.apply_plan(v, d, plan)
  assert_trees_equal(expected, got)
  assert graph.widths_of(got, d) == widths


@pytest.mark.parametrize('name,options', [
    ('resnet20', dict(method='lbyl')),  # default bias correction, padding-aware fold
    ('resnet20_b', dict(method='nm', criterion='l2-gm')),
    ('resnet20', dict(method='bnm', bnm_cov='identity', bias_correction='on',
                      bias_fold='all_taps')),
    ('resnet20', dict(method='lbyl', bnm_cov='identity', guard='moments', criterion='random')),
    ('vgg16_bn_cifar', dict(method='nm', ratio_overrides={'conv1*': 0.2})),  # + default bias fold
    ('lenet_300_100', dict(method='lbyl', keep_rounding='round', bias_correction='off')),
])
def test_compress_equals_restore(name, options):
  spec = archs.get(name)
  v = random_variables(spec, 2)
  options = dict(dict(ratio=0.4), **options)
  widths, expected, report = restore.restore(spec, v, restore.RestoreConfig(**options))
  res = user_models.compress(spec.model, v, (1, *spec.input_shape),
                             hparams=spec.hparams or None, **options)
  assert_trees_equal(expected, res.variables)
  assert tuple(res.report['widths']) == tuple(widths)
  assert res.report['module_kind'] == 'widths field'
  assert res.module == spec.build(widths)
  assert res.report['params_after'] == report['params_after']
  assert res.report['macs_after'] == report['macs_after']
