"""Plain pruning: the pruned channels are dropped and nothing is delivered (S_P = 0)."""

from __future__ import annotations

import dataclasses

import numpy as np

from lbyl_jax.pruning.methods.base import Method, register
from lbyl_jax.pruning.problem import UnitSolution, coefficient_stats


@register
@dataclasses.dataclass(frozen=True)
class Prune(Method):
  """Plain pruning (the baseline every compensation is measured against)."""

  name = 'prune'
  summary = 'drop the channels, deliver nothing'

  def deliver(self, spec, variables, problems, context):
    del spec, variables, context
    out = []
    for p in problems:
      S = np.zeros((p.prune.size, p.m))
      out.append(UnitSolution(S, None, dict(method='prune', **coefficient_stats(S))))
    return out

  def depthwise_options(self, spec):
    del spec
    return {}
