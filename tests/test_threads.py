"""lbyl_jax.core.threads: the threaded host work gives exactly the loop's results, in order."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from lbyl_jax import pipeline
from lbyl_jax.core import threads
from lbyl_jax.core import trees
from lbyl_jax.models import archs
from lbyl_jax.plan import Plan


def test_map_ordered_keeps_the_order_and_uses_threads(monkeypatch):
  monkeypatch.setenv('LBYL_JAX_HOST_THREADS', '3')
  seen = set()

  def f(i, j):
    seen.add(threading.current_thread().name)
    return i * 10 + j

  assert threads.map_ordered(f, range(20), range(20)) == [11 * i for i in range(20)]
  assert any(name.startswith('lbyl_jax-host') for name in seen)
  assert threading.current_thread().name in seen  # the first call ran in the caller


def test_map_ordered_raises_the_first_error_in_input_order(monkeypatch):
  monkeypatch.setenv('LBYL_JAX_HOST_THREADS', '4')

  def f(i):
    if i in (3, 7):
      raise ValueError(f'item {i}')
    return i

  with pytest.raises(ValueError, match='item 3'):
    threads.map_ordered(f, range(10))


@pytest.mark.parametrize('value', ['0', '-2', 'two'])
def test_bad_thread_count_is_refused(monkeypatch, value):
  monkeypatch.setenv('LBYL_JAX_HOST_THREADS', value)
  with pytest.raises(ValueError, match='LBYL_JAX_HOST_THREADS must be a positive integer'):
    threads.workers()


def test_one_thread_is_the_plain_loop(monkeypatch):
  monkeypatch.setenv('LBYL_JAX_HOST_THREADS', '1')
  names = threads.map_ordered(lambda i: threading.current_thread().name, range(5))
  assert set(names) == {threading.current_thread().name}


@pytest.mark.parametrize('method,criterion', [('lbyl', 'l2'), ('nm', 'l2-gm'), ('prune', 'random')])
def test_threaded_selection_and_surgery_equal_the_loop_bitwise(monkeypatch, method, criterion):
  spec = archs.get('resnet56')
  variables = spec.init(0)
  plan = Plan.from_options(method=method, criterion=criterion, ratio=0.4)
  got = {}
  for n in ('1', '4'):
    monkeypatch.setenv('LBYL_JAX_HOST_THREADS', n)
    result = pipeline.compress(spec, variables, plan)
    got[n] = (result.widths,
              {k: np.asarray(v) for k, v in trees.flatten(result.variables).items()})
  assert got['1'][0] == got['4'][0]
  assert got['1'][1].keys() == got['4'][1].keys()
  for k, v in got['1'][1].items():
    np.testing.assert_array_equal(v, got['4'][1][k], err_msg=k)
