"""Prunable units of any ``flax.linen`` CNN, discovered by tracing (the presets' too).

:func:`discover` traces ``module.apply`` to a jaxpr while :func:`flax.linen.intercept_methods`
opens a named scope around every module call, so each primitive is attributed to the module call
it belongs to. ``nn.Conv``, ``nn.Dense`` and ``nn.BatchNorm`` calls become opaque layer nodes (their
path, attributes and jaxpr inputs / outputs); everything between them (activations, pooling,
reshapes, transposes, concatenations, residual adds, ...) stays as primitives. From every
Conv / Dense (the producers) a walk follows the producer's channels forward, carrying an integer
label array (which producer channel every element holds, -1 for foreign data) through the
primitives, until each path reaches a linear consumer, fails, or meets another tensor in an add.

What a walk understands (docs/README.md, "Which layers are pruned"):

- producer -> optional BatchNorm (its only user) -> elementwise activation -> consumer(s);
  the activation is classified NUMERICALLY by evaluating the traced elementwise region on probe
  values ('relu', 'relu6', 'gelu', 'gelu_tanh', 'silu', 'leaky_relu', 'hard_swish', 'elu',
  'softplus', 'sigmoid', 'tanh', 'identity', 'linear', 'affine', else 'elementwise'), whatever
  the code that wrote it;
- pooling (``reduce_window`` max / sum, global ``reduce_sum`` / ``reduce_max`` over positions),
  scalar scaling (an average pool's division), reshape / transpose (flatten in NCHW or NHWC order,
  recovered from the labels), concatenation (channel offsets), spatial slicing and padding;
- consumers: ``nn.Conv`` with one group (HWIO input axis) and ``nn.Dense`` (contracting the last
  axis, after a flatten or not);
- channels a depthwise ``nn.Conv`` (groups == input channels) or a BatchNorm receives after the
  producer's activation are "through" layers, pruned with the unit (input channel j is output
  channel j); the unit then has a non-linear path: the 'depthwise' compensation when it is an
  inverted residual's (below), else plain pruning;
- residual adds (two data tensors added) tie the channels of every producer reaching the add
  (union-find over add sites): such producers form a :class:`Coupling` and are not pruned (pruning
  a whole tied group is not implemented);
- anything else makes the producer unprunable, with the reason in :class:`Blocked`: reaching the
  network output; a grouped conv (groups < channels) or a depthwise conv with a depth multiplier;
  a product / max with another tensor (gating, attention); a channel reduction (LayerNorm,
  GroupNorm, a mean over channels); a kernel computed inside the layer call (weight
  standardization, weight norm); a layer called more than once (shared weights); channels split,
  duplicated or shuffled before a consumer; a BatchNorm over a non-last axis; an unknown primitive
  (control flow, gathers, einsum layers other than nn.Dense, transposed convs, ...).

Compensation ('exact', 'maxpool_approx', 'prune_only'): the closed forms (NM, LBYL, BN-moments,
bias correction) need producer -> (BN) -> ReLU -> linear consumer. A max-pool between the ReLU and
the consumer is ignored as the reference codes do ('maxpool_approx', a stated approximation);
an average pool, a global mean, a flatten or a concatenation is linear ('exact': the delivery
a_P ~ S_P a_K + c folded into the consumer is the same algebra). The path of an inverted residual,
(BN) -> ReLU / ReLU6 -> depthwise conv (multiplier 1) -> BN -> ReLU / ReLU6 -> linear consumer(s),
exactly that and nothing else, is 'depthwise': its compensation is derived through the depthwise
conv in docs/mobilenet_v2.md and computed by :mod:`lbyl_jax.pruning.depthwise`. Every other
activation, a BN or depthwise conv between the activation and the consumer, or a second
activation gives 'prune_only' (S_P = 0) with the reason. "exact" is about the algebra of the fold; the delivery
itself is the method's fit.

Policy (the papers' convention that the presets follow): ``'head'`` excludes Dense producers
that run after the network's last convolution (classifier layers of a CNN; an MLP keeps its hidden
layers), ``'residual_stem'`` excludes, in a network with residual adds, the producers that read
the network input (the stem), ``'compensable'`` excludes units whose compensation would be
'prune_only' (the MobileNetV2 presets: their linear-bottleneck projections and the last 1x1 conv
are not pruned, only the expanded channels). With both (the default) discovery on every preset of
:mod:`lbyl_jax.models.archs` returns exactly the units the papers prune (a test pins them). ``policy=()`` keeps
everything structurally prunable.

Surgery on these units is :func:`lbyl_jax.pruning.surgery.apply_plan`; the data types are in
:mod:`lbyl_jax.core.units`.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lbyl_jax.core import trees
from lbyl_jax.core.units import (COMPENSATIONS, DEFAULT_POLICY, POLICY_RULES, Blocked, ConvGeometry,
                                 Consumer, Coupling, Discovery, Excluded, Layer, Through, Unit)


# --------------------------------------------------------------------------------------------
# Tracing: a flat list of primitives, each attributed to the module call it ran in.

_CALL_RE = re.compile(r'lbyl_call(\d+)')
_INLINE = {'jit': 'jaxpr', 'pjit': 'jaxpr', 'custom_jvp_call': 'call_jaxpr',
           'custom_vjp_call': 'call_jaxpr', 'custom_vjp_call_jaxpr': 'fun_jaxpr',
           'closed_call': 'call_jaxpr', 'core_call': 'call_jaxpr', 'remat': 'jaxpr',
           'checkpoint': 'jaxpr', 'named_call': 'call_jaxpr'}


@dataclasses.dataclass
class _Lit:
  value: Any


@dataclasses.dataclass
class _Eqn:
  index: int
  prim: Any
  ins: list  # int var ids or _Lit
  outs: list[int]
  params: dict
  calls: tuple[int, ...]  # module call ids, outermost first

  @property
  def name(self) -> str:
    return self.prim.name


@dataclasses.dataclass
class _Call:
  index: int
  path: str
  module: nn.Module
  kind: str | None  # 'conv' | 'dense' | 'bn' for leaf layers, None otherwise


@dataclasses.dataclass
class _Node:
  """A Conv / Dense / BatchNorm call collapsed into one step of the program."""

  index: int  # position in the program (first primitive)
  call: _Call
  input: int | None
  output: int | None
  eqns: list[_Eqn]
  conv: _Eqn | None = None

  @property
  def path(self) -> str:
    return self.call.path

  @property
  def kind(self) -> str:
    return self.call.kind


class _Program:
  """The flattened jaxpr of ``module.apply`` with layer nodes, uses and constant evaluation."""

  def __init__(self, closed, leaf_paths: list[tuple[str, str]], leaf_values: list[Any],
               calls: list[_Call]):
    self.calls = calls
    self.shape: dict[int, tuple[int, ...]] = {}
    self.dtype: dict[int, Any] = {}
    self.eqns: list[_Eqn] = []
    self.param_of: dict[int, tuple[str, str]] = {}  # var -> (collection, '/'-path of the leaf)
    self.value: dict[int, Any] = {}  # known constant values (closed-over consts, leaves)
    self._next = 0
    jaxpr = closed.jaxpr
    env: dict[Any, Any] = {}
    n_leaves = len(leaf_paths)
    for i, v in enumerate(jaxpr.invars):
      vid = self._new(v.aval)
      env[v] = vid
      if i < n_leaves:
        self.param_of[vid] = leaf_paths[i]
        if leaf_values[i] is not None:
          self.value[vid] = leaf_values[i]
    self.input_vars = [env[v] for v in jaxpr.invars[n_leaves:]]
    for v, c in zip(jaxpr.constvars, closed.consts):
      vid = self._new(v.aval)
      env[v] = vid
      self.value[vid] = c
    self._inline(jaxpr, env, ())
    self.outputs = set()
    for v in jaxpr.outvars:
      a = self._read(env, v)
      if isinstance(a, int):
        self.outputs.add(a)
    self.producer_of: dict[int, _Eqn] = {}
    for e in self.eqns:
      for o in e.outs:
        self.producer_of[o] = e
    # Data: depends on the model input.
    self.data: set[int] = set(self.input_vars)
    for e in self.eqns:
      if any(isinstance(a, int) and a in self.data for a in e.ins):
        self.data.update(e.outs)
    self._build_nodes()

  # -- construction

  def _new(self, aval) -> int:
    vid = self._next
    self._next += 1
    self.shape[vid] = tuple(getattr(aval, 'shape', ()))
    self.dtype[vid] = getattr(aval, 'dtype', None)
    return vid

  @staticmethod
  def _read(env, v):
    if isinstance(v, jax.extend.core.Literal):
      return _Lit(v.val)
    return env[v]

  def _inline(self, jaxpr, env, outer_calls: tuple[int, ...]) -> None:
    for eqn in jaxpr.eqns:
      stack = str(eqn.source_info.name_stack)
      calls = outer_calls + tuple(int(m) for m in _CALL_RE.findall(stack))
      ins = [self._read(env, v) for v in eqn.invars]
      key = _INLINE.get(eqn.primitive.name)
      sub = eqn.params.get(key) if key else None
      if sub is not None:
        closed = sub if isinstance(sub, jax.extend.core.ClosedJaxpr) else None
        inner = closed.jaxpr if closed is not None else sub
        sub_env: dict[Any, Any] = {}
        if closed is not None:
          for v, c in zip(inner.constvars, closed.consts):
            vid = self._new(v.aval)
            self.value[vid] = c
            sub_env[v] = vid
        if len(inner.invars) != len(ins):
          raise ValueError(f'cannot inline {eqn.primitive.name}: {len(inner.invars)} inputs for'
                           f' {len(ins)} operands')
        for v, a in zip(inner.invars, ins):
          sub_env[v] = a
        self._inline(inner, sub_env, calls)
        for v, o in zip(eqn.outvars, inner.outvars):
          env[v] = self._read(sub_env, o)
        continue
      outs = []
      for v in eqn.outvars:
        vid = self._new(v.aval)
        env[v] = vid
        outs.append(vid)
      self.eqns.append(_Eqn(len(self.eqns), eqn.primitive, ins, outs, dict(eqn.params), calls))

  def _build_nodes(self) -> None:
    """Groups the primitives of every leaf-layer call into a node; the rest stay primitives."""
    leaf = {c.index for c in self.calls if c.kind is not None}
    groups: dict[int, list[_Eqn]] = {}
    self.items: list[Any] = []  # _Node or _Eqn, in program order
    for e in self.eqns:
      owner = next((c for c in e.calls if c in leaf), None)
      if owner is None:
        self.items.append(e)
        continue
      if owner not in groups:
        groups[owner] = []
        self.items.append(owner)  # placeholder, replaced below
      groups[owner].append(e)
    readers: dict[int, list[int]] = {}  # var -> ids of the primitives reading it
    for e in self.eqns:
      for a in e.ins:
        if isinstance(a, int):
          readers.setdefault(a, []).append(id(e))
    self.nodes: dict[int, _Node] = {}
    for owner, eqns in groups.items():
      produced = {o for e in eqns for o in e.outs}
      inputs = []
      for e in eqns:
        for a in e.ins:
          if isinstance(a, int) and a in self.data and a not in produced and a not in inputs:
            inputs.append(a)
      ids = {id(e) for e in eqns}
      outputs = [o for e in eqns for o in e.outs
                 if o in self.outputs or any(r not in ids for r in readers.get(o, ()))]
      conv = next((e for e in eqns if e.name == 'conv_general_dilated'), None)
      node = _Node(eqns[0].index, self.calls[owner], inputs[0] if len(inputs) == 1 else None,
                   outputs[0] if len(outputs) == 1 else None, eqns, conv)
      node.n_inputs, node.n_outputs = len(inputs), len(outputs)
      self.nodes[owner] = node
    self.items = [self.nodes[i] if isinstance(i, int) else i for i in self.items]
    self.uses: dict[int, list[tuple[Any, int]]] = {}
    for item in self.items:
      if isinstance(item, _Node):
        if item.input is not None:
          self.uses.setdefault(item.input, []).append((item, 0))
        continue
      for pos, a in enumerate(item.ins):
        if isinstance(a, int):
          self.uses.setdefault(a, []).append((item, pos))
    self.node_of_output = {n.output: n for n in self.nodes.values() if n.output is not None}

  # -- constants

  def const(self, a) -> Any:
    """The concrete value of a constant operand; raises _Unknown for abstract leaves."""
    if isinstance(a, _Lit):
      return a.value
    if a in self.value:
      return self.value[a]
    if a in self.data:
      raise _Unknown(f'var {a} depends on the input')
    if a in self.param_of:
      raise _Unknown(f'{self.param_of[a][1]} is abstract')
    e = self.producer_of[a]
    vals = [self.const(x) for x in e.ins]
    out = e.prim.bind(*vals, **e.params)
    outs = out if e.prim.multiple_results else [out]
    for o, val in zip(e.outs, outs):
      self.value[o] = val
    return self.value[a]

  def is_const(self, a) -> bool:
    return isinstance(a, _Lit) or a not in self.data


class _Unknown(Exception):
  pass


_LEAF_KINDS: tuple[tuple[type, str], ...] = ((nn.Conv, 'conv'), (nn.Dense, 'dense'),
                                             (nn.BatchNorm, 'bn'))


def _leaf_kind(module: nn.Module) -> str | None:
  for cls, kind in _LEAF_KINDS:
    if isinstance(module, cls):
      return kind
  return None


def _example(example_shape) -> jax.ShapeDtypeStruct:
  if isinstance(example_shape, jax.ShapeDtypeStruct):
    return example_shape
  if hasattr(example_shape, 'shape') and hasattr(example_shape, 'dtype'):
    return jax.ShapeDtypeStruct(tuple(example_shape.shape), example_shape.dtype)
  try:
    shape = tuple(int(s) for s in example_shape)
  except (TypeError, ValueError):
    raise ValueError(f'example_shape must be a shape tuple (with the batch axis), an array or a'
                     f' jax.ShapeDtypeStruct, got {example_shape!r}') from None
  if not shape or any(s < 1 for s in shape):
    raise ValueError(f'example_shape must be positive sizes with the batch axis first, got {shape}')
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def _path_key(p) -> str:
  return str(getattr(p, 'key', getattr(p, 'idx', getattr(p, 'name', p))))


def trace(module: nn.Module, variables: Mapping[str, Any], example_shape, *,
          apply_kwargs: Mapping[str, Any] | None = None) -> _Program:
  """The flattened, layer-attributed jaxpr of ``module.apply(variables, x, **apply_kwargs)``."""
  if not isinstance(module, nn.Module):
    raise ValueError(f'module must be a flax.linen Module, got {type(module).__name__}')
  if not isinstance(variables, Mapping) or 'params' not in variables:
    raise ValueError("variables must be a mapping with a 'params' collection")
  x = _example(example_shape)
  kwargs = dict(apply_kwargs or {})
  flat, _ = jax.tree_util.tree_flatten_with_path(dict(variables))
  leaf_paths, leaf_values, abstract = [], [], []
  for path, leaf in flat:
    keys = [_path_key(p) for p in path]
    leaf_paths.append((keys[0], '/'.join(keys[1:])))
    concrete = not isinstance(leaf, jax.ShapeDtypeStruct)
    leaf_values.append(leaf if concrete else None)
    abstract.append(jax.ShapeDtypeStruct(np.shape(leaf), getattr(leaf, 'dtype', None)
                                         or np.asarray(leaf).dtype))
  treedef = jax.tree_util.tree_structure(dict(variables))
  calls: list[_Call] = []

  def interceptor(next_fun, args, kw, ctx):
    if ctx.method_name != '__call__':
      return next_fun(*args, **kw)
    k = len(calls)
    calls.append(_Call(k, '/'.join(ctx.module.path), ctx.module, _leaf_kind(ctx.module)))
    with jax.named_scope(f'lbyl_call{k}'):
      return next_fun(*args, **kw)

  def fn(leaves, x):
    return module.apply(jax.tree_util.tree_unflatten(treedef, leaves), x, **kwargs)

  try:
    with nn.intercept_methods(interceptor):
      closed = jax.make_jaxpr(fn)(abstract, x)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f'tracing {type(module).__name__}.apply on input {x.shape} failed: {type(e).__name__}: {e}'
        ' (discovery needs inference mode: BatchNorm with use_running_average=True, e.g.'
        " apply_kwargs={'train': False})") from e
  return _Program(closed, leaf_paths, leaf_values, calls)


# --------------------------------------------------------------------------------------------
# Elementwise regions and their numerical classification.

_ELEMENTWISE = frozenset((
    'neg', 'exp', 'exp2', 'log', 'log1p', 'expm1', 'tanh', 'logistic', 'erf', 'erfc', 'erf_inv',
    'sqrt', 'rsqrt', 'cbrt', 'abs', 'sign', 'floor', 'ceil', 'round', 'sin', 'cos', 'tan',
    'integer_pow', 'square', 'is_finite', 'not', 'convert_element_type', 'reduce_precision',
    'copy', 'copy_p', 'add', 'sub', 'mul', 'div', 'max', 'min', 'pow', 'select_n', 'ge', 'gt',
    'le', 'lt', 'eq', 'ne', 'and', 'or', 'xor', 'clamp', 'atan2', 'rem', 'nextafter', 'add_any',
    'stop_gradient', 'asinh', 'acosh', 'atanh', 'sinh', 'cosh', 'asin', 'acos', 'atan',
))

_PROBE = np.concatenate([np.linspace(-8.0, 8.0, 321), [-1e-3, 1e-3, 0.5, -0.5, 3.0, 6.0, 7.0]])


def _erf(x):
  import scipy.special  # pylint: disable=import-outside-toplevel
  return scipy.special.erf(x)


def _sigmoid(x):
  return 0.5 * (1.0 + np.tanh(0.5 * x))


_CATALOGUE: tuple[tuple[str, Callable[[np.ndarray], np.ndarray]], ...] = (
    ('relu', lambda x: np.maximum(x, 0.0)),
    ('relu6', lambda x: np.clip(x, 0.0, 6.0)),
    ('gelu', lambda x: 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))),
    ('gelu_tanh', lambda x: 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))),
    ('silu', lambda x: x * _sigmoid(x)),
    ('hard_swish', lambda x: x * np.clip(x + 3.0, 0.0, 6.0) / 6.0),
    ('hard_sigmoid', lambda x: np.clip(x + 3.0, 0.0, 6.0) / 6.0),
    ('elu', lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0)))),
    ('selu', lambda x: 1.0507009873554805 * np.where(x > 0, x, 1.6732632423543772 * np.expm1(np.minimum(x, 0.0)))),
    ('softplus', lambda x: np.logaddexp(x, 0.0)),
    ('sigmoid', _sigmoid),
    ('tanh', np.tanh),
    ('mish', lambda x: x * np.tanh(np.logaddexp(x, 0.0))),
)


def classify(x: np.ndarray, y: np.ndarray) -> tuple[str, float]:
  """(name, gain) of the scalar function with y = f(x) elementwise ('elementwise' if none fits).

  'linear' (y = gain x), 'identity' (gain 1), 'relu' (y = gain max(x, 0), gain > 0), the
  catalogue above (gain 1), 'leaky_relu' (slope in (0, 1)), 'affine' (y = a x + b, b != 0).
  """
  x = np.asarray(x, np.float64).reshape(-1)
  y = np.asarray(y, np.float64).reshape(-1)
  if x.shape != y.shape or not np.all(np.isfinite(y)):
    return 'elementwise', 1.0

  def close(ref):
    return np.allclose(y, ref, rtol=1e-4, atol=1e-5)

  one = np.flatnonzero(np.isclose(x, 1.0))
  g = float(y[one[0]]) if one.size else 1.0
  if close(x):
    return 'identity', 1.0
  if g != 0 and close(g * x):
    return 'linear', g
  if g > 0 and close(g * np.maximum(x, 0.0)):
    return 'relu', g
  for name, fn in _CATALOGUE[1:]:
    if close(fn(x)):
      return name, 1.0
  neg = np.flatnonzero(np.isclose(x, -1.0))
  if neg.size:
    slope = -float(y[neg[0]])
    if 0 < slope < 1 and close(np.where(x > 0, x, slope * x)):
      return 'leaky_relu', 1.0
  a = np.polyfit(x, y, 1)
  if close(np.polyval(a, x)):
    return 'affine', float(a[0])
  return 'elementwise', 1.0


@dataclasses.dataclass
class _Region:
  ident: int
  eqns: list[_Eqn]
  outputs: dict[int, tuple[str, float]]  # output var -> (activation name, gain)


class _Regions:
  """Maximal elementwise regions rooted at a data var, classified on probe values."""

  def __init__(self, prog: _Program):
    self.prog = prog
    self.cache: dict[int, _Region] = {}

  def get(self, root: int) -> _Region:
    if root not in self.cache:
      self.cache[root] = self._build(root)
    return self.cache[root]

  def _build(self, root: int) -> _Region:
    prog = self.prog
    members: set[int] = {root}
    eqns: list[_Eqn] = []
    heap = [(e.index, id(e), e) for e, _ in prog.uses.get(root, []) if isinstance(e, _Eqn)]
    heapq.heapify(heap)
    seen = set()
    while heap:
      _, key, e = heapq.heappop(heap)
      if key in seen:
        continue
      seen.add(key)
      if e.name not in _ELEMENTWISE or len(e.outs) != 1:
        continue
      if prog.shape[e.outs[0]] != prog.shape[root]:
        continue
      ok = all(isinstance(a, _Lit) or a in members or a not in prog.data for a in e.ins)
      if not ok:
        continue
      eqns.append(e)
      members.add(e.outs[0])
      for u, _ in prog.uses.get(e.outs[0], []):
        if isinstance(u, _Eqn):
          heapq.heappush(heap, (u.index, id(u), u))
    in_region = {id(e) for e in eqns}
    outputs: dict[int, tuple[str, float]] = {}
    candidates = [root] + [e.outs[0] for e in eqns]
    outside = []
    for v in candidates:
      used = v in prog.outputs or any(
          not (isinstance(u, _Eqn) and id(u) in in_region) for u, _ in prog.uses.get(v, []))
      if used and v != root:
        outside.append(v)
    if outside:
      outputs = self._classify(root, eqns, outside)
    return _Region(root, eqns, outputs)

  def _classify(self, root: int, eqns: list[_Eqn], outs: list[int]) -> dict[int, tuple[str, float]]:
    prog = self.prog
    shape, dtype = prog.shape[root], prog.dtype[root]
    n = max(1, math.prod(shape))
    xs, ys = [], {v: [] for v in outs}
    try:
      for start in range(0, _PROBE.size, n):  # every probe value, however small the tensor
        probe = np.resize(np.roll(_PROBE, -start), n).reshape(shape)
        env = {root: jnp.asarray(probe, dtype)}
        for e in eqns:
          vals = [env[a] if (isinstance(a, int) and a in env) else prog.const(a) for a in e.ins]
          env[e.outs[0]] = e.prim.bind(*vals, **e.params)
        xs.append(probe.reshape(-1))
        for v in outs:
          ys[v].append(np.asarray(env[v]).reshape(-1))
    except Exception:  # pylint: disable=broad-except  (_Unknown constants, unsupported binds)
      return {v: ('elementwise', 1.0) for v in outs}
    x = np.concatenate(xs)
    return {v: classify(x, np.concatenate(ys[v])) for v in outs}


# --------------------------------------------------------------------------------------------
# The walk.


@dataclasses.dataclass(frozen=True)
class _State:
  lab: np.ndarray
  n: int = 0  # the unit's width
  first: bool = True  # still at the producer's output (a BN here is the unit's own BN)
  bn: str | None = None
  act: str | None = None  # the first activation (None: not met yet)
  act_key: tuple | None = None
  pool: str | None = None
  scale: float = 1.0
  through: tuple[Through, ...] = ()
  issues: tuple[str, ...] = ()
  tied: bool = False
  steps: tuple[tuple[str, ...], ...] = ()  # ('act', name), ('bn',), ('depthwise',), ('pool',)

  def but(self, **kw) -> '_State':
    return dataclasses.replace(self, first=False, **kw)


@dataclasses.dataclass
class _Walk:
  routes: list = dataclasses.field(default_factory=list)  # (consumer node, state, Consumer)
  failure: str | None = None
  ties: set = dataclasses.field(default_factory=set)


def _constant_along(lab: np.ndarray, axes: Iterable[int]) -> bool:
  for a in axes:
    if lab.shape[a] > 1:
      first = np.take(lab, [0], axis=a)
      if not np.array_equal(lab, np.broadcast_to(first, lab.shape)):
        return False
  return True


def _channel_vector(lab: np.ndarray, axis: int) -> np.ndarray | None:
  """Labels along ``axis`` when they are constant along every other axis, else None."""
  axis = axis % lab.ndim
  others = [a for a in range(lab.ndim) if a != axis]
  if not _constant_along(lab, others):
    return None
  idx = tuple(slice(None) if a == axis else 0 for a in range(lab.ndim))
  return np.asarray(lab[idx])


def _contiguous_offset(vec: np.ndarray, n: int) -> int | None:
  """Offset o with vec[o + c] == c for every unit channel c, once each; None otherwise."""
  hits = np.flatnonzero(vec >= 0)
  if hits.size != n:
    return None
  o = int(hits[0])
  if not np.array_equal(vec[hits], np.arange(n)) or not np.array_equal(hits, o + np.arange(n)):
    return None
  return o


class _Analyzer:
  """Per-producer walks, couplings and unit assembly."""

  MAX_STEPS = 100_000  # per producer

  def __init__(self, prog: _Program):
    self.prog = prog
    self.regions = _Regions(prog)
    self.call_count: dict[str, int] = {}
    for node in prog.nodes.values():  # outermost layer calls (a subclass's super() call is one)
      self.call_count[node.path] = self.call_count.get(node.path, 0) + 1

  # -- helpers

  def where(self, e: _Eqn) -> str:
    paths = [self.prog.calls[c].path for c in e.calls if self.prog.calls[c].path]
    return f'{e.name} in {paths[-1]}' if paths else f'{e.name} (top level)'

  def node_width(self, node: _Node) -> int:
    return int(self.prog.shape[node.output][-1]) if node.output is not None else 0

  # -- one producer

  def walk(self, node: _Node) -> _Walk:
    prog = self.prog
    result = _Walk()
    n = self.node_width(node)
    shape = prog.shape[node.output]
    lab = np.broadcast_to(np.arange(n, dtype=np.int32), shape)
    stack: list[tuple] = [(node.output, _State(lab, n))]
    visited_tied: set[int] = set()
    steps = 0
    while stack:
      item = stack.pop()  # (var, state) or (var, state, region it is an output of)
      var, st, skip = item if len(item) == 3 else (*item, None)
      steps += 1
      if steps > self.MAX_STEPS:
        result.failure = result.failure or f'graph walk longer than {self.MAX_STEPS} steps'
        return result
      if st.tied:
        if var in visited_tied:
          continue
        visited_tied.add(var)
      # After a failure the walk goes on: it still collects the residual adds (couplings).
      err = self._visit(var, st, skip, stack, result)
      if err is not None and not st.tied and result.failure is None:
        result.failure = err
    return result

  def _visit(self, var: int, st: _State, skip: frozenset | None, stack: list, result: _Walk
             ) -> str | None:
    """One tensor of a path. ``skip``: the elementwise region ``var`` is an output of (its uses
    inside that region were followed already)."""
    prog = self.prog
    if var in prog.outputs:
      return 'reaches the network output'
    uses = prog.uses.get(var, [])
    if not uses:
      return None
    if skip is None:
      region = self.regions.get(var)
      region_ids = frozenset(id(e) for e in region.eqns)
      for out, (name, gain) in region.outputs.items():
        stack.append((out, self._activation(st, name, gain, (var, out)), region_ids))
    else:
      region_ids = skip
    first = None
    for item, pos in uses:
      if isinstance(item, _Eqn) and id(item) in region_ids:
        continue
      if isinstance(item, _Node):
        err = self._node(item, var, st, stack, result)
      else:
        err = self._eqn(item, pos, var, st, stack, result)
      first = first or err
    return first

  @staticmethod
  def _activation(st: _State, name: str, gain: float, key) -> _State:
    if name in ('identity', 'linear'):
      return st.but(scale=st.scale * gain)
    if st.act is None:
      issues = st.issues
      if st.pool is not None:
        issues += (f'{st.pool}-pool before the activation',)
      return st.but(act=name, act_key=key, scale=st.scale * gain, issues=issues,
                    steps=st.steps + (('act', name),))
    return st.but(issues=st.issues + (f'a further activation ({name}) on the path',),
                  scale=st.scale * gain, steps=st.steps + (('act', name),))

  def _node(self, node: _Node, var: int, st: _State, stack: list, result: _Walk) -> str | None:
    prog = self.prog
    if node.n_inputs != 1 or node.n_outputs != 1:
      return f'{node.path}: a {node.kind} call with {node.n_inputs} data inputs and {node.n_outputs} outputs'
    if node.kind == 'bn':
      bn_mod = node.call.module
      axis = getattr(bn_mod, 'axis', -1)
      if axis not in (-1, len(prog.shape[var]) - 1):
        return f'{node.path}: BatchNorm over axis {axis} (only the last axis is supported)'
      n_uses = len(prog.uses.get(var, [])) + (var in prog.outputs)
      if st.first and n_uses == 1:
        stack.append((node.output, dataclasses.replace(st, first=False, bn=node.path)))
        return None
      vec = _channel_vector(st.lab, -1)
      off = None if vec is None else _contiguous_offset(vec, st.n)
      if off is None:
        return f'{node.path}: channels reach a BatchNorm in an unsupported layout'
      issue = f'BatchNorm {node.path} between the channels and a consumer'
      stack.append((node.output, st.but(through=st.through + (Through(node.path, 'bn', off),),
                                         issues=st.issues + (issue,), act=st.act or 'identity',
                                         steps=st.steps + (('bn',),))))
      return None
    if node.kind == 'conv':
      conv = node.conv
      if conv is None:
        return f'{node.path}: no convolution traced in the nn.Conv call'
      if node.input != var or not isinstance(conv.ins[0], int) or \
          prog.shape[conv.ins[0]] != prog.shape[var]:
        return (f'{node.path}: the conv pads or reshapes its input internally (e.g. CIRCULAR'
                ' padding); unsupported')
      if _raw_kernel(prog, node) is None:
        return _TRANSFORMED.format(node.path)
      dn = conv.params['dimension_numbers']
      feat_axis = dn.lhs_spec[1]
      groups = int(conv.params['feature_group_count'])
      c_in = prog.shape[var][feat_axis]
      vec = _channel_vector(st.lab, feat_axis)
      n = st.n
      off = None if vec is None else _contiguous_offset(vec, n)
      if off is None:
        return f'{node.path}: the channels reach it split, duplicated or mixed (unsupported index map)'
      if groups == 1:
        lhs_shape = prog.shape[var]
        spatial = tuple(lhs_shape[a] for a in dn.lhs_spec[2:])
        k_shape = prog.shape[conv.ins[1]] if isinstance(conv.ins[1], int) else ()
        window = tuple(k_shape[a] for a in dn.rhs_spec[2:]) if k_shape else ()
        geo = ConvGeometry(spatial, window, tuple(int(s) for s in conv.params['window_strides']),
                           tuple((int(a), int(b)) for a, b in conv.params['padding']),
                           tuple(int(d) for d in conv.params['rhs_dilation']))
        if any(int(d) != 1 for d in conv.params['lhs_dilation']):
          return f'{node.path}: transposed (input-dilated) convolution'
        result.routes.append((node, st, dict(kind='conv', offset=off, geometry=geo)))
        return None
      out_c = self.node_width(node)
      if groups == c_in and out_c == c_in:
        out_shape = prog.shape[node.output]
        lab = np.broadcast_to(vec.astype(np.int32), out_shape) if feat_axis == len(out_shape) - 1 \
            else None
        if lab is None:
          return f'{node.path}: depthwise conv with a non-last channel axis'
        issue = f'depthwise conv {node.path} between the channels and a consumer'
        stack.append((node.output, st.but(lab=lab, through=st.through + (
            Through(node.path, 'depthwise', off),), issues=st.issues + (issue,),
            act=st.act or 'identity', steps=st.steps + (('depthwise',),))))
        return None
      if groups == c_in:
        return f'{node.path}: depthwise conv with depth multiplier {out_c // c_in} (unsupported)'
      return (f'{node.path}: grouped conv ({groups} groups) reads the channels; pruning would have'
              ' to keep equal group sizes')
    # dense
    dot = next((e for e in node.eqns if e.name == 'dot_general'), None)
    if dot is None or node.input != var or not isinstance(dot.ins[0], int) or \
        prog.shape[dot.ins[0]] != prog.shape[var]:
      return f'{node.path}: channels reach the Dense other than as its input'
    if _raw_kernel(prog, node) is None:
      return _TRANSFORMED.format(node.path)
    (lc, rc), (lb, rb) = dot.params['dimension_numbers']
    nd = len(prog.shape[var])
    if tuple(lc) != (nd - 1,) or tuple(rc) != (0,) or lb or rb:
      return f'{node.path}: unsupported Dense contraction {dot.params["dimension_numbers"]}'
    vec = _channel_vector(st.lab, -1)
    if vec is None:
      return f'{node.path}: channel labels vary across the Dense batch axes'
    info = self._dense_map(vec, st.n)
    if isinstance(info, str):
      return f'{node.path}: {info}'
    result.routes.append((node, st, dict(kind='dense', **info)))
    return None

  @staticmethod
  def _dense_map(vec: np.ndarray, n: int) -> dict | str:
    present = vec[vec >= 0]
    counts = np.bincount(present, minlength=n)
    if counts.size != n or np.any(counts != counts[0]) or counts[0] == 0:
      return 'the unit channels reach it an unequal number of times (split or duplicated)'
    r = int(counts[0])
    rows = np.stack([np.flatnonzero(vec == c) for c in range(n)])  # (n, r), sorted
    o = int(rows[0, 0])
    s = np.arange(r)
    if np.array_equal(rows, o + np.arange(n)[:, None] * r + s[None, :]):
      return dict(offset=o, flatten=r, flatten_order='nchw', row_stride=0)
    stride = int(rows[0, 1] - rows[0, 0]) if r > 1 else 0
    if r > 1 and stride >= n and np.array_equal(rows, o + np.arange(n)[:, None] + s[None, :] * stride):
      return dict(offset=o, flatten=r, flatten_order='nhwc', row_stride=stride)
    return 'unsupported index map of the flattened channels'

  def _eqn(self, e: _Eqn, pos: int, var: int, st: _State, stack: list, result: _Walk) -> str | None:
    prog = self.prog
    name = e.name
    lab = st.lab
    out = e.outs[0] if len(e.outs) == 1 else None
    if name in ('reshape',):
      if e.params.get('dimensions') not in (None, ()):
        return f'{self.where(e)}: reshape with dimensions'
      stack.append((out, st.but(lab=np.reshape(lab, e.params['new_sizes']))))
      return None
    if name == 'transpose':
      stack.append((out, st.but(lab=np.transpose(lab, e.params['permutation']))))
      return None
    if name == 'squeeze':
      stack.append((out, st.but(lab=np.squeeze(lab, axis=tuple(e.params['dimensions'])))))
      return None
    if name == 'expand_dims':
      stack.append((out, st.but(lab=np.expand_dims(lab, tuple(e.params['dimensions'])))))
      return None
    if name == 'broadcast_in_dim':
      shape = tuple(e.params['shape'])
      dims = tuple(e.params['broadcast_dimensions'])
      src = np.reshape(lab, [lab.shape[dims.index(i)] if i in dims else 1 for i in range(len(shape))])
      stack.append((out, st.but(lab=np.broadcast_to(src, shape))))
      return None
    if name in ('convert_element_type', 'copy', 'copy_p', 'reduce_precision', 'optimization_barrier'):
      stack.append((out, st.but()))
      return None
    if name in ('reduce_window_max', 'reduce_window_sum', 'reduce_window_min', 'reduce_window'):
      win = tuple(e.params['window_dimensions'])
      strides = tuple(e.params['window_strides'])
      axes = [a for a in range(lab.ndim) if win[a] > 1 or strides[a] > 1]
      if any(d != 1 for d in e.params.get('base_dilation', ())) or not _constant_along(lab, axes):
        return f'{self.where(e)}: a pooling window that mixes channels'
      first = lab[tuple(slice(0, 1) if a in axes else slice(None) for a in range(lab.ndim))]
      nlab = np.broadcast_to(first, prog.shape[out])
      if name == 'reduce_window_max':
        return self._pool(out, st, nlab, 'max', 1.0, stack)
      if name == 'reduce_window_sum':
        return self._pool(out, st, nlab, 'avg', float(math.prod(win)), stack)
      return f'{self.where(e)}: unsupported pooling ({name})'
    if name in ('reduce_sum', 'reduce_max'):
      axes = tuple(e.params['axes'])
      if not _constant_along(lab, axes):
        return f'{self.where(e)}: channels reduced together (a channel mixing {name})'
      nlab = lab[tuple(0 if a in axes else slice(None) for a in range(lab.ndim))]
      size = float(math.prod(lab.shape[a] for a in axes))
      if name == 'reduce_max':
        return self._pool(out, st, nlab, 'max', 1.0, stack)
      return self._pool(out, st, nlab, 'avg', size, stack)
    if name == 'concatenate':
      d = e.params['dimension']
      parts = []
      for a in e.ins:
        if isinstance(a, int) and a == var:
          parts.append(lab)
        else:
          parts.append(np.full(prog.shape[a] if isinstance(a, int) else np.shape(a.value), -1,
                               np.int32))
      if sum(1 for a in e.ins if isinstance(a, int) and a == var) > 1:
        return f'{self.where(e)}: the same channels concatenated twice'
      stack.append((out, st.but(lab=np.concatenate(parts, axis=d))))
      return None
    if name == 'pad':
      if pos != 0:
        return f'{self.where(e)}: channels used as a padding value'
      cfg = e.params['padding_config']
      if any(int(i) != 0 for _, _, i in cfg) or any(int(lo) < 0 or int(hi) < 0 for lo, hi, _ in cfg):
        return f'{self.where(e)}: interior or negative padding'
      nlab = np.asarray(lab)
      for a, (lo, hi, _) in enumerate(cfg):
        if lo == 0 and hi == 0:
          continue
        widths = [(0, 0)] * lab.ndim
        widths[a] = (int(lo), int(hi))
        if _constant_along(nlab, [a]):
          nlab = np.pad(nlab, widths, mode='edge')
        else:
          nlab = np.pad(nlab, widths, mode='constant', constant_values=-1)
      stack.append((out, st.but(lab=nlab)))
      return None
    if name == 'slice':
      idx = tuple(slice(s, l, (e.params['strides'] or [1] * lab.ndim)[a])
                  for a, (s, l) in enumerate(zip(e.params['start_indices'], e.params['limit_indices'])))
      stack.append((out, st.but(lab=lab[idx])))
      return None
    if name in ('add', 'sub', 'add_any'):
      other = [a for i, a in enumerate(e.ins) if i != pos]
      if all(prog.is_const(a) for a in other):
        return f'{self.where(e)}: unexpected constant {name} outside an elementwise region'
      result.ties.add(e.index)
      stack.append((out, dataclasses.replace(st, first=False, tied=True)))
      return None
    if name in _ELEMENTWISE:
      return f'{self.where(e)}: combined with another tensor ({name})'
    return f'{self.where(e)}: unsupported operation {name}'

  def _pool(self, out, st: _State, lab, kind: str, scale: float, stack) -> None:
    pool = 'max' if 'max' in (st.pool, kind) else 'avg'
    stack.append((out, st.but(lab=lab, pool=pool, scale=st.scale * scale,
                              steps=st.steps + (('pool',),))))
    return None


def _snap(scale: float) -> float:
  """A route's constant factor, with float32 round-off of sum / count pairs removed."""
  r = round(scale)
  return float(r) if r != 0 and abs(scale - r) <= 1e-6 * abs(r) else float(scale)


# --------------------------------------------------------------------------------------------
# Assembly.


_TRANSFORMED = ('{}: its kernel is transformed inside the call (e.g. weight standardization), so'
                ' its channels are not independent; unsupported')
_SHAPE_ONLY = frozenset(('convert_element_type', 'reshape', 'copy', 'copy_p', 'reduce_precision'))


def _raw_kernel(prog: _Program, node: _Node) -> str | None:
  """The params path of the kernel a Conv / Dense node multiplies with, if it is the stored
  kernel up to dtype / shape-only operations; None when it is computed (weight standardization,
  weight norm, ...), which would make channel surgery on the stored kernel wrong."""
  op = node.conv if node.kind == 'conv' else next(
      (e for e in node.eqns if e.name == 'dot_general'), None)
  if op is None or not isinstance(op.ins[1], int):
    return None
  a = op.ins[1]
  for _ in range(16):
    if a in prog.param_of:
      coll, path = prog.param_of[a]
      ok = coll == 'params' and (path.endswith('/kernel') or path == 'kernel')
      return path if ok else None
    e = prog.producer_of.get(a)
    if e is None or e.name not in _SHAPE_ONLY or not isinstance(e.ins[0], int):
      return None
    a = e.ins[0]
  return None


class _UnionFind:
  def __init__(self):
    self.parent: dict[Any, Any] = {}

  def find(self, a):
    self.parent.setdefault(a, a)
    while self.parent[a] != a:
      self.parent[a] = self.parent[self.parent[a]]
      a = self.parent[a]
    return a

  def union(self, a, b):
    ra, rb = self.find(a), self.find(b)
    if ra != rb:
      self.parent[rb] = ra


def _consumer_bn(prog: _Program, node: _Node) -> str | None:
  uses = prog.uses.get(node.output, [])
  if len(uses) == 1 and node.output not in prog.outputs:
    item = uses[0][0]
    if isinstance(item, _Node) and item.kind == 'bn':
      return item.path
  return None


_DW_ACTS = ('relu', 'relu6')


def _depthwise_route(routes) -> str | None:
  """The reason text of a 'depthwise' unit when every route is exactly (BN) -> ReLU / ReLU6 ->
  depthwise conv (multiplier 1) -> BN -> ReLU / ReLU6 -> linear consumer, through the same two
  layers, with no pooling and unit scale; None otherwise."""
  states = [st for _, st, _ in routes]
  first = states[0]
  steps = first.steps
  if (len(steps) != 4 or steps[0][0] != 'act' or steps[0][1] not in _DW_ACTS
      or steps[1] != ('depthwise',) or steps[2] != ('bn',) or steps[3][0] != 'act'
      or steps[3][1] not in _DW_ACTS):
    return None
  for st in states:
    if (st.steps != steps or st.through != first.through or st.act_key != first.act_key
        or st.pool is not None or _snap(st.scale) != 1.0):
      return None
  dw, bn = first.through
  return (f'{steps[0][1]} -> depthwise conv {dw.path} -> BatchNorm {bn.path} -> {steps[3][1]}:'
          ' NM / LBYL on the filter-space surrogate, BN moments through the depthwise window'
          ' (docs/mobilenet_v2.md)')


def _compensation(unit_act: str, routes) -> tuple[str, str]:
  depthwise = _depthwise_route(routes)
  if depthwise is not None:
    return 'depthwise', depthwise
  reasons = []
  keys = {st.act_key for _, st, _ in routes}
  acts = {st.act for _, st, _ in routes}
  if len(acts) > 1 or len(keys) > 1:
    reasons.append('the consumers see different activations')
  if unit_act != 'relu':
    what = 'no activation' if unit_act in ('identity', None) else f'activation {unit_act}'
    reasons.append(f'{what}: the closed forms (NM, LBYL, BN moments) assume ReLU')
  for _, st, _ in routes:
    reasons.extend(i for i in st.issues if i not in reasons)
  if reasons:
    return 'prune_only', '; '.join(reasons)
  if any(st.pool == 'max' for _, st, _ in routes):
    return 'maxpool_approx', 'max-pool between the ReLU and a consumer is ignored (docs/README.md, "Which layers are pruned")'
  return 'exact', ''


def discover(module: nn.Module, variables: Mapping[str, Any], example_shape, *,
             apply_kwargs: Mapping[str, Any] | None = None,
             policy: Sequence[str] = DEFAULT_POLICY) -> Discovery:
  """The prunable units of ``module``, found by tracing ``module.apply``.

  Args:
    module: a flax.linen Module (unbound).
    variables: its variables ({'params', 'batch_stats', ...}); leaves may be arrays or
      ``jax.ShapeDtypeStruct`` (abstract: nothing is computed, an activation built from parameter
      values is then classified 'elementwise').
    example_shape: the input shape WITH the batch axis (e.g. (1, 32, 32, 3)), an array or a
      ``jax.ShapeDtypeStruct`` (float32 when a shape is given).
    apply_kwargs: extra keyword arguments of ``module.apply`` (e.g. ``{'train': False}``); the
      network must run in inference mode (BatchNorm with running statistics).
    policy: rules leaving structurally prunable units out (the papers' convention): 'head' (Dense layers after the
      last convolution of a CNN) and 'residual_stem' (in a network with residual adds, the
      producers reading the network input). ``()`` keeps everything.

  Returns:
    A :class:`Discovery`; ``print()`` it for a table.
  """
  policy = tuple(policy)
  bad = [p for p in policy if p not in POLICY_RULES]
  if bad:
    raise ValueError(f'unknown policy rule(s) {bad}; known: {", ".join(POLICY_RULES)}')
  prog = trace(module, variables, example_shape, apply_kwargs=apply_kwargs)
  an = _Analyzer(prog)
  params = variables['params']

  layers = []
  positions: dict[str, int] = {}
  batch = int(_example(example_shape).shape[0])
  for c in prog.calls:
    node = prog.nodes.get(c.index)
    if c.kind is None or node is None or node.output is None:
      continue
    out = prog.shape[node.output]
    positions[c.path] = positions.get(c.path, 0) + math.prod(out[:-1]) // batch
    if any(layer.path == c.path for layer in layers):
      continue
    groups = int(node.conv.params['feature_group_count']) if node.conv is not None else 1
    in_f = int(prog.shape[node.input][-1]) if node.input is not None else 0
    eps = float(c.module.epsilon) if c.kind == 'bn' else None
    layers.append(Layer(c.path, c.kind, an.call_count[c.path], an.node_width(node), in_f, groups,
                        type(c.module).__name__, epsilon=eps))
  layers = [dataclasses.replace(layer, positions=positions[layer.path]) for layer in layers]
  in_nodes = {id(e) for n in prog.nodes.values() if n.kind in ('conv', 'dense') for e in n.eqns}
  other = 0
  for e in prog.eqns:
    if id(e) in in_nodes:
      continue
    if e.name == 'conv_general_dilated':
      rhs = prog.shape[e.ins[1]] if isinstance(e.ins[1], int) else np.shape(e.ins[1].value)
      o_dim = e.params['dimension_numbers'].rhs_spec[0]
      other += math.prod(prog.shape[e.outs[0]]) * (math.prod(rhs) // rhs[o_dim])
    elif e.name == 'dot_general':
      (lc, _), _ = e.params['dimension_numbers']
      lhs = prog.shape[e.ins[0]] if isinstance(e.ins[0], int) else np.shape(e.ins[0].value)
      other += math.prod(prog.shape[e.outs[0]]) * math.prod(lhs[d] for d in lc)

  producers = [n for n in sorted(prog.nodes.values(), key=lambda n: n.index)
               if n.kind in ('conv', 'dense') and n.output is not None]
  walks: dict[str, _Walk] = {}
  blocked: list[Blocked] = []
  order: list[_Node] = []
  for node in producers:
    if node.path in walks:
      continue
    order.append(node)
    if node.conv is not None and int(node.conv.params['feature_group_count']) != 1:
      blocked.append(Blocked(node.path, 'grouped or depthwise conv: its output channels are tied'
                             ' to its input channels (pruned with the unit of its input, if any)'))
      walks[node.path] = _Walk(failure='grouped')
      continue
    if not trees.has_path(params, node.path + '/kernel'):
      blocked.append(Blocked(node.path, 'no kernel in variables["params"] at this path'))
      walks[node.path] = _Walk(failure='missing')
      continue
    if _raw_kernel(prog, node) != node.path + '/kernel':
      blocked.append(Blocked(node.path, _TRANSFORMED.format(node.path)))
      walks[node.path] = _Walk(failure='missing')
      continue
    walks[node.path] = an.walk(node)

  # Couplings: producers that meet in residual adds (union-find over add sites).
  uf = _UnionFind()
  for path, w in walks.items():
    for t in w.ties:
      uf.union(('add', t), ('p', path))
  # A producer whose walk failed is unprunable for that reason, even if it also meets an add (a
  # LayerNorm's x - mean(x) is an add of two tensors, the channel mixing mean is the failure).
  tied = {path for path, w in walks.items() if w.ties and w.failure is None}
  groups: dict[Any, list[str]] = {}
  for node in order:
    if node.path in tied:
      groups.setdefault(uf.find(('p', node.path)), []).append(node.path)
  couplings = tuple(Coupling('residual_add', tuple(m), 'channels tied by a residual add: prunable'
                             ' only as a whole group (not implemented)') for m in groups.values())
  has_residual = bool(tied)

  # Layers that run before any other layer read the network input.
  after_layer: set[int] = set()
  for item in prog.items:
    if isinstance(item, _Node):
      if item.output is not None:
        after_layer.add(item.output)
    elif any(isinstance(a, int) and a in after_layer for a in item.ins):
      after_layer.update(item.outs)
  conv_positions = [n.index for n in prog.nodes.values() if n.kind == 'conv']
  last_conv = max(conv_positions) if conv_positions else None

  units: list[Unit] = []
  excluded: list[Excluded] = []
  for node in order:
    w = walks[node.path]
    if w.failure in ('grouped', 'missing'):
      continue
    if node.path in tied:
      continue
    if w.failure is not None:
      blocked.append(Blocked(node.path, w.failure))
      continue
    if not w.routes:
      blocked.append(Blocked(node.path, 'its output is not used by any layer'))
      continue
    involved = {node.path, w.routes[0][1].bn}
    for cnode, st, _ in w.routes:
      involved.add(cnode.path)
      involved.update(t.path for t in st.through)
    shared = [p for p in involved if p is not None and an.call_count.get(p, 1) > 1]
    if shared:
      blocked.append(Blocked(node.path, f'layer(s) {", ".join(sorted(shared))} are called more'
                             ' than once (shared weights)'))
      continue
    consumers = []
    for cnode, st, info in sorted(w.routes, key=lambda r: r[0].index):
      consumers.append(Consumer(cnode.path, info['kind'], info['offset'], info.get('flatten', 1),
                                info.get('flatten_order', 'nchw'), info.get('row_stride', 0),
                                st.pool, _consumer_bn(prog, cnode), _snap(st.scale), st.through,
                                info.get('geometry')))
    bn = w.routes[0][1].bn
    acts = {st.act for _, st, _ in w.routes}
    act = acts.pop() if len(acts) == 1 else 'mixed'
    act = 'identity' if act is None else act
    comp, reason = _compensation(act, w.routes)
    post = w.routes[0][1].steps[-1][1] if comp == 'depthwise' else None
    unit = Unit(node.path, node.path, bn, act, tuple(consumers), an.node_width(node), comp, reason,
                node.kind, post)
    rule = None
    if 'head' in policy and node.kind == 'dense' and last_conv is not None and node.index > last_conv:
      rule = 'head: a Dense layer after the last convolution (classifier)'
    elif 'residual_stem' in policy and has_residual and node.input not in after_layer:
      rule = 'residual_stem: reads the network input of a residual network (stem)'
    elif 'compensable' in policy and comp == 'prune_only':
      rule = f'compensable: no compensation applies ({reason})'
    if rule:
      excluded.append(Excluded(unit, rule))
    else:
      units.append(unit)
  pos = {n.path: i for i, n in enumerate(order)}
  blocked.sort(key=lambda b: pos.get(b.producer, 0))
  return Discovery(tuple(units), tuple(excluded), couplings, tuple(blocked), tuple(layers),
                   tuple(_example(example_shape).shape), policy, other // batch)
