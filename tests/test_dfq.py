"""DFQ baseline (docs/quantization.md#dfq): BN folding, CLE (T8), bias absorption, bias correction
(T9)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lbyl_jax.core import trees
from lbyl_jax.core import units as units_lib
from lbyl_jax.core.bn import BN_EPS
from lbyl_jax.models import archs
from lbyl_jax.models import trace
from lbyl_jax.pruning.moments import relu_mean
from lbyl_jax.quant import dfq
from lbyl_jax.quant import uniform as quant


def _rel(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


class _Net:
  """A random network, its jitted forward and a fixed input batch."""

  def __init__(self, name: str, seed: int = 0, batch: int = 4):
    self.spec = archs.get(name)
    self.v = jax.tree_util.tree_map(np.asarray, self.spec.init(jax.random.PRNGKey(seed)))
    self.apply = jax.jit(self.spec.build().apply)
    self.x = jax.random.normal(jax.random.PRNGKey(100 + seed), (batch, *self.spec.input_shape))
    self.y = np.asarray(self.apply(self.v, self.x), np.float64)

  def out(self, variables):
    return np.asarray(self.apply(variables, self.x), np.float64)


@pytest.fixture(scope='module')
def resnet20():
  return _Net('resnet20')


@pytest.fixture(scope='module')
def lenet():
  return _Net('lenet_300_100', batch=16)


@pytest.fixture(scope='module')
def vgg():
  net = _Net('vgg16_bn_cifar', batch=2)
  net.folded, net.stats = dfq.fold_bn(net.spec, net.v)
  net.eq, net.info = dfq.equalize(net.spec, net.folded, stats=net.stats)
  return net


# --------------------------------------------------------------------------------------------
# BN folding.


def test_identity_bn_is_exact_in_flax():
  assert dfq.IDENTITY_VAR + np.float32(BN_EPS) == np.float32(1.0)
  bn = nn.BatchNorm(use_running_average=True, epsilon=1e-5)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 5, 5, 7)) * 10
  b = np.random.default_rng(0).normal(size=7).astype(np.float32)
  v = {'params': {'scale': np.ones(7, np.float32), 'bias': b},
       'batch_stats': {'mean': np.zeros(7, np.float32), 'var': np.full(7, dfq.IDENTITY_VAR)}}
  np.testing.assert_array_equal(np.asarray(bn.apply(v, x)), np.asarray(x + b))


@pytest.mark.parametrize('name', ['resnet20', 'vgg16_bn_cifar', 'resnet20_b'])
def test_fold_bn_keeps_the_function(name, resnet20, vgg):
  net = {'resnet20': resnet20, 'vgg16_bn_cifar': vgg}.get(name) or _Net(name)
  folded, stats = (vgg.folded, vgg.stats) if name == 'vgg16_bn_cifar' else dfq.fold_bn(net.spec, net.v)
  assert _rel(net.out(folded), net.y) < 1e-5
  bn_of = trace.trace_layers(net.spec).bn
  assert set(stats) == set(bn_of)
  for layer, bn in bn_of.items():
    p = trees.get_path(folded['params'], bn)
    s = trees.get_path(folded['batch_stats'], bn)
    np.testing.assert_array_equal(p['scale'], 1.0)
    np.testing.assert_array_equal(s['mean'], 0.0)
    np.testing.assert_array_equal(s['var'], dfq.IDENTITY_VAR)
    # The BN-implied output distribution: N(beta, gamma^2) of the ORIGINAL BN.
    np.testing.assert_array_equal(stats[layer]['mean'], trees.get_path(net.v['params'], bn)['bias'])
  # kernel * alpha on the output axis (checked on one layer against float64 numpy).
  k = net.v['params']['conv1' if 'resnet' in name else 'conv0']['kernel'].astype(np.float64)
  bnp = net.v['params']['bn1' if 'resnet' in name else 'bn0']
  bns = net.v['batch_stats']['bn1' if 'resnet' in name else 'bn0']
  alpha = bnp['scale'] / np.sqrt(bns['var'].astype(np.float64) + 1e-5)
  got = folded['params']['conv1' if 'resnet' in name else 'conv0']['kernel']
  np.testing.assert_allclose(got, k * alpha, rtol=1e-6)


def test_fold_bn_without_bn_is_identity(lenet):
  folded, stats = dfq.fold_bn(lenet.spec, lenet.v)
  assert stats == {}
  for a, b in zip(jax.tree_util.tree_leaves(folded), jax.tree_util.tree_leaves(lenet.v)):
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------
# Cross-layer equalization (T8).


def _check_equal_ranges(variables, pairs):
  for u in pairs:
    r1, r2 = dfq.channel_ranges(variables, u)
    np.testing.assert_allclose(r1, r2, rtol=1e-6, err_msg=u.name)


def test_cle_mlp(lenet):
  eq, info = dfq.equalize(lenet.spec, lenet.v)
  assert info['converged'] and info['iterations'] > 1
  assert _rel(lenet.out(eq), lenet.y) < 1e-5
  _check_equal_ranges(eq, dfq.cle_pairs(lenet.spec))
  before = dfq.channel_ranges(lenet.v, dfq.cle_pairs(lenet.spec)[0])
  assert np.max(np.abs(before[0] / before[1] - 1)) > 0.1  # the test is not vacuous


def test_cle_resnet20(resnet20):
  folded, stats = dfq.fold_bn(resnet20.spec, resnet20.v)
  eq, info = dfq.equalize(resnet20.spec, folded, stats=stats)
  assert info['converged']
  assert _rel(resnet20.out(eq), resnet20.y) < 1e-5
  _check_equal_ranges(eq, resnet20.spec.units)
  # The statistics follow the producer's rescaling: mean / s, std / s.
  u = resnet20.spec.units[0]
  k_before = trees.get_path(folded['params'], u.producer)['kernel'].astype(np.float64)
  k_after = trees.get_path(eq['params'], u.producer)['kernel']
  s = k_before[0, 0, 0] / k_after[0, 0, 0]  # W1[i] /= s_i
  np.testing.assert_allclose(info['stats'][u.producer]['std'], stats[u.producer]['std'] / s, rtol=1e-5)


def test_cle_vgg_chain_with_pools(vgg):
  assert vgg.info['converged'] and vgg.info['max_scale_change'] <= 1e-8
  assert _rel(vgg.out(vgg.eq), vgg.y) < 1e-5
  pairs = dfq.cle_pairs(vgg.spec)
  assert [p.consumer for p in pairs][-2:] == ['fc1', 'fc2']
  _check_equal_ranges(vgg.eq, pairs)


def _toy_forward(v, x):
  """conv a (3x3, pad 1) -> ReLU -> 2x2 max-pool -> NCHW flatten -> dense b."""
  y = jax.lax.conv_general_dilated(x, v['params']['a']['kernel'], (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  y = nn.relu(y + v['params']['a']['bias'])
  y = nn.max_pool(y, (2, 2), strides=(2, 2))
  y = jnp.transpose(y, (0, 3, 1, 2)).reshape(y.shape[0], -1)
  return y @ v['params']['b']['kernel'] + v['params']['b']['bias']


def test_cle_dense_consumer_after_flatten():
  rng = np.random.default_rng(0)
  v = {'params': {
      'a': {'kernel': rng.normal(size=(3, 3, 2, 3)) * [0.1, 1.0, 10.0], 'bias': rng.normal(size=3)},
      'b': {'kernel': rng.normal(size=(12, 5)), 'bias': rng.normal(size=5)}}}
  v = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), v)
  pairs = (units_lib.Unit.of('a', 'a', None, 'b', 'dense', flatten=4, pool='max'),)
  eq, info = dfq.equalize(None, v, pairs=pairs, bn_of={})
  assert info['converged']
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 2))
  assert _rel(_toy_forward(eq, x), _toy_forward(v, x)) < 1e-5
  _check_equal_ranges(eq, pairs)


def test_cle_rescues_per_tensor_quantization(lenet):
  # Blow up a few ip1 channels (and shrink their ip2 inputs): the same function, but a per-tensor
  # grid now spends its range on them. CLE undoes the imbalance.
  v = jax.tree_util.tree_map(np.array, lenet.v)
  big = np.arange(0, 300, 30)
  v['params']['ip1']['kernel'][:, big] *= 100
  v['params']['ip1']['bias'][big] *= 100
  v['params']['ip2']['kernel'][big, :] /= 100
  assert _rel(lenet.out(v), lenet.y) < 1e-5
  errs = {}
  for cle in (False, True):
    q, m, _ = dfq.dfq(lenet.spec, v, bits=6, cle=cle)
    errs[cle] = _rel(lenet.out(quant.dequantize_tree(q, m)), lenet.y)
  assert errs[True] < 0.1 and errs[False] > 3 * errs[True]


# --------------------------------------------------------------------------------------------
# Bias absorption.


def test_bias_absorption_exact_when_preactivations_stay_above_c():
  rng = np.random.default_rng(1)
  v = {'params': {'a': {'kernel': rng.uniform(-0.1, 0.1, (6, 4)), 'bias': np.array([10.0, 10.0, 1.0, 5.0])},
                  'b': {'kernel': rng.normal(size=(4, 3)), 'bias': rng.normal(size=3)}}}
  v = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), v)
  stats = {'a': {'mean': np.array([10.0, 10.0, 1.0, 5.0]), 'std': np.array([1.0, 2.0, 1.0, 2.0])}}
  pairs = (units_lib.Unit.of('a', 'a', None, 'b', 'dense'),)
  out, st, absorbed = dfq.absorb_bias(None, v, stats, pairs=pairs, bn_of={})
  c = np.array([7.0, 4.0, 0.0, 0.0])  # max(0, beta - 3 gamma)
  np.testing.assert_allclose(out['params']['a']['bias'], v['params']['a']['bias'] - c, rtol=1e-6)
  np.testing.assert_allclose(st['a']['mean'], stats['a']['mean'] - c)
  assert absorbed['a'] == pytest.approx(11.0)
  x = rng.uniform(-1, 1, (20, 6)).astype(np.float32)  # |W x| < 0.6: every y stays above c

  def fwd(t):
    h = np.maximum(x @ t['params']['a']['kernel'] + t['params']['a']['bias'], 0)
    return h @ t['params']['b']['kernel'] + t['params']['b']['bias']

  np.testing.assert_allclose(fwd(out), fwd(v), rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Bias correction (T9 and the correction itself).


@pytest.mark.parametrize('beta,gamma', [(0.0, 0.25), (0.1, 0.2), (-0.2, 0.25), (0.3, -0.2),
                                        (-0.05, 0.1)])
def test_relu_mean_matches_monte_carlo(beta, gamma):
  y = beta + gamma * np.random.default_rng(7).standard_normal(1_000_000)
  assert abs(relu_mean(beta, gamma) - np.maximum(y, 0).mean()) < 1e-3


@pytest.mark.parametrize('beta,gamma', [(0.0, 1.0), (1.5, 2.0), (-1.0, 0.7), (2.0, -1.5)])
def test_relu_mean_matches_monte_carlo_wide(beta, gamma):
  a = np.maximum(beta + gamma * np.random.default_rng(8).standard_normal(1_000_000), 0)
  se = a.std() / 1000
  assert abs(relu_mean(beta, gamma) - a.mean()) < 5 * se


def test_relu_mean_degenerate_std():
  np.testing.assert_allclose(relu_mean([0.5, -0.5], [0.0, 0.0]), [0.5, 0.0])


def _relu_mean_quadrature(beta, gamma):
  """E[ReLU(beta + gamma z)], z ~ N(0, 1), by a Riemann sum over z in [-8, 8]."""
  z = np.linspace(-8, 8, 160001)
  w = np.exp(-z**2 / 2) / np.sqrt(2 * np.pi) * (z[1] - z[0])
  return np.maximum(beta[:, None] + gamma[:, None] * z[None, :], 0) @ w


def test_bias_correction_matches_numpy_reference(resnet20):
  spec, v = resnet20.spec, resnet20.v
  q0, m0, _ = dfq.dfq(spec, v, bits=4, per_channel=True, symmetric=True, cle=False,
                      bias_correction=False)
  q1, m1, rep = dfq.dfq(spec, v, bits=4, per_channel=True, symmetric=True, cle=False)
  status = rep['bias_correction_status']
  assert set(status) == {u.consumer for u in spec.units}
  assert all(s == 'corrected' for s in status.values())
  deq = quant.dequantize_tree(q0, m0)
  for u in spec.units:
    blk = u.producer.split('/')[0]
    # Independent float64 reference: fold by hand, eps = What - W, E[x] from the producer's BN.
    bnp, bns = v['params'][blk]['bn2'], v['batch_stats'][blk]['bn2']
    alpha2 = bnp['scale'] / np.sqrt(bns['var'].astype(np.float64) + 1e-5)
    w = v['params'][blk]['conv2']['kernel'] * alpha2
    eps = deq['params'][blk]['conv2']['kernel'] - w
    beta1, gamma1 = v['params'][blk]['bn1']['bias'], v['params'][blk]['bn1']['scale']
    ex = _relu_mean_quadrature(beta1.astype(np.float64), gamma1.astype(np.float64))
    shift = np.einsum('hwio,i->o', eps, ex)
    got = q1['params'][blk]['bn2']['bias'].astype(np.float64) - q0['params'][blk]['bn2']['bias']
    np.testing.assert_allclose(got, -shift, rtol=1e-4, atol=1e-6)
  # Kernels are the same integers with or without correction.
  np.testing.assert_array_equal(q0['params']['layer1_0']['conv2']['kernel']['q'],
                                q1['params']['layer1_0']['conv2']['kernel']['q'])


def test_bias_correction_skips_unknown_statistics(vgg, lenet):
  qtree, qmeta = quant.quantize_tree(vgg.eq, bits=4)
  _, status = dfq.bias_correct(vgg.spec, vgg.eq, qtree, qmeta, vgg.info['stats'])
  assert status['conv1'] == 'corrected'
  assert status['conv2'].startswith('skipped: max-pool')  # conv1 -> max-pool -> conv2
  assert status['fc1'] == 'corrected'  # 2x2 average pool keeps the expectation
  assert status['fc2'] == 'corrected'  # bn_fc1 statistics
  _, _, rep = dfq.dfq(lenet.spec, lenet.v, bits=8)
  assert set(rep['bias_correction_status'].values()) == {'skipped: producer has no BN statistics'}


# --------------------------------------------------------------------------------------------
# Driver.


def test_dfq_8bit_close_to_float(resnet20, lenet):
  for net in (resnet20, lenet):
    q, m, rep = dfq.dfq(net.spec, net.v, bits=8)  # DFQ paper: per-tensor asymmetric
    assert m['per_channel'] is False and m['symmetric'] is False
    assert _rel(net.out(quant.dequantize_tree(q, m)), net.y) < 0.05
    assert set(rep['layer_errors']) == set(quant.kernel_paths(net.v))


def test_dfq_keep_8bit_and_bad_bits(resnet20):
  spec = resnet20.spec
  q, m, _ = dfq.dfq(spec, resnet20.v, bits=4, per_channel=True, symmetric=True,
                    keep_8bit=trace.first_and_last_layers(spec), bias_absorption=True)
  assert m['layers']['conv1']['bits'] == 8 and m['layers']['fc']['bits'] == 8
  assert m['layers']['layer1_0/conv1']['bits'] == 4
  with pytest.raises(ValueError, match='bits'):
    dfq.dfq(spec, resnet20.v, bits=1)
