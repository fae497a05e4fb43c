"""What an abstract forward pass reveals about a model's layers (no FLOPs spent).

:func:`trace_layers` records every Conv / Dense in execution order and which BatchNorm reads each
layer's output (a BN is paired with a layer only when its input is that layer's very output
object, so the pairing does not rely on naming). Results are cached per preset.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax


@dataclasses.dataclass(frozen=True)
class LayerTrace:
  """Attributes:
    order: param paths of every Conv / Dense in execution order.
    bn: layer path -> path of the BatchNorm applied directly to that layer's output.
  """

  order: tuple[str, ...]
  bn: Mapping[str, str]


def trace_module(model: nn.Module, dummy_input: Any) -> LayerTrace:
  """:class:`LayerTrace` of ``model`` on an input like ``dummy_input`` (shape-only init)."""
  order: list[str] = []
  outputs: dict[int, tuple[str, Any]] = {}
  bn: dict[str, str] = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != '__call__':
      return out
    mod = context.module
    path = '/'.join(mod.scope.path)
    if isinstance(mod, (nn.Conv, nn.Dense)):
      if path not in order:
        order.append(path)
      outputs[id(out)] = (path, out)
    elif isinstance(mod, nn.BatchNorm) and args:
      hit = outputs.get(id(args[0]))
      if hit is not None and hit[1] is args[0]:
        bn[hit[0]] = path
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy_input))
  return LayerTrace(order=tuple(order), bn=dict(bn))


@functools.lru_cache(maxsize=64)
def trace_layers(spec) -> LayerTrace:
  """:func:`trace_module` of a preset's model at its original widths (cached per preset)."""
  return trace_module(spec.model, spec.dummy_input())


def layer_order(spec) -> list[str]:
  """Param paths of every Conv / Dense of ``spec.model`` in execution order."""
  return list(trace_layers(spec).order)


def first_and_last_layers(spec) -> tuple[str, str]:
  """The layer reading the image and the classifier (resnets 'conv1'/'fc', VGG 'conv0'/'fc2' or
  'fc3', LeNet 'ip1'/'ip3'): the layers commonly kept at 8 bits."""
  order = layer_order(spec)
  return order[0], order[-1]


def consumer_bn(spec, consumer: str) -> str | None:
  """The BatchNorm applied directly to ``consumer``'s output (it can absorb a constant shift)."""
  return trace_layers(spec).bn.get(consumer)
