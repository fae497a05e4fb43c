"""Compensation through depthwise + BN + ReLU6 (lbyl_jax/pruning/depthwise.py,
docs/mobilenet_v2.md) against float64 NumPy / SciPy references computed independently:

* ReLU6 moments: quadrature of the truncated-Gaussian integrals;
* the filter-space surrogate: an explicit NumPy block with both activations linear;
* LBYL: an explicit least-squares solve on Kronecker-product filters;
* NM: a loop over the stated rule;
* BN-moments: Monte Carlo of the modelled distributions (window field, then Gaussian v);
* surgery: the compressed network equals the original with the projection input replaced by
  [c_K, S_P c_K + const] (intercepted in the real Flax model);
* exactness: a channel that is a scaled copy of another is removed without changing the output by
  NM and LBYL;
* discovery: only the exact inverted-residual path gets the 'depthwise' compensation; any other
  path through a depthwise conv gets plain pruning, never the ReLU algebra.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate
from scipy.stats import norm

import lbyl_jax
from lbyl_jax import pipeline
from lbyl_jax.models import archs
from lbyl_jax.plan import Plan
from lbyl_jax.pruning import depthwise as mc
from lbyl_jax.pruning import moments as moments_lib
from lbyl_jax.pruning import selection as selection_lib
from lbyl_jax.pruning import solvers

RNG = np.random.default_rng


# --------------------------------------------------------------------------------------------
# ReLU6 moments.


def _clip_mean_ref(m, s):
  """E[min(max(y, 0), 6)] by quadrature."""
  body = integrate.quad(lambda y: y * norm.pdf(y, m, s), 0.0, 6.0, epsabs=1e-13)[0]
  return body + 6.0 * norm.sf(6.0, m, s)


def _clip_mean_closed(m, s):
  """The truncated-normal formula, written independently of the module's decomposition."""
  a, b = -m / s, (6.0 - m) / s
  return m * (norm.cdf(b) - norm.cdf(a)) + s * (norm.pdf(a) - norm.pdf(b)) + 6.0 * norm.sf(b)


def test_relu6_moments_match_quadrature():
  m = np.array([-4.0, -0.5, 0.0, 2.0, 5.5, 6.0, 9.0, 3.0])
  s = np.array([1.0, 0.7, 2.0, 1.5, 0.4, 3.0, 2.0, 0.0])
  e1, e2 = mc.mean_second(m, s, 6.0)
  for i in range(m.size):
    if s[i] == 0:
      assert e1[i] == np.clip(m[i], 0, 6) and e2[i] == np.clip(m[i], 0, 6) ** 2
      continue
    r1 = _clip_mean_ref(m[i], s[i])
    r2 = (integrate.quad(lambda y, i=i: y * y * norm.pdf(y, m[i], s[i]), 0.0, 6.0,
                         epsabs=1e-13)[0] + 36.0 * norm.sf(6.0, m[i], s[i]))
    assert abs(e1[i] - r1) < 1e-10 and abs(e2[i] - r2) < 1e-9, (i, e1[i], r1, e2[i], r2)


@pytest.mark.parametrize('m1,s1,m2,s2,rho', [
    (1.0, 1.0, 2.0, 1.5, 0.3), (5.0, 2.0, 4.0, 1.0, 0.9), (-1.0, 2.0, 7.0, 3.0, -0.6),
    (3.0, 0.5, 3.0, 0.5, 0.999), (0.5, 1.0, 1.0, 2.0, 0.0)])
def test_relu6_cross_moment_matches_quadrature(m1, s1, m2, s2, rho):
  """E[c1 E[c2 | y1]] with the conditional clipped mean in its own closed form."""
  r = np.sqrt(1.0 - rho ** 2)

  def f(x):
    y1 = m1 + s1 * x
    inner = _clip_mean_closed(m2 + s2 * rho * x, s2 * r)
    return np.clip(y1, 0.0, 6.0) * inner * norm.pdf(x)

  ref = integrate.quad(f, -12.0, 12.0, epsabs=1e-13, limit=400, points=[-m1 / s1, (6 - m1) / s1])[0]
  got = float(mc.cross(m1, s1, m2, s2, rho, 6.0))
  assert abs(got - ref) < 1e-8, (got, ref)


# --------------------------------------------------------------------------------------------
# Random unit terms.


def _terms(n=6, c=4, seed=0, clip_mass=True) -> mc.BlockTerms:
  rs = RNG(seed)
  W = rs.standard_normal((n, c))
  alpha1 = rs.uniform(0.5, 1.5, n) * rs.choice([-1.0, 1.0], n, p=[0.2, 0.8])
  beta1 = rs.uniform(-1.0, 5.0 if clip_mass else 2.0, n)
  gamma1 = alpha1 * rs.uniform(1.0, 2.5, n)
  d = rs.standard_normal((n, 9)) * 0.5 + 0.2
  alpha2 = rs.uniform(0.5, 1.5, n) * rs.choice([-1.0, 1.0], n, p=[0.2, 0.8])
  beta2 = rs.uniform(-1.0, 5.0, n)
  gamma2 = np.sign(alpha2) * rs.uniform(1.0, 2.5, n)
  mu2 = rs.standard_normal(n)
  var2 = rs.uniform(0.5, 2.0, n)
  return mc.BlockTerms(f=alpha1[:, None] * W, b1=rs.standard_normal(n), beta1=beta1,
                       gamma1=gamma1, d=d, g=alpha2[:, None] * d,
                       b2=beta2 - alpha2 * mu2, beta2=beta2, gamma2=gamma2, mu2=mu2, var2=var2)


def _window_samples(tm: mc.BlockTerms, rho_y: np.ndarray, omega: float, n: int, seed: int):
  """Monte Carlo of the window model: y (n, N, 9) Gaussian with Cov(y_i(t), y_k(t')) =
  |g1_i||g1_k| rho_ik omega^(|dh|+|dw|), means beta1; returns a = clip(y), z = sum_t d_i[t] a_i(t)."""
  s = np.abs(tm.gamma1)
  cov_y = s[:, None] * rho_y * s[None, :]
  h, w = np.divmod(np.arange(9), 3)
  R = omega ** (np.abs(h[:, None] - h[None, :]) + np.abs(w[:, None] - w[None, :])).astype(float)
  cov = np.kron(cov_y, R)
  mean = np.repeat(tm.beta1, 9)
  y = RNG(seed).multivariate_normal(mean, cov, size=n, method='eigh').reshape(n, tm.n, 9)
  a = np.clip(y, 0.0, 6.0)
  return np.einsum('nit,it->ni', a, tm.d)


def _rho_y_ref(tm, input_var):
  G = (tm.f * input_var) @ tm.f.T
  nrm = np.sqrt(np.diag(G))
  return G / np.outer(nrm, nrm)


@functools.cache
def _mc_case():
  tm = _terms(n=6, c=4, seed=1)
  iv = RNG(2).uniform(0.5, 2.0, 4)
  omega = 0.55
  z = _window_samples(tm, _rho_y_ref(tm, iv), omega, n=400_000, seed=3)
  return tm, iv, omega, z


def test_depthwise_moments_match_monte_carlo():
  tm, iv, omega, z = _mc_case()
  _, rho_y = mc.y_model(tm, iv)
  np.testing.assert_allclose(rho_y, _rho_y_ref(tm, iv), atol=1e-12)
  ez, cz = mc.depthwise_moments(tm, rho_y, omega)
  n = z.shape[0]
  ez_mc, cz_mc = z.mean(0), np.cov(z.T)
  se = np.sqrt(np.diag(cz_mc) / n)
  assert np.all(np.abs(ez - ez_mc) < 5 * se), (ez, ez_mc, se)
  sd = np.sqrt(np.diag(cz_mc))
  assert np.all(np.abs(cz - cz_mc) < 6 * np.outer(sd, sd) * np.sqrt(2.0 / n)), (cz, cz_mc)
  # omega = 0 reduces to independent positions: Cov(z) = (d_i . d_k) Cov(a).
  _, cz0 = mc.depthwise_moments(tm, rho_y, 0.0)
  _, cz1 = mc.depthwise_moments(tm, rho_y, 0.9)
  assert not np.allclose(cz0, cz) and not np.allclose(cz1, cz)


def test_filter_lag_products_loop_reference():
  d = RNG(4).standard_normal((3, 9))
  D = mc.filter_lag_products(d)
  ref = np.zeros((5, 3, 3))
  for t in range(9):
    for u in range(9):
      lag = abs(t // 3 - u // 3) + abs(t % 3 - u % 3)
      ref[lag] += np.outer(d[:, t], d[:, u])
  np.testing.assert_allclose(D, ref, atol=1e-12)
  for omega in (0.0, 0.3, 0.8, 1.0):
    assert np.linalg.eigvalsh(mc.spatial_correlation(omega)).min() > -1e-12


def test_calibration_recovers_the_spatial_correlation():
  """BN2's running variances set to Monte Carlo Var(z) at omega = 0.55: the calibration finds it."""
  tm, iv, omega, z = _mc_case()
  target = dataclasses.replace(tm, var2=z.var(0))
  # The calibration reads only the diagonal (no cross-channel terms), so rho_y does not enter.
  found, info = mc.calibrate_omega(target)
  assert abs(found - omega) <= 0.03, (found, info)
  assert info['log_rmse'] < info['log_rmse_independent']


def test_relu6_second_moments_match_monte_carlo():
  tm = _terms(n=5, seed=6)
  rs = RNG(7)
  A = rs.standard_normal((5, 5))
  rho = np.corrcoef(A @ A.T + np.eye(5))
  cov = tm.gamma2[:, None] * rho * tm.gamma2[None, :]
  E, M = mc.second_moments(tm.beta2, cov, 6.0)
  v = rs.multivariate_normal(tm.beta2, cov, size=400_000, method='eigh')
  c = np.clip(v, 0.0, 6.0)
  n = c.shape[0]
  E_mc, M_mc = c.mean(0), c.T @ c / n
  assert np.all(np.abs(E - E_mc) < 5 * c.std(0) / np.sqrt(n))
  prod_sd = np.sqrt(np.var(c[:, :, None] * c[:, None, :], axis=0) / n)
  assert np.all(np.abs(M - M_mc) < 6 * prod_sd + 1e-12)
  # The delivery of the model (no intercept) equals the least-squares regression on the samples.
  keep, prune = np.array([0, 2, 3]), np.array([1, 4])
  fit = mc.bnm_fit(E, M, keep, prune, eps_scale=0.0)
  S_ls = np.linalg.lstsq(c[:, keep], c[:, prune], rcond=None)[0].T
  np.testing.assert_allclose(fit['S'], S_ls, atol=0.03)
  fit1 = mc.bnm_fit(E, M, keep, prune, intercept=True, eps_scale=0.0)
  X = np.concatenate([c[:, keep], np.ones((n, 1))], axis=1)
  sol = np.linalg.lstsq(X, c[:, prune], rcond=None)[0].T
  np.testing.assert_allclose(fit1['S'], sol[:, :3], atol=0.03)
  np.testing.assert_allclose(fit1['const'], sol[:, 3], atol=0.05)
  r = c[:, prune] - c[:, keep] @ fit['S'].T
  assert abs(fit['res'] - np.mean(np.sum(r * r, axis=1))) < 0.02 * fit['second']


def test_unit_moments_chain_matches_monte_carlo():
  """The whole modelled chain: rho_z from the window Monte Carlo, then Gaussian v, then ReLU6."""
  tm, iv, omega, z = _mc_case()
  model = mc.unit_moments(tm, input_var=iv, spatial=omega)
  rho_mc = np.corrcoef(z.T)
  assert np.max(np.abs(model['rho_z'] - rho_mc)) < 0.01
  cov_v = tm.gamma2[:, None] * rho_mc * tm.gamma2[None, :]
  v = RNG(8).multivariate_normal(tm.beta2, cov_v, size=400_000, method='eigh')
  c = np.clip(v, 0.0, 6.0)
  np.testing.assert_allclose(model['E'], c.mean(0), atol=0.02)
  np.testing.assert_allclose(model['M'], c.T @ c / c.shape[0], atol=0.08)
  # The sign of gamma2 enters the correlation of v: flipping one channel's BN2 sign flips its row.
  assert np.any(tm.gamma2 < 0)


# --------------------------------------------------------------------------------------------
# Surrogate, LBYL and NM.


def _dw_numpy(a, d, stride):
  """Depthwise 3x3, zero padding 1 (explicit loops over taps)."""
  n, h, w, ch = a.shape
  ap = np.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  out = np.zeros((n, ho, wo, ch))
  for t in range(9):
    i, j = divmod(t, 3)
    out += ap[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :] * d[:, t]
  return out


@pytest.mark.parametrize('stride', [1, 2])
def test_surrogate_is_the_block_with_linear_activations(stride):
  tm = _terms(n=5, c=3, seed=9)
  x = RNG(10).standard_normal((2, 9, 9, 3))
  y = x @ tm.f.T + tm.b1
  z = _dw_numpy(y, tm.g, stride) + tm.b2  # BN2 scale inside g
  H, B = mc.surrogate(tm)
  assert H.shape == (5, 27)
  # patch in torch order (C, kh, kw) around interior output (1, 1): input rows/cols stride-1 .. +1
  r = stride * 1
  patch = np.transpose(x[:, r - 1:r + 2, r - 1:r + 2, :], (0, 3, 1, 2)).reshape(2, -1)
  np.testing.assert_allclose(patch @ H.T + B, z[:, 1, 1, :], atol=1e-12)
  # Gram of the surrogate = Hadamard product of the two stages' Grams.
  np.testing.assert_allclose(H @ H.T, (tm.f @ tm.f.T) * (tm.g @ tm.g.T), atol=1e-10)


def test_lbyl_solution_is_the_explicit_least_squares_solution():
  tm = _terms(n=9, c=4, seed=11)
  keep, prune = np.array([0, 2, 3, 5, 7]), np.array([1, 4, 6, 8])
  lam1, lam2 = 0.3, 0.05
  (res,) = solvers.solve([mc.lbyl_system(tm, keep, prune, lam1=lam1, lam2=lam2)], dtype='float64')
  H = np.stack([np.kron(tm.f[i], tm.g[i]) for i in range(9)])  # (C, taps) order = kron(f, g)
  B = tm.b2 + tm.g.sum(1) * tm.b1
  for row, j in enumerate(prune):
    X = np.vstack([H[keep].T, np.sqrt(lam1) * B[keep][None, :], np.sqrt(lam2) * np.eye(5)])
    yv = np.concatenate([H[j], [np.sqrt(lam1) * B[j]], np.zeros(5)])
    s_ref = np.linalg.lstsq(X, yv, rcond=None)[0]
    np.testing.assert_allclose(res.S_P[row], s_ref, rtol=1e-7, atol=1e-9)


def _nm_loop(tm, keep, prune, t, lam):
  S = np.zeros((len(prune), len(keep)))
  B = tm.b2 + tm.g.sum(1) * tm.b1
  for r, j in enumerate(prune):
    sims, kappas, bds = [], [], []
    for k in keep:
      cf = tm.f[j] @ tm.f[k] / np.linalg.norm(tm.f[j]) / np.linalg.norm(tm.f[k])
      cg = tm.g[j] @ tm.g[k] / np.linalg.norm(tm.g[j]) / np.linalg.norm(tm.g[k])
      kap = (np.linalg.norm(tm.f[j]) * np.linalg.norm(tm.g[j])
             / (np.linalg.norm(tm.f[k]) * np.linalg.norm(tm.g[k])))
      sims.append(cf * cg if (cf > 0 and cg > 0) else 0.0)
      kappas.append(kap)
      bds.append(abs(B[j] - kap * B[k]))
    bds = np.array(bds)
    bdn = (bds - bds.min()) / (bds.max() - bds.min())
    score = lam * (1 - np.array(sims)) + (1 - lam) * bdn
    k = int(np.argmin(score))
    if sims[k] >= t:
      S[r, k] = kappas[k]
  return S


@pytest.mark.parametrize('t,lam', [(0.1, 0.85), (0.0, 0.5), (0.3, 1.0)])
def test_nm_rows_follow_the_rule(t, lam):
  tm = _terms(n=12, c=3, seed=12)
  keep, prune = np.arange(0, 12, 2), np.arange(1, 12, 2)
  S, info = mc.nm_rows(tm, keep, prune, t=t, lam=lam)
  ref = _nm_loop(tm, keep, prune, t, lam)
  np.testing.assert_allclose(S, ref, rtol=1e-12)
  assert info['merged'] == int(np.count_nonzero(ref.any(axis=1)))
  assert np.all(np.count_nonzero(S, axis=1) <= 1) and np.all(S >= 0)


# --------------------------------------------------------------------------------------------
# End to end on a small MobileNetV2: compress, surgery, exactness.

SMALL = dict(stem=6, expand=(10, 12, 12, 14, 12, 16, 18, 18, 20, 20, 22, 22, 24, 24, 26, 26),
             out=(4, 6, 6, 5, 5, 5, 7, 7, 7, 7, 8, 8, 8, 9, 9, 9, 10), last=12, num_classes=5)


@functools.cache
def _small():
  spec = archs.mobilenet_v2_spec('mnv2_small', SMALL, input_shape=(40, 40, 3))
  variables = spec.init(0)
  x = RNG(13).standard_normal((3, 40, 40, 3)).astype(np.float32)
  return spec, variables, x


def _problems(spec, variables, **options):
  plan = Plan.from_options(**options)
  return plan, selection_lib.build_problems(spec, variables, plan.selection)


def _logits_with_replaced_projection_inputs(spec, variables, x, plan):
  """The ORIGINAL network with each unit's projection input c replaced by [c_K, S c_K + const]
  (zeros elsewhere): what folding the delivery into the projection must reproduce."""
  mats = {}
  for name, (keep, S, const) in plan.items():
    n = len(keep) + np.shape(S)[0]
    prune = np.setdiff1d(np.arange(n), keep)
    T = np.zeros((n, n))  # c_new = c @ T + offset
    T[keep, keep] = 1.0
    T[np.ix_(keep, prune)] = np.asarray(S).T
    offset = np.zeros(n)
    if const is not None:
      offset[prune] = const
    mats[name] = (T.astype(np.float32), offset.astype(np.float32))

  return np.asarray(_replaced_apply(spec, tuple(sorted(mats)))(variables, x, mats), np.float64)


@functools.cache
def _replaced_apply(spec, names):
  """One compiled function per spec and set of units; the mixing matrices are arguments."""
  consumers = {u.consumers[0].path: u.name for u in spec.units if u.name in names}

  def run(v, x, mats):
    def interceptor(next_fun, args, kwargs, ctx):
      path = '/'.join(ctx.module.path)
      if ctx.method_name == '__call__' and path in consumers:
        T, offset = mats[consumers[path]]
        return next_fun(args[0] @ T + offset, **kwargs)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      return spec.build().apply(v, x)

  return jax.jit(run)


@functools.cache
def _apply(spec, widths):
  return jax.jit(spec.build(widths).apply)


@pytest.mark.parametrize('method,bias', [('prune', 'off'), ('prune', 'on'), ('nm', 'on'),
                                         ('lbyl', 'off'), ('lbyl', 'on'), ('bnm', 'off'),
                                         ('bnm', 'on')])
def test_compress_folds_the_delivery_into_the_projection(method, bias):
  spec, variables, x = _small()
  extra = dict(nm_t=0.0) if method == 'nm' else dict(dtype='float64') if method == 'lbyl' else {}
  res = pipeline.compress(spec, variables, method=method, ratio=0.3, bias_correction=bias,
                          **extra)
  widths, new_vars, report = res.widths, res.variables, res.report
  assert widths == tuple(int(w * 0.7) for w in SMALL['expand'])
  blk = new_vars['params']['features_5']
  assert blk['conv_1_0']['kernel'].shape == (3, 3, 1, widths[3])
  assert new_vars['batch_stats']['features_5']['conv_1_1']['var'].shape == (widths[3],)
  plan = res.deliveries
  sols = [plan[u.name] for u in spec.units]
  if method == 'prune':
    assert all(not np.any(S) for _, S, _ in sols)
  else:
    assert any(np.any(S) for _, S, _ in sols)
  assert all((c is not None) == (bias == 'on') for _, _, c in sols)
  ref = _logits_with_replaced_projection_inputs(spec, variables, x, plan)
  out = np.asarray(_apply(spec, widths)(new_vars, x), np.float64)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  assert report['bias_correction'] == bias
  assert all(l['diagnostics']['method'] == method for l in report['layers'])
  assert all(l['diagnostics']['compensation'] == 'depthwise' for l in report['layers'])


def _with_duplicate(variables, blk, j, k, lam_, mu_):
  """Channel j of ``blk`` := a copy of channel k scaled by lam_ (stage 1) and mu_ (stage 2), with
  channel k's activations kept small (no ReLU6 clipping at 6), and j's filter the smallest."""
  v = jax.tree_util.tree_map(lambda a: np.array(a, np.float64), variables)
  p, s = v['params'][blk], v['batch_stats'][blk]
  p['conv_0_0']['kernel'][..., k] *= 0.05
  p['conv_0_0']['kernel'][..., j] = lam_ * p['conv_0_0']['kernel'][..., k]
  for name, kap in (('conv_0_1', lam_), ('conv_1_1', lam_ * mu_)):
    p[name]['scale'][j] = p[name]['scale'][k]
    s[name]['var'][j] = s[name]['var'][k]
    p[name]['bias'][k] = 0.1
    p[name]['bias'][j] = kap * p[name]['bias'][k]
    s[name]['mean'][j] = kap * s[name]['mean'][k]
  p['conv_1_0']['kernel'][..., k] *= 0.5
  p['conv_1_0']['kernel'][..., j] = mu_ * p['conv_1_0']['kernel'][..., k]
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), v)


@pytest.mark.parametrize('method', ['nm', 'lbyl'])
def test_a_scaled_copy_is_removed_exactly(method):
  """NM's and LBYL's premise on the composite channel: c_j = kappa c_k when both stages are
  positive multiples and ReLU6 does not clip; pruning j then leaves the logits unchanged."""
  spec, variables, x = _small()
  blk, n = 'features_4', SMALL['expand'][2]
  variables = _with_duplicate(variables, blk, j=3, k=7, lam_=0.5, mu_=0.8)
  options = dict(ratio=0.0, ratio_overrides=((f'{blk}/conv_0_0', 0.5 / n),),
                 bias_correction='off')
  extra = dict(nm_t=0.5) if method == 'nm' else dict(lambda1=1e-12, lambda2=1e-12,
                                                     dtype='float64')
  _, problems = _problems(spec, variables, method=method, **options, **extra)
  (p,) = [p for p in problems if p.prune.size]
  assert list(p.prune) == [3]
  res = pipeline.compress(spec, variables, method=method, **options, **extra)
  ref = np.asarray(_apply(spec, None)(variables, x), np.float64)
  out = np.asarray(_apply(spec, res.widths)(res.variables, x), np.float64)
  np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
  pruned = pipeline.compress(spec, variables, method='prune', **options)
  plain = np.asarray(_apply(spec, pruned.widths)(pruned.variables, x), np.float64)
  assert np.abs(plain - ref).max() > 100 * 2e-5 * np.abs(ref).max()


def test_unsupported_options_are_refused_by_name():
  spec, variables, _ = _small()
  for kw, word in ((dict(method='lbyl', bias_correction='auto'), 'auto'),
                   (dict(method='lbyl', lbyl_mode='reference_code'), 'reference_code'),
                   (dict(method='nm', nm_mode='reference_code'), 'reference_code')):
    with pytest.raises(ValueError, match=word):
      pipeline.compress(spec, variables, ratio=0.2, **kw)


def test_guard_scales_rows_into_unit_interval():
  spec, variables, _ = _small()
  plan, problems = _problems(spec, variables, method='lbyl', ratio=0.3, dtype='float64')
  opts = plan.method.depthwise_options(spec)
  plain = mc.deliver(spec, variables, problems, 'lbyl', opts, bias_correction='on', guard='off')
  guarded = mc.deliver(spec, variables, problems, 'lbyl', opts, bias_correction='on',
                       guard='moments')
  for a, b in zip(plain, guarded):
    ratio = np.divide(b.S_P, a.S_P, out=np.ones_like(a.S_P), where=np.abs(a.S_P) > 1e-12)
    per_row = ratio.max(axis=1) if ratio.size else ratio
    assert np.all(per_row <= 1 + 1e-9) and np.all(per_row >= -1e-9)
    assert 0.0 <= b.diag['guard_t_mean'] <= 1.0
  # The pipeline's --guard moments gives the same rows.
  res = pipeline.compress(spec, variables, method='lbyl', ratio=0.3, dtype='float64',
                          guard='moments')
  for p, b in zip(problems, guarded):
    np.testing.assert_allclose(res.deliveries[p.unit.name][1], b.S_P, rtol=1e-12, atol=1e-15)


def test_input_moments_follow_the_bottleneck_chain():
  spec, variables, _ = _small()
  mom = moments_lib.propagate(spec, variables)
  p = variables['params']
  first = p['features_1']['conv_2']
  m2 = mom['features_2/conv_0_0']
  np.testing.assert_allclose(m2.mean, first['bias'])
  np.testing.assert_allclose(m2.var, np.asarray(first['scale'], np.float64) ** 2)
  # block 3 is residual (stride 1, 6 -> 6): block 4's input adds block 3's output to its input.
  b2, b3 = p['features_2']['conv_3'], p['features_3']['conv_3']
  m4 = mom['features_4/conv_0_0']
  np.testing.assert_allclose(m4.mean, np.asarray(b3['bias'], np.float64) + b2['bias'])
  np.testing.assert_allclose(m4.var, np.asarray(b3['scale'], np.float64) ** 2
                             + np.asarray(b2['scale'], np.float64) ** 2)


class _DepthwiseNoSecondAct(nn.Module):
  """conv -> BN -> ReLU6 -> depthwise -> BN -> (no activation) -> conv: not the inverted-residual
  path the derivation covers (a linear BN2 output), so no 'depthwise' compensation."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu6(nn.BatchNorm(use_running_average=True, name='bn1')(
        nn.Conv(12, (1, 1), use_bias=False, name='expand')(x)))
    x = nn.Conv(12, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=12, use_bias=False,
                name='dw')(x)
    x = nn.BatchNorm(use_running_average=True, name='bn2')(x)
    x = nn.Conv(5, (1, 1), name='project')(x)
    return jnp.mean(x, axis=(1, 2))


def test_other_depthwise_paths_get_plain_pruning_not_the_relu_algebra():
  model = _DepthwiseNoSecondAct()
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  d = lbyl_jax.discover(model, variables, (1, 8, 8, 3))
  (u,) = [u for u in d.units if u.name == 'expand']
  assert u.compensation == 'prune_only' and 'depthwise' in u.reason
  res = lbyl_jax.compress(model, variables, (1, 8, 8, 3), method='lbyl', ratio=0.25,
                          bias_correction='off')
  _, S, _ = res.deliveries['expand']
  assert S.shape[0] == 3 and not np.any(S)


def test_the_preset_units_are_depthwise_and_the_report_names_the_approximation():
  spec, variables, _ = _small()
  assert all(u.compensation == 'depthwise' and u.through_activation == 'relu6'
             for u in spec.units)
  res = pipeline.compress(spec, variables, method='prune', ratio=0.2, bias_correction='off')
  approx = res.report['approximations']
  assert [a['unit'] for a in approx] == [u.name for u in spec.units]
  assert all('depthwise conv' in a['reason'] for a in approx)
