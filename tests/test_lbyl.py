"""LBYL coefficients (docs/lbyl.md; properties T1, T3, T6, T10 of docs/properties.md) and the
batched solvers.

Every expected value is an independent NumPy computation (float64 unless the test is about the
reference code's float32 arithmetic).
"""

from __future__ import annotations


import numpy as np
import pytest
import scipy.linalg

from lbyl_jax.core import trees
from lbyl_jax.core import units as units_lib
from lbyl_jax.core.bn import BN_EPS
from lbyl_jax.models import archs
from lbyl_jax.pruning import criteria
from lbyl_jax.pruning import solvers
from lbyl_jax.pruning import surgery
from lbyl_jax.pruning import terms
from lbyl_jax.pruning.methods import lbyl
from lbyl_jax.pruning.problem import UnitProblem
from conftest import one_unit_network

EPS = BN_EPS


def random_bn(rng, n, *, sigma='std'):
  gamma = rng.uniform(0.5, 1.5, n)
  beta = rng.normal(0.0, 0.3, n)
  mu = rng.normal(0.0, 0.3, n)
  var = rng.uniform(0.5, 1.5, n)
  sg = np.sqrt(var + EPS) if sigma == 'std' else var
  alpha = gamma / sg
  return dict(gamma=gamma, beta=beta, mu=mu, var=var, sigma=sg, alpha=alpha, b=beta - alpha * mu)


def make_problem(W, bn, keep, *, with_bn=True, name='u'):
  keep = np.sort(np.asarray(keep))
  prune = np.setdiff1d(np.arange(W.shape[0]), keep)
  unit = units_lib.Unit.of(name, name, 'bn' if with_bn else None, 'next', 'dense')
  return UnitProblem(unit, np.asarray(W, np.float64), bn, keep, prune)


def random_problem(seed, n=12, m=8, d=20, *, sigma='std'):
  rng = np.random.default_rng(seed)
  keep = np.sort(rng.choice(n, m, replace=False))
  return make_problem(rng.normal(size=(n, d)), random_bn(rng, n, sigma=sigma), keep)


def solve1(problem, **kw):
  kw.setdefault('dtype', 'float64')
  kw.setdefault('mode', 'consistent')
  return lbyl.solve_problems([problem], **kw)[0]


# --------------------------------------------------------------------------------------------
# T1: exact linear reconstruction, through the real extraction and surgery code.


def toy_dense_unit(seed, n=12, m=8, d_in=20, out=7, exact=True):
  """A Dense(d_in->n) -> BN -> act -> Dense(n->out) network whose pruned rows (if ``exact``) are
  exact combinations of the kept ones: alpha_j W_j = sum_k C_jk alpha_k W_k, b_j = sum_k C_jk b_k."""
  rng = np.random.default_rng(seed)
  keep = np.sort(rng.choice(n, m, replace=False))
  prune = np.setdiff1d(np.arange(n), keep)
  W = rng.normal(size=(n, d_in))
  gamma, beta = rng.uniform(0.5, 1.5, n), rng.normal(0, 0.3, n)
  mu, var = rng.normal(0, 0.3, n), rng.uniform(0.5, 1.5, n)
  alpha = gamma / np.sqrt(var + EPS)
  C = rng.normal(size=(prune.size, m))
  if exact:
    W[prune] = (C @ (alpha[keep, None] * W[keep])) / alpha[prune, None]
    b_keep = beta[keep] - alpha[keep] * mu[keep]
    beta[prune] = C @ b_keep + alpha[prune] * mu[prune]
  spec, variables, unit = one_unit_network(W, gamma, beta, mu, var, rng.normal(size=(n, out)),
                                         rng.normal(size=out))
  return spec, variables, unit, keep, C


def toy_forward(v, x, act):
  p, s = v['params'], v['batch_stats']
  y = x @ p['l1']['kernel']
  y = (y - s['bn1']['mean']) / np.sqrt(s['bn1']['var'] + EPS) * p['bn1']['scale'] + p['bn1']['bias']
  return act(y) @ p['l2']['kernel'] + p['l2']['bias']


def test_t1_exact_reconstruction_coefficients_and_output():
  spec, variables, unit, keep, C = toy_dense_unit(0)
  problem = make_problem(terms.filters(variables, unit), terms.bn_terms(variables, unit), keep)
  sol = solve1(problem, lam1=0.0, lam2=0.0)
  np.testing.assert_allclose(sol.S_P, C, rtol=0, atol=1e-10)
  _, new = surgery.apply(spec, variables, {'l1': (keep, sol.S_P, None)})
  x = np.random.default_rng(1).normal(size=(64, 20))
  ident = lambda y: y
  ref = toy_forward(variables, x, ident)
  np.testing.assert_allclose(toy_forward(new, x, ident), ref, rtol=0, atol=1e-10 * np.abs(ref).max())
  # With ReLU the activation error remains: LBYL cannot remove it (5.2).
  relu = lambda y: np.maximum(y, 0)
  assert np.abs(toy_forward(new, x, relu) - toy_forward(variables, x, relu)).max() > 1e-3


def test_t1_float32_solver_is_close():
  spec, variables, unit, keep, C = toy_dense_unit(2)
  del spec
  problem = make_problem(terms.filters(variables, unit), terms.bn_terms(variables, unit), keep)
  sol = solve1(problem, lam1=0.0, lam2=0.0, dtype='float32')
  assert sol.diag['solver'] == 'cholesky' and sol.diag['jitter'] > 0
  np.testing.assert_allclose(sol.S_P, C, atol=1e-3 * np.abs(C).max())


# --------------------------------------------------------------------------------------------
# T3: reductions of the consistent form.


def test_t3_lam1_zero_is_ridge_on_bn_scaled_filters():
  p = random_problem(3)
  a = p.bn['alpha']
  F, FP = a[p.keep, None] * p.W[p.keep], a[p.prune, None] * p.W[p.prune]
  lam2 = 0.37
  expected = np.linalg.solve(F @ F.T + lam2 * np.eye(p.m), F @ FP.T).T
  np.testing.assert_allclose(solve1(p, lam1=0.0, lam2=lam2).S_P, expected, rtol=1e-10, atol=1e-12)


def test_t3_no_regularization_is_least_squares():
  p = random_problem(4)
  a = p.bn['alpha']
  F, FP = a[p.keep, None] * p.W[p.keep], a[p.prune, None] * p.W[p.prune]
  expected = np.linalg.lstsq(F.T, FP.T, rcond=None)[0].T
  np.testing.assert_allclose(solve1(p, lam1=0.0, lam2=0.0).S_P, expected, rtol=1e-9, atol=1e-11)


def test_t3_large_lam2_is_pruning():
  p = random_problem(5)
  S = solve1(p, lam1=1e-3, lam2=1e12).S_P
  assert np.abs(S).max() < 1e-9


def test_t3_large_lam1_removes_bn_error():
  p = random_problem(6)
  S = solve1(p, lam1=1e9, lam2=1e-3).S_P
  b = p.bn['b']
  np.testing.assert_allclose(S @ b[p.keep], b[p.prune], rtol=1e-6, atol=1e-8)
  S0 = solve1(p, lam1=0.0, lam2=1e-3).S_P
  assert np.abs(S0 @ b[p.keep] - b[p.prune]).max() > 1e-3  # the BN term did something


def test_t3_unit_bn_is_plain_least_squares_and_full_lam1_formula():
  rng = np.random.default_rng(7)
  n, d = 10, 30
  W = rng.normal(size=(n, d))
  one, zero = np.ones(n), np.zeros(n)
  bn = dict(gamma=one, beta=zero, mu=zero, var=one, sigma=one, alpha=one, b=zero)
  p = make_problem(W, bn, [0, 2, 3, 5, 7, 8])
  expected = np.linalg.lstsq(W[p.keep].T, W[p.prune].T, rcond=None)[0].T
  np.testing.assert_allclose(solve1(p, lam1=0.5, lam2=0.0).S_P, expected, rtol=1e-9, atol=1e-11)
  # General lam1: A = F F^T + lam1 b b^T + lam2 I, R = F F_P^T + lam1 b_K b_P^T.
  q = random_problem(8)
  a, b = q.bn['alpha'], q.bn['b']
  F, FP = a[q.keep, None] * q.W[q.keep], a[q.prune, None] * q.W[q.prune]
  lam1, lam2 = 0.3, 0.05
  A = F @ F.T + lam1 * np.outer(b[q.keep], b[q.keep]) + lam2 * np.eye(q.m)
  R = F @ FP.T + lam1 * np.outer(b[q.keep], b[q.prune])
  np.testing.assert_allclose(solve1(q, lam1=lam1, lam2=lam2).S_P, np.linalg.solve(A, R).T,
                             rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# T10: one Cholesky with many right-hand sides == per-row solves.


def test_t10_batched_equals_per_row():
  p = random_problem(9, n=40, m=25, d=60)
  lam1, lam2 = 1e-2, 1e-1
  sol = solve1(p, lam1=lam1, lam2=lam2)
  a, b = p.bn['alpha'], p.bn['b']
  F = a[p.keep, None] * p.W[p.keep]
  A = F @ F.T + lam1 * np.outer(b[p.keep], b[p.keep]) + lam2 * np.eye(p.m)
  for row, j in enumerate(p.prune):
    r = F @ (a[j] * p.W[j]) + lam1 * b[j] * b[p.keep]
    np.testing.assert_allclose(sol.S_P[row], np.linalg.solve(A, r), rtol=1e-10, atol=1e-12)
  assert sol.diag['rel_residual'] < 1e-12
  np.testing.assert_allclose(sol.diag['cond'], np.linalg.cond(A), rtol=1e-6)
  assert sol.diag['coef_max_abs'] == pytest.approx(np.abs(sol.S_P).max())
  assert sol.diag['coef_mean_abs'] == pytest.approx(np.abs(sol.S_P).mean())


# --------------------------------------------------------------------------------------------
# T6: reference-code form against an independent float32 NumPy implementation of 5.4.


def reference_numpy32(W, bn, keep, prune, lam1, lam2):
  f = np.float32
  W = W.astype(f)
  g, be, mu, sg = (bn[k].astype(f) for k in ('gamma', 'beta', 'mu', 'var'))
  X = W[keep].T  # D x m
  a = mu[keep] - sg[keep] * be[keep] / g[keep]
  rows = []
  for j in prune:
    Kj = (g[j] / g[keep]) * (sg[keep] / sg[j])
    A = X.T @ X + f(lam1) * (g[j] / sg[j]) ** 2 * (a @ a) * np.eye(len(keep), dtype=f)
    A = A + f(lam2) * np.diag(Kj**2)
    r = X.T @ W[j] + f(lam1) * (g[j] / sg[j]) * (g[j] * mu[j] / sg[j] - be[j]) * a
    rows.append(scipy.linalg.solve(A, r, assume_a='pos'))
  return np.stack(rows)


@pytest.mark.parametrize('lam1,lam2', [(1e-3, 1e-2), (0.5, 2.0), (0.0, 1e-4)])
def test_t6_reference_code_parity(lam1, lam2):
  p = random_problem(10, n=16, m=11, d=40, sigma='variance')
  expected = reference_numpy32(p.W, p.bn, p.keep, p.prune, lam1, lam2)
  assert expected.dtype == np.float32
  got = solve1(p, lam1=lam1, lam2=lam2, mode='reference_code', dtype='float32').S_P
  assert np.linalg.norm(got - expected) <= 1e-4 * np.linalg.norm(expected)
  got64 = solve1(p, lam1=lam1, lam2=lam2, mode='reference_code', dtype='float64').S_P
  assert np.linalg.norm(got64 - expected) <= 1e-4 * np.linalg.norm(expected)


def test_t6_modes_coincide_for_equal_alpha():
  rng = np.random.default_rng(11)
  n, d = 14, 30
  g, v = 1.3, 0.8  # same gamma and variance everywhere: K = 1, c = s
  bn = dict(gamma=np.full(n, g), beta=rng.normal(0, 0.3, n), mu=rng.normal(0, 0.3, n),
            var=np.full(n, v), sigma=np.full(n, v), alpha=np.full(n, g / v))
  bn['b'] = bn['beta'] - bn['alpha'] * bn['mu']
  p = make_problem(rng.normal(size=(n, d)), bn, np.arange(0, n, 2)[:5].tolist() + [11, 13])
  lam2 = 0.02
  code = solve1(p, lam1=0.0, lam2=lam2, mode='reference_code').S_P
  cons = solve1(p, lam1=0.0, lam2=lam2 * (g / v) ** 2, mode='consistent').S_P
  np.testing.assert_allclose(cons, code, rtol=1e-10, atol=1e-12)


def test_reference_code_needs_nonzero_gamma():
  p = random_problem(12, sigma='variance')
  p.bn['gamma'][p.keep[0]] = 0.0
  with pytest.raises(ValueError, match="reference_code.*gamma"):
    solve1(p, lam1=1e-3, lam2=1e-3, mode='reference_code')


# --------------------------------------------------------------------------------------------
# 5.6: MLP units (no BN).


def mlp_problem(seed, n=30, m=18, d=41):
  rng = np.random.default_rng(seed)
  one, zero = np.ones(n), np.zeros(n)
  bn = dict(gamma=one, beta=zero, mu=zero, var=one, sigma=one, alpha=one, b=zero)
  keep = np.sort(rng.choice(n, m, replace=False))
  return make_problem(rng.normal(size=(n, d)) + 0.3, bn, keep, with_bn=False)


def test_mlp_consistent_is_ridge_and_ignores_lam1():
  p = mlp_problem(13)
  lam2 = 0.3
  X = p.W[p.keep]
  expected = np.linalg.solve(X @ X.T + lam2 * np.eye(p.m), X @ p.W[p.prune].T).T
  for lam1 in (0.0, 5.0):
    np.testing.assert_allclose(solve1(p, lam1=lam1, lam2=lam2).S_P, expected, rtol=1e-10, atol=1e-12)


def test_mlp_reference_is_ridge_with_intercept():
  """sklearn Ridge(alpha=lam, fit_intercept=True) on X = W_K^T (D samples), y = W_j, coef only."""
  p = mlp_problem(14)
  lam2 = 0.6
  X = p.W[p.keep].T
  Xc = X - X.mean(axis=0)
  rows = []
  for j in p.prune:
    y = p.W[j] - p.W[j].mean()
    rows.append(np.linalg.solve(Xc.T @ Xc + lam2 * np.eye(p.m), Xc.T @ y))
  got = solve1(p, lam1=0.0, lam2=lam2, mode='reference_code').S_P
  np.testing.assert_allclose(got, np.stack(rows), rtol=1e-9, atol=1e-11)


# --------------------------------------------------------------------------------------------
# Solver robustness and compile bookkeeping.


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
def test_singular_system_gives_finite_min_norm_coefficients(dtype):
  # m > D with lam = 0: F F^T is singular (the VGG conv1_1 situation, 5.5).
  p = random_problem(15, n=20, m=12, d=5)
  sol = solve1(p, lam1=0.0, lam2=0.0, dtype=dtype)
  assert np.all(np.isfinite(sol.S_P))
  a = p.bn['alpha']
  F, FP = a[p.keep, None] * p.W[p.keep], a[p.prune, None] * p.W[p.prune]
  # Either way the filter-space residual is (numerically) the least-squares one: exact here.
  assert np.linalg.norm(sol.S_P @ F - FP) <= (1e-3 if dtype == 'float32' else 1e-8) * np.linalg.norm(FP)
  if dtype == 'float64':
    assert sol.diag['solver'] == 'eigh_pinv_fallback'
    np.testing.assert_allclose(sol.S_P, (np.linalg.pinv(F.T) @ FP.T).T, rtol=1e-6, atol=1e-8)


def test_non_finite_system_raises():
  p = random_problem(16)
  p.W[p.keep[0], 0] = np.nan
  with pytest.raises(ValueError, match='u: .*non-finite'):
    solve1(p, lam1=0.0, lam2=1e-3)


def test_empty_prune_set_compiles_nothing():
  p = random_problem(17, n=6, m=6)
  before = solvers.trace_count()
  sol = solve1(p, lam1=1e-3, lam2=1e-3)
  assert sol.S_P.shape == (0, 6) and solvers.trace_count() == before


def resnet101_problems(ratio=0.3):
  spec = archs.get('resnet101')
  abstract = spec.abstract_variables()
  rng = np.random.default_rng(0)
  out = []
  for u in spec.units:
    shape = trees.get_path(abstract['params'], u.producer)['kernel'].shape
    n, d = shape[-1], int(np.prod(shape[:-1]))
    W = rng.normal(size=(n, d)) / np.sqrt(d)
    keep, prune = criteria.select(W, criteria.n_keep(n, ratio), 'l2')
    out.append(UnitProblem(u, W, random_bn(rng, n), keep, prune))
  return out


def test_compiles_once_per_shape_bucket_resnet101():
  problems = resnet101_problems()
  systems = [lbyl.build_system(p, lam1=1e-5, lam2=1e-3, mode='consistent') for p in problems]
  n_buckets = len({solvers.bucket_key(s) for s in systems})
  assert n_buckets == 4  # one per stage: every conv1 / conv2 of a stage shares (m, p)
  solvers.clear_cache()
  t0 = solvers.trace_count()
  sols = lbyl.solve_problems(problems, lam1=1e-5, lam2=1e-3, with_cond=False)
  assert solvers.trace_count() - t0 == n_buckets
  assert len(sols) == len(problems) == 66
  assert all(np.all(np.isfinite(s.S_P)) for s in sols)
  assert sum(s.diag['compile_seconds'] for s in sols) > 0
  again = lbyl.solve_problems(problems, lam1=1e-4, lam2=1e-2, with_cond=False)
  assert solvers.trace_count() - t0 == n_buckets  # new lambdas, same executables
  assert sum(s.diag['compile_seconds'] for s in again) == 0
  # Batching across layers does not change a layer's answer.
  single = lbyl.solve_problems(problems[-1:], lam1=1e-4, lam2=1e-2, with_cond=False)[0]
  np.testing.assert_allclose(single.S_P, again[-1].S_P, rtol=1e-5, atol=1e-7)


def test_precompile_is_used_by_the_solve_and_changes_nothing():
  problems = resnet101_problems()[:12]
  solvers.clear_cache()
  plain = lbyl.solve_problems(problems, lam1=1e-5, lam2=1e-3, with_cond=False)
  solvers.clear_cache()
  t0 = solvers.trace_count()
  dims = lbyl.LBYL().solver_dims([p.unit for p in problems],
                                 [(p.m, int(p.prune.size), int(np.shape(p.W)[1])) for p in problems])
  n_buckets = len({(k, m, p) for k, m, p, _ in dims})
  assert solvers.precompile(dims) == n_buckets
  assert solvers.precompile(dims) == 0  # pending keys are not compiled twice
  got = lbyl.solve_problems(problems, lam1=1e-5, lam2=1e-3, with_cond=False)
  assert solvers.trace_count() - t0 == n_buckets  # the solve compiled nothing more
  assert not solvers._PENDING  # pylint: disable=protected-access
  assert all(s.diag['precompile_seconds'] > 0 for s in got)
  for a, b in zip(plain, got):
    np.testing.assert_array_equal(a.S_P, b.S_P)
  # A bucket that never comes costs a compile and nothing else; a wrong prediction is compiled.
  assert solvers.precompile([('shared', 7, 3, 11)]) == 1
  lbyl.solve_problems(problems[:1], lam1=1e-5, lam2=1e-3, with_cond=False)
  with pytest.raises(ValueError, match='dtype'):
    solvers.precompile(dims, dtype='float16')
  solvers.clear_cache()
  assert not solvers._PENDING  # pylint: disable=protected-access
