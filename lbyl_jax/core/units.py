"""Prunable units and what discovery found about a model (docs/README.md, "Units").

A unit is a producer (nn.Conv / nn.Dense) whose output channels are removed, the BatchNorm after
it, the elementwise activation, and every linear consumer reading the channels (at a channel
offset after concatenations, in blocks after a flatten, through per-channel layers such as a
depthwise conv). :func:`lbyl_jax.models.discover.discover` finds them by tracing any flax.linen
module; the presets use the same discovery. The unit name doubles as the width slot of a preset.

Paths are '/'-joined keys into ``variables['params']`` (and ``variables['batch_stats']``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from lbyl_jax.core import trees

DEFAULT_POLICY = ('head', 'residual_stem')
POLICY_RULES = ('head', 'residual_stem', 'compensable')
COMPENSATIONS = ('exact', 'maxpool_approx', 'depthwise', 'prune_only')


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
  """Where a conv consumer's kernel taps read: enough for the padding-aware constant fold.

  Attributes:
    in_spatial: spatial size of the consumer's input.
    window: kernel spatial size.
    strides, padding ((lo, hi) per axis), rhs_dilation: as in the traced ``conv_general_dilated``
      (so 'SAME' is already resolved to explicit pads).
  """

  in_spatial: tuple[int, ...]
  window: tuple[int, ...]
  strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  rhs_dilation: tuple[int, ...]

  def tap_fractions(self) -> np.ndarray:
    """Per kernel tap (flattened in kernel order), the fraction of output positions at which the
    tap reads inside the input (not the zero padding); the outer product over spatial axes."""
    out = np.ones(())
    for size, k, s, (lo, hi), d in zip(self.in_spatial, self.window, self.strides, self.padding,
                                       self.rhs_dilation):
      n_out = (size + lo + hi - (d * (k - 1) + 1)) // s + 1
      idx = np.arange(n_out)[:, None] * s - lo + d * np.arange(k)[None, :]
      out = np.multiply.outer(out, ((idx >= 0) & (idx < size)).mean(axis=0))
    return out.reshape(-1)

@dataclasses.dataclass(frozen=True)
class Through:
  """A per-channel layer between a unit's activation and a consumer, sliced with the unit.

  Attributes:
    path: the layer's path.
    kind: 'bn' (BatchNorm: scale, bias, mean, var) or 'depthwise' (depthwise nn.Conv: kernel
      output axis and bias; input channel j is output channel j).
    offset: channel of the layer that holds the unit's channel 0.
  """

  path: str
  kind: str
  offset: int = 0

@dataclasses.dataclass(frozen=True)
class Consumer:
  """One linear layer reading a unit's channels.

  Attributes:
    path: the nn.Conv / nn.Dense.
    kind: 'conv' (kernel (*window, C_in, C_out); input axis -2) or 'dense' (kernel (F, O)).
    offset: conv: input channel holding the unit's channel 0 (after concatenations); dense: the
      first kernel row of channel 0.
    flatten: dense: kernel rows per channel (positions flattened into the features); 1 otherwise.
    flatten_order: 'nchw' (row of channel c, position s: offset + c * flatten + s; what a
      transpose to NCHW before the reshape gives, as in the presets) or 'nhwc' (offset + c +
      s * row_stride; a plain reshape of NHWC). 'nchw' whenever flatten == 1.
    row_stride: 'nhwc' only: rows between two positions of one channel (the channels of the
      flattened tensor); 0 otherwise.
    pool: 'max' or 'avg' if a pooling (windowed, or a global mean / max) sits between the
      activation and the consumer (max wins when both do).
    bn: the BatchNorm applied right after the consumer (its only user), which absorbs a constant
      shift in its mean, or None (the consumer's bias absorbs it, if it has one).
    scale: factor by which a constant on the unit's activation reaches the consumer's input
      (sum pools without division, scalar multiplications); 1 for averages.
    through: per-channel layers on this path (:class:`Through`), sliced with the unit.
    geometry: conv consumers: where the taps read (:class:`ConvGeometry`).
  """

  path: str
  kind: str
  offset: int = 0
  flatten: int = 1
  flatten_order: str = 'nchw'
  row_stride: int = 0
  pool: str | None = None
  bn: str | None = None
  scale: float = 1.0
  through: tuple[Through, ...] = ()
  geometry: ConvGeometry | None = dataclasses.field(default=None, compare=False)

  def indices(self, channels: np.ndarray) -> np.ndarray:
    """The consumer's input indices of unit channels ``channels``: conv (k,), dense (k, flatten)."""
    c = np.asarray(channels, np.int64)
    if self.kind == 'conv':
      return self.offset + c
    s = np.arange(self.flatten)
    if self.flatten_order == 'nchw':
      return self.offset + c[:, None] * self.flatten + s[None, :]
    return self.offset + c[:, None] + s[None, :] * self.row_stride

  def describe(self) -> str:
    parts = [self.kind]
    if self.offset:
      parts.append(f'offset {self.offset}')
    if self.flatten > 1:
      parts.append(f'flatten {self.flatten} {self.flatten_order}')
    if self.pool:
      parts.append(f'{self.pool}-pool')
    if self.scale != 1.0:
      parts.append(f'scale {self.scale:g}')
    if self.through:
      parts.append('through ' + ', '.join(f'{t.kind} {t.path}' for t in self.through))
    parts.append(f'bn {self.bn}' if self.bn else 'no bn')
    return f'{self.path} ({"; ".join(parts)})'

@dataclasses.dataclass(frozen=True)
class Unit:
  """A prunable unit: the producer's output channels, removed together with what reads them.

  ``consumer`` / ``consumer_kind`` / ``flatten`` / ``pool`` are those of the first consumer (the
  only one of every preset's unit).

  Attributes:
    name: the unit's name, equal to ``producer``.
    producer: path of the nn.Conv / nn.Dense whose output channels are pruned.
    bn: the BatchNorm right after the producer (its only user), or None.
    activation: the elementwise function after the producer / BN ('relu', 'gelu', ...,
      'identity', 'mixed' when paths differ).
    consumers: the linear layers reading the channels, in call order.
    width: the producer's output channels.
    compensation: 'exact', 'maxpool_approx' (A5), 'depthwise' (the path (BN) -> ReLU / ReLU6 ->
      depthwise conv -> BN -> ReLU / ReLU6 -> consumer of an inverted residual, compensated by
      :mod:`lbyl_jax.pruning.depthwise`, docs/mobilenet_v2.md) or 'prune_only'.
    reason: why the compensation is not 'exact'.
    producer_kind: 'conv' or 'dense'.
    through_activation: 'depthwise' units: the activation after the through layers (the one
      the consumers read: 'relu' or 'relu6'); None otherwise.
  """

  name: str
  producer: str
  bn: str | None
  activation: str
  consumers: tuple[Consumer, ...]
  width: int
  compensation: str = 'exact'
  reason: str = ''
  producer_kind: str = 'conv'
  through_activation: str | None = None

  @classmethod
  def of(cls, name: str, producer: str, bn: str | None, consumer: str, consumer_kind: str,
         flatten: int = 1, pool: str | None = None, *, width: int = 0,
         activation: str = 'relu') -> Unit:
    """A unit with one plain consumer (the presets' kind), e.g. for hand-built test networks
    and for extra producer -> consumer pairs such as DFQ's classifier chain."""
    con = Consumer(consumer, consumer_kind, 0, flatten, 'nchw', 0, pool)
    return cls(name, producer, bn, activation, (con,), width)

  @property
  def consumer(self) -> str:
    return self.consumers[0].path

  @property
  def consumer_kind(self) -> str:
    return self.consumers[0].kind

  @property
  def flatten(self) -> int:
    return self.consumers[0].flatten

  @property
  def pool(self) -> str | None:
    return self.consumers[0].pool

  @property
  def through(self) -> tuple[Through, ...]:
    """Every through layer of every consumer path (deduplicated, in order)."""
    seen: dict[Through, None] = {}
    for c in self.consumers:
      for t in c.through:
        seen.setdefault(t, None)
    return tuple(seen)


@dataclasses.dataclass(frozen=True)
class Blocked:
  """A producer that cannot be pruned, and why."""

  producer: str
  reason: str

@dataclasses.dataclass(frozen=True)
class Coupling:
  """Producers whose channels are tied (a residual add): prunable only all together, not done."""

  kind: str
  members: tuple[str, ...]
  reason: str

@dataclasses.dataclass(frozen=True)
class Excluded:
  """A structurally prunable unit left out by the discovery policy (A13)."""

  unit: Unit
  rule: str

@dataclasses.dataclass(frozen=True)
class Layer:
  """A traced nn.Conv / nn.Dense / nn.BatchNorm call.

  Attributes:
    path: module path ('/'-joined, as in ``variables['params']``).
    kind: 'conv', 'dense' or 'bn'.
    calls: how many times the module was called in one forward pass.
    features: output channels (conv / dense), channels (bn).
    in_features: input channels (conv: all groups together).
    groups: conv feature_group_count (1 otherwise).
    cls: the module's class name.
    positions: output positions per example, summed over the calls (conv / dense MACs are
      positions x kernel size, whatever the widths).
    epsilon: BatchNorm epsilon (None for conv / dense).
  """

  path: str
  kind: str
  calls: int
  features: int
  in_features: int
  groups: int = 1
  cls: str = ''
  positions: int = 0
  epsilon: float | None = None

@dataclasses.dataclass(frozen=True)
class Discovery:
  """What :func:`discover` found. ``str()`` prints it as a table.

  Attributes:
    units: the prunable units after the policy, in forward (call) order.
    excluded: units left out by the policy, with the rule.
    couplings: producers tied by residual adds.
    blocked: producers that cannot be pruned, with the reason.
    layers: every traced Conv / Dense / BatchNorm call.
    input_shape: the traced input shape (with the batch axis).
    policy: the policy rules applied.
    other_macs: multiply-accumulates per example of contractions outside nn.Conv / nn.Dense
      (never touched by pruning).
  """

  units: tuple[Unit, ...]
  excluded: tuple[Excluded, ...]
  couplings: tuple[Coupling, ...]
  blocked: tuple[Blocked, ...]
  layers: tuple[Layer, ...]
  input_shape: tuple[int, ...]
  policy: tuple[str, ...]
  other_macs: int = 0

  def macs(self, variables: Mapping[str, Any]) -> int:
    """Multiply-accumulates of one example's forward pass with the widths of ``variables``
    (original or pruned): per nn.Conv / nn.Dense, output positions x kernel size (the count of
    :mod:`lbyl_jax.stats`: H_out W_out C_out kh kw C_in / groups; out x fan_in), plus
    :attr:`other_macs`."""
    total = self.other_macs
    for layer in self.layers:
      if layer.kind in ('conv', 'dense'):
        k = np.shape(trees.get_path(variables['params'], layer.path)['kernel'])
        total += layer.positions * math.prod(k)
    return int(total)

  def unit(self, name: str) -> Unit:
    for u in self.units:
      if u.name == name:
        return u
    raise KeyError(f'no prunable unit named {name!r}; units: {", ".join(u.name for u in self.units)}')

  def layer(self, path: str) -> Layer:
    for layer in self.layers:
      if layer.path == path:
        return layer
    raise KeyError(f'no traced layer {path!r}')

  def table(self) -> str:
    """The units, exclusions, couplings and unprunable producers as a text table."""
    rows = [('unit', 'width', 'bn', 'activation', 'compensation', 'consumers')]
    for u in self.units:
      cons = '; '.join(c.describe() for c in u.consumers)
      rows.append((u.name, str(u.width), u.bn or '-', u.activation, u.compensation, cons))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [f'{len(self.units)} prunable units (input {self.input_shape}, policy '
             f'{", ".join(self.policy) or "none"})']
    for r in rows:
      lines.append('  '.join(r[i].ljust(widths[i]) for i in range(5)) + '  ' + r[5])
    notes = [u for u in self.units if u.reason]
    if notes:
      lines.append('compensation notes:')
      lines.extend(f'  {u.name}: {u.compensation}: {u.reason}' for u in notes)
    if self.excluded:
      lines.append(f'excluded by policy ({len(self.excluded)}):')
      lines.extend(f'  {e.unit.name}: {e.rule}' for e in self.excluded)
    if self.couplings:
      lines.append(f'coupled, not pruned ({len(self.couplings)} groups):')
      lines.extend(f'  {c.kind}: {", ".join(c.members)} ({c.reason})' for c in self.couplings)
    if self.blocked:
      lines.append(f'unprunable ({len(self.blocked)}):')
      lines.extend(f'  {b.producer}: {b.reason}' for b in self.blocked)
    return '\n'.join(lines)

  def __str__(self) -> str:
    return self.table()



def width_of(variables: Mapping[str, Any], unit: Unit) -> int:
  return int(np.shape(trees.get_path(variables['params'], unit.producer)['kernel'])[-1])


def widths_of(variables: Mapping[str, Any], units) -> tuple[int, ...]:
  """The producer widths of a (possibly pruned) variable tree, in unit order (``units``: a
  sequence of units or a :class:`Discovery`)."""
  unit_list = units.units if isinstance(units, Discovery) else tuple(units)
  return tuple(width_of(variables, u) for u in unit_list)


# --------------------------------------------------------------------------------------------
# A Discovery as plain JSON data (kept on disk next to the compilation cache for the presets,
# :func:`lbyl_jax.models.trace.cached_on_disk`): every field is a string, a number, None, or a
# tuple of those or of the dataclasses above, so the round trip is exact (Python floats print
# their shortest exact repr).


def _plain(x: Any) -> Any:
  if dataclasses.is_dataclass(x):
    return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
  if isinstance(x, (tuple, list)):
    return [_plain(v) for v in x]
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x)
  if x is None or isinstance(x, str):
    return x
  raise TypeError(f'cannot write {type(x).__name__} as discovery data')


def _tuple(x: Any) -> Any:
  return tuple(_tuple(v) for v in x) if isinstance(x, list) else x


def _geometry(d: Mapping[str, Any] | None) -> ConvGeometry | None:
  return None if d is None else ConvGeometry(**{k: _tuple(v) for k, v in d.items()})


def _consumer(d: Mapping[str, Any]) -> Consumer:
  return Consumer(**{**d, 'through': tuple(Through(**t) for t in d['through']),
                     'geometry': _geometry(d['geometry'])})


def _unit(d: Mapping[str, Any]) -> Unit:
  return Unit(**{**d, 'consumers': tuple(_consumer(c) for c in d['consumers'])})


def discovery_to_json(d: Discovery) -> dict[str, Any]:
  """``d`` as JSON-ready data (:func:`discovery_from_json` reads it back equal, geometry
  included)."""
  return _plain(d)


def discovery_from_json(d: Mapping[str, Any]) -> Discovery:
  """The :class:`Discovery` written by :func:`discovery_to_json`."""
  return Discovery(
      units=tuple(_unit(u) for u in d['units']),
      excluded=tuple(Excluded(_unit(e['unit']), e['rule']) for e in d['excluded']),
      couplings=tuple(Coupling(c['kind'], tuple(c['members']), c['reason'])
                      for c in d['couplings']),
      blocked=tuple(Blocked(**b) for b in d['blocked']),
      layers=tuple(Layer(**layer) for layer in d['layers']),
      input_shape=tuple(d['input_shape']), policy=tuple(d['policy']),
      other_macs=int(d['other_macs']))
