"""What one abstract pass of ``model.init`` reveals about a model (no FLOPs spent), cached.

:func:`trace_module` traces ``model.init`` once (shapes only) and records every Conv / Dense in
execution order, which BatchNorm reads each layer's output (a BN is paired with a layer only when
its input is that layer's very output object, so the pairing does not rely on naming), and the
abstract variables at the traced widths. :func:`trace_layers` keeps it per preset, in memory and
on disk next to the compilation cache; :func:`discovery_on_disk` keeps a preset's discovery there
too (the costliest step before the solves of a warm run).

The units, the MACs and the consumer geometry come from discovery
(:mod:`lbyl_jax.models.discover`), not from here. What this module derives from the one trace is
the variable shapes of a preset at other widths (:func:`abstract_variables_at`, from the
discovered units), so loading a pruned run traces nothing. :func:`jaxpr_macs` counts the MACs of
a jaxpr: the reference the discovered count is checked against (:func:`lbyl_jax.pruning.stats.
traced_macs`).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import math
import os
import pathlib
import tempfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import numpy as np

from lbyl_jax.core import units as units_lib
from lbyl_jax.models import nets


@dataclasses.dataclass(frozen=True)
class LayerTrace:
  """Attributes:
    order: param paths of every Conv / Dense in execution order.
    bn: layer path -> path of the BatchNorm applied directly to that layer's output.
    abstract: ShapeDtypeStructs of the variables at the traced widths.
  """

  order: tuple[str, ...]
  bn: Mapping[str, str]
  abstract: Any = None


# --------------------------------------------------------------------------------------------
# MAC counting on a jaxpr (the reference the discovered counts are checked against).


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
  ``model.init``)."""
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
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy_input))
  return LayerTrace(order=tuple(order), bn=dict(bn), abstract=abstract)


@functools.lru_cache(maxsize=64)
def trace_layers(spec) -> LayerTrace:
  """:func:`trace_module` of a preset's model at its original widths (cached per preset, and on
  disk for the models of :mod:`lbyl_jax.models.nets`, see :func:`_disk_path` and
  :func:`_shipped_path`)."""
  path = _disk_path(spec)
  for text in _stored_texts(path):
    try:
      return _from_json(json.loads(text))
    except (ValueError, KeyError, TypeError):
      pass  # unreadable: the next source, else trace again and replace it
  traced = trace_module(spec.model, spec.dummy_input())
  if path is not None:
    _write_atomic(path, json.dumps(_to_json(traced)))
  return traced


def _stored_texts(path: pathlib.Path | None):
  """The texts kept for ``path``: the disk cache's file, then the copy shipped with the package
  (which, when read, is also written to the disk cache)."""
  if path is None:
    return
  try:
    yield path.read_text(encoding='utf-8')
  except OSError:
    pass
  shipped = _shipped_path(path)
  try:
    text = gzip.decompress(shipped.read_bytes()).decode('utf-8')
  except (OSError, EOFError, UnicodeDecodeError, zlib.error):
    return
  _write_atomic(path, text)
  yield text


# --------------------------------------------------------------------------------------------
# The trace and the discovery on disk: a ResNet-50 trace costs 0.3-1 s on a 2-core CPU, its
# discovery 1.5-4 s; reading either back takes milliseconds.

DISK_SUBDIR = 'lbyl_jax_traces'
# The presets' traces and discoveries under the same names (gzip), shipped with the package, so a
# first run with an empty cache (a new user, a fresh container) traces nothing either; written by
# ``python -m lbyl_jax.models.shipped`` and checked current by tests/test_command_speed.py.
# A file whose key (module sources, flax and jax versions) does not match is simply not found.
SHIPPED_DIR = pathlib.Path(__file__).resolve().parent / 'traces'
_SOURCES = {
    'trace': ('models/nets.py', 'models/trace.py'),
    'discovery': ('models/nets.py', 'models/trace.py', 'models/discover.py', 'core/units.py'),
}


@functools.lru_cache(maxsize=4)
def _sources_digest(kind: str = 'trace') -> str:
  package = pathlib.Path(__file__).resolve().parents[1]
  h = hashlib.sha256()
  for name in _SOURCES[kind]:
    h.update((package / name).read_bytes())
  return h.hexdigest()


def _disk_path(spec, kind: str = 'trace', extra: Any = ()) -> pathlib.Path | None:
  """Where the ``kind`` ('trace' or 'discovery') of ``spec`` is kept:
  ``<JAX compilation cache>/lbyl_jax_traces``, keyed by the preset's name, its model's fields
  (``repr``), its input shape, ``extra`` (the discovery policy), the source of the modules that
  compute it (:data:`_SOURCES`), and the flax / jax versions. Only models built from
  :mod:`lbyl_jax.models.nets` classes are kept (their code is what the key hashes); None when the
  compilation cache is off (``--compile-cache off``)."""
  base = jax.config.jax_compilation_cache_dir
  if not base or type(spec.model).__module__ != nets.__name__:
    return None
  key = repr((kind, spec.name, repr(spec.model), tuple(spec.input_shape), extra,
              _sources_digest(kind), flax.__version__, jax.__version__))
  digest = hashlib.sha256(key.encode()).hexdigest()
  suffix = '' if kind == 'trace' else f'-{kind}'
  return pathlib.Path(base) / DISK_SUBDIR / f'{spec.name}{suffix}-{digest[:32]}.json'


def _shipped_path(path: pathlib.Path) -> pathlib.Path:
  """The shipped copy of the disk cache's file ``path`` (:data:`SHIPPED_DIR`)."""
  return SHIPPED_DIR / (path.name + '.gz')


def discovery_on_disk(spec, compute: Callable[[], units_lib.Discovery]) -> units_lib.Discovery:
  """``compute()`` (the discovery of a preset), read from disk when an earlier run kept it
  (:func:`_disk_path`, kind 'discovery'); written after computing when its JSON form reads back
  equal (:func:`lbyl_jax.core.units.discovery_to_json`). An unreadable file is replaced."""
  path = _discovery_path(spec)
  for text in _stored_texts(path):
    try:
      return units_lib.discovery_from_json(json.loads(text))
    except (ValueError, KeyError, TypeError):
      pass  # unreadable: the next source, else discover again and replace it
  found = compute()
  if path is not None:
    try:
      data = units_lib.discovery_to_json(found)
      text = json.dumps(data)
      exact = units_lib.discovery_to_json(units_lib.discovery_from_json(json.loads(text))) == data
    except (TypeError, ValueError):
      exact = False  # a field JSON cannot hold exactly: not kept
    if exact:
      _write_atomic(path, text)
  return found


def _discovery_path(spec) -> pathlib.Path | None:
  return _disk_path(spec, 'discovery', extra=(tuple(spec.policy), tuple(spec.apply_kwargs)))


def _to_json(t: LayerTrace) -> dict[str, Any]:
  flat = [[[str(k.key) for k in path], list(leaf.shape), np.dtype(leaf.dtype).name]
          for path, leaf in jax.tree_util.tree_flatten_with_path(t.abstract)[0]]
  return dict(order=list(t.order), bn=dict(t.bn), abstract=flat)


def _from_json(d: Mapping[str, Any]) -> LayerTrace:
  abstract: dict[str, Any] = {}
  for keys, shape, dtype in d['abstract']:
    node = abstract
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))
  return LayerTrace(order=tuple(d['order']), bn=dict(d['bn']), abstract=abstract)


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
# Derived from the one trace and the discovered units.


def _with_axis(shape: tuple[int, ...], axis: int, size: int) -> tuple[int, ...]:
  shape = list(shape)
  shape[axis] = size
  return tuple(shape)


def abstract_variables_at(spec, widths: Sequence[int]) -> Any:
  """ShapeDtypeStructs of ``spec``'s variables at ``widths`` (one per unit), derived from the
  original-width trace and the discovered units (module docstring): no tracing.

  A unit pruned from n to w channels removes n - w channels from: its producer's kernel / bias
  (last axis), its BatchNorm's four vectors, each consumer's input (conv: kernel axis -2; dense:
  ``(n - w) * flatten`` kernel rows) and each per-channel layer between them (BN vectors;
  depthwise conv: kernel and bias last axis). Several units feeding one consumer (a
  concatenation) each remove their own channels.
  """
  traced = trace_layers(spec)
  widths = tuple(int(w) for w in widths)
  units = spec.units
  if len(widths) != len(units):
    raise ValueError(f'{spec.name}: expected {len(units)} widths, got {len(widths)}')
  shapes: dict[tuple[str, ...], tuple[tuple[int, ...], Any]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(traced.abstract)[0]:
    shapes[tuple(str(p.key) for p in path)] = (tuple(leaf.shape), leaf.dtype)

  def shrink(key: tuple[str, ...], axis: int, by: int, what: str, required: bool = True) -> None:
    if key not in shapes:
      if required:
        raise ValueError(f'{spec.name}: unit {what} has no variable {"/".join(key)}')
      return
    shape, dtype = shapes[key]
    shapes[key] = (_with_axis(shape, axis, shape[axis] - by), dtype)

  def shrink_bn(path: str, by: int, what: str) -> None:
    bn = tuple(path.split('/'))
    for col, leaf in (('params', 'scale'), ('params', 'bias'), ('batch_stats', 'mean'),
                      ('batch_stats', 'var')):
      shrink((col, *bn, leaf), -1, by, what, required=False)

  for unit, w in zip(units, widths):
    prod = tuple(unit.producer.split('/'))
    n = shapes[('params', *prod, 'kernel')][0][-1] if ('params', *prod, 'kernel') in shapes else w
    by = n - w
    if by < 0:
      raise ValueError(f'{spec.name}: unit {unit.name} has {n} channels, asked for {w}')
    if by == 0:
      continue
    shrink(('params', *prod, 'kernel'), -1, by, unit.name)
    shrink(('params', *prod, 'bias'), -1, by, unit.name, required=False)
    if unit.bn is not None:
      shrink_bn(unit.bn, by, unit.name)
    for layer in unit.through:
      if layer.kind == 'bn':
        shrink_bn(layer.path, by, unit.name)
      else:  # depthwise conv: one output channel per input channel
        thru = tuple(layer.path.split('/'))
        shrink(('params', *thru, 'kernel'), -1, by, unit.name)
        shrink(('params', *thru, 'bias'), -1, by, unit.name, required=False)
    for con in unit.consumers:
      key = ('params', *con.path.split('/'), 'kernel')
      if con.kind == 'conv':
        shrink(key, -2, by, unit.name)
      else:
        shrink(key, 0, by * con.flatten, unit.name)
  out: dict[str, Any] = {}
  for key, (shape, dtype) in shapes.items():
    node = out
    for k in key[:-1]:
      node = node.setdefault(k, {})
    node[key[-1]] = jax.ShapeDtypeStruct(shape, dtype)
  return out
