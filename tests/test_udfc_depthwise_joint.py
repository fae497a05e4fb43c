"""UDFC-style joint with LBYL pruning on units with a depthwise "through" layer (MobileNetV2's
inverted residuals), against a float64 NumPy / SciPy reference on a small random stack:

expansion 1x1 conv -> BN -> ReLU6 -> depthwise 3x3 -> BN -> ReLU6 -> projection 1x1 -> BN ->
global mean -> Dense (the stack of tests/test_quant_depthwise.py).

Reference (docs/quantization.md#udfc-style-on-mobilenetv2-joint-with-lbyl), per kept channel k:
s_k the closed-form rescale of the expansion filter; kept composite filter
H^_k = alpha1_k Q(W_k) (x) alpha2_k s_k d_k, bias B^_k = b2_k + sum_t alpha2_k s_k d_{k,t} b1_k
(the default; with ``depthwise_kernel='quantized'`` Q(s_k d_k) in place of s_k d_k);
pruned j: H_j = alpha1_j W_j (x) alpha2_j d_j, B_j = b2_j + sum_t alpha2_j d_{j,t} b1_j; the rows
S'_P = (H^_K H^_K^T + a1 B^_K B^_K^T + a2 I)^{-1} (H^_K H_P^T + a1 B^_K B_P^T), transposed; the
projection V'_K = V_K + S'^T V_P (s_k lives in the depthwise kernel, stored as Q(s_k d_k)), then
rounded. With the mean
terms: the constant c = E[c_P] - S'_P E[c_K] (E[ReLU6(N(beta2, gamma2^2))]) in the projection's BN
mean, and beta1_k moved so that s_k E[ReLU6(N(beta1_k', gamma1_k^2))] = E[ReLU6(N(beta1_k,
gamma1_k^2))] (zero-mean input: the quantization's mean shift is 0).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import gaussian_reference
import pytest
from scipy import optimize

from lbyl_jax.core.bn import BN_EPS
from lbyl_jax.models import custom
from lbyl_jax.pruning import moments as moments_lib
from lbyl_jax.pruning import selection as selection_lib
from lbyl_jax.quant import udfc as udfc_lib
from lbyl_jax.quant import uniform

N, C_IN, C_OUT = 12, 4, 5
RATIO = 0.5


class Inverted(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, name=name)  # noqa: E731
    x = nn.relu6(bn('bn1')(nn.Conv(N, (1, 1), use_bias=False, name='expand')(x)))
    x = nn.relu6(bn('bn2')(nn.Conv(N, (3, 3), padding=1, feature_group_count=N,
                                   use_bias=False, name='dw')(x)))
    x = bn('bn3')(nn.Conv(C_OUT, (1, 1), use_bias=False, name='project')(x))
    return nn.Dense(3, name='head')(jnp.mean(x, axis=(1, 2)))


@pytest.fixture(scope='module')
def stack():
  module = Inverted()
  v = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, C_IN)))
  rng = np.random.default_rng(1)
  v = jax.tree_util.tree_map(lambda a: rng.normal(size=a.shape).astype(np.float32), v)
  v['batch_stats'] = jax.tree_util.tree_map(lambda a: np.abs(a) + 0.5, v['batch_stats'])
  for bn in ('bn1', 'bn2'):  # BN outputs around the ReLU6's range, some above the cap
    v['params'][bn]['bias'] = rng.uniform(-1.0, 5.0, size=N).astype(np.float32)
    v['params'][bn]['scale'] = rng.uniform(0.5, 3.0, size=N).astype(np.float32)
  spec = custom.custom_spec(module, (1, 6, 6, C_IN), apply_kwargs={'train': False},
                            policy=('head', 'compensable'))
  return spec, v


def _np(a):
  return np.asarray(a, np.float64)


def _bn64(v, bn):
  p, s = v['params'][bn], v['batch_stats'][bn]
  alpha = _np(p['scale']) / np.sqrt(_np(s['var']) + BN_EPS)
  return alpha, _np(p['bias']) - alpha * _np(s['mean'])


def _q(w, axis_rows):
  """4-bit per-channel symmetric rounding of rows (float64)."""
  delta = np.max(np.abs(w), axis=axis_rows, keepdims=True) / 7.0
  return np.clip(np.round(w / delta), -7, 7) * delta


def _reference(v, keep, prune, a1, a2, dw_rounded=True):
  """s_K, the deployed depthwise kernel (kh, kw, 1, m) and S'_P, all float64 NumPy
  (``dw_rounded=False``: the delivery sees s_k d_k before rounding)."""
  alpha1, b1 = _bn64(v, 'bn1')
  alpha2, b2 = _bn64(v, 'bn2')
  W = _np(v['params']['expand']['kernel'])[0, 0].T  # (N, C_in)
  What = _q(W, 1)
  s = ((alpha1 ** 2 * np.sum(W * What, 1) + a1 * b1 ** 2 + a2)
       / (alpha1 ** 2 * np.sum(What * What, 1) + a1 * b1 ** 2 + a2))[keep]
  dk = _np(v['params']['dw']['kernel'])[:, :, 0, :]  # (3, 3, N)
  d = dk.reshape(9, N).T  # (N, 9) rows
  d_dep = _q(d[keep] * s[:, None], 1)  # Q(s_k d_k)
  g_K = alpha2[keep, None] * (d_dep if dw_rounded else d[keep] * s[:, None])
  f_K = alpha1[keep, None] * What[keep]
  f_P, g_P = alpha1[prune, None] * W[prune], alpha2[prune, None] * d[prune]
  H_K = np.einsum('kc,kt->kct', f_K, g_K).reshape(keep.size, -1)
  H_P = np.einsum('jc,jt->jct', f_P, g_P).reshape(prune.size, -1)
  B_K = b2[keep] + g_K.sum(1) * b1[keep]
  B_P = b2[prune] + g_P.sum(1) * b1[prune]
  A = H_K @ H_K.T + a1 * np.outer(B_K, B_K) + a2 * np.eye(keep.size)
  S_P = np.linalg.solve(A, H_K @ H_P.T + a1 * np.outer(B_K, B_P)).T
  return s, d_dep.T.reshape(3, 3, 1, keep.size), S_P


def _problem(spec, v):
  (p,) = selection_lib.build_problems(spec, v, selection_lib.Selection(ratio=RATIO))
  assert p.prune.size == N // 2
  return p


def test_joint_delivery_matches_the_float64_reference(stack):
  spec, v = stack
  p = _problem(spec, v)
  a1, a2 = udfc_lib.DEFAULT_A1, udfc_lib.DEFAULT_A2
  s_ref, dw_ref, S_ref = _reference(v, p.keep, p.prune, a1, a2, dw_rounded=False)
  widths, qtree, qmeta, report = udfc_lib.udfc(
      spec, v, bits=4, selection=selection_lib.Selection(ratio=RATIO), a1=a1, a2=a2)
  assert widths == (N // 2,)
  unit = report['units']['expand']
  assert unit['delivery'] == 'depthwise_composite' and unit['pruned'] == N // 2
  deq = uniform.dequantize_tree(qtree, qmeta)
  # the expansion: the kept rows rounded; the depthwise kernel: Q(s_k d_k)
  W = _np(v['params']['expand']['kernel'])[0, 0].T
  np.testing.assert_allclose(_np(deq['params']['expand']['kernel'])[0, 0].T, _q(W, 1)[p.keep],
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(_np(deq['params']['dw']['kernel']), dw_ref, rtol=1e-5, atol=1e-6)
  # the delivery rows themselves, through the public pieces
  dk = np.take(_np(v['params']['dw']['kernel']), p.keep, axis=-1) * s_ref
  terms = udfc_lib.deployed_block_terms(
      spec, v, p, producer_hat_K=uniform.fake_quantize(
          np.take(np.asarray(v['params']['expand']['kernel']), p.keep, axis=-1), bits=4),
      depthwise_hat_K=dk.astype(np.float32))
  S = udfc_lib.depthwise_delivery(terms, p.keep, p.prune, a1=a1, a2=a2)
  np.testing.assert_allclose(S, S_ref, rtol=1e-5, atol=1e-6)
  assert np.abs(S_ref).max() > 1e-2  # the delivery does something
  # the projection: V'_K = V_K + S'^T V_P (no s_k: it is in the depthwise kernel), then rounded
  V = _np(v['params']['project']['kernel'])[0, 0]  # (N, C_out)
  V_new = V[p.keep] + S_ref.T @ V[p.prune]
  np.testing.assert_allclose(_np(deq['params']['project']['kernel'])[0, 0], _q(V_new, 0),
                             rtol=1e-5, atol=1e-6)
  # without the mean terms the BNs are only sliced
  for bn in ('bn1', 'bn2'):
    np.testing.assert_array_equal(deq['params'][bn]['bias'], v['params'][bn]['bias'][p.keep])
  np.testing.assert_array_equal(deq['batch_stats']['bn3']['mean'], v['batch_stats']['bn3']['mean'])


def test_joint_mean_terms_match_the_float64_reference(stack, monkeypatch):
  spec, v = stack
  p = _problem(spec, v)
  # the network-level moment model is the presets'; the stack's input: zero mean, unit variance
  monkeypatch.setattr(udfc_lib.moments_lib, 'propagate', lambda spec, variables: {
      'expand': moments_lib.InputMoments(mean=np.zeros(C_IN), var=np.ones(C_IN))})
  a1, a2 = udfc_lib.DEFAULT_A1, udfc_lib.DEFAULT_A2
  s_ref, _, S_ref = _reference(v, p.keep, p.prune, a1, a2, dw_rounded=False)
  _, qtree, qmeta, report = udfc_lib.udfc(
      spec, v, bits=4, selection=selection_lib.Selection(ratio=RATIO), a1=a1, a2=a2,
      bias_correction=True)
  deq = uniform.dequantize_tree(qtree, qmeta)
  # the pruned channels' constant, in the projection's BN mean (1x1: no padding)
  beta2, gamma2 = _np(v['params']['bn2']['bias']), _np(v['params']['bn2']['scale'])
  Ec = gaussian_reference.relu6_mean(beta2, np.abs(gamma2))
  c = Ec[p.prune] - S_ref @ Ec[p.keep]
  V = _np(v['params']['project']['kernel'])[0, 0]
  np.testing.assert_allclose(_np(deq['batch_stats']['bn3']['mean']),
                             _np(v['batch_stats']['bn3']['mean']) - V[p.prune].T @ c,
                             rtol=1e-5, atol=1e-5)
  # the kept channels' mean match through ReLU6: s_k E[ReLU6(N(beta1', gamma1^2))] = E[ReLU6(..)]
  beta1, gamma1 = _np(v['params']['bn1']['bias']), np.abs(_np(v['params']['bn1']['scale']))
  target = gaussian_reference.relu6_mean(beta1, gamma1)[p.keep]
  moved = 0
  for i, k in enumerate(p.keep):
    if not 0 < target[i] / s_ref[i] < 6:
      continue
    m = optimize.brentq(lambda x: s_ref[i] * gaussian_reference.relu6_mean([x], [gamma1[k]])[0] - target[i],
                        -50.0, 50.0, xtol=1e-12)
    np.testing.assert_allclose(float(deq['params']['bn1']['bias'][i]), m, rtol=1e-5, atol=1e-5)
    moved += 1
  assert moved >= N // 4
  assert report['units']['expand']['mean_match_skipped'] == p.keep.size - moved


def test_joint_path_runs_on_the_stack_through_the_quantizer(stack):
  """UDFC.joint (what compress calls for --quant-method udfc --method lbyl) no longer refuses
  depthwise units; the reloaded float network has the pruned width."""
  spec, v = stack
  widths, res = udfc_lib.UDFC(bits=4).joint(spec, v, selection=selection_lib.Selection(ratio=RATIO),
                                            keep_8bit=(), bias_correction='off',
                                            bias_fold='padding_aware')
  assert widths == (N // 2,)
  deq = uniform.dequantize_tree(res.qtree, res.qmeta)
  x = np.random.default_rng(2).normal(size=(2, 6, 6, C_IN)).astype(np.float32)
  out = np.asarray(spec.build(widths).apply(deq, x))
  assert out.shape == (2, 3) and np.all(np.isfinite(out))


def test_development_alternatives(stack, monkeypatch):
  """udfc()'s two development-split alternatives: the delivery on the stored Q(s_k d_k), and
  the constant without the kept channels' mean match; a bad value is refused by name."""
  spec, v = stack
  p = _problem(spec, v)
  a1, a2 = udfc_lib.DEFAULT_A1, udfc_lib.DEFAULT_A2
  sel = selection_lib.Selection(ratio=RATIO)
  _, _, S_float = _reference(v, p.keep, p.prune, a1, a2, dw_rounded=False)
  _, _, S_q = _reference(v, p.keep, p.prune, a1, a2)
  assert np.abs(S_float - S_q).max() > 1e-4
  _, qtree, qmeta, _ = udfc_lib.udfc(spec, v, bits=4, selection=sel, depthwise_kernel='quantized')
  deq = uniform.dequantize_tree(qtree, qmeta)
  V = _np(v['params']['project']['kernel'])[0, 0]
  np.testing.assert_allclose(_np(deq['params']['project']['kernel'])[0, 0],
                             _q(V[p.keep] + S_q.T @ V[p.prune], 0), rtol=1e-5, atol=1e-6)
  monkeypatch.setattr(udfc_lib.moments_lib, 'propagate', lambda spec, variables: {
      'expand': moments_lib.InputMoments(mean=np.zeros(C_IN), var=np.ones(C_IN))})
  _, qtree, qmeta, report = udfc_lib.udfc(spec, v, bits=4, selection=sel, bias_correction=True,
                                          kept_mean_match=False)
  deq = uniform.dequantize_tree(qtree, qmeta)
  np.testing.assert_array_equal(deq['params']['bn1']['bias'], v['params']['bn1']['bias'][p.keep])
  assert 'mean_shift' not in report['units']['expand']
  assert report['units']['expand']['bias_constant']['max'] > 0
  with pytest.raises(ValueError, match='depthwise_kernel'):
    udfc_lib.udfc(spec, v, bits=4, selection=sel, depthwise_kernel='fp32')
