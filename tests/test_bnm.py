"""BN-moments compensation (lbyl_jax/pruning/methods/bnm.py, docs/bn_moments.md), with the bias
constants (lbyl_jax/pruning/bias.py), the research 'auto' / 'blend' rules and the guard
(lbyl_jax/experimental/).

Synthetic units check the fit algebra against float64 NumPy references and Monte Carlo; random
networks check the whole-network plumbing; one real-data test checks the headline claim on the
Neuron Merging ResNet-56.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from lbyl_jax import pipeline
from lbyl_jax.core.units import Unit
from lbyl_jax.experimental import guard as guard_lib
from lbyl_jax.experimental import montecarlo
from lbyl_jax.experimental import rules
from lbyl_jax.models import archs
from lbyl_jax.plan import Plan
from lbyl_jax.core import units as units_lib
from lbyl_jax.pruning import bias as bias_lib
from lbyl_jax.pruning import moments as moments_lib
from lbyl_jax.pruning import selection as selection_lib
from lbyl_jax.pruning.methods import bnm
from lbyl_jax.pruning.problem import UnitProblem, UnitSolution

_UNIT = Unit.of('u', 'u', 'u_bn', 'v', 'conv')


def _solve(spec, variables, problems, *, bnm_cov='identity', bias_correction='off',
           bias_fold='padding_aware', **kw):
  """bnm.solve with the plan's option names (bnm_cov, bias_correction, bias_fold)."""
  return bnm.solve(spec, variables, problems, cov_model=bnm_cov, bias_mode=bias_correction,
                   padding_aware=bias_fold == 'padding_aware', **kw)


def _constants(spec, variables, problems, solutions, bias_correction='on',
               bias_fold='padding_aware'):
  """bias.constants for a plan's bias-correction mode ('on', or a rule mode) and fold."""
  rule = rules.weights(bias_correction) if bias_correction in rules.RULE_MODES else None
  return bias_lib.constants(spec, variables, problems, solutions, fold=bias_fold, rule=rule)


def _bn(gamma, beta, sigma=None):
  gamma = np.asarray(gamma, np.float64)
  sigma = np.abs(gamma) if sigma is None else np.asarray(sigma, np.float64)
  alpha = gamma / sigma
  mu = np.zeros_like(gamma)
  return dict(gamma=gamma, beta=np.asarray(beta, np.float64), mu=mu, var=sigma ** 2, sigma=sigma,
              alpha=alpha, b=np.asarray(beta, np.float64) - alpha * mu)


def _random_problem(rng, n=12, d=40, m=8, unit=_UNIT):
  W = rng.normal(size=(n, d))
  bn = _bn(rng.uniform(0.4, 1.5, n) * rng.choice([-1, 1], n, p=[0.1, 0.9]), rng.normal(0, 0.6, n),
           sigma=rng.uniform(0.5, 2.0, n))
  keep = np.sort(rng.choice(n, m, replace=False))
  prune = np.setdiff1d(np.arange(n), keep)
  return UnitProblem(unit, W, bn, keep, prune)


def test_linear_activation_recovers_exact_linear_dependence():
  """y_P = C y_K exactly (filters, shifts and BN scales consistent): both fits return C."""
  rng = np.random.default_rng(0)
  m, p, d = 7, 3, 30
  WK = rng.normal(size=(m, d))
  C = rng.normal(size=(p, m))
  W = np.concatenate([WK, C @ WK])
  beta_k = rng.normal(size=m)
  beta = np.concatenate([beta_k, C @ beta_k])
  # alpha = 1 and |gamma_i| = ||f_i||: the model's Sigma_y is exactly f f^T (identity Sx).
  bn = _bn(np.linalg.norm(W, axis=1), beta)
  order = rng.permutation(m + p)  # kept and pruned channels interleaved
  inv = np.argsort(order)
  W, bn = W[order], {k: v[order] for k, v in bn.items()}
  keep, prune = np.sort(inv[:m]), np.sort(inv[m:])
  prob = UnitProblem(_UNIT, W, bn, keep, prune)
  # Rows of C in the permuted index order.
  C_perm = np.zeros((p, m))
  for j, pj in enumerate(prune):
    src = order[pj] - m
    for k, kk in enumerate(keep):
      C_perm[j, k] = C[src, order[kk]]
  for bias in ('off', 'on'):
    (sol,) = _solve(None, None, [prob], bias_correction=bias, activation='linear',
                       eps_scale=1e-14)
    np.testing.assert_allclose(sol.S_P, C_perm, atol=1e-7)
    assert sol.diag['pred_rel_error'] < 1e-9
    if bias == 'on':
      np.testing.assert_allclose(sol.bias, 0.0, atol=1e-7)
    else:
      assert sol.bias is None


def test_fits_match_numpy_reference_and_batching():
  """Units sharing a shape bucket but with different kept sets: each equals its own reference."""
  rng = np.random.default_rng(1)
  probs = [_random_problem(rng) for _ in range(4)]
  prepared = [moments_lib.preactivation(p, None, cov_model='identity')[:2] for p in probs]
  fits = bnm.fit(probs, prepared)
  for p, (mean, cov), f in zip(probs, prepared, fits):
    with jax.enable_x64(True):
      E, M = (np.asarray(x) for x in jax.jit(moments_lib.relu_second_moments)(mean, cov))
    K, P = p.keep, p.prune
    A = M[np.ix_(K, K)]
    A = A + 1e-6 * np.trace(A) / K.size * np.eye(K.size)
    np.testing.assert_allclose(f['S0'], np.linalg.solve(A, M[np.ix_(K, P)]).T, rtol=1e-9, atol=1e-12)
    Cv = M - np.outer(E, E)
    A = Cv[np.ix_(K, K)]
    A = A + 1e-6 * np.trace(A) / K.size * np.eye(K.size)
    S1 = np.linalg.solve(A, Cv[np.ix_(K, P)]).T
    np.testing.assert_allclose(f['S1'], S1, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(f['c1'], E[P] - S1 @ E[K], rtol=1e-9, atol=1e-12)
    assert f['res1'] <= f['res0'] + 1e-12  # the intercept fit is never worse under the model


def test_preactivation_model():
  rng = np.random.default_rng(2)
  p = _random_problem(rng)
  mean, cov, kind = moments_lib.preactivation(p, None, cov_model='identity')
  assert kind == 'identity'
  np.testing.assert_array_equal(mean, p.bn['beta'])
  np.testing.assert_allclose(np.diag(cov), p.bn['gamma'] ** 2, rtol=1e-12)
  f = p.bn['alpha'][:, None] * p.W
  rho = f @ f.T / np.outer(np.linalg.norm(f, axis=1), np.linalg.norm(f, axis=1))
  np.testing.assert_allclose(cov, np.abs(np.outer(p.bn['gamma'], p.bn['gamma'])) * rho, rtol=1e-10)
  # 'diag' with unit variances equals 'identity'; other variances weight the taps (4 taps here).
  ones = moments_lib.InputMoments(np.zeros(10), np.ones(10))
  np.testing.assert_allclose(moments_lib.preactivation(p, ones, cov_model='diag')[1], cov,
                             rtol=1e-12)
  var = rng.uniform(0.1, 3.0, 10)
  _, cov_d, _ = moments_lib.preactivation(p, moments_lib.InputMoments(np.zeros(10), var),
                                          cov_model='diag')
  fs = f * np.sqrt(np.repeat(var, 4))
  rho_d = fs @ fs.T / np.outer(np.linalg.norm(fs, axis=1), np.linalg.norm(fs, axis=1))
  np.testing.assert_allclose(cov_d, np.abs(np.outer(p.bn['gamma'], p.bn['gamma'])) * rho_d, rtol=1e-10)
  with pytest.raises(ValueError, match='diag'):
    moments_lib.preactivation(p, None, cov_model='diag')
  with pytest.raises(ValueError, match='split'):
    moments_lib.preactivation(p, moments_lib.InputMoments(np.zeros(7), np.ones(7)),
                              cov_model='diag')


def test_bias_constant_sign_convention_and_predicted_error_by_monte_carlo():
  """a_P ~ S_P a_K + c: E[a_P - S_P a_K] = c, and the predicted residual matches sampling."""
  rng = np.random.default_rng(3)
  p = _random_problem(rng, n=10, d=30, m=6)
  mean, cov, _ = moments_lib.preactivation(p, None, cov_model='identity')
  y = rng.multivariate_normal(mean, cov, size=400_000, method='eigh')
  a = np.maximum(y, 0.0)
  for mode in ('on', 'off'):
    (sol,) = _solve(None, None, [p], bias_correction=mode)
    r = a[:, p.prune] - a[:, p.keep] @ sol.S_P.T
    c = bias_lib.raw_constant(None, None, p, sol.S_P)
    se = r.std(0) / np.sqrt(a.shape[0])
    np.testing.assert_array_less(np.abs(r.mean(0) - c), 5 * se)
    if mode == 'on':
      np.testing.assert_allclose(sol.bias, c, rtol=1e-12)
      r = r - c
    second = np.sum(a[:, p.prune] ** 2, axis=1).mean()
    np.testing.assert_allclose(sol.diag['pred_rel_error'], np.sum(r ** 2, axis=1).mean() / second,
                               rtol=0.02)


def test_bias_constant_list_form_matches_single_form():
  rng = np.random.default_rng(4)
  probs = [_random_problem(rng) for _ in range(3)]
  sols = _solve(None, None, probs)
  consts = _constants(None, None, probs, sols, 'on')
  for p, s, c in zip(probs, sols, consts):
    np.testing.assert_allclose(c, bias_lib.raw_constant(None, None, p, s.S_P), rtol=1e-14)


def test_nothing_pruned_gives_empty_rows():
  rng = np.random.default_rng(5)
  p = _random_problem(rng)
  full = UnitProblem(p.unit, p.W, p.bn, np.arange(p.n), np.zeros(0, np.int64))
  for mode in ('off', 'on', 'auto'):
    (sol,) = _solve(None, None, [full], bias_correction=mode)
    assert sol.S_P.shape == (0, p.n) and sol.bias is None
  assert _constants(None, None, [full], [sol], 'on') == [None]


def test_option_errors():
  rng = np.random.default_rng(6)
  p = _random_problem(rng)
  with pytest.raises(ValueError, match='cov_model'):
    _solve(None, None, [p], bnm_cov='full')
  with pytest.raises(ValueError, match="--bnm-cov must be one of .* got 'full'"):
    Plan.from_options(method='bnm', bnm_cov='full')
  with pytest.raises(ValueError, match='bias_correction'):
    _solve(None, None, [p], bias_correction='sometimes')
  with pytest.raises(ValueError, match='activation'):
    _solve(None, None, [p], activation='tanh')


# --------------------------------------------------------------------------------------------
# Whole networks (random weights).


@pytest.fixture(scope='module')
def resnet20():
  spec = archs.get('resnet20')
  return spec, jax.tree_util.tree_map(np.asarray, spec.init(jax.random.PRNGKey(0)))


def _problems(spec, variables, ratio):
  return selection_lib.build_problems(spec, variables, selection_lib.Selection(ratio=ratio))


def test_resnet_solve_shapes_diagnostics_and_covariance_models(resnet20):
  spec, variables = resnet20
  probs = _problems(spec, variables, 0.4)
  sols = {}
  for cov in ('identity', 'diag'):
    sols[cov] = _solve(spec, variables, probs, bnm_cov=cov)
    for p, s in zip(probs, sols[cov]):
      assert s.S_P.shape == (p.prune.size, p.m) and np.all(np.isfinite(s.S_P)) and s.bias is None
      d = s.diag
      assert d['method'] == 'bnm' and d['sx'] == cov and d['fit'] == 'uncentred'
      assert 0.0 <= d['pred_rel_error'] <= 1.0 + 1e-9
      assert d['cond'] >= 1.0 and d['coef_max_abs'] >= d['coef_mean_abs'] >= 0.0
  diff = max(np.max(np.abs(a.S_P - b.S_P)) for a, b in zip(sols['identity'], sols['diag']))
  assert diff > 1e-6
  on = _solve(spec, variables, probs, bias_correction='on')
  assert all(s.bias is not None and s.bias.shape == (p.prune.size,) for p, s in zip(probs, on))
  # Constants are corrected for the consumer's zero padding (all 3x3 consumers here).
  assert all(s.diag['bias_padding_aware'] and s.diag['bias_padding_change'] > 0 for s in on)
  json.dumps([s.diag for s in on + sols['diag']])  # reports are written as JSON


def test_restore_ratio_zero_is_identity(resnet20):
  spec, variables = resnet20
  res = pipeline.compress(spec, variables, method='bnm', ratio=0.0, bias_correction='on')
  widths, new = res.widths, res.variables
  assert widths == spec.default_widths()
  flat_a = jax.tree_util.tree_leaves(variables)
  flat_b = jax.tree_util.tree_leaves(new)
  assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(flat_a, flat_b))


def test_restore_bnm_runs_and_beats_pruning_on_the_modelled_loss(resnet20):
  """On a random ResNet-20 with calibrated BN statistics, bnm's consumer output is closer to the
  original network's than plain pruning's (a forward-pass check of the whole pipeline)."""
  spec, variables = resnet20
  mc = montecarlo.mc_propagate(spec, variables, n=16, seed=0)
  variables = dict(variables, batch_stats=mc['batch_stats'])
  x = np.random.default_rng(0).standard_normal((16, 32, 32, 3)).astype(np.float32)
  ref = np.asarray(spec.model.apply(variables, x))
  errs = {}
  for method in ('prune', 'bnm'):
    res = pipeline.compress(spec, variables, method=method, ratio=0.3)
    widths, new = res.widths, res.variables
    out = np.asarray(spec.build(widths).apply(new, x))
    errs[method] = np.linalg.norm(out - ref) / np.linalg.norm(ref)
  assert errs['bnm'] < errs['prune']


def test_mlp_solve_uses_propagated_moments():
  spec = archs.get('lenet_300_100')
  variables = jax.tree_util.tree_map(np.asarray, spec.init(jax.random.PRNGKey(1)))
  probs = _problems(spec, variables, 0.5)
  sols = _solve(spec, variables, probs, bnm_cov='identity', bias_correction='on')
  for p, s in zip(probs, sols):
    assert s.diag['sx'] == 'propagated'
    assert s.S_P.shape == (p.prune.size, p.m) and s.bias.shape == (p.prune.size,)
  mom = moments_lib.propagate(spec, variables)
  # The MLP pre-activation model is E[y] = W E[x] + b, Cov(y) = W Cov(x) W^T.
  mean, cov, _ = moments_lib.preactivation(probs[1], mom['ip2'])
  W = probs[1].W
  np.testing.assert_allclose(mean, W[:, :-1] @ mom['ip2'].mean + W[:, -1], rtol=1e-12)
  np.testing.assert_allclose(cov, W[:, :-1] @ mom['ip2'].cov @ W[:, :-1].T, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Real weights (Neuron Merging ResNet-56, CIFAR-10 subset).


@pytest.mark.realdata
@pytest.mark.slow
def test_real_resnet56_bnm_beats_pruning_at_half_width(shared):
  from converters import load_variables  # pylint: disable=import-outside-toplevel
  from lbyl_jax.io import data
  from lbyl_jax import evaluation as evaluate  # pylint: disable=import-outside-toplevel

  spec = archs.get('resnet56_b')
  variables = load_variables(shared / 'weights' / 'nm_resnet56.cifar10.pth.tar', spec)
  ds = data.load_dataset(shared / 'data' / 'cifar10_test.npz', arch=spec, limit=500, progress=False)
  ev = evaluate.Evaluator(spec, batch_size=250)
  acc = {}
  for method in ('prune', 'bnm'):
    res = pipeline.compress(spec, variables, method=method, ratio=0.5)
    widths, new = res.widths, res.variables
    acc[method] = ev.evaluate(new, ds, widths=widths, progress=False)['top1']
  # docs/published_results.md (full test set): prune 24.34, bnm (diag, no intercept) 63.25.
  assert acc['prune'] < 40.0 < 55.0 < acc['bnm']


# --------------------------------------------------------------------------------------------
# Zero padding and the 'auto' rule.


def test_tap_fractions_match_a_zero_padded_convolution():
  for size, k, stride, pad in [(8, 3, 1, (1, 1)), (16, 3, 2, (1, 1)), (7, 1, 2, (0, 0)), (9, 7, 2, (3, 3))]:
    frac = units_lib.ConvGeometry((size,), (k,), (stride,), (pad,), (1,)).tap_fractions()
    ones = np.pad(np.ones(size), pad)
    out = (size + pad[0] + pad[1] - k) // stride + 1
    brute = np.array([np.mean([ones[o * stride + t] for o in range(out)]) for t in range(k)])
    np.testing.assert_allclose(frac, brute, rtol=0, atol=1e-15)


def test_padding_aware_constant_matches_the_position_averaged_shift(resnet20):
  """Folding c' over all taps reproduces the average over positions of the zero-padded
  convolution of a constant map c much better than folding c itself: on four random networks and
  three map sizes, the error is smaller every time and on average less than 0.4 of the plain
  fold's (0.21-0.42 each, mean 0.31, with these seeds; how much better depends on the draw)."""
  ratios = []
  for seed in range(4):
    spec, variables = resnet20 if seed == 0 else (resnet20[0], resnet20[0].init(seed))
    probs = _problems(spec, variables, 0.5)
    cons = bias_lib.consumer_terms(spec, variables, probs,
                                   moments_lib.propagate(spec, variables))
    if seed == 0:
      first = probs[0], cons[0]
    rng = np.random.default_rng(7)
    for i in (0, 4, 8):  # 32x32, 16x16 and 8x8 maps
      p, con = probs[i], cons[i]
      kernel = np.asarray(variables['params'][p.unit.consumer.split('/')[0]]['conv2']['kernel'])
      hw = {0: 32, 4: 16, 8: 8}[i]
      c = rng.uniform(0.1, 1.0, p.prune.size)
      x = np.zeros((1, hw, hw, p.n), np.float32)
      x[..., p.prune] = c
      y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      target = np.asarray(y, np.float64).mean(axis=(0, 1, 2))
      VP = con.V[:, p.prune, :].sum(axis=0).T
      c2 = bias_lib.fold_constant(con, p.prune, c)
      err_new = np.linalg.norm(VP @ c2 - target)
      err_old = np.linalg.norm(VP @ c - target)
      ratios.append(err_new / err_old)
      assert err_new < 0.6 * err_old, (seed, i, err_new, err_old)
  assert np.mean(ratios) < 0.4, ratios
  p0, con0 = first  # the fixture's network, layer 0
  c = np.random.default_rng(7).uniform(0.1, 1.0, p0.prune.size)
  # Without padding information the constant is unchanged.
  plain = bias_lib.ConsumerTerms(con0.V, None, con0.alpha, None, con0.bias)
  np.testing.assert_array_equal(
      bias_lib.fold_constant(plain, p0.prune, c[:p0.prune.size]),
      c[:p0.prune.size])


def test_injected_error_matches_monte_carlo():
  """Channels independent, taps of a window correlated SPATIAL_CORR, mean coherent."""
  rng = np.random.default_rng(8)
  T, n, o = 9, 6, 5
  V = rng.normal(size=(T, n, o))
  alpha = rng.uniform(0.5, 2.0, o)
  con = bias_lib.ConsumerTerms(V, None, alpha, None, np.zeros(o))
  prune = np.array([1, 3, 4])
  var, mean = rng.uniform(0.1, 1.0, 3), rng.normal(size=3)
  rho = rules.SPATIAL_CORR
  z = np.sqrt(rho) * rng.standard_normal((200_000, 1, 3)) \
      + np.sqrt(1 - rho) * rng.standard_normal((200_000, T, 3))
  r = mean + np.sqrt(var) * z
  out = alpha * np.einsum('stp,tpo->so', r, V[:, prune, :])
  mc = np.mean(np.sum(out ** 2, axis=1))
  np.testing.assert_allclose(rules.injected_error(con, prune, var, mean), mc, rtol=0.02)


def test_auto_rule_decisions_and_diagnostics(resnet20):
  spec, variables = resnet20
  counts = {}
  for ratio in (0.1, 0.6):
    probs = _problems(spec, variables, ratio)
    sols = _solve(spec, variables, probs, bnm_cov='diag', bias_correction='auto')
    drift = [s.diag['bias_rule']['drift'] for s in sols]
    assert drift[0] == 0.0 and np.all(np.diff(drift) >= 0)
    for s in sols:
      rule = s.diag['bias_rule']
      use = s.bias is not None
      assert use == (rule['risk'] < rule['gain']) == (s.diag['bias_weight'] == 1.0)
      assert s.diag['fit'] == ('centred' if use else 'uncentred')
      assert rule['injected'] >= 0.0
    # No upstream drift: the first unit takes the constant whenever the model says it helps.
    assert (sols[0].bias is not None) == (sols[0].diag['bias_rule']['gain'] > 0)
    counts[ratio] = sum(s.bias is not None for s in sols)
    json.dumps([s.diag for s in sols])
  # More pruning upstream means more drift, hence fewer constants.
  assert counts[0.6] <= counts[0.1]
  assert counts[0.6] < len(spec.units)


def test_blend_weight_minimises_the_rule_error_model(resnet20):
  """'blend': per unit the w in [0, 1] minimising the modelled error of the mixture of the two
  fits plus the drift risk of its constant; the cross term B is checked through the identity
  E||r_w||^2 = (1 - w)^2 A + 2 w (1 - w) B + w^2 C at an interior w."""
  spec, variables = resnet20
  probs = _problems(spec, variables, 0.6)
  sols = _solve(spec, variables, probs, bnm_cov='diag', bias_correction='blend')
  fits = bnm.fit(probs, moments_lib.prepare(spec, variables, probs, 'diag', None)[0])
  weights = []
  for p, s, f in zip(probs, sols, fits):
    w, rule = s.diag['bias_weight'], s.diag['bias_rule']
    assert 0.0 <= w <= 1.0
    E, M = f['E'], f['M']

    def err(t, p=p, f=f, E=E, M=M):
      S = (1 - t) * f['S0'] + t * f['S1']
      var, mean = rules.residual_moments(E, M, p.keep, p.prune, S, t * f['c1'])
      return float(np.sum(var + mean ** 2))

    A, C = err(0.0), err(1.0)
    B = rules._residual_cross(E, M, p.keep, p.prune, f['S0'], f['S1'], f['c1'])
    np.testing.assert_allclose(err(0.3), 0.49 * A + 0.42 * B + 0.09 * C, rtol=1e-9)
    second = float(np.sum(np.diagonal(M)[p.prune]))
    R = rule['risk'] * second
    grid = np.linspace(0.0, 1.0, 2001)
    total = [(1 - t) ** 2 * A + 2 * t * (1 - t) * B + t ** 2 * (C + R) for t in grid]
    assert abs(w - grid[int(np.argmin(total))]) <= 1e-3 + 1e-9
    if 0 < w < 1:
      assert s.diag['fit'] == 'blend'
      np.testing.assert_allclose(s.S_P, (1 - w) * f['S0'] + w * f['S1'], rtol=1e-6, atol=1e-9)
    weights.append(w)
  assert weights[0] == pytest.approx(1.0, abs=1e-6)  # no drift yet: the intercept fit is best
  assert any(0 < w < 1 for w in weights)  # drift makes later units mix
  auto = _solve(spec, variables, probs, bnm_cov='diag', bias_correction='auto')
  assert [a.diag['bias_rule']['drift'] for a in auto][:1] == [0.0]
  # lbyl / nm / prune: the constant is scaled by the weight.
  zero = [UnitSolution(np.zeros((p.prune.size, p.m)), None, {'method': 'prune'}) for p in probs]
  on = _constants(spec, variables, probs, zero, 'on')
  blend = _constants(spec, variables, probs, zero, 'blend')
  ratios = [float(np.dot(b, a) / np.dot(a, a)) for a, b in zip(on, blend) if b is not None]
  assert all(0 < r <= 1 + 1e-12 for r in ratios) and ratios[0] == pytest.approx(1.0)
  for a, b in zip(on, blend):
    if b is not None:
      np.testing.assert_allclose(b, a * float(np.dot(b, a) / np.dot(a, a)), rtol=1e-9, atol=1e-12)


def test_bias_constant_for_other_methods(resnet20):
  """lbyl / nm / prune + bias correction: constants for the given S_P, padding-aware, gated by
  the rule in 'auto' mode."""
  spec, variables = resnet20
  probs = _problems(spec, variables, 0.3)
  zero = [UnitSolution(np.zeros((p.prune.size, p.m)), None, {'method': 'prune'}) for p in probs]
  raw = _constants(spec, variables, probs, zero, 'on', bias_fold='all_taps')
  means = moments_lib.activation_means(spec, variables, probs)
  for p, c, E in zip(probs, raw, means):
    np.testing.assert_allclose(c, E[p.prune], rtol=1e-12)  # S_P = 0: c = E[a_P]
  on = _constants(spec, variables, probs, zero, 'on')
  assert all(c is not None and c.shape == (p.prune.size,) for p, c in zip(probs, on))
  assert any(not np.allclose(a, b) for a, b in zip(on, raw))
  auto = _constants(spec, variables, probs, zero, 'auto')
  assert all(a is None or np.array_equal(a, b) for a, b in zip(auto, on))
  assert auto[0] is not None  # no upstream drift at the first unit


# Guard (--guard moments, lbyl_jax/experimental/guard.py): shrink another method's delivery under
# the moment model.


def test_guard_scales_minimise_the_modelled_error_and_stay_in_unit_interval():
  rng = np.random.default_rng(3)
  n, m = 10, 6
  A = rng.normal(size=(n, 3 * n))
  M = A @ A.T / (3 * n)
  keep, prune = np.arange(m), np.arange(m, n)
  S = rng.normal(size=(n - m, m))
  t, e_method, e_guard = guard_lib.guard_scales(S, M, keep, prune)
  assert np.all((t >= 0) & (t <= 1))
  grid = np.linspace(0.0, 1.0, 2001)
  for j, pj in enumerate(prune):
    s = S[j]
    errs = M[pj, pj] - 2 * grid * (s @ M[keep, pj]) + grid ** 2 * (s @ M[np.ix_(keep, keep)] @ s)
    assert abs(grid[np.argmin(errs)] - t[j]) <= 1e-3 + 1e-12
    np.testing.assert_allclose(e_guard[j], errs.min(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(e_method[j], errs[-1], rtol=1e-9, atol=1e-12)
  assert np.all(e_guard <= e_method + 1e-12)
  # A row that anti-correlates with its target is switched off; a dead channel (no second moment)
  # is never compensated.
  M2 = M.copy()
  M2[prune[0], :] = M2[:, prune[0]] = 0.0
  t2, _, e2 = guard_lib.guard_scales(S, M2, keep, prune)
  assert t2[0] == 0.0 and e2[0] == 0.0
  t3, _, _ = guard_lib.guard_scales(-np.abs(S) * np.sign(M[np.ix_(prune, keep)]), M, keep, prune)
  assert np.all(t3 == 0.0)


def test_guard_keeps_the_bnm_fit_and_leaves_a_dead_channel_uncompensated():
  """bnm's delivery is already the least-squares fit under the same model, so the guard's factor
  is 1 up to the ridge; an LBYL delivery of a channel that the BN statistics say is always off is
  removed (plain pruning), since pruning such a channel is exact."""
  import conftest
  from lbyl_jax.pruning import methods

  rng = np.random.default_rng(0)
  n, d, o = 6, 9, 4
  W = rng.normal(size=(n, d))
  W[5] = 0.07 * W[0] + 0.03 * W[1]  # smallest L2 norm: the channel pruned at ratio 0.1
  gamma = rng.uniform(0.5, 1.5, n)
  beta = rng.normal(0.0, 0.3, n)
  mu, var = np.zeros(n), np.ones(n)
  V = rng.normal(size=(n, o))

  def solve(method, gamma, beta, var=var):
    spec, variables, _ = conftest.one_unit_network(W, gamma, beta, mu, var, V, np.zeros(o))
    own = {'bnm_cov': 'identity'} if method == 'bnm' else {'dtype': 'float64'}
    plan = Plan.from_options(method=method, ratio=0.1, guard='moments', **own)
    probs = selection_lib.build_problems(spec, variables, plan.selection)
    assert probs[0].prune.tolist() == [5]
    sols = plan.method.deliver(spec, variables, probs, methods.Context(bias_correction='off'))
    return sols, guard_lib.guard(spec, variables, probs, sols, cov_model='identity')

  _, guarded = solve('bnm', gamma, beta)
  assert guarded[0].diag['guard_t_mean'] > 0.99
  beta_dead, gamma_dead = beta.copy(), gamma.copy()
  var_dead = var.copy()
  # Always off under the BN statistics (tiny gamma and sigma, as in dead channels of real nets).
  beta_dead[5], gamma_dead[5], var_dead[5] = -0.4, 0.05, 0.05 ** 2
  raw, guarded = solve('lbyl', gamma_dead, beta_dead, var_dead)
  assert np.abs(raw[0].S_P).max() > 0.01
  assert guarded[0].diag['guard'] == 'moments' and guarded[0].diag['guard_zero_rows'] == 1
  assert np.abs(guarded[0].S_P).max() < 1e-8
  _, guarded = solve('lbyl', gamma, beta)  # alive and well expressed: kept close to LBYL's row
  assert guarded[0].diag['guard_t_mean'] > 0.5


def test_guard_option_is_validated():
  with pytest.raises(ValueError, match='--guard must be one of'):
    Plan.from_options(method='lbyl', guard='always')


def test_bias_fold_all_taps_gives_the_raw_prototype_constants(resnet20):
  spec, variables = resnet20
  probs = _problems(spec, variables, 0.3)
  raw = _solve(spec, variables, probs, bnm_cov='diag', bias_correction='on', bias_fold='all_taps')
  aware = _solve(spec, variables, probs, bnm_cov='diag', bias_correction='on')
  for a, b in zip(raw, aware):
    assert a.diag['bias_padding_aware'] is False and a.diag['bias_padding_change'] == 0.0
    np.testing.assert_array_equal(a.S_P, b.S_P)
  assert any(not np.allclose(a.bias, b.bias) for a, b in zip(raw, aware))
  zero = [UnitSolution(np.zeros((p.prune.size, p.m)), None, {'method': 'prune'}) for p in probs]
  via_fold = _constants(spec, variables, probs, zero, 'on', bias_fold='all_taps')
  direct = [bias_lib.raw_constant(spec, variables, p, z.S_P) for p, z in zip(probs, zero)]
  for a, b in zip(via_fold, direct):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='--bias-fold'):
    Plan.from_options(method='bnm', bias_fold='middle')
  with pytest.raises(ValueError, match='fold'):
    bias_lib.constants(spec, variables, probs, zero, fold='middle')
