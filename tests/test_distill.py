"""BN-distilled inputs and the output-agreement KL (lbyl_jax.experimental.distill)."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import scipy.special

from lbyl_jax.models import archs
from lbyl_jax.experimental import distill
from lbyl_jax.experimental import montecarlo
from test_evaluate import random_variables


@pytest.fixture(scope='module')
def r20():
  spec = archs.get('resnet20')
  return spec, random_variables(spec, seed=2)


def test_loss_is_zero_where_running_stats_are_the_batch_stats(r20):
  """Calibrate every BN on a batch (mc_propagate, no border dropped): the loss there is ~0."""
  spec, variables = r20
  n = 8
  calibrated = montecarlo.mc_propagate(spec, variables, n=n, seed=5, margin=0)['batch_stats']
  tuned = dict(variables, batch_stats=calibrated)
  x = np.random.default_rng(5).standard_normal((n, *spec.input_shape))  # mc_propagate's batch
  loss = distill._bn_loss_fn(spec, jax.tree_util.tree_map(np.asarray, tuned))  # pylint: disable=protected-access
  assert float(loss(x.astype(np.float32))) < 1e-6
  assert float(loss(2.0 * x.astype(np.float32))) > 1e-2  # and it sees a different batch


def test_distill_matches_the_statistics(r20):
  spec, variables = r20
  x, info = distill.distill(spec, variables, n=16, steps=60, lr=0.1, seed=1)
  assert x.shape == (16, *spec.input_shape) and x.dtype == np.float32 and np.isfinite(x).all()
  assert info['loss_end'] < 0.2 * info['loss_start']
  again, _ = distill.distill(spec, variables, n=16, steps=60, lr=0.1, seed=1)
  np.testing.assert_array_equal(x, again)  # deterministic
  loss = distill._bn_loss_fn(spec, variables)  # pylint: disable=protected-access
  assert float(loss(x)) == pytest.approx(info['loss_end'], rel=1e-5)


def test_output_kl_against_scipy():
  rng = np.random.default_rng(0)
  p = 3.0 * rng.standard_normal((20, 10))
  q = p + rng.standard_normal((20, 10))
  ref = np.mean(np.sum(scipy.special.rel_entr(scipy.special.softmax(p, 1),
                                              scipy.special.softmax(q, 1)), axis=1))
  assert distill.output_kl(p, q) == pytest.approx(ref, rel=1e-10)
  assert distill.output_kl(p, p + 7.0) == pytest.approx(0.0, abs=1e-12)  # shift-invariant
  assert distill.output_kl(p, q) > 0
  with pytest.raises(ValueError, match='one shape'):
    distill.output_kl(p, q[:, :5])


def test_logits_shape(r20):
  spec, variables = r20
  x = np.zeros((2, *spec.input_shape), np.float32)
  out = distill.logits(spec, variables, x)
  assert out.shape == (2, 10) and math.isfinite(float(out.sum()))


def test_errors(r20):
  spec, variables = r20
  with pytest.raises(ValueError, match='n >= 2'):
    distill.distill(spec, variables, n=1)
  with pytest.raises(ValueError, match='lr > 0'):
    distill.distill(spec, variables, lr=0.0)
  lenet = archs.get('lenet_300_100')
  with pytest.raises(ValueError, match='no BatchNorm'):
    distill.distill(lenet, random_variables(lenet), n=2, steps=1)
