"""Shared fixtures. Real-data tests read ../shared (or $LBYL_JAX_SHARED).

When ``CI`` is set, a missing shared directory is an error, not a skip: the real-data tests are
the proof that conversions and compensations work.
"""

from __future__ import annotations

import os
import pathlib

import flax.linen as nn
import pytest

from lbyl_jax.core.bn import BN_EPS


ROOT = pathlib.Path(__file__).resolve().parents[1]


def shared_dir() -> pathlib.Path | None:
  env = os.environ.get('LBYL_JAX_SHARED')
  path = pathlib.Path(env) if env else ROOT.parent / 'shared'
  return path if (path / 'weights').is_dir() else None


@pytest.fixture(scope='session')
def shared() -> pathlib.Path:
  path = shared_dir()
  if path is None:
    if os.environ.get('CI'):
      pytest.fail('../shared (or $LBYL_JAX_SHARED) is missing: real-data tests cannot run in CI')
    pytest.skip('../shared not present')
  return path


class OneUnitNet(nn.Module):
  """Dense 'l1' (no bias) -> BatchNorm 'bn1' -> ReLU -> Dense 'l2' (with bias)."""

  hidden: int
  outputs: int
  widths: tuple[int, ...] | None = None

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    n = self.hidden if self.widths is None else self.widths[0]
    x = nn.Dense(n, use_bias=False, name='l1')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name='bn1')(x)
    return nn.Dense(self.outputs, name='l2')(nn.relu(x))


def toy_spec(model, units, input_shape, *, name='toy', family='toy', num_classes=None):
  """A real, unregistered :class:`lbyl_jax.models.archs.ArchSpec` around a hand-made module (whose
  ``widths`` field the spec's ``build`` sets), for tests on small hand-written layers."""
  from lbyl_jax.models import archs

  c = input_shape[-1]
  return archs.ArchSpec(name=name, family=family, model=model, fixed_units=tuple(units),
                        input_shape=tuple(input_shape), mean=(0.0,) * c, std=(1.0,) * c,
                        num_classes=num_classes or 0, dataset=name, torch_naming=name, hparams={})


def one_unit_network(W, gamma, beta, mu, var, V, bias):
  """A one-unit network: dense l1 (rows W) -> BN bn1 -> ReLU -> dense l2 (kernel V, bias).

  The spec is a real :func:`toy_spec` around :class:`OneUnitNet`, so code that traces the model
  (surgery's consumer BN) works on it.
  """
  from lbyl_jax.core import units as units_lib

  variables = {
      'params': {
          'l1': {'kernel': W.T.copy()},
          'bn1': {'scale': gamma, 'bias': beta},
          'l2': {'kernel': V, 'bias': bias},
      },
      'batch_stats': {'bn1': {'mean': mu, 'var': var}},
  }
  unit = units_lib.Unit.of('l1', 'l1', 'bn1', 'l2', 'dense')
  n, d = W.shape
  spec = toy_spec(OneUnitNet(hidden=n, outputs=V.shape[1]), (unit,), (1, 1, d),
                  num_classes=V.shape[1])
  return spec, variables, unit
