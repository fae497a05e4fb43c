"""The BN range rule's Gaussians on a user's model, read from its traced graph.

:func:`lbyl_jax.quant.actquant.bn_ranges` knows the presets' layouts by name. For a user's Flax CNN
(``spec.family == 'custom'``) :func:`graph_sources` derives, for every ``nn.Conv`` / ``nn.Dense``
input, the distribution the rule takes its quantile of, by walking the layer-attributed jaxpr of
:func:`lbyl_jax.models.discover.trace` (the graph discovery reads) in program order and carrying,
per tensor, one of

- the network input (the normalized image): its range is exact, ``[(0 - mean) / std,
  (1 - mean) / std]`` as for the presets; where it is added to another tensor or scaled it counts
  as ``N(0, 1)`` per element;
- ``act(N(mu, sigma^2))`` per element (arrays of the tensor's shape, float64), ``act`` the identity,
  ReLU or ReLU6 (a ReLU with a cap), possibly the max of ``pool`` iid copies;
- unknown, with the reason (the layers reading it get an error naming it).

The rules are the presets' (``actquant`` module docstring, (a)):

- a BatchNorm's output is ``N(beta_c, gamma_c^2)`` per channel (or the override of
  ``bn_gaussians``), whatever its input;
- ``max(x, 0)`` makes a ReLU, ``min(x, c)`` / ``clamp(0, x, c)`` of a ReLU caps it (ReLU6);
- a residual add of two tensors is ``N(m_a + m_b, v_a + v_b)`` (independent branches), with the
  rectified mean and variance of a ReLU operand (:func:`lbyl_jax.pruning.moments.relu_mean_var`,
  the ReLU's for a ReLU6: an upper bound, as the MobileNetV2 preset rule);
- a windowed / global max of a ReLU of ``w`` elements multiplies ``pool`` by ``w`` (the quantile of
  the max of ``w`` iid copies); a sum (an average pool's numerator, a global mean) sums the
  per-element means and standard deviations (a bound: the average of a window of one channel then
  gives back the per-element bound, the presets' rule); a multiplication or division by a
  positive constant scales them;
- layout primitives (reshape, transpose, slices, zero padding, concatenation, broadcasts) are
  applied to the mean and standard deviation arrays themselves (zero padding and concatenation of
  different kinds first turn a ReLU into its rectified mean and variance, the option-A shortcut of
  the preset rule);
- a ``nn.Dense`` without a BatchNorm after it: ``y = W x + b`` with independent inputs, mean
  ``W^T mu + b`` and variance ``(W^2)^T v`` (``actquant._dense_relu``'s diagonal rule);
- anything else (a conv without a BatchNorm after it, gates, attention, normalizations over
  channels, unknown primitives) is unknown.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lbyl_jax.core import trees
from lbyl_jax.core import units as units_lib
from lbyl_jax.models import discover
from lbyl_jax.pruning import moments as moments_lib

_PASS = frozenset(('convert_element_type', 'copy', 'copy_p', 'reduce_precision', 'stop_gradient',
                   'optimization_barrier'))
_LAYOUT = frozenset(('reshape', 'transpose', 'broadcast_in_dim', 'squeeze', 'expand_dims',
                     'slice', 'rev'))


@dataclasses.dataclass(frozen=True)
class GraphSource:
  """What a layer reads (the fields ``actquant._source_range`` uses).

  Attributes:
    kind: 'image' or 'gauss'.
    mean, std: 'gauss': per-element arrays of the pre-activation's mean and standard deviation.
    relu: whether a ReLU follows (unsigned range).
    pool: the number of iid copies a max was taken over.
    cap: a ReLU6-like cap of the activation, or None.
  """

  kind: str
  mean: np.ndarray | None = None
  std: np.ndarray | None = None
  relu: bool = True
  pool: int = 1
  cap: float | None = None


@dataclasses.dataclass(frozen=True)
class _Unknown:
  reason: str


_IMAGE = GraphSource('image')


def _bind64(prim, arrays, params):
  with jax.enable_x64(True):
    out = prim.bind(*[jnp.asarray(a, jnp.float64) for a in arrays], **params)
  return np.asarray(out, np.float64)


def _as_gauss(src: GraphSource, shape) -> GraphSource:
  """The image as N(0, 1) per element (where it meets arithmetic)."""
  if src.kind == 'image':
    return GraphSource('gauss', np.zeros(shape), np.ones(shape), False)
  return src


def _moments(src: GraphSource, shape) -> tuple[np.ndarray, np.ndarray]:
  """Mean and variance of the tensor (after its activation)."""
  src = _as_gauss(src, shape)
  if src.relu:
    m, v = moments_lib.relu_mean_var(src.mean, src.std ** 2, src.pool)
    return np.asarray(m).reshape(src.mean.shape), np.asarray(v).reshape(src.mean.shape)
  return src.mean, src.std ** 2


def _linear(src: GraphSource, shape) -> GraphSource:
  """The tensor as a Gaussian without activation with its (rectified) mean and variance."""
  if src.kind == 'gauss' and not src.relu:
    return src
  m, v = _moments(src, shape)
  return GraphSource('gauss', m, np.sqrt(v), False)


class _Walker:
  """Program-order walk of a traced module (module docstring)."""

  def __init__(self, prog, variables, override):
    self.prog = prog
    self.params = variables['params']
    self.override = override or {}
    self.env: dict[int, Any] = {}
    self.sources: dict[str, Any] = {}
    for v in prog.input_vars[:1]:
      self.env[v] = _IMAGE

  def state(self, a):
    if isinstance(a, int) and a in self.env:
      return self.env[a]
    return _Unknown(f'var {a}')

  def shape(self, a):
    return self.prog.shape[a]

  def run(self) -> dict[str, Any]:
    for item in self.prog.items:
      if isinstance(item, discover._Node):  # pylint: disable=protected-access
        self.node(item)
      else:
        self.eqn(item)
    return self.sources

  # -- layers

  def node(self, node) -> None:
    kind = node.kind
    if node.input is None or node.n_inputs != 1:
      src = _Unknown(f'{node.path} has {node.n_inputs} data inputs')
    else:
      src = self.state(node.input)
    if kind in ('conv', 'dense'):
      if node.path in self.sources:
        self.sources[node.path] = _Unknown(f'{node.path} is called more than once')
      else:
        self.sources[node.path] = src
    if node.output is None:
      return
    out_shape = self.shape(node.output)
    if kind == 'bn':
      self.env[node.output] = self.bn(node.path, out_shape)
    elif kind == 'dense' and isinstance(src, GraphSource):
      self.env[node.output] = self.dense(node, src)
    else:
      self.env[node.output] = _Unknown(f'the output of {kind} {node.path} (no BatchNorm after it)')

  def bn(self, path: str, shape) -> Any:
    if path in self.override:
      mean, std = self.override[path]
      mean, std = np.asarray(mean, np.float64), np.abs(np.asarray(std, np.float64))
    else:
      p = trees.get_path(self.params, path) if path else self.params
      c = shape[-1]
      mean = np.asarray(p['bias'], np.float64) if 'bias' in p else np.zeros(c)
      std = np.abs(np.asarray(p['scale'], np.float64)) if 'scale' in p else np.ones(c)
    if mean.shape != (shape[-1],):
      return _Unknown(f'BatchNorm {path} does not normalize the last axis')
    return GraphSource('gauss', np.broadcast_to(mean, shape).copy(),
                       np.broadcast_to(std, shape).copy(), False)

  def dense(self, node, src: GraphSource) -> Any:
    p = trees.get_path(self.params, node.path)
    w = np.asarray(p['kernel'], np.float64)
    in_shape = self.shape(node.input)
    if w.ndim != 2 or in_shape[-1] != w.shape[0]:
      return _Unknown(f'dense {node.path} with kernel {w.shape} on input {in_shape}')
    m, v = _moments(src, in_shape)
    mean = m @ w + (np.asarray(p['bias'], np.float64) if 'bias' in p else 0.0)
    var = v @ (w ** 2)
    return GraphSource('gauss', mean, np.sqrt(np.maximum(var, 0.0)), False)

  # -- primitives

  def const(self, a):
    try:
      return np.asarray(self.prog.const(a), np.float64)
    except Exception:  # pylint: disable=broad-except
      return None

  def scalar(self, a) -> float | None:
    c = self.const(a)
    if c is None or c.size == 0 or not np.all(c == c.reshape(-1)[0]):
      return None
    return float(c.reshape(-1)[0])

  def eqn(self, e) -> None:
    data = [isinstance(a, int) and a in self.prog.data for a in e.ins]
    if not any(data):
      return
    try:
      outs = self.primitive(e, data)
    except _Fail as f:
      outs = [_Unknown(f'primitive {e.name}: {f}')] * len(e.outs)
    for o, s in zip(e.outs, outs):
      self.env[o] = s

  def primitive(self, e, data) -> list[Any]:  # noqa: C901  (one case per primitive)
    name = e.name
    ins = e.ins
    if name == 'pjit':
      raise _Fail('not inlined')
    srcs = [self.state(a) if d else None for a, d in zip(ins, data)]
    for s in srcs:
      if isinstance(s, _Unknown):
        return [s] * len(e.outs)
    out_shape = self.shape(e.outs[0])
    x = srcs[0] if data[0] else None
    if name in _PASS:
      return [x]
    if name in _LAYOUT:
      if x.kind == 'image':
        return [_IMAGE]
      return [dataclasses.replace(x, mean=_bind64(e.prim, [x.mean], e.params),
                                  std=_bind64(e.prim, [x.std], e.params))]
    if name == 'pad':
      if x.kind == 'image':
        return [_IMAGE]
      if self.scalar(ins[1]) != 0.0:
        raise _Fail('padding with a value other than 0')
      lin = x if x.kind == 'gauss' and not x.relu and x.pool == 1 else _linear(x, self.shape(ins[0]))
      zero = np.zeros(())
      return [dataclasses.replace(lin, mean=_bind64(e.prim, [lin.mean, zero], e.params),
                                  std=_bind64(e.prim, [lin.std, zero], e.params))]
    if name == 'concatenate':
      if not all(data):
        raise _Fail('concatenation with a constant')
      if all(s.kind == 'image' for s in srcs):
        return [_IMAGE]
      same = all(s.kind == 'gauss' and (s.relu, s.pool, s.cap) ==
                 (srcs[0].relu, srcs[0].pool, srcs[0].cap) for s in srcs)
      parts = srcs if same else [_linear(s, self.shape(a)) for s, a in zip(srcs, ins)]
      return [dataclasses.replace(parts[0], mean=_bind64(e.prim, [s.mean for s in parts], e.params),
                                  std=_bind64(e.prim, [s.std for s in parts], e.params))]
    if name in ('reduce_window_max', 'reduce_max'):
      if x.kind == 'image':
        return [_IMAGE]
      if name == 'reduce_window_max':
        w = int(np.prod(e.params['window_dimensions']))
      else:
        w = int(np.prod([self.shape(ins[0])[ax] for ax in e.params['axes']]))
      if not x.relu:
        raise _Fail('a max of values without a ReLU')
      return [dataclasses.replace(x, mean=_bind64(e.prim, [x.mean], e.params),
                                  std=_bind64(e.prim, [x.std], e.params), pool=x.pool * w)]
    if name in ('reduce_window_sum', 'reduce_sum'):
      if name == 'reduce_window_sum':
        w = int(np.prod(e.params['window_dimensions']))
      else:
        w = int(np.prod([self.shape(ins[0])[ax] for ax in e.params['axes']]))
      x = _as_gauss(x, self.shape(ins[0]))
      return [dataclasses.replace(x, mean=_bind64(e.prim, [x.mean], e.params),
                                  std=_bind64(e.prim, [x.std], e.params),
                                  cap=None if x.cap is None else x.cap * w)]
    if name in ('mul', 'div'):
      if sum(data) != 1 or (name == 'div' and not data[0]):
        raise _Fail('a product of two data tensors')
      i = 0 if data[0] else 1
      x = _as_gauss(srcs[i], self.shape(ins[i]))
      c = self.scalar(ins[1 - i])
      if c is None or c == 0.0:
        raise _Fail('a multiplication by a non-scalar or zero constant')
      f = 1.0 / c if name == 'div' else c
      if x.relu and f < 0:
        raise _Fail('a ReLU multiplied by a negative constant')
      return [dataclasses.replace(x, mean=x.mean * f, std=x.std * abs(f),
                                  cap=None if x.cap is None else x.cap * f)]
    if name in ('add', 'add_any', 'sub'):
      if all(data):
        a_shape, b_shape = self.shape(ins[0]), self.shape(ins[1])
        if a_shape != b_shape:
          raise _Fail(f'an add of shapes {a_shape} and {b_shape}')
        ma, va = _moments(srcs[0], a_shape)
        mb, vb = _moments(srcs[1], b_shape)
        mean = ma + mb if name != 'sub' else ma - mb
        return [GraphSource('gauss', mean, np.sqrt(va + vb), False)]
      i = 0 if data[0] else 1
      x = _as_gauss(srcs[i], self.shape(ins[i]))
      if x.relu:
        raise _Fail('a constant added to a ReLU')
      c = self.const(ins[1 - i])
      if c is None:
        raise _Fail('an add of an unknown constant')
      if name == 'sub' and i == 1:
        return [dataclasses.replace(x, mean=np.broadcast_to(c - x.mean, out_shape).copy())]
      c = -c if name == 'sub' else c
      return [dataclasses.replace(x, mean=np.broadcast_to(x.mean + c, out_shape).copy())]
    if name == 'neg':
      x = _as_gauss(x, self.shape(ins[0]))
      if x.relu:
        raise _Fail('a negated ReLU')
      return [dataclasses.replace(x, mean=-x.mean)]
    if name == 'max':
      if sum(data) != 1:
        raise _Fail('a max of two data tensors')
      i = 0 if data[0] else 1
      x = _as_gauss(srcs[i], self.shape(ins[i]))
      if self.scalar(ins[1 - i]) != 0.0:
        raise _Fail('a max with a constant other than 0')
      return [dataclasses.replace(x, relu=True)]
    if name == 'min':
      if sum(data) != 1:
        raise _Fail('a min of two data tensors')
      i = 0 if data[0] else 1
      x = srcs[i]
      c = self.scalar(ins[1 - i])
      if x.kind != 'gauss' or not x.relu or c is None or c <= 0:
        raise _Fail('a min other than the cap of a ReLU')
      return [dataclasses.replace(x, cap=c if x.cap is None else min(x.cap, c))]
    if name == 'clamp':  # clamp(lo, x, hi)
      if data[0] or data[2] or not data[1]:
        raise _Fail('a clamp with data bounds')
      lo, hi = self.scalar(ins[0]), self.scalar(ins[2])
      x = _as_gauss(srcs[1], self.shape(ins[1]))
      if lo != 0.0 or hi is None or hi <= 0 or x.relu:
        raise _Fail(f'a clamp to [{lo}, {hi}] (only [0, c] after a linear tensor)')
      return [dataclasses.replace(x, relu=True, cap=hi)]
    raise _Fail('not a primitive the rule propagates a Gaussian through')


class _Fail(Exception):
  pass


def graph_sources(spec, variables: Mapping[str, Any],
                  bn_gaussians: Mapping[str, tuple[Any, Any]] | None = None) -> dict[str, Any]:
  """Layer path -> what it reads (:class:`GraphSource`), for every conv / dense of ``variables``
  on the user model ``spec`` (``spec.family == 'custom'``), by walking the traced graph of the
  module of ``variables``' widths (module docstring).

  Raises:
    ValueError: a layer whose input is not determined by the rule, naming the layer and the
      primitive or layer that broke the chain, and the observed-range alternatives.
  """
  clean = {k: v for k, v in variables.items() if k == 'params' or k == 'batch_stats'}
  module = spec.build(units_lib.widths_of(variables, spec.units))
  prog = discover.trace(module, clean, (1, *spec.input_shape))
  sources = _Walker(prog, clean, bn_gaussians).run()
  bad = {p: s for p, s in sources.items() if not isinstance(s, GraphSource)}
  if bad:
    path = next(iter(bad))
    raise ValueError(
        f'{spec.name}: the BN range rule (--act-ranges bn) cannot determine the input of layer '
        f'{path!r}: {bad[path].reason}' +
        (f' (also {", ".join(repr(p) for p in list(bad)[1:])})' if len(bad) > 1 else '') +
        '; use --act-ranges distilled (data-free) or --act-ranges calibration --calib-data SPEC'
        ' (API: act_ranges=..., calib_images=...)')
  return sources
