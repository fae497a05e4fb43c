"""Activation quantization (lbyl_jax.quant.actquant) against float64 NumPy references: the BN
rule's ranges, observed ranges, the fake-quantized forward pass, JSON / checkpoint round trips and
the evaluator's forward hook."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sp_stats

from lbyl_jax import evaluation
from lbyl_jax.io import checkpoint
from lbyl_jax.io.data import ArrayDataset
from lbyl_jax.models import archs
from lbyl_jax.models import trace
from lbyl_jax.quant import actquant
from lbyl_jax.quant import uniform as quant


@pytest.fixture(scope='module')
def resnet20():
  spec = archs.get('resnet20')
  variables = jax.tree_util.tree_map(np.asarray, spec.init(jax.random.PRNGKey(0)))
  return spec, variables


@pytest.fixture(scope='module')
def lenet():
  spec = archs.get('lenet_300_100')
  variables = jax.tree_util.tree_map(np.asarray, spec.init(jax.random.PRNGKey(1)))
  return spec, variables


def _np_fake(x, r: actquant.ActRange, bits):
  """The activation quantizer written out in float64."""
  if r.signed:
    n = 2 ** (bits - 1) - 1
    step = np.float64(np.float32(max(abs(r.lo), abs(r.hi)) / n))
    return np.clip(np.round(x / step), -n, n) * step
  n = 2 ** bits - 1
  step = np.float64(np.float32(r.hi / n))
  return np.clip(np.round(x / step), 0, n) * step


def test_act_quant_matches_numpy_reference_forward(lenet):
  spec, v = lenet
  ranges = actquant.bn_ranges(spec, v, k=3.0)
  assert ranges.layers['ip1'].signed and not ranges.layers['ip2'].signed
  img = actquant._image_range(spec)  # pylint: disable=protected-access
  assert (ranges.layers['ip1'].lo, ranges.layers['ip1'].hi) == (img.lo, img.hi)
  w1, b1 = (np.asarray(v['params']['ip1'][n], np.float64) for n in ('kernel', 'bias'))
  # ip2 reads ReLU(y), y = W1 x + b1 with the model's N(0, I) normalized image
  assert ranges.layers['ip2'].hi == pytest.approx(
      max(0.0, float(np.max(b1 + 3.0 * np.sqrt(np.sum(w1 ** 2, axis=0))))), rel=1e-9)
  keep = trace.first_and_last_layers(spec)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, size=(6, 28, 28, 1))
  bits = 3
  with jax.enable_x64(True):
    v64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), v)
    y = np.asarray(actquant.apply_with_act_quant(spec.build(), v64, jnp.asarray(x), ranges, bits,
                                                 keep))
  p = v['params']
  h = x.reshape(6, -1)
  for name, b in (('ip1', 8), ('ip2', bits), ('ip3', 8)):
    h = _np_fake(h, ranges.layers[name], b) @ np.asarray(p[name]['kernel'], np.float64) \
        + np.asarray(p[name]['bias'], np.float64)
    if name != 'ip3':
      h = np.maximum(h, 0.0)
  np.testing.assert_allclose(y, h, rtol=1e-10, atol=1e-10)
  y_float = np.asarray(spec.build().apply(v, x.astype(np.float32)))
  assert np.max(np.abs(y - y_float)) > 1e-3  # 3-bit hidden activations do change the output


def test_act_quant_jit_and_grid(resnet20):
  spec, v = resnet20
  ranges = actquant.bn_ranges(spec, v, bits=4)
  keep = trace.first_and_last_layers(spec)
  model = spec.build()
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
  av = actquant.attach(v, ranges, 4, keep)
  eager = np.asarray(actquant.forward(model, av, x))
  jitted = np.asarray(jax.jit(lambda a, b: actquant.forward(model, a, b))(av, x))
  np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)
  seen = {}

  def record(next_fun, args, kwargs, ctx):
    if ctx.method_name == '__call__' and isinstance(ctx.module, (nn.Conv, nn.Dense)):
      seen['/'.join(ctx.module.path)] = np.asarray(args[0], np.float64)
    return next_fun(*args, **kwargs)

  class Inner:  # record runs inside forward's interceptor, so it sees the quantized inputs
    def apply(self, *a, **kw):
      with nn.intercept_methods(record):
        return model.apply(*a, **kw)

  actquant.forward(Inner(), av, x)
  assert set(seen) == set(ranges.layers)
  for p, a in seen.items():
    step, lo, hi = actquant.layer_grid(ranges.layers[p], 8 if p in keep else 4)
    g = a / np.float64(step)
    assert np.max(np.abs(g - np.round(g))) < 1e-3 and g.min() >= lo - 1e-3 and g.max() <= hi + 1e-3
  plain = np.asarray(model.apply(v, x))
  np.testing.assert_array_equal(np.asarray(actquant.forward(model, v, x)), plain)


def test_bn_ranges_follow_the_bn_rule(resnet20):
  spec, v = resnet20
  k = 2.5
  r = actquant.bn_ranges(spec, v, k=k)
  p = v['params']

  def rule(bn):  # DFQ: max over channels of beta + k |gamma|, clipped at 0
    return max(0.0, float(np.max(bn['bias'] + k * np.abs(bn['scale']))))

  assert r.layers['layer1_0/conv1'].hi == pytest.approx(rule(p['bn1']))    # stem ReLU(BN)
  assert r.layers['layer2_1/conv2'].hi == pytest.approx(rule(p['layer2_1']['bn1']))
  # After a residual add: N(beta_bn2 + E[a_in], gamma^2 + Var[a_in]) with a_in the stem's ReLU(BN).
  b0, g0 = p['bn1']['bias'].astype(np.float64), np.abs(p['bn1']['scale'].astype(np.float64))
  h = b0 / g0
  ea = b0 * sp_stats.norm.cdf(h) + g0 * sp_stats.norm.pdf(h)
  ea2 = (b0 ** 2 + g0 ** 2) * sp_stats.norm.cdf(h) + b0 * g0 * sp_stats.norm.pdf(h)
  bb = p['layer1_0']['bn2']['bias'].astype(np.float64)
  gb = np.abs(p['layer1_0']['bn2']['scale'].astype(np.float64))
  ref = np.max(bb + ea + k * np.sqrt(gb ** 2 + ea2 - ea ** 2))
  assert r.layers['layer1_1/conv1'].hi == pytest.approx(max(ref, 0.0), rel=1e-9)
  img = r.layers['conv1']
  assert img.signed and img.lo == pytest.approx(min(-m / s for m, s in zip(spec.mean, spec.std)))
  assert not r.layers['fc'].signed and r.source == 'bn' and r.data_free
  # the max-pool quantile: P(max of w normals <= z) = Phi(k)
  z = actquant._quantile_z(2.0, 9)  # pylint: disable=protected-access
  assert sp_stats.norm.cdf(z) ** 9 == pytest.approx(sp_stats.norm.cdf(2.0))
  for name in ('vgg16_bn_cifar', 'resnet20_b', 'resnet18'):
    s2 = archs.get(name)
    v2 = jax.tree_util.tree_map(np.asarray, s2.init(jax.random.PRNGKey(2)))
    r2 = actquant.bn_ranges(s2, v2, k=3.0)
    assert set(r2.layers) == set(quant.kernel_paths(v2))
    if name == 'resnet18':  # the stem's 3x3 max-pool: the Phi(k) quantile of a max of 9
      bn = v2['params']['bn1']
      z9 = sp_stats.norm.ppf(sp_stats.norm.cdf(3.0) ** (1 / 9))
      assert r2.layers['layer1_0/conv1'].hi == pytest.approx(
          max(0.0, float(np.max(bn['bias'] + z9 * np.abs(bn['scale'])))))
  with pytest.raises(ValueError, match='k'):
    actquant.bn_ranges(spec, v)
  assert actquant.default_k(4) == 4.0 and actquant.default_k(6) == 6.0
  assert actquant.default_k(8) == 8.0 and actquant.default_k(5) == 4.0


def test_bn_ranges_mobilenet_v2_follow_the_bn_rule():
  """MobileNetV2: ReLU6(BN) inputs get the BN quantile capped at 6; a block's linear output (plus
  the block input on a residual) N(beta + m_x, gamma^2 + v_x) a symmetric range (float64 here)."""
  spec = archs.get('mobilenet_v2_cifar10')
  v = jax.tree_util.tree_map(np.asarray, spec.init(jax.random.PRNGKey(4)))
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v['params'])
  k = 3.0
  r = actquant.bn_ranges(spec, v, k=k)
  assert set(r.layers) == set(quant.kernel_paths(v)) and r.source == 'bn'

  def bn(path):
    node = p
    for key in path.split('/'):
      node = node[key]
    return node['bias'], np.abs(node['scale'])

  def relu6(path):
    b, g = bn(path)
    return min(6.0, max(0.0, float(np.max(b + k * g))))

  assert r.layers['features_1/conv_0_0'].hi == pytest.approx(relu6('features_0/bn'))
  assert r.layers['features_2/conv_1_0'].hi == pytest.approx(relu6('features_2/conv_0_1'))
  assert r.layers['features_2/conv_2'].hi == pytest.approx(relu6('features_2/conv_1_1'))
  assert r.layers['classifier_1'].hi == pytest.approx(relu6('features_18/bn'))
  # block 2 (no residual) feeds block 3 (residual: 24 -> 24, stride 1): block 4 reads the sum
  b2, g2 = bn('features_2/conv_3')
  b3, g3 = bn('features_3/conv_3')
  lo, hi = b2 - k * g2, b2 + k * g2
  x3 = r.layers['features_3/conv_0_0']
  assert x3.signed and x3.lo == pytest.approx(np.min(lo)) and x3.hi == pytest.approx(np.max(hi))
  m, s = b2 + b3, np.sqrt(g2 ** 2 + g3 ** 2)
  x4 = r.layers['features_4/conv_0_0']
  assert x4.lo == pytest.approx(np.min(m - k * s)) and x4.hi == pytest.approx(np.max(m + k * s))
  # the projection's output after a 6-bit grid is symmetric: qmin = -qmax
  delta, qmin, qmax = actquant.layer_grid(x4, 6)
  assert qmin == -qmax == -31 and delta == np.float32(max(-x4.lo, x4.hi) / 31)


def test_observed_ranges_and_sources(lenet):
  spec, v = lenet
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
  r = actquant.calibration_ranges(spec, v, images, batch_size=8)
  assert r.source == 'calibration' and not r.data_free
  x = np.asarray(archs.normalize_fn(spec)(images))
  seen = {}

  def record(next_fun, args, kwargs, ctx):
    if ctx.method_name == '__call__' and isinstance(ctx.module, (nn.Conv, nn.Dense)):
      seen['/'.join(ctx.module.path)] = np.asarray(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    spec.build().apply(v, x)
  assert set(seen) == set(r.layers)
  for p, a in seen.items():
    if a.min() >= 0:
      assert not r.layers[p].signed and r.layers[p].hi == pytest.approx(float(a.max()), rel=1e-6)
    else:
      assert r.layers[p].signed and r.layers[p].hi == pytest.approx(float(np.abs(a).max()),
                                                                     rel=1e-6)
  r99 = actquant.calibration_ranges(spec, v, images, percentile=99.0, batch_size=20)
  a = seen['ip2']
  assert r99.layers['ip2'].hi == pytest.approx(float(np.percentile(a, 99.0)), rel=1e-5)
  with pytest.raises(ValueError, match='data-free'):
    actquant.ActRanges({}, 'calibration', True)


def test_ranges_round_trip_json_and_checkpoint(resnet20, tmp_path):
  spec, v = resnet20
  r = actquant.bn_ranges(spec, v, k=3.3)
  text = actquant.act_ranges_to_json(r)
  assert actquant.act_ranges_from_json(text) == r
  assert actquant.act_ranges_from_json(json.loads(text)) == r
  with pytest.raises(ValueError, match='format'):
    actquant.act_ranges_from_json('{"layers": {}}')
  bad = json.loads(text)
  bad['layers']['fc']['lo'] = 5.0
  with pytest.raises(ValueError, match="'fc'"):
    actquant.act_ranges_from_json(bad)
  with pytest.raises(ValueError, match='not a conv/dense layer'):
    actquant.attach(v, actquant.ActRanges({'nope': actquant.ActRange(0, 1, False)}, 'bn', True), 4)
  keep = trace.first_and_last_layers(spec)
  qtree, qmeta = quant.quantize_tree(v, bits=4, keep_8bit=keep)
  out = checkpoint.save(tmp_path / 'ck', spec.name, None, qtree,
                        meta=dict(quant=qmeta, act_quant=actquant.act_meta(r, 4, keep)))
  loaded = checkpoint.load(out)
  r2, bits2, keep2 = actquant.act_from_meta(loaded.meta['act_quant'])
  assert r2 == r and bits2 == 4 and keep2 == sorted(keep)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 3)), jnp.float32)
  deq = quant.dequantize_tree(qtree, qmeta)
  np.testing.assert_array_equal(
      np.asarray(actquant.apply_with_act_quant(loaded.model, loaded.variables, x, r2, bits2,
                                               keep2)),
      np.asarray(actquant.apply_with_act_quant(spec.build(), deq, x, r, 4, keep)))


def test_evaluator_forward_hook(lenet):
  spec, v = lenet
  rng = np.random.default_rng(9)
  images = rng.integers(0, 256, size=(12, 28, 28, 1), dtype=np.uint8)
  ds = ArrayDataset(images, rng.integers(0, 10, size=12).astype(np.int32), name='rand')
  keep = trace.first_and_last_layers(spec)
  r = actquant.bn_ranges(spec, v, k=1.0)
  ev = evaluation.Evaluator(spec, batch_size=8, forward=actquant.forward)
  pred = ev.predictions(actquant.attach(v, r, 2, keep), ds, progress=False)['pred']
  logits = actquant.apply_with_act_quant(spec.build(), v, archs.normalize_fn(spec)(images), r, 2,
                                         keep)
  np.testing.assert_array_equal(pred, np.argmax(np.asarray(logits), axis=1))
  plain = evaluation.Evaluator(spec, batch_size=8).predictions(v, ds, progress=False)['pred']
  np.testing.assert_array_equal(ev.predictions(v, ds, progress=False)['pred'], plain)
  assert not np.array_equal(pred, plain)  # 2-bit hidden activations change some predictions


def test_distilled_ranges_are_data_free(resnet20):
  spec, v = resnet20
  r = actquant.distilled_ranges(spec, v, n=2, steps=0, batch_size=2)
  assert r.source == 'distilled' and r.data_free and r.info['n'] == 2
  assert set(r.layers) == set(quant.kernel_paths(v)) and np.isfinite(r.info['loss_end'])
  assert r.layers['conv1'].signed and not r.layers['layer1_0/conv2'].signed


# --------------------------------------------------------------------------------------------
# As a plan stage: API, checkpoint, load, CLI


def test_plan_stage_options_and_errors():
  from lbyl_jax.plan import Plan  # pylint: disable=import-outside-toplevel
  plan = Plan.from_options(method='prune', ratio=0.3)
  assert not plan.activations.enabled and plan.describe()['activations']['act_bits'] is None
  plan = Plan.from_options(method='prune', act_bits=4, act_ranges='distilled')
  assert Plan.from_options(**plan.to_options()) == plan
  with pytest.raises(ValueError, match='--act-bits'):
    Plan.from_options(method='prune', act_k=3.0)
  with pytest.raises(ValueError, match='--act-bits'):
    Plan.from_options(method='prune', act_bits=9)
  with pytest.raises(ValueError, match='--act-k'):
    Plan.from_options(method='prune', act_bits=4, act_k=0.0)
  with pytest.raises(ValueError, match='--act-k'):
    Plan.from_options(method='prune', act_bits=4, act_k=3.0, act_ranges='distilled')
  # DFQ folds the BNs: the BN rule then reads the statistics DFQ tracked (test below).
  assert Plan.from_options(method='prune', act_bits=4, quant_method='dfq', bits=4).activations.enabled


def test_pipeline_act_quant_saves_and_loads(resnet20, tmp_path):
  import lbyl_jax  # pylint: disable=import-outside-toplevel
  from lbyl_jax import pipeline  # pylint: disable=import-outside-toplevel
  spec, v = resnet20
  res = pipeline.compress(spec, v, method='prune', ratio=0.3, quant_method='rtn', bits=4,
                          act_bits=4)
  plain = pipeline.compress(spec, v, method='prune', ratio=0.3, quant_method='rtn', bits=4)
  assert plain.act_meta is None and 'act_quant' not in plain.report
  for a, b in zip(jax.tree_util.tree_leaves(res.variables),
                  jax.tree_util.tree_leaves(plain.variables)):
    np.testing.assert_array_equal(a, b)  # the weights do not depend on --act-bits
  keep = trace.first_and_last_layers(spec)
  want = actquant.bn_ranges(spec, res.variables, bits=4)  # k = default_k(4), pruned network
  ranges, bits, keep2 = actquant.act_from_meta(res.act_meta)
  assert ranges == want and bits == 4 and keep2 == sorted(keep)
  assert res.report['act_quant']['source'] == 'bn' and res.report['act_quant']['data_free']
  images = np.random.default_rng(3).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
  x = archs.normalize_fn(spec)(images)
  want_logits = np.asarray(actquant.apply_with_act_quant(res.model, res.variables, x, want, 4,
                                                         keep))
  np.testing.assert_array_equal(np.asarray(res.apply(images)), want_logits)
  assert not np.array_equal(want_logits, np.asarray(plain.apply(images)))
  out = res.save(tmp_path / 'run')
  loaded = lbyl_jax.load(out)
  assert isinstance(loaded, actquant.ActLoaded) and loaded.act == (want, 4, sorted(keep))
  np.testing.assert_array_equal(np.asarray(loaded.apply(images)), want_logits)
  assert not isinstance(lbyl_jax.load(plain.save(tmp_path / 'plain')), actquant.ActLoaded)


@pytest.mark.realdata
def test_cli_act_bits_reload_and_evaluate(shared, tmp_path, capsys):
  import lbyl_jax  # pylint: disable=import-outside-toplevel
  from lbyl_jax.cli import evaluate as cli_eval  # pylint: disable=import-outside-toplevel
  from lbyl_jax.cli import restore as cli  # pylint: disable=import-outside-toplevel
  data = str(shared / 'data' / 'fashion_mnist_test.npz')
  common = ['--arch', 'lenet_300_100', '--weights',
            str(shared / 'weights' / 'lbyl_lenet_300_100.fashionmnist.pth.tar'), '--data', data,
            '--no-progress', '--no-download', '--method', 'lbyl', '--ratio', '0.5',
            '--weight-bits', '8', '--limit', '2000', '--no-throughput', '--json']
  cli.main(common + ['--out', str(tmp_path / 'w8')])
  w8 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  out = tmp_path / 'w8a4'
  cli.main(common + ['--out', str(out), '--act-bits', '4'])
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report['act_quant']['bits'] == 4 and report['act_quant']['info']['k'] == 4.0
  assert report['top1_before'] == w8['top1_before']
  assert report['top1_after'] != w8['top1_after'] and report['top1_after'] > 70.0
  loaded = lbyl_jax.load(out)
  assert isinstance(loaded, actquant.ActLoaded)
  cli_eval.main([str(out), '--data', data, '--limit', '2000', '--no-progress', '--json'])
  again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert again['top1'] == report['top1_after']
  # the export carries the activation quantization (tests/test_actquant_export.py: resnet20)
  cli.main(common + ['--out', str(tmp_path / 'x'), '--act-bits', '4', '--export', 'stablehlo'])
  capsys.readouterr()
  from lbyl_jax.io import export as export_lib  # pylint: disable=import-outside-toplevel
  x = lbyl_jax.load(tmp_path / 'x')
  images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28, 1), dtype=np.uint8)
  exported = export_lib.load_stablehlo((tmp_path / 'x' / 'model.stablehlo').read_bytes())
  np.testing.assert_array_equal(np.asarray(exported.call(images)), np.asarray(x.apply(images)))


def test_stage_distilled_ranges_through_the_pipeline(resnet20, lenet, monkeypatch):
  from lbyl_jax import pipeline  # pylint: disable=import-outside-toplevel
  spec, v = resnet20
  real = actquant.distilled_ranges
  calls = []

  def short(spec_, variables):  # the real distillation, 2 images and 2 steps (speed)
    calls.append(variables)
    return real(spec_, variables, n=2, steps=2, batch_size=2)

  monkeypatch.setattr(actquant, 'distilled_ranges', short)
  res = pipeline.compress(spec, v, method='prune', ratio=0.3, act_bits=6,
                          act_ranges='distilled')
  ranges, bits, keep = actquant.act_from_meta(res.act_meta)
  assert len(calls) == 1 and calls[0] is res.variables  # ranges of the pruned network
  assert ranges.source == 'distilled' and ranges.data_free and bits == 6
  assert keep == sorted(trace.first_and_last_layers(spec))
  assert set(ranges.layers) == set(quant.kernel_paths(res.variables))
  assert res.report['act_quant']['source'] == 'distilled'
  monkeypatch.setattr(actquant, 'distilled_ranges', real)
  with pytest.raises(ValueError, match='no BatchNorm'):
    pipeline.compress(lenet[0], lenet[1], method='prune', ratio=0.5, act_bits=6,
                      act_ranges='distilled')


def test_dfq_folded_network_gets_the_bn_rule_from_the_tracked_statistics(resnet20):
  """DFQ folds every BN into its layer (the BNs become identities), so the BN rule reads the
  output statistics DFQ tracked. Without equalization they are the original BNs' (beta, |gamma|):
  the ranges equal those of the unfolded network exactly; with it (the plan's DFQ), the pipeline's
  ranges are the rule on the tracked statistics, and the identity BNs alone would give others."""
  from lbyl_jax import pipeline  # pylint: disable=import-outside-toplevel
  from lbyl_jax.quant import dfq as dfq_lib  # pylint: disable=import-outside-toplevel
  spec, v = resnet20
  kw = dict(bits=8, per_channel=True, symmetric=True, bias_absorption=False,
            bias_correction=False, keep_8bit=(), cle_tol=1e-8, cle_max_iter=1000)
  qtree, qmeta, _, stats = dfq_lib._dfq(spec, v, cle=False, **kw)  # pylint: disable=protected-access
  folded = quant.dequantize_tree(qtree, qmeta)
  ref = actquant.bn_ranges(spec, v, k=4.0)
  got = actquant.bn_ranges(spec, folded, k=4.0,
                           bn_gaussians=actquant.dfq_bn_gaussians(spec, stats))
  assert set(got.layers) == set(ref.layers)
  for path, r in ref.layers.items():
    assert (got.layers[path].lo, got.layers[path].hi) == pytest.approx((r.lo, r.hi), rel=1e-6), path
  res = pipeline.compress(spec, v, method='prune', ratio=0.0, quant_method='dfq', bits=4,
                          act_bits=4)
  qtree, qmeta, _, stats = dfq_lib._dfq(  # pylint: disable=protected-access
      spec, v, **dict(kw, bits=4, bias_correction=True,
                      keep_8bit=tuple(trace.first_and_last_layers(spec))), cle=True)
  expect = actquant.bn_ranges(spec, quant.dequantize_tree(qtree, qmeta), k=4.0, bits=4,
                              bn_gaussians=actquant.dfq_bn_gaussians(spec, stats))
  ranges, bits, _ = actquant.act_from_meta(res.act_meta)
  assert bits == 4 and ranges.layers == expect.layers
  identity = actquant.bn_ranges(spec, res.variables, k=4.0, bits=4)
  assert any(identity.layers[p] != expect.layers[p] for p in expect.layers)
