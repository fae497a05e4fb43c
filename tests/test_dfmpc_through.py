"""DF-MPC beyond the presets' plain units (lbyl_jax.quant.dfmpc): ReLU6 moments, compensation
through a depthwise conv (MobileNetV2's expansion units), depthwise convs as producers, and user
models whose input moments come from the traced units. Float64 NumPy references (quadrature,
explicit sums) and Monte Carlo."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import gaussian_reference
import pytest
import scipy.stats

import lbyl_jax
from lbyl_jax.core import trees
from lbyl_jax.models import archs
from lbyl_jax.models import custom
from lbyl_jax.pruning.moments import InputMoments
from lbyl_jax.quant import dfmpc
from lbyl_jax.quant import uniform as quant


# --------------------------------------------------------------------------------------------
# Clipped-Gaussian (ReLU6) moments.


def _quad_clipped(m, s, hi=6.0):
  """E[clip(y, 0, hi)^p], p = 1, 2, by adaptive quadrature of the density (float64)."""
  return [gaussian_reference.clipped_moment(m, s, p, hi) for p in (1, 2)]


def test_clipped_moments_match_quadrature():
  cases = [(0.0, 1.0), (3.0, 2.0), (-2.0, 0.5), (7.5, 1.0), (5.9, 0.01), (1.0, 30.0), (12.0, 2.0)]
  m = np.array([c[0] for c in cases])
  s = np.array([c[1] for c in cases])
  e1, e2 = dfmpc.clipped_moments(m, s ** 2)
  for i, (mi, si) in enumerate(cases):
    r1, r2 = _quad_clipped(mi, si)
    np.testing.assert_allclose([e1[i], e2[i]], [r1, r2], rtol=1e-9, atol=1e-12)
  # zero variance: the clipped constant
  z1, z2 = dfmpc.clipped_moments(np.array([-1.0, 2.0, 9.0]), np.zeros(3))
  np.testing.assert_array_equal(z1, [0.0, 2.0, 6.0])
  np.testing.assert_array_equal(z2, [0.0, 4.0, 36.0])
  # hi -> infinity is the ReLU
  r1, r2 = dfmpc.clipped_moments(m, s ** 2, hi=1e6)
  from lbyl_jax.pruning import moments  # pylint: disable=import-outside-toplevel
  q1, q2 = moments.rectified_moments(m, s ** 2)
  np.testing.assert_allclose(r1, q1, rtol=1e-10)
  np.testing.assert_allclose(r2, q2, rtol=1e-10)


def _grid_cross(m1, s1, m2, s2, rho, n=2401, lim=9.0):
  """E[clip(y1) clip(y2)] on a 2-D grid over standard normals (trapezoid, float64)."""
  x = np.linspace(-lim, lim, n)
  w = np.full(n, x[1] - x[0])
  w[[0, -1]] *= 0.5
  w = w * scipy.stats.norm.pdf(x)
  X, Y = np.meshgrid(x, x, indexing='ij')
  y1 = m1 + s1 * X
  y2 = m2 + s2 * (rho * X + np.sqrt(1 - rho ** 2) * Y)
  f = np.clip(y1, 0, 6) * np.clip(y2, 0, 6)
  return float(w @ f @ w)


def test_relu6_cross_moment_against_quadrature_and_monte_carlo():
  cases = [(1.0, 2.0, 2.0, 1.5, 0.3), (4.0, 3.0, 5.0, 2.0, 0.9), (-1.0, 1.0, 7.0, 2.0, -0.5),
           (3.0, 1.0, 3.2, 1.1, 0.99)]
  got = dfmpc.relu6_cross_moment(*(np.array(c) for c in zip(*cases)))
  for g, c in zip(got, cases):
    np.testing.assert_allclose(g, _grid_cross(*c), rtol=2e-5)
  rng = np.random.default_rng(0)
  m1, s1, m2, s2, rho = cases[1]
  x, y = rng.standard_normal((2, 2_000_000))
  mc = np.mean(np.clip(m1 + s1 * x, 0, 6) * np.clip(m2 + s2 * (rho * x + np.sqrt(1 - rho ** 2) * y),
                                                    0, 6))
  np.testing.assert_allclose(got[1], mc, rtol=5e-3)
  # rho = 1, same Gaussian: the univariate second moment
  _, e2 = dfmpc.clipped_moments(np.array([2.0]), np.array([4.0]))
  np.testing.assert_allclose(dfmpc.relu6_cross_moment([2.0], [2.0], [2.0], [2.0], [1.0]), e2,
                             rtol=1e-7)


def test_relu6_unit_moments_against_monte_carlo():
  # A dense producer on independent inputs, ReLU6 feature maps: diag and full moments.
  rng = np.random.default_rng(11)
  W = rng.normal(size=(6, 3))
  What = quant.fake_quantize(W, bits=2)
  alpha, b = rng.uniform(0.5, 2, 3), rng.normal(2.0, 2.0, size=3)
  mean, var = rng.uniform(-1, 1, 6), rng.uniform(0.2, 2, 6)
  F, t = dfmpc.moment_rows(W, alpha, b, InputMoments(mean, var))
  Fh, th = dfmpc.moment_rows(What, alpha, b, InputMoments(mean, var))
  x = mean + np.sqrt(var) * rng.standard_normal((400_000, 6))
  a = np.clip(alpha * (x @ W) + b, 0, 6)
  ah = np.clip(alpha * (x @ What) + b, 0, 6)
  n = len(x)
  eah, ehh, eaa = dfmpc.full_moments(F, Fh, t, th, activation='relu6')
  np.testing.assert_allclose(eah, a.T @ ah / n, rtol=0.02, atol=0.02)
  np.testing.assert_allclose(ehh, ah.T @ ah / n, rtol=0.02, atol=0.02)
  np.testing.assert_allclose(eaa, np.mean(a * a, axis=0), rtol=0.02, atol=0.02)
  dah, dhh, daa = dfmpc.diag_moments(F, Fh, t, th, activation='relu6')
  np.testing.assert_allclose(dah, np.diag(eah), rtol=1e-12)
  np.testing.assert_allclose(dhh, np.diag(ehh), rtol=1e-12)
  np.testing.assert_allclose(daa, eaa, rtol=1e-12)
  for S in (dfmpc.diag_coefficients(F, Fh, t, th, 0.5, activation='relu6'),):
    before, after = dfmpc.reconstruction_error(F, Fh, t, th, S, activation='relu6')
    assert after <= before
    # the modelled errors against the sampled ones
    emp = lambda c: np.sum(np.mean((a - c * ah) ** 2, 0)) / np.sum(np.mean(a * a, 0))  # noqa
    np.testing.assert_allclose([before, after], [emp(1.0), emp(S)], rtol=0.03)


# --------------------------------------------------------------------------------------------
# A small inverted residual as a user model: the compensation through the depthwise conv and of
# the depthwise conv, against a float64 NumPy reference.


class TinyInverted(nn.Module):
  """1x1 expansion + BN + ReLU6, depthwise 3x3 + BN + ReLU6, 1x1 projection + BN, classifier."""

  hidden: int = 12

  @nn.compact
  def __call__(self, x, train: bool = False):
    ra = not train
    h = jax.nn.relu6(nn.BatchNorm(use_running_average=ra)(
        nn.Conv(self.hidden, (1, 1), use_bias=False)(x)))
    h = nn.Conv(self.hidden, (3, 3), padding=1, feature_group_count=self.hidden,
                use_bias=False)(h)
    h = jax.nn.relu6(nn.BatchNorm(use_running_average=ra)(h))
    h = nn.BatchNorm(use_running_average=ra)(nn.Conv(8, (1, 1), use_bias=False)(h))
    return nn.Dense(10)(jnp.mean(h, axis=(1, 2)))


def _randomize_bn(v, rng):
  v = trees.copy_arrays(v)
  flat_p = v['params']
  for name in list(v['batch_stats']):
    p, s = flat_p[name], v['batch_stats'][name]
    c = p['scale'].shape[0]
    p['scale'] = rng.uniform(0.5, 2.0, c).astype(np.float32)
    p['bias'] = rng.normal(1.5, 1.5, c).astype(np.float32)
    s['mean'] = rng.normal(0, 0.3, c).astype(np.float32)
    s['var'] = rng.uniform(0.5, 2.0, c).astype(np.float32)
  return v


@pytest.fixture(scope='module')
def tiny():
  module = TinyInverted()
  v = jax.tree_util.tree_map(np.asarray, module.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 4))))
  v = _randomize_bn(v, np.random.default_rng(2))
  spec = custom.custom_spec(module, (1, 8, 8, 4))
  return module, spec, v


def _quad_relu6_mean_var(m, s):
  e1, e2 = _quad_clipped(m, s)
  return e1, e2 - e1 * e1


def _ref_coefficients(F, Fh, t, th, lam):
  """(E[a ahat] + lam_bar) / (E[ahat^2] + lam_bar) with ReLU6 moments on the 2-D grid."""
  s, sh = np.sqrt(np.sum(F * F, 1)), np.sqrt(np.sum(Fh * Fh, 1))
  rho = np.sum(F * Fh, 1) / (s * sh)
  eah = np.array([_grid_cross(t[k], s[k], th[k], sh[k], min(rho[k], 1 - 1e-12))
                  for k in range(len(t))])
  ehh = np.array([_quad_clipped(th[k], sh[k])[1] for k in range(len(t))])
  lb = lam * np.mean(ehh)
  return (eah + lb) / (ehh + lb)


def test_user_inverted_residual_units(tiny):
  _, spec, _ = tiny
  assert [u.name for u in spec.units] == ['Conv_0', 'Conv_2']
  u = spec.units[0]
  assert u.producer == 'Conv_0' and u.activation == 'relu6' and u.through
  assert dfmpc.unit_problem(u) is None
  (d,) = dfmpc.depthwise_units(spec.units)
  assert d.producer == 'Conv_1' and d.bn == 'BatchNorm_1' and d.consumer == 'Conv_2'
  assert d.activation == 'relu6'


def test_through_depthwise_compensation_matches_numpy_reference(tiny):
  _, spec, v = tiny
  lam = 0.5
  dep = lambda p, k: quant.fake_quantize(k, bits=3)  # noqa: E731
  work, rep = dfmpc.compensate(spec, v, dep, lam=lam, depthwise=True, units=spec.units[:1],
                               replace_producers=False)
  p = v['params']
  bs = v['batch_stats']
  eps = 1e-5

  def affine(bn):
    g, be = np.float64(p[bn]['scale']), np.float64(p[bn]['bias'])
    mu, var = np.float64(bs[bn]['mean']), np.float64(bs[bn]['var'])
    alpha = g / np.sqrt(var + eps)
    return alpha, be - alpha * mu, be, np.abs(g)

  # Expansion unit: input = the normalized image (mean 0, var 1 per channel).
  W = np.float64(p['Conv_0']['kernel'])[0, 0]  # (4, 12)
  Wh = np.float64(quant.fake_quantize(p['Conv_0']['kernel'], bits=3))[0, 0]
  alpha, b, beta, gamma = affine('BatchNorm_0')
  F, Fh = (alpha[:, None] * W.T), (alpha[:, None] * Wh.T)
  c1 = _ref_coefficients(F, Fh, b, b, lam)
  D = np.float64(p['Conv_1']['kernel'])
  np.testing.assert_allclose(np.float64(work['params']['Conv_1']['kernel']), D * c1,
                             rtol=2e-5)
  # Depthwise unit: input = ReLU6(N(beta, gamma^2)) of the expansion BN (per channel, quadrature),
  # kernel = the compensated depthwise kernel, compensated in the projection.
  mv = np.array([_quad_relu6_mean_var(beta[k], gamma[k]) for k in range(12)])
  Dc = np.float64(work['params']['Conv_1']['kernel'])
  Dch = np.float64(quant.fake_quantize(Dc.astype(np.float32), bits=3))
  a2, b2, _, _ = affine('BatchNorm_1')
  taps = Dc.reshape(9, 12).T  # (12, 9)
  tapsh = Dch.reshape(9, 12).T
  sd = np.sqrt(mv[:, 1])
  F2, F2h = a2[:, None] * taps * sd[:, None], a2[:, None] * tapsh * sd[:, None]
  t2 = a2 * taps.sum(1) * mv[:, 0] + b2
  t2h = a2 * tapsh.sum(1) * mv[:, 0] + b2
  c2 = _ref_coefficients(F2, F2h, t2, t2h, lam)
  V = np.float64(p['Conv_2']['kernel'])
  np.testing.assert_allclose(np.float64(work['params']['Conv_2']['kernel']),
                             V * c2[:, None], rtol=1e-4)
  for r in rep.values():
    assert r['rel_error_after'] <= r['rel_error_before']
  assert rep['Conv_1']['depthwise'] and rep['Conv_1']['form'] == 'diag'
  # The modelled error of the expansion unit against Monte Carlo of the 1x1 conv on iid N(0, 1)
  # inputs (the input model is exact there): the compensation lowers the sampled error too.
  x = np.random.default_rng(0).standard_normal((200_000, 4))
  a = np.clip((x @ W) * alpha + b, 0, 6)
  ah = np.clip((x @ Wh) * alpha + b, 0, 6)
  emp = lambda c: np.sum(np.mean((a - c * ah) ** 2, 0)) / np.sum(np.mean(a * a, 0))  # noqa
  r = rep['Conv_0']
  np.testing.assert_allclose([r['rel_error_before'], r['rel_error_after']], [emp(1.0), emp(c1)],
                             rtol=0.03)
  assert emp(c1) < emp(1.0)


def test_through_units_in_full_mode_use_diag(tiny):
  _, spec, v = tiny
  dep = lambda p, k: quant.fake_quantize(k, bits=3)  # noqa: E731
  w_diag, _ = dfmpc.compensate(spec, v, dep, mode='diag', lam=2.0, units=spec.units[:1])
  w_full, rep = dfmpc.compensate(spec, v, dep, mode='full', lam=2.0, units=spec.units[:1])
  assert rep['Conv_0']['form'] == 'diag'
  for a, b in zip(jax.tree_util.tree_leaves(w_diag), jax.tree_util.tree_leaves(w_full)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='only per-channel coefficients'):
    dfmpc.fold(trees.copy_arrays(v)['params'], spec.units[0], np.eye(12))


def test_lam_depthwise_applies_to_depthwise_paths_only(tiny):
  _, spec, v = tiny
  dep = lambda p, k: quant.fake_quantize(k, bits=3)  # noqa: E731
  _, mixed = dfmpc.compensate(spec, v, dep, lam=1.0, lam_depthwise=0.1, depthwise=True)
  _, small = dfmpc.compensate(spec, v, dep, lam=0.1, depthwise=True)
  _, large = dfmpc.compensate(spec, v, dep, lam=1.0, depthwise=True)
  assert mixed['Conv_0'] == small['Conv_0'] and mixed['Conv_1'] == small['Conv_1']
  assert mixed['Conv_2'] == large['Conv_2'] and small['Conv_2'] != large['Conv_2']
  with pytest.raises(ValueError, match='lam'):
    dfmpc.compensate(spec, v, dep, lam_depthwise=-1.0)


# --------------------------------------------------------------------------------------------
# Through the API: MobileNetV2 and user CNNs, saved and reloaded.


class PlainCNN(nn.Module):
  """conv-BN-ReLU x 3 with a max-pool, a flatten and a dense classifier (NHWC flatten)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    for w in (16, 24):
      x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(w, (3, 3), padding=1)(x)))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(16, (3, 3), padding=1)(x)))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(10)(x)


class ResCNN(nn.Module):
  """A residual block: the block's inner conv reads a unit that is tied by the add (no model)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda: nn.BatchNorm(use_running_average=not train)  # noqa: E731
    x = nn.relu(bn()(nn.Conv(16, (3, 3), padding=1, use_bias=False)(x)))
    h = nn.relu(bn()(nn.Conv(16, (3, 3), padding=1, use_bias=False)(x)))
    h = bn()(nn.Conv(16, (3, 3), padding=1, use_bias=False)(h))
    x = nn.relu(x + h)
    h = nn.gelu(bn()(nn.Conv(16, (3, 3), padding=1, use_bias=False)(x)))
    x = bn()(nn.Conv(16, (3, 3), padding=1, use_bias=False)(h))
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def _check(result, images, tmp_path, **load_kw):
  logits = np.asarray(result.apply(images))
  assert np.all(np.isfinite(logits))
  loaded = lbyl_jax.load(result.save(tmp_path / 'run'), **load_kw)
  np.testing.assert_array_equal(np.asarray(loaded.apply(images)), logits)
  units = result.report['quant_report']['units']
  for name, r in units.items():
    assert 'skipped' in r or r['rel_error_after'] <= r['rel_error_before'] + 1e-15, name
  return units


@pytest.fixture(scope='module')
def mobilenet():
  spec = archs.get('mobilenet_v2_cifar10')
  v = jax.tree_util.tree_map(np.asarray, spec.init(jax.random.PRNGKey(0)))
  images = np.random.default_rng(0).integers(0, 256, size=(2, *spec.image_shape), dtype=np.uint8)
  return spec, v, images


@pytest.mark.parametrize('kw', [dict(method='prune', ratio=0.0), dict(method='lbyl', ratio=0.3)])
def test_mobilenet_v2_dfmpc(mobilenet, tmp_path, kw):
  spec, v, images = mobilenet
  result = lbyl_jax.compress('mobilenet_v2_cifar10', v, quant_method='dfmpc', bits=4, **kw)
  units = _check(result, images, tmp_path)
  rep = result.report['quant_report']
  assert not any('skipped' in r for r in units.values())
  expansion = units['features_5/conv_0_0']
  assert expansion['rel_error_after'] < expansion['rel_error_before']
  if kw['ratio'] == 0.0:  # unpruned: the depthwise convs too, at DEPTHWISE_LAM
    assert rep['depthwise'] is True and rep['lam_depthwise'] == dfmpc.DEPTHWISE_LAM
    assert set(units) == ({u.name for u in spec.units}
                          | {u.through[0].path for u in spec.units})
    dw = units['features_5/conv_1_0']
    assert dw['depthwise'] and dw['rel_error_after'] < dw['rel_error_before']
  else:  # pruned: the expansion units only, at the plain lam
    assert 'depthwise' not in rep and 'lam_depthwise' not in rep and rep['lam'] == 1.0
    assert set(units) == {u.name for u in spec.units}
  ref = lbyl_jax.compress('mobilenet_v2_cifar10', v, quant_method='rtn', bits=4, **kw)
  assert not np.array_equal(np.asarray(ref.apply(images)), np.asarray(result.apply(images)))


def test_mobilenet_v2_dfmpc_mixed_precision(mobilenet):
  spec, v, _ = mobilenet
  result = lbyl_jax.compress('mobilenet_v2_cifar10', v, quant_method='dfmpc', bits=3,
                             dfmpc_high_bits=8, ratio=0.0)
  rep = result.report['quant_report']
  assert rep['mode'] == 'full' and 'depthwise' not in rep
  assert set(rep['units']) == {u.name for u in spec.units}  # the depthwise convs compensate
  assert {r['form'] for r in rep['units'].values()} == {'diag'}
  for u in spec.units:
    assert result.qmeta['layers'][u.producer]['bits'] == 3
    assert result.qmeta['layers'][u.through[0].path]['bits'] == 8


@pytest.mark.parametrize('name', ['plain', 'tiny'])
def test_user_cnn_dfmpc(tmp_path, name, tiny):
  if name == 'plain':
    module = PlainCNN()
    v = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
    v = _randomize_bn(jax.tree_util.tree_map(np.asarray, v), np.random.default_rng(4))
    shape = (1, 16, 16, 3)
  else:
    module, _, v = tiny
    shape = (1, 8, 8, 4)
  images = np.random.default_rng(0).integers(0, 256, size=(2, *shape[1:]), dtype=np.uint8)
  for kw in (dict(ratio=0.0), dict(method='lbyl', ratio=0.3)):
    result = lbyl_jax.compress(module, v, example_shape=shape, quant_method='dfmpc', bits=4,
                               **kw)
    units = _check(result, images, tmp_path / str(kw['ratio']), module=module)
    assert not any('skipped' in r for r in units.values())
    # the depthwise conv is a unit of its own on the unpruned network only
    assert len(units) == len(result.spec.units) + (name == 'tiny' and kw['ratio'] == 0.0)
    assert any(r['rel_error_after'] < r['rel_error_before'] for r in units.values())


def test_user_dense_after_flatten_moments():
  # PlainCNN's dense layer reads the last conv unit through a max-pool-free NHWC flatten: its
  # input moments repeat the unit's ReLU(N(beta, gamma^2)) over the flattened positions.
  module = PlainCNN()
  v = jax.tree_util.tree_map(np.asarray, module.init(jax.random.PRNGKey(0),
                                                     jnp.zeros((1, 16, 16, 3))))
  v = _randomize_bn(v, np.random.default_rng(4))
  spec = custom.custom_spec(module, (1, 16, 16, 3), policy=())
  mom, unknown = dfmpc.traced_input_moments(spec, v)
  assert not unknown
  np.testing.assert_array_equal(mom['Conv_0'].mean, np.zeros(3))
  (dense_unit,) = [u for u in spec.units if u.producer == 'Dense_0']
  con = [c for u in spec.units for c in u.consumers if c.path == 'Dense_0'][0]
  beta = np.float64(v['params']['BatchNorm_2']['bias'])
  gamma = np.float64(v['params']['BatchNorm_2']['scale'])
  e1, var = dfmpc.activation_mean_var('relu', beta, gamma ** 2)
  idx = con.indices(np.arange(16))
  np.testing.assert_allclose(mom[dense_unit.name].mean[idx], np.broadcast_to(e1[:, None], idx.shape))
  np.testing.assert_allclose(mom[dense_unit.name].var[idx], np.broadcast_to(var[:, None], idx.shape))


def test_user_model_unknown_inputs_and_refusals(tmp_path):
  module = ResCNN()
  v = jax.tree_util.tree_map(np.asarray, module.init(jax.random.PRNGKey(0),
                                                     jnp.zeros((1, 8, 8, 3))))
  spec = custom.custom_spec(module, (1, 8, 8, 3))
  names = {u.name for u in spec.units}
  assert 'Conv_3' in names and dfmpc.unit_problem(spec.discovery.unit('Conv_3')).startswith(
      'activation')
  with pytest.raises(ValueError, match="Conv_3: activation 'gelu"):
    lbyl_jax.compress(module, v, example_shape=(1, 8, 8, 3), method='prune', ratio=0.0,
                      quant_method='dfmpc', bits=4)
  # Conv_1 reads the output of Conv_0, which the residual add ties (no unit): its input moments
  # are unknown, so it is left uncompensated and reported.
  mom, unknown = dfmpc.traced_input_moments(spec, v)
  assert 'Conv_1' in unknown and 'Conv_1' not in mom
  dep = lambda p, k: quant.fake_quantize(k, bits=4)  # noqa: E731
  work, rep = dfmpc.compensate(spec, v, dep, units=[spec.discovery.unit('Conv_1')])
  assert rep['Conv_1']['skipped'].startswith('input moments unknown')
  np.testing.assert_array_equal(work['params']['Conv_2']['kernel'], v['params']['Conv_2']['kernel'])
