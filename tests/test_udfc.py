"""UDFC-style compensation (docs/quantization.md, T7) and the RTN baseline."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import scipy.optimize

from lbyl_jax import pipeline
from lbyl_jax.core import trees
from lbyl_jax.io import checkpoint
from lbyl_jax.models import archs
from lbyl_jax.models import trace
from lbyl_jax.plan import Plan
from lbyl_jax.pruning import moments as moments_lib
from lbyl_jax.pruning import selection as selection_lib
from lbyl_jax.pruning import terms
from lbyl_jax.quant import udfc
from lbyl_jax.quant import uniform as quant


def _rel(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _rows_problem(seed: int, n: int = 32, d: int = 144):
  rng = np.random.default_rng(seed)
  W = rng.normal(size=(n, d)) / np.sqrt(d) * rng.uniform(0.5, 2.0, (n, 1))
  alpha = rng.uniform(0.5, 2.0, n)
  b = rng.normal(0.0, 0.3, n)
  return W, alpha, b


def _udfc(spec, variables, *, ratio=0.0, **kw):
  """udfc.udfc with the plan's selection stage at ``ratio`` (criterion l2, seed 0)."""
  return udfc.udfc(spec, variables, selection=selection_lib.Selection(ratio=ratio), **kw)


def _rtn(spec, variables, *, bits, ratio=0.0):
  """Plain pruning (S = 0) at ``ratio`` then round-to-nearest of every kernel, first and last layers
  included: (widths, qtree, qmeta, report)."""
  res = pipeline.compress(spec, variables, method='prune', ratio=ratio, quant_method='rtn',
                          bits=bits, keep_8bit_ends=False)
  return res.widths, res.qtree, res.qmeta, res.report


def _fq_rows(W, bits):
  return quant.fake_quantize(W, bits=bits, axis=0)


# --------------------------------------------------------------------------------------------
# (a) quantization scales: T7.


@pytest.mark.parametrize('bits', [2, 3, 4])
def test_t7_unregularized_scale_is_least_squares(bits):
  W, alpha, b = _rows_problem(bits)
  What = _fq_rows(W, bits)
  s = udfc.quant_scales(W, What, alpha, b, a1=0.0, a2=0.0)
  ref = np.sum(W * What, axis=1) / np.sum(What * What, axis=1)
  np.testing.assert_allclose(s, ref, rtol=1e-12)
  e_s = np.linalg.norm(W - s[:, None] * What, axis=1)
  e_1 = np.linalg.norm(W - What, axis=1)
  assert np.all(e_s <= e_1 * (1 + 1e-12))
  assert np.mean(e_s < e_1 * (1 - 1e-6)) > 0.9  # strictly better on almost every row


@pytest.mark.parametrize('a1,a2', [(0.01, 0.008), (1.0, 0.0), (0.0, 0.5)])
def test_scale_minimizes_the_regularized_loss(a1, a2):
  W, alpha, b = _rows_problem(11, n=8)
  What = _fq_rows(W, 3)
  s = udfc.quant_scales(W, What, alpha, b, a1=a1, a2=a2)
  for k in range(W.shape[0]):
    f = lambda t, k=k: udfc.quant_objective(W[k:k + 1], What[k:k + 1], alpha[k:k + 1],
                                            b[k:k + 1], t, a1=a1, a2=a2)[0]
    opt = scipy.optimize.minimize_scalar(f, bounds=(0.0, 3.0), method='bounded',
                                         options={'xatol': 1e-10})
    assert s[k] == pytest.approx(opt.x, abs=1e-6)
    assert f(s[k]) <= f(1.0)


def test_t7_eight_bit_scales_are_near_one():
  # s - 1 ~ -<W, e> / ||W||^2 has a spread of about (relative 8-bit error) / sqrt(D): 1e-3 holds
  # with margin for a 64-channel 3x3 filter (D = 576), and only barely at D = 144.
  W, alpha, b = _rows_problem(5, d=576)
  for a1, a2 in [(0.0, 0.0), (udfc.DEFAULT_A1, udfc.DEFAULT_A2)]:
    s = udfc.quant_scales(W, _fq_rows(W, 8), alpha, b, a1=a1, a2=a2)
    assert np.max(np.abs(s - 1)) < 1e-3
  s4 = udfc.quant_scales(W, _fq_rows(W, 2), alpha, b, a1=0, a2=0)
  assert np.max(np.abs(s4 - 1)) > 1e-2  # the bound above is not vacuous


def test_t7_bn_fold_equals_consumer_scaling():
  rng = np.random.default_rng(0)
  n, d, o = 12, 20, 5
  x = rng.normal(size=(256, d))
  W = rng.normal(size=(n, d))
  gamma, beta = rng.uniform(0.5, 1.5, n), rng.normal(size=n)
  mu, var = rng.normal(size=n), rng.uniform(0.5, 1.5, n)
  V = rng.normal(size=(n, o))
  s = rng.uniform(0.5, 1.5, n)

  def bn(z, g, bt, m):
    return g * (z - m) / np.sqrt(var + 1e-5) + bt

  z = x @ W.T
  out_consumer = np.maximum(bn(z, gamma, beta, mu), 0) @ (s[:, None] * V)
  g2, b2 = udfc.bn_fold_output_scale(gamma, beta, s)
  out_bn = np.maximum(bn(z, g2, b2, mu), 0) @ V
  np.testing.assert_allclose(out_bn, out_consumer, rtol=1e-12, atol=1e-12)


def test_bn_fold_input_scale_is_exact():
  rng = np.random.default_rng(1)
  n = 9
  z = rng.normal(size=(100, n)) * 3
  gamma, beta = rng.normal(size=n), rng.normal(size=n)
  mu, var = rng.normal(size=n), rng.uniform(0.1, 2.0, n)
  s = rng.uniform(0.3, 2.0, n)
  bn = lambda z, g, m: g * (z - m) / np.sqrt(var + 1e-5) + beta
  g2, m2 = udfc.bn_fold_input_scale(gamma, mu, s)
  np.testing.assert_allclose(bn(z, g2, m2), bn(s * z, gamma, mu), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# (b) pruning delivery.


def test_delivery_matches_augmented_least_squares():
  rng = np.random.default_rng(2)
  m, p, d = 10, 6, 40
  WK, WP = rng.normal(size=(m, d)), rng.normal(size=(p, d))
  WKhat = _fq_rows(WK, 4)
  aK, aP = rng.uniform(0.5, 2, m), rng.uniform(0.5, 2, p)
  bK, bP = rng.normal(size=m), rng.normal(size=p)
  a1, a2 = 0.3, 0.05
  S = udfc.delivery(WKhat, aK, bK, WP, aP, bP, a1=a1, a2=a2)
  assert S.shape == (p, m)
  F = aK[:, None] * WKhat
  A = np.vstack([F.T, np.sqrt(a1) * bK[None, :], np.sqrt(a2) * np.eye(m)])
  for j in range(p):
    rhs = np.concatenate([aP[j] * WP[j], [np.sqrt(a1) * bP[j]], np.zeros(m)])
    ref = np.linalg.lstsq(A, rhs, rcond=None)[0]
    np.testing.assert_allclose(S[j], ref, rtol=1e-9, atol=1e-11)


def test_delivery_recovers_exact_combinations_of_quantized_filters():
  rng = np.random.default_rng(3)
  m, p, d = 8, 5, 30
  WKhat = _fq_rows(rng.normal(size=(m, d)), 4)
  aK, bK = rng.uniform(0.5, 2, m), rng.normal(size=m)
  C = rng.normal(size=(p, m))
  aP = rng.uniform(0.5, 2, p)
  WP = (C @ (aK[:, None] * WKhat)) / aP[:, None]
  S = udfc.delivery(WKhat, aK, bK, WP, aP, C @ bK, a1=0.0, a2=0.0)
  np.testing.assert_allclose(S, C, atol=1e-10)


def test_delivery_rank_deficient_without_ridge_is_min_norm():
  rng = np.random.default_rng(4)
  m, p, d = 12, 3, 5  # m > D: F F^T is singular
  WKhat, WP = rng.normal(size=(m, d)), rng.normal(size=(p, d))
  S = udfc.delivery(WKhat, np.ones(m), np.zeros(m), WP, np.ones(p), np.zeros(p), a1=0.0, a2=0.0)
  ref = np.linalg.lstsq(WKhat.T, WP.T, rcond=None)[0].T
  np.testing.assert_allclose(S, ref, atol=1e-8)
  assert udfc.delivery(WKhat, np.ones(m), np.zeros(m), WP[:0], np.ones(0), np.zeros(0)).shape == (0, m)


# --------------------------------------------------------------------------------------------
# (c) consumer update.


def test_consumer_update_conv_and_flattened_dense():
  rng = np.random.default_rng(5)
  n, keep = 7, np.array([0, 2, 3, 6])
  prune = np.array([1, 4, 5])
  s = rng.uniform(0.8, 1.2, keep.size)
  S = rng.normal(size=(prune.size, keep.size))
  V = rng.normal(size=(3, 3, n, 4))
  got = udfc.consumer_update(V, keep=keep, s=s, S_P=S, kind='conv')
  ref = np.zeros((3, 3, keep.size, 4))
  for a, k in enumerate(keep):
    ref[:, :, a] = s[a] * V[:, :, k] + sum(S[b, a] * V[:, :, j] for b, j in enumerate(prune))
  np.testing.assert_allclose(got, ref, rtol=1e-12)
  r = 3  # each channel owns r consecutive rows after an NCHW flatten
  Vd = rng.normal(size=(n * r, 5))
  got = udfc.consumer_update(Vd, keep=keep, s=s, S_P=S, kind='dense', flatten=r)
  ref = np.zeros((keep.size * r, 5))
  for a, k in enumerate(keep):
    ref[a * r:(a + 1) * r] = s[a] * Vd[k * r:(k + 1) * r] + sum(
        S[b, a] * Vd[j * r:(j + 1) * r] for b, j in enumerate(prune))
  np.testing.assert_allclose(got, ref, rtol=1e-12)
  same = udfc.consumer_update(V, keep=np.arange(n), s=np.ones(n), S_P=np.zeros((0, n)), kind='conv')
  np.testing.assert_array_equal(same, V)


# --------------------------------------------------------------------------------------------
# Whole-network driver.


class _Net:

  def __init__(self, name: str, seed: int = 0, redundant: bool = False):
    self.spec = archs.get(name)
    v = jax.tree_util.tree_map(np.asarray, self.spec.init(jax.random.PRNGKey(seed)))
    self.v = _make_redundant(self.spec, v, seed) if redundant else v
    self.x = jax.random.normal(jax.random.PRNGKey(50 + seed), (32, *self.spec.input_shape))
    self._fns = {}
    self.y = self.out(self.v)

  def out(self, variables, widths=None):
    key = None if widths is None else tuple(widths)
    if key not in self._fns:
      self._fns[key] = jax.jit(self.spec.build(widths).apply)
    return np.asarray(self._fns[key](variables, self.x), np.float64)

  def err(self, widths, qtree, qmeta):
    return _rel(self.out(quant.dequantize_tree(qtree, qmeta), widths), self.y)


def _make_redundant(spec, v, seed):
  """Second half of every unit's channels := positive multiples (0.3-0.6x) of the first half, with
  BN set so that a_j = c'_j a_k exactly (docs/properties.md T2): an L2 criterion at ratio 0.5 prunes
  exactly the copies, and a faithful delivery restores the network."""
  rng = np.random.default_rng(seed)
  v = jax.tree_util.tree_map(lambda a: np.array(a, np.float64), v)
  for u in spec.units:
    layer = trees.get_path(v['params'], u.producer)
    h = layer['kernel'].shape[-1] // 2
    k, j = np.arange(h), np.arange(h, 2 * h)
    c = rng.uniform(0.3, 0.6, h)
    layer['kernel'][..., j] = layer['kernel'][..., k] * c
    if u.bn is None:
      layer['bias'][j] = layer['bias'][k] * c
      continue
    p = trees.get_path(v['params'], u.bn)
    st = trees.get_path(v['batch_stats'], u.bn)
    alpha = p['scale'] / np.sqrt(st['var'] + 1e-5)
    cp = alpha[j] * c / alpha[k]
    p['bias'][j] = cp * (p['bias'][k] - alpha[k] * st['mean'][k]) + alpha[j] * st['mean'][j]
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), v)


@pytest.fixture(scope='module')
def resnet20():
  return _Net('resnet20')


@pytest.fixture(scope='module', params=['lenet_300_100', 'resnet20'])
def redundant(request):
  return _Net(request.param, redundant=True)


def test_udfc_no_pruning_8bit_is_close_to_float(resnet20):
  widths, qtree, qmeta, rep = _udfc(resnet20.spec, resnet20.v, bits=8)
  assert widths == resnet20.spec.default_widths()
  assert resnet20.err(widths, qtree, qmeta) < 0.03
  assert set(rep['units']) == set(resnet20.spec.width_names)
  assert all(abs(r['scale']['mean'] - 1) < 1e-3 for r in rep['units'].values())


def test_udfc_restores_redundant_network_where_rtn_after_pruning_fails(redundant):
  spec = redundant.spec
  for bits, factor in [(8, 5.0), (4, 1 / 0.6)]:
    w_u, q_u, m_u, rep = _udfc(spec, redundant.v, bits=bits, ratio=0.5)
    w_r, q_r, m_r, _ = _rtn(spec, redundant.v, bits=bits, ratio=0.5)
    assert w_u == w_r == tuple(x // 2 for x in spec.default_widths())
    e_u, e_r = redundant.err(w_u, q_u, m_u), redundant.err(w_r, q_r, m_r)
    assert e_u * factor < e_r, (bits, e_u, e_r)
    if bits == 8:
      assert e_u < 0.05
  assert rep['units'][spec.units[0].name]['pruned'] == spec.default_widths()[0] // 2


def test_udfc_compensates_consumers_with_the_closed_form_scales(resnet20):
  # Producers at 2 bits (scales far from 1), consumers at 8 bits: each consumer must be the
  # 8-bit quantization of s * V, with s recomputed here from the producer's deployed weights.
  spec, v = resnet20.spec, resnet20.v
  consumers = [u.consumer for u in spec.units]
  _, qtree, qmeta, _ = _udfc(spec, v, bits=2, keep_8bit=consumers)
  deq = quant.dequantize_tree(qtree, qmeta)
  moved = 0.0
  for u in spec.units:
    assert qmeta['layers'][u.producer]['bits'] == 2 and qmeta['layers'][u.consumer]['bits'] == 8
    W = trees.get_path(v['params'], u.producer)['kernel']
    What = trees.get_path(deq['params'], u.producer)['kernel']
    rows = lambda k: np.moveaxis(np.asarray(k, np.float64), -1, 0).reshape(k.shape[-1], -1)
    bn = terms.bn_affine(v, u)
    s = udfc.quant_scales(rows(W), rows(What), bn['alpha'], bn['b'])
    V = trees.get_path(v['params'], u.consumer)['kernel'].astype(np.float64)
    expected = V * s[None, None, :, None]
    step = trees.get_path(qtree['params'], u.consumer)['kernel']['scale'].astype(np.float64)
    got = trees.get_path(deq['params'], u.consumer)['kernel']
    assert np.all(np.abs(got - expected) <= step / 2 * (1 + 1e-5) + 1e-9), u.name
    moved = max(moved, float(np.max(np.abs(V - expected) / step)))
  assert moved > 2  # s * V is many 8-bit steps away from V: the check above is discriminative


def test_scale_from_original_equals_compensated_without_chains(resnet20):
  # CIFAR ResNet producers (block conv1) read the block input, never a compensated layer.
  a = _udfc(resnet20.spec, resnet20.v, bits=4, ratio=0.3)
  b = _udfc(resnet20.spec, resnet20.v, bits=4, ratio=0.3, scale_from='original')
  assert a[0] == b[0]
  for x, y in zip(jax.tree_util.tree_leaves(a[1]), jax.tree_util.tree_leaves(b[1])):
    np.testing.assert_array_equal(x, y)


def test_rescale_others(resnet20):
  spec, v = resnet20.spec, resnet20.v
  widths, qtree, qmeta, rep = _udfc(spec, v, bits=8, rescale_others=True)
  assert resnet20.err(widths, qtree, qmeta) < 0.03
  assert rep['rescaled']['layer1_0/conv2']['how'] == 'bn'
  assert rep['rescaled']['conv1']['how'] == 'bn'
  assert rep['rescaled']['fc']['how'] == 'quant_step'
  assert 'layer1_0/conv1' not in rep['rescaled']  # producers are compensated by their consumer
  _, _, _, rep_t = _udfc(spec, v, bits=8, rescale_others=True, per_channel=False)
  assert rep_t['not_rescaled'] == ['fc']


def test_rtn_is_plain_rounding(resnet20):
  spec, v = resnet20.spec, resnet20.v
  # RTN of the unpruned network through the plan, ends kept at 8 bits (the default).
  res = pipeline.compress(spec, v, method='prune', ratio=0.0, quant_method='rtn', bits=4)
  widths, qtree, qmeta, rep = res.widths, res.qtree, res.qmeta, res.report
  assert trace.first_and_last_layers(spec) == ('conv1', 'fc')
  assert rep['keep_8bit'] == ['conv1', 'fc']
  ref, ref_meta = quant.quantize_tree(v, bits=4, keep_8bit=('conv1', 'fc'))
  assert widths == spec.default_widths() and ref_meta['layers'] == qmeta['layers']
  for x, y in zip(jax.tree_util.tree_leaves(qtree), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_array_equal(x, y)
  assert rep['bytes_after'] == quant.tree_nbytes(qtree)


def test_bad_arguments(resnet20):
  spec, v = resnet20.spec, resnet20.v
  with pytest.raises(ValueError, match='bits'):
    _udfc(spec, v, bits=9)
  with pytest.raises(ValueError, match='--weight-bits'):
    Plan.from_options(method='prune', quant_method='rtn', bits=1)
  with pytest.raises(ValueError, match='ratio'):
    _udfc(spec, v, bits=4, ratio=1.0)
  with pytest.raises(ValueError, match='scale_from'):
    _udfc(spec, v, bits=4, scale_from='data')
  with pytest.raises(ValueError, match='not a conv/dense layer'):
    _udfc(spec, v, bits=4, keep_8bit=['head'])
  with pytest.raises(ValueError, match='a1 and a2'):
    udfc.quant_scales(np.ones((2, 3)), np.ones((2, 3)), np.ones(2), np.zeros(2), a1=-1.0)


def test_quantized_pruned_checkpoint_roundtrip(resnet20, tmp_path):
  spec = resnet20.spec
  widths, qtree, qmeta, _ = _udfc(spec, resnet20.v, bits=4, ratio=0.5, symmetric=False)
  path = checkpoint.save(tmp_path / 'ck', spec.name, widths, qtree, meta={'quant': qmeta})
  loaded = checkpoint.load(path)
  assert loaded.widths == widths and loaded.meta['format'] == 'quantized'
  ref = quant.dequantize_tree(qtree, qmeta)
  assert jax.tree_util.tree_structure(loaded.variables) == jax.tree_util.tree_structure(ref)
  for x, y in zip(jax.tree_util.tree_leaves(loaded.variables), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_allclose(resnet20.out(loaded.variables, widths), resnet20.out(ref, widths))


def test_delivery_lambdas_only_change_the_pruning_delivery(resnet20):
  """``delivery_lambdas`` replaces a1 / a2 in 6.2(b) only: equal to a1 / a2 it changes nothing; else
  the consumers move, the producers' integers and the reported scalar rescales do not."""
  spec, v = resnet20.spec, resnet20.v
  base = _udfc(spec, v, bits=4, ratio=0.3)
  same = _udfc(spec, v, bits=4, ratio=0.3, delivery_lambdas=(udfc.DEFAULT_A1, udfc.DEFAULT_A2))
  for x, y in zip(jax.tree_util.tree_leaves(base[1]), jax.tree_util.tree_leaves(same[1])):
    np.testing.assert_array_equal(x, y)
  other = _udfc(spec, v, bits=4, ratio=0.3, delivery_lambdas=(1e-5, 1e-3))
  assert other[3]['delivery_lambdas'] == [1e-5, 1e-3] and base[3]['delivery_lambdas'] == [0.01, 0.008]
  u = spec.units[0]
  q = lambda r, path: trees.get_path(r[1]['params'], path)['kernel']['q']
  np.testing.assert_array_equal(q(base, u.producer), q(other, u.producer))
  assert base[3]['units'][u.name]['scale'] == other[3]['units'][u.name]['scale']
  assert base[3]['units'][u.name]['coef'] != other[3]['units'][u.name]['coef']
  with pytest.raises(ValueError, match='a1 and a2'):
    _udfc(spec, v, bits=4, ratio=0.3, delivery_lambdas=(-1.0, 0.0))


# --------------------------------------------------------------------------------------------
# Mean terms of ``bias_correction=True``.


def test_relu_mean_and_mean_match_invert_each_other():
  rng = np.random.default_rng(7)
  sd = rng.uniform(0.05, 3.0, 300)
  m0 = rng.uniform(-2.0, 3.0, 300) * sd
  np.testing.assert_allclose(moments_lib.relu_mean(m0, sd),
                             moments_lib.relu_mean_var(m0, sd ** 2)[0],
                             rtol=1e-6)
  np.testing.assert_allclose(moments_lib.relu_mean([-1.0, 2.0], [0.0, 0.0]), [0.0, 2.0])
  # s = 1 and the original rectified mean as target: the original pre-activation mean back.
  np.testing.assert_allclose(udfc.mean_match(moments_lib.relu_mean(m0, sd), 1.0, sd), m0,
                             rtol=1e-7, atol=1e-9)
  s = rng.uniform(0.5, 1.5, 300)
  target = moments_lib.relu_mean(m0, sd) * rng.uniform(0.2, 50.0, 300)  # roots far from m0 too
  m = udfc.mean_match(target, s, sd)
  np.testing.assert_allclose(s * moments_lib.relu_mean(m, sd), target, rtol=1e-9)
  bad = udfc.mean_match([0.0, -1.0, 1.0, 1.0, np.nan], [1.0, 1.0, 0.0, 1.0, 1.0],
                        [1.0, 1.0, 1.0, 0.0, 1.0])
  assert np.isnan(bad).all()


def test_kept_shift_with_unit_scale_is_dfq_bias_correction(resnet20):
  """s = 1: the mean match must only undo the quantization's mean shift alpha (What - W) . E[x]."""
  spec, v = resnet20.spec, resnet20.v
  problems = selection_lib.build_problems(spec, v, selection_lib.Selection(ratio=0.0))
  model = udfc._MeanModel(spec, v, problems, 'padding_aware')
  for index in (0, 4, 8):
    u = spec.units[index]
    k = np.asarray(trees.get_path(v['params'], u.producer)['kernel'], np.float64)
    err = np.asarray(quant.fake_quantize(k.astype(np.float32), bits=3), np.float64) - k
    delta, skipped = model.kept_shift(index, err, np.ones(k.shape[-1]))
    alpha = terms.bn_affine(v, u)['alpha']
    want = -alpha * (model.moments[u.name].mean @ err.sum(axis=(0, 1)))
    assert skipped == 0 and np.abs(want).max() > 1e-4
    np.testing.assert_allclose(delta, want, rtol=1e-6, atol=1e-9)


def test_udfc_bias_correction_moves_only_bn_shifts_and_consumer_means(resnet20):
  spec, v = resnet20.spec, resnet20.v
  off = _udfc(spec, v, bits=4, ratio=0.3)
  on = _udfc(spec, v, bits=4, ratio=0.3, bias_correction=True)
  assert on[0] == off[0] and on[3]['bias_correction'] and not off[3]['bias_correction']
  a = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(on[1])}
  b = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(off[1])}
  assert a.keys() == b.keys()
  moved = {p for p in a if not np.array_equal(a[p], b[p])}
  blocks = {u.name.split('/')[0] for u in spec.units}
  want = ({f"['params']['{blk}']['bn1']['bias']" for blk in blocks}
          | {f"['batch_stats']['{blk}']['bn2']['mean']" for blk in blocks})
  assert moved == want, moved ^ want  # every integer kernel and scale is unchanged
  for name, unit in on[3]['units'].items():
    assert unit['mean_match_skipped'] == 0 and unit['bias_constant']['max'] > 0, name
