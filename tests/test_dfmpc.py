"""DF-MPC (lbyl_jax.quant.dfmpc) against float64 NumPy references, Monte Carlo and an exact case;
the quantizer as a plan stage."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lbyl_jax import pipeline
from lbyl_jax.core import trees
from lbyl_jax.core import units as units_lib
from lbyl_jax.models import archs
from lbyl_jax.models import trace
from lbyl_jax.plan import Plan
from lbyl_jax.pruning import solvers
from lbyl_jax.pruning.moments import InputMoments
from lbyl_jax.quant import dfmpc
from lbyl_jax.quant import squant
from lbyl_jax.quant import uniform as quant


@pytest.fixture(scope='module')
def resnet20():
  spec = archs.get('resnet20')
  variables = jax.tree_util.tree_map(np.asarray, spec.init(jax.random.PRNGKey(0)))
  return spec, variables


def _zero_shift(spec, v):
  """A copy of v whose unit BN shifts b = beta - alpha mu are 0."""
  v = trees.copy_arrays(v)
  for u in spec.units:
    p = trees.get_path(v['params'], u.bn)
    s = trees.get_path(v['batch_stats'], u.bn)
    p['bias'] = (p['scale'] / np.sqrt(s['var'] + 1e-5) * s['mean']).astype(np.float32)
  return v


@pytest.mark.parametrize('mode', ['diag', 'full'])
def test_dfmpc_exact_when_the_consumer_can_represent_the_error(resnet20, mode):
  # A deployed producer W / c (c > 0 per channel) with b = 0: c ReLU(z / c) = ReLU(z), so the
  # compensated network must compute the original function, whatever the input moments.
  spec, v = resnet20
  v = _zero_shift(spec, v)
  rng = np.random.default_rng(3)
  c = {u.producer: rng.uniform(0.5, 2.0, units_lib.width_of(v, u)) for u in spec.units}
  work, rep = dfmpc.compensate(spec, v, lambda p, k: k / c[p], mode=mode, lam=0.0)
  model = spec.build()
  x = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  y = np.asarray(model.apply(v, x), np.float64)
  y2 = np.asarray(model.apply(work, x), np.float64)
  assert np.max(np.abs(y2 - y)) <= 1e-5 * np.max(np.abs(y))
  broken = trees.copy_arrays(work)
  for u in spec.units:  # without the compensation the output is far off
    trees.set_path(broken['params'], u.consumer, trees.get_path(v['params'], u.consumer))
  assert np.max(np.abs(np.asarray(model.apply(broken, x)) - y)) > 1e-2 * np.max(np.abs(y))
  for u in spec.units:
    assert rep[u.name]['rel_error_after'] < 1e-8 < rep[u.name]['rel_error_before']


def _dfmpc_reference(W, What, alpha, b, mean, var):
  """E[z_j zhat_k] by explicit sums over taps and channels under independent inputs (loops)."""
  kh, kw, ci, m = W.shape
  Ezh = np.zeros((m, m))
  Ehh = np.zeros((m, m))
  t = np.zeros(m)
  th = np.zeros(m)
  taps = [(a, c_, i) for a in range(kh) for c_ in range(kw) for i in range(ci)]
  for j in range(m):
    t[j] = alpha[j] * sum(W[a, c_, i, j] * mean[i] for a, c_, i in taps) + b[j]
    th[j] = alpha[j] * sum(What[a, c_, i, j] * mean[i] for a, c_, i in taps) + b[j]
  for j in range(m):
    for k in range(m):
      cov_zh = alpha[j] * alpha[k] * sum(W[a, c_, i, j] * What[a, c_, i, k] * var[i]
                                         for a, c_, i in taps)
      cov_hh = alpha[j] * alpha[k] * sum(What[a, c_, i, j] * What[a, c_, i, k] * var[i]
                                         for a, c_, i in taps)
      Ezh[j, k] = cov_zh + t[j] * th[k]
      Ehh[j, k] = cov_hh + th[j] * th[k]
  return Ezh, Ehh


def test_dfmpc_coefficients_match_reference():
  rng = np.random.default_rng(7)
  W = rng.normal(size=(3, 3, 4, 5))
  What = quant.fake_quantize(W, bits=2)
  alpha, b = rng.uniform(0.5, 2, 5), rng.normal(size=5)
  mom = InputMoments(rng.uniform(0, 1, 4), rng.uniform(0.2, 2, 4))
  Ezh, Ehh = _dfmpc_reference(W, What, alpha, b, mom.mean, mom.var)
  F, t = dfmpc.moment_rows(W, alpha, b, mom)
  Fh, th = dfmpc.moment_rows(What, alpha, b, mom)
  for lam in (0.0, 0.1):
    # pre-activation target against the loop reference
    c = dfmpc.diag_coefficients(F, Fh, t, th, lam, target='preact')
    np.testing.assert_allclose(c, (np.diag(Ezh) / np.diag(Ehh) + lam) / (1 + lam), rtol=1e-10)
    lam_bar = lam * np.trace(Ehh) / 5
    S_ref = np.linalg.solve(Ehh + lam_bar * np.eye(5), Ezh.T + lam_bar * np.eye(5)).T
    (res,) = solvers.solve([dfmpc.full_system(F, Fh, t, th, lam, target='preact')],
                           dtype='float64')
    np.testing.assert_allclose(res.S_P, S_ref, rtol=1e-8, atol=1e-10)
    before, after = dfmpc.reconstruction_error(F, Fh, t, th, res.S_P, target='preact')
    assert after <= before
    # feature-map target: the closed forms of the module docstring from its moments
    eah, ehh, _ = dfmpc.full_moments(F, Fh, t, th)
    dah, dhh, _ = dfmpc.diag_moments(F, Fh, t, th)
    np.testing.assert_allclose(np.diag(eah), dah, rtol=1e-12)
    np.testing.assert_allclose(np.diag(ehh), dhh, rtol=1e-12)
    lb = lam * np.mean(dhh)
    np.testing.assert_allclose(dfmpc.diag_coefficients(F, Fh, t, th, lam),
                               (dah + lb) / (dhh + lb), rtol=1e-12)
    lam_bar = lam * np.trace(ehh) / 5
    S_ref = np.linalg.solve(ehh + lam_bar * np.eye(5), eah.T + lam_bar * np.eye(5)).T
    (res,) = solvers.solve([dfmpc.full_system(F, Fh, t, th, lam)], dtype='float64')
    np.testing.assert_allclose(res.S_P, S_ref, rtol=1e-7, atol=1e-9)
    for S in (res.S_P, dfmpc.diag_coefficients(F, Fh, t, th, lam)):
      before, after = dfmpc.reconstruction_error(F, Fh, t, th, S)
      assert after <= before


def test_dfmpc_moments_against_monte_carlo():
  # A dense producer on independent inputs: the modelled moments against sampled z, zhat.
  rng = np.random.default_rng(11)
  W = rng.normal(size=(6, 3))
  What = quant.fake_quantize(W, bits=2)
  alpha, b = rng.uniform(0.5, 2, 3), rng.normal(size=3)
  mean, var = rng.uniform(-1, 1, 6), rng.uniform(0.2, 2, 6)
  F, t = dfmpc.moment_rows(W, alpha, b, InputMoments(mean, var))
  Fh, th = dfmpc.moment_rows(What, alpha, b, InputMoments(mean, var))
  x = mean + np.sqrt(var) * rng.standard_normal((400_000, 6))
  z, zh = alpha * (x @ W) + b, alpha * (x @ What) + b
  n = len(x)
  for target, (u, uh) in (('preact', (z, zh)), ('relu', (np.maximum(z, 0), np.maximum(zh, 0)))):
    eah, ehh, eaa = dfmpc.full_moments(F, Fh, t, th, target)
    np.testing.assert_allclose(eah, u.T @ uh / n, rtol=0.02, atol=0.02)
    np.testing.assert_allclose(ehh, uh.T @ uh / n, rtol=0.02, atol=0.02)
    np.testing.assert_allclose(eaa, np.mean(u * u, axis=0), rtol=0.02, atol=0.02)


def test_dfmpc_mixed_precision_tree(resnet20):
  spec, v = resnet20
  keep = trace.first_and_last_layers(spec)
  widths, qt, qm, rep = dfmpc.dfmpc(spec, v, bits=2, high_bits=8, keep_8bit=keep, base='squant')
  assert widths == spec.default_widths()
  producers = {u.producer for u in spec.units}
  for p, info in qm['layers'].items():
    assert info['bits'] == (8 if p in keep or p not in producers else 2)
  deq = quant.dequantize_tree(qt, qm)
  for u in spec.units:  # the stored producer is exactly the deployed kernel the fit used
    k = trees.get_path(v['params'], u.producer)['kernel']
    np.testing.assert_array_equal(trees.get_path(deq['params'], u.producer)['kernel'],
                                  quant.dequantize(squant.quantize(k, bits=2)))
    r = rep['units'][u.name]
    assert r['rel_error_after'] <= r['rel_error_before'] + 1e-12
  assert rep['nbytes'] < quant.tree_nbytes(quant.quantize_tree(v, bits=8)[0])
  with pytest.raises(ValueError, match='mode'):
    dfmpc.dfmpc(spec, v, bits=2, mode='nope')
  with pytest.raises(ValueError, match='base'):
    dfmpc.dfmpc(spec, v, bits=2, base='nope')


def test_dfmpc_stage_defaults_and_errors():
  q = Plan.from_options(method='prune', ratio=0.3, quant_method='dfmpc', bits=4).quantizer
  assert q.resolved() == ('diag', 1.0)
  q = Plan.from_options(method='prune', quant_method='dfmpc', bits=3, dfmpc_high_bits=8).quantizer
  assert q.resolved() == ('full', 10.0)
  q = Plan.from_options(method='prune', quant_method='dfmpc', bits=3, dfmpc_high_bits=8,
                        dfmpc_mode='diag', dfmpc_lam=0.5).quantizer
  assert q.resolved() == ('diag', 0.5)
  with pytest.raises(ValueError, match='--dfmpc-lam'):
    Plan.from_options(method='prune', quant_method='dfmpc', bits=4, dfmpc_lam=-1.0)
  with pytest.raises(ValueError, match='--dfmpc-high-bits'):
    Plan.from_options(method='prune', quant_method='dfmpc', bits=4, dfmpc_high_bits=9)
  with pytest.raises(ValueError, match='--asymmetric'):
    Plan.from_options(method='prune', quant_method='dfmpc', bits=4, dfmpc_base='omse',
                      symmetric=False)
  with pytest.raises(ValueError, match='dfmpc'):
    Plan.from_options(method='prune', quant_method='rtn', bits=4, dfmpc_lam=1.0)


def test_pipeline_dfmpc_on_the_pruned_network(resnet20):
  spec, v = resnet20
  res = pipeline.compress(spec, v, method='prune', ratio=0.3, quant_method='dfmpc', bits=4)
  ref = pipeline.compress(spec, v, method='prune', ratio=0.3)
  assert res.report['quant_method'] == 'dfmpc' and res.qmeta['method'] == 'dfmpc'
  assert res.widths == ref.widths
  keep = set(trace.first_and_last_layers(spec))
  for p, info in res.qmeta['layers'].items():
    assert info['bits'] == (8 if p in keep else 4)
  # Each unit's producer is RTN of the pruned producer; its consumer absorbed the coefficients.
  _, qt, qm, rep = dfmpc.dfmpc(spec, ref.variables, bits=4, mode='diag', lam=1.0,
                               keep_8bit=sorted(keep))
  direct = quant.dequantize_tree(qt, qm)
  for a, b in zip(jax.tree_util.tree_leaves(direct), jax.tree_util.tree_leaves(res.variables)):
    np.testing.assert_array_equal(a, b)
  for u in spec.units:
    k = trees.get_path(ref.variables['params'], u.producer)['kernel']
    np.testing.assert_array_equal(trees.get_path(res.variables['params'], u.producer)['kernel'],
                                  quant.fake_quantize(k, bits=4).astype(np.float32))
    assert rep['units'][u.name]['rel_error_after'] < rep['units'][u.name]['rel_error_before']
  assert res.report['quant_report']['mode'] == 'diag' and res.report['quant_report']['lam'] == 1.0


@pytest.mark.realdata
def test_cli_dfmpc_mixed_precision_saves_and_reloads(shared, tmp_path, capsys):
  import json  # pylint: disable=import-outside-toplevel
  import lbyl_jax  # pylint: disable=import-outside-toplevel
  from lbyl_jax import evaluation  # pylint: disable=import-outside-toplevel
  from lbyl_jax.cli import restore as cli  # pylint: disable=import-outside-toplevel
  from lbyl_jax.io import data as data_lib  # pylint: disable=import-outside-toplevel
  spec = archs.get('lenet_300_100')
  ds = data_lib.load_dataset(str(shared / 'data' / 'fashion_mnist_test.npz'))
  out = tmp_path / 'dfmpc'
  cli.main(['--arch', 'lenet_300_100', '--weights',
            str(shared / 'weights' / 'lbyl_lenet_300_100.fashionmnist.pth.tar'),
            '--data', str(shared / 'data' / 'fashion_mnist_test.npz'), '--out', str(out),
            '--no-progress', '--no-download', '--method', 'lbyl', '--ratio', '0.5',
            '--weight-bits', '3', '--quant-method', 'dfmpc', '--dfmpc-high-bits', '8', '--json'])
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report['quant_method'] == 'dfmpc' and report['quant_report']['mode'] == 'full'
  assert report['quant_report']['high_bits'] == 8 and report['quant_report']['lam'] == 10.0
  assert report['top1_after'] > 80.0  # LeNet-300-100 keeps most of its 89.8 %
  loaded = lbyl_jax.load(out)
  assert {d['bits'] for d in loaded.meta['quant']['layers'].values()} == {3, 8}
  ev = evaluation.Evaluator(spec, batch_size=2500)
  assert ev.evaluate(loaded.variables, ds, progress=False)['top1'] == report['top1_after']
