"""Model size and cost: parameter count, MACs / FLOPs at batch 1, bytes of the variables.

MACs are counted from the traced forward pass: discovery records every layer's output positions
once (:meth:`lbyl_jax.core.units.Discovery.macs`), and the kernels of the variables give the
widths, so a pruned tree needs no new trace (:func:`traced_macs` walks a fresh jaxpr instead with
:func:`lbyl_jax.models.trace.jaxpr_macs`, as a cross-check):
conv MACs = H_out * W_out * C_out * kh * kw * C_in / groups; dense MACs = out * fan_in.
Only convolutions and matrix products are counted (BN, ReLU, pooling and adds are not), the usual
convention of the pruning papers; FLOPs = 2 * MACs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from lbyl_jax.models import trace


_MACS: dict[tuple, int] = {}


def _macs_cached(spec, widths: tuple[int, ...] | None) -> int:
  key = (spec.name, repr(spec.model), widths)
  if key not in _MACS:
    _MACS[key] = _trace_macs(spec, widths)
  return _MACS[key]


def _trace_macs(spec, widths: tuple[int, ...] | None) -> int:
  model = spec.build(widths)
  abstract = spec.abstract_variables(widths)
  x = jax.ShapeDtypeStruct((1, *spec.input_shape), np.float32)
  closed = jax.make_jaxpr(model.apply)(abstract, x)
  return trace.jaxpr_macs(closed.jaxpr)


def traced_macs(spec, widths: tuple[int, ...] | None = None) -> int:
  """Multiply-accumulates of one forward pass at batch 1 for the given widths (None: original),
  counted on a fresh jaxpr of the model at these widths (a cross-check of :func:`summary`'s
  count, which needs no trace)."""
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
  n_macs = spec.discovery.macs(variables)
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
