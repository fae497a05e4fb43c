"""The pure compression API: plan validation, input validation, whole-network runs, report."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest

from lbyl_jax import pipeline
from lbyl_jax.core import trees
from lbyl_jax.core import units as units_lib
from lbyl_jax.core.bn import BN_EPS
from lbyl_jax.models import archs
from lbyl_jax.plan import Plan
from lbyl_jax.pruning import selection as selection_lib
from lbyl_jax.pruning import stats
from lbyl_jax.pruning import surgery
from lbyl_jax.pruning import terms
from lbyl_jax.pruning.methods import lbyl as lbyl_lib
from lbyl_jax.pruning.methods import nm as nm_lib
from lbyl_jax.pruning.selection import Selection


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
# Plan validation.


@pytest.mark.parametrize('kwargs,match', [
    (dict(ratio=1.0), r'--ratio: expected a value in \[0.0, 1.0\), got 1.0'),
    (dict(ratio=-0.1), r'--ratio: expected a value in \[0.0, 1.0\), got -0.1'),
    (dict(ratio='0.3'), "--ratio: expected a number, got '0.3'"),
    (dict(method='lbyll'), "unknown method 'lbyll'; known: bnm, lbyl, nm, prune"),
    (dict(criterion='l3'), "--criterion must be one of .* got 'l3'"),
    (dict(lbyl_mode='paper'), "--lbyl-mode must be one of .* got 'paper'"),
    (dict(method='nm', nm_mode='code'), "--nm-mode must be one of .* got 'code'"),
    (dict(dtype='float16'), "--dtype must be one of .* got 'float16'"),
    (dict(bias_correction='maybe'), "--bias-correction must be one of .* got 'maybe'"),
    (dict(keep_rounding='ceil'), "--keep-rounding must be one of .* got 'ceil'"),
    (dict(bn_sigma='sd'), "--bn-sigma must be one of .* got 'sd'"),
    (dict(lambda2=-1.0), '--lambda2: expected a value >= 0.0, got -1.0'),
    (dict(lambda1=float('nan')), '--lambda1: expected a finite number, got nan'),
    (dict(method='nm', nm_lam=1.5), r'--nm-lam: expected a value in \[0.0, 1.0\], got 1.5'),
    (dict(seed=1.5), '--seed: expected an integer, got 1.5'),
    (dict(ratio_overrides=(('layer1_*', 1.0),)),
     r"--ratio-override: 'layer1_\*': expected a value in \[0.0, 1.0\)"),
    (dict(ratio_overrides=(('re:(', 0.1),)), r"bad regular expression 're:\('"),
    (dict(ratio_overrides=('layer1_*',)), 'must be \\(pattern, ratio\\) pairs'),
    # An option of a stage the plan does not use is refused, never ignored.
    (dict(method='lbyl', nm_t=0.2), r"--nm-t \(nm_t\) belongs to method 'nm'"),
    (dict(method='nm', lambda1=0.1), r"--lambda1 \(lambda1\) belongs to method 'lbyl'"),
    (dict(method='prune', bnm_cov='identity'), r"--bnm-cov \(bnm_cov\) belongs to method 'bnm'"),
    (dict(bits=4), r'--.*bits \(bits\) belongs to weight quantization'),
    (dict(preset='paper'), "unknown preset 'paper'; known: reference_code"),
    (dict(ratoi=0.3), "unknown option 'ratoi'"),
])
def test_plan_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    Plan.from_options(**kwargs)


def test_ratio_overrides():
  sel = Selection(ratio=0.1, ratio_overrides={'layer3_*': 0.5, 're:layer1_[01]/conv1': 0.0,
                                              'layer3_2/*': 0.2})
  assert isinstance(sel.ratio_overrides, tuple)
  assert sel.ratio_for('layer1_0/conv1') == 0.0
  assert sel.ratio_for('layer1_2/conv1') == 0.1
  assert sel.ratio_for('layer3_0/conv1') == 0.5
  assert sel.ratio_for('layer3_2/conv1') == 0.2  # the last matching pattern wins
  with pytest.raises(dataclasses.FrozenInstanceError):
    sel.ratio = 0.2  # type: ignore[misc]


def test_defaults_from_spec():
  spec = archs.get('lenet_300_100')
  assert nm_lib.NeuronMerging().resolved(spec) == (0.45, 0.85)
  assert Selection().rounding_for(spec) == 'round'
  assert Selection().rounding_for(archs.get('resnet56')) == 'floor'
  assert nm_lib.NeuronMerging(nm_t=0.3).resolved(archs.get('resnet56')) == (0.3, 0.85)
  assert lbyl_lib.LBYL().resolved_lambdas(spec) == (lbyl_lib.DEFAULT_LAMBDA1,
                                                    lbyl_lib.DEFAULT_LAMBDA2)


def test_reference_code_preset():
  """The preset sets the reference forms of the chosen method only, the raw running variance as
  BN sigma and rounding of the kept count; explicit options win."""
  for method, form in (('lbyl', dict(lbyl_mode='reference_code')),
                       ('nm', dict(nm_mode='reference_code')), ('prune', {}), ('bnm', {})):
    opts = Plan.from_options(method=method, preset='reference_code').to_options()
    for name, value in dict(form, bn_sigma='variance', keep_rounding='round').items():
      assert opts[name] == value, (method, name)
  plan = Plan.from_options(method='lbyl', preset='reference_code', bn_sigma='std')
  assert plan.selection.bn_sigma == 'std' and plan.method.lbyl_mode == 'reference_code'


# --------------------------------------------------------------------------------------------
# Input validation.


def test_bad_variables(net):
  spec, variables, _ = net
  bad = trees.copy_tree(variables)
  k = bad['params']['layer2_1']['conv2']['kernel'].copy()
  k[0, 0, 0, 0] = np.nan
  bad['params']['layer2_1']['conv2']['kernel'] = k
  with pytest.raises(ValueError, match='non-finite values in params/layer2_1/conv2/kernel'):
    pipeline.compress(spec, bad, Plan())
  bad = trees.copy_tree(variables)
  v = bad['batch_stats']['layer1_1']['bn2']['var'].copy()
  v[3] = 0.0
  bad['batch_stats']['layer1_1']['bn2']['var'] = v
  with pytest.raises(ValueError, match='BN running variance <= 0 in layer layer1_1/bn2'):
    pipeline.compress(spec, bad, Plan())
  other = random_variables(spec, widths=(8,) * 9)
  mixed = trees.copy_tree(variables)
  mixed['params']['layer1_0']['conv2'] = other['params']['layer1_0']['conv2']
  with pytest.raises(ValueError, match='layer1_0/conv2: reads 8 inputs but layer1_0/conv1 has 16'):
    pipeline.compress(spec, mixed, Plan())
  with pytest.raises(ValueError, match='pass a Plan or flat options, not both'):
    pipeline.compress(spec, variables, Plan(), ratio=0.1)


def test_plan_must_be_a_plan(net):
  spec, variables, _ = net
  with pytest.raises(ValueError, match='Plan'):
    pipeline.compress(spec, variables, {'ratio': 0.1})


# --------------------------------------------------------------------------------------------
# Whole-network runs.


def test_compress_is_pure_and_deterministic(net):
  spec, variables, _ = net
  before = jax.tree_util.tree_map(np.copy, variables)
  opts = dict(method='lbyl', ratio=0.3, criterion='random', seed=5)
  r1 = pipeline.compress(spec, variables, **opts)
  r2 = pipeline.compress(spec, variables, Plan.from_options(**opts))
  assert r1.widths == r2.widths and leaves_equal(r1.variables, r2.variables)
  assert leaves_equal(variables, before)
  r3 = pipeline.compress(spec, variables, **dict(opts, seed=6))
  assert r3.widths == r1.widths and not leaves_equal(r1.variables, r3.variables)  # other channels


def test_methods_run_and_lbyl_large_lambda_is_prune(net, forward):
  spec, variables, x = net
  y0 = forward(None, variables, x)
  outs, reports = {}, {}
  for name, opts in {
      'prune': dict(method='prune', ratio=0.3),
      'nm': dict(method='nm', ratio=0.3),
      'nm_code': dict(method='nm', ratio=0.3, nm_mode='reference_code'),
      'lbyl': dict(method='lbyl', ratio=0.3, lambda1=1e-4, lambda2=1e-2),
      'lbyl64': dict(method='lbyl', ratio=0.3, lambda1=1e-4, lambda2=1e-2, dtype='float64'),
      'lbyl_code': dict(method='lbyl', ratio=0.3, lbyl_mode='reference_code'),
      'lbyl_inf': dict(method='lbyl', ratio=0.3, lambda2=1e12, bias_correction='off'),
      'lbyl_inf_bc': dict(method='lbyl', ratio=0.3, lambda2=1e12),
      'prune_bc': dict(method='prune', ratio=0.3, bias_correction='on'),
  }.items():
    res = pipeline.compress(spec, variables, **opts)
    widths, new, reports[name] = res.widths, res.variables, res.report
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
              'compile_seconds', 'layers', 'widths', 'options', 'plan', 'phases'):
    assert key in rep
  assert rep['arch'] == 'resnet20' and rep['method'] == 'lbyl' and rep['ratio'] == 0.3
  assert rep['options']['lambda2'] == 1e-2 and rep['plan']['method']['name'] == 'lbyl'
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
  a = pipeline.compress(spec, variables, method='nm', ratio=0.4, nm_t=1.0, bias_correction='off')
  b = pipeline.compress(spec, variables, method='prune', ratio=0.4)
  assert leaves_equal(a.variables, b.variables)


def test_default_bias_correction_is_on_for_lbyl_and_nm_only(net):
  """None resolves per method; the default equals an explicit 'on', and the constant moves only
  the consumers' BN running means (the delivered kernels are those of 'off')."""
  forms = {'pub': dict(lbyl=dict(lbyl_mode='consistent'), nm=dict(nm_mode='exact')),
           'code': dict(lbyl=dict(lbyl_mode='reference_code'), nm=dict(nm_mode='reference_code'))}
  resolved = {(m, mode): Plan.from_options(method=m, **forms[mode].get(m, {})).bias_correction
              for m in ('prune', 'nm', 'lbyl', 'bnm') for mode in ('pub', 'code')}
  assert resolved == {('prune', 'pub'): 'off', ('prune', 'code'): 'off', ('nm', 'pub'): 'on',
                      ('nm', 'code'): 'off', ('lbyl', 'pub'): 'on', ('lbyl', 'code'): 'off',
                      ('bnm', 'pub'): 'off', ('bnm', 'code'): 'off'}
  assert Plan.from_options(method='lbyl', bias_correction='auto').bias_correction == 'auto'
  assert Plan.from_options(method='bnm', bias_correction='on').bias_correction == 'on'
  with pytest.raises(ValueError, match='--bias-correction must be one of'):
    Plan.from_options(bias_correction='yes')
  spec, variables, _ = net
  for method in ('lbyl', 'nm'):
    out = {}
    for bc in (None, 'on', 'off'):
      res = pipeline.compress(spec, variables, method=method, ratio=0.3, bias_correction=bc)
      out[bc] = res.variables
      rep = res.report
      assert rep['bias_correction'] == (bc or 'on') and rep['options']['bias_correction'] == bc
    assert leaves_equal(out[None], out['on'])
    on = dict(jax.tree_util.tree_leaves_with_path(out['on']))
    off = dict(jax.tree_util.tree_leaves_with_path(out['off']))
    assert on.keys() == off.keys()
    moved = {jax.tree_util.keystr(p) for p in on if not np.array_equal(on[p], off[p])}
    units = {u.name.split('/')[0] for u in spec.units}
    assert moved == {f"['batch_stats']['{u}']['bn2']['mean']" for u in units}, (method, moved)


def test_overrides_reach_the_widths(net):
  spec, variables, _ = net
  res = pipeline.compress(spec, variables, method='prune', ratio=0.1,
                          ratio_overrides={'layer3_*': 0.5, 're:layer1_[01]/conv1': 0.0})
  widths, new, report = res.widths, res.variables, res.report
  assert widths == (16, 16, 14, 28, 28, 28, 32, 32, 32)
  assert [layer['ratio'] for layer in report['layers']][:3] == [0.0, 0.0, 0.1]
  assert units_lib.widths_of(new, spec.units) == widths
  with pytest.raises(ValueError, match="override 'layr3_\\*' matches no unit of resnet20"):
    pipeline.compress(spec, variables, ratio_overrides={'layr3_*': 0.5})


def test_producer_bias_before_bn_is_folded():
  """BN(W x + bias) = alpha W x + b with b = beta - alpha (mu - bias) (torchvision VGG convs)."""
  rng = np.random.default_rng(4)
  variables = {
      'params': {'c': {'kernel': rng.normal(size=(3, 3, 2, 5)), 'bias': rng.normal(size=5)},
                 'bn': {'scale': rng.uniform(0.5, 1.5, 5), 'bias': rng.normal(size=5)},
                 'd': {'kernel': rng.normal(size=(3, 3, 5, 4))}},
      'batch_stats': {'bn': {'mean': rng.normal(size=5), 'var': rng.uniform(0.5, 1.5, 5)}},
  }
  unit = units_lib.Unit.of('c', 'c', 'bn', 'd', 'conv')
  bn = terms.bn_terms(variables, unit)
  patch = rng.normal(size=(3, 3, 2))  # one receptive field, HWC
  conv = variables['params']['c']
  z = np.einsum('hwc,hwco->o', patch, conv['kernel']) + conv['bias']
  st, p = variables['batch_stats']['bn'], variables['params']['bn']
  y = (z - st['mean']) / np.sqrt(st['var'] + BN_EPS) * p['scale'] + p['bias']
  W = terms.filters(variables, unit)  # torch order (C, kh, kw)
  np.testing.assert_allclose(bn['alpha'] * (W @ patch.transpose(2, 0, 1).ravel()) + bn['b'], y,
                             rtol=1e-12)


def test_flops_follow_pruned_widths(net):
  spec, variables, _ = net
  res = pipeline.compress(spec, variables, method='prune', ratio=0.5)
  widths, report = res.widths, res.report

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
  res = pipeline.compress(spec, variables, method='lbyl', ratio=0.65)
  widths, new, report = res.widths, res.variables, res.report
  assert widths == (round(300 * 0.35), round(100 * 0.35)) == (105, 35)
  assert report['macs_after'] == 784 * 105 + 105 * 35 + 35 * 10
  assert new['params']['ip2']['kernel'].shape == (105, 35)
  y = spec.build(widths).apply(new, np.ones((2, 28, 28, 1), np.float32))
  assert y.shape == (2, 10)


# --------------------------------------------------------------------------------------------
# The bias-correction stage: the pipeline folds whatever constants it returns.


def test_bias_correction_folds_constants(net, monkeypatch):
  spec, variables, _ = net
  const = lambda p: np.linspace(-1.0, 1.0, p.prune.size)
  calls = []
  auto = Plan.from_options(method='prune', ratio=0.3, bias_correction='auto',
                           ratio_overrides={'layer2_*': 0.2})

  def fake_constants(spec, variables, problems, solutions, *, fold, rule, skipped, cov_model):
    del skipped, cov_model
    calls.append((len(problems), fold, rule is not None))
    # With a rule ('auto'), stand in for the rule: correct only units pruned by at most 20 %.
    return [None if p.prune.size == 0
            or (rule is not None and auto.selection.ratio_for(p.unit.name) > 0.2) else const(p)
            for p in problems]

  monkeypatch.setattr(pipeline.bias_lib, 'constants', fake_constants)
  plan = Plan.from_options(method='prune', ratio=0.3, bias_correction='on')
  res = pipeline.compress(spec, variables, plan)
  got, report = res.variables, res.report
  assert calls == [(9, 'padding_aware', False)]
  assert all(layer['diagnostics']['bias_correction'] for layer in report['layers'])
  problems = selection_lib.build_problems(spec, variables, plan.selection)
  sols = {p.unit.name: (p.keep, np.zeros((p.prune.size, p.m)), const(p)) for p in problems}
  assert leaves_equal(got, surgery.apply(spec, variables, sols)[1])
  # The constant shifts the BN after the consumer (conv2 -> bn2) by sum over taps of V[:, P] c.
  p0 = problems[0]
  V = variables['params']['layer1_0']['conv2']['kernel'].astype(np.float64)
  delta = np.einsum('hwjo,j->o', V[:, :, p0.prune, :], const(p0))
  np.testing.assert_allclose(got['batch_stats']['layer1_0']['bn2']['mean'],
                             variables['batch_stats']['layer1_0']['bn2']['mean'] - delta, rtol=1e-5,
                             atol=1e-6)
  # 'auto': the units where the stage abstains (None) keep no constant.
  res = pipeline.compress(spec, variables, auto)
  assert calls[-1] == (9, 'padding_aware', True)
  used = [layer['diagnostics']['bias_correction'] for layer in res.report['layers']]
  assert used == [False] * 3 + [True] * 3 + [False] * 3
