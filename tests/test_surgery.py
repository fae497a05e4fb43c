"""Physical channel removal (docs/surgery.md; properties T4, T11) and its folding rules."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lbyl_jax import pipeline
from lbyl_jax.core import units as units_lib
from lbyl_jax.core.bn import BN_EPS
from lbyl_jax.models import archs
from lbyl_jax.models import trace
from lbyl_jax.pruning import surgery
from conftest import toy_spec

EPS = BN_EPS


class ConvPair(nn.Module):
  """conv1 (3x3) -> bn1 -> ReLU -> conv2 (3x3) -> bn2, no biases."""

  n: int
  out: int
  widths: tuple[int, ...] | None = None

  @nn.compact
  def __call__(self, x):
    n = self.n if self.widths is None else self.widths[0]
    x = nn.Conv(n, (3, 3), padding='VALID', use_bias=False, name='conv1')(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, epsilon=EPS, name='bn1')(x))
    x = nn.Conv(self.out, (3, 3), padding='VALID', use_bias=False, name='conv2')(x)
    return nn.BatchNorm(use_running_average=True, epsilon=EPS, name='bn2')(x)


class DensePair(nn.Module):
  """l1 (dense, per position) -> ReLU -> NCHW flatten of ``flatten`` positions -> l2 (dense)."""

  n: int
  out: int
  flatten: int = 1
  bias: bool = True
  widths: tuple[int, ...] | None = None

  @nn.compact
  def __call__(self, x):  # x: (batch, positions, features)
    n = self.n if self.widths is None else self.widths[0]
    x = x.reshape(x.shape[0], self.flatten, -1)
    x = nn.relu(nn.Dense(n, use_bias=self.bias, name='l1')(x))
    x = jnp.transpose(x, (0, 2, 1)).reshape(x.shape[0], -1)  # channel-major blocks
    return nn.Dense(self.out, use_bias=self.bias, name='l2')(x)


def random_variables(spec, widths=None, seed=0):
  """He-normal kernels and random BN (NumPy; much faster than ``spec.init`` on a CPU)."""
  rng = np.random.default_rng(seed)
  abstract = spec.abstract_variables(widths)

  def leaf(path, a):
    coll, name = path[0].key, path[-1].key
    if name == 'kernel':
      x = rng.standard_normal(a.shape) * math.sqrt(2.0 / math.prod(a.shape[:-1]))
    elif name in ('var', 'scale'):
      x = rng.uniform(0.5, 1.5, a.shape)
    else:  # mean, BN bias, layer bias
      x = 0.1 * rng.standard_normal(a.shape)
    del coll
    return x.astype(a.dtype)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def shapes(tree):
  return jax.tree_util.tree_map(lambda a: (tuple(np.shape(a)), np.dtype(a.dtype)), tree)


def random_plan(spec, variables, ratio, seed=0, with_bias=False):
  """{unit: (K, S_P, c)} with random kept sets and coefficients."""
  rng = np.random.default_rng(seed)
  plan = {}
  for u in spec.units:
    n = units_lib.width_of(variables, u)
    m = max(1, int(n * (1 - ratio)))
    keep = np.sort(rng.choice(n, m, replace=False))
    c = rng.normal(size=n - m) if with_bias else None
    plan[u.name] = (keep, 0.1 * rng.normal(size=(n - m, m)), c)
  return plan


# --------------------------------------------------------------------------------------------
# The BN after a consumer, found by tracing the model.


@pytest.mark.parametrize('arch,consumer,expected', [
    ('resnet20', 'layer1_0/conv2', 'layer1_0/bn2'),
    ('resnet50', 'layer1_0/conv2', 'layer1_0/bn2'),
    ('resnet50', 'layer4_2/conv3', 'layer4_2/bn3'),
    ('vgg16_bn_cifar', 'conv5', 'bn5'),
    ('vgg16_bn_cifar', 'fc1', 'bn_fc1'),
    ('vgg16_bn', 'fc1', None),
    ('lenet_300_100', 'ip2', None),
])
def test_consumer_bn(arch, consumer, expected):
  spec = archs.get(arch)
  assert trace.consumer_bn(spec, consumer) == expected
  for u in spec.units:  # every consumer of these archs is covered by the tracing or has a bias
    if u.consumer == consumer:
      break
  else:
    pytest.fail(f'{consumer} is not a consumer of {arch}')


# --------------------------------------------------------------------------------------------
# Folding rules on small hand-made layers, checked by forward passes in float64.


def conv_valid(x, k):
  """NHWC x HWIO 'VALID' convolution with loops over taps (independent of lax)."""
  kh, kw = k.shape[:2]
  H, W = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  out = 0.0
  for i in range(kh):
    for j in range(kw):
      out = out + np.einsum('bhwc,co->bhwo', x[:, i:i + H, j:j + W, :], k[i, j])
  return out


def test_conv_consumer_mixing_bias_constant_and_bn_shift_are_exact():
  rng = np.random.default_rng(0)
  n, m, out = 7, 4, 5
  keep = np.array([0, 2, 3, 6])
  prune = np.array([1, 4, 5])
  S = rng.normal(size=(3, m))
  c = rng.normal(size=3)
  variables = {
      'params': {
          'conv1': {'kernel': rng.normal(size=(3, 3, 2, n))},
          'bn1': {'scale': rng.uniform(0.5, 1.5, n), 'bias': rng.normal(size=n)},
          'conv2': {'kernel': rng.normal(size=(3, 3, n, out))},
          'bn2': {'scale': rng.uniform(0.5, 1.5, out), 'bias': rng.normal(size=out)},
      },
      'batch_stats': {'bn1': {'mean': rng.normal(size=n), 'var': rng.uniform(0.5, 1.5, n)},
                      'bn2': {'mean': rng.normal(size=out), 'var': rng.uniform(0.5, 1.5, out)}},
  }
  unit = units_lib.Unit.of('conv1', 'conv1', 'bn1', 'conv2', 'conv')
  spec = toy_spec(ConvPair(n, out), (unit,), (8, 8, 2))
  widths, new = surgery.apply(spec, variables, {'conv1': (keep, S, c)})
  assert widths == (m,)
  # Activations that satisfy a_P = S a_K + c exactly: the consumer's BN output must not change.
  aK = rng.normal(size=(2, 6, 6, m))
  a = np.zeros((2, 6, 6, n))
  a[..., keep] = aK
  a[..., prune] = np.einsum('jk,bhwk->bhwj', S, aK) + c

  def consumer(v, act):
    z = conv_valid(act, v['params']['conv2']['kernel'])
    bn, st = v['params']['bn2'], v['batch_stats']['bn2']
    return (z - st['mean']) / np.sqrt(st['var'] + EPS) * bn['scale'] + bn['bias']

  np.testing.assert_allclose(consumer(new, aK), consumer(variables, a), rtol=1e-12, atol=1e-11)
  # Producer and its BN sliced to K; the consumer's own BN keeps its width.
  np.testing.assert_array_equal(new['params']['conv1']['kernel'],
                                variables['params']['conv1']['kernel'][..., keep])
  for coll, key in (('params', 'scale'), ('params', 'bias'), ('batch_stats', 'mean'),
                    ('batch_stats', 'var')):
    np.testing.assert_array_equal(new[coll]['bn1'][key], variables[coll]['bn1'][key][keep])
  np.testing.assert_array_equal(new['params']['bn2']['scale'], variables['params']['bn2']['scale'])
  # The caller's tree is untouched.
  assert variables['params']['conv2']['kernel'].shape == (3, 3, n, out)


@pytest.mark.parametrize('flatten', [1, 3])
def test_dense_consumer_after_nchw_flatten(flatten):
  rng = np.random.default_rng(1)
  n, m, out = 6, 4, 3
  keep, prune = np.array([1, 2, 4, 5]), np.array([0, 3])
  S, c = rng.normal(size=(2, m)), rng.normal(size=2)
  variables = {'params': {
      'l1': {'kernel': rng.normal(size=(8, n)), 'bias': rng.normal(size=n)},
      'l2': {'kernel': rng.normal(size=(n * flatten, out)), 'bias': rng.normal(size=out)},
  }}
  unit = units_lib.Unit.of('l1', 'l1', None, 'l2', 'dense', flatten=flatten)
  spec = toy_spec(DensePair(n, out, flatten), (unit,), (1, flatten, 8))
  _, new = surgery.apply(spec, variables, {'l1': (keep, S, c)})
  aK = rng.normal(size=(5, m, flatten))  # (batch, channel, position): NCHW order
  a = np.zeros((5, n, flatten))
  a[:, keep] = aK
  a[:, prune] = np.einsum('jk,bks->bjs', S, aK) + c[None, :, None]
  ref = a.reshape(5, -1) @ variables['params']['l2']['kernel'] + variables['params']['l2']['bias']
  got = aK.reshape(5, -1) @ new['params']['l2']['kernel'] + new['params']['l2']['bias']
  np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-11)
  np.testing.assert_array_equal(new['params']['l1']['bias'], variables['params']['l1']['bias'][keep])
  assert new['params']['l2']['kernel'].shape == (m * flatten, out)


def test_errors():
  rng = np.random.default_rng(2)
  variables = {'params': {'l1': {'kernel': rng.normal(size=(3, 4))},
                          'l2': {'kernel': rng.normal(size=(4, 2))}}}
  unit = units_lib.Unit.of('l1', 'l1', None, 'l2', 'dense')
  spec = toy_spec(DensePair(4, 2, bias=False), (unit,), (1, 1, 3))
  keep = np.array([0, 2])
  with pytest.raises(ValueError, match=r'l1: S_P has shape \(2, 3\), expected \(2, 2\)'):
    surgery.apply(spec, variables, {'l1': (keep, np.zeros((2, 3)), None)})
  with pytest.raises(ValueError, match='sorted, unique'):
    surgery.apply(spec, variables, {'l1': (np.array([2, 0]), np.zeros((2, 2)), None)})
  with pytest.raises(ValueError, match='non-finite'):
    surgery.apply(spec, variables, {'l1': (keep, np.full((2, 2), np.nan), None)})
  with pytest.raises(ValueError, match="no prunable unit named l9"):
    surgery.apply(spec, variables, {'l9': (keep, np.zeros((2, 2)), None)})
  with pytest.raises(ValueError, match='l2: a bias constant needs a following BatchNorm or a bias'):
    surgery.apply(spec, variables, {'l1': (keep, np.zeros((2, 2)), np.ones(2))})


# --------------------------------------------------------------------------------------------
# Whole networks.


@pytest.fixture(scope='module')
def resnet20():
  spec = archs.get('resnet20')
  return spec, random_variables(spec, seed=1)


@pytest.fixture(scope='module')
def resnet50():
  spec = archs.get('resnet50')
  return spec, random_variables(spec, seed=2)


def test_t4_ratio_zero_is_bitwise_identity(resnet20):
  spec, variables = resnet20
  res = pipeline.compress(spec, variables, method='lbyl', ratio=0.0)
  widths, new, report = res.widths, res.variables, res.report
  assert widths == spec.default_widths()
  flat_old = jax.tree_util.tree_leaves_with_path(variables)
  flat_new = jax.tree_util.tree_leaves_with_path(new)
  assert [p for p, _ in flat_old] == [p for p, _ in flat_new]
  for (_, a), (_, b) in zip(flat_old, flat_new):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  apply = jax.jit(spec.build(widths).apply)
  assert np.array_equal(np.asarray(apply(new, x)), np.asarray(apply(variables, x)))
  assert report['params_after'] == report['params_before']
  assert all(layer['diagnostics']['solver'] == 'none' for layer in report['layers'])


def test_pruned_resnet20_runs_with_exact_shapes(resnet20):
  spec, variables = resnet20
  widths, new = surgery.apply(spec, variables, random_plan(spec, variables, 0.4, with_bias=True))
  assert widths == tuple([9] * 3 + [19] * 3 + [38] * 3)
  assert shapes(new) == shapes(spec.abstract_variables(widths))
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  y = jax.jit(spec.build(widths).apply)(new, x)
  assert y.shape == (2, 10) and np.all(np.isfinite(np.asarray(y)))


def test_t11_bottleneck_shapes_resnet50(resnet50):
  spec, variables = resnet50
  widths, new = surgery.apply(spec, variables, random_plan(spec, variables, 0.3, with_bias=True))
  assert shapes(new) == shapes(spec.abstract_variables(widths))
  p = new['params']
  for s, planes in enumerate((64, 128, 256, 512)):
    m = int(planes * 0.7)
    blk = p[f'layer{s + 1}_0']
    assert blk['conv1']['kernel'].shape[-1] == m  # conv1: m1 outputs
    assert blk['conv2']['kernel'].shape[2:] == (m, m)  # conv2: m1 inputs, m2 outputs
    assert blk['conv3']['kernel'].shape[2:] == (m, 4 * planes)  # conv3: m2 inputs, unchanged outputs
    assert blk['bn1']['scale'].shape == blk['bn2']['scale'].shape == (m,)
  out = jax.eval_shape(spec.build(widths).apply, new, jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32))
  assert out.shape == (1, 1000)


@pytest.mark.parametrize('order', ['together', 'conv1_first', 'conv2_first'])
def test_bottleneck_surgeries_commute(resnet50, order):
  spec, variables = resnet50
  full = random_plan(spec, variables, 0.5, seed=3, with_bias=True)
  a, b = 'layer2_1/conv1', 'layer2_1/conv2'  # conv2 is a's consumer and b's producer
  both = surgery.apply(spec, variables, {a: full[a], b: full[b]})[1]
  if order == 'together':
    got = surgery.apply(spec, variables, {b: full[b], a: full[a]})[1]
  else:
    first, second = (a, b) if order == 'conv1_first' else (b, a)
    got = surgery.apply(spec, surgery.apply(spec, variables, {first: full[first]})[1],
                        {second: full[second]})[1]
  for (pa, x), (pb, y) in zip(jax.tree_util.tree_leaves_with_path(both),
                              jax.tree_util.tree_leaves_with_path(got)):
    assert pa == pb
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6, err_msg=str(pa))


def test_vgg_cifar_fc1_has_460_inputs_at_ratio_0_1():
  spec = archs.get('vgg16_bn_cifar')
  variables = random_variables(spec, seed=4)
  res = pipeline.compress(spec, variables, method='prune', ratio=0.1)
  widths, new, report = res.widths, res.variables, res.report
  assert widths == (57, 57, 115, 115, 230, 230, 230, 460, 460, 460, 460, 460, 460)
  assert new['params']['fc1']['kernel'].shape == (460, 512)
  assert shapes(new) == shapes(spec.abstract_variables(widths))
  assert report['macs_after'] < report['macs_before']
