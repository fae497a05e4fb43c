"""Shared fixtures. Real-data tests read ../shared (or $LBYL_JAX_SHARED).

When ``CI`` is set, a missing shared directory is an error, not a skip: the real-data tests are
the proof that conversions and compensations work.
"""

from __future__ import annotations

import os
import pathlib

import pytest


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


def one_unit_network(W, gamma, beta, mu, var, V, bias):
  """A one-unit network: dense l1 (rows W) -> BN bn1 -> ReLU -> dense l2 (kernel V, bias)."""
  import types

  from lbyl_jax.compress import units as units_lib

  variables = {
      'params': {
          'l1': {'kernel': W.T.copy()},
          'bn1': {'scale': gamma, 'bias': beta},
          'l2': {'kernel': V, 'bias': bias},
      },
      'batch_stats': {'bn1': {'mean': mu, 'var': var}},
  }
  unit = units_lib.Unit('l1', 'l1', 'bn1', 'l2', 'dense')
  spec = types.SimpleNamespace(name='toy', units=(unit,), family='toy', hparams={})
  return spec, variables, unit
