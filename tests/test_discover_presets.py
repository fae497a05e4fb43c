"""The presets run on the same discovery as users' models.

- Discovery on every preset returns exactly the units the papers prune (the lists that used to be
  written by hand, kept here as the expected values): conv1 of every basic block, conv1 and conv2
  of every bottleneck, every VGG conv (the last one feeds the classifier), the MLP's hidden layers;
  each with one plain consumer; the MobileNetV2 presets: the expansion conv of every inverted
  residual (blocks 2..17), read by the projection through the depthwise conv and its BN.
- A preset's module compressed as a user's module (:func:`lbyl_jax.models.custom.custom_spec`, the
  equivalent-module path) gives bitwise the variables of the preset path, the same widths, params
  and MACs, and the same class with the new widths.
- The MACs that discovery derives without a new trace equal a fresh jaxpr walk, pruned or not.
"""

from __future__ import annotations

import numpy as np
import pytest

import lbyl_jax
from lbyl_jax import pipeline
from lbyl_jax.core import trees
from lbyl_jax.models import archs
from lbyl_jax.models import custom
from lbyl_jax.models import nets
from lbyl_jax.pruning import stats


def expected_units(spec) -> list[tuple]:
  """(name, producer, bn, consumer, kind, flatten, pool) of the papers' units of a preset."""
  fam = spec.family
  if fam == 'mobilenet_v2':
    return [(f'features_{b.index}/conv_0_0', f'features_{b.index}/conv_0_0',
             f'features_{b.index}/conv_0_1', f'features_{b.index}/conv_2', 'conv', 1, None)
            for b in spec.model.blocks() if b.expand]
  if fam == 'mlp':
    return [(f'ip{i + 1}', f'ip{i + 1}', None, f'ip{i + 2}', 'dense', 1, None) for i in range(2)]
  if fam in ('cifar_resnet', 'resnet'):
    model = spec.model
    sizes = [(model.depth - 2) // 6] * 3 if fam == 'cifar_resnet' else list(model.stage_sizes)
    bottleneck = fam == 'resnet' and model.bottleneck
    out = []
    for s, n in enumerate(sizes):
      for i in range(n):
        blk = f'layer{s + 1}_{i}'
        out.append((f'{blk}/conv1', f'{blk}/conv1', f'{blk}/bn1', f'{blk}/conv2', 'conv', 1, None))
        if bottleneck:
          out.append((f'{blk}/conv2', f'{blk}/conv2', f'{blk}/bn2', f'{blk}/conv3', 'conv', 1, None))
    return out
  cifar = fam == 'vgg_cifar'
  cfg = nets.VGG16_CFG[:-1] if cifar else nets.VGG16_CFG
  out, i = [], 0
  for pos, c in enumerate(cfg):
    if c == 'M':
      continue
    pool = 'max' if pos + 1 < len(cfg) and cfg[pos + 1] == 'M' else None
    if i < 12:
      out.append((f'conv{i}', f'conv{i}', f'bn{i}', f'conv{i + 1}', 'conv', 1, pool))
    elif cifar:
      out.append(('conv12', 'conv12', 'bn12', 'fc1', 'dense', 1, 'avg'))
    else:
      out.append(('conv12', 'conv12', 'bn12', 'fc1', 'dense', 49, 'max'))
    i += 1
  return out


@pytest.mark.parametrize('name', archs.names())
def test_discovery_returns_the_papers_units(name):
  spec = archs.get(name)
  got = [(u.name, u.producer, u.bn, u.consumer, u.consumer_kind, u.flatten, u.pool)
         for u in spec.units]
  assert got == expected_units(spec)
  for u in spec.units:
    if spec.family == 'mobilenet_v2':
      blk = u.name.split('/')[0]
      assert len(u.consumers) == 1 and u.consumers[0].offset == 0
      assert [(t.path, t.kind) for t in u.through] == [(f'{blk}/conv_1_0', 'depthwise'),
                                                       (f'{blk}/conv_1_1', 'bn')]
      assert (u.activation, u.through_activation, u.compensation) == ('relu6', 'relu6',
                                                                      'depthwise')
      continue
    assert len(u.consumers) == 1 and not u.through and u.consumers[0].offset == 0
    assert u.activation == 'relu' and u.compensation in ('exact', 'maxpool_approx')
  assert spec.default_widths() == tuple(u.width for u in spec.units)


@pytest.mark.parametrize('name, widths_from', [('resnet20', 'l2'), ('vgg16_bn_cifar', 'l1'),
                                               ('lenet_300_100', 'l2'), ('resnet50', 'l2')])
def test_discovery_macs_equal_a_fresh_trace(name, widths_from):
  spec = archs.get(name)
  v = spec.init(1)
  assert spec.discovery.macs(v) == stats.traced_macs(spec)
  small = pipeline.compress(spec, v, method='prune', criterion=widths_from, ratio=0.4)
  assert small.report['macs_after'] == stats.traced_macs(spec, small.widths)
  assert small.report['macs_after'] < small.report['macs_before']


@pytest.mark.parametrize('name, options', [
    ('resnet20', dict(method='lbyl', ratio=0.3)),
    ('resnet20_b', dict(method='nm', criterion='l2-gm', ratio=0.4)),
    ('vgg16_bn_cifar', dict(method='lbyl', ratio=0.2, ratio_overrides=(('conv1*', 0.5),))),
    # BN-free units: a user model has no network-level moment model for the bias correction.
    ('lenet_300_100', dict(method='lbyl', ratio=0.5, bias_correction='off')),
])
def test_a_presets_module_compressed_as_a_user_model_equals_the_preset_path(name, options):
  spec = archs.get(name)
  v = spec.init(2)
  preset = lbyl_jax.compress(name, variables=v, **options)
  user = lbyl_jax.compress(spec.model, v, (1, *spec.input_shape), **options)
  assert user.widths == preset.widths
  a, b = trees.flatten(preset.variables), trees.flatten(user.variables)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
  for key in ('params_after', 'macs_after', 'bytes_after'):
    assert user.report[key] == preset.report[key]
  # The user path keeps the same class (the presets have a ``widths`` field).
  assert type(user.model) is type(spec.model)
  x = np.random.default_rng(0).normal(size=(2, *spec.input_shape)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(user.model.apply(user.variables, x)),
                             np.asarray(preset.model.apply(preset.variables, x)), rtol=1e-6,
                             atol=1e-6)


def test_a_bn_free_user_model_names_the_units_it_cannot_bias_correct():
  spec = archs.get('lenet_300_100')
  res = lbyl_jax.compress(spec.model, spec.init(3), (1, *spec.input_shape), ratio=0.5)
  assert [d['unit'] for d in res.report['bias_skipped']] == ['ip1', 'ip2']
  assert all('BatchNorm' in d['reason'] for d in res.report['bias_skipped'])
  assert res.report['bias_correction'] == 'on'
