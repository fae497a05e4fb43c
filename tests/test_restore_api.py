"""The pure restore API: config validation, input validation, whole-network runs, report."""

from __future__ import annotations

import dataclasses
import math
import sys
import types

import jax
import numpy as np
import pytest

from lbyl_jax.models import archs
from lbyl_jax.compress.methods import base as methods
from lbyl_jax.compress import restore
from lbyl_jax.compress import stats
from lbyl_jax.compress import surgery
from lbyl_jax.compress import units as units_lib
from lbyl_jax.compress.restore import RestoreConfig


def random_variables(spec, widths=None, seed=0):
  """He-normal kernels and random BN (NumPy; much faster than ``spec.init`` on a CPU)."""
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

  return jax.tree_util.tree_map_with_path(leaf, spec.abstract_variables(widths))


def leaves_equal(a, b) -> bool:
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  return [p for p, _ in la] == [p for p, _ in lb] and all(
      np.array_equal(x, y) for (_, x), (_, y) in zip(la, lb))


@pytest.fixture(scope='module')
def net():
  spec = archs.get('resnet20')
  variables = random_variables(spec, seed=0)
  x = np.random.default_rng(1).normal(size=(8, 32, 32, 3)).astype(np.float32)
  return spec, variables, x


@pytest.fixture(scope='module')
def forward(net):
  spec = net[0]
  cache = {}

  def run(widths, variables, x):
    if widths not in cache:
      cache[widths] = jax.jit(spec.build(widths).apply)
    return np.asarray(cache[widths](variables, x), np.float64)

  return run


# --------------------------------------------------------------------------------------------
# Config validation.


@pytest.mark.parametrize('kwargs,match', [
    (dict(ratio=1.0), r'ratio must be in \[0, 1\), got 1.0'),
    (dict(ratio=-0.1), r'ratio must be in \[0, 1\), got -0.1'),
    (dict(ratio='0.3'), "ratio must be a number in \\[0, 1\\), got '0.3'"),
    (dict(method='lbyll'), "unknown method 'lbyll'; known: bnm, lbyl, nm, prune"),
    (dict(criterion='l3'), "unknown criterion 'l3'"),
    (dict(lbyl_mode='paper'), "lbyl_mode must be one of .* got 'paper'"),
    (dict(nm_mode='code'), "nm_mode must be one of .* got 'code'"),
    (dict(dtype='float16'), "dtype must be one of .* got 'float16'"),
    (dict(bias_correction='maybe'), "bias_correction must be one of .* got 'maybe'"),
    (dict(keep_rounding='ceil'), "keep_rounding must be one of .* got 'ceil'"),
    (dict(bn_sigma='sd'), "bn_sigma must be one of .* got 'sd'"),
    (dict(lambda2=-1.0), 'lambda2 must be a finite number >= 0, got -1.0'),
    (dict(lambda1=float('nan')), 'lambda1 must be a finite number >= 0, got nan'),
    (dict(nm_lam=1.5), r'nm_lam must be in \[0, 1\], got 1.5'),
    (dict(seed=1.5), 'seed must be an integer, got 1.5'),
    (dict(ratio_overrides=(('layer1_*', 1.0),)), r"ratio_overrides\['layer1_\*'\] must be in"),
    (dict(ratio_overrides=(('re:(', 0.1),)), r"bad regular expression 're:\('"),
    (dict(ratio_overrides=('layer1_*',)), 'must be \\(pattern, ratio\\) pairs'),
])
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    RestoreConfig(**kwargs)


def test_ratio_overrides():
  cfg = RestoreConfig(ratio=0.1, ratio_overrides={'layer3_*': 0.5, 're:layer1_[01]/conv1': 0.0,
                                                  'layer3_2/*': 0.2})
  assert isinstance(cfg.ratio_overrides, tuple)
  assert cfg.ratio_for('layer1_0/conv1') == 0.0
  assert cfg.ratio_for('layer1_2/conv1') == 0.1
  assert cfg.ratio_for('layer3_0/conv1') == 0.5
  assert cfg.ratio_for('layer3_2/conv1') == 0.2  # the last matching pattern wins
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.ratio = 0.2  # type: ignore[misc]


def test_defaults_from_spec():
  spec = archs.get('lenet_300_100')
  cfg = RestoreConfig()
  assert cfg.resolved_nm(spec) == (0.45, 0.85)
  assert cfg.rounding_for(spec) == 'round'
  assert cfg.rounding_for(archs.get('resnet56')) == 'floor'
  assert RestoreConfig(nm_t=0.3).resolved_nm(archs.get('resnet56')) == (0.3, 0.85)
  assert cfg.resolved_lambdas(spec) == (restore.DEFAULT_LAMBDA1, restore.DEFAULT_LAMBDA2)


# --------------------------------------------------------------------------------------------
# Input validation.


def test_bad_variables(net):
  spec, variables, _ = net
  bad = surgery.copy_tree(variables)
  k = bad['params']['layer2_1']['conv2']['kernel'].copy()
  k[0, 0, 0, 0] = np.nan
  bad['params']['layer2_1']['conv2']['kernel'] = k
  with pytest.raises(ValueError, match='non-finite values in params/layer2_1/conv2/kernel'):
    restore.restore(spec, bad, RestoreConfig())
  bad = surgery.copy_tree(variables)
  v = bad['batch_stats']['layer1_1']['bn2']['var'].copy()
  v[3] = 0.0
  bad['batch_stats']['layer1_1']['bn2']['var'] = v
  with pytest.raises(ValueError, match='BN running variance <= 0 in layer layer1_1/bn2'):
    restore.restore(spec, bad, RestoreConfig())
  other = random_variables(spec, widths=(8,) * 9)
  mixed = surgery.copy_tree(variables)
  mixed['params']['layer1_0']['conv2'] = other['params']['layer1_0']['conv2']
  with pytest.raises(ValueError, match='layer1_0/conv2: reads 8 inputs but layer1_0/conv1 has 16'):
    restore.restore(spec, mixed, RestoreConfig())
  with pytest.raises(ValueError, match='config must be a RestoreConfig'):
    restore.restore(spec, variables, {'ratio': 0.1})


# --------------------------------------------------------------------------------------------
# Whole-network runs.


def test_restore_is_pure_and_deterministic(net):
  spec, variables, _ = net
  before = jax.tree_util.tree_map(np.copy, variables)
  cfg = RestoreConfig(method='lbyl', ratio=0.3, criterion='random', seed=5)
  w1, v1, _ = restore.restore(spec, variables, cfg)
  w2, v2, _ = restore.restore(spec, variables, cfg)
  assert w1 == w2 and leaves_equal(v1, v2)
  assert leaves_equal(variables, before)
  w3, v3, _ = restore.restore(spec, variables, dataclasses.replace(cfg, seed=6))
  assert w3 == w1 and not leaves_equal(v1, v3)  # the seed picks other channels


def test_methods_run_and_lbyl_large_lambda_is_prune(net, forward):
  spec, variables, x = net
  y0 = forward(None, variables, x)
  outs, reports = {}, {}
  for name, cfg in {
      'prune': RestoreConfig(method='prune', ratio=0.3),
      'nm': RestoreConfig(method='nm', ratio=0.3),
      'nm_code': RestoreConfig(method='nm', ratio=0.3, nm_mode='reference_code'),
      'lbyl': RestoreConfig(method='lbyl', ratio=0.3, lambda1=1e-4, lambda2=1e-2),
      'lbyl64': RestoreConfig(method='lbyl', ratio=0.3, lambda1=1e-4, lambda2=1e-2, dtype='float64'),
      'lbyl_code': RestoreConfig(method='lbyl', ratio=0.3, lbyl_mode='reference_code'),
      'lbyl_inf': RestoreConfig(method='lbyl', ratio=0.3, lambda2=1e12, bias_correction='off'),
      'lbyl_inf_bc': RestoreConfig(method='lbyl', ratio=0.3, lambda2=1e12),
      'prune_bc': RestoreConfig(method='prune', ratio=0.3, bias_correction='on'),
  }.items():
    widths, new, reports[name] = restore.restore(spec, variables, cfg)
    assert widths == (11,) * 3 + (22,) * 3 + (44,) * 3
    outs[name] = forward(widths, new, x)
    assert np.all(np.isfinite(outs[name]))
  scale = np.abs(y0).max()
  np.testing.assert_allclose(outs['lbyl_inf'], outs['prune'], atol=1e-5 * scale)
  # With the default bias correction, S_P -> 0 leaves only the constant E[a_P]: prune + constant.
  np.testing.assert_allclose(outs['lbyl_inf_bc'], outs['prune_bc'], atol=1e-5 * scale)
  assert np.abs(outs['prune_bc'] - outs['prune']).max() > 1e-3 * scale
  np.testing.assert_allclose(outs['lbyl'], outs['lbyl64'], atol=1e-3 * scale)
  assert np.abs(outs['lbyl'] - outs['prune']).max() > 1e-3 * scale  # compensation did something
  assert np.abs(outs['nm'] - outs['prune']).max() > 1e-3 * scale
  rep = reports['lbyl']
  for key in ('arch', 'method', 'criterion', 'ratio', 'params_before', 'params_after',
              'flops_before', 'flops_after', 'bytes_before', 'bytes_after', 'solve_seconds',
              'compile_seconds', 'layers', 'widths', 'config'):
    assert key in rep
  assert rep['arch'] == 'resnet20' and rep['method'] == 'lbyl' and rep['ratio'] == 0.3
  assert rep['params_after'] < rep['params_before'] and rep['flops_after'] < rep['flops_before']
  assert rep['bytes_after'] < rep['bytes_before'] and rep['solve_seconds'] >= 0
  assert [layer['name'] for layer in rep['layers']] == list(spec.width_names)
  first = rep['layers'][0]
  assert (first['width_before'], first['width_after']) == (16, 11)
  diag = first['diagnostics']
  assert diag['cond'] >= 1 and diag['rel_residual'] < 1e-3 and diag['coef_max_abs'] > 0
  assert reports['nm']['layers'][0]['diagnostics']['method'] == 'nm'


def test_nm_threshold_one_equals_prune_on_network(net):
  spec, variables, _ = net
  cfg = RestoreConfig(method='nm', ratio=0.4, nm_t=1.0, bias_correction='off')
  _, a, _ = restore.restore(spec, variables, cfg)
  _, b, _ = restore.restore(spec, variables, RestoreConfig(method='prune', ratio=0.4))
  assert leaves_equal(a, b)


def test_default_bias_correction_is_on_for_lbyl_and_nm_only(net):
  """None resolves per method; the default equals an explicit 'on', and the constant moves only
  the consumers' BN running means (the delivered kernels are those of 'off')."""
  resolved = {(m, mode): RestoreConfig(method=m, lbyl_mode=lm, nm_mode=nm).resolved_bias_correction()
              for m in ('prune', 'nm', 'lbyl', 'bnm')
              for mode, lm, nm in (('pub', 'consistent', 'exact'), ('code', 'reference_code', 'reference_code'))}
  assert resolved == {('prune', 'pub'): 'off', ('prune', 'code'): 'off', ('nm', 'pub'): 'on',
                      ('nm', 'code'): 'off', ('lbyl', 'pub'): 'on', ('lbyl', 'code'): 'off',
                      ('bnm', 'pub'): 'off', ('bnm', 'code'): 'off'}
  assert RestoreConfig(method='lbyl', bias_correction='auto').resolved_bias_correction() == 'auto'
  assert RestoreConfig(method='bnm', bias_correction='on').resolved_bias_correction() == 'on'
  with pytest.raises(ValueError, match='bias_correction must be one of'):
    RestoreConfig(bias_correction='yes')
  spec, variables, _ = net
  for method in ('lbyl', 'nm'):
    out = {}
    for bc in (None, 'on', 'off'):
      _, new, rep = restore.restore(spec, variables, RestoreConfig(method=method, ratio=0.3,
                                                                   bias_correction=bc))
      out[bc] = new
      assert rep['bias_correction'] == (bc or 'on') and rep['config']['bias_correction'] == bc
    assert leaves_equal(out[None], out['on'])
    on = dict(jax.tree_util.tree_leaves_with_path(out['on']))
    off = dict(jax.tree_util.tree_leaves_with_path(out['off']))
    assert on.keys() == off.keys()
    moved = {jax.tree_util.keystr(p) for p in on if not np.array_equal(on[p], off[p])}
    units = {u.name.split('/')[0] for u in spec.units}
    assert moved == {f"['batch_stats']['{u}']['bn2']['mean']" for u in units}, (method, moved)


def test_overrides_reach_the_widths(net):
  spec, variables, _ = net
  cfg = RestoreConfig(method='prune', ratio=0.1,
                      ratio_overrides={'layer3_*': 0.5, 're:layer1_[01]/conv1': 0.0})
  widths, new, report = restore.restore(spec, variables, cfg)
  assert widths == (16, 16, 14, 28, 28, 28, 32, 32, 32)
  assert [layer['ratio'] for layer in report['layers']][:3] == [0.0, 0.0, 0.1]
  assert units_lib.widths_of(new, spec.units) == widths
  typo = RestoreConfig(ratio_overrides={'layr3_*': 0.5})
  with pytest.raises(ValueError, match="pattern 'layr3_\\*' matches no unit of resnet20"):
    restore.restore(spec, variables, typo)


def test_producer_bias_before_bn_is_folded():
  """BN(W x + bias) = alpha W x + b with b = beta - alpha (mu - bias) (torchvision VGG convs)."""
  rng = np.random.default_rng(4)
  variables = {
      'params': {'c': {'kernel': rng.normal(size=(3, 3, 2, 5)), 'bias': rng.normal(size=5)},
                 'bn': {'scale': rng.uniform(0.5, 1.5, 5), 'bias': rng.normal(size=5)},
                 'd': {'kernel': rng.normal(size=(3, 3, 5, 4))}},
      'batch_stats': {'bn': {'mean': rng.normal(size=5), 'var': rng.uniform(0.5, 1.5, 5)}},
  }
  unit = units_lib.Unit('c', 'c', 'bn', 'd', 'conv')
  bn = restore.bn_terms(variables, unit)
  patch = rng.normal(size=(3, 3, 2))  # one receptive field, HWC
  conv = variables['params']['c']
  z = np.einsum('hwc,hwco->o', patch, conv['kernel']) + conv['bias']
  st, p = variables['batch_stats']['bn'], variables['params']['bn']
  y = (z - st['mean']) / np.sqrt(st['var'] + units_lib.BN_EPS) * p['scale'] + p['bias']
  W = units_lib.filters(variables, unit)  # torch order (C, kh, kw)
  np.testing.assert_allclose(bn['alpha'] * (W @ patch.transpose(2, 0, 1).ravel()) + bn['b'], y,
                             rtol=1e-12)


def test_flops_follow_pruned_widths(net):
  spec, variables, _ = net
  widths, _, report = restore.restore(spec, variables, RestoreConfig(method='prune', ratio=0.5))

  def resnet20_macs(inner):
    total = 32 * 32 * 9 * 3 * 16  # stem
    cin, b = 16, 0
    for s, (planes, hw) in enumerate(((16, 32), (32, 16), (64, 8))):
      for _ in range(3):
        total += hw * hw * 9 * cin * inner[b] + hw * hw * 9 * inner[b] * planes
        cin, b = planes, b + 1
    return total + 64 * 10

  assert report['macs_before'] == resnet20_macs([16] * 3 + [32] * 3 + [64] * 3)
  assert report['macs_after'] == resnet20_macs(widths)
  assert report['flops_after'] == 2 * report['macs_after']
  assert report['params_before'] == stats.param_count(variables)


def test_lenet_round_rounding_and_macs():
  spec = archs.get('lenet_300_100')
  variables = random_variables(spec, seed=3)
  widths, new, report = restore.restore(spec, variables, RestoreConfig(method='lbyl', ratio=0.65))
  assert widths == (round(300 * 0.35), round(100 * 0.35)) == (105, 35)
  assert report['macs_after'] == 784 * 105 + 105 * 35 + 35 * 10
  assert new['params']['ip2']['kernel'].shape == (105, 35)
  y = spec.build(widths).apply(new, np.ones((2, 28, 28, 1), np.float32))
  assert y.shape == (2, 10)


# --------------------------------------------------------------------------------------------
# The BN-moments plug-in points (lbyl_jax.compress.methods.bnm, written separately).


def fake_bnm(constants):
  mod = types.ModuleType('lbyl_jax.bnm')
  mod.calls = []

  def bias_constant(spec, variables, problems, solutions, config):
    mod.calls.append(len(problems))
    # 'auto' stands in for bnm's own rule: here, correct only units pruned by at most 20 %.
    auto = config.bias_correction == 'auto'
    return [None if p.prune.size == 0 or (auto and config.ratio_for(p.unit.name) > 0.2)
            else constants(p) for p in problems]

  def solve(spec, variables, problems, config):
    return methods.prune(spec, variables, problems, config)

  mod.bias_constant, mod.solve = bias_constant, solve
  return mod


def test_bias_correction_folds_constants(net, monkeypatch):
  spec, variables, _ = net
  const = lambda p: np.linspace(-1.0, 1.0, p.prune.size)
  fake = fake_bnm(const)
  monkeypatch.setitem(sys.modules, 'lbyl_jax.bnm', fake)
  monkeypatch.setattr(methods, '_find_bnm', lambda: fake)
  cfg = RestoreConfig(method='prune', ratio=0.3, bias_correction='on')
  widths, got, report = restore.restore(spec, variables, cfg)
  assert fake.calls == [9] and all(layer['diagnostics']['bias_correction'] for layer in report['layers'])
  problems = restore.build_problems(spec, variables, cfg)
  plan = {p.unit.name: (p.keep, np.zeros((p.prune.size, p.m)), const(p)) for p in problems}
  assert leaves_equal(got, surgery.apply(spec, variables, plan)[1])
  # The constant shifts the BN after the consumer (conv2 -> bn2) by sum over taps of V[:, P] c.
  p0 = problems[0]
  V = variables['params']['layer1_0']['conv2']['kernel'].astype(np.float64)
  delta = np.einsum('hwjo,j->o', V[:, :, p0.prune, :], const(p0))
  np.testing.assert_allclose(got['batch_stats']['layer1_0']['bn2']['mean'],
                             variables['batch_stats']['layer1_0']['bn2']['mean'] - delta, rtol=1e-5,
                             atol=1e-6)
  # 'auto': the units where bias_constant abstains (None) keep no constant.
  auto = RestoreConfig(method='prune', ratio=0.3, bias_correction='auto',
                       ratio_overrides={'layer2_*': 0.2})
  _, _, rep = restore.restore(spec, variables, auto)
  used = [layer['diagnostics']['bias_correction'] for layer in rep['layers']]
  assert used == [False] * 3 + [True] * 3 + [False] * 3
  # The 'bnm' method entry point delegates to lbyl_jax.compress.methods.bnm.solve.
  _, via_bnm, rep = restore.restore(spec, variables, RestoreConfig(method='bnm', ratio=0.3))
  _, pruned, _ = restore.restore(spec, variables, RestoreConfig(method='prune', ratio=0.3))
  assert leaves_equal(via_bnm, pruned) and rep['method'] == 'bnm'


def test_missing_bnm_module_is_a_clear_error(net, monkeypatch):
  spec, variables, _ = net
  monkeypatch.setattr(methods, '_find_bnm', lambda: None)
  with pytest.raises(ValueError, match='lbyl_jax/bnm.py'):
    restore.restore(spec, variables, RestoreConfig(method='prune', bias_correction='on'))
  with pytest.raises(ValueError, match="method 'bnm'"):
    restore.restore(spec, variables, RestoreConfig(method='bnm'))
