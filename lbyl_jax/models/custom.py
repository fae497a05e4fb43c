"""A user's own flax.linen CNN as an architecture: discovered units, and modules of smaller widths.

:func:`custom_spec` wraps any module in an :class:`~lbyl_jax.models.archs.ArchSpec` whose units
come from :func:`lbyl_jax.models.discover.discover`, so the whole plan (selection, methods,
corrections, surgery, quantization, evaluation, saving) runs on it as on a preset.

A compressed user model is, in this order of preference:

1. the same class, when ``width_fields={field: unit name or [unit names]}`` says which constructor
   fields hold which widths (``module.clone(field=width or (widths,))``);
2. the same class, when it has a ``widths`` field (the presets' convention: one width per
   discovered unit, in order) and cloning with it gives exactly the pruned shapes;
3. otherwise :class:`PrunedModule`, an equivalent module: it runs the user's module in the same
   variable scope (``nn.share_scope``) under ``nn.intercept_methods``, and every nn.Conv /
   nn.Dense call is replaced by a clone bound to the same scope with the pruned ``features`` (and
   ``feature_group_count`` for depthwise convs), so ``init`` creates the pruned shapes and
   ``apply`` runs the pruned variables; it jits like any module.

``--model pkg.module:factory`` (:func:`load_factory`) imports a user's factory: it returns the
module; or (module, variables); or (module, {checkpoint key: Flax path}).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from lbyl_jax.core import trees
from lbyl_jax.core.units import DEFAULT_POLICY, Discovery
from lbyl_jax.models import archs

# NM defaults when the caller gives none: the official scripts' conv + BN values (docs/neuron_merging.md).
DEFAULT_HPARAMS = {'nm': {'t': 0.1, 'lam': 0.85}}


class PrunedModule(nn.Module):
  """``inner`` called with ``kwargs``, with the nn.Conv / nn.Dense widths of ``layers``, in
  ``inner``'s own variable tree (no extra level of names).

  Attributes:
    inner: the user's module (original widths).
    layers: ((path, features, kernel input channels per group), ...) for every nn.Conv /
      nn.Dense to resize; paths are relative to ``inner``. A conv's group count becomes
      (input channels) / (per group), so a depthwise conv follows its input's width.
    kwargs: ((name, value), ...) extra keyword arguments of every call (e.g. train=False).
  """

  inner: nn.Module
  layers: tuple[tuple[str, int, int], ...] = ()
  kwargs: tuple[tuple[str, Any], ...] = ()

  def setup(self):
    nn.share_scope(self, self.inner)

  def __call__(self, *args, **kwargs):
    table = {p: (f, g) for p, f, g in self.layers}
    base = len(self.path)
    kwargs = {**dict(self.kwargs), **kwargs}
    if not table:
      return self.inner(*args, **kwargs)

    def interceptor(next_fun, a, kw, ctx):
      mod = ctx.module
      if ctx.method_name != '__call__' or not isinstance(mod, (nn.Conv, nn.Dense)):
        return next_fun(*a, **kw)
      path = '/'.join(mod.path[base:])
      if path not in table:
        return next_fun(*a, **kw)
      features, per_group = table[path]
      update: dict[str, int] = {'features': features}
      if isinstance(mod, nn.Conv):
        update['feature_group_count'] = max(1, int(a[0].shape[-1]) // per_group)
      if all(getattr(mod, k) == v for k, v in update.items()):
        return next_fun(*a, **kw)  # already the clone (or unchanged)
      clone = mod.clone(parent=mod.scope, **update)
      return getattr(clone, ctx.method_name)(*a, **kw)

    with nn.intercept_methods(interceptor):
      return self.inner(*args, **kwargs)


def _init_shapes(module: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
  x = jax.ShapeDtypeStruct((1, *input_shape), np.float32)
  out = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), x)
  return {k: tuple(v.shape) for k, v in trees.flatten(out).items()}


@dataclasses.dataclass(frozen=True, eq=False)
class CustomBuilder:
  """How a custom architecture builds its module for given widths (see the module docstring)."""

  module: nn.Module
  kwargs: tuple[tuple[str, Any], ...] = ()
  width_fields: tuple[tuple[str, Any], ...] | None = None

  def pruned_module(self, discovery: Discovery, widths: Sequence[int]) -> PrunedModule:
    new = dict(zip((u.producer for u in discovery.units), widths))
    drop: dict[str, int] = {}
    for u, w in zip(discovery.units, widths):
      for t in u.through:
        if t.kind == 'depthwise':
          drop[t.path] = drop.get(t.path, 0) + u.width - int(w)
    layers = []
    for layer in discovery.layers:
      if layer.kind not in ('conv', 'dense'):
        continue
      features = new.get(layer.path, layer.features - drop.get(layer.path, 0))
      per_group = layer.in_features // max(layer.groups, 1)
      layers.append((layer.path, int(features), int(per_group)))
    return PrunedModule(self.module, tuple(layers), self.kwargs)

  def kind(self, spec: archs.ArchSpec, widths: tuple[int, ...]) -> str:
    """How :meth:`build` makes the module of these widths: 'width_fields', 'widths field' (the
    same class) or 'PrunedModule' (the equivalent module)."""
    module = self.build(spec, widths)
    if isinstance(module, PrunedModule) and module.layers:
      return 'PrunedModule'
    return 'width_fields' if self.width_fields else 'widths field'

  def _wrap(self, module: nn.Module) -> nn.Module:
    """The module itself, or inside a PrunedModule that passes the call keyword arguments."""
    return PrunedModule(module, (), self.kwargs) if self.kwargs else module

  def build(self, spec: archs.ArchSpec, widths: tuple[int, ...] | None) -> nn.Module:
    if widths is None:
      return self._wrap(self.module)
    equivalent = self.pruned_module(spec.discovery, widths)
    names = [u.name for u in spec.discovery.units]
    width = dict(zip(names, widths))
    fields = set(getattr(self.module, '__dataclass_fields__', {}))
    if self.width_fields:
      update = {}
      for field, which in self.width_fields:
        if field not in fields:
          raise ValueError(f'width_fields: {type(self.module).__name__} has no field {field!r}')
        seq = [which] if isinstance(which, str) else list(which)
        missing = [u for u in seq if u not in width]
        if missing:
          raise ValueError(f'width_fields[{field!r}]: no prunable unit named {missing}')
        update[field] = width[seq[0]] if isinstance(which, str) else tuple(width[u] for u in seq)
      cand = self._wrap(self.module.clone(**update))
      if _init_shapes(cand, spec.input_shape) != _init_shapes(equivalent, spec.input_shape):
        raise ValueError(f'width_fields {dict(self.width_fields)} do not give the pruned shapes')
      return cand
    if 'widths' in fields:
      cand = self._wrap(self.module.clone(widths=tuple(int(w) for w in widths)))
      try:
        if _init_shapes(cand, spec.input_shape) == _init_shapes(equivalent, spec.input_shape):
          return cand
      except Exception:  # pylint: disable=broad-except  (a widths field of another meaning)
        pass
    return equivalent


def custom_spec(module: nn.Module, example_shape: Sequence[int], *, name: str | None = None,
                policy: Sequence[str] = DEFAULT_POLICY,
                width_fields: Mapping[str, str | Sequence[str]] | None = None,
                apply_kwargs: Mapping[str, Any] | None = None,
                hparams: Mapping[str, Mapping[str, Any]] | None = None,
                mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
                num_classes: int | None = None) -> archs.ArchSpec:
  """An architecture for a user's module (not registered; see the module docstring).

  Args:
    module: a flax.linen Module with its original widths.
    example_shape: input shape WITH the batch axis, e.g. (1, 32, 32, 3).
    name: for reports (default: the class name).
    policy: discovery policy (default: leave out the classifier head and a residual stem, as the
      papers do; ``()`` prunes everything prunable).
    width_fields: {constructor field: unit name or [unit names]}: which fields take which widths.
    apply_kwargs: keyword arguments of every inference call (e.g. {'train': False}).
    hparams: per-method defaults in the presets' form (default: NM's t = 0.1, lam = 0.85).
    mean, std: normalization of uint8 images for evaluation (x / 255 - mean) / std.
    num_classes: for evaluation's top-5 (default: the model's output width).
  """
  if not isinstance(module, nn.Module):
    raise ValueError(f'expected a flax.linen Module, got {type(module).__name__}')
  shape = tuple(int(s) for s in example_shape)
  if len(shape) < 2:
    raise ValueError(f'example_shape must include the batch axis, got {tuple(example_shape)}')
  kwargs = tuple(sorted(dict(apply_kwargs or {}).items()))
  builder = CustomBuilder(module, kwargs,
                          None if width_fields is None else tuple(dict(width_fields).items()))
  wrapped = PrunedModule(module, (), kwargs) if kwargs else module
  if num_classes is None:
    out = jax.eval_shape(lambda x: wrapped.init_with_output(jax.random.PRNGKey(0), x)[0],
                         jax.ShapeDtypeStruct((1, *shape[1:]), np.float32))
    num_classes = int(out.shape[-1])
  return archs.ArchSpec(
      name=name or type(module).__name__, family='custom', model=wrapped,
      input_shape=shape[1:], mean=tuple(mean), std=tuple(std), num_classes=num_classes,
      dataset=None, torch_naming=None,
      hparams=dict(hparams) if hparams is not None else DEFAULT_HPARAMS,
      description=f'user model {type(module).__name__}', policy=tuple(policy), builder=builder,
      discover_module=module, apply_kwargs=kwargs)


# --------------------------------------------------------------------------------------------
# --model pkg.module:factory


@dataclasses.dataclass(frozen=True)
class Factory:
  """What a user's model factory gave: the module and optionally variables or a key mapping.

  Attributes:
    module: the flax.linen Module.
    variables: its variables, if the factory returned them.
    key_map: {checkpoint key: Flax path} for loading weights from a file, if returned.
    spec: the 'pkg.module:factory' string.
  """

  module: nn.Module
  variables: Mapping[str, Any] | None = None
  key_map: Mapping[str, str] | None = None
  spec: str = ''


def normalize_factory_output(out: Any, spec: str = '') -> Factory:
  """A factory's return value -> :class:`Factory`: a Module; (Module, variables); or (Module,
  {checkpoint key: Flax path})."""
  where = f'{spec}: ' if spec else ''
  if isinstance(out, nn.Module):
    return Factory(out, spec=spec)
  if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], nn.Module):
    module, extra = out
    if isinstance(extra, Mapping) and 'params' in extra and isinstance(extra['params'], Mapping):
      return Factory(module, variables=extra, spec=spec)
    if isinstance(extra, Mapping) and extra and all(
        isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
      return Factory(module, key_map=dict(extra), spec=spec)
    raise ValueError(f"{where}the factory's second value must be variables (a mapping with a"
                     f" 'params' collection) or a non-empty {{checkpoint key: Flax path}} mapping,"
                     f' got {type(extra).__name__}')
  raise ValueError(f'{where}the factory must return a flax.linen Module, (module, variables) or'
                   f' (module, key mapping); got {type(out).__name__}')


def load_factory(spec: str) -> Factory:
  """Imports ``'pkg.module:factory'`` (the attribute may be dotted, e.g. 'pkg.mod:Cls.build'),
  calls it without arguments (a Module instance is used as is) and normalizes its return."""
  if not isinstance(spec, str) or spec.count(':') != 1 or not all(spec.split(':')):
    raise ValueError(f"--model must look like 'pkg.module:factory', got {spec!r}")
  mod_name, attr = spec.split(':')
  try:
    obj: Any = importlib.import_module(mod_name)
  except ImportError as e:
    raise ValueError(f'--model {spec}: cannot import {mod_name!r}: {e}') from e
  for part in attr.split('.'):
    if not hasattr(obj, part):
      raise ValueError(f'--model {spec}: {type(obj).__name__} {getattr(obj, "__name__", "")!r}'
                       f' has no attribute {part!r}')
    obj = getattr(obj, part)
  if isinstance(obj, nn.Module):
    return Factory(obj, spec=spec)
  if not callable(obj):
    raise ValueError(f'--model {spec}: {attr!r} is not callable ({type(obj).__name__})')
  try:
    out = obj()
  except TypeError as e:
    raise ValueError(f'--model {spec}: the factory must be callable without arguments: {e}') from e
  return normalize_factory_output(out, spec)
