"""DFQ and UDFC-style on units with a depthwise "through" layer (MobileNetV2's inverted residuals),
against float64 NumPy / SciPy references on a small random stack:

expansion 1x1 conv -> BN -> ReLU6 -> depthwise 3x3 -> BN -> ReLU6 -> projection 1x1 -> BN ->
global mean -> Dense.

- DFQ: the BN fold; no equalization across ReLU6; bias correction of the depthwise conv
  (``E[ReLU6(y)]`` of the expansion's BN, each channel's error reaching only its own output) and
  of the projection (``E[ReLU6(y)]`` of the depthwise conv's BN); the expected output of every
  corrected layer equals the float network's under the BN model.
- UDFC-style (unpruned): the per-channel rescale s_k of the expansion's channel k, fitted by the
  closed form, lands on the depthwise kernel's channel k; the rest is rounding.
- The joint UDFC path (with LBYL pruning) on these units: tests/test_udfc_depthwise_joint.py.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import gaussian_reference
import pytest

from lbyl_jax.core import trees
from lbyl_jax.core.bn import BN_EPS
from lbyl_jax.models import custom
from lbyl_jax.quant import dfq as dfq_lib
from lbyl_jax.quant import udfc as udfc_lib
from lbyl_jax.quant import uniform


class Inverted(nn.Module):
  relu6: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, name=name)  # noqa: E731
    act = nn.relu6 if self.relu6 else nn.relu
    x = act(bn('bn1')(nn.Conv(12, (1, 1), use_bias=False, name='expand')(x)))
    x = act(bn('bn2')(nn.Conv(12, (3, 3), padding=1, feature_group_count=12,
                              use_bias=False, name='dw')(x)))
    x = bn('bn3')(nn.Conv(5, (1, 1), use_bias=False, name='project')(x))
    return nn.Dense(3, name='head')(jnp.mean(x, axis=(1, 2)))


def _stack(module):
  v = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 4)))
  rng = np.random.default_rng(0)
  v = jax.tree_util.tree_map(lambda a: rng.normal(size=a.shape).astype(np.float32), v)
  v['batch_stats'] = jax.tree_util.tree_map(lambda a: np.abs(a) + 0.5, v['batch_stats'])
  for bn in ('bn1', 'bn2'):  # BN outputs around the ReLU6's range, some above the cap
    v['params'][bn]['bias'] = rng.uniform(-1.0, 7.0, size=12).astype(np.float32)
    v['params'][bn]['scale'] = rng.uniform(0.5, 3.0, size=12).astype(np.float32)
  spec = custom.custom_spec(module, (1, 6, 6, 4), apply_kwargs={'train': False},
                            policy=('head', 'compensable'))
  return spec, v


@pytest.fixture(scope='module')
def stack():
  return _stack(Inverted())


def test_the_stack_has_one_depthwise_unit(stack):
  spec, _ = stack
  assert [u.name for u in spec.units] == ['expand']
  assert dfq_lib.depthwise_unit(spec.units[0]).path == 'dw'
  assert dfq_lib.DFQ(bits=4).unsupported_units(spec) == []
  assert udfc_lib.UDFC(bits=4).unsupported_units(spec) == []


def _fold64(v, conv, bn):
  p = {k: np.asarray(a, np.float64) for k, a in v['params'][bn].items()}
  s = {k: np.asarray(a, np.float64) for k, a in v['batch_stats'][bn].items()}
  alpha = p['scale'] / np.sqrt(s['var'] + BN_EPS)
  return np.asarray(v['params'][conv]['kernel'], np.float64) * alpha, p['bias'] - alpha * s['mean']


def test_dfq_bias_correction_through_relu6_and_the_depthwise_conv(stack):
  spec, v = stack
  qtree, qmeta, report = dfq_lib.dfq(spec, v, bits=4, per_channel=True, symmetric=True)
  deq = uniform.dequantize_tree(qtree, qmeta)
  assert set(report['cle_skipped']) == {'expand'}
  status = report['bias_correction_status']
  assert status['dw'] == 'corrected' and status['project'] == 'corrected'
  p1 = v['params']
  e1 = gaussian_reference.relu6_mean(np.asarray(p1['bn1']['bias'], np.float64),
                     np.abs(np.asarray(p1['bn1']['scale'], np.float64)))
  e2 = gaussian_reference.relu6_mean(np.asarray(p1['bn2']['bias'], np.float64),
                     np.abs(np.asarray(p1['bn2']['scale'], np.float64)))
  # the expansion's output, BN folded (no equalization across the ReLU6)
  w1, b1 = _fold64(v, 'expand', 'bn1')
  np.testing.assert_allclose(np.asarray(deq['params']['bn1']['bias'], np.float64), b1,
                             rtol=1e-6, atol=1e-6)
  # depthwise: channel c's error meets only E[ReLU6(y_c)]
  wd, bd = _fold64(v, 'dw', 'bn2')
  wd_q = np.asarray(deq['params']['dw']['kernel'], np.float64)
  assert np.any(wd_q != wd)
  shift_d = np.einsum('hwc,c->c', (wd_q - wd)[:, :, 0, :], e1)
  np.testing.assert_allclose(np.asarray(deq['params']['bn2']['bias'], np.float64), bd - shift_d,
                             rtol=1e-5, atol=1e-5)
  # the expected depthwise output (interior positions) is the float network's
  np.testing.assert_allclose(wd_q[:, :, 0, :].sum((0, 1)) * e1 + (bd - shift_d),
                             wd[:, :, 0, :].sum((0, 1)) * e1 + bd, rtol=1e-5, atol=1e-5)
  # projection: E[ReLU6] of the depthwise conv's BN
  wp, bp = _fold64(v, 'project', 'bn3')
  wp_q = np.asarray(deq['params']['project']['kernel'], np.float64)
  shift_p = np.einsum('io,i->o', (wp_q - wp)[0, 0], e2)
  np.testing.assert_allclose(np.asarray(deq['params']['bn3']['bias'], np.float64), bp - shift_p,
                             rtol=1e-5, atol=1e-5)


def test_equalization_through_a_depthwise_conv_is_exact_with_relu():
  """The equalization code on depthwise pairs (``relu6_cle=True``'s): exact where the activation
  is positively homogeneous (ReLU), so only the ReLU6 makes it approximate."""
  spec, v = _stack(Inverted(relu6=False))
  folded, stats = dfq_lib.fold_bn(spec, v)
  bn_of = {'expand': 'bn1', 'dw': 'bn2', 'project': 'bn3'}
  pairs = dfq_lib.through_pairs(spec, bn_of)
  assert [(u.producer, u.consumer) for u in pairs] == [('expand', 'dw'), ('dw', 'project')]
  eq, info = dfq_lib.equalize(spec, folded, stats=stats, pairs=pairs, bn_of=bn_of)
  assert info['converged'] and info['scale_range'] != (1.0, 1.0)
  # both kernels of each pair end with equal per-channel ranges
  r_exp = np.max(np.abs(np.asarray(eq['params']['expand']['kernel'])).reshape(-1, 12), axis=0)
  r_dw = np.max(np.abs(np.asarray(eq['params']['dw']['kernel'])).reshape(-1, 12), axis=0)
  r_proj = np.max(np.abs(np.asarray(eq['params']['project']['kernel']))[0, 0], axis=1)
  np.testing.assert_allclose(r_exp, r_dw, rtol=1e-5)
  np.testing.assert_allclose(r_dw, r_proj, rtol=1e-5)
  x = np.random.default_rng(3).normal(size=(2, 6, 6, 4)).astype(np.float32)
  ref = np.asarray(spec.model.apply(v, x))
  np.testing.assert_allclose(np.asarray(spec.model.apply(eq, x)), ref, rtol=1e-4, atol=1e-4)


def test_udfc_rescale_folds_into_the_depthwise_kernel(stack):
  spec, v = stack
  a1, a2 = udfc_lib.DEFAULT_A1, udfc_lib.DEFAULT_A2
  _, qtree, qmeta, report = udfc_lib.udfc(spec, v, bits=4, a1=a1, a2=a2)
  deq = uniform.dequantize_tree(qtree, qmeta)
  # s_k = (alpha^2 <W, What> + a1 b^2 + a2) / (alpha^2 ||What||^2 + a1 b^2 + a2), float64
  p, s = v['params']['bn1'], v['batch_stats']['bn1']
  alpha = np.asarray(p['scale'], np.float64) / np.sqrt(np.asarray(s['var'], np.float64) + BN_EPS)
  b = np.asarray(p['bias'], np.float64) - alpha * np.asarray(s['mean'], np.float64)
  W = np.asarray(v['params']['expand']['kernel'], np.float64).reshape(-1, 12).T
  amax = np.max(np.abs(W), axis=1, keepdims=True)
  delta = amax / 7.0
  What = np.clip(np.round(W / delta), -7, 7) * delta
  s_ref = ((alpha ** 2 * np.sum(W * What, 1) + a1 * b ** 2 + a2)
           / (alpha ** 2 * np.sum(What * What, 1) + a1 * b ** 2 + a2))
  np.testing.assert_allclose(np.asarray(deq['params']['expand']['kernel'], np.float64)
                             .reshape(-1, 12).T, What, rtol=1e-6, atol=1e-7)
  # the depthwise kernel's channel k carries s_k, then is rounded per channel
  dw = np.asarray(v['params']['dw']['kernel'], np.float64) * s_ref
  dmax = np.max(np.abs(dw.reshape(-1, 12)), axis=0)
  dw_q = np.clip(np.round(dw / (dmax / 7.0)), -7, 7) * (dmax / 7.0)
  np.testing.assert_allclose(np.asarray(deq['params']['dw']['kernel'], np.float64), dw_q,
                             rtol=1e-5, atol=1e-6)
  assert report['units']['expand']['scale']['min'] != 1.0
  # the projection only rounded (its inputs are the depthwise conv's, not the expansion's)
  assert uniform.relative_error(v['params']['project']['kernel'],
                                deq['params']['project']['kernel']) < 0.2
  for k in ('bn1', 'bn2', 'bn3'):
    np.testing.assert_array_equal(trees.get_path(deq['params'], k)['bias'],
                                  v['params'][k]['bias'])
