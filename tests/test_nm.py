"""Neuron Merging (docs/neuron_merging.md; properties T2, T5) against float64 loop implementations."""

from __future__ import annotations


import numpy as np
import pytest

from lbyl_jax.core import units as units_lib
from lbyl_jax.core.bn import BN_EPS
from lbyl_jax.pruning import methods
from lbyl_jax.pruning import surgery
from lbyl_jax.pruning import terms
from lbyl_jax.pruning.methods import nm
from lbyl_jax.pruning.problem import UnitProblem
from conftest import one_unit_network

EPS = BN_EPS


def cos_and_norms(W, j, k):
  nj, nk = np.linalg.norm(W[j]), np.linalg.norm(W[k])
  return W[j] @ W[k] / (nj * nk), nj, nk


def mlp_loop(W, keep, prune, t):
  S = np.zeros((len(prune), len(keep)))
  for r, j in enumerate(prune):
    cs = [cos_and_norms(W, j, k)[0] for k in keep]
    c = int(np.argmax(cs))
    if cs[c] >= t:
      S[r, c] = np.linalg.norm(W[j]) / np.linalg.norm(W[keep[c]])
  return S


def bn_loop(W, bn, keep, prune, t, lam, mode):
  """4.3 written out per pruned channel (decompose.py's loop structure)."""
  g, be, mu, var = bn['gamma'], bn['beta'], bn['mu'], bn['var']
  S = np.zeros((len(prune), len(keep)))
  for r, j in enumerate(prune):
    cds, bds, scales = [], [], []
    for k in keep:
      cos, nj, nk = cos_and_norms(W, j, k)
      s = nj / nk
      if mode == 'reference_code':
        sc = s * (g[k] / g[j]) * (var[j] / var[k])
        bd = abs((g[k] / var[k]) * (s * (mu[j] - var[j] * be[j] / g[j]) - mu[k]) + be[k]) / sc
      else:
        sig = np.sqrt(var + EPS)
        a_j, a_k = g[j] / sig[j], g[k] / sig[k]
        b_j, b_k = be[j] - a_j * mu[j], be[k] - a_k * mu[k]
        sc = s * a_j / a_k
        bd = abs(b_j - sc * b_k)
      cds.append(1 - cos)
      bds.append(bd)
      scales.append(sc)
    bds = np.array(bds)
    bds = (bds - bds.min()) / (bds.max() - bds.min())
    score = lam * np.array(cds) + (1 - lam) * bds
    c = int(np.argmin(score))
    if 1 - cds[c] >= t:
      S[r, c] = scales[c]
  return S


def random_bn(rng, n):
  gamma, beta = rng.uniform(0.5, 1.5, n), rng.normal(0, 0.3, n)
  mu, var = rng.normal(0, 0.3, n), rng.uniform(0.5, 1.5, n)
  sig = np.sqrt(var + EPS)
  alpha = gamma / sig
  return dict(gamma=gamma, beta=beta, mu=mu, var=var, sigma=sig, alpha=alpha, b=beta - alpha * mu)


def random_split(rng, n, m):
  keep = np.sort(rng.choice(n, m, replace=False))
  return keep, np.setdiff1d(np.arange(n), keep)


@pytest.mark.parametrize('t', [0.0, 0.2, 0.45])
def test_mlp_merge_matches_loop(t):
  rng = np.random.default_rng(0)
  W = rng.normal(size=(40, 12)) + 0.2  # shared offset: some pairs pass the threshold
  keep, prune = random_split(rng, 40, 22)
  S = nm.merge_mlp(W, keep, prune, t=t)
  np.testing.assert_allclose(S, mlp_loop(W, keep, prune, t), rtol=1e-12, atol=0)
  assert np.all(np.count_nonzero(S, axis=1) <= 1)
  if t == 0.45:
    assert 0 < np.count_nonzero(S) < len(prune)  # the threshold matters in this case


@pytest.mark.parametrize('mode', ['exact', 'reference_code'])
@pytest.mark.parametrize('t,lam', [(0.1, 0.85), (0.0, 0.5), (0.3, 1.0)])
def test_bn_merge_matches_loop(mode, t, lam):
  rng = np.random.default_rng(1)
  n = 24
  W = rng.normal(size=(n, 18)) + 0.15
  bn = random_bn(rng, n)
  keep, prune = random_split(rng, n, 15)
  S = nm.merge_bn(W, bn, keep, prune, t=t, lam=lam, mode=mode)
  np.testing.assert_allclose(S, bn_loop(W, bn, keep, prune, t, lam, mode), rtol=1e-12, atol=0)
  assert np.all(np.count_nonzero(S, axis=1) <= 1)


def test_modes_differ_by_scale_direction():
  rng = np.random.default_rng(2)
  n = 10
  W = rng.normal(size=(n, 8))
  bn = random_bn(rng, n)
  keep, prune = np.arange(6), np.arange(6, 10)
  a = nm.merge_bn(W, bn, keep, prune, t=-1.0, lam=1.0, mode='exact')
  b = nm.merge_bn(W, bn, keep, prune, t=-1.0, lam=1.0, mode='reference_code')
  # lam = 1: both pick the most similar filter; only the scale differs (A2).
  np.testing.assert_array_equal(a != 0, b != 0)
  assert not np.allclose(a, b)


# --------------------------------------------------------------------------------------------
# T2: one pruned channel proportional to a kept one, through extraction, surgery and a forward.


def proportional_unit(s=1.7, j=5, k=2, n=6, d_in=10, out=5, seed=3):
  rng = np.random.default_rng(seed)
  W = rng.normal(size=(n, d_in))
  W[j] = s * W[k]
  gamma, beta = rng.uniform(0.5, 1.5, n), rng.normal(0, 0.3, n)
  mu, var = rng.normal(0, 0.3, n), rng.uniform(0.5, 1.5, n)
  alpha = gamma / np.sqrt(var + EPS)
  b = beta - alpha * mu
  scale = s * alpha[j] / alpha[k]
  beta[j] = scale * b[k] + alpha[j] * mu[j]  # so that b_j = scale * b_k
  spec, variables, unit = one_unit_network(W, gamma, beta, mu, var, rng.normal(size=(n, out)),
                                         rng.normal(size=out))
  return spec, variables, unit, scale


def forward(v, x):
  p, s = v['params'], v['batch_stats']
  y = x @ p['l1']['kernel']
  y = (y - s['bn1']['mean']) / np.sqrt(s['bn1']['var'] + EPS) * p['bn1']['scale'] + p['bn1']['bias']
  return np.maximum(y, 0) @ p['l2']['kernel'] + p['l2']['bias']


def test_t2_exact_scale_reproduces_relu_output():
  spec, variables, unit, scale = proportional_unit()
  keep, prune = np.arange(5), np.array([5])
  problem = UnitProblem(unit, terms.filters(variables, unit), terms.bn_terms(variables, unit),
                        keep, prune)
  x = np.random.default_rng(4).normal(size=(256, 10))
  ref = forward(variables, x)
  sol = nm.solve_problems([problem], t=0.1, lam=0.85, mode='exact')[0]
  assert sol.diag['merged'] == 1
  np.testing.assert_allclose(sol.S_P, [[0, 0, scale, 0, 0]], rtol=1e-12)
  _, new = surgery.apply(spec, variables, {'l1': (keep, sol.S_P, None)})
  np.testing.assert_allclose(forward(new, x), ref, rtol=0, atol=1e-10 * np.abs(ref).max())
  # The code's inverted scale (A2) leaves a large error unless alpha_j == alpha_k.
  code = nm.solve_problems([problem], t=0.1, lam=1.0, mode='reference_code')[0]
  assert code.S_P[0, 2] != 0
  _, new_code = surgery.apply(spec, variables, {'l1': (keep, code.S_P, None)})
  assert np.abs(forward(new_code, x) - ref).max() > 1e-2


# --------------------------------------------------------------------------------------------
# T5: a threshold nothing passes gives plain pruning.


def test_t5_threshold_one_is_pruning():
  rng = np.random.default_rng(5)
  n = 20
  W = rng.normal(size=(n, 9))
  keep, prune = random_split(rng, n, 12)
  bn = random_bn(rng, n)
  for with_bn in (True, False):
    unit = units_lib.Unit.of('u', 'u', 'bn' if with_bn else None, 'v', 'dense')
    p = UnitProblem(unit, W, bn, keep, prune)
    got = nm.solve_problems([p], t=1.0, lam=0.85)[0]
    want = methods.get('prune')().deliver(None, None, [p], methods.Context())[0]
    np.testing.assert_array_equal(got.S_P, want.S_P)
    assert got.diag['merged'] == 0 and got.S_P.shape == (8, 12)


def test_unusable_kept_channels_are_never_chosen():
  rng = np.random.default_rng(6)
  n = 8
  W = rng.normal(size=(n, 5))
  W[1] = 0.0  # zero filter
  bn = random_bn(rng, n)
  bn['alpha'][3] = 0.0  # alpha 0: exact scale would divide by zero
  keep, prune = np.array([0, 1, 2, 3]), np.array([4, 5, 6, 7])
  S = nm.merge_bn(W, bn, keep, prune, t=-1.0, lam=0.5, mode='exact')
  assert np.all(np.isfinite(S)) and np.all(S[:, [1, 3]] == 0)
  assert np.all(np.count_nonzero(S, axis=1) == 1)
  S = nm.merge_mlp(W, keep, prune, t=None)
  assert np.all(np.isfinite(S)) and np.all(S[:, 1] == 0)


def test_bad_mode():
  rng = np.random.default_rng(7)
  with pytest.raises(ValueError, match="nm_mode must be.*'fancy'"):
    nm.merge_bn(rng.normal(size=(4, 3)), random_bn(rng, 4), np.arange(2), np.arange(2, 4), t=0.1,
                lam=0.5, mode='fancy')
