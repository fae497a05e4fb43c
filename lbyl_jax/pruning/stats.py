"""Model size and cost: parameter count, MACs / FLOPs at batch 1, bytes of the variables.

MACs are counted analytically from the shapes of the traced forward pass at batch 1, so they follow
the pruned widths exactly: conv MACs = H_out * W_out * C_out * kh * kw * C_in / groups; dense MACs =
out * fan_in. The preset is traced once at its original widths
(:func:`lbyl_jax.models.trace.trace_layers`, whose jaxpr count is the reference); at other widths
each layer's output positions times its kernel size gives the same count without tracing again
(:func:`lbyl_jax.models.trace.macs_at`; :func:`traced_macs` counts on a fresh jaxpr).
Only convolutions and matrix products are counted (BN, ReLU, pooling and adds are not), the usual
convention of the pruning papers; FLOPs = 2 * MACs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from lbyl_jax.core import units as units_lib
from lbyl_jax.models import trace


_MACS: dict[tuple, int] = {}


def _macs_cached(spec, widths: tuple[int, ...] | None) -> int:
  key = (spec.name, repr(spec.model), widths)
  if key not in _MACS:
    n = trace.macs_at(spec, spec.abstract_variables(widths))
    _MACS[key] = n if n is not None else traced_macs(spec, widths)
  return _MACS[key]


def traced_macs(spec, widths: tuple[int, ...] | None = None) -> int:
  """MACs counted on the jaxpr of ``model.apply`` at these widths (a fresh trace): the reference
  :func:`macs` agrees with, and its fallback for models with products outside Conv / Dense."""
  model = spec.build(widths)
  abstract = spec.abstract_variables(widths)
  x = jax.ShapeDtypeStruct((1, *spec.input_shape), np.float32)
  closed = jax.make_jaxpr(model.apply)(abstract, x)
  return trace.jaxpr_macs(closed.jaxpr)


def macs(spec, widths: tuple[int, ...] | None = None) -> int:
  """Multiply-accumulates of one forward pass at batch 1 for the given widths (None: original)."""
  return _macs_cached(spec, None if widths is None else tuple(int(w) for w in widths))


def param_count(variables: Mapping[str, Any]) -> int:
  """Number of entries in ``variables['params']`` (BN running statistics excluded)."""
  return int(sum(math.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(variables['params'])))


def nbytes(variables: Mapping[str, Any]) -> int:
  """Bytes of all variables (params and batch_stats) at their stored dtypes."""
  return int(sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(variables)))


def summary(spec, variables: Mapping[str, Any]) -> dict[str, int]:
  """params, macs, flops (= 2 * macs) and bytes of a (possibly pruned) variable tree."""
  widths = units_lib.widths_of(variables, spec.units)
  n_macs = macs(spec, widths)
  return dict(params=param_count(variables), macs=n_macs, flops=2 * n_macs, bytes=nbytes(variables))


def xla_flops(spec, widths: tuple[int, ...] | None = None) -> float:
  """XLA's own FLOP estimate of the compiled forward at batch 1 (includes BN, adds, pooling).

  ``cost_analysis()`` of a compiled executable is a dict in JAX 0.10 with a 'flops' entry. Its
  convolution cost model differs from the dense count (on CPU it reports about 0.8-1.0 x 2 * MACs,
  e.g. taps over zero padding are not charged), so it is a cross-check, never the reported number.
  """
  model = spec.build(widths)
  abstract = spec.abstract_variables(widths)
  x = jax.ShapeDtypeStruct((1, *spec.input_shape), np.float32)
  cost = jax.jit(model.apply).lower(abstract, x).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost['flops'])
