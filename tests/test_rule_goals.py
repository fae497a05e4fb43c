"""benchmarks/rule_goals.py: the development-split choice reads only the development images, the
held-out figures and the default decision follow the stated rules (synthetic per-image rows)."""

from __future__ import annotations

import numpy as np

from benchmarks import bn_reestimate as bnr
from benchmarks import rule_goals as rg


def _row(dev_right: int, held_right: int, seed: int = 0) -> dict:
  """A stored row whose first 5,000 images have ``dev_right`` correct and the last 5,000
  ``held_right`` (positions drawn by ``seed``)."""
  rng = np.random.default_rng(seed)
  c = np.zeros(10000, bool)
  c[rng.choice(5000, dev_right, replace=False)] = True
  c[5000 + rng.choice(5000, held_right, replace=False)] = True
  return dict(n=10000, top1=100.0 * c.mean(), correct=bnr.pack_correct(c), seconds=0.0)


def _bias_results(dev: dict[str, int], held: dict[str, int]) -> dict:
  rows = {}
  for arch in rg.CIFAR + ('lenet_300_100',):
    for r in rg.ratios_of(arch, 'bias'):
      for i, m in enumerate(rg.BIAS_MODES):
        rows[rg.key('bias', arch, m, r)] = _row(dev[m], held[m], seed=i)
  return dict(rows=rows)


def test_rows_round_trip_and_split():
  row = _row(4000, 2500, seed=3)
  assert rg.unpack(row).sum() == 6500
  assert rg.top1(row, 'dev') == 80.0 and rg.top1(row, 'held-out') == 50.0
  assert rg.split_correct(row, 'held-out').size == 5000


def test_bias_choice_reads_the_development_split_only():
  # auto: never below max(off, on) on dev, far below on held-out; blend: the reverse.
  res = _bias_results(dev=dict(off=4000, on=4100, auto=4150, blend=3000),
                      held=dict(off=4000, on=4100, auto=3000, blend=4500))
  chosen, score = rg.bias_choice(res)
  assert chosen == 'auto'
  n = len(rg.bias_cells(res, 'dev'))
  assert n == 3 * 5 + 8
  assert score['auto'][0] == 0 and score['blend'][0] == n
  text = '\n'.join(rg.bias_lines(res))
  assert 'picks `auto`' in text
  assert f'below the better of off / on in {n} of {n} cells, {n} of them' in text
  # a tie on misses goes to the larger summed margin
  res = _bias_results(dev=dict(off=4000, on=4100, auto=4110, blend=4150),
                      held=dict(off=4000, on=4100, auto=4110, blend=4150))
  assert rg.bias_choice(res)[0] == 'blend'


def _udfc_results(dev: dict[str, int], held: dict[str, int]) -> dict:
  rows = {}
  for arch in rg.CIFAR:
    for r in rg.UDFC_RATIOS:
      for i, v in enumerate(rg.UDFC):
        for suffix in ('', '+mom'):
          rows[rg.key('udfc', arch, v + suffix, r)] = _row(dev[v], held[v], seed=10 + i)
  return dict(rows=rows)


def test_udfc_default_decision():
  win = dict(rtn=4000, udfc=4000, udfc_a1_10=4200)
  lose = dict(rtn=4000, udfc=4000, udfc_a1_10=3800)
  dec = rg.udfc_decision(_udfc_results(dev=win, held=win))
  assert dec['wins_dev'] and dec['confirmed']
  dec = rg.udfc_decision(_udfc_results(dev=win, held=lose))
  assert dec['wins_dev'] and not dec['confirmed'] and dec['held-out']['worse']
  dec = rg.udfc_decision(_udfc_results(dev=lose, held=win))
  assert not dec['wins_dev'] and not dec['confirmed']
  text = '\n'.join(rg.udfc_lines(_udfc_results(dev=lose, held=win)))
  assert 'The default a1 stays 0.01 (no development win).' in text
  assert 'UDFC a1 = 10, no re-estimation (the default path): development above RTN in 0 of 9' in text
  assert 'held-out above RTN in 9 of 9 cells' in text


def test_empty_results_render_nothing():
  assert rg.bias_lines(dict(rows={})) == [] and rg.udfc_lines(dict(rows={})) == []
  assert rg.udfc_decision(dict(rows={})) == {}
