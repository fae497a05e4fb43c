"""Rectified-Gaussian closed forms and data-free moment propagation (lbyl_jax/moments.py).

References: scipy quadrature and Owen's T (exact, float64), seeded Monte Carlo (tolerances from
the sample standard errors), and Gaussian inputs pushed through the real Flax models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate
from scipy.special import owens_t
from scipy.stats import norm

from lbyl_jax.core import trees
from lbyl_jax.experimental import montecarlo
from lbyl_jax.models import archs
from lbyl_jax.pruning import moments as M
from lbyl_jax.pruning import terms


def _x64(fn, *args, **kwargs):
  with jax.enable_x64(True):
    out = jax.jit(fn, static_argnames=tuple(kwargs))(*(jnp.asarray(a, jnp.float64) for a in args),
                                                      **kwargs)
    return jax.tree_util.tree_map(np.asarray, out)


def _bvn_owen(h, k, rho):
  """Phi2(h, k; rho) via Owen's T function (exact reference, h, k != 0)."""
  r = np.sqrt(1.0 - rho ** 2)
  delta = np.where(h * k > 0, 0.0, 0.5)
  return (0.5 * (norm.cdf(h) + norm.cdf(k)) - owens_t(h, (k - rho * h) / (h * r))
          - owens_t(k, (h - rho * k) / (k * r)) - delta)


def _cross_quad(m1, s1, m2, s2, rho):
  """E[ReLU(y1) ReLU(y2)] by 1-D quadrature of E[ReLU(y1) E[ReLU(y2) | y1]]."""
  r = np.sqrt(1.0 - rho ** 2)

  def f(x):
    mu, sd = m2 + s2 * rho * x, s2 * r
    inner = mu * norm.cdf(mu / sd) + sd * norm.pdf(mu / sd)
    return (m1 + s1 * x) * inner * norm.pdf(x)

  return integrate.quad(f, -m1 / s1, 14.0, epsabs=1e-14, epsrel=1e-12, limit=200)[0]


# --------------------------------------------------------------------------------------------
# Univariate.


def test_relu_moments_match_quadrature():
  m = np.array([-3.0, -1.0, -0.2, 0.0, 0.4, 2.5])
  s = np.array([0.3, 1.0, 2.0, 0.7, 1.5, 0.5])
  e1, e2 = _x64(M.relu_moments, m, s)
  for i in range(m.size):
    pdf = lambda x, i=i: norm.pdf(x, m[i], s[i])
    r1 = integrate.quad(lambda x: x * pdf(x), 0, np.inf, epsabs=1e-14)[0]
    r2 = integrate.quad(lambda x: x * x * pdf(x), 0, np.inf, epsabs=1e-14)[0]
    np.testing.assert_allclose([e1[i], e2[i]], [r1, r2], rtol=1e-9, atol=1e-13)


def test_relu_moments_monte_carlo_t9():
  # docs/properties.md T9 (1e6 samples), with the tolerance set by the sample standard error.
  rng = np.random.default_rng(0)
  for beta, gamma in [(0.1, 1.0), (-0.8, 0.6), (1.5, 2.0)]:
    y = np.maximum(rng.normal(beta, gamma, 1_000_000), 0.0)
    e1, e2 = _x64(M.relu_moments, beta, gamma)
    assert abs(e1 - y.mean()) < 5 * y.std() / 1e3
    assert abs(e2 - (y * y).mean()) < 5 * (y * y).std() / 1e3


def test_relu_moments_zero_std_is_exact_relu():
  m = np.array([-1.0, 0.0, 2.0])
  e1, e2 = _x64(M.relu_moments, m, np.zeros(3))
  np.testing.assert_array_equal(e1, [0.0, 0.0, 2.0])
  np.testing.assert_array_equal(e2, [0.0, 0.0, 4.0])
  # Negative std (a negative BN gamma) means |gamma|.
  np.testing.assert_allclose(_x64(M.relu_moments, 0.3, -1.2), _x64(M.relu_moments, 0.3, 1.2))


# --------------------------------------------------------------------------------------------
# Bivariate normal CDF and cross moments.


def test_bvn_cdf_matches_owens_t_including_extreme_correlations():
  rng = np.random.default_rng(1)
  n = 4000
  a, b = rng.normal(0, 2, n), rng.normal(0, 2, n)
  near = np.sign(rng.uniform(-1, 1, n // 2)) * (1 - 10 ** rng.uniform(-12, -0.5, n // 2))
  rho = np.concatenate([rng.uniform(-1, 1, n // 2), near])
  got = _x64(M.bvn_cdf, a, b, rho)
  np.testing.assert_allclose(got, _bvn_owen(a, b, rho), rtol=0, atol=1e-13)
  # Limits: rho = 0 factorizes; rho = +-1 are the degenerate distributions.
  np.testing.assert_allclose(_x64(M.bvn_cdf, a, b, 0 * a), norm.cdf(a) * norm.cdf(b), atol=1e-15)
  np.testing.assert_allclose(_x64(M.bvn_cdf, a, b, 1 + 0 * a), norm.cdf(np.minimum(a, b)), atol=1e-15)
  np.testing.assert_allclose(_x64(M.bvn_cdf, a, b, -1 + 0 * a),
                             np.maximum(norm.cdf(a) + norm.cdf(b) - 1, 0), atol=1e-15)


def test_cross_moment_matches_quadrature():
  rng = np.random.default_rng(2)
  for _ in range(25):
    m1, m2 = rng.normal(0, 1.5, 2)
    s1, s2 = rng.uniform(0.1, 2.0, 2)
    rho = rng.uniform(-0.999, 0.999)
    got = _x64(M.relu_cross_moment, m1, s1, m2, s2, rho)
    ref = _cross_quad(m1, s1, m2, s2, rho)
    assert abs(got - ref) <= 1e-10 * max(1.0, abs(ref)), (m1, s1, m2, s2, rho, got, ref)


@pytest.mark.parametrize('rho', [-0.99, -0.7, -0.3, 0.0, 0.4, 0.8, 0.99])
def test_cross_moment_matches_monte_carlo(rho):
  rng = np.random.default_rng(3)
  n = 400_000
  for m1, s1, m2, s2 in [(0.2, 1.0, -0.5, 0.7), (-1.0, 2.0, 1.5, 0.4), (0.0, 0.5, 0.0, 1.3)]:
    x = rng.standard_normal((n, 2))
    y1 = m1 + s1 * x[:, 0]
    y2 = m2 + s2 * (rho * x[:, 0] + np.sqrt(1 - rho ** 2) * x[:, 1])
    prod = np.maximum(y1, 0) * np.maximum(y2, 0)
    got = _x64(M.relu_cross_moment, m1, s1, m2, s2, rho)
    assert abs(got - prod.mean()) < 5 * prod.std() / np.sqrt(n) + 1e-12


def test_cross_moment_unit_correlation_limits():
  """|rho| = 1 (exactly, clipped internally) against the degenerate closed forms."""
  for h1, h2 in [(0.3, 0.3), (0.5, -0.2), (-1.0, -1.0), (2.0, 0.1), (-0.4, 1.1)]:
    c = min(h1, h2)
    plus = (h1 * h2 + 1) * norm.cdf(c) + max(h1, h2) * norm.pdf(c)  # y2 = y1 in standard units
    lo, hi = -h1, h2  # y2 = -y1: the product is positive on (-h1, h2)
    minus = 0.0
    if hi > lo:
      minus = (h1 * h2 * (norm.cdf(hi) - norm.cdf(lo)) + (h2 - h1) * (norm.pdf(lo) - norm.pdf(hi))
               - ((norm.cdf(hi) - norm.cdf(lo)) - (hi * norm.pdf(hi) - lo * norm.pdf(lo))))
    s1, s2 = 1.3, 0.6
    got_p = _x64(M.relu_cross_moment, h1 * s1, s1, h2 * s2, s2, 1.0)
    got_m = _x64(M.relu_cross_moment, h1 * s1, s1, h2 * s2, s2, -1.0)
    # |rho| is clipped to 1 - 1e-10; the cross moment is (s1 s2)-Lipschitz in rho.
    np.testing.assert_allclose(got_p, s1 * s2 * plus, rtol=0, atol=1e-10 * s1 * s2 + 1e-14)
    np.testing.assert_allclose(got_m, s1 * s2 * minus, rtol=0, atol=1e-10 * s1 * s2 + 1e-14)


def test_cross_moment_with_a_constant_variable():
  e, _ = _x64(M.relu_moments, -0.3, 0.8)
  np.testing.assert_allclose(_x64(M.relu_cross_moment, 1.7, 0.0, -0.3, 0.8, 0.5), 1.7 * e, rtol=1e-14)
  assert _x64(M.relu_cross_moment, -1.7, 0.0, -0.3, 0.8, 0.5) == 0.0
  assert _x64(M.relu_cross_moment, 2.0, 0.0, 0.5, 0.0, 0.0) == 1.0


# --------------------------------------------------------------------------------------------
# Second-moment matrices.


def _random_gaussian(rng, n, rank=None):
  A = rng.normal(size=(n, rank or 2 * n))
  cov = A @ A.T / A.shape[1]
  d = rng.uniform(0.3, 1.5, n)
  return rng.normal(0, 0.7, n), d[:, None] * cov * d[None, :]


def test_second_moments_match_monte_carlo_and_are_psd():
  rng = np.random.default_rng(4)
  mean, cov = _random_gaussian(rng, 6)
  E, Mm = _x64(M.relu_second_moments, mean, cov)
  n = 200_000
  Emc, Mmc = montecarlo.mc_relu_moments(mean, cov, n=n, seed=5)
  a = np.maximum(np.random.default_rng(5).multivariate_normal(mean, cov, size=n, method='eigh'), 0)
  se = (a[:, :, None] * a[:, None, :]).std(0) / np.sqrt(n)
  np.testing.assert_array_less(np.abs(Mm - Mmc), 5 * se + 1e-12)
  np.testing.assert_array_less(np.abs(E - Emc), 5 * a.std(0) / np.sqrt(n))
  np.testing.assert_allclose(Mm, Mm.T, atol=1e-15)
  # M and the covariance M - E E^T are PSD (a low-rank Sigma gives exactly singular ones).
  for mean_, cov_ in [(mean, cov), _random_gaussian(rng, 20, rank=3)]:
    E_, M_ = _x64(M.relu_second_moments, mean_, cov_)
    for X in (M_, M_ - np.outer(E_, E_)):
      w = np.linalg.eigvalsh(X)
      assert w[0] > -1e-10 * w[-1]


def test_second_moments_diagonal_and_linear_activation():
  rng = np.random.default_rng(6)
  mean, cov = _random_gaussian(rng, 5)
  E, Mm = _x64(M.relu_second_moments, mean, cov)
  e1, e2 = _x64(M.relu_moments, mean, np.sqrt(np.diag(cov)))
  np.testing.assert_allclose(E, e1, rtol=1e-14)
  np.testing.assert_allclose(np.diag(Mm), e2, rtol=1e-14)
  El, Ml = _x64(lambda a, b: M.relu_second_moments(a, b, activation='linear'), mean, cov)
  np.testing.assert_allclose(Ml, cov + np.outer(mean, mean), rtol=1e-14)
  np.testing.assert_allclose(El, mean)
  with pytest.raises(ValueError, match='activation'):
    M.relu_second_moments(mean, cov, activation='tanh')


def test_second_moments_jit_and_float32():
  rng = np.random.default_rng(7)
  mean, cov = _random_gaussian(rng, 8)
  cov[3, :] = cov[:, 3] = 0.0  # a dead (constant) channel
  E64, M64 = _x64(M.relu_second_moments, mean, cov)
  E32, M32 = jax.jit(M.relu_second_moments)(jnp.asarray(mean, jnp.float32), jnp.asarray(cov, jnp.float32))
  assert M32.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(M32)))
  np.testing.assert_allclose(np.asarray(M32), M64, rtol=1e-4, atol=1e-5)
  assert M64[3, 3] == max(mean[3], 0.0) ** 2


# --------------------------------------------------------------------------------------------
# Max of k iid rectified Gaussians (max-pool model).


def test_max_relu_moments():
  m = np.array([0.3, -2.0, 1.0, -0.5])
  s = np.array([1.0, 0.5, 0.0, 2.0])
  np.testing.assert_allclose(_x64(lambda a, b: M.max_relu_moments(a, b, 1), m, s),
                             _x64(M.relu_moments, m, s), rtol=1e-10, atol=1e-14)
  rng = np.random.default_rng(8)
  n = 400_000
  for k in (4, 9):
    for mi, si in [(0.3, 1.2), (-1.0, 0.5)]:
      z = np.maximum(rng.normal(mi, si, (n, k)).max(1), 0.0)
      e1, e2 = _x64(lambda a, b, k=k: M.max_relu_moments(a, b, k), mi, si)
      assert abs(e1 - z.mean()) < 5 * z.std() / np.sqrt(n)
      assert abs(e2 - (z * z).mean()) < 5 * (z * z).std() / np.sqrt(n)
  e1, e2 = _x64(lambda a, b: M.max_relu_moments(a, b, 4), 1.5, 0.0)
  assert (e1, e2) == (1.5, 2.25)
  with pytest.raises(ValueError, match='window'):
    M.max_relu_moments(0.0, 1.0, 0)


# --------------------------------------------------------------------------------------------
# Propagation against Gaussian inputs pushed through the real Flax models.


@pytest.fixture(scope='module')
def resnet20():
  spec = archs.get('resnet20')
  variables = spec.init(jax.random.PRNGKey(0))
  return (spec, variables, M.propagate(spec, variables),
          montecarlo.mc_propagate(spec, variables, n=64, seed=0))


def _z(pred_mean, mc_mean, mc_var, n_eff):
  return np.abs(pred_mean - mc_mean) / np.sqrt(mc_var / n_eff)


def test_propagation_resnet_first_unit_exact(resnet20):
  """Stem output ReLU(N(beta, gamma^2)) is exact once BN's statistics match the input."""
  spec, _, pred, mc = resnet20
  u = spec.units[0].name
  mean, var = mc['inputs'][u]
  # 64 images x 30 x 30 interior positions; neighbouring positions are correlated, so use a
  # conservative effective sample size.
  assert np.max(_z(pred[u].mean, mean, var, 64 * 30 * 30 / 10)) < 5
  np.testing.assert_allclose(pred[u].var, var, rtol=0.05)


def test_propagation_resnet_deeper_units_approximate(resnet20):
  """Deeper block inputs: the model treats branch and shortcut as independent Gaussians."""
  spec, _, pred, mc = resnet20
  assert set(pred) == {u.name for u in spec.units}
  for u in spec.units[1:]:
    mean, var = mc['inputs'][u.name]
    p = pred[u.name]
    assert p.mean.shape == mean.shape
    assert np.max(np.abs(p.mean - mean) / np.sqrt(var)) < 0.35, u.name
    ratio = p.var / var
    assert 0.4 < ratio.min() and ratio.max() < 2.0, u.name
    assert 0.7 < np.median(ratio) < 1.3, u.name
    # Without calibrated running statistics BN is not N(beta, gamma^2), so the test compares
    # only against the calibrated network: the premise of the BN model.


def test_propagation_option_a_padding_and_projection_shortcut():
  spec_a = archs.get('resnet20')
  variables = spec_a.init(jax.random.PRNGKey(1))
  pred = M.propagate(spec_a, variables)
  # Option A at layer2_0: the block input has 16 channels; layer2_1's input mixes the padded
  # shortcut (mean 0, var 0 on 8 + 8 channels) with bn2: those channels are ReLU(N(beta, gamma^2)).
  beta = np.asarray(variables['params']['layer2_0']['bn2']['bias'], np.float64)
  gamma = np.asarray(variables['params']['layer2_0']['bn2']['scale'], np.float64)
  e1, e2 = _x64(M.relu_moments, beta, gamma)
  got = pred['layer2_1/conv1']
  np.testing.assert_allclose(got.mean[:8], e1[:8], rtol=1e-12)
  np.testing.assert_allclose(got.var[24:], (e2 - e1 ** 2)[24:], rtol=1e-10)
  assert not np.allclose(got.mean[8:24], e1[8:24])  # the identity part adds the block input
  spec_b = archs.get('resnet20_b')
  vb = spec_b.init(jax.random.PRNGKey(1))
  mc = montecarlo.mc_propagate(spec_b, vb, n=32, seed=1)
  pb = M.propagate(spec_b, vb)
  mean, var = mc['inputs']['layer2_1/conv1']
  assert np.max(np.abs(pb['layer2_1/conv1'].mean - mean) / np.sqrt(var)) < 0.35


def test_propagation_mlp_exact_preactivations():
  """BN-free MLP: E[y] and Cov(y) of ip2 are exact (y is linear in the exactly known ReLU moments
  of the Gaussian ip1 pre-activations)."""
  spec = archs.get('lenet_300_100')
  variables = spec.init(jax.random.PRNGKey(2))
  n = 8_000
  mc = montecarlo.mc_propagate(spec, variables, n=n, seed=2)
  pred = M.propagate(spec, variables)
  for u in spec.units:
    mean, cov = M.dense_preactivation(terms.filters(variables, u), pred[u.name])
    m_mc, v_mc = mc['preact'][u.name]
    assert np.max(_z(mean, m_mc, v_mc, n)) < 5.5, u.name
    np.testing.assert_allclose(np.diag(cov), v_mc, rtol=0.1)
    im, iv = mc['inputs'][u.name]
    assert np.max(_z(pred[u.name].mean, im, iv, n)) < 5.5
    np.testing.assert_allclose(pred[u.name].var, iv, rtol=0.12)
  assert pred['ip2'].cov.shape == (300, 300)


def test_propagation_vgg_with_max_pool():
  spec = archs.get('vgg16_bn_cifar')
  widths = (8, 8, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16)
  variables = spec.init(jax.random.PRNGKey(3), widths)
  pred = M.propagate(spec, variables)
  mc = montecarlo.mc_propagate(spec, variables, n=64, seed=3)
  assert pred['conv0'].mean.shape == (3,) and np.all(pred['conv0'].var == 1.0)
  # conv1 reads ReLU(bn0) directly: exact.
  mean, var = mc['inputs']['conv1']
  assert np.max(_z(pred['conv1'].mean, mean, var, 64 * 30 * 30 / 10)) < 5
  np.testing.assert_allclose(pred['conv1'].var, var, rtol=0.06)
  # conv2 reads the 2x2 max-pool of ReLU(bn1), modelled as the max of 4 iid copies (real
  # neighbours are correlated): approximate, within a fraction of a standard deviation.
  mean, var = mc['inputs']['conv2']
  assert np.max(np.abs(pred['conv2'].mean - mean) / np.sqrt(var)) < 0.3


def test_propagation_torchvision_bottleneck_structure():
  spec = archs.get('resnet50')
  variables = jax.tree_util.tree_map(np.asarray, spec.init(jax.random.PRNGKey(4)))
  pred = M.propagate(spec, variables)
  assert set(pred) == {u.name for u in spec.units}
  for u in spec.units:
    p = pred[u.name]
    d_in = np.shape(trees.get_path(variables['params'], u.producer)['kernel'])[2]
    assert p.mean.shape == (d_in,) and np.all(np.isfinite(p.mean)) and np.all(p.var > 0)
  # conv2 of a bottleneck reads ReLU(N(beta_bn1, gamma_bn1^2)).
  bn1 = variables['params']['layer3_2']['bn1']
  e1, _ = _x64(M.relu_moments, bn1['bias'], bn1['scale'])
  np.testing.assert_allclose(pred['layer3_2/conv2'].mean, e1, rtol=1e-12)


def test_propagation_rejects_unknown_family():
  spec = archs.get('resnet20')
  import dataclasses  # pylint: disable=import-outside-toplevel
  bad = dataclasses.replace(spec, family='transformer')
  with pytest.raises(ValueError, match='transformer'):
    M.propagate(bad, {'params': {}})


def test_second_moment_matrices_batch_equals_single_and_crosses_chunks():
  """The chunked NumPy entry point equals the JAX matrix form, for mixed widths and a total
  number of pairs above one chunk."""
  rng = np.random.default_rng(9)
  gs = [_random_gaussian(rng, n) for n in (3, 7, 260)]
  gs[1][1][2, :] = gs[1][1][:, 2] = 0.0  # a constant channel
  assert sum(n * (n - 1) // 2 for n in (3, 7, 260)) > M.PAIR_CHUNK
  got = M.second_moment_matrices(gs)
  for (mean, cov), (E, Mm) in zip(gs, got):
    E_ref, M_ref = _x64(M.relu_second_moments, mean, cov)
    np.testing.assert_allclose(E, E_ref, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(Mm, M_ref, rtol=1e-12, atol=1e-14)
  lin = M.second_moment_matrices(gs[:1], activation='linear')[0][1]
  np.testing.assert_allclose(lin, gs[0][1] + np.outer(gs[0][0], gs[0][0]))
