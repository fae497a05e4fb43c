"""BN re-estimation after compression (lbyl_jax.experimental.bn_reestimate).

The reference for the input-driven routes is an independent float64 NumPy forward of the CIFAR
ResNets (shortcut A and B) and the CIFAR VGG written here; the moments route is checked against
its own closed forms (fixed point, idempotence), against brute-force sums over positions, and
against Monte Carlo batch statistics of a compressed network whose BN premise holds.
"""

from __future__ import annotations

import collections
import json

import jax
import numpy as np
import pytest

import lbyl_jax
from lbyl_jax import pipeline
from lbyl_jax.cli import restore as cli
from lbyl_jax.core import trees
from lbyl_jax.core import units as units_lib
from lbyl_jax.experimental import bn_reestimate as br
from lbyl_jax.experimental import distill
from lbyl_jax.experimental import montecarlo
from lbyl_jax.models import archs
from lbyl_jax.pruning import moments
from lbyl_jax.pruning import selection as selection_lib
from lbyl_jax.pruning.selection import Selection
from test_evaluate import random_variables

EPS = 1e-5


# --------------------------------------------------------------------------------------------
# Independent float64 NumPy forward.


def _conv(x, k, stride, pad, bias=None):
  """NHWC x (float64) with an HWIO kernel, explicit symmetric padding."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw = k.shape[:2]
  win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
  win = win[:, ::stride, ::stride]  # (N, OH, OW, C, kh, kw)
  y = np.einsum('nhwcij,ijco->nhwo', win, np.asarray(k, np.float64))
  return y if bias is None else y + np.asarray(bias, np.float64)


class NumpyNet:
  """float64 forward whose BNs either normalize with their batch statistics ('sequential') or with
  the running statistics ('all_at_once'); every BN input's (mean, biased var) is recorded."""

  def __init__(self, spec, variables, mode):
    self.spec, self.mode = spec, mode
    self.p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables['params'])
    self.s = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables['batch_stats'])
    self.stats = {}

  def bn(self, path, z):
    axes = tuple(range(z.ndim - 1))
    mu, var = z.mean(axes), z.var(axes)
    self.stats[path] = (mu, var)
    if self.mode == 'all_at_once':
      st = trees.get_path(self.s, path)
      mu, var = st['mean'], st['var']
    p = trees.get_path(self.p, path)
    return (z - mu) / np.sqrt(var + EPS) * p['scale'] + p['bias']

  def conv(self, path, x, stride, pad):
    layer = trees.get_path(self.p, path)
    return _conv(x, layer['kernel'], stride, pad, layer.get('bias'))

  def __call__(self, x):
    x = np.asarray(x, np.float64)
    if self.spec.family == 'cifar_resnet':
      return self._resnet(x)
    return self._vgg(x)

  def _resnet(self, x):
    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    x = relu(self.bn('bn1', self.conv('conv1', x, 1, 1)))
    s = 1
    while f'layer{s}_0' in self.p:
      i = 0
      while f'layer{s}_{i}' in self.p:
        blk = f'layer{s}_{i}'
        stride = 2 if (s > 1 and i == 0) else 1
        out = relu(self.bn(f'{blk}/bn1', self.conv(f'{blk}/conv1', x, stride, 1)))
        out = self.bn(f'{blk}/bn2', self.conv(f'{blk}/conv2', out, 1, 1))
        planes = out.shape[-1]
        if 'downsample_conv' in self.p[blk]:
          sc = self.bn(f'{blk}/downsample_bn', self.conv(f'{blk}/downsample_conv', x, stride, 0))
        elif planes != x.shape[-1] or stride != 1:
          q = planes // 4
          sc = np.pad(x[:, ::stride, ::stride, :], ((0, 0), (0, 0), (0, 0), (q, q)))
        else:
          sc = x
        x = relu(out + sc)
        i += 1
      s += 1
    x = x.mean((1, 2))
    return x @ self.p['fc']['kernel'] + self.p['fc']['bias']

  def _vgg(self, x):
    cfg = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512)
    i = 0
    for c in cfg:
      if c == 'M':
        n, h, w, ch = x.shape
        x = x.reshape(n, h // 2, 2, w // 2, 2, ch).max((2, 4))
        continue
      x = np.maximum(self.bn(f'bn{i}', self.conv(f'conv{i}', x, 1, 1)), 0.0)
      i += 1
    n, h, w, ch = x.shape
    x = x.reshape(n, h // 2, 2, w // 2, 2, ch).mean((2, 4))
    x = np.transpose(x, (0, 3, 1, 2)).reshape(n, -1)
    fc1 = self.p['fc1']
    x = np.maximum(self.bn('bn_fc1', x @ fc1['kernel'] + fc1['bias']), 0.0)
    return x @ self.p['fc2']['kernel'] + self.p['fc2']['bias']


def _stats_of(variables, path):
  st = trees.get_path(variables['batch_stats'], path)
  return np.asarray(st['mean'], np.float64), np.asarray(st['var'], np.float64)


# --------------------------------------------------------------------------------------------
# Fixtures: small random networks, compressed once per module.


def _compressed(name, ratio=0.5, method='lbyl', seed=0):
  spec = archs.get(name)
  variables = random_variables(spec, seed=seed)
  res = pipeline.compress(spec, variables, method=method, ratio=ratio)
  return spec, variables, res.widths, res.variables


@pytest.fixture(scope='module')
def r20():
  return _compressed('resnet20')


@pytest.fixture(scope='module')
def r20b():
  return _compressed('resnet20_b', method='prune')


@pytest.fixture(scope='module')
def vgg():
  return _compressed('vgg16_bn_cifar', ratio=0.3, method='nm')


@pytest.fixture(scope='module')
def images():
  rng = np.random.default_rng(7)
  return rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Route (c): images. Statistics against the NumPy forward.


@pytest.mark.parametrize('net', ['r20', 'r20b', 'vgg'])
@pytest.mark.parametrize('mode', ['sequential', 'all_at_once'])
def test_images_route_matches_numpy_forward(net, mode, images, request):
  spec, variables, widths, small = request.getfixturevalue(net)
  new, report = br.reestimate(spec, variables, small, widths, source='images', images=images,
                              mode=mode, anchor=False)
  x = np.asarray(archs.normalize_fn(spec)(images), np.float64)
  ref = NumpyNet(spec, small, mode)
  ref(x)
  assert set(ref.stats) == {b.path for b in br.bn_layers(spec, small)}
  for path, (mu, var) in ref.stats.items():
    got_mu, got_var = _stats_of(new, path)
    scale = np.sqrt(var.max()) + 1e-3
    np.testing.assert_allclose(got_mu, mu, atol=2e-4 * scale, rtol=2e-4, err_msg=path)
    np.testing.assert_allclose(got_var, var, atol=1e-4 * var.max(), rtol=1e-3, err_msg=path)
  assert report['data_free'] is False and report['source'] == 'images'
  assert report['n_bn'] == len(ref.stats)
  # Only running statistics change; the network is the same class with the same widths.
  assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(small)
  for a, b in zip(jax.tree_util.tree_leaves(new['params']), jax.tree_util.tree_leaves(small['params'])):
    assert a is b or np.array_equal(a, b)
  assert units_lib.widths_of(new, spec.units) == tuple(widths)
  assert np.isfinite(spec.build(widths).apply(new, x[:2].astype(np.float32))).all()


def test_sequential_statistics_are_layer_by_layer(r20, images):
  """'sequential' equals re-estimating one BN at a time in forward order with one pass each."""
  spec, variables, widths, small = r20
  x = np.asarray(archs.normalize_fn(spec)(images), np.float32)
  seq = br.batch_statistics(spec, small, x, mode='sequential')
  work = jax.tree_util.tree_map(np.array, small)
  for bn in br.bn_layers(spec, small):
    stale = br.batch_statistics(spec, work, x, mode='all_at_once')  # upstream BNs already set
    mu, var = stale[bn.path]
    trees.set_path(work['batch_stats'], bn.path, dict(mean=mu.astype(np.float32),
                                                          var=var.astype(np.float32)))
    np.testing.assert_allclose(mu, seq[bn.path][0], atol=1e-4 * (1 + np.abs(mu).max()))
    np.testing.assert_allclose(var, seq[bn.path][1], rtol=2e-3, atol=1e-5 * var.max())


def test_chunks_pool_exactly_in_all_at_once_mode(r20, images):
  spec, _, _, small = r20
  x = np.asarray(archs.normalize_fn(spec)(images), np.float32)
  one = br.batch_statistics(spec, small, x, mode='all_at_once')
  two = br.batch_statistics(spec, small, x, mode='all_at_once', batch_size=4)  # 4 + 2
  for path, (mu, var) in one.items():
    np.testing.assert_allclose(two[path][0], mu, atol=1e-5 * (1 + np.abs(mu).max()))
    np.testing.assert_allclose(two[path][1], var, rtol=1e-4, atol=1e-6 * var.max())


def test_images_anchor_is_differential(r20, images):
  """anchor=True: original statistics plus the change measured between the two networks."""
  spec, variables, widths, small = r20
  plain, _ = br.reestimate(spec, variables, small, widths, source='images', images=images,
                           anchor=False)
  anch, rep = br.reestimate(spec, variables, small, widths, source='images', images=images)
  x = np.asarray(archs.normalize_fn(spec)(images), np.float32)
  orig = br.batch_statistics(spec, variables, x)
  assert rep['anchor'] and rep['channel_map_mismatch'] == 0.0
  for bn in br.bn_layers(spec, small):
    idx, _ = br.channel_map(variables, small, bn.path)
    m0, v0 = _stats_of(variables, bn.path)
    mc, vc = _stats_of(plain, bn.path)
    mo, vo = orig[bn.path]
    ma, va = _stats_of(anch, bn.path)
    np.testing.assert_allclose(ma, m0[idx] + mc - mo[idx], atol=1e-5 * (1 + np.abs(m0).max()))
    np.testing.assert_allclose(va, v0[idx] * vc / vo[idx], rtol=1e-4)
  # Anchored on the original network itself, nothing changes.
  same, _ = br.reestimate(spec, variables, variables, source='images', images=images)
  for bn in br.bn_layers(spec, variables):
    np.testing.assert_allclose(_stats_of(same, bn.path)[0], _stats_of(variables, bn.path)[0],
                               atol=1e-6)
    np.testing.assert_allclose(_stats_of(same, bn.path)[1], _stats_of(variables, bn.path)[1],
                               rtol=1e-6)


def test_channel_map_recovers_the_kept_channels(r20):
  spec, variables, _, _ = r20
  problems = selection_lib.build_problems(spec, variables, Selection(ratio=0.5))
  small = pipeline.compress(spec, variables, method='prune', ratio=0.5).variables
  for p in problems:
    idx, mismatch = br.channel_map(variables, small, p.unit.bn)
    np.testing.assert_array_equal(idx, p.keep)
    assert mismatch == 0.0


# --------------------------------------------------------------------------------------------
# Route (a): moments.


@pytest.mark.parametrize('net', ['r20', 'r20b', 'vgg'])
def test_moments_fixed_point_and_idempotent(net, request):
  spec, variables, widths, small = request.getfixturevalue(net)
  same, rep = br.reestimate(spec, variables, variables, source='moments')
  assert rep['data_free'] and rep['source'] == 'moments'
  for bn in br.bn_layers(spec, variables):  # an unchanged network keeps its statistics exactly
    for a, b in zip(_stats_of(same, bn.path), _stats_of(variables, bn.path)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  once, _ = br.reestimate(spec, variables, small, widths, source='moments')
  twice, _ = br.reestimate(spec, variables, once, widths, source='moments')
  for bn in br.bn_layers(spec, small):
    for a, b in zip(_stats_of(once, bn.path), _stats_of(twice, bn.path)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  changed = sum(not np.allclose(_stats_of(once, b.path)[1], _stats_of(small, b.path)[1])
                for b in br.bn_layers(spec, small))
  assert changed > 0  # the compressed consumers' statistics do move


def test_moments_absolute_is_the_model(r20):
  spec, variables, widths, small = r20
  new, _ = br.reestimate(spec, variables, small, widths, source='moments', anchor=False)
  model = br.model_statistics(spec, small)
  for path, (mu, var) in model.items():
    np.testing.assert_allclose(_stats_of(new, path)[0], mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_stats_of(new, path)[1], var, rtol=1e-5)


def test_propagate_reads_pruned_widths(r20):
  spec, variables, widths, small = r20
  full = moments.propagate(spec, variables)
  pruned = moments.propagate(spec, small)
  for u, w in zip(spec.units, widths):
    # Block inputs do not depend on the pruned inner width (bn1 is inside the residual branch).
    np.testing.assert_allclose(pruned[u.name].mean, full[u.name].mean, rtol=1e-12)
  assert min(widths) < max(spec.default_widths())


def test_layer_output_moments_against_brute_force():
  """Step 2 of the derivation: a zero-padded stride-2 conv over an input whose positions are
  independent (or identical), summed position by position."""
  rng = np.random.default_rng(3)
  C, O, H = 3, 4, 5
  K = rng.standard_normal((3, 3, C, O))
  bias = rng.standard_normal(O)
  m = rng.standard_normal(C)
  A = rng.standard_normal((C, C))
  cov = A @ A.T
  bn = br.BNLayer('bn', 'conv', 'conv', (H, H), (3, 3), (2, 2), ((1, 1), (1, 1)))
  pats = br._tap_patterns(bn)  # pylint: disable=protected-access
  Kt = K.reshape(9, C, O)
  for spatial in ('independent', 'shared'):
    mean, var = br.layer_output_moments(Kt, bias, m, cov, pats, spatial=spatial)
    means, variances = [], []
    for i in range(3):  # output rows: (5 + 2 - 3) // 2 + 1 = 3
      for j in range(3):
        taps = [(a, b) for a in range(3) for b in range(3)
                if 0 <= 2 * i - 1 + a < H and 0 <= 2 * j - 1 + b < H]
        means.append(sum(K[a, b].T @ m for a, b in taps) + bias)
        if spatial == 'independent':
          variances.append(sum(np.diag(K[a, b].T @ cov @ K[a, b]) for a, b in taps))
        else:
          ks = sum(K[a, b] for a, b in taps)
          variances.append(np.diag(ks.T @ cov @ ks))
    means, variances = np.asarray(means), np.asarray(variances)
    np.testing.assert_allclose(mean, means.mean(0), rtol=1e-12)
    np.testing.assert_allclose(var, variances.mean(0) + means.var(0), rtol=1e-12)


def test_moments_route_predicts_the_compressed_statistics():
  """Where the BN premise holds (statistics calibrated on iid Gaussian inputs, the model's input),
  the moments route moves the pruned consumers' statistics toward the compressed network's batch
  statistics on such inputs: much closer than the stale ones."""
  spec = archs.get('resnet20')
  variables = random_variables(spec, seed=4)
  cal = montecarlo.mc_propagate(spec, variables, n=64, seed=1, margin=0)['batch_stats']
  variables = dict(variables, batch_stats=cal)
  res = pipeline.compress(spec, variables, method='prune', ratio=0.5)
  widths, small = res.widths, res.variables
  new, _ = br.reestimate(spec, variables, small, widths, source='moments')
  x = np.random.default_rng(2).standard_normal((64, *spec.input_shape)).astype(np.float32)
  truth = br.batch_statistics(spec, small, x, mode='sequential')
  err_stale = err_new = 0.0
  for u in spec.units:
    bn = f'{u.consumer.rpartition("/")[0]}/bn2'
    _, v_true = truth[bn]
    err_stale += np.mean(np.log(_stats_of(small, bn)[1] / v_true) ** 2)
    err_new += np.mean(np.log(_stats_of(new, bn)[1] / v_true) ** 2)
  assert err_new < 0.5 * err_stale, (err_new, err_stale)


# --------------------------------------------------------------------------------------------
# Route (b): distilled inputs.


def test_distilled_route_is_deterministic_and_changes_only_batch_stats(r20):
  spec, variables, widths, small = r20
  a, rep = br.reestimate(spec, variables, small, widths, source='distilled', n=4, steps=3, seed=1)
  b, _ = br.reestimate(spec, variables, small, widths, source='distilled', n=4, steps=3, seed=1)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a['batch_stats']),
                                                      jax.tree_util.tree_leaves(small['batch_stats'])))
  for x, y in zip(jax.tree_util.tree_leaves(a['params']), jax.tree_util.tree_leaves(small['params'])):
    np.testing.assert_array_equal(x, y)
  assert rep['data_free'] and rep['n_inputs'] == 4 and rep['steps'] == 3
  assert rep['seconds'] >= rep['seconds_distill'] > 0
  # Supplying the same distilled inputs gives the same statistics without distilling again.
  x, _ = distill.distill(spec, variables, n=4, steps=3, seed=1)
  d, rep_d = br.reestimate(spec, variables, small, widths, source='distilled', inputs=x)
  for p, q in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(d)):
    np.testing.assert_array_equal(p, q)
  assert 'seconds_distill' not in rep_d
  # The input is left as it was.
  for bn in br.bn_layers(spec, small):
    assert not np.shares_memory(_stats_of(a, bn.path)[1], trees.get_path(
        small['batch_stats'], bn.path)['var'])


# --------------------------------------------------------------------------------------------
# Errors.


def test_errors(r20, images):
  spec, variables, widths, small = r20
  with pytest.raises(ValueError, match='source must be one of'):
    br.reestimate(spec, variables, small, source='data')
  with pytest.raises(ValueError, match='needs images'):
    br.reestimate(spec, variables, small, source='images')
  with pytest.raises(ValueError, match='only read by'):
    br.reestimate(spec, variables, small, source='moments', images=images)
  with pytest.raises(ValueError, match='mode must be one of'):
    br.reestimate(spec, variables, small, source='images', images=images, mode='once')
  with pytest.raises(ValueError, match='spatial must be one of'):
    br.reestimate(spec, variables, small, spatial='full')
  with pytest.raises(ValueError, match='n must be an integer >= 2'):
    br.reestimate(spec, variables, small, source='distilled', n=1)
  with pytest.raises(ValueError, match='steps must be an integer'):
    br.reestimate(spec, variables, small, source='distilled', steps=-1)
  with pytest.raises(ValueError, match='lr must be'):
    br.reestimate(spec, variables, small, source='distilled', lr=0.0)
  with pytest.raises(ValueError, match='batch_size'):
    br.reestimate(spec, variables, small, source='images', images=images, batch_size=0)
  with pytest.raises(ValueError, match='anchor must be'):
    br.reestimate(spec, variables, small, anchor='yes')
  with pytest.raises(ValueError, match='widths'):
    br.reestimate(spec, variables, small, widths=spec.default_widths())
  with pytest.raises(ValueError, match=r'shape \(n, 32, 32, 3\)'):
    br.reestimate(spec, variables, small, source='images', images=images[:, :16])
  with pytest.raises(ValueError, match='at least 2'):
    br.reestimate(spec, variables, small, source='images', images=images[:1])
  with pytest.raises(ValueError, match='uint8 pixels or already-normalized floats'):
    br.reestimate(spec, variables, small, source='images', images=images.astype(np.int32))
  with pytest.raises(ValueError, match='inputs'):
    br.reestimate(spec, variables, small, source='moments', inputs=np.zeros((2, 32, 32, 3)))
  with pytest.raises(ValueError, match='distill_from'):
    br.reestimate(spec, variables, small, source='distilled', distill_from='both')
  # A compressed network that is not derived from the given original cannot be anchored.
  other = random_variables(spec, seed=9)
  with pytest.raises(ValueError, match='do not match original ones'):
    br.reestimate(spec, other, small, source='moments')
  lenet = archs.get('lenet_300_100')
  lv = random_variables(lenet)
  with pytest.raises(ValueError, match='no BatchNorm'):
    br.reestimate(lenet, lv, lv)
  # Nothing was modified by the failed calls.
  fresh = _compressed('resnet20')[3]
  for a, b in zip(jax.tree_util.tree_leaves(small), jax.tree_util.tree_leaves(fresh)):
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------
# The opt-in post-compression stage: options, Compressed results, the command line.


def _leaves_equal(a, b) -> bool:
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_options_validate_and_name_the_recipe():
  default = br.BNReestimation()
  assert not default.enabled and default.source == 'none' and default.recipe == 'none'
  d = br.BNReestimation(bn_reestimate='distilled')
  assert (d.bn_distill_inputs, d.bn_distill_steps, d.recipe) == (64, 50, 'd64x50a')
  assert br.BNReestimation(bn_reestimate='distilled', bn_anchor=False, bn_mode='all_at_once',
                           bn_distill_inputs=8, bn_distill_steps=3).recipe == 'd8x3_all'
  assert br.BNReestimation(bn_reestimate='moments').recipe == 'mom_shared_a'
  img = br.BNReestimation(calibrate_bn=1000)
  assert img.source == 'images' and img.enabled and img.recipe == 'img1000a'
  with pytest.raises(ValueError, match='--bn-reestimate must be one of'):
    br.BNReestimation(bn_reestimate='images')
  with pytest.raises(ValueError, match='--bn-distill-inputs'):
    br.BNReestimation(bn_reestimate='distilled', bn_distill_inputs=1)
  with pytest.raises(ValueError, match='--bn-distill-steps'):
    br.BNReestimation(bn_distill_steps=2.5)
  with pytest.raises(ValueError, match='--calibrate-bn'):
    br.BNReestimation(calibrate_bn=0)
  with pytest.raises(ValueError, match='give one'):
    br.BNReestimation(calibrate_bn=10, bn_reestimate='moments')
  with pytest.raises(ValueError, match='has no option'):
    br.BNReestimation.from_flat(dict(bn_steps=3))


@pytest.fixture(scope='module')
def r20_result():
  spec = archs.get('resnet20')
  variables = random_variables(spec, seed=0)
  return spec, variables, pipeline.compress(spec, variables, method='lbyl', ratio=0.5)


def test_reestimate_compressed_is_the_recipe_on_the_result(r20_result, images):
  spec, variables, res = r20_result
  assert br.reestimate_compressed(res, variables) is res  # 'none' (the default) changes nothing
  recipe = br.BNReestimation(bn_reestimate='distilled', bn_distill_inputs=4, bn_distill_steps=3,
                             bn_seed=1)
  out = br.reestimate_compressed(res, variables, recipe)
  x, _ = distill.distill(spec, variables, n=4, steps=3, seed=1)
  want, _ = br.reestimate(spec, variables, res.variables, res.widths, source='distilled', inputs=x)
  assert _leaves_equal(out.variables, want)
  assert out.widths == res.widths and type(out.model) is type(res.model)
  assert _leaves_equal(out.variables['params'], res.variables['params'])
  assert not _leaves_equal(out.variables['batch_stats'], res.variables['batch_stats'])
  rep = out.report['bn_reestimate']
  assert rep['recipe'] == 'd4x3a_s1' and rep['data_free'] is True and rep['source'] == 'distilled'
  assert rep['seconds'] > 0 and rep['n_inputs'] == 4 and rep['options']['bn_seed'] == 1
  assert 'bn_reestimate' not in res.report  # the input result is left as it was
  # The second call reuses the distilled inputs of the same original network.
  again = br.reestimate_compressed(res, variables, recipe)
  assert again.report['bn_reestimate']['distill_memoized'] is True
  assert _leaves_equal(again.variables, out.variables)
  # Flat options work too; the moments route is data-free and cheap.
  mom = br.reestimate_compressed(res, variables, bn_reestimate='moments')
  assert mom.report['bn_reestimate']['recipe'] == 'mom_shared_a'
  # The real-image oracle is marked not data-free and uses the first N images.
  cal = br.reestimate_compressed(res, variables, br.BNReestimation(calibrate_bn=4),
                                 images=images)
  want, _ = br.reestimate(spec, variables, res.variables, res.widths, source='images',
                          images=images[:4])
  assert _leaves_equal(cal.variables, want)
  assert cal.report['bn_reestimate']['data_free'] is False
  with pytest.raises(ValueError, match='needs unlabelled images'):
    br.reestimate_compressed(res, variables, calibrate_bn=4)
  with pytest.raises(ValueError, match='has only 6 images'):
    br.reestimate_compressed(res, variables, calibrate_bn=10, images=images)
  with pytest.raises(ValueError, match='only by calibrate_bn'):
    br.reestimate_compressed(res, variables, bn_reestimate='moments', images=images)
  with pytest.raises(ValueError, match='not both'):
    br.reestimate_compressed(res, variables, recipe, bn_reestimate='moments')


def test_quantized_result_stores_the_new_statistics(tmp_path):
  spec = archs.get('resnet20')
  variables = random_variables(spec, seed=2)
  res = pipeline.compress(spec, variables, method='lbyl', ratio=0.4, quant_method='rtn', bits=4)
  out = br.reestimate_compressed(res, variables, bn_reestimate='moments')
  assert _leaves_equal(out.qtree['params'], res.qtree['params'])
  assert _leaves_equal(out.qtree['batch_stats'], out.variables['batch_stats'])
  out.save(tmp_path / 'q')
  loaded = lbyl_jax.load(tmp_path / 'q')
  assert _leaves_equal(loaded.variables['batch_stats'], out.variables['batch_stats'])
  np.testing.assert_allclose(
      np.asarray(loaded.apply(np.full((2, 32, 32, 3), 128, np.uint8))),
      np.asarray(out.apply(np.full((2, 32, 32, 3), 128, np.uint8))), rtol=1e-5, atol=1e-5)


def _cli_args(out, *extra):
  return ['--arch', 'resnet20', '--weights', 'random', '--ratio', '0.5', '--out', str(out),
          '--no-progress', '--no-download', '--json', *extra]


def test_cli_moments_and_distilled_fold_into_the_checkpoint(tmp_path, capsys):
  cli.main(_cli_args(tmp_path / 'plain'))
  plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert 'bn_reestimate' not in plain  # the default is off
  cli.main(_cli_args(tmp_path / 'mom', '--bn-reestimate', 'moments'))
  stdout = capsys.readouterr().out
  rep = json.loads(stdout.strip().splitlines()[-1])['bn_reestimate']
  assert rep['recipe'] == 'mom_shared_a' and rep['data_free'] is True and rep['seconds'] > 0
  assert 'BN re-estimation: mom_shared_a (data-free)' in stdout
  on_disk = json.loads((tmp_path / 'mom' / 'report.json').read_text())
  assert on_disk['bn_reestimate']['recipe'] == 'mom_shared_a'
  a, b = lbyl_jax.load(tmp_path / 'plain'), lbyl_jax.load(tmp_path / 'mom')
  assert a.meta['widths'] == b.meta['widths'] and type(a.model) is type(b.model)
  assert _leaves_equal(a.variables['params'], b.variables['params'])
  assert not _leaves_equal(a.variables['batch_stats'], b.variables['batch_stats'])
  cli.main(_cli_args(tmp_path / 'd', '--bn-reestimate', 'distilled', '--bn-distill-inputs', '4',
                     '--bn-distill-steps', '2'))
  rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])['bn_reestimate']
  assert rep['recipe'] == 'd4x2a' and rep['n_inputs'] == 4 and rep['steps'] == 2
  assert rep['data_free'] is True and rep['seconds'] >= rep['seconds_distill'] >= 0


def test_cli_calibrate_bn_reads_real_images(shared, tmp_path, capsys):
  data = str(shared / 'data' / 'cifar10_test.npz')
  cli.main(_cli_args(tmp_path / 'cal', '--calibrate-bn', '16', '--calib-data', data,
                     '--calib-slice', '0:100'))
  stdout = capsys.readouterr().out
  rep = json.loads(stdout.strip().splitlines()[-1])['bn_reestimate']
  assert rep['data_free'] is False and rep['source'] == 'images' and rep['recipe'] == 'img16a'
  assert rep['n_inputs'] == 16 and rep['calib_data'] == dict(spec=data, n=16, slice=[0, 100])
  assert 'NOT data-free' in stdout


@pytest.mark.parametrize('bad,match', [
    (['--calibrate-bn', '8'], '--calibrate-bn needs --calib-data'),
    (['--calib-data', 'cifar10'], 'apply to --calibrate-bn'),
    (['--bn-distill-steps', '3'], 'applies to --bn-reestimate distilled'),
    (['--bn-reestimate', 'moments', '--bn-distill-inputs', '8'], 'applies to --bn-reestimate'),
    (['--bn-reestimate', 'moments', '--calibrate-bn', '8', '--calib-data', 'cifar10'],
     'give one'),
    (['--bn-reestimate', 'distilled', '--bn-distill-inputs', '1'], '--bn-distill-inputs'),
])
def test_cli_bad_bn_flags_fail_before_writing(tmp_path, capsys, bad, match):
  with pytest.raises(SystemExit) as exc:
    cli.main(_cli_args(tmp_path / 'run', *bad))
  assert exc.value.code == 1
  assert match in capsys.readouterr().err
  assert not list(tmp_path.iterdir())


def test_bn_flags_in_help():
  short = cli.parser(False).format_help()
  for flag in ('--bn-reestimate', '--bn-distill-inputs', '--bn-distill-steps', '--calibrate-bn',
               '--calib-data'):
    assert flag in short, flag
  assert '--bn-absolute' not in short and '--bn-absolute' in cli.parser(True).format_help()


def test_api_compress_takes_the_stage(r20_result):
  spec, variables, res = r20_result
  got = lbyl_jax.compress('resnet20', variables, method='lbyl', ratio=0.5, bn_reestimate='moments')
  want = br.reestimate_compressed(res, variables, bn_reestimate='moments')
  assert _leaves_equal(got.variables, want.variables)
  assert got.report['bn_reestimate']['recipe'] == 'mom_shared_a'
  plain = lbyl_jax.compress('resnet20', variables, method='lbyl', ratio=0.5)
  assert 'bn_reestimate' not in plain.report and _leaves_equal(plain.variables, res.variables)
  with pytest.raises(ValueError, match='--bn-reestimate must be one of'):
    lbyl_jax.compress('resnet20', variables, ratio=0.5, bn_reestimate='images')
  with pytest.raises(ValueError, match='bn_reestimate must be'):
    lbyl_jax.compress('resnet20', variables, ratio=0.5, bn_reestimate=3)
  with pytest.raises(ValueError, match='only by calibrate_bn'):
    lbyl_jax.compress('resnet20', variables, ratio=0.5,
                      calib_images=np.zeros((4, 32, 32, 3), np.uint8))


def test_prefetch_fills_the_anchor_memo(r20_result, monkeypatch):
  """The command starts the original network's model statistics during the compression; the
  re-estimation then finds them memoized and computes only the compressed network's."""
  spec, variables, res = r20_result
  for recipe in (None, br.BNReestimation(), br.BNReestimation(bn_reestimate='distilled'),
                 br.BNReestimation(bn_reestimate='moments', bn_anchor=False)):
    assert br.prefetch(spec, variables, recipe) is None
  recipe = br.BNReestimation(bn_reestimate='moments')
  want = br.reestimate_compressed(res, variables, recipe)
  monkeypatch.setattr(br, '_MODEL_MEMO', collections.OrderedDict())
  monkeypatch.setattr(br, '_PENDING', {})
  calls = []
  real = br._model_statistics
  monkeypatch.setattr(br, '_model_statistics', lambda *a: calls.append(a[1]) or real(*a))
  future = br.prefetch(spec, variables, recipe)
  assert br.prefetch(spec, variables, recipe) is None  # started once
  got = br.reestimate_compressed(res, variables, recipe)  # waits for it; no explicit wait
  assert future.done() and not br._PENDING
  # the original once (in the background thread), the compressed network once, in either order
  assert sorted(map(id, calls)) == sorted([id(variables), id(res.variables)])
  assert _leaves_equal(got.variables, want.variables)
  assert br.prefetch(spec, variables, recipe) is None  # memoized now
  # An error of the prefetched computation is raised where the statistics are asked for.
  monkeypatch.setattr(br, '_MODEL_MEMO', collections.OrderedDict())
  monkeypatch.setattr(br, '_model_statistics', lambda *a: 1 / 0)
  assert br.prefetch(spec, variables, recipe) is not None
  with pytest.raises(ZeroDivisionError):
    br.model_statistics(spec, variables, spatial='shared')
  assert not br._PENDING
