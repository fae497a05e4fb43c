"""The BN range rule (--act-ranges bn, the default of --act-bits) on user models.

- A preset's module handed over as a user's module (``custom_spec``) gets the preset rule's ranges
  (the graph walk of :mod:`lbyl_jax.quant.act_graph` against the presets' hand-written layouts:
  option-A and projection shortcuts, the torchvision max-pool stem, VGG pools, MobileNetV2's
  ReLU6 and linear bottlenecks).
- A small user CNN (residual add, max pool, ReLU6, depthwise conv, global mean, a BN-free Dense
  head) against a float64 NumPy / SciPy reference written here.
- A layer whose input the rule cannot determine is named in the error, which points to the
  observed-range sources; the pipeline runs with the default on a pruned user model.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import lbyl_jax
from lbyl_jax.models import archs, custom
from lbyl_jax.quant import actquant


def _random_variables(spec, seed=0):
  rng = np.random.default_rng(seed)
  v = jax.tree_util.tree_map(
      lambda a: ((rng.random(a.shape) + 0.1) * np.where(rng.random(a.shape) < 0.3, -1, 1)
                 ).astype(np.float32), spec.abstract_variables(None))
  v['batch_stats'] = jax.tree_util.tree_map(np.abs, v['batch_stats'])
  return v


@pytest.mark.parametrize('name', ['resnet20', 'resnet20_b', 'vgg16_bn_cifar',
                                  'mobilenet_v2_cifar10'])
def test_a_presets_module_as_a_user_model_gets_the_preset_ranges(name):
  spec = archs.get(name)
  v = _random_variables(spec)
  preset = actquant.bn_ranges(spec, v, k=4.0)
  user_spec = custom.custom_spec(spec.model, (1, *spec.input_shape), mean=spec.mean, std=spec.std)
  user = actquant.bn_ranges(user_spec, v, k=4.0)
  assert set(user.layers) == set(preset.layers)
  for p, r in preset.layers.items():
    u = user.layers[p]
    assert u.signed == r.signed, p
    np.testing.assert_allclose([u.lo, u.hi], [r.lo, r.hi], rtol=1e-12, atol=1e-12, err_msg=p)


class Small(nn.Module):
  """conv-BN-ReLU, a residual block with an identity shortcut, a 2x2 max pool, a ReLU6 stage, a
  depthwise conv, a global mean and a BN-free two-layer Dense head."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, name=name)  # noqa: E731
    a = nn.relu(bn('bn0')(nn.Conv(6, (3, 3), padding=1, use_bias=False, name='conv0')(x)))
    h = nn.relu(bn('bn1')(nn.Conv(6, (3, 3), padding=1, use_bias=False, name='conv1')(a)))
    h = bn('bn2')(nn.Conv(6, (3, 3), padding=1, use_bias=False, name='conv2')(h))
    h = nn.max_pool(nn.relu(h + a), (2, 2), strides=(2, 2))
    h = nn.relu6(bn('bn3')(nn.Conv(8, (1, 1), use_bias=False, name='conv3')(h)))
    h = nn.relu6(bn('bn4')(nn.Conv(8, (3, 3), padding=1, feature_group_count=8, use_bias=False,
                                   name='dw4')(h)))
    h = jnp.mean(h, axis=(1, 2))
    h = nn.relu(nn.Dense(5, name='fc1')(h))
    return nn.Dense(3, name='fc2')(h)


def _relu_moments64(m, s):
  """E[ReLU(y)], Var[ReLU(y)] of y ~ N(m, s^2) (the rectified Gaussian, float64)."""
  a = m / s
  e1 = m * stats.norm.cdf(a) + s * stats.norm.pdf(a)
  e2 = (m * m + s * s) * stats.norm.cdf(a) + m * s * stats.norm.pdf(a)
  return e1, e2 - e1 * e1


def test_small_user_cnn_against_a_float64_reference():
  module = Small()
  rng = np.random.default_rng(1)
  v = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  v = jax.tree_util.tree_map(lambda a: rng.normal(size=a.shape).astype(np.float32), v)
  v['batch_stats'] = jax.tree_util.tree_map(np.abs, v['batch_stats'])
  mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
  spec = custom.custom_spec(module, (1, 8, 8, 3), mean=mean, std=std,
                            apply_kwargs={'train': False})
  k = 3.0
  got = actquant.bn_ranges(spec, v, k=k)

  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v['params'])
  g = lambda n: (p[n]['bias'], np.abs(p[n]['scale']))  # noqa: E731
  ref = {}
  m_img, s_img = np.asarray(mean), np.asarray(std)
  ref['conv0'] = (np.min(-m_img / s_img), np.max((1 - m_img) / s_img), True)
  relu_hi = lambda m, s, z=k: max(0.0, float(np.max(m + z * s)))  # noqa: E731
  b0, g0 = g('bn0')
  ref['conv1'] = (0.0, relu_hi(b0, g0), False)
  b1, g1 = g('bn1')
  ref['conv2'] = (0.0, relu_hi(b1, g1), False)
  b2, g2 = g('bn2')
  m_sc, v_sc = _relu_moments64(b0, g0)
  z4 = stats.norm.ppf(stats.norm.cdf(k) ** 0.25)  # the max of 4 iid copies
  ref['conv3'] = (0.0, relu_hi(b2 + m_sc, np.sqrt(g2 ** 2 + v_sc), z4), False)
  b3, g3 = g('bn3')
  ref['dw4'] = (0.0, min(relu_hi(b3, g3), 6.0), False)
  b4, g4 = g('bn4')
  ref['fc1'] = (0.0, min(relu_hi(b4, g4), 6.0), False)  # the mean: the per-element bound
  e1, var = _relu_moments64(b4, g4)  # ReLU's moments for the ReLU6 (an upper bound)
  w1 = p['fc1']['kernel']
  m_fc = e1 @ w1 + p['fc1']['bias']
  s_fc = np.sqrt(var @ w1 ** 2)
  ref['fc2'] = (0.0, relu_hi(m_fc, s_fc), False)

  assert set(got.layers) == set(ref)
  for path, (lo, hi, signed) in ref.items():
    r = got.layers[path]
    assert r.signed == signed, path
    np.testing.assert_allclose([r.lo, r.hi], [lo, hi], rtol=1e-9, atol=1e-12, err_msg=path)


class ConvChain(nn.Module):
  """A conv without a BatchNorm feeding a second conv: the rule has no Gaussian for conv1's input."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3), name='conv0')(x)))
    x = nn.relu(nn.Conv(4, (3, 3), name='conv1')(x))
    x = nn.Conv(4, (3, 3), name='conv2')(x)
    return nn.Dense(2, name='head')(x.mean(axis=(1, 2)))


class Gated(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3), name='conv0')(x))
    x = x * nn.sigmoid(x)
    return nn.Dense(2, name='head')(x.mean(axis=(1, 2)))


@pytest.mark.parametrize('module, layer, reason', [
    (ConvChain(), 'conv2', 'the output of conv conv1'),
    (Gated(), 'head', 'primitive logistic'),
])
def test_undetermined_inputs_are_named(module, layer, reason):
  v = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  spec = custom.custom_spec(module, (1, 8, 8, 3))
  with pytest.raises(ValueError, match=layer) as info:
    actquant.bn_ranges(spec, v, k=4.0)
  msg = str(info.value)
  assert reason in msg and '--act-ranges distilled' in msg and '--act-ranges calibration' in msg


class Plain(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    for i in range(2):
      x = nn.Conv(8, (3, 3), padding=1, use_bias=False, name=f'conv{i}')(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, name=f'bn{i}')(x))
    return nn.Dense(3, name='head')(jnp.mean(x, axis=(1, 2)))


@pytest.mark.parametrize('module, quant_method', [(Small(), None), (Plain(), 'dfq')])
def test_default_act_ranges_on_a_pruned_user_model(tmp_path, module, quant_method):
  """--act-bits with its default ranges on a pruned user model (DFQ: its folded BN statistics)."""
  v = jax.tree_util.tree_map(np.asarray, module.init(jax.random.PRNGKey(0),
                                                     jnp.zeros((1, 8, 8, 3))))
  images = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
  extra = dict(quant_method=quant_method, bits=6) if quant_method else {}
  result = lbyl_jax.compress(module, v, (1, 8, 8, 3),
                             model_options=dict(apply_kwargs={'train': False}),
                             method='prune', ratio=0.5, act_bits=4, **extra)
  assert result.report['act_quant']['source'] == 'bn'
  logits = np.asarray(result.apply(images))
  assert np.all(np.isfinite(logits))
  plain = np.asarray(result.model.apply(result.variables,
                                        archs.normalize_fn(result.spec)(images)))
  assert not np.array_equal(plain, logits)  # the activations were quantized
  loaded = lbyl_jax.load(result.save(tmp_path / 'run'), module=module)
  np.testing.assert_array_equal(np.asarray(loaded.apply(images)), logits)
