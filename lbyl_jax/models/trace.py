"""What ONE abstract forward pass reveals about a model (no FLOPs spent), cached per preset.

:func:`trace_module` traces ``model.init`` once (shapes only) and records, in execution order,
every Conv / Dense call with its input and output shapes and its geometry (kernel size, strides,
padding), which BatchNorm reads each layer's output (a BN is paired with a layer only when its
input is that layer's very output object, so the pairing does not rely on naming), the abstract
variables at the traced widths, and the multiply-accumulates of the whole jaxpr.

Everything else that depends on shapes is derived from that one trace instead of tracing again:

- the variable shapes at other widths (:func:`abstract_variables_at`): a unit's width is the last
  axis of its producer's kernel / bias and of its BN's four vectors, and the input axis of its
  consumer's kernel (axis 2 of an HWIO conv kernel, ``width * flatten`` rows of a dense one);
- the MACs at any widths (:func:`macs_at`): per layer call, output positions x the number of
  kernel entries (conv: H_out W_out kh kw C_in / groups C_out; dense: positions x fan_in x out),
  since channel pruning changes no spatial size;
- the consumer geometry of the bias correction (input sizes, kernels, strides, pads).

The derivations are exact for models whose widths are the units' widths (every preset; the tests
compare them with a fresh trace at random widths). When the jaxpr has multiply-accumulates outside
Conv / Dense layers, :func:`macs_at` says it cannot derive them (None) and the caller traces.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import numpy as np

from lbyl_jax.models import nets


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """One call of a Conv / Dense layer in the traced forward pass (batch 1).

  Attributes:
    path: the layer's param path.
    kind: 'conv' or 'dense'.
    in_shape, out_shape: input and output shapes (batch axis first, features last).
    kernel_size, strides, padding: the nn.Conv attributes as the module holds them (None for
      dense layers).
  """

  path: str
  kind: str
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  kernel_size: Any = None
  strides: Any = None
  padding: Any = None

  @property
  def positions(self) -> int:
    """Output positions per example (spatial size for convs; 1 for a dense layer on vectors)."""
    return math.prod(self.out_shape[1:-1])


@dataclasses.dataclass(frozen=True)
class LayerTrace:
  """Attributes:
    order: param paths of every Conv / Dense in execution order.
    bn: layer path -> path of the BatchNorm applied directly to that layer's output.
    calls: every Conv / Dense call in execution order (:class:`LayerCall`).
    abstract: ShapeDtypeStructs of the variables at the traced widths.
    jaxpr_macs: MACs of every conv / matrix product in the traced jaxpr at batch 1.
  """

  order: tuple[str, ...]
  bn: Mapping[str, str]
  calls: tuple[LayerCall, ...] = ()
  abstract: Any = None
  jaxpr_macs: int | None = None

  def layer_macs(self, kernels: Mapping[str, Sequence[int]]) -> int:
    """Sum over layer calls of positions x kernel entries, for the given kernel shapes."""
    return int(sum(c.positions * math.prod(kernels[c.path]) for c in self.calls))


# --------------------------------------------------------------------------------------------
# MAC counting on a jaxpr (the reference the derived counts are checked against).


def _sub_jaxprs(value: Any):
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def jaxpr_macs(jaxpr) -> int:
  """Multiply-accumulates of every ``conv_general_dilated`` and ``dot_general`` in a jaxpr
  (sub-jaxprs included): conv = prod(out) x prod(kernel) / C_out; dot = prod(out) x contracted
  size."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      out = eqn.outvars[0].aval.shape
      rhs = eqn.invars[1].aval.shape
      o_dim = eqn.params['dimension_numbers'].rhs_spec[0]
      total += math.prod(out) * (math.prod(rhs) // rhs[o_dim])
    elif name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
    elif name in ('scan', 'while'):
      raise NotImplementedError(f'MAC counting through {name} is not supported')
    for v in eqn.params.values():
      for sub in _sub_jaxprs(v):
        total += jaxpr_macs(sub)
  return total


def trace_module(model: nn.Module, dummy_input: Any) -> LayerTrace:
  """:class:`LayerTrace` of ``model`` on an input like ``dummy_input`` (one shape-only trace of
  ``model.init``; its jaxpr also holds the forward pass, whose MACs are counted)."""
  order: list[str] = []
  calls: list[LayerCall] = []
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
      if args and hasattr(args[0], 'shape'):
        conv = isinstance(mod, nn.Conv)
        calls.append(LayerCall(
            path, 'conv' if conv else 'dense', tuple(args[0].shape), tuple(out.shape),
            kernel_size=mod.kernel_size if conv else None, strides=mod.strides if conv else None,
            padding=mod.padding if conv else None))
    elif isinstance(mod, nn.BatchNorm) and args:
      hit = outputs.get(id(args[0]))
      if hit is not None and hit[1] is args[0]:
        bn[hit[0]] = path
    return out

  with nn.intercept_methods(record):
    closed, abstract = jax.make_jaxpr(lambda x: model.init(jax.random.PRNGKey(0), x),
                                      return_shape=True)(dummy_input)
  try:
    total = jaxpr_macs(closed.jaxpr)
  except NotImplementedError:
    total = None
  abstract = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), abstract)
  return LayerTrace(order=tuple(order), bn=dict(bn), calls=tuple(calls), abstract=abstract,
                    jaxpr_macs=total)


@functools.lru_cache(maxsize=64)
def trace_layers(spec) -> LayerTrace:
  """:func:`trace_module` of a preset's model at its original widths (cached per preset, and on
  disk for the models of :mod:`lbyl_jax.models.nets`, see :func:`_disk_path`)."""
  path = _disk_path(spec)
  if path is not None and path.is_file():
    try:
      return _from_json(json.loads(path.read_text(encoding='utf-8')))
    except (OSError, ValueError, KeyError, TypeError):
      pass  # unreadable: trace again and replace it
  traced = trace_module(spec.model, spec.dummy_input())
  if path is not None:
    _write_atomic(path, json.dumps(_to_json(traced)))
  return traced


# --------------------------------------------------------------------------------------------
# The trace on disk: a ResNet-50 trace costs 0.3-1 s on a 2-core CPU, reading it 5 ms.

DISK_SUBDIR = 'lbyl_jax_traces'
_SOURCES = ('nets.py', 'trace.py')


@functools.lru_cache(maxsize=1)
def _sources_digest() -> str:
  here = pathlib.Path(__file__).parent
  h = hashlib.sha256()
  for name in _SOURCES:
    h.update((here / name).read_bytes())
  return h.hexdigest()


def _disk_path(spec) -> pathlib.Path | None:
  """Where the trace of ``spec`` is kept: ``<JAX compilation cache>/lbyl_jax_traces``, keyed by
  the preset's name, its model's fields (``repr``), its input shape, the source of
  :mod:`lbyl_jax.models.nets` and of this module, and the flax / jax versions. Only models
  built from :mod:`lbyl_jax.models.nets` classes are kept (their code is what the key hashes);
  None when the compilation cache is off (``--compile-cache off``)."""
  base = jax.config.jax_compilation_cache_dir
  if not base or type(spec.model).__module__ != nets.__name__:
    return None
  key = repr((spec.name, repr(spec.model), tuple(spec.input_shape), _sources_digest(),
              flax.__version__, jax.__version__))
  digest = hashlib.sha256(key.encode()).hexdigest()
  return pathlib.Path(base) / DISK_SUBDIR / f'{spec.name}-{digest[:32]}.json'


def _tuples(x: Any) -> Any:
  return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def _to_json(t: LayerTrace) -> dict[str, Any]:
  flat = [[[str(k.key) for k in path], list(leaf.shape), np.dtype(leaf.dtype).name]
          for path, leaf in jax.tree_util.tree_flatten_with_path(t.abstract)[0]]
  return dict(order=list(t.order), bn=dict(t.bn), jaxpr_macs=t.jaxpr_macs, abstract=flat,
              calls=[dataclasses.asdict(c) for c in t.calls])


def _from_json(d: Mapping[str, Any]) -> LayerTrace:
  abstract: dict[str, Any] = {}
  for keys, shape, dtype in d['abstract']:
    node = abstract
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))
  calls = tuple(LayerCall(**{k: _tuples(v) for k, v in c.items()}) for c in d['calls'])
  macs = d['jaxpr_macs']
  return LayerTrace(order=tuple(d['order']), bn=dict(d['bn']), calls=calls, abstract=abstract,
                    jaxpr_macs=None if macs is None else int(macs))


def _write_atomic(path: pathlib.Path, text: str) -> None:
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix='.tmp-', suffix='.json')
    try:
      with os.fdopen(fd, 'w', encoding='utf-8') as f:
        f.write(text)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
  except OSError:
    pass  # a cache that cannot be written is skipped


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


# --------------------------------------------------------------------------------------------
# Derived from the one trace.


def _with_axis(shape: tuple[int, ...], axis: int, size: int) -> tuple[int, ...]:
  shape = list(shape)
  shape[axis] = size
  return tuple(shape)


def abstract_variables_at(spec, widths: Sequence[int]) -> Any:
  """ShapeDtypeStructs of ``spec``'s variables at ``widths`` (one per unit), derived from the
  original-width trace (module docstring): no tracing."""
  traced = trace_layers(spec)
  widths = tuple(int(w) for w in widths)
  if len(widths) != len(spec.units):
    raise ValueError(f'{spec.name}: expected {len(spec.units)} widths, got {len(widths)}')
  shapes: dict[tuple[str, ...], tuple[tuple[int, ...], Any]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(traced.abstract)[0]:
    shapes[tuple(str(p.key) for p in path)] = (tuple(leaf.shape), leaf.dtype)

  def resize(key: tuple[str, ...], axis: int, size: int, what: str) -> None:
    if key not in shapes:
      raise ValueError(f'{spec.name}: unit {what} has no variable {"/".join(key)}')
    shape, dtype = shapes[key]
    shapes[key] = (_with_axis(shape, axis, size), dtype)

  for unit, w in zip(spec.units, widths):
    prod = tuple(unit.producer.split('/'))
    resize(('params', *prod, 'kernel'), -1, w, unit.name)
    if ('params', *prod, 'bias') in shapes:
      resize(('params', *prod, 'bias'), -1, w, unit.name)
    if unit.bn is not None:
      bn = tuple(unit.bn.split('/'))
      for col, leaf in (('params', 'scale'), ('params', 'bias'), ('batch_stats', 'mean'),
                        ('batch_stats', 'var')):
        if (col, *bn, leaf) in shapes:
          resize((col, *bn, leaf), -1, w, unit.name)
    cons = ('params', *unit.consumer.split('/'), 'kernel')
    if unit.consumer_kind == 'conv':
      resize(cons, -2, w, unit.name)
    else:
      resize(cons, 0, w * unit.flatten, unit.name)
  flat = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}
  out: dict[str, Any] = {}
  for key, leaf in flat.items():
    node = out
    for k in key[:-1]:
      node = node.setdefault(k, {})
    node[key[-1]] = leaf
  return out


def macs_at(spec, abstract: Any) -> int | None:
  """MACs at batch 1 of ``spec``'s model whose variables have the shapes of ``abstract``, from
  the original-width trace; None when the traced jaxpr has products outside Conv / Dense layers
  (the caller then counts on a fresh trace)."""
  traced = trace_layers(spec)
  if traced.jaxpr_macs is None:
    return None
  kernels = {}
  for c in traced.calls:
    node = abstract['params']
    for k in c.path.split('/'):
      node = node[k]
    kernels[c.path] = tuple(np.shape(node['kernel']))
  original = {c.path: tuple(np.shape(_leaf(traced.abstract['params'], c.path)['kernel']))
              for c in traced.calls}
  if traced.layer_macs(original) != traced.jaxpr_macs:
    return None
  return traced.layer_macs(kernels)


def _leaf(tree: Mapping[str, Any], path: str) -> Any:
  node = tree
  for k in path.split('/'):
    node = node[k]
  return node
